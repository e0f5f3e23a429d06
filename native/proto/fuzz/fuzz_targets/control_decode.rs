//! The packet decoder on arbitrary bytes, and the lane a packet is given (a pid of its
//! control message, or a barrier) when it decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust_dist_proto::control;
use trust_dist_proto::etf::{self, Term};
use trust_dist_proto::lanes::{self, Lane};

fuzz_target!(|data: &[u8]| {
    let lane = lanes::lane_of(data, 0x5eed);
    if let Lane::Sender { lane, pid, message } = lane {
        assert!(lane < lanes::LANES);
        assert!(matches!(Term::parse(pid), Ok((Term::Pid(_), n)) if n == pid.len()));
        assert_eq!(message, lanes::carries_message(data));
    }
    let Ok(p) = control::decode(data) else {
        return;
    };
    // What decoded is one whole control term, and the payload is exactly one term.
    let (term, len) = Term::parse(p.control_bytes).expect("control parses again");
    assert_eq!(len, p.control_bytes.len());
    let tuple = term.as_tuple().expect("control is a tuple");
    assert_eq!(tuple.get(0).expect("op"), Term::Int(i64::from(p.op as u8)));
    if let Some(payload) = p.payload {
        assert_eq!(etf::skip(payload), Ok(payload.len()));
    }
    if let Some(token) = p.token {
        let _ = token.as_tuple();
    }
});
