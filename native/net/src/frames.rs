//! Outgoing packets as the VM hands them over: whole frames (length prefix, then body),
//! each in one or more pieces. Small parts are copied into one shared buffer, so that
//! consecutive frames bound for the same lane still leave as one slice; large binaries are
//! referenced where the VM keeps them, so a 1 MiB message is never copied before QUIC
//! encrypts it.

use bytes::Bytes;
use std::ops::Range;
use trust_dist_proto::frame;

/// One piece of a frame: a range of the shared buffer, or memory of its own.
#[derive(Debug, Clone)]
pub(crate) enum Piece {
    Buf(Range<usize>),
    Shared(Bytes),
}

impl Piece {
    pub(crate) fn len(&self) -> usize {
        match self {
            Piece::Buf(range) => range.len(),
            Piece::Shared(bytes) => bytes.len(),
        }
    }
}

/// Whole frames for the peer, in order. Every frame's first piece is a range of the
/// shared buffer that starts with its length prefix.
#[derive(Debug, Clone, Default)]
pub struct Frames {
    pub(crate) buf: Bytes,
    pub(crate) pieces: Vec<Piece>,
    /// For each frame, the index in `pieces` one past its last piece.
    pub(crate) ends: Vec<usize>,
}

impl Frames {
    /// Frames already laid out one after another in one buffer. A truncated last frame
    /// is sent as it is (the peer will find the stream malformed, as it should).
    pub fn contiguous(buf: Bytes) -> Self {
        let mut pieces = Vec::new();
        let mut ends = Vec::new();
        let mut pos = 0;
        while pos + frame::HEADER_BYTES <= buf.len() {
            let len = u32::from_be_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]);
            let end = (pos + frame::HEADER_BYTES)
                .saturating_add(len as usize)
                .min(buf.len());
            pieces.push(Piece::Buf(pos..end));
            ends.push(pieces.len());
            pos = end;
        }
        if pos < buf.len() {
            pieces.push(Piece::Buf(pos..buf.len()));
            ends.push(pieces.len());
        }
        Frames { buf, pieces, ends }
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The pieces of each frame, in order.
    pub(crate) fn each(&self) -> impl Iterator<Item = &[Piece]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let frame = &self.pieces[start..end];
            start = end;
            frame
        })
    }

    #[cfg(test)]
    fn slice(&self, piece: &Piece) -> Bytes {
        match piece {
            Piece::Buf(range) => self.buf.slice(range.clone()),
            Piece::Shared(bytes) => bytes.clone(),
        }
    }

    /// The body of a frame as far as its first piece holds it (the length prefix left
    /// out): the whole body, unless the frame carries a large binary.
    pub(crate) fn head<'a>(&'a self, frame: &[Piece]) -> &'a [u8] {
        match frame.first() {
            Some(Piece::Buf(range)) => self
                .buf
                .get(range.start + frame::HEADER_BYTES..range.end)
                .unwrap_or_default(),
            _ => &[],
        }
    }

    /// A frame's whole body in one piece (a copy when it has more than one).
    pub(crate) fn body(&self, frame: &[Piece]) -> Vec<u8> {
        let mut body = Vec::new();
        for piece in frame {
            match piece {
                Piece::Buf(range) => body.extend_from_slice(&self.buf[range.clone()]),
                Piece::Shared(bytes) => body.extend_from_slice(bytes),
            }
        }
        body.split_off(frame::HEADER_BYTES.min(body.len()))
    }
}

/// Builds [`Frames`] one frame at a time.
#[derive(Debug, Default)]
pub struct FramesBuilder {
    buf: Vec<u8>,
    pieces: Vec<Piece>,
    ends: Vec<usize>,
    /// Where the open range of `buf` (not yet a piece) starts.
    open: usize,
    /// Body bytes the frame under way announced and has not yet been given.
    owed: usize,
}

impl FramesBuilder {
    /// `buf_capacity`: bytes that will be copied (prefixes and small parts), if known.
    pub fn with_capacity(buf_capacity: usize) -> Self {
        FramesBuilder {
            buf: Vec::with_capacity(buf_capacity),
            ..Self::default()
        }
    }

    /// Starts a frame whose body is `len` bytes; its parts follow through
    /// [`FramesBuilder::copy`] and [`FramesBuilder::share`].
    pub fn begin(&mut self, len: u32) {
        self.end_frame();
        self.buf.extend_from_slice(&frame::header(len));
        self.owed = len as usize;
    }

    /// Part of the current frame's body, copied into the shared buffer.
    pub fn copy(&mut self, part: &[u8]) {
        self.owed = self.owed.saturating_sub(part.len());
        self.buf.extend_from_slice(part);
    }

    /// Part of the current frame's body, referenced where it is.
    pub fn share(&mut self, part: Bytes) {
        self.close_range();
        self.owed = self.owed.saturating_sub(part.len());
        self.pieces.push(Piece::Shared(part));
    }

    pub fn finish(mut self) -> Frames {
        self.end_frame();
        Frames {
            buf: Bytes::from(self.buf),
            pieces: self.pieces,
            ends: self.ends,
        }
    }

    fn close_range(&mut self) {
        if self.buf.len() > self.open {
            self.pieces.push(Piece::Buf(self.open..self.buf.len()));
            self.open = self.buf.len();
        }
    }

    fn end_frame(&mut self) {
        debug_assert_eq!(self.owed, 0, "a frame got fewer bytes than it announced");
        self.close_range();
        if self.pieces.len() > self.ends.last().copied().unwrap_or(0) {
            self.ends.push(self.pieces.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(frames: &Frames) -> Vec<Vec<u8>> {
        frames
            .each()
            .map(|f| {
                f.iter()
                    .flat_map(|p| frames.slice(p).to_vec())
                    .collect::<Vec<u8>>()
            })
            .collect()
    }

    #[test]
    fn a_large_part_is_shared_and_small_ones_are_copied_together() {
        let big = Bytes::from(vec![7u8; 100]);
        let mut b = FramesBuilder::default();
        b.begin(3);
        b.copy(b"abc");
        b.begin(2 + 100 + 1);
        b.copy(b"xy");
        b.share(big.clone());
        b.copy(b"z");
        let frames = b.finish();
        assert_eq!(frames.len(), 2);
        let all = flat(&frames);
        assert_eq!(all[0], [0, 0, 0, 3, b'a', b'b', b'c']);
        assert_eq!(&all[1][..6], &[0, 0, 0, 103, b'x', b'y']);
        let second: Vec<&Piece> = frames.each().nth(1).unwrap_or_default().iter().collect();
        assert!(matches!(second[1], Piece::Shared(s) if s.as_ptr() == big.as_ptr()));
        assert_eq!(frames.head(frames.each().nth(1).unwrap_or_default()), b"xy");
        assert_eq!(
            frames.body(frames.each().nth(1).unwrap_or_default()).len(),
            103
        );
    }

    #[test]
    fn contiguous_frames_split_by_their_prefixes() {
        let buf = Bytes::from_static(&[0, 0, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 2, 1]);
        let frames = Frames::contiguous(buf);
        assert_eq!(
            flat(&frames),
            vec![vec![0, 0, 0, 1, 9], vec![0, 0, 0, 0], vec![0, 0, 0, 2, 1]]
        );
    }
}
