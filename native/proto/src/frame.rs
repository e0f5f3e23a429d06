//! Framing of the distribution stream: every packet is a 4-byte big-endian length followed
//! by that many bytes; a length of 0 is a tick. Handshake messages use the same framing.
//!
//! [`FrameDecoder`] is sans-IO: feed it whatever chunks the transport delivers, take whole
//! frames out. A length above the limit is an error before any byte of the body is read.
//!
//! A body that arrives within one chunk comes out as a slice of that chunk. A body that
//! spans chunks is copied, as its pieces arrive, into memory the caller gives (for the
//! NIF, the VM binary of exactly its size that it ends up in), so each of its bytes is
//! copied once too. It is never held as slices of the transport's buffers: a slice keeps
//! its whole receive buffer alive, and a peer sending one body byte per packet (or per
//! batch of coalesced packets) would make the bytes counted against its read-ahead pin a
//! hundred or a thousand times as much memory. The decoder allocates by a length the
//! peer announces only through the caller's allocator, which decides how much it grants
//! ([`Ask::Ahead`]); without it, a body is gathered in memory that grows with what has
//! arrived (at most twice that, or 64 KiB). When that memory would grow to the body's
//! whole size, at least half has arrived, and the decoder asks for the caller's memory
//! again in its place ([`Ask::Earned`]), so only the first half is copied twice.

use bytes::Bytes;

/// Bytes of the length prefix.
pub const HEADER_BYTES: usize = 4;

/// The most a gathered body's first allocation takes on the announced length's word.
const GATHER_FIRST: usize = 64 * 1024;

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

/// What the decoder asks its caller's allocator for: memory of exactly a body's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Before the body's bytes have come, on the length the peer announced: the caller
    /// decides how much it lends on a peer's word.
    Ahead(usize),
    /// In place of growing the memory a body is gathered in to the body's whole length,
    /// which happens only once at least half of it has come: it costs no more memory than
    /// that growth would, and the caller copies nothing when the body is complete.
    Earned(usize),
}

impl Ask {
    pub fn body_len(self) -> usize {
        match self {
            Ask::Ahead(len) | Ask::Earned(len) => len,
        }
    }
}

/// Memory of a fixed size that a body is copied into as it arrives.
pub trait BodyBuffer {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

impl BodyBuffer for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
}

/// One whole frame's body.
#[derive(Debug)]
pub enum Frame<B = Vec<u8>> {
    /// It arrived within one input chunk: a slice of it, nothing copied.
    Slice(Bytes),
    /// It spanned chunks and was copied into memory the caller's allocator gave.
    Filled(B),
    /// It spanned chunks and was copied into memory of the decoder's own.
    Gathered(Vec<u8>),
}

impl<B> Default for Frame<B> {
    fn default() -> Self {
        Frame::Slice(Bytes::new())
    }
}

impl<B: BodyBuffer> Frame<B> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Frame::Slice(bytes) => bytes,
            Frame::Filled(buf) => buf.bytes(),
            Frame::Gathered(vec) => vec,
        }
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes().to_vec()
    }
}

/// One unit of a stream, in order: a whole frame, or the length of one thrown away.
#[derive(Debug)]
pub enum Decoded<B = Vec<u8>> {
    Frame(Frame<B>),
    Discarded(usize),
}

/// The body of the frame under way.
#[derive(Debug)]
enum Partial<B> {
    /// Between frames (or reading a header).
    None,
    /// `filled` bytes of the caller's buffer, which is the body's size, are in; `earned`
    /// if it was given for what had arrived ([`Ask::Earned`]), not lent ahead.
    Filled { buf: B, filled: usize, earned: bool },
    /// What has arrived, in memory that grows with it up to the body's size.
    Gathered(Vec<u8>),
}

