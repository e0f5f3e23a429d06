//! `trust-dist-wire`: joins two network interfaces at layer 2, like a two-port bridge,
//! and impairs what crosses: seeded random loss, a fixed delay with optional jitter,
//! reordering, and a partition switched at run time. Test tooling for the fault-injection
//! suite (`make faults`) and benchmarks; it is not part of the carrier.
//!
//! The kernels this project is tested on have no `netem` qdisc, so the impairment lives
//! here, in user space, and is used on every kernel: one code path, the same figures.
//! One thread: frames are read from AF_PACKET sockets, given a release time by the
//! impairment core (`impair`) and kept in a binary heap until due.
//!
//! Control (one command a line on standard input, one answer line on standard output):
//! `set ab|ba|both key=value...` (loss, delay_ms, jitter_ms, reorder, reorder_ms),
//! `partition [ab|ba|both]`, `heal [ab|ba|both]`, `stats`, `reset`, `trace on|off` (one
//! line per frame on standard error), `quit`. The wire
//! stops when standard input closes, so it never outlives the test that started it.
//! With `--control signals` standard input is ignored: SIGUSR1 partitions, SIGUSR2
//! heals, SIGTERM/SIGINT stop. Counters go to standard error on exit.

mod impair;
mod packet;

use clap::Parser;
use impair::{Impairment, Link};
use packet::{PacketSocket, Recv};
use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "trust-dist-wire",
    about = "Join two interfaces at layer 2 and impair the frames that cross \
             (loss, delay, jitter, reordering, partition). Needs CAP_NET_RAW.",
    after_help = "Directions: ab is from --a to --b, ba the reverse. Settings given \
                  here apply to both directions; `set` on standard input changes them \
                  at run time. Exit codes: 0 stopped as asked; 2 usage or I/O error."
)]
struct Args {
    /// First interface (frames read here go out of --b).
    #[arg(long)]
    a: String,
    /// Second interface.
    #[arg(long)]
    b: String,
    /// Seed of the loss/jitter/reorder decisions (the same seed replays the same choices
    /// for the same arrival sequence).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Loss in percent, each direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay in milliseconds (25 gives a 50 ms round trip).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Delay varies by up to this many ms either way; never reorders by itself.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Percent of frames held back by --reorder-ms so that later frames overtake them.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    #[arg(long, default_value_t = 5.0)]
    reorder_ms: f64,
    /// Frames queued per direction at most; beyond, frames are dropped and counted.
    #[arg(long, default_value_t = 20_000)]
    queue: usize,
    /// `stdin` (commands on standard input; EOF stops) or `signals`.
    #[arg(long, default_value = "stdin")]
    control: String,
    /// Stop after this many seconds whatever happens.
    #[arg(long, default_value_t = 3600)]
    max_seconds: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);
static PARTITION: AtomicBool = AtomicBool::new(false);
static HEAL: AtomicBool = AtomicBool::new(false);
/// `trace on`: one line per frame on standard error, for finding out what crossed when.
static TRACE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only atomic stores here: that is all a signal handler may safely do.
    match sig {
        libc::SIGUSR1 => PARTITION.store(true, Ordering::SeqCst),
        libc::SIGUSR2 => HEAL.store(true, Ordering::SeqCst),
        _ => STOP.store(true, Ordering::SeqCst),
    }
}

