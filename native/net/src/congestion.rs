//! Congestion control: quinn's BBR, with its window held to what the path's delay needs.
//!
//! BBR keeps a link fast under random loss, where loss-based controllers halve at every
//! lost packet. But quinn's BBR estimates bandwidth from the time between single
//! acknowledgements, and where acknowledgements come in batches (loopback, GRO, any busy
//! host) that estimate, and the window from it, run away: about 14 GB measured on
//! loopback. In-flight data is then bounded only by flow control, so megabytes of a bulk
//! transfer sit in the socket buffers ahead of everything else on the connection, and a
//! ping on another lane of the same link waits behind them.
//!
//! [`DelayBounded`] caps BBR's window at twice the bandwidth-delay product it measures
//! itself: acknowledged bytes over intervals of at least a round trip (and at least
//! [`MIN_RATE_INTERVAL`]), the highest of the last [`RATE_WINDOW`], times the lowest round
//! trip of the last [`MIN_RTT_WINDOW`]. That is BBR's own target window, measured so that
//! batching cannot inflate it. Like BBR it ignores loss. Where a standing queue builds, the
//! measured rate falls behind the window and the cap shrinks with it; where the path has
//! room, each interval's sample raises it, doubling per interval while the round trip
//! stays near its minimum.
//!
//! [`MIN_CAP`] is the floor, and on loopback (or any path whose round trip is shorter than
//! the hosts' own scheduling) it is the window: a trade of bulk throughput for the latency
//! of everything else on the link. On the 2-core development machine, `make bench` with
//! 64 KiB: ping p99 beside a 1 MiB bulk transfer 0.72-0.99 ms in 9 of 12 runs and
//! 1.06-1.57 ms in the rest (3.3-21 ms unbounded), 1 MiB throughput 381-630 MB/s (about
//! 740-870 MB/s unbounded); 128 KiB and 256 KiB in flight put the ping's p99 at 1.2-1.4
//! and 1.5-5.9 ms. On a path with a real round trip the bandwidth-delay product is
//! larger than the floor and sets the cap.
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The smallest cap (see the module's documentation for what it costs and buys).
pub(crate) const MIN_CAP: u64 = 64 * 1024;
/// A delivery-rate sample spans at least this, so that bursts of acknowledgements (a
/// receiver that runs once per scheduler slice) average out.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(1);
/// How long the highest rate sample counts: long enough to outlast an idle or
/// application-limited spell, and a few of a busy host's scheduling hiccups.
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// How long the lowest round trip counts, as BBR's own: a path that got slower (a
/// migration, a new route) is believed within this.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// BBR's window gain: room for one round trip of acknowledgements still on their way.
const CAP_GAIN: u64 = 2;

/// Builds a [`DelayBounded`] BBR per connection.
#[derive(Default)]
pub(crate) struct DelayBoundedConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for DelayBoundedConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(DelayBounded {
            bbr: self.bbr.clone().build(now, current_mtu),
            bound: WindowBound::new(),
        })
    }
}

/// BBR with its window capped by [`WindowBound`].
pub(crate) struct DelayBounded {
    bbr: Box<dyn Controller>,
    bound: WindowBound,
}

