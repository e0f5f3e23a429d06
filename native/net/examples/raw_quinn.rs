//! `cargo run --release -p trust_dist_net --example raw_quinn [SECONDS [RUNS]]`: the bare
//! transport on loopback (see `trust_dist_net::reference`), printed as one line of
//! `key=value` pairs for `make bench`.
use trust_dist_net::reference;

fn main() {
    let seconds = std::env::args()
        .nth(1)
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    let runs = std::env::args()
        .nth(2)
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    match reference::measure(&[64 * 1024, 1024 * 1024], seconds, runs, 5_000) {
        Ok(r) => {
            let mut line = String::new();
            for (size, mb) in &r.throughput {
                line.push_str(&format!("tput_{size}={mb:.1} "));
            }
            println!(
                "{line}rtt_p50_us={:.1} rtt_p99_us={:.1} rtt_samples={}",
                r.rtt_p50_us, r.rtt_p99_us, r.rtt_samples
            );
        }
        Err(e) => {
            eprintln!("raw quinn measurement failed: {e}");
            std::process::exit(1);
        }
    }
}
