//! The impairment core, free of I/O: which frames are lost, when each one is released,
//! and the counters that prove it. Time is an argument, randomness a seeded generator,
//! so a run can be replayed and the rules are unit-tested without a network.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// A small seeded generator (SplitMix64): reproducible runs need no dependency and no
/// cryptographic quality.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `percent` / 100.
    pub fn percent(&mut self, percent: f64) -> bool {
        percent > 0.0 && self.unit() * 100.0 < percent
    }
}

/// What one direction of the link does to the frames that cross it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// Frames lost, in percent.
    pub loss: f64,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Each frame's delay varies uniformly by up to this much either way. Jitter alone
    /// never reorders: a frame is never released before the one received ahead of it.
    pub jitter: Duration,
    /// Frames held back by `reorder_extra`, in percent; later frames overtake them.
    pub reorder: f64,
    pub reorder_extra: Duration,
}

impl Impairment {
    /// Applies `key=value` (loss, delay_ms, jitter_ms, reorder, reorder_ms).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let number: f64 = value
            .parse()
            .map_err(|_| format!("{key}: {value:?} is not a number"))?;
        if !number.is_finite() || number < 0.0 {
            return Err(format!("{key}: {value} must be a finite number >= 0"));
        }
        let ms = || Duration::from_micros((number * 1000.0) as u64);
        match key {
            "loss" if number <= 100.0 => self.loss = number,
            "reorder" if number <= 100.0 => self.reorder = number,
            "loss" | "reorder" => return Err(format!("{key}: {value} is not a percentage")),
            "delay_ms" => self.delay = ms(),
            "jitter_ms" => self.jitter = ms(),
            "reorder_ms" => self.reorder_extra = ms(),
            _ => {
                return Err(format!(
                    "unknown key {key:?}; known: loss delay_ms jitter_ms reorder reorder_ms"
                ))
            }
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "loss={} delay_ms={} jitter_ms={} reorder={} reorder_ms={}",
            self.loss,
            self.delay.as_secs_f64() * 1000.0,
            self.jitter.as_secs_f64() * 1000.0,
            self.reorder,
            self.reorder_extra.as_secs_f64() * 1000.0
        )
    }
}

/// Per-direction counters; `report` prints them as `key=value` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Frames read from the ingress interface.
    pub rx: u64,
    /// Frames written to the egress interface, and their bytes.
    pub forwarded: u64,
    pub bytes: u64,
    /// Dropped by the loss rule.
    pub lost: u64,
    /// Dropped because the link was partitioned (at arrival or at release).
    pub partitioned: u64,
    /// Dropped because the queue of this direction was full.
    pub overflow: u64,
    /// Released later than they arrived (delay or jitter above zero).
    pub delayed: u64,
    /// Held back by the reorder rule, and of those, released after a later frame.
    pub held_back: u64,
    pub overtaken: u64,
    /// Writes the egress interface refused (for example a frame above its MTU).
    pub send_errors: u64,
    /// Frames the kernel dropped before the wire read them (PACKET_STATISTICS).
    pub kernel_drops: u64,
}

impl Counters {
    pub fn report(&self, prefix: &str, out: &mut String) {
        let fields = [
            ("rx", self.rx),
            ("fwd", self.forwarded),
            ("bytes", self.bytes),
            ("lost", self.lost),
            ("partitioned", self.partitioned),
            ("overflow", self.overflow),
            ("delayed", self.delayed),
            ("held_back", self.held_back),
            ("overtaken", self.overtaken),
            ("send_errors", self.send_errors),
            ("kernel_drops", self.kernel_drops),
        ];
        for (key, value) in fields {
            let _ = write!(out, " {prefix}.{key}={value}");
        }
    }
}

/// One direction: its rules, its state and its counters.
#[derive(Debug, Default)]
pub struct Direction {
    pub impairment: Impairment,
    pub partitioned: bool,
    pub counters: Counters,
    /// Release time of the last frame not held back: later frames never leave before it.
    last_release: Option<Instant>,
    /// Arrival number of the next frame, and the highest one released so far.
    next_arrival: u64,
    highest_released: Option<u64>,
    queued: usize,
}

