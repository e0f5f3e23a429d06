//! The stream framing: frames come out the same however the bytes are chunked, whether
//! bodies that span chunks fill the caller's memory (lent ahead, or given once half has
//! come) or the decoder's own, and nothing is
//! buffered beyond the limit. Every frame is also read as a lane's barrier
//! marker would be (a peer chooses what its frames hold).
//!
//! Input: `[max_len:2, discard_above:2, chunk_seed, bytes...]`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use trust_dist_proto::frame::{Ask, Decoded, Frame, FrameDecoder, HEADER_BYTES};
use trust_dist_proto::lanes;

fn run(
    max: u32,
    discard: u32,
    input: &[u8],
    chunks: &[usize],
    grant: bool,
    grant_earned: bool,
) -> (Vec<Vec<u8>>, Vec<usize>, bool) {
    let mut d = FrameDecoder::<Vec<u8>>::new(max);
    d.set_discard_above(discard);
    // Small enough that gathered bodies grow, and are moved into granted memory.
    d.set_gather_first(8);
    let mut frames = Vec::new();
    let mut discarded = Vec::new();
    // Asks for earned memory since the last frame was complete.
    let mut earned_asks = 0;
    let whole = Bytes::copy_from_slice(input);
    let base = whole.as_ptr() as usize;
    let mut rest = whole.clone();
    let mut i = 0;
    while !rest.is_empty() {
        let n = chunks
            .get(i % chunks.len().max(1))
            .copied()
            .unwrap_or(rest.len());
        let n = n.clamp(1, rest.len());
        i += 1;
        let mut chunk = rest.split_to(n);
        while !chunk.is_empty() {
            let body_in = d.buffered();
            let mut alloc = |ask| match ask {
                Ask::Ahead(len) => grant.then(|| vec![0; len]),
                Ask::Earned(len) => {
                    // Never before half of the body is in, with what this chunk brings,
                    // and once per body at most.
                    assert!(len <= 2 * (body_in + chunk.len()));
                    earned_asks += 1;
                    assert!(earned_asks <= 1, "asked twice for one body's memory");
                    grant_earned.then(|| vec![0; len])
                }
            };
            match d.decode_with(&chunk, &mut alloc) {
                Ok((used, frame)) => {
                    assert!(used <= chunk.len());
                    assert!(used > 0, "progress");
                    if let Some(f) = frame {
                        earned_asks = 0;
                        assert!(f.len() as u64 <= u64::from(max.min(discard)));
                        // A body within one chunk is a slice of it; one across chunks
                        // was copied into the memory granted, if any.
                        match &f {
                            Frame::Slice(s) => {
                                let at = s.as_ptr() as usize;
                                assert!(at >= base && at + s.len() <= base + input.len());
                            }
                            Frame::Filled(_) => assert!(grant || grant_earned),
                            Frame::Gathered(_) => assert!(!grant),
                        }
                        frames.push(f.to_vec());
                    }
                    let _ = chunk.split_to(used);
                }
                Err(_) => return (frames, discarded, true),
            }
            assert!(d.buffered() <= (max as usize).max(HEADER_BYTES));
            assert!(d.reserved() <= max as usize);
            discarded.extend(d.take_discarded());
        }
    }
    (frames, discarded, false)
}

fuzz_target!(|data: &[u8]| {
    let [a, b, c, e, seed, input @ ..] = data else {
        return;
    };
    let max = u32::from(u16::from_be_bytes([*a, *b]));
    let discard = u32::from(u16::from_be_bytes([*c, *e]));
    let whole = run(max, discard, input, &[input.len()], false, false);
    let bytewise = run(max, discard, input, &[1], false, false);
    let granted = run(max, discard, input, &[1], true, false);
    let earned = run(max, discard, input, &[1], false, true);
    let seeded: Vec<usize> = (0..8)
        .map(|k| usize::from(seed.rotate_left(k)) % 13 + 1)
        .collect();
    let chunked = run(max, discard, input, &seeded, seed & 1 == 1, seed & 2 == 2);
    assert_eq!(whole, bytewise);
    assert_eq!(whole, granted);
    assert_eq!(whole, earned);
    assert_eq!(whole, chunked);
    // decode_all agrees.
    let mut d = FrameDecoder::<Vec<u8>>::new(max);
    d.set_discard_above(discard);
    let mut out = Vec::new();
    let r = d.decode_all(&Bytes::copy_from_slice(input), &mut out);
    let out: Vec<Vec<u8>> = out.iter().map(|f| f.to_vec()).collect();
    assert_eq!(r.is_err(), whole.2);
    assert_eq!(out, whole.0);
    // decode_all_in_order hands out the same frames and discards, and a discard is
    // never later than a frame that came after it: frames and discards, byte by byte
    // as they are found, give the order.
    let mut d = FrameDecoder::<Vec<u8>>::new(max);
    d.set_discard_above(discard);
    let mut units = Vec::new();
    let r = d.decode_all_in_order(&Bytes::copy_from_slice(input), &mut units);
    assert_eq!(r.is_err(), whole.2);
    let (mut frames, mut thrown) = (Vec::new(), Vec::new());
    for unit in &units {
        match unit {
            Decoded::Frame(f) => frames.push(f.to_vec()),
            Decoded::Discarded(n) => thrown.push(*n),
        }
    }
    assert_eq!(frames, whole.0);
    if !whole.2 {
        assert_eq!(thrown, whole.1);
        let mut d = FrameDecoder::<Vec<u8>>::new(max);
        d.set_discard_above(discard);
        let mut order = Vec::new();
        for at in 0..input.len() {
            let mut step = Vec::new();
            d.decode_all_in_order(&Bytes::copy_from_slice(&input[at..at + 1]), &mut step)
                .expect("no error when the whole input had none");
            order.extend(step.iter().map(|u| matches!(u, Decoded::Frame(_))));
        }
        let whole_order: Vec<bool> = units
            .iter()
            .map(|u| matches!(u, Decoded::Frame(_)))
            .collect();
        assert_eq!(order, whole_order);
    }
    for frame in &out {
        if let Some(counts) = lanes::decode_barrier(frame) {
            assert!(lanes::is_barrier(frame));
            assert_eq!(lanes::encode_barrier(&counts), *frame);
        }
    }
});
