//! The restricted link's filter: a sequence of packets, each either decided (from the
//! peer) or observed (sent to the peer), on one link with a fixed local and peer node.
//!
//! Input: records `[kind, len_hi, len_lo, bytes...]` (kind even: decide, odd: observe);
//! input that is not such a sequence is decided as one packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust_dist_proto::control::{self, Op};
use trust_dist_proto::etf::Atom;
use trust_dist_proto::filter::{AtomTable, LinkFilter, NodeId, Verdict};
use trust_dist_proto::policy::TierPolicy;

/// The node names of the OTP 29 vectors, so seeds from them mean something.
const LOCAL: &str = "hi29x1825894@127.0.0.1";
const PEER: &str = "lo29x1825894@127.0.0.1";

/// Every atom exists except those starting with "new".
struct Atoms;
impl AtomTable for Atoms {
    fn exists(&self, atom: Atom<'_>) -> bool {
        !atom.text.starts_with(b"new")
    }
}

fn creation(name: &str) -> u32 {
    // Read from the vectors' index at build time would need I/O; these are its values.
    if name == LOCAL {
        1_795_578_025
    } else {
        1_795_578_026
    }
}

fn filter() -> LinkFilter {
    let mut policy = TierPolicy::default();
    policy.registered.insert("cap_target".into());
    policy
        .rpc
        .insert(("trust_dist_capture".into(), "erpc_echo".into(), 1));
    policy.max_monitors = 64;
    LinkFilter::new(
        NodeId {
            name: LOCAL.into(),
            creation: creation(LOCAL),
        },
        NodeId {
            name: PEER.into(),
            creation: creation(PEER),
        },
        policy,
        vec![(
            "rex".into(),
            trust_dist_proto::etf::PidKey {
                id: 40,
                serial: 0,
                creation: creation(LOCAL),
            },
        )],
    )
}

fn records(mut data: &[u8]) -> Option<Vec<(bool, &[u8])>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let [kind, hi, lo, rest @ ..] = data else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        if rest.len() < len || kind & 0x7e != 0x7e {
            return None;
        }
        out.push((kind & 1 == 1, &rest[..len]));
        data = &rest[len..];
    }
    Some(out)
}

fn check(packet: &[u8], f: &mut LinkFilter) {
    let d = f.decide(packet, &Atoms);
    match &d.verdict {
        Verdict::Deliver => {
            let p = control::decode(packet).expect("a delivered packet decodes");
            assert!(p.token.is_none() || d.audited, "a token is never delivered");
            assert!(d.reason.is_none());
        }
        Verdict::DeliverRewritten(bytes) => {
            let p = control::decode(bytes).expect("a rewritten packet decodes");
            assert!(p.token.is_none(), "the rewritten packet has no token");
            let orig = control::decode(packet).expect("the original decodes");
            assert_eq!(p.payload, orig.payload);
            assert!(!matches!(
                p.op,
                Op::SendTt | Op::RegSendTt | Op::SendSenderTt
            ));
        }
        Verdict::Answer(bytes) => {
            let a = control::decode(bytes).expect("an answer decodes");
            assert!(matches!(
                a.op,
                Op::SpawnReply | Op::PayloadMonitorPExit | Op::PayloadExit
            ));
            assert!(d.reason.is_some());
        }
        Verdict::Drop | Verdict::Close => assert!(d.reason.is_some()),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut f = filter();
    match records(data) {
        Some(list) if !list.is_empty() => {
            for (observe, bytes) in list {
                if observe {
                    f.observe_outgoing(bytes);
                } else {
                    check(bytes, &mut f);
                }
            }
        }
        _ => {
            check(data, &mut f);
            f.observe_outgoing(data);
            check(data, &mut f);
        }
    }
});