/// A frame waiting for its release time.
#[derive(Debug)]
pub struct Pending {
    pub at: Instant,
    /// Arrival number within its direction; also breaks ties so equal times keep order.
    pub arrival: u64,
    pub dir: usize,
    pub frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.dir, self.arrival).cmp(&(other.at, other.dir, other.arrival))
    }
}

/// Both directions and one queue of release times (a binary heap: the next frame due is
/// always on top, so one thread serves any number of frames in flight).
pub struct Link {
    pub dirs: [Direction; 2],
    queue: BinaryHeap<Reverse<Pending>>,
    /// Frames queued per direction at most; more are dropped and counted.
    capacity: usize,
    rng: Rng,
}

impl Link {
    pub fn new(seed: u64, capacity: usize) -> Self {
        Link {
            dirs: [Direction::default(), Direction::default()],
            queue: BinaryHeap::new(),
            capacity,
            rng: Rng::new(seed),
        }
    }

    /// A frame arrived for direction `dir` at `now`: drop it or queue it.
    pub fn arrive(&mut self, dir: usize, frame: Vec<u8>, now: Instant) {
        let d = &mut self.dirs[dir];
        d.counters.rx += 1;
        let arrival = d.next_arrival;
        d.next_arrival += 1;
        if d.partitioned {
            d.counters.partitioned += 1;
            return;
        }
        if self.rng.percent(d.impairment.loss) {
            d.counters.lost += 1;
            return;
        }
        if d.queued >= self.capacity {
            d.counters.overflow += 1;
            return;
        }
        let imp = &d.impairment;
        let mut delay = imp.delay;
        if !imp.jitter.is_zero() {
            let offset = imp.jitter.mul_f64(self.rng.unit() * 2.0);
            delay = (delay + offset).saturating_sub(imp.jitter);
        }
        let mut at = now + delay;
        if let Some(last) = d.last_release {
            at = at.max(last);
        }
        if self.rng.percent(imp.reorder) && !imp.reorder_extra.is_zero() {
            // Held back past its place; does not move `last_release`, so the frames
            // behind it may leave first.
            at += imp.reorder_extra;
            d.counters.held_back += 1;
        } else {
            d.last_release = Some(at);
        }
        if at > now {
            d.counters.delayed += 1;
        }
        d.queued += 1;
        self.queue.push(Reverse(Pending {
            at,
            arrival,
            dir,
            frame,
        }));
    }

