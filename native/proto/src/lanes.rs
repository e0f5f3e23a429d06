//! Lanes: which of a link's QUIC streams a distribution packet travels on.
//!
//! Erlang orders signals only between each pair of processes. A link therefore spreads
//! its packets over [`LANES`] independent streams and keeps every signal of one sending
//! process on one stream, chosen from that sender's pid: whatever one process sends to
//! another arrives in order by construction, and a bulk transfer holds back only the
//! processes that share its stream, not the link. (The atom cache and fragments are off on
//! every link, so each packet decodes on its own whichever stream brings it.)
//!
//! A few signals do not name their sender by pid: `SEND` (no sender), a monitor's
//! `MONITOR_P_EXIT` when the monitor was set by registered name (the name, not the pid of
//! the process that ended), and anything this module does not recognise. Those travel on
//! lane 0 behind a *barrier*: a marker frame with the number of packets sent on each lane
//! so far. The receiver delivers what follows the marker only after it has delivered that
//! many packets from every lane, so such a signal is never overtaken by one sent before
//! it, on any lane.
//!
//! Nor by one sent after it: a packet that names no sender may be from any process, and
//! that process's later packets may go on its own lane. The VM writes the messages it
//! queued while a connection was being set up as `SEND`, and the same processes' later
//! ones as `SEND_SENDER`; a process that ends sends its DOWNs by name and by pid
//! interleaved. So a link opens on lane 0 alone (at least 250 ms by default), and goes
//! back to lane 0 alone after each such packet; when the sending side (`trust_dist_net`)
//! leaves lane 0 again, each other lane's next packet is preceded by a *fence*, a marker
//! of the same form on that lane that counts lane 0 only.
//!
//! A process whose pid hashes to the lane of another process's bulk transfer (1 in 31)
//! would wait behind that transfer as behind a TCP connection's. So a sender whose lane
//! carries someone else's large messages *moves* to a quiet lane ([`Moves`]): its packet
//! there is preceded by a fence that counts the lane it leaves up to its own last packet
//! there (and up to other senders' small packets, which the sender cannot tell apart
//! cheaply), so it is not overtaken by its own earlier packets, while the bulk data
//! queued after them does not hold it. It moves only once what the fence counts has
//! been written to QUIC. A moved sender stays on its new lane until the link next goes
//! back to lane 0 alone, or it moves again.
//!
//! Every marker counts only packets routed before it, so no two markers can wait for
//! each other.
//!
//! Everything here is pure: the sender classifies its own VM's packets, the receiver
//! parses markers from its peer (which must not panic on any input).
use crate::etf::{Term, VERSION};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Streams per link: lane 0 is the stream the link was opened with, the others are
/// unidirectional streams opened on first use.
pub const LANES: usize = 32;

/// First byte of a barrier marker frame's body. No distribution packet starts with it
/// (they start with 112, 131 or a header tag).
pub const BARRIER_TAG: u8 = 0;

/// First byte a sender writes on each unidirectional stream it opens: which it is.
pub mod stream_kind {
    /// The tick stream: one byte per tick follows.
    pub const TICKS: u8 = 0;
    // 1..LANES-1: that lane's stream.
}

/// Where one outgoing packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane<'a> {
    /// On the lane of this sender: `pid` is the sender's pid as encoded in the packet
    /// (the same process always encodes to the same bytes on one link).
    /// `message`: the packet carries a message (a send of any form), not another signal;
    /// see [`carries_message`].
    Sender {
        lane: usize,
        pid: &'a [u8],
        message: bool,
    },
    /// On lane 0, after a barrier.
    Barrier,
}

/// The position, in a control tuple, of the process whose signals this one must stay in
/// order with, by operation code. `None`: no pid to key on.
fn key_position(op: i64) -> Option<u32> {
    match op {
        // LINK, EXIT, UNLINK, REG_SEND, GROUP_LEADER, EXIT2, EXIT_TT, REG_SEND_TT,
        // EXIT2_TT, MONITOR_P, DEMONITOR_P, MONITOR_P_EXIT, SEND_SENDER(_TT),
        // PAYLOAD_EXIT(2)(_TT), PAYLOAD_MONITOR_P_EXIT, ALIAS_SEND(_TT): {Op, From, ...}
        1 | 3 | 4 | 6 | 7 | 8 | 13 | 16 | 18..=28 | 33 | 34 => Some(1),
        // SPAWN_REQUEST(_TT) {Op, ReqId, From, ...}, UNLINK_ID(_ACK) {Op, Id, From, To},
        // ALTACT_SIG_SEND {Op, Flags, From, To, ...}
        29 | 30 | 35 | 36 | 37 => Some(2),
        _ => None,
    }
}

/// The lane of one of this node's own outgoing packets (the pass-through form the VM
/// writes without the atom cache). `salt` spreads senders differently on each link.
pub fn lane_of(packet: &[u8], salt: u64) -> Lane<'_> {
    match sender_pid(packet) {
        Some((pid, op)) => Lane::Sender {
            lane: lane_index(pid, salt),
            pid,
            message: is_message_op(op),
        },
        None => Lane::Barrier,
    }
}

/// The pid a packet's lane is keyed on, and the packet's operation code.
fn sender_pid(packet: &[u8]) -> Option<(&[u8], i64)> {
    let terms = packet.strip_prefix(&[112, VERSION])?;
    let tuple = Term::peek(terms).ok()?.as_tuple()?;
    let op = match tuple.get(0).ok()? {
        Term::Int(op) => op,
        _ => return None,
    };
    let position = match op {
        // SPAWN_REPLY(_TT) {Op, ReqId, To, Flags, Result}: what the new process sends
        // must not overtake the reply that names it, so the reply goes on the new
        // process's lane; a failed spawn names no process and goes on the requester's.
        31 | 32 => {
            if matches!(tuple.get(4).ok()?, Term::Pid(_)) {
                4
            } else {
                2
            }
        }
        op => key_position(op)?,
    };
    let raw = tuple.raw(position).ok()?;
    match Term::peek(raw).ok()? {
        Term::Pid(_) => Some((raw, op)),
        _ => None,
    }
}