impl Controller for DelayBounded {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.bbr.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.bound.on_ack(now, sent, bytes);
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.bound.on_end_acks(now, app_limited);
        self.bbr
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.bbr
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.bbr.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        self.bbr.window().min(self.bound.cap())
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = self.bbr.metrics();
        metrics.congestion_window = self.window();
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(DelayBounded {
            bbr: self.bbr.clone_box(),
            bound: self.bound.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.bbr.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// The measured bandwidth-delay product, and the cap from it. Sans-IO: time comes in
/// with each call, and memory is fixed however the peer acknowledges.
#[derive(Clone, Debug)]
pub(crate) struct WindowBound {
    /// Start of the current delivery-rate interval and the bytes acknowledged in it.
    interval: Option<(Instant, u64)>,
    /// Highest delivery rate (bytes/s) of the last [`RATE_WINDOW`].
    rate: Windowed<u64>,
    /// Lowest round trip of the last [`MIN_RTT_WINDOW`].
    rtt: Windowed<Duration>,
    /// The cap as of the last batch of acknowledgements.
    cap: u64,
}

impl WindowBound {
    pub(crate) fn new() -> Self {
        WindowBound {
            interval: None,
            rate: Windowed::new(RATE_WINDOW, Ord::max),
            rtt: Windowed::new(MIN_RTT_WINDOW, Ord::min),
            cap: MIN_CAP,
        }
    }

    /// A packet sent at `sent` was acknowledged at `now`.
    pub(crate) fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.rtt.record(now, now.saturating_duration_since(sent));
        match &mut self.interval {
            Some((_, acked)) => *acked = acked.saturating_add(bytes),
            None => self.interval = Some((now, 0)),
        }
    }

    /// The end of a batch of acknowledgements: closes the rate interval once it spans
    /// a round trip. A sample taken while the sender had nothing to send counts only if
    /// it raises the estimate.
    pub(crate) fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        let Some((start, acked)) = self.interval else {
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < MIN_RATE_INTERVAL.max(self.rtt.get(now).unwrap_or_default()) {
            return;
        }
        self.interval = Some((now, 0));
        let rate = u64::try_from(u128::from(acked) * 1_000_000_000 / elapsed.as_nanos())
            .unwrap_or(u64::MAX);
        if !app_limited || self.rate.get(now).is_none_or(|max| rate > max) {
            self.rate.record(now, rate);
        }
        self.cap = match (self.rate.get(now), self.rtt.get(now)) {
            (Some(rate), Some(rtt)) => {
                let bdp = u128::from(rate) * rtt.as_nanos() / 1_000_000_000;
                u64::try_from(bdp * u128::from(CAP_GAIN))
                    .unwrap_or(u64::MAX)
                    .max(MIN_CAP)
            }
            _ => MIN_CAP,
        };
    }

    /// The most the window may be: [`CAP_GAIN`] times the bandwidth-delay product, and
    /// at least [`MIN_CAP`].
    pub(crate) fn cap(&self) -> u64 {
        self.cap
    }
}

/// The extreme (least or greatest) of samples over a sliding window, kept as two halves
/// so that memory stays fixed: it reports samples up to a window old, and at least those
/// of the last half window.
#[derive(Clone, Debug)]
struct Windowed<T> {
    window: Duration,
    /// `Ord::min` or `Ord::max`.
    pick: fn(T, T) -> T,
    /// When the current half started, and its extreme.
    current: Option<(Instant, T)>,
    /// The same for the half before it.
    previous: Option<(Instant, T)>,
}

impl<T: Copy> Windowed<T> {
    fn new(window: Duration, pick: fn(T, T) -> T) -> Self {
        Windowed {
            window,
            pick,
            current: None,
            previous: None,
        }
    }

    fn record(&mut self, now: Instant, sample: T) {
        self.current = match self.current {
            Some((started, extreme))
                if now.saturating_duration_since(started) < self.window / 2 =>
            {
                Some((started, (self.pick)(extreme, sample)))
            }
            ended => {
                self.previous = ended;
                Some((now, sample))
            }
        };
    }

    /// The extreme of the samples of the last window; `None` if there are none.
    fn get(&self, now: Instant) -> Option<T> {
        let live = |half: Option<(Instant, T)>| {
            half.filter(|&(started, _)| now.saturating_duration_since(started) < self.window)
                .map(|(_, extreme)| extreme)
        };
        match (live(self.current), live(self.previous)) {
            (Some(current), Some(previous)) => Some((self.pick)(current, previous)),
            (current, previous) => current.or(previous),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const PACKET: u64 = 1200;

    /// An ack-clocked sender that keeps up to the cap in flight over a path of a fixed
    /// round trip whose bottleneck moves `rate` bytes/s, acknowledgements arriving in
    /// batches every `batch`. Runs from `now` for `run`; returns the time it ended.
    fn drive(
        bound: &mut WindowBound,
        mut now: Instant,
        (rtt, rate, batch): (Duration, u64, Duration),
        run: Duration,
    ) -> Instant {
        let end = now + run;
        let per_packet = Duration::from_nanos(PACKET * 1_000_000_000 / rate);
        let mut unacked: VecDeque<(Instant, Instant)> = VecDeque::new();
        let mut bottleneck_free = now;
        while now < end {
            while (unacked.len() as u64 + 1) * PACKET <= bound.cap() {
                bottleneck_free = bottleneck_free.max(now) + per_packet;
                unacked.push_back((bottleneck_free + rtt, now));
            }
            let next_ack = unacked.front().map_or(now, |&(at, _)| at);
            now = (now + batch).max(next_ack);
            while let Some(&(at, sent)) = unacked.front() {
                if at > now {
                    break;
                }
                unacked.pop_front();
                bound.on_ack(now, sent, PACKET);
            }
            bound.on_end_acks(now, false);
        }
        now
    }

    fn assert_near(cap: u64, expected: u64) {
        assert!(
            cap * 10 >= expected * 9 && cap * 10 <= expected * 11,
            "cap {cap}, expected about {expected}"
        );
    }

    #[test]
    fn with_nothing_measured_the_cap_is_the_floor() {
        assert_eq!(WindowBound::new().cap(), MIN_CAP);
    }

    #[test]
    fn the_cap_is_twice_the_measured_bandwidth_delay_product() {
        let mut bound = WindowBound::new();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(50);
        // 10 MB/s acknowledged over 50 ms intervals, each packet after 50 ms.
        let mut now = t0;
        for _ in 0..20 {
            now += rtt;
            bound.on_ack(now, now - rtt, 500_000);
            bound.on_end_acks(now, false);
        }
        let cap = bound.cap();
        assert!((950_000..=1_050_000).contains(&cap), "cap {cap}");
    }

    #[test]
    fn an_application_limited_sample_does_not_lower_the_estimate() {
        let mut bound = WindowBound::new();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut now = t0;
        for _ in 0..10 {
            now += rtt;
            bound.on_ack(now, now - rtt, 100_000);
            bound.on_end_acks(now, false);
        }
        let busy = bound.cap();
        for _ in 0..10 {
            now += rtt;
            bound.on_ack(now, now - rtt, 1_000);
            bound.on_end_acks(now, true);
        }
        assert_eq!(bound.cap(), busy);
    }

    #[test]
    fn a_rate_older_than_its_window_no_longer_counts() {
        let mut bound = WindowBound::new();
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        let mut now = t0;
        for _ in 0..10 {
            now += rtt;
            bound.on_ack(now, now - rtt, 1_000_000);
            bound.on_end_acks(now, false);
        }
        let fast = bound.cap();
        for _ in 0..300 {
            now += rtt;
            bound.on_ack(now, now - rtt, 10_000);
            bound.on_end_acks(now, false);
        }
        assert!(bound.cap() < fast / 10, "{} against {fast}", bound.cap());
    }

    const WIDE: (Duration, u64, Duration) = (
        Duration::from_millis(50),
        100_000_000,
        Duration::from_millis(1),
    );

    #[test]
    fn after_a_silence_longer_than_the_window_old_rates_are_forgotten() {
        let mut bound = WindowBound::new();
        let rtt = Duration::from_millis(10);
        let mut now = Instant::now();
        for _ in 0..10 {
            now += rtt;
            bound.on_ack(now, now - rtt, 1_000_000);
            bound.on_end_acks(now, false);
        }
        let fast = bound.cap();
        now += RATE_WINDOW * 2;
        for _ in 0..3 {
            now += rtt;
            bound.on_ack(now, now - rtt, 10_000);
            bound.on_end_acks(now, false);
        }
        assert!(bound.cap() < fast / 10, "{} against {fast}", bound.cap());
    }

    #[test]
    fn the_cap_grows_from_the_floor_to_a_wide_path_s_product() {
        let mut bound = WindowBound::new();
        // 100 MB/s at 50 ms: 5 MB fill the path.
        drive(&mut bound, Instant::now(), WIDE, Duration::from_secs(3));
        assert_near(bound.cap(), 2 * 5_000_000);
    }

    #[test]
    fn when_the_path_slows_the_cap_follows_within_the_rate_window() {
        let mut bound = WindowBound::new();
        let now = drive(&mut bound, Instant::now(), WIDE, Duration::from_secs(3));
        let slower = (WIDE.0, 10_000_000, WIDE.2);
        drive(
            &mut bound,
            now,
            slower,
            RATE_WINDOW + Duration::from_secs(1),
        );
        assert_near(bound.cap(), 2 * 500_000);
    }

    #[test]
    fn a_path_faster_than_its_round_trip_needs_stays_at_the_floor() {
        let mut bound = WindowBound::new();
        // 1 GB/s at 20 µs, acknowledged every 10 µs: 30 KB fill the path.
        let loopback = (
            Duration::from_micros(20),
            1_000_000_000,
            Duration::from_micros(10),
        );
        drive(&mut bound, Instant::now(), loopback, Duration::from_secs(1));
        assert_eq!(bound.cap(), MIN_CAP);
    }
}