fn install_signals() {
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: on_signal is async-signal-safe (atomic stores only).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let stdin_control = match args.control.as_str() {
        "stdin" => true,
        "signals" => false,
        other => {
            eprintln!("trust-dist-wire: --control {other:?}: use stdin or signals");
            return ExitCode::from(2);
        }
    };
    let mut imp = Impairment::default();
    for (key, value) in [
        ("loss", args.loss),
        ("delay_ms", args.delay_ms),
        ("jitter_ms", args.jitter_ms),
        ("reorder", args.reorder),
        ("reorder_ms", args.reorder_ms),
    ] {
        if let Err(e) = imp.set(key, &value.to_string()) {
            eprintln!("trust-dist-wire: --{}: {e}", key.replace('_', "-"));
            return ExitCode::from(2);
        }
    }
    let socks = match (PacketSocket::open(&args.a), PacketSocket::open(&args.b)) {
        (Ok(a), Ok(b)) => [a, b],
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("trust-dist-wire: {e} (needs CAP_NET_RAW and both interfaces up)");
            return ExitCode::from(2);
        }
    };
    install_signals();
    let mut link = Link::new(args.seed, args.queue);
    for d in &mut link.dirs {
        d.impairment = imp.clone();
    }
    println!(
        "ready a={} b={} {}",
        socks[0].name,
        socks[1].name,
        imp.describe()
    );
    let _ = io::stdout().flush();

    let result = run(
        &socks,
        &mut link,
        stdin_control,
        Duration::from_secs(args.max_seconds),
    );
    collect_kernel_drops(&socks, &mut link);
    eprintln!("trust-dist-wire: stopped; {}", link.report());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trust-dist-wire: {e}");
            ExitCode::from(2)
        }
    }
}

fn collect_kernel_drops(socks: &[PacketSocket; 2], link: &mut Link) {
    for (i, s) in socks.iter().enumerate() {
        link.dirs[i].counters.kernel_drops += s.kernel_drops();
    }
}

/// Frames read from one socket per wake-up at most, so one busy direction cannot starve
/// the other or the release of due frames.
const BATCH: usize = 256;
/// Upper bound of one wait, so signals and the run-time limit are seen promptly.
const MAX_WAIT_MS: i32 = 200;

fn run(
    socks: &[PacketSocket; 2],
    link: &mut Link,
    stdin_control: bool,
    max: Duration,
) -> io::Result<()> {
    let started = Instant::now();
    // Large enough for any frame of a 64 KiB MTU; larger frames are skipped.
    let mut buf = vec![0u8; 65_600];
    let mut line = Vec::new();
    let mut fds = vec![socks[0].fd(), socks[1].fd()];
    if stdin_control {
        fds.push(0);
    }
    while !STOP.load(Ordering::SeqCst) && started.elapsed() < max {
        if PARTITION.swap(false, Ordering::SeqCst) {
            set_partition(link, "both", true)?;
        }
        if HEAL.swap(false, Ordering::SeqCst) {
            set_partition(link, "both", false)?;
        }
        let wait = match link.next_release() {
            // Rounded up: waking a little late is harmless, waking early spins.
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(MAX_WAIT_MS as u128) as i32,
            None => MAX_WAIT_MS,
        };
        let ready = packet::poll(&fds, wait)?;
        for i in 0..2 {
            if !ready[i] {
                continue;
            }
            for _ in 0..BATCH {
                match socks[i].recv(&mut buf)? {
                    Recv::Frame(n) => {
                        if TRACE.load(Ordering::Relaxed) {
                            eprintln!(
                                "{:.3} {} {}",
                                started.elapsed().as_secs_f64(),
                                ["ab", "ba"][i],
                                describe(&buf[..n])
                            );
                        }
                        link.arrive(i, buf[..n].to_vec(), Instant::now())
                    }
                    Recv::Skip => continue,
                    Recv::Empty => break,
                }
            }
        }
        let now = Instant::now();
        while let Some(p) = link.release(now) {
            let c = &mut link.dirs[p.dir].counters;
            match socks[1 - p.dir].send(&p.frame) {
                Ok(()) => {
                    c.forwarded += 1;
                    c.bytes += p.frame.len() as u64;
                }
                Err(_) => c.send_errors += 1,
            }
        }
        if stdin_control && ready[2] && !control(link, socks, &mut line)? {
            break;
        }
    }
    Ok(())
}