    /// When the next frame is due, if any.
    pub fn next_release(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse(p)| p.at)
    }

    /// The next frame due at `now`, already counted as released; frames of a direction
    /// that was partitioned meanwhile are dropped on the way (a cut cable loses what
    /// was on it).
    pub fn release(&mut self, now: Instant) -> Option<Pending> {
        loop {
            match self.queue.peek() {
                Some(Reverse(p)) if p.at <= now => {}
                _ => return None,
            }
            let Reverse(p) = self.queue.pop()?;
            let d = &mut self.dirs[p.dir];
            d.queued -= 1;
            if d.partitioned {
                d.counters.partitioned += 1;
                continue;
            }
            match d.highest_released {
                Some(h) if p.arrival < h => d.counters.overtaken += 1,
                _ => d.highest_released = Some(p.arrival),
            }
            return Some(p);
        }
    }

    /// Frames waiting, both directions.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// `ab.rx=... ba.rx=...` plus each direction's settings.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (i, name) in ["ab", "ba"].iter().enumerate() {
            self.dirs[i].counters.report(name, &mut out);
            let _ = write!(out, " {name}.partition={}", self.dirs[i].partitioned);
        }
        let _ = write!(out, " queued={}", self.queued());
        out.trim_start().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(link: &mut Link, now: Instant) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        while let Some(p) = link.release(now) {
            out.push((p.dir, p.arrival));
        }
        out
    }

    #[test]
    fn no_impairment_forwards_everything_in_order_at_once() {
        let mut link = Link::new(1, 100);
        let t = Instant::now();
        for i in 0..10 {
            link.arrive((i % 2) as usize, vec![i], t);
        }
        let got = drain(&mut link, t);
        assert_eq!(got.len(), 10);
        let ab: Vec<u64> = got.iter().filter(|(d, _)| *d == 0).map(|x| x.1).collect();
        assert_eq!(ab, vec![0, 1, 2, 3, 4]);
        assert_eq!(link.dirs[0].counters.delayed, 0);
    }

    #[test]
    fn delay_holds_frames_until_due() {
        let mut link = Link::new(1, 100);
        link.dirs[0].impairment.set("delay_ms", "25").unwrap();
        let t = Instant::now();
        link.arrive(0, vec![1], t);
        assert!(link.release(t + Duration::from_millis(24)).is_none());
        assert!(link.release(t + Duration::from_millis(25)).is_some());
        assert_eq!(link.dirs[0].counters.delayed, 1);
    }

    #[test]
    fn jitter_never_reorders() {
        let mut link = Link::new(7, 10_000);
        link.dirs[0].impairment.set("delay_ms", "10").unwrap();
        link.dirs[0].impairment.set("jitter_ms", "9").unwrap();
        let t = Instant::now();
        for i in 0..1000 {
            link.arrive(0, vec![], t + Duration::from_micros(i * 50));
        }
        let got = drain(&mut link, t + Duration::from_secs(1));
        let order: Vec<u64> = got.iter().map(|x| x.1).collect();
        assert_eq!(order, (0..1000).collect::<Vec<_>>());
        assert_eq!(link.dirs[0].counters.overtaken, 0);
    }

    #[test]
    fn reorder_lets_later_frames_overtake() {
        let mut link = Link::new(3, 10_000);
        link.dirs[0].impairment.set("reorder", "10").unwrap();
        link.dirs[0].impairment.set("reorder_ms", "5").unwrap();
        let t = Instant::now();
        for i in 0..1000 {
            link.arrive(0, vec![], t + Duration::from_micros(i * 100));
        }
        let got = drain(&mut link, t + Duration::from_secs(1));
        assert_eq!(got.len(), 1000);
        let c = &link.dirs[0].counters;
        assert!(c.held_back > 50 && c.held_back < 150, "{c:?}");
        assert!(c.overtaken > 0 && c.overtaken <= c.held_back, "{c:?}");
    }

    #[test]
    fn loss_is_seeded_and_near_its_rate() {
        let run = |seed| {
            let mut link = Link::new(seed, 100_000);
            link.dirs[1].impairment.set("loss", "5").unwrap();
            let t = Instant::now();
            for _ in 0..20_000 {
                link.arrive(1, vec![], t);
            }
            link.dirs[1].counters.lost
        };
        let lost = run(42);
        assert_eq!(lost, run(42));
        assert!((800..1200).contains(&lost), "{lost}");
    }

    #[test]
    fn partition_drops_arrivals_and_frames_in_flight() {
        let mut link = Link::new(1, 100);
        link.dirs[0].impairment.set("delay_ms", "10").unwrap();
        let t = Instant::now();
        link.arrive(0, vec![], t);
        link.dirs[0].partitioned = true;
        link.arrive(0, vec![], t);
        assert!(drain(&mut link, t + Duration::from_secs(1)).is_empty());
        assert_eq!(link.dirs[0].counters.partitioned, 2);
        link.dirs[0].partitioned = false;
        link.arrive(0, vec![], t + Duration::from_secs(1));
        assert_eq!(drain(&mut link, t + Duration::from_secs(2)).len(), 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut link = Link::new(1, 3);
        link.dirs[0].impairment.set("delay_ms", "10").unwrap();
        let t = Instant::now();
        for _ in 0..5 {
            link.arrive(0, vec![], t);
        }
        assert_eq!(link.dirs[0].counters.overflow, 2);
        assert_eq!(link.queued(), 3);
    }

    #[test]
    fn settings_are_validated() {
        let mut imp = Impairment::default();
        assert!(imp.set("loss", "101").is_err());
        assert!(imp.set("loss", "-1").is_err());
        assert!(imp.set("loss", "x").is_err());
        assert!(imp.set("nope", "1").is_err());
        imp.set("loss", "1.5").unwrap();
        assert_eq!(imp.loss, 1.5);
    }
}
