//! Lane copies: a second, unreliable copy of a small write on a lane, sent as a QUIC
//! datagram a little after the write itself.
//!
//! On a long, lossy path a lost packet costs at least two round trips: one for QUIC to
//! see it lost, half of one for the retransmission to cross, plus the queue a bulk
//! transfer keeps beside it. A ping, a call or its reply that is one packet long pays all
//! of that. Its copy, a few milliseconds behind in another packet, usually arrives
//! instead, and the receiver hands on whichever of the two brings the bytes first.
//!
//! A copy names its lane and the stream offset of its first byte, so the receiver keeps
//! each lane's order exactly as the stream gives it: it takes from a copy or a stream
//! chunk only the bytes that continue what it has handed on ([`unseen`]), and nothing
//! from a copy that starts beyond that (the stream will bring those bytes, in order).
//! Both sources feed the same frame decoder, filter and limits, so a copy can carry
//! nothing its sender could not have written on the stream.
//!
//! Everything here is pure; [`decode`] reads peer bytes and must not panic on any input.
use crate::lanes::LANES;

/// A copy's header: the lane (one byte) and the stream offset of its first byte (eight
/// bytes, big-endian).
pub const HEADER_BYTES: usize = 9;

/// One lane copy, as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneCopy<'a> {
    /// 1..[`LANES`]: lane 0 is the link's first stream, which is never copied.
    pub lane: usize,
    /// The stream offset of `data[0]`. Offset 0 is the byte that names the stream's
    /// lane, so a copy's data starts at 1 or later.
    pub offset: u64,
    pub data: &'a [u8],
}

/// Why a datagram is not a lane copy. Any of these ends the link: our own sender never
/// writes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyError {
    Short(usize),
    Lane(u8),
    Offset(u64),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Short(len) => write!(
                f,
                "a lane copy of {len} bytes, shorter than its header and one byte of data"
            ),
            CopyError::Lane(lane) => write!(
                f,
                "a lane copy for lane {lane}, which is not a copied lane (1..{})",
                LANES - 1
            ),
            CopyError::Offset(offset) => write!(
                f,
                "a lane copy at stream offset {offset}, where its data cannot start or end"
            ),
        }
    }
}

impl std::error::Error for CopyError {}

/// The header of a copy of `lane`'s bytes from stream offset `offset`.
pub fn header(lane: usize, offset: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0] = lane as u8;
    header[1..].copy_from_slice(&offset.to_be_bytes());
    header
}

/// Reads a datagram from the peer as a lane copy.
pub fn decode(datagram: &[u8]) -> Result<LaneCopy<'_>, CopyError> {
    if datagram.len() <= HEADER_BYTES {
        return Err(CopyError::Short(datagram.len()));
    }
    let (head, data) = datagram.split_at(HEADER_BYTES);
    let lane = head[0];
    if lane == 0 || usize::from(lane) >= LANES {
        return Err(CopyError::Lane(lane));
    }
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&head[1..]);
    let offset = u64::from_be_bytes(offset);
    // QUIC stream offsets stay below 2^62.
    let within = matches!(offset.checked_add(data.len() as u64), Some(end) if end < 1 << 62);
    if offset == 0 || !within {
        return Err(CopyError::Offset(offset));
    }
    Ok(LaneCopy {
        lane: usize::from(lane),
        offset,
        data,
    })
}

/// Of `len` bytes at stream offset `offset`, the index of the first one not yet handed
/// on when everything before stream offset `delivered` has been; `None` when they bring
/// nothing new, because all of them were handed on already or because they start beyond
/// `delivered` (bytes in between are missing, and only the stream may bring those).
pub fn unseen(delivered: u64, offset: u64, len: usize) -> Option<usize> {
    let end = offset.checked_add(len as u64)?;
    if offset > delivered || end <= delivered {
        return None;
    }
    usize::try_from(delivered - offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_reads_back_as_written() {
        let mut datagram = header(7, 1234).to_vec();
        datagram.extend_from_slice(b"abc");
        assert_eq!(
            decode(&datagram),
            Ok(LaneCopy {
                lane: 7,
                offset: 1234,
                data: b"abc"
            })
        );
        let mut last = header(LANES - 1, 1).to_vec();
        last.push(0);
        assert_eq!(decode(&last).map(|c| c.lane), Ok(LANES - 1));
    }

    #[test]
    fn malformed_copies_are_refused_with_their_fault() {
        assert_eq!(decode(&[]), Err(CopyError::Short(0)));
        assert_eq!(decode(&header(3, 9)), Err(CopyError::Short(HEADER_BYTES)));
        for lane in [0usize, LANES, 255] {
            let mut d = header(lane, 9).to_vec();
            d.push(1);
            assert_eq!(decode(&d), Err(CopyError::Lane(lane as u8)));
        }
        for offset in [0, u64::MAX, (1 << 62) - 1] {
            let mut d = header(3, offset).to_vec();
            d.push(1);
            assert_eq!(decode(&d), Err(CopyError::Offset(offset)));
        }
        let text = decode(&header(0, 1)).unwrap_err().to_string();
        assert!(text.contains("shorter"), "{text}");
    }

    #[test]
    fn only_bytes_that_continue_what_was_handed_on_are_taken() {
        // Exactly the next bytes.
        assert_eq!(unseen(10, 10, 5), Some(0));
        // Overlapping: the part past what was handed on.
        assert_eq!(unseen(12, 10, 5), Some(2));
        assert_eq!(unseen(14, 10, 5), Some(4));
        // All handed on already (the stream after its copy, or a late copy).
        assert_eq!(unseen(15, 10, 5), None);
        assert_eq!(unseen(100, 10, 5), None);
        // Beyond a gap: the stream must bring what is missing first.
        assert_eq!(unseen(9, 10, 5), None);
        // Nothing at all, and offsets at the end of the range.
        assert_eq!(unseen(10, 10, 0), None);
        assert_eq!(unseen(u64::MAX, u64::MAX, 1), None);
    }
}