#[derive(Debug)]
pub struct FrameDecoder<B = Vec<u8>> {
    max_len: u32,
    header: [u8; HEADER_BYTES],
    header_filled: usize,
    body: Partial<B>,
    body_len: usize,
    /// Frames longer than this (and within `max_len`) are skipped as they arrive, never
    /// buffered; see [`FrameDecoder::set_discard_above`].
    discard_above: u32,
    skip_left: usize,
    discarded: Vec<usize>,
    /// The most a gathered body's first allocation takes.
    gather_first: usize,
}

/// The capacity memory gathering a body of `body_len` bytes grows to before `take` more
/// bytes go in, if it must grow: twice what has arrived at most, never past the body's
/// size, so what it takes follows what the peer has really sent.
fn growth(gathered: &Vec<u8>, take: usize, body_len: usize) -> Option<usize> {
    (gathered.capacity() - gathered.len() < take).then(|| {
        (gathered.len() + take)
            .max(gathered.capacity() * 2)
            .min(body_len)
    })
}

/// An allocator that grants nothing: bodies that span chunks are gathered.
fn gather<B>(_ask: Ask) -> Option<B> {
    None
}

impl<B: BodyBuffer> FrameDecoder<B> {
    pub fn new(max_len: u32) -> Self {
        FrameDecoder {
            max_len,
            header: [0; HEADER_BYTES],
            header_filled: 0,
            body: Partial::None,
            body_len: 0,
            discard_above: u32::MAX,
            skip_left: 0,
            discarded: Vec::new(),
            gather_first: GATHER_FIRST,
        }
    }

    /// Lowers the first allocation for a gathered body from 64 KiB, so that tests and
    /// fuzzing reach the growth (and [`Ask::Earned`]) with small frames.
    #[doc(hidden)]
    pub fn set_gather_first(&mut self, len: usize) {
        self.gather_first = len.max(1);
    }

