//! Framing of the distribution stream: every packet is a 4-byte big-endian length followed
//! by that many bytes; a length of 0 is a tick. Handshake messages use the same framing.
//!
//! [`FrameDecoder`] is sans-IO: feed it whatever chunks the transport delivers, take whole
//! frames out. It never allocates by the length a peer announces, and it never copies a
//! body: a [`Frame`] is the slices of the transport's own buffers that hold it, so the one
//! copy a packet costs is the one into its final home (for the NIF, a VM binary of
//! exactly its size). A length above the limit is an error before any byte of the body is
//! read.

use bytes::Bytes;

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },
}

/// Writes the length prefix of a frame of `len` bytes.
pub fn header(len: u32) -> [u8; HEADER_BYTES] {
    len.to_be_bytes()
}

/// One whole frame's body, as the pieces of the input chunks that carried it, in order.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pieces: Vec<Bytes>,
    len: usize,
}

impl Frame {
    fn push(&mut self, piece: Bytes) {
        self.len += piece.len();
        self.pieces.push(piece);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pieces(&self) -> &[Bytes] {
        &self.pieces
    }

    /// Copies the body into `out`, which must be exactly [`Frame::len`] bytes long.
    pub fn copy_to(&self, out: &mut [u8]) {
        debug_assert_eq!(out.len(), self.len);
        let mut at = 0;
        for piece in &self.pieces {
            let end = (at + piece.len()).min(out.len());
            out[at..end].copy_from_slice(&piece[..end - at]);
            at = end;
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

/// One unit of a stream, in order: a whole frame, or the length of one thrown away.
#[derive(Debug)]
pub enum Decoded {
    Frame(Frame),
    Discarded(usize),
}

#[derive(Debug)]
pub struct FrameDecoder {
    max_len: u32,
    header: [u8; HEADER_BYTES],
    header_filled: usize,
    body: Frame,
    body_len: usize,
    in_body: bool,
    /// Frames longer than this (and within `max_len`) are skipped as they arrive, never
    /// buffered; see [`FrameDecoder::set_discard_above`].
    discard_above: u32,
    skip_left: usize,
    discarded: Vec<usize>,
}

impl FrameDecoder {
    pub fn new(max_len: u32) -> Self {
        FrameDecoder {
            max_len,
            header: [0; HEADER_BYTES],
            header_filled: 0,
            body: Frame::default(),
            body_len: 0,
            in_body: false,
            discard_above: u32::MAX,
            skip_left: 0,
            discarded: Vec::new(),
        }
    }

    /// Frames longer than `len` bytes are dropped without being buffered: their bytes
    /// are consumed and thrown away as they arrive, and their lengths are reported by
    /// [`FrameDecoder::take_discarded`]. A frame too large for a message limit then costs
    /// the link nothing but the bandwidth.
    pub fn set_discard_above(&mut self, len: u32) {
        self.discard_above = len;
        // A frame already under way that is over the new limit is dropped too: what is
        // buffered goes, the rest is skipped as it comes.
        if self.in_body && self.body_len > len as usize {
            self.discarded.push(self.body_len);
            self.skip_left = self.body_len - self.body.len();
            self.body = Frame::default();
            self.in_body = false;
        }
    }

    /// Lengths of the frames discarded since the last call.
    pub fn take_discarded(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.discarded)
    }

    /// Lowers or raises the limit for frames whose header has not been read yet.
    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    /// Bytes of a partial frame held (header and body so far).
    pub fn buffered(&self) -> usize {
        if self.in_body {
            self.body.len()
        } else {
            self.header_filled
        }
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.header_filled == 0 && !self.in_body && self.skip_left == 0
    }

    /// Consumes bytes from `input`, returning how many were used and a frame if one was
    /// completed. Call again with the rest of `input` until it is used up. The frame
    /// shares `input`'s memory; nothing is copied.
    pub fn decode(&mut self, input: &Bytes) -> Result<(usize, Option<Frame>), FrameError> {
        let mut used = 0;
        if self.skip_left > 0 {
            let take = self.skip_left.min(input.len());
            self.skip_left -= take;
            return Ok((take, None));
        }
        if !self.in_body {
            let take = (HEADER_BYTES - self.header_filled).min(input.len());
            self.header[self.header_filled..self.header_filled + take]
                .copy_from_slice(&input[..take]);
            self.header_filled += take;
            used += take;
            if self.header_filled < HEADER_BYTES {
                return Ok((used, None));
            }
            let len = u32::from_be_bytes(self.header);
            if len > self.max_len {
                return Err(FrameError::TooLarge {
                    len: len.into(),
                    max: self.max_len.into(),
                });
            }
            self.header_filled = 0;
            if len > self.discard_above {
                self.discarded.push(len as usize);
                self.skip_left = len as usize;
                return Ok((used, None));
            }
            self.body_len = len as usize;
            self.in_body = true;
        }
        let take = (self.body_len - self.body.len()).min(input.len() - used);
        if take > 0 {
            self.body.push(input.slice(used..used + take));
        }
        used += take;
        if self.body.len() == self.body_len {
            self.in_body = false;
            return Ok((used, Some(std::mem::take(&mut self.body))));
        }
        Ok((used, None))
    }

    /// Like [`FrameDecoder::decode_all`], with the frames thrown away for the discard
    /// limit in their place among the others (a receiver that counts a stream's frames,
    /// for barriers, must count them where they were).
    pub fn decode_all_in_order(
        &mut self,
        input: &Bytes,
        out: &mut Vec<Decoded>,
    ) -> Result<(), FrameError> {
        let mut at = 0;
        loop {
            // One call completes a frame or throws one away, never both.
            out.extend(self.discarded.drain(..).map(Decoded::Discarded));
            if at >= input.len() {
                return Ok(());
            }
            let (used, frame) = self.decode(&input.slice(at..))?;
            if let Some(frame) = frame {
                out.push(Decoded::Frame(frame));
            }
            at += used;
        }
    }

    /// Decodes every whole frame in `input`, in order, buffering any partial rest.
    pub fn decode_all(&mut self, input: &Bytes, out: &mut Vec<Frame>) -> Result<(), FrameError> {
        let mut at = 0;
        while at < input.len() {
            let (used, frame) = self.decode(&input.slice(at..))?;
            if let Some(frame) = frame {
                out.push(frame);
            }
            at += used;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bodies(frames: &[Frame]) -> Vec<Vec<u8>> {
        frames.iter().map(Frame::to_vec).collect()
    }

    fn encode(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&header(f.len() as u32));
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn discarded_frames_keep_their_place_among_the_others() {
        fn seen(out: &mut Vec<Decoded>) -> Vec<String> {
            out.drain(..)
                .map(|u| match u {
                    Decoded::Frame(f) => String::from_utf8(f.to_vec()).unwrap(),
                    Decoded::Discarded(n) => n.to_string(),
                })
                .collect()
        }
        let input = Bytes::from(encode(&[
            b"one".to_vec(),
            vec![7; 100],
            b"two".to_vec(),
            vec![7; 50],
            vec![7; 60],
            b"three".to_vec(),
        ]));
        let want = ["one", "100", "two", "50", "60", "three"];
        // In one chunk, and byte by byte: a discard found in one chunk keeps its place
        // before the frames of the next.
        for step in [input.len(), 1] {
            let mut d = FrameDecoder::new(1 << 20);
            d.set_discard_above(8);
            let mut out = Vec::new();
            for at in (0..input.len()).step_by(step) {
                let chunk = input.slice(at..(at + step).min(input.len()));
                d.decode_all_in_order(&chunk, &mut out).unwrap();
            }
            assert_eq!(seen(&mut out), want, "in chunks of {step}");
            assert!(d.take_discarded().is_empty());
        }
    }

    #[test]
    fn frames_over_the_discard_limit_are_skipped_unbuffered() {
        let mut d = FrameDecoder::new(1 << 20);
        d.set_discard_above(8);
        let input = encode(&[vec![1; 4], vec![2; 100_000], vec![3; 8]]);
        let mut out = Vec::new();
        for chunk in input.chunks(1000) {
            d.decode_all(&Bytes::copy_from_slice(chunk), &mut out)
                .expect("within the hard limit");
            assert!(d.buffered() <= 8, "a discarded frame is never buffered");
        }
        assert_eq!(bodies(&out), vec![vec![1; 4], vec![3; 8]]);
        assert_eq!(d.take_discarded(), vec![100_000]);
        assert!(d.is_idle());
    }

    #[test]
    fn frames_are_slices_of_the_input_never_copies() {
        let input = Bytes::from(encode(&[vec![1; 10], vec![2; 3000], vec![3; 5]]));
        let mut d = FrameDecoder::new(1 << 20);
        let mut out = Vec::new();
        for at in (0..input.len()).step_by(1000) {
            let chunk = input.slice(at..(at + 1000).min(input.len()));
            d.decode_all(&chunk, &mut out).expect("within limit");
        }
        assert_eq!(bodies(&out), vec![vec![1; 10], vec![2; 3000], vec![3; 5]]);
        let range = input.as_ptr_range();
        for piece in out.iter().flat_map(Frame::pieces) {
            let inside = piece.as_ptr_range();
            assert!(range.start <= inside.start && inside.end <= range.end);
        }
        assert_eq!(
            out[1].pieces().len(),
            4,
            "a frame over four chunks is their four slices"
        );
    }

    #[test]
    fn ticks_are_empty_frames() {
        let mut d = FrameDecoder::new(16);
        let mut out = Vec::new();
        d.decode_all(&Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 1, 7]), &mut out)
            .expect("within limit");
        assert_eq!(bodies(&out), vec![vec![], vec![7]]);
        assert!(d.is_idle());
    }

    #[test]
    fn oversized_length_is_refused_before_the_body() {
        let mut d = FrameDecoder::new(1024);
        let mut out = Vec::new();
        assert_eq!(
            d.decode_all(&Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]), &mut out),
            Err(FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            })
        );
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_frames(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let bytes = encode(&frames);
            let mut d = FrameDecoder::new(1000);
            let mut out = Vec::new();
            let mut rest = &bytes[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                d.decode_all(&Bytes::copy_from_slice(&rest[..n]), &mut out).expect("within limit");
                rest = &rest[n..];
                i += 1;
            }
            prop_assert_eq!(bodies(&out), frames);
            prop_assert!(d.is_idle());
        }
    }
}
