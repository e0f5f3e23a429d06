//! How long one decision takes on small messages; run with
//! `cargo test --release -p trust_dist_proto --test speed -- --ignored --nocapture`.
mod common;
use common::*;
use std::time::Instant;
use trust_dist_proto::etf::Atom;
use trust_dist_proto::{AtomTable, TierPolicy};

struct Every;
impl AtomTable for Every {
    fn exists(&self, _: Atom<'_>) -> bool {
        true
    }
}

#[test]
#[ignore = "timing, not a check"]
fn decide_small_messages() {
    for name in [
        "22_send_sender.bin",
        "06_reg_send_net_kernel_is_auth.bin",
        "33_alias_send_gen_server_reply.bin",
    ] {
        let Some(v) = vectors()
            .iter()
            .find(|v| v.release == "25" && v.name().ends_with(name))
        else {
            continue;
        };
        let mut f = primed(v, TierPolicy::default());
        let n = 1_000_000u32;
        let t = Instant::now();
        for _ in 0..n {
            std::hint::black_box(f.decide(std::hint::black_box(&v.bytes), &Every));
        }
        let decide = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            f.observe_outgoing(std::hint::black_box(&v.bytes));
        }
        println!(
            "{name}: {} bytes, decide {decide:?}, observe {:?}",
            v.bytes.len(),
            t.elapsed() / n
        );
    }
}
