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
//! Everything here is pure: the sender classifies its own VM's packets, the receiver
//! parses markers from its peer (which must not panic on any input).
use crate::etf::{Term, VERSION};

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
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ salt;
    for &b in pid {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the high bits in: the low bits of FNV alone spread short inputs poorly.
    1 + ((hash ^ (hash >> 32)) % (LANES as u64 - 1)) as usize
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