/// Reads what standard input has and runs complete lines; false when it is closed or a
/// `quit` came.
fn control(link: &mut Link, socks: &[PacketSocket; 2], line: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 65_536];
    let n = io::stdin().read(&mut chunk)?;
    if n == 0 {
        return Ok(false);
    }
    line.extend_from_slice(&chunk[..n]);
    while let Some(pos) = line.iter().position(|&b| b == b'\n') {
        let text: String = String::from_utf8_lossy(&line[..pos]).trim().to_string();
        line.drain(..=pos);
        if text.is_empty() {
            continue;
        }
        let answer = match command(link, socks, &text) {
            Ok(None) => return Ok(false),
            Ok(Some(ok)) => format!("ok {ok}"),
            Err(e) => format!("error {e}"),
        };
        println!("{}", answer.trim_end());
        io::stdout().flush()?;
    }
    Ok(true)
}

fn command(link: &mut Link, socks: &[PacketSocket; 2], text: &str) -> io::Result<Option<String>> {
    let mut words = text.split_whitespace();
    let verb = words.next().unwrap_or_default();
    let rest: Vec<&str> = words.collect();
    let dir = rest.first().copied().unwrap_or("both");
    match verb {
        "quit" => Ok(None),
        "stats" => {
            collect_kernel_drops(socks, link);
            Ok(Some(link.report()))
        }
        "trace" => {
            TRACE.store(dir != "off", Ordering::SeqCst);
            Ok(Some(String::new()))
        }
        "reset" => {
            collect_kernel_drops(socks, link);
            for d in &mut link.dirs {
                d.counters = Default::default();
            }
            Ok(Some(String::new()))
        }
        "partition" | "heal" => {
            set_partition(link, dir, verb == "partition")?;
            Ok(Some(link.report()))
        }
        "set" => {
            let targets = directions(dir)?;
            for pair in rest.get(1..).unwrap_or(&[]) {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{pair:?} is not key=value")))?;
                for &i in &targets {
                    link.dirs[i].impairment.set(key, value).map_err(bad)?;
                }
            }
            Ok(Some(format!(
                "ab: {} ba: {}",
                link.dirs[0].impairment.describe(),
                link.dirs[1].impairment.describe()
            )))
        }
        _ => Err(bad(format!(
            "unknown command {verb:?}; known: set partition heal stats reset trace quit"
        ))),
    }
}

/// A frame in one line: ARP, or the IPv4/IPv6 addresses and UDP/TCP ports, and for UDP
/// whether it carries a QUIC long header (handshake) or short header packet.
fn describe(frame: &[u8]) -> String {
    let ethertype = match frame.get(12..14) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => return format!("runt len={}", frame.len()),
    };
    let ip = &frame[14..];
    let (proto, src, dst, l4) = match ethertype {
        0x0806 => return format!("arp len={}", frame.len()),
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let a = |o: usize| format!("{}.{}.{}.{}", ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
            (ip[9], a(12), a(16), ip.get(ihl..).unwrap_or_default())
        }
        0x86dd if ip.len() >= 40 => {
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&ip[o..o + 16]);
                std::net::Ipv6Addr::from(b).to_string()
            };
            (ip[6], a(8), a(24), &ip[40..])
        }
        other => return format!("ethertype {other:#06x} len={}", frame.len()),
    };
    let port = |o: usize| {
        l4.get(o..o + 2)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]]))
    };
    let kind = match proto {
        17 => match l4.get(8) {
            Some(b) if b & 0x80 != 0 => "udp quic-long",
            Some(_) => "udp quic-short",
            None => "udp",
        },
        6 => "tcp",
        1 | 58 => "icmp",
        _ => "ip",
    };
    format!(
        "{src}:{} > {dst}:{} {kind} len={}",
        port(0),
        port(2),
        frame.len()
    )
}

fn set_partition(link: &mut Link, dir: &str, on: bool) -> io::Result<()> {
    for i in directions(dir)? {
        link.dirs[i].partitioned = on;
    }
    Ok(())
}

fn directions(dir: &str) -> io::Result<Vec<usize>> {
    match dir {
        "ab" => Ok(vec![0]),
        "ba" => Ok(vec![1]),
        "both" => Ok(vec![0, 1]),
        other => Err(bad(format!("direction {other:?}: use ab, ba or both"))),
    }
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}
