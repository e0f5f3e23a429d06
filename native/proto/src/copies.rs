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
use std::time::Instant;

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

/// Copies a link sends at most, per second and in a burst: copies are for the sparse,
/// latency-bound messages (calls, replies, pings), and a stream of small writes costs
/// at most this much extra (about 140 KB/s).
pub const COPIES_PER_SECOND: f64 = 128.0;
pub const COPY_BURST: f64 = 32.0;

/// Packets the connection must have sent since a write before its copy goes, unless it
/// sent none for a while after sending some ([`write_has_left`]): QUIC puts datagrams
/// ahead of stream data in a packet, so a copy queued while its write still waited for
/// the window would share that write's packet, and its loss. A lane at least as urgent
/// as the others has its next frame in one of the next two packets. In a one-off
/// experiment (pings beside a bulk transfer through a relay with 1 % loss and 20 ms each
/// way, 480 pings in 20 s), 4 pings took about two round trips with the delay alone, 1
/// with this rule.
pub const COPY_AFTER_PACKETS: u64 = 3;

/// Has the write a copy repeats left, so that the copy cannot share its packet? `before`
/// is the connection's count of packets sent when the write was queued, `now` the count
/// now, and `quiet` whether none went since the last look.
pub fn write_has_left(before: u64, now: u64, quiet: bool) -> bool {
    now >= before.saturating_add(COPY_AFTER_PACKETS) || (quiet && now > before)
}

/// Which copies a link sends: those within a token bucket of [`COPY_BURST`] refilled at
/// [`COPIES_PER_SECOND`], and none past its stale time (by then its write has had a
/// round trip, and QUIC's own recovery is under way).
#[derive(Debug, Clone)]
pub struct CopyPacer {
    tokens: f64,
    refilled: Instant,
}

impl CopyPacer {
    pub fn new(now: Instant) -> Self {
        CopyPacer {
            tokens: COPY_BURST,
            refilled: now,
        }
    }

    /// May a copy that goes stale at `stale` be sent at `now`? Takes its token if so.
    pub fn admit(&mut self, now: Instant, stale: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * COPIES_PER_SECOND).min(COPY_BURST);
        self.refilled = self.refilled.max(now);
        if self.tokens < 1.0 || now >= stale {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_pacer_sends_a_burst_then_at_its_rate_and_nothing_stale() {
        let start = Instant::now();
        let later = start + Duration::from_secs(10);
        let mut pacer = CopyPacer::new(start);
        let burst = (0..100).filter(|_| pacer.admit(start, later)).count();
        assert_eq!(burst, COPY_BURST as usize);
        // One token comes back every 1/COPIES_PER_SECOND s.
        let step = Duration::from_secs_f64(1.0 / COPIES_PER_SECOND);
        assert!(!pacer.admit(start + step / 2, later));
        assert!(pacer.admit(start + step + step / 10, later));
        assert!(!pacer.admit(start + step + step / 5, later));
        // A stale copy takes no token: with one token left, the next copy still goes.
        let t = start + 2 * step + step / 10;
        assert!(!pacer.admit(t, t));
        assert!(pacer.admit(t, later));
        // A quiet second refills the burst, and no more.
        let t = t + Duration::from_secs(1);
        let burst = (0..100).filter(|_| pacer.admit(t, later)).count();
        assert_eq!(burst, COPY_BURST as usize);
    }

    #[test]
    fn a_write_has_left_after_a_few_packets_or_when_sending_went_quiet() {
        assert!(!write_has_left(10, 10, false));
        assert!(!write_has_left(10, 12, false));
        assert!(write_has_left(10, 13, false));
        // Quiet after packets went: the write was among them.
        assert!(write_has_left(10, 11, true));
        // Quiet before any went: the write still waits for the window.
        assert!(!write_has_left(10, 10, true));
        assert!(write_has_left(u64::MAX - 1, u64::MAX, true));
        assert!(!write_has_left(u64::MAX - 1, u64::MAX - 1, true));
    }

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
