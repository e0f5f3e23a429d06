//! The name check of the distribution handshake: `parse_name_message` on arbitrary
//! bytes, and a `NameGuard` fed a sequence of frames. Once the guard is done, the name it
//! accepted is one the certificate covers (accepting) or the dialled one (connecting).
//!
//! Input: `[side, frames as (len:1, bytes)...]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust_dist_proto::cert::node_matches;
use trust_dist_proto::handshake::{parse_name_message, NameGuard, Side, DFLAG_NAME_ME};

const PATTERN: &str = "worker-*@10.0.*";
const DIALLED: &str = "worker-1@10.0.0.1";

fuzz_target!(|data: &[u8]| {
    let _ = parse_name_message(data, false);
    let _ = parse_name_message(data, true);
    let Some((&side, mut rest)) = data.split_first() else {
        return;
    };
    let (side, pattern) = if side & 1 == 0 {
        (Side::Accepting, PATTERN)
    } else {
        (Side::Connecting, DIALLED)
    };
    let mut guard = NameGuard::new(side, pattern);
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (frame, after) = tail.split_at(len);
        rest = after;
        let was_done = guard.is_done();
        let r = guard.on_peer_frame(frame);
        if was_done {
            assert!(r.is_ok());
        }
        if r.is_err() {
            assert!(!guard.is_done());
            break;
        }
    }
    if let Some(peer) = guard.peer() {
        assert_eq!(peer.flags & DFLAG_NAME_ME, 0);
        match side {
            Side::Accepting => assert!(node_matches(PATTERN, &peer.name)),
            Side::Connecting => assert_eq!(peer.name, DIALLED),
        }
    }
});