/// True if the packet carries a message (a send of any form), not another signal (link,
/// monitor, exit, spawn...). The VM suspends a process on a busy connection only for
/// messages; a lane's pause follows it.
pub fn carries_message(packet: &[u8]) -> bool {
    op_of(packet).is_some_and(is_message_op)
}

fn op_of(packet: &[u8]) -> Option<i64> {
    packet
        .strip_prefix(&[112, VERSION])
        .and_then(|terms| Term::peek(terms).ok()?.as_tuple())
        .and_then(|tuple| match tuple.get(0).ok()? {
            Term::Int(op) => Some(op),
            _ => None,
        })
}

/// SEND, REG_SEND, SEND_TT, REG_SEND_TT, SEND_SENDER(_TT), ALIAS_SEND(_TT), ALTACT_SIG_SEND.
fn is_message_op(op: i64) -> bool {
    matches!(op, 2 | 6 | 12 | 16 | 22 | 23 | 33 | 34 | 37)
}

/// FNV-1a of the pid's bytes, salted: cheap, and stable for one link's life. Senders go
/// on lanes 1.. only: lane 0 is the link's first stream, which carries the opening and
/// the packets that name no sender (so a sender there would wait behind every barrier),
/// and which is never copied (`crate::copies`).
fn lane_index(pid: &[u8], salt: u64) -> usize {
    1 + (salted_fnv(pid, salt) % (LANES as u64 - 1)) as usize
}

fn fnv(pid: &[u8]) -> u64 {
    salted_fnv(pid, 0)
}