    /// Frames longer than `len` bytes are dropped without being buffered: their bytes
    /// are consumed and thrown away as they arrive, and their lengths are reported by
    /// [`FrameDecoder::take_discarded`]. A frame too large for a message limit then costs
    /// the link nothing but the bandwidth.
    pub fn set_discard_above(&mut self, len: u32) {
        self.discard_above = len;
        // A frame already under way that is over the new limit is dropped too: what is
        // buffered goes, the rest is skipped as it comes.
        if self.in_body() && self.body_len > len as usize {
            self.discarded.push(self.body_len);
            self.skip_left = self.body_len - self.buffered();
            self.body = Partial::None;
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

    fn in_body(&self) -> bool {
        !matches!(self.body, Partial::None)
    }

    /// Bytes of a partial frame received so far (header and body so far).
    pub fn buffered(&self) -> usize {
        match &self.body {
            Partial::None => self.header_filled,
            Partial::Filled { filled, .. } => *filled,
            Partial::Gathered(vec) => vec.len(),
        }
    }

    /// Bytes of memory lent ahead by the caller's allocator that the frame under way holds (its
    /// whole size, however much of it has arrived).
    pub fn reserved(&self) -> usize {
        match &self.body {
            Partial::Filled { earned: false, .. } => self.body_len,
            _ => 0,
        }
    }

    /// True when no partial frame is buffered.
    pub fn is_idle(&self) -> bool {
        self.header_filled == 0 && !self.in_body() && self.skip_left == 0
    }

    /// Consumes bytes from `input`, returning how many were used and a frame if one was
    /// completed. Call again with the rest of `input` until it is used up. Bodies that
    /// span chunks are gathered in the decoder's own memory.
    pub fn decode(&mut self, input: &Bytes) -> Result<(usize, Option<Frame<B>>), FrameError> {
        self.decode_with(input, &mut gather)
    }

    /// [`FrameDecoder::decode`], with `alloc` asked for memory of a body's exact size
    /// when a body does not end in `input`, and again ([`Ask::Earned`]) when a body
    /// gathered instead would grow to its whole size. It may return `None` (the body is
    /// then gathered); memory of another size is not used.
    pub fn decode_with(
        &mut self,
        input: &Bytes,
        alloc: &mut impl FnMut(Ask) -> Option<B>,
    ) -> Result<(usize, Option<Frame<B>>), FrameError> {
        let mut used = 0;
        if self.skip_left > 0 {
            let take = self.skip_left.min(input.len());
            self.skip_left -= take;
            return Ok((take, None));
        }
        if !self.in_body() {
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
            let len = len as usize;
            if input.len() - used >= len {
                return Ok((
                    used + len,
                    Some(Frame::Slice(input.slice(used..used + len))),
                ));
            }
            self.body_len = len;
            self.body = match alloc(Ask::Ahead(len)) {
                Some(buf) if buf.bytes().len() == len => Partial::Filled {
                    buf,
                    filled: 0,
                    earned: false,
                },
                _ => Partial::Gathered(Vec::with_capacity(len.min(self.gather_first))),
            };
        }
        let take = (self.body_len - self.buffered()).min(input.len() - used);
        let part = &input[used..used + take];
        used += take;
        if let Partial::Gathered(vec) = &self.body {
            if growth(vec, take, self.body_len) == Some(self.body_len) {
                self.fill_earned(alloc);
            }
        }
        match &mut self.body {
            Partial::None => {}
            Partial::Filled { buf, filled, .. } => {
                buf.bytes_mut()[*filled..*filled + take].copy_from_slice(part);
                *filled += take;
            }
            Partial::Gathered(vec) => {
                if let Some(capacity) = growth(vec, take, self.body_len) {
                    vec.reserve_exact(capacity - vec.len());
                }
                vec.extend_from_slice(part);
            }
        }
        if self.buffered() == self.body_len {
            let frame = match std::mem::replace(&mut self.body, Partial::None) {
                Partial::Filled { buf, .. } => Frame::Filled(buf),
                Partial::Gathered(vec) => Frame::Gathered(vec),
                Partial::None => Frame::default(),
            };
            return Ok((used, Some(frame)));
        }
        Ok((used, None))
    }

    /// Moves the gathered body into the caller's memory, if it gives some of the body's
    /// size.
    fn fill_earned(&mut self, alloc: &mut impl FnMut(Ask) -> Option<B>) {
        let Some(mut buf) = alloc(Ask::Earned(self.body_len)) else {
            return;
        };
        if buf.bytes().len() != self.body_len {
            return;
        }
        if let Partial::Gathered(vec) = &self.body {
            buf.bytes_mut()[..vec.len()].copy_from_slice(vec);
            self.body = Partial::Filled {
                buf,
                filled: vec.len(),
                earned: true,
            };
        }
    }

    /// Like [`FrameDecoder::decode_all`], with the frames thrown away for the discard
    /// limit in their place among the others (a receiver that counts a stream's frames,
    /// for barriers, must count them where they were).
    pub fn decode_all_in_order(
        &mut self,
        input: &Bytes,
        out: &mut Vec<Decoded<B>>,
    ) -> Result<(), FrameError> {
        self.decode_all_in_order_with(input, out, &mut gather)
    }

    /// [`FrameDecoder::decode_all_in_order`] with an allocator, as for
    /// [`FrameDecoder::decode_with`].
    pub fn decode_all_in_order_with(
        &mut self,
        input: &Bytes,
        out: &mut Vec<Decoded<B>>,
        alloc: &mut impl FnMut(Ask) -> Option<B>,
    ) -> Result<(), FrameError> {
        let mut at = 0;
        loop {
            // One call completes a frame or throws one away, never both.
            out.extend(self.discarded.drain(..).map(Decoded::Discarded));
            if at >= input.len() {
                return Ok(());
            }
            let (used, frame) = self.decode_with(&input.slice(at..), alloc)?;
            if let Some(frame) = frame {
                out.push(Decoded::Frame(frame));
            }
            at += used;
        }
    }

    /// Decodes every whole frame in `input`, in order, buffering any partial rest.
    pub fn decode_all(&mut self, input: &Bytes, out: &mut Vec<Frame<B>>) -> Result<(), FrameError> {
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
    fn a_body_within_one_chunk_is_a_slice_of_it() {
        let input = Bytes::from(encode(&[vec![1; 10], vec![2; 3000]]));
        let mut d = FrameDecoder::<Vec<u8>>::new(1 << 20);
        let mut out = Vec::new();
        d.decode_all(&input, &mut out).expect("within limit");
        let range = input.as_ptr_range();
        for frame in &out {
            assert!(matches!(frame, Frame::Slice(_)));
            let inside = frame.bytes().as_ptr_range();
            assert!(range.start <= inside.start && inside.end <= range.end);
        }
    }

    /// Each chunk a slice of a receive buffer much larger than it, as QUIC's are.
    fn chunks_of_big_buffers(bytes: &[u8], step: usize) -> Vec<(Bytes, Bytes)> {
        bytes
            .chunks(step)
            .map(|part| {
                let mut buffer = vec![0u8; 64 * 1024];
                buffer[..part.len()].copy_from_slice(part);
                let buffer = Bytes::from(buffer);
                (buffer.slice(..part.len()), buffer)
            })
            .collect()
    }

    #[test]
    fn a_body_across_chunks_keeps_none_of_their_buffers() {
        let input = encode(&[vec![5; 3000], vec![6; 7]]);
        for with_alloc in [false, true] {
            let mut d = FrameDecoder::<Vec<u8>>::new(1 << 20);
            let mut out = Vec::new();
            let mut buffers = Vec::new();
            for (chunk, buffer) in chunks_of_big_buffers(&input, 3) {
                d.decode_all_in_order_with(&chunk, &mut out, &mut |ask| {
                    with_alloc.then(|| vec![0; ask.body_len()])
                })
                .expect("within limit");
                buffers.push(buffer);
            }
            let bodies: Vec<Vec<u8>> = out
                .iter()
                .map(|u| match u {
                    Decoded::Frame(f) => f.to_vec(),
                    Decoded::Discarded(_) => Vec::new(),
                })
                .collect();
            assert_eq!(bodies, vec![vec![5; 3000], vec![6; 7]]);
            assert!(
                matches!(
                    &out[0],
                    Decoded::Frame(Frame::Filled(_)) if with_alloc
                ) || matches!(&out[0], Decoded::Frame(Frame::Gathered(_)) if !with_alloc)
            );
            for buffer in &mut buffers {
                assert!(buffer.is_unique(), "a receive buffer is still referenced");
            }
        }
    }

    #[test]
    fn the_callers_memory_is_used_only_at_the_bodys_size() {
        let input = Bytes::from(encode(&[vec![9; 100]]));
        let mut d = FrameDecoder::<Vec<u8>>::new(1 << 20);
        let mut asked = Vec::new();
        let mut wrong_size = |ask: Ask| {
            asked.push(ask);
            Some(vec![0; ask.body_len() + 1])
        };
        let (used, frame) = d.decode_with(&input.slice(..50), &mut wrong_size).unwrap();
        assert_eq!((used, frame.is_none()), (50, true));
        assert_eq!(d.reserved(), 0, "memory of the wrong size is not kept");
        let (_, frame) = d.decode_with(&input.slice(50..), &mut wrong_size).unwrap();
        assert!(matches!(frame, Some(Frame::Gathered(ref v)) if v == &vec![9; 100]));
        assert_eq!(asked, vec![Ask::Ahead(100)]);

        let mut d = FrameDecoder::<Vec<u8>>::new(1 << 20);
        d.decode_with(&input.slice(..50), &mut |ask| Some(vec![0; ask.body_len()]))
            .unwrap();
        assert_eq!((d.reserved(), d.buffered()), (100, 46));
        let (_, frame) = d
            .decode_with(&input.slice(50..), &mut |_| {
                panic!("one body, one allocation")
            })
            .unwrap();
        assert!(matches!(frame, Some(Frame::Filled(ref v)) if v == &vec![9; 100]));
        assert_eq!(d.reserved(), 0);
    }

    #[test]
    fn gathered_memory_follows_what_arrived_not_what_was_announced() {
        let announced = 100 << 20;
        let mut d = FrameDecoder::<Vec<u8>>::new(announced);
        let mut head = header(announced).to_vec();
        head.extend_from_slice(&[1; 10]);
        d.decode(&Bytes::from(head)).unwrap();
        let capacity = |d: &FrameDecoder| match &d.body {
            Partial::Gathered(v) => v.capacity(),
            _ => 0,
        };
        assert!(capacity(&d) <= GATHER_FIRST);
        for _ in 0..100 {
            d.decode(&Bytes::from(vec![2u8; 7000])).unwrap();
            assert!(capacity(&d) <= (2 * d.buffered()).max(GATHER_FIRST));
        }
        assert_eq!(d.buffered(), 10 + 100 * 7000);
    }

    #[test]
    fn a_gathered_body_moves_into_the_callers_memory_once_half_has_come() {
        let len = 1 << 20;
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let input = encode(&[body.clone(), vec![3; 10]]);
        for earned_granted in [true, false] {
            let mut d = FrameDecoder::<Vec<u8>>::new(1 << 21);
            let (mut out, mut asked, mut fed) = (Vec::new(), Vec::new(), 0);
            for chunk in input.chunks(1200) {
                fed += chunk.len();
                let body_arrived = fed.saturating_sub(HEADER_BYTES).min(len);
                d.decode_all_in_order_with(&Bytes::copy_from_slice(chunk), &mut out, &mut |ask| {
                    asked.push((ask, body_arrived));
                    match ask {
                        Ask::Ahead(_) => None,
                        Ask::Earned(len) => earned_granted.then(|| vec![0; len]),
                    }
                })
                .expect("within limit");
                assert_eq!(
                    d.reserved(),
                    0,
                    "memory given for what came is not lent ahead"
                );
            }
            assert_eq!(asked[0], (Ask::Ahead(len), 1200 - HEADER_BYTES));
            let earned: Vec<_> = asked
                .iter()
                .filter(|(a, _)| matches!(a, Ask::Earned(_)))
                .collect();
            assert_eq!(earned.len(), 1, "asked once: {asked:?}");
            let (ask, arrived) = *earned[0];
            assert_eq!(ask, Ask::Earned(len));
            assert!(
                2 * arrived >= len,
                "asked with only {arrived} of {len} bytes in"
            );
            match &out[0] {
                Decoded::Frame(Frame::Filled(got)) => assert!(earned_granted && *got == body),
                Decoded::Frame(Frame::Gathered(got)) => assert!(!earned_granted && *got == body),
                other => panic!("{other:?}"),
            }
            assert!(matches!(&out[1], Decoded::Frame(Frame::Slice(b)) if b[..] == [3; 10]));
        }
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
        let mut d = FrameDecoder::<Vec<u8>>::new(1024);
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
            for (ahead, earned) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut d = FrameDecoder::new(1000);
                d.set_gather_first(16);
                let mut out = Vec::new();
                let mut rest = &bytes[..];
                let mut i = 0;
                while !rest.is_empty() {
                    let n = cuts[i % cuts.len()].min(rest.len());
                    d.decode_all_in_order_with(&Bytes::copy_from_slice(&rest[..n]), &mut out, &mut |ask| match ask {
                        Ask::Ahead(len) => ahead.then(|| vec![0; len]),
                        Ask::Earned(len) => earned.then(|| vec![0; len]),
                    }).expect("within limit");
                    rest = &rest[n..];
                    i += 1;
                }
                let out: Vec<Frame> = out.into_iter().filter_map(|u| match u {
                    Decoded::Frame(f) => Some(f),
                    Decoded::Discarded(_) => None,
                }).collect();
                prop_assert_eq!(bodies(&out), frames.clone());
                prop_assert!(d.is_idle());
            }
        }
    }
}