fn salted_fnv(pid: &[u8], salt: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for &b in pid {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the high bits in: the low bits of FNV alone spread short inputs poorly.
    hash ^ (hash >> 32)
}

/// The size of a message from which its sender counts as a lane's bulk sender: the
/// connection's congestion controller draws the same line.
pub const BULK_MESSAGE: usize = 64 * 1024;

/// How long after its last large message a bulk sender still makes others move off its
/// lane (it may be paused, or between two messages); a lane that still has this much
/// queued keeps its bulk sender longer.
pub const BULK_FOR: Duration = Duration::from_millis(100);

/// Most senders a link keeps moved at once. To move another, one whose packets on its
/// new lane are all written is forgotten: the next packet on its own lane, whoever's,
/// then owes a fence that counts them. If none can be, the sender stays on its lane,
/// behind the bulk, as before moves existed. The map's memory stays bounded whatever
/// the VM sends.
pub const MAX_MOVED: usize = 1024;

/// The lane's last bulk sender: its pid as packets encode it, and when its last large
/// message was routed.
#[derive(Debug)]
struct Bulk {
    pid: Vec<u8>,
    at: Instant,
}

/// The sending side's record of which senders left their own lane, and of what a fence
/// must count on the lane they leave. Pure: time and queue lengths are arguments.
///
/// A move happens only once every packet its fence will count has been written to QUIC
/// (`written`, in bytes of the lane's stream): the data a fence waits for then already
/// holds its share of QUIC's connection window, which the data behind fences cannot take
/// from it, as for the fences after a link's opening.
#[derive(Debug)]
pub struct Moves {
    /// Senders (pid bytes) on another lane than their own: their own lane, and which.
    moved: HashMap<Vec<u8>, (usize, usize)>,
    /// How many of `moved` have each lane as their own: only then does a sender of that
    /// lane need looking up, so links without moves pay nothing per packet.
    moved_from: [u32; LANES],
    bulk: [Option<Bulk>; LANES],
    /// For each lane, the number of packets routed on it up to and including the last
    /// one that was not from its current bulk sender: every other sender's packets on the
    /// lane are within it, which is what a fence for a sender leaving the lane counts.
    others_upto: [u64; LANES],
    /// Where, in the lane's stream, the packets `others_upto` counts end.
    others_end: [u64; LANES],
    /// Packets on each lane before its current bulk sender's first large message: a
    /// fence that counts no further never waits behind that transfer.
    bulk_since: [u64; LANES],
    /// Fences the next packet on each lane owes, for senders whose move was forgotten to
    /// make room (their next packets go on their own lane again, after their last ones).
    owed: [Option<[u64; LANES]>; LANES],
    /// With the map full and nobody to forget, no new sender moves before this: the
    /// search is not repeated for every packet.
    full_until: Option<Instant>,
    max_moved: usize,
    moves: u64,
}

impl Default for Moves {
    fn default() -> Self {
        Moves {
            moved: HashMap::new(),
            moved_from: [0; LANES],
            bulk: std::array::from_fn(|_| None),
            others_upto: [0; LANES],
            others_end: [0; LANES],
            bulk_since: [0; LANES],
            owed: [None; LANES],
            full_until: None,
            max_moved: MAX_MOVED,
            moves: 0,
        }
    }
}

impl Moves {
    /// Moves that keep at most `max_moved` senders moved (tests reach the bound with it).
    #[cfg(test)]
    fn with_max_moved(max_moved: usize) -> Self {
        Moves {
            max_moved,
            ..Moves::default()
        }
    }

    /// The lane a sender's packets go on now: `home` (from [`lane_of`]) unless it moved.
    pub fn lane(&self, home: usize, pid: &[u8]) -> usize {
        if self.moved_from.get(home).copied().unwrap_or(0) == 0 {
            return home;
        }
        self.moved.get(pid).map_or(home, |&(_, lane)| lane)
    }

    /// Whether `pid`'s next packet should leave `lane`: another sender's large messages
    /// go there (one within [`BULK_FOR`], or `queued` bytes of the lane still waiting to
    /// be written), every packet on the lane that is not that sender's has been written
    /// (`written` bytes of the lane's stream have), and none of them came after that
    /// transfer began: the fence would wait behind it, and hold its new lane too.
    pub fn should_move(
        &self,
        lane: usize,
        pid: &[u8],
        written: u64,
        queued: usize,
        now: Instant,
    ) -> bool {
        let Some(Some(bulk)) = self.bulk.get(lane) else {
            return false;
        };
        bulk.pid != pid
            && self.others_end[lane] <= written
            && self.others_upto[lane] <= self.bulk_since[lane]
            && (now.saturating_duration_since(bulk.at) < BULK_FOR || queued >= BULK_MESSAGE)
            && (self.full_until.is_none_or(|until| now >= until) || self.moved.contains_key(pid))
    }

    /// Moves `pid` (whose own lane is `home`) off `from` to the lane with the least
    /// `queued` of those without a bulk sender now, and returns it with the counts its
    /// fence there must wait for: `from` up to the last packet not of its bulk sender,
    /// and whatever `from` owes for forgotten moves. `None` if every other lane has a
    /// bulk sender, or if [`MAX_MOVED`] senders are moved and none can be forgotten yet.
    pub fn move_sender(
        &mut self,
        home: usize,
        from: usize,
        pid: &[u8],
        queued: &[usize; LANES],
        written: &[u64; LANES],
        now: Instant,
    ) -> Option<(usize, [u64; LANES])> {
        if from == 0 || from >= LANES || home == 0 || home >= LANES {
            return None;
        }
        let quiet = |lane: usize| match &self.bulk[lane] {
            Some(bulk) => {
                now.saturating_duration_since(bulk.at) >= BULK_FOR && queued[lane] < BULK_MESSAGE
            }
            None => true,
        };
        // Round from a lane the pid picks, so that ties spread senders out.
        let first = fnv(pid) as usize % (LANES - 1);
        let to = (0..LANES - 1)
            .map(|step| 1 + (first + step) % (LANES - 1))
            .filter(|&lane| lane != from && quiet(lane))
            .min_by_key(|&lane| queued[lane])?;
        if !self.moved.contains_key(pid) && self.moved.len() >= self.max_moved {
            if !self.forget_one(written) {
                self.full_until = Some(now + BULK_FOR);
                return None;
            }
            self.full_until = None;
        }
        let mut fence = self.owed[from].unwrap_or([0; LANES]);
        fence[from] = self.others_upto[from];
        // What came before on its new lane comes first anyway.
        fence[to] = 0;
        if to == home {
            if self.moved.remove(pid).is_some() {
                self.moved_from[home] -= 1;
            }
        } else if self.moved.insert(pid.to_vec(), (home, to)).is_none() {
            self.moved_from[home] += 1;
        }
        self.moves += 1;
        Some((to, fence))
    }

    /// Forgets one moved sender whose packets on its new lane are all written, so that
    /// its next packet, on its own lane again, can wait for them: the next packet on its
    /// own lane, whoever's, owes a fence that counts them.
    fn forget_one(&mut self, written: &[u64; LANES]) -> bool {
        let forgettable = self.moved.iter().find(|(pid, &(_, lane))| {
            self.others_end[lane] <= written[lane]
                && !matches!(&self.bulk[lane], Some(bulk) if bulk.pid == **pid)
        });
        let Some((pid, &(home, lane))) = forgettable else {
            return false;
        };
        let pid = pid.clone();
        self.moved.remove(&pid);
        self.moved_from[home] -= 1;
        let owed = self.owed[home].get_or_insert([0; LANES]);
        owed[lane] = owed[lane].max(self.others_upto[lane]);
        true
    }

    /// The fence the next packet on `lane` owes for forgotten moves, if any; it is owed
    /// once.
    pub fn take_owed_fence(&mut self, lane: usize) -> Option<[u64; LANES]> {
        // Looked at for every packet: only an owed fence is moved out.
        let slot = self.owed.get_mut(lane)?;
        slot.is_some().then(|| slot.take()).flatten()
    }

    /// Records a packet of `pid`'s routed on `lane`, which had `sent_before` packets
    /// before it; `large` if it is a bulk message ([`BULK_MESSAGE`] or more). The packet
    /// spans `start..end` of the lane's stream.
    pub fn routed(
        &mut self,
        lane: usize,
        pid: &[u8],
        large: bool,
        sent_before: u64,
        (start, end): (u64, u64),
        now: Instant,
    ) {
        let (Some(bulk), Some(others_upto), Some(others_end)) = (
            self.bulk.get_mut(lane),
            self.others_upto.get_mut(lane),
            self.others_end.get_mut(lane),
        ) else {
            return;
        };
        match bulk {
            Some(current) if current.pid == pid => {
                if large {
                    // After a pause as long as a transfer's end, a new transfer: others'
                    // packets from the pause do not come after it.
                    if now.saturating_duration_since(current.at) >= BULK_FOR {
                        self.bulk_since[lane] = sent_before;
                    }
                    current.at = now;
                }
            }
            _ if large => {
                // The new bulk sender's earlier packets, and the last one's, become
                // others' packets: all of them are counted.
                *others_upto = sent_before;
                *others_end = start;
                self.bulk_since[lane] = sent_before;
                *bulk = Some(Bulk {
                    pid: pid.to_vec(),
                    at: now,
                });
            }
            _ => {
                *others_upto = sent_before + 1;
                *others_end = end;
            }
        }
    }

    /// Forgets every move: the link has gone back to lane 0 alone behind a barrier that
    /// counts every lane, so each sender's own lane is in order behind it again.
    pub fn forget_moved(&mut self) {
        self.moved.clear();
        self.moved_from = [0; LANES];
        self.owed = [None; LANES];
        self.full_until = None;
    }

    /// How many moves there have been.
    pub fn moves(&self) -> u64 {
        self.moves
    }
}

/// The size of a barrier marker's body.
pub const BARRIER_BYTES: usize = 1 + 8 * LANES;

/// A barrier marker: `BARRIER_TAG`, then the packets sent so far on each lane, as
/// little-endian u64s.
pub fn encode_barrier(sent: &[u64; LANES]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 * LANES);
    out.push(BARRIER_TAG);
    for count in sent {
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

/// True if a data frame's body is a barrier marker rather than a packet.
pub fn is_barrier(body: &[u8]) -> bool {
    body.first() == Some(&BARRIER_TAG)
}

/// Reads a barrier marker written by [`encode_barrier`]; `None` if it is malformed.
pub fn decode_barrier(body: &[u8]) -> Option<[u64; LANES]> {
    let counts = body.strip_prefix(&[BARRIER_TAG])?;
    if counts.len() != 8 * LANES {
        return None;
    }
    let mut out = [0u64; LANES];
    for (slot, bytes) in out.iter_mut().zip(counts.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(bytes);
        *slot = u64::from_le_bytes(word);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::answer as build;
    use crate::etf::encode;

    fn pid(n: u32) -> Vec<u8> {
        encode::pid("a@host", n, 0, 7)
    }

    fn lane_of_pid(packet: &[u8]) -> Option<Vec<u8>> {
        match lane_of(packet, 42) {
            Lane::Sender { pid, lane, message } => {
                assert!(lane < LANES);
                assert_eq!(message, carries_message(packet));
                Some(pid.to_vec())
            }
            Lane::Barrier => None,
        }
    }

    fn int(n: u8) -> Vec<u8> {
        let mut v = Vec::new();
        encode::small_int(&mut v, n);
        v
    }

    #[test]
    fn signals_go_on_their_senders_lane() {
        let (from, to) = (pid(1), pid(2));
        let reference = encode::reference("a@host", 7, &[1, 2, 3]);
        let name = encode::atom_term("name");
        let reason = encode::atom_term("normal");
        let cases: Vec<(u8, Vec<&[u8]>, bool)> = vec![
            (1, vec![&from, &to], false),
            (3, vec![&from, &to, &reason], false),
            (6, vec![&from, &name, &name], true),
            (8, vec![&from, &to, &reason], false),
            (19, vec![&from, &to, &reference], false),
            (20, vec![&from, &name, &reference], false),
            (21, vec![&from, &to, &reference, &reason], false),
            (22, vec![&from, &to], true),
            (24, vec![&from, &to], true),
            (33, vec![&from, &reference], true),
        ];
        for (op, elements, payload) in cases {
            let packet = build::packet(op, &elements, payload.then_some(&reason[..]));
            assert_eq!(lane_of_pid(&packet), Some(from.clone()), "op {op}");
        }
        let id = int(9);
        for op in [35, 36] {
            let packet = build::packet(op, &[&id, &from, &to], None);
            assert_eq!(lane_of_pid(&packet), Some(from.clone()), "op {op}");
        }
        let spawn = build::packet(
            29,
            &[
                &reference,
                &from,
                &to,
                &name,
                &name,
                &int(0),
                &encode::list(&[]),
            ],
            Some(&encode::list(&[])),
        );
        assert_eq!(lane_of_pid(&spawn), Some(from.clone()));
        let altact = build::packet(37, &[&int(0), &from, &to], Some(&reason));
        assert_eq!(lane_of_pid(&altact), Some(from));
    }

    #[test]
    fn sends_without_sender_and_downs_by_name_go_behind_a_barrier() {
        let to = pid(2);
        let reference = encode::reference("a@host", 7, &[1, 2, 3]);
        let name = encode::atom_term("name");
        let reason = encode::atom_term("normal");
        let send = build::packet(2, &[&encode::atom_term(""), &to], Some(&reason));
        let down = build::packet(21, &[&name, &to, &reference, &reason], None);
        assert_eq!(lane_of(&send, 42), Lane::Barrier);
        assert_eq!(lane_of(&down, 42), Lane::Barrier);
        assert_eq!(lane_of(b"junk", 42), Lane::Barrier);
    }

    #[test]
    fn only_sends_count_as_messages() {
        let (from, to) = (pid(1), pid(2));
        let reason = encode::atom_term("normal");
        let send = build::packet(22, &[&from, &to], Some(&reason));
        let reg_send = build::packet(6, &[&from, &reason, &reason], Some(&reason));
        let link = build::packet(1, &[&from, &to], None);
        let exit = build::packet(3, &[&from, &to, &reason], None);
        assert!(carries_message(&send) && carries_message(&reg_send));
        assert!(!carries_message(&link) && !carries_message(&exit));
        assert!(!carries_message(b"junk"));
    }

    #[test]
    fn a_spawn_reply_goes_on_the_new_process_lane_or_the_requesters() {
        let (child, requester) = (pid(5), pid(6));
        let reference = encode::reference("a@host", 7, &[1, 2, 3]);
        let ok = build::packet(31, &[&reference, &requester, &int(0), &child], None);
        assert_eq!(lane_of_pid(&ok), Some(child));
        let failed = build::packet(
            31,
            &[
                &reference,
                &requester,
                &int(0),
                &encode::atom_term("badarg"),
            ],
            None,
        );
        assert_eq!(lane_of_pid(&failed), Some(requester));
    }

    #[test]
    fn signals_without_a_sender_pid_need_a_barrier() {
        let to = pid(2);
        let reference = encode::reference("a@host", 7, &[1, 2, 3]);
        let reason = encode::atom_term("normal");
        let by_name = build::packet(
            21,
            &[&encode::atom_term("registered"), &to, &reference, &reason],
            None,
        );
        let send = build::packet(2, &[&encode::atom_term(""), &to], Some(&reason));
        let unknown = build::packet(99, &[&to], None);
        for packet in [by_name, send, unknown] {
            assert_eq!(lane_of(&packet, 1), Lane::Barrier);
        }
        for junk in [&b""[..], b"p", b"\x83D\0", b"from a", &[112, 131, 104, 1]] {
            assert_eq!(lane_of(junk, 1), Lane::Barrier);
        }
    }

    #[test]
    fn one_sender_keeps_one_lane_and_senders_spread() {
        let salt = 0x5eed;
        let mut used = [0usize; LANES];
        for n in 0..(LANES as u32 * 16) {
            let p = pid(n);
            let packet = build::packet(22, &[&p, &pid(0)], Some(&int(1)));
            let Lane::Sender { lane, .. } = lane_of(&packet, salt) else {
                panic!("send_sender has a sender");
            };
            let again = build::packet(1, &[&p, &pid(9)], None);
            // A link signal from the same process: its lane, and no message.
            assert_eq!(
                lane_of(&again, salt),
                Lane::Sender {
                    lane,
                    pid: &p,
                    message: false
                }
            );
            used[lane] += 1;
        }
        // 512 senders over lanes 1..32: every one is used, none takes more than 3x its
        // share, and lane 0 none.
        assert_eq!(used[0], 0);
        assert!(used[1..].iter().all(|&n| n > 0 && n <= 50), "{used:?}");
    }

    const ALL_WRITTEN: [u64; LANES] = [u64::MAX; LANES];
    const NONE_QUEUED: [usize; LANES] = [0; LANES];

    /// Lane 5 carries `bulk`'s large messages (bytes 100..) after one small packet of
    /// `light`'s (bytes 0..100).
    fn lane_5_with_a_bulk_sender(light: &[u8], bulk: &[u8], now: Instant) -> Moves {
        let mut moves = Moves::default();
        moves.routed(5, light, false, 0, (0, 100), now);
        moves.routed(5, bulk, true, 1, (100, 70_000), now);
        moves.routed(5, bulk, true, 2, (70_000, 140_000), now);
        moves.routed(5, bulk, false, 3, (140_000, 140_100), now);
        moves
    }

    fn fence_on(lane: usize, count: u64) -> [u64; LANES] {
        let mut fence = [0; LANES];
        fence[lane] = count;
        fence
    }

    #[test]
    fn a_sender_beside_anothers_bulk_moves_behind_a_fence_on_its_own_last_packet() {
        let (light, bulk, now) = (pid(1), pid(2), Instant::now());
        let mut moves = lane_5_with_a_bulk_sender(&light, &bulk, now);
        assert!(moves.should_move(5, &light, 100, 0, now));
        assert!(
            !moves.should_move(5, &bulk, 1 << 30, 1 << 30, now),
            "the bulk sender stays"
        );
        let (to, fence) = moves
            .move_sender(5, 5, &light, &NONE_QUEUED, &ALL_WRITTEN, now)
            .expect("a quiet lane");
        // Behind its one packet on lane 5, not behind the bulk after it.
        assert_eq!(fence, fence_on(5, 1));
        assert!(to != 5 && to != 0, "to {to}");
        assert_eq!(moves.lane(5, &light), to);
        assert_eq!(moves.lane(5, &pid(3)), 5, "others keep their lane");
        assert_eq!(moves.lane(5, &bulk), 5);
        assert_eq!(moves.moves(), 1);
    }

    #[test]
    fn no_sender_moves_before_what_its_fence_would_count_is_written() {
        let (light, bulk, now) = (pid(1), pid(2), Instant::now());
        let moves = lane_5_with_a_bulk_sender(&light, &bulk, now);
        // Its own packet, bytes 0..100, still (partly) queued.
        assert!(!moves.should_move(5, &light, 99, 0, now));
        assert!(moves.should_move(5, &light, 100, 0, now));
    }

    #[test]
    fn a_bulk_sender_long_quiet_moves_no_one_unless_its_data_is_still_queued() {
        let (light, bulk, then) = (pid(1), pid(2), Instant::now());
        let moves = lane_5_with_a_bulk_sender(&light, &bulk, then);
        let later = then + BULK_FOR;
        assert!(!moves.should_move(5, &light, 100, BULK_MESSAGE - 1, later));
        assert!(moves.should_move(5, &light, 100, BULK_MESSAGE, later));
        assert!(
            !moves.should_move(6, &light, 0, 1 << 30, then),
            "no bulk on lane 6"
        );
    }

    #[test]
    fn a_new_bulk_sender_makes_the_old_ones_packets_count_for_fences() {
        let (light, bulk, next, now) = (pid(1), pid(2), pid(3), Instant::now());
        let mut moves = lane_5_with_a_bulk_sender(&light, &bulk, now);
        moves.routed(5, &next, true, 4, (140_100, 210_000), now);
        assert!(!moves.should_move(5, &bulk, 140_099, 0, now));
        assert!(moves.should_move(5, &bulk, 140_100, 0, now));
        let (_, fence) = moves
            .move_sender(5, 5, &bulk, &NONE_QUEUED, &ALL_WRITTEN, now)
            .expect("a quiet lane");
        assert_eq!(
            fence,
            fence_on(5, 4),
            "all four packets before the new bulk sender's"
        );
        // A small packet of someone else's after that transfer began: a fence counting
        // it would wait behind the transfer, so nobody moves for now.
        moves.routed(5, &light, false, 5, (210_000, 210_100), now);
        assert!(!moves.should_move(5, &pid(9), u64::MAX, 0, now));
        // Until the transfer pauses for as long as one ends: what follows is a new one.
        let later = now + BULK_FOR;
        moves.routed(5, &next, true, 6, (210_100, 280_000), later);
        assert!(moves.should_move(5, &pid(9), u64::MAX, 0, later));
        let (_, fence) = moves
            .move_sender(5, 5, &pid(9), &NONE_QUEUED, &ALL_WRITTEN, later)
            .expect("a quiet lane");
        assert_eq!(fence, fence_on(5, 6));
    }

    #[test]
    fn a_sender_moves_to_the_least_queued_lane_without_a_bulk_sender() {
        let (light, now) = (pid(1), Instant::now());
        let mut moves = lane_5_with_a_bulk_sender(&light, &pid(2), now);
        let mut queued = [100; LANES];
        queued[0] = 0;
        queued[5] = 0;
        queued[9] = 0;
        queued[20] = 10;
        // Lane 9 is empty but carries a bulk sender's large messages.
        moves.routed(9, &pid(4), true, 0, (0, 70_000), now);
        let (to, _) = moves
            .move_sender(5, 5, &light, &queued, &ALL_WRITTEN, now)
            .expect("a quiet lane");
        assert_eq!(to, 20);
        // Moved again, from its new lane, it keeps one entry under its own lane.
        moves.routed(20, &pid(5), true, 0, (0, 70_000), now);
        queued[20] = 100;
        queued[7] = 0;
        let (to, _) = moves
            .move_sender(5, 20, &light, &queued, &ALL_WRITTEN, now)
            .expect("a quiet lane");
        assert_eq!((to, moves.lane(5, &light)), (7, 7));
        // Back to its own lane once that is the quiet one, it is no longer moved.
        let later = now + BULK_FOR;
        queued[7] = 100;
        queued[9] = 100;
        moves.routed(7, &pid(6), true, 0, (0, 70_000), later);
        let (to, _) = moves
            .move_sender(5, 7, &light, &queued, &ALL_WRITTEN, later)
            .expect("a quiet lane");
        assert_eq!(to, 5);
        assert_eq!(moves.moved_from[5], 0);
        // With every other lane bulky there is nowhere to go.
        let mut crowded = Moves::default();
        for lane in 1..LANES {
            crowded.routed(lane, &pid(100 + lane as u32), true, 0, (0, 70_000), now);
        }
        let nowhere = crowded.move_sender(5, 5, &light, &NONE_QUEUED, &ALL_WRITTEN, now);
        assert_eq!(nowhere, None);
        let from_0 = crowded.move_sender(0, 0, &light, &NONE_QUEUED, &ALL_WRITTEN, now);
        assert_eq!(from_0, None);
    }

    #[test]
    fn a_forgotten_move_leaves_a_fence_owed_on_the_senders_own_lane() {
        let now = Instant::now();
        let mut moves = lane_5_with_a_bulk_sender(&pid(1), &pid(2), now);
        let mut moved_to = Vec::new();
        for n in 0..MAX_MOVED as u32 {
            let p = pid(1000 + n);
            assert!(moves.should_move(5, &p, 100, 0, now));
            let (to, _) = moves
                .move_sender(5, 5, &p, &NONE_QUEUED, &ALL_WRITTEN, now)
                .expect("room");
            // Each new lane carries the moved sender's packet: 7 packets on it so far.
            moves.routed(to, &p, false, 6, (0, 700), now);
            moved_to.push(to);
        }
        assert!(
            moved_to
                .iter()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 20,
            "moves spread over the quiet lanes"
        );
        // Full, with nothing written on the lanes moved to: nobody can be forgotten, and
        // no new sender tries again for a while.
        let unwritten = [0; LANES];
        assert_eq!(
            moves.move_sender(5, 5, &pid(1), &NONE_QUEUED, &unwritten, now),
            None
        );
        assert!(!moves.should_move(5, &pid(1), 100, 0, now));
        assert!(
            moves.should_move(5, &pid(1000), 100, 0, now),
            "a moved sender may move again"
        );
        let later = now + BULK_FOR / 2;
        moves.routed(5, &pid(2), true, 4, (140_100, 210_000), later);
        let later = now + BULK_FOR;
        assert!(moves.should_move(5, &pid(1), 100, 0, later));
        assert_eq!(moves.take_owed_fence(5), None);
        // Once written, one is forgotten for it: back on its own lane, whose next packet
        // owes a fence on the lane it had moved to, as does whoever moves off lane 5.
        let (to, fence) = moves
            .move_sender(5, 5, &pid(1), &NONE_QUEUED, &ALL_WRITTEN, later)
            .expect("room made");
        assert_eq!(moves.moved.len(), MAX_MOVED);
        let forgotten: Vec<usize> = (0..MAX_MOVED)
            .filter(|&n| moves.lane(5, &pid(1000 + n as u32)) == 5)
            .collect();
        assert_eq!(forgotten.len(), 1);
        let was_on = moved_to[forgotten[0]];
        assert_eq!(fence[5], 1);
        assert_eq!(fence[was_on], if was_on == to { 0 } else { 7 });
        let owed = moves.take_owed_fence(5).expect("owed on lane 5");
        assert_eq!(owed, fence_on(was_on, 7));
        assert_eq!(moves.take_owed_fence(5), None, "owed once");
        moves.forget_moved();
        assert_eq!(moves.lane(5, &pid(1000)), 5);
        assert_eq!(moves.moved.len(), 0);
    }

    /// A small link model: senders route packets through `Moves` as `route` does, each
    /// lane's bytes are written to QUIC at chosen times, and an adversarial receiver
    /// delivers from any lane whose front allows it. Whatever the order of events, every
    /// sender's packets are delivered in the order sent, the receiver never stalls for
    /// good, no fence counts its own lane, and none counts a packet not yet written.
    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Event {
            /// Sender `0` (of 6; its own lane is 1 + n % 3) sends; large if `1`.
            Send(u8, bool),
            /// Lane `0` (1..=3, the senders' own lanes) has everything routed on it
            /// written to QUIC.
            Write(u8),
            /// Every lane has.
            WriteAll,
            /// The receiver takes what it can from the `0`th (modulo their number) of the
            /// lanes that can give it something now.
            Deliver(u8),
            /// Time passes.
            Wait,
        }

        fn event() -> impl Strategy<Value = Event> {
            prop_oneof![
                4 => (0u8..6, prop::bool::weighted(0.3)).prop_map(|(p, l)| Event::Send(p, l)),
                2 => (1u8..4).prop_map(Event::Write),
                1 => Just(Event::WriteAll),
                3 => any::<u8>().prop_map(Event::Deliver),
                1 => Just(Event::Wait),
            ]
        }

        enum Item {
            Packet { sender: u8, seq: u32 },
            Fence(Box<[u64; LANES]>),
        }

        #[derive(Default)]
        struct Lane {
            items: std::collections::VecDeque<Item>,
            /// End offset of each packet routed, in order.
            ends: Vec<u64>,
            routed_bytes: u64,
            written_bytes: u64,
            delivered: u64,
        }

        impl Lane {
            fn written_packets(&self) -> u64 {
                self.ends
                    .iter()
                    .filter(|&&e| e <= self.written_bytes)
                    .count() as u64
            }
        }

        struct Link {
            moves: Moves,
            lanes: Vec<Lane>,
            next_seq: [u32; 6],
            last_seen: [Option<u32>; 6],
            now: Instant,
            forgotten: usize,
            owed_taken: usize,
        }

        impl Link {
            fn new() -> Self {
                Link {
                    moves: Moves::with_max_moved(2),
                    lanes: (0..LANES).map(|_| Lane::default()).collect(),
                    next_seq: [0; 6],
                    last_seen: [None; 6],
                    now: Instant::now(),
                    forgotten: 0,
                    owed_taken: 0,
                }
            }

            fn check_fence(&self, lane: usize, counts: &[u64; LANES]) -> Result<(), String> {
                if counts[lane] > 0 {
                    return Err(format!("fence on lane {lane} counts its own lane"));
                }
                for (l, &n) in counts.iter().enumerate() {
                    if n > self.lanes[l].written_packets() {
                        return Err(format!(
                            "fence on lane {lane} counts unwritten packets of {l}"
                        ));
                    }
                }
                Ok(())
            }

            fn send(&mut self, sender: u8, large: bool) -> Result<(), String> {
                let p = pid(u32::from(sender));
                let home = 1 + usize::from(sender) % 3;
                let from = self.moves.lane(home, &p);
                let mut lane = from;
                let mut counts = [0u64; LANES];
                let queued: [usize; LANES] = std::array::from_fn(|l| {
                    (self.lanes[l].routed_bytes - self.lanes[l].written_bytes) as usize
                });
                let written: [u64; LANES] = std::array::from_fn(|l| self.lanes[l].written_bytes);
                if self
                    .moves
                    .should_move(from, &p, written[from], queued[from], self.now)
                {
                    let before = self.moves.moved.len();
                    let was_moved = self.moves.moved.contains_key(&p);
                    if let Some((to, fence)) = self
                        .moves
                        .move_sender(home, from, &p, &queued, &written, self.now)
                    {
                        lane = to;
                        counts = fence;
                        if !was_moved && self.moves.moved.len() == before {
                            self.forgotten += 1;
                        }
                    }
                }
                if let Some(owed) = self.moves.take_owed_fence(lane) {
                    self.owed_taken += 1;
                    for (c, o) in counts.iter_mut().zip(owed) {
                        *c = (*c).max(o);
                    }
                }
                if counts.iter().any(|&n| n > 0) {
                    self.check_fence(lane, &counts)?;
                    self.lanes[lane]
                        .items
                        .push_back(Item::Fence(Box::new(counts)));
                }
                let len = if large { BULK_MESSAGE as u64 } else { 100 };
                let target = &mut self.lanes[lane];
                let start = target.routed_bytes;
                target.routed_bytes += len;
                let sent_before = target.ends.len() as u64;
                target.ends.push(target.routed_bytes);
                let seq = self.next_seq[usize::from(sender)];
                self.next_seq[usize::from(sender)] += 1;
                target.items.push_back(Item::Packet { sender, seq });
                let end = target.routed_bytes;
                self.moves
                    .routed(lane, &p, large, sent_before, (start, end), self.now);
                Ok(())
            }

            /// Whether lane `lane` can deliver its front item now.
            fn ready(&self, lane: usize) -> bool {
                match self.lanes[lane].items.front() {
                    None => false,
                    Some(Item::Fence(counts)) => {
                        (0..LANES).all(|l| self.lanes[l].delivered >= counts[l])
                    }
                    // Only what QUIC has can arrive.
                    Some(Item::Packet { .. }) => {
                        self.lanes[lane].delivered < self.lanes[lane].written_packets()
                    }
                }
            }

            /// Takes what lane `lane` can deliver; whether it took anything.
            fn deliver(&mut self, lane: usize) -> Result<bool, String> {
                let mut took = false;
                loop {
                    if !self.ready(lane) {
                        return Ok(took);
                    }
                    took = true;
                    match self.lanes[lane].items.pop_front() {
                        Some(Item::Packet { sender, seq }) => {
                            self.lanes[lane].delivered += 1;
                            let last = &mut self.last_seen[usize::from(sender)];
                            if last.is_some_and(|l| seq != l + 1) || (last.is_none() && seq != 0) {
                                return Err(format!(
                                    "sender {sender}: packet {seq} delivered after {last:?}"
                                ));
                            }
                            *last = Some(seq);
                        }
                        Some(Item::Fence(_)) | None => {}
                    }
                }
            }

            fn run(&mut self, events: &[Event]) -> Result<(), String> {
                for event in events {
                    match *event {
                        Event::Send(p, large) => self.send(p, large)?,
                        Event::Write(l) => {
                            let lane = &mut self.lanes[usize::from(l)];
                            lane.written_bytes = lane.routed_bytes;
                        }
                        Event::WriteAll => {
                            for lane in &mut self.lanes {
                                lane.written_bytes = lane.routed_bytes;
                            }
                        }
                        Event::Deliver(k) => {
                            let ready: Vec<usize> = (0..LANES).filter(|&l| self.ready(l)).collect();
                            if !ready.is_empty() {
                                self.deliver(ready[usize::from(k) % ready.len()])?;
                            }
                        }
                        Event::Wait => self.now += BULK_FOR,
                    }
                }
                // Everything written, the receiver takes all: nothing may be left.
                for lane in &mut self.lanes {
                    lane.written_bytes = lane.routed_bytes;
                }
                while (0..LANES)
                    .try_fold(false, |any, l| Ok::<_, String>(self.deliver(l)? || any))?
                {
                }
                for (l, lane) in self.lanes.iter().enumerate() {
                    if !lane.items.is_empty() {
                        return Err(format!("lane {l} stalled with {} items", lane.items.len()));
                    }
                }
                for (sender, &sent) in self.next_seq.iter().enumerate() {
                    let seen = self.last_seen[sender].map_or(0, |s| s + 1);
                    if seen != sent {
                        return Err(format!("sender {sender}: {seen} of {sent} delivered"));
                    }
                }
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn every_sender_stays_in_order_and_nothing_stalls(
                events in prop::collection::vec(event(), 1..120)
            ) {
                let mut link = Link::new();
                let result = link.run(&events);
                prop_assert!(result.is_ok(), "{:?}", result);
            }
        }

        /// A sender forgotten to make room, moving again at once from its own lane,
        /// still waits for its packets on the lane it was forgotten on: the owed fence
        /// goes with it.
        #[test]
        fn a_forgotten_sender_moving_again_waits_for_its_packets_where_it_was() {
            let mut link = Link::new();
            let write = |link: &mut Link, lane: usize| {
                link.lanes[lane].written_bytes = link.lanes[lane].routed_bytes;
            };
            let lane_of =
                |link: &Link, sender: u32| link.moves.lane(1 + sender as usize % 3, &pid(sender));
            // 3 moves off 0's transfer on lane 1; its packet there is written.
            assert_eq!(link.send(0, true), Ok(()));
            assert_eq!(link.send(3, false), Ok(()));
            let first_lane = lane_of(&link, 3);
            assert_ne!(first_lane, 1);
            for lane in 0..LANES {
                write(&mut link, lane);
            }
            // 4 moves off 1's transfer on lane 2 (the map is full), unwritten.
            assert_eq!(link.send(1, true), Ok(()));
            assert_eq!(link.send(4, false), Ok(()));
            // 5 moves off 2's transfer on lane 3: 3, the only one written, is forgotten.
            assert_eq!(link.send(2, true), Ok(()));
            assert_eq!(link.send(5, false), Ok(()));
            assert_eq!(lane_of(&link, 3), 1, "forgotten");
            // With 4's packet written, 3 moves again at once, forgetting 4; elsewhere than
            // before, as the lane it was on has bytes queued.
            let fourth_lane = lane_of(&link, 4);
            write(&mut link, fourth_lane);
            link.lanes[first_lane].routed_bytes += 1000;
            assert_eq!(link.send(3, false), Ok(()));
            let second_lane = lane_of(&link, 3);
            assert!(second_lane != 1 && second_lane != first_lane);
            for lane in 0..LANES {
                write(&mut link, lane);
            }
            // Its new lane first: nothing of it may come before its first packet.
            assert_eq!(link.deliver(second_lane), Ok(false));
            assert_eq!(link.run(&[]), Ok(()));
        }

        /// The model does move senders, forget them and owe fences (else it proves
        /// little).
        #[test]
        fn the_model_exercises_moves_and_forgetting() {
            let mut link = Link::new();
            let mut events = Vec::new();
            // Senders 0 and 3 share lane 1; 0 streams large messages, the others send
            // small ones and get moved; with room for two, the third forgets one.
            for round in 0..4u8 {
                events.push(Event::Send(0, true));
                events.push(Event::Send(1 + round % 2, true));
                events.push(Event::WriteAll);
                for s in [3u8, 4, 5] {
                    events.push(Event::Send(s, false));
                    events.push(Event::WriteAll);
                }
                events.push(Event::Deliver(round));
                events.push(Event::Wait);
            }
            assert_eq!(link.run(&events), Ok(()));
            assert!(link.moves.moves() >= 4, "{} moves", link.moves.moves());
            assert!(link.forgotten > 0 && link.owed_taken > 0);
        }
    }

    #[test]
    fn barrier_markers_round_trip_and_malformed_ones_are_refused() {
        let mut sent = [0u64; LANES];
        sent[3] = 7;
        sent[LANES - 1] = u64::MAX;
        let marker = encode_barrier(&sent);
        assert!(is_barrier(&marker));
        assert_eq!(decode_barrier(&marker), Some(sent));
        assert_eq!(decode_barrier(&marker[..marker.len() - 1]), None);
        assert_eq!(decode_barrier(&[BARRIER_TAG]), None);
        assert_eq!(decode_barrier(b""), None);
        let mut long = marker.clone();
        long.push(0);
        assert_eq!(decode_barrier(&long), None);
        assert!(!is_barrier(&[112, 131]));
    }
}
