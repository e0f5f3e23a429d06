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
//! [`MIN_RATE_INTERVAL`]), the highest over [`RATE_WINDOW`] of samples, times the lowest
//! round trip over [`MIN_RTT_WINDOW`] of samples (estimates age only as new samples come,
//! so an idle link starts its next burst from what it measured). That is BBR's own
//! target window, measured so that batching cannot inflate it, and like BBR it ignores
//! loss. A flow's own queue stays within about one bandwidth-delay product; where the
//! path has room, each interval's sample raises the cap, doubling per interval while the
//! round trip stays near its minimum. There is no probing above the cap: if a path's
//! round trip grows to more than twice its minimum (a new route, a queue of other
//! traffic), the cap shrinks towards the floor until the old minimum ages out, within
//! [`MIN_RTT_WINDOW`] of samples.
//!
//! The cap has a floor, and on loopback (or any path whose round trip is shorter than
//! the hosts' own scheduling) the floor is the window. Which floor depends on whether the
//! link's lanes share it ([`LaneSharing`]):
//!
//! - While two lanes take turns and the link carries large messages (one of at least
//!   [`LARGE_MESSAGE`] queued within [`SHARED_FOR`], or not yet acknowledged),
//!   [`SHARED_BESIDE_LARGE_MIN_CAP`] (24 KiB): a ping on one waits behind at most that
//!   much of a bulk transfer on another. On the 2-core development machine, `make
//!   bench`'s steps for trust alone in alternating runs: ping p99 beside a 1 MiB bulk
//!   transfer 466-536 µs in four runs (bulk 241-288 MB/s meanwhile), against 743-2863 µs
//!   with 64 KiB (bulk 350-453 MB/s); 16 KiB gave 302-555 µs in eight runs (172-257
//!   MB/s), 32 KiB 695-729 µs in four (283-306 MB/s; with 32 KiB for every shared link,
//!   1.0 and 1.5 ms in 2 of 11 earlier runs). Earlier, with 64 KiB: 0.70-0.99 ms in 10
//!   of 14 full runs and 1.02-1.57 ms in the rest (3.3-21 ms unbounded); 128, 256 or
//!   512 KiB gave 1.2-1.4, 1.5-5.9 and 3.9-11 ms.
//! - While lanes take turns with small messages only, [`SHARED_MIN_CAP`] (64 KiB):
//!   nothing large is queued for a ping to wait behind, and four senders of 100-byte
//!   messages moved about a tenth more than under 32 KiB (412-451k messages/s against
//!   368-389k, four alternating runs each). Several bulk transfers on different lanes
//!   keep a link shared beside large messages: together they move about what one
//!   moves beside a ping (241-288 MB/s on loopback here), less than one alone.
//! - While one lane has the link to itself, nothing waits behind its queue but its own
//!   later data, so it may keep more in flight: about [`ALONE_QUEUE_TIME`] of its highest
//!   measured rate, between [`SHARED_MIN_CAP`] and [`ALONE_MIN_CAP`] (512 KiB). On loopback
//!   that is 512 KiB, and 1 MiB messages moved 661-844 MB/s, 0.81-1.09x the bare
//!   transport, against 381-630 MB/s (0.57-0.87x) with 64 KiB for all traffic (`make
//!   bench`, five full runs each). The first packet of another lane then waits behind
//!   about a millisecond of the transfer, and from it on the link counts as shared for
//!   [`SHARED_FOR`].
//!
//! On a path with a real round trip the bandwidth-delay product is larger than either
//! floor and sets the cap.
use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// The smallest cap while the link's lanes share it with small messages only; while one
/// lane has it to itself, what the link moves in [`ALONE_QUEUE_TIME`] at its highest
/// measured rate, between this and [`ALONE_MIN_CAP`] (see the module's documentation
/// for what each costs and buys).
pub(crate) const SHARED_MIN_CAP: u64 = 64 * 1024;
/// The smallest cap while the link's lanes share it and it carries large messages: what
/// a ping waits behind. Packets are at most quinn's default UDP payload (1472 bytes), so
/// this is 16 of them; a much larger payload would make it stop-and-wait.
pub(crate) const SHARED_BESIDE_LARGE_MIN_CAP: u64 = 24 * 1024;
/// A frame (message and distribution header) of at least this many bytes is a large
/// message, a bulk transfer's, for the window, as for the lanes (whose senders move off
/// a lane that carries another process's).
pub(crate) const LARGE_MESSAGE: usize = trust_dist_proto::lanes::BULK_MESSAGE;
const ALONE_MIN_CAP: u64 = 512 * 1024;
const ALONE_QUEUE_TIME: Duration = Duration::from_millis(1);
/// How long after data last went out on a lane other than the one before the link
/// counts as shared: a request/reply pattern of other processes (a `gen_server:call`
/// every few tens of ms beside a transfer) keeps it so.
const SHARED_FOR: Duration = Duration::from_millis(100);
/// A delivery-rate sample spans at least this, so that bursts of acknowledgements (a
/// receiver that runs once per scheduler slice) average out.
const MIN_RATE_INTERVAL: Duration = Duration::from_millis(1);
/// Over how much time of samples the highest rate counts: long enough to outlast a few
/// of a busy host's scheduling hiccups (samples taken while the sender had too little to
/// send count only when they raise it).
const RATE_WINDOW: Duration = Duration::from_secs(2);
/// Over how much time of samples the lowest round trip counts, as BBR's own: a path
/// that got slower (a migration, a new route) is believed within this.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// BBR's window gain: room for one round trip of acknowledgements still on their way.
const CAP_GAIN: u64 = 2;

/// Whether a connection's lanes share it: its writers report each write, its congestion
/// controller asks. One per connection; lock-free, as both run per packet or batch.
#[derive(Debug)]
pub(crate) struct LaneSharing {
    epoch: Instant,
    /// The lane written last (`usize::MAX` before the first write).
    last_lane: AtomicUsize,
    /// Until when (ns since `epoch`) the link counts as shared.
    shared_until: AtomicU64,
    /// Until when (ns since `epoch`) the link counts as carrying large messages.
    large_until: AtomicU64,
    /// Bytes of large messages queued that as many acknowledged bytes have not yet
    /// matched: a message that takes longer than [`SHARED_FOR`] to send counts until it
    /// is through (small messages acknowledged meanwhile count too; an approximation).
    large_unacked: AtomicU64,
}

impl LaneSharing {
    pub(crate) fn new() -> Self {
        LaneSharing {
            epoch: Instant::now(),
            last_lane: AtomicUsize::new(usize::MAX),
            shared_until: AtomicU64::new(0),
            large_until: AtomicU64::new(0),
            large_unacked: AtomicU64::new(0),
        }
    }

    /// `bytes` of large messages (each at least [`LARGE_MESSAGE`]) were queued at `now`:
    /// a shared link keeps the narrower floor until as many bytes have been acknowledged,
    /// and for [`SHARED_FOR`] after they were queued.
    pub(crate) fn queued_large_messages(&self, bytes: usize, now: Instant) {
        let until = self.since_epoch(now).saturating_add(nanos(SHARED_FOR));
        self.large_until.fetch_max(until, Ordering::Relaxed);
        self.large_unacked
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The peer acknowledged `bytes` of packets.
    fn acknowledged(&self, bytes: u64) {
        // Most links carry no large message: no write per acknowledgement for them.
        if self.large_unacked.load(Ordering::Relaxed) > 0 {
            let _ = self
                .large_unacked
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                    Some(left.saturating_sub(bytes))
                });
        }
    }

    /// Data went out on `lane` at `now`. A write on another lane than the last (the
    /// first write included: a link starts as shared) makes the link shared for
    /// [`SHARED_FOR`].
    pub(crate) fn wrote(&self, lane: usize, now: Instant) {
        if self.last_lane.swap(lane, Ordering::Relaxed) != lane {
            let until = self.since_epoch(now).saturating_add(nanos(SHARED_FOR));
            self.shared_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    fn shared_at(&self, now: Instant) -> bool {
        self.since_epoch(now) < self.shared_until.load(Ordering::Relaxed)
    }

    /// Whether a large message was queued within [`SHARED_FOR`] of `now`, or its bytes
    /// are not yet matched by acknowledged ones.
    pub(crate) fn carries_large_messages_at(&self, now: Instant) -> bool {
        self.large_unacked.load(Ordering::Relaxed) > 0
            || self.since_epoch(now) < self.large_until.load(Ordering::Relaxed)
    }

    /// The floor while the link is shared at `now`; `None` while one lane has it.
    fn shared_floor_at(&self, now: Instant) -> Option<u64> {
        if !self.shared_at(now) {
            None
        } else if self.carries_large_messages_at(now) {
            Some(SHARED_BESIDE_LARGE_MIN_CAP)
        } else {
            Some(SHARED_MIN_CAP)
        }
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Builds a [`DelayBounded`] BBR for one connection (quinn builds one per path).
pub(crate) struct DelayBoundedConfig {
    bbr: Arc<BbrConfig>,
    sharing: Arc<LaneSharing>,
}

impl DelayBoundedConfig {
    pub(crate) fn new(sharing: Arc<LaneSharing>) -> Self {
        DelayBoundedConfig {
            bbr: Arc::default(),
            sharing,
        }
    }
}

impl ControllerFactory for DelayBoundedConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let bbr = self.bbr.clone().build(now, current_mtu);
        let bound = WindowBound::new(bbr.initial_window());
        Box::new(DelayBounded {
            bbr,
            bound,
            sharing: self.sharing.clone(),
            shared_floor: Some(SHARED_MIN_CAP),
        })
    }
}

/// BBR with its window capped by [`WindowBound`], over the floor that [`LaneSharing`]
/// says applies.
struct DelayBounded {
    bbr: Box<dyn Controller>,
    bound: WindowBound,
    sharing: Arc<LaneSharing>,
    /// The shared floor as of the last packet sent or batch acknowledged, `None` if the
    /// link was not shared then (`window` is not told the time).
    shared_floor: Option<u64>,
}

impl DelayBounded {
    fn floor(&self) -> u64 {
        self.shared_floor.unwrap_or(self.bound.alone_floor)
    }
}

impl Controller for DelayBounded {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.shared_floor = self.sharing.shared_floor_at(now);
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
        self.sharing.acknowledged(bytes);
        self.bbr.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.shared_floor = self.sharing.shared_floor_at(now);
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
        self.bbr.window().min(self.bound.cap(self.floor()))
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
            sharing: self.sharing.clone(),
            shared_floor: self.shared_floor,
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
struct WindowBound {
    /// Start of the current delivery-rate interval and the bytes acknowledged in it.
    interval: Option<(Instant, u64)>,
    /// Highest delivery rate (bytes/s) of the last [`RATE_WINDOW`].
    rate: Windowed<u64>,
    /// Lowest round trip of the last [`MIN_RTT_WINDOW`].
    rtt: Windowed<Duration>,
    /// The cap as of the last batch of acknowledgements, before the floor.
    cap: u64,
    /// The floor while one lane has the link to itself, as of the same batch.
    alone_floor: u64,
}

impl WindowBound {
    /// `initial` is the cap until the first measurement: the controller's own initial
    /// window, so that a connection starts as BBR alone would.
    fn new(initial: u64) -> Self {
        WindowBound {
            interval: None,
            rate: Windowed::new(RATE_WINDOW, Ord::max),
            rtt: Windowed::new(MIN_RTT_WINDOW, Ord::min),
            cap: initial,
            alone_floor: SHARED_MIN_CAP,
        }
    }

    /// A packet sent at `sent` was acknowledged at `now`.
    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.rtt.record(now, now.saturating_duration_since(sent));
        if let Some((_, acked)) = &mut self.interval {
            *acked = acked.saturating_add(bytes);
        }
    }

    /// The end of a batch of acknowledgements: closes the rate interval once it spans
    /// a round trip. A sample taken while the sender had nothing to send counts only if
    /// it raises the estimate.
    fn on_end_acks(&mut self, now: Instant, app_limited: bool) {
        // The first interval starts after the first batch, whose bytes were sent before
        // any interval could time them.
        let Some((start, acked)) = self.interval else {
            self.interval = Some((now, 0));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < MIN_RATE_INTERVAL.max(self.rtt.get().unwrap_or_default()) {
            return;
        }
        self.interval = Some((now, 0));
        let rate = u64::try_from(u128::from(acked) * 1_000_000_000 / elapsed.as_nanos())
            .unwrap_or(u64::MAX);
        if !app_limited || self.rate.get().is_none_or(|max| rate > max) {
            self.rate.record(now, rate);
        }
        let Some(rate) = self.rate.get() else {
            return;
        };
        let queue = u128::from(rate) * ALONE_QUEUE_TIME.as_nanos() / 1_000_000_000;
        self.alone_floor = u64::try_from(queue)
            .unwrap_or(u64::MAX)
            .clamp(SHARED_MIN_CAP, ALONE_MIN_CAP);
        if let Some(rtt) = self.rtt.get() {
            let bdp = u128::from(rate) * rtt.as_nanos() / 1_000_000_000;
            self.cap = u64::try_from(bdp * u128::from(CAP_GAIN)).unwrap_or(u64::MAX);
        }
    }

    /// The most the window may be: [`CAP_GAIN`] times the bandwidth-delay product, and
    /// at least `floor`.
    fn cap(&self, floor: u64) -> u64 {
        self.cap.max(floor)
    }
}

/// The extreme (least or greatest) of samples over a sliding window, kept as two halves
/// so that memory stays fixed. Samples age only as newer ones come: a half is dropped
/// once two newer halves have started, so the extreme covers at least the last half
/// window of samples and at most the last whole one, however long the link was idle
/// in between (as BBR's filters, which count round trips, outlast an idle spell).
#[derive(Clone, Debug)]
struct Windowed<T> {
    window: Duration,
    /// `Ord::min` or `Ord::max`.
    pick: fn(T, T) -> T,
    /// When the current half started, and its extreme.
    current: Option<(Instant, T)>,
    /// The extreme of the half before it.
    previous: Option<T>,
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
                self.previous = ended.map(|(_, extreme)| extreme);
                Some((now, sample))
            }
        };
    }

    /// The extreme of the samples it covers; `None` before the first.
    fn get(&self) -> Option<T> {
        match (self.current, self.previous) {
            (Some((_, current)), Some(previous)) => Some((self.pick)(current, previous)),
            (current, previous) => current.map(|(_, extreme)| extreme).or(previous),
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
            while (unacked.len() as u64 + 1) * PACKET <= bound.cap(SHARED_MIN_CAP) {
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

    /// `rounds` batches one `rtt` apart, each acknowledging `bytes` sent one `rtt`
    /// before; returns the time of the last.
    fn steady(
        bound: &mut WindowBound,
        mut now: Instant,
        (rtt, bytes, rounds): (Duration, u64, u64),
        app_limited: bool,
    ) -> Instant {
        for _ in 0..rounds {
            now += rtt;
            bound.on_ack(now, now - rtt, bytes);
            bound.on_end_acks(now, app_limited);
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
    fn the_cap_is_twice_the_measured_bandwidth_delay_product() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        // 10 MB/s acknowledged over 50 ms intervals, each packet after 50 ms.
        let rtt = Duration::from_millis(50);
        steady(&mut bound, Instant::now(), (rtt, 500_000, 20), false);
        let cap = bound.cap(SHARED_MIN_CAP);
        assert!((950_000..=1_050_000).contains(&cap), "cap {cap}");
    }

    #[test]
    fn an_application_limited_sample_does_not_lower_the_estimate() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        let rtt = Duration::from_millis(10);
        let now = steady(&mut bound, Instant::now(), (rtt, 100_000, 10), false);
        let busy = bound.cap(SHARED_MIN_CAP);
        // Longer than the rate's window: recorded, these would replace the busy rate.
        let rounds = RATE_WINDOW.as_millis() as u64 / 10 + 10;
        steady(&mut bound, now, (rtt, 1_000, rounds), true);
        assert_eq!(bound.cap(SHARED_MIN_CAP), busy);
    }

    #[test]
    fn a_rate_older_than_its_window_no_longer_counts() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        let rtt = Duration::from_millis(10);
        let now = steady(&mut bound, Instant::now(), (rtt, 1_000_000, 10), false);
        let fast = bound.cap(SHARED_MIN_CAP);
        steady(&mut bound, now, (rtt, 10_000, 300), false);
        assert!(
            bound.cap(SHARED_MIN_CAP) < fast / 10,
            "{} against {fast}",
            bound.cap(SHARED_MIN_CAP)
        );
    }

    const WIDE: (Duration, u64, Duration) = (
        Duration::from_millis(50),
        100_000_000,
        Duration::from_millis(1),
    );

    #[test]
    fn an_idle_spell_keeps_the_estimate_until_newer_samples_replace_it() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        let rtt = Duration::from_millis(10);
        let now = steady(&mut bound, Instant::now(), (rtt, 1_000_000, 10), false);
        let fast = bound.cap(SHARED_MIN_CAP);
        // A minute without traffic, then a burst at a hundredth of the rate: the burst
        // starts from what was measured before.
        let later = now + Duration::from_secs(60);
        let now = steady(&mut bound, later, (rtt, 10_000, 3), false);
        assert_eq!(bound.cap(SHARED_MIN_CAP), fast);
        // A whole window of the slower rate replaces it.
        let rounds = RATE_WINDOW.as_millis() as u64 / 10 + 1;
        steady(&mut bound, now, (rtt, 10_000, rounds), false);
        assert!(
            bound.cap(SHARED_MIN_CAP) < fast / 10,
            "{} against {fast}",
            bound.cap(SHARED_MIN_CAP)
        );
    }

    #[test]
    fn the_cap_starts_at_the_controller_s_initial_window() {
        assert_eq!(WindowBound::new(240_000).cap(SHARED_MIN_CAP), 240_000);
        assert_eq!(WindowBound::new(1_000).cap(SHARED_MIN_CAP), SHARED_MIN_CAP);
    }

    #[test]
    fn the_cap_grows_from_the_floor_to_a_wide_path_s_product() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        // 100 MB/s at 50 ms: 5 MB fill the path.
        drive(&mut bound, Instant::now(), WIDE, Duration::from_secs(3));
        assert_near(bound.cap(SHARED_MIN_CAP), 2 * 5_000_000);
    }

    #[test]
    fn when_the_path_slows_the_cap_follows_within_the_rate_window() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        let now = drive(&mut bound, Instant::now(), WIDE, Duration::from_secs(3));
        let slower = (WIDE.0, 10_000_000, WIDE.2);
        drive(
            &mut bound,
            now,
            slower,
            RATE_WINDOW + Duration::from_secs(1),
        );
        assert_near(bound.cap(SHARED_MIN_CAP), 2 * 500_000);
    }

    #[test]
    fn a_path_faster_than_its_round_trip_needs_stays_at_the_floor() {
        let mut bound = WindowBound::new(SHARED_MIN_CAP);
        // 1 GB/s at 20 µs, acknowledged every 10 µs: 30 KB fill the path.
        let loopback = (
            Duration::from_micros(20),
            1_000_000_000,
            Duration::from_micros(10),
        );
        drive(&mut bound, Instant::now(), loopback, Duration::from_secs(1));
        assert_eq!(bound.cap(SHARED_MIN_CAP), SHARED_MIN_CAP);
    }

    #[test]
    fn a_link_is_shared_from_a_write_on_another_lane_until_that_is_as_old_as_shared_for() {
        let sharing = LaneSharing::new();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(!sharing.shared_at(t0), "shared before any write");
        // The first write counts as a change of lane: a link starts shared.
        sharing.wrote(3, t0);
        assert!(sharing.shared_at(t0 + SHARED_FOR - ms(1)));
        // More on the same lane does not extend it.
        sharing.wrote(3, t0 + ms(50));
        assert!(!sharing.shared_at(t0 + SHARED_FOR));
        // Another lane does, and so does the first lane's next write after it.
        sharing.wrote(7, t0 + ms(200));
        sharing.wrote(3, t0 + ms(250));
        assert!(sharing.shared_at(t0 + ms(250) + SHARED_FOR - ms(1)));
        assert!(!sharing.shared_at(t0 + ms(250) + SHARED_FOR));
    }

    /// Acknowledgements at `rate` bytes/s, each packet after `rtt`, batches 1 ms apart.
    fn measured(rate: u64, rtt: Duration) -> WindowBound {
        let mut bound = WindowBound::new(0);
        let mut now = Instant::now();
        for _ in 0..20 {
            now += Duration::from_millis(1);
            bound.on_ack(now, now - rtt, rate / 1000);
            bound.on_end_acks(now, false);
        }
        bound
    }

    #[test]
    fn a_lane_alone_may_queue_about_a_millisecond_of_the_link_s_rate() {
        let rtt = Duration::from_micros(10);
        assert_eq!(measured(1_000_000_000, rtt).alone_floor, ALONE_MIN_CAP);
        assert_near(measured(300_000_000, rtt).alone_floor, 300_000);
        // 100 Mbit/s: a millisecond is less than the shared floor.
        assert_eq!(measured(12_500_000, rtt).alone_floor, SHARED_MIN_CAP);
        assert_eq!(WindowBound::new(0).alone_floor, SHARED_MIN_CAP);
    }

    /// A controller that measured 1 GB/s at 10 µs: the product is below every floor, so
    /// a floor caps BBR's window.
    fn controller_on_a_fast_short_path(sharing: &Arc<LaneSharing>, t0: Instant) -> DelayBounded {
        let controller = DelayBounded {
            bbr: Arc::new(BbrConfig::default()).build(t0, 1200),
            bound: measured(1_000_000_000, Duration::from_micros(10)),
            sharing: sharing.clone(),
            shared_floor: None,
        };
        assert!(controller.bound.cap < SHARED_BESIDE_LARGE_MIN_CAP);
        controller
    }

    #[test]
    fn the_window_is_held_to_the_narrow_floor_while_the_link_is_shared() {
        let sharing = Arc::new(LaneSharing::new());
        let t0 = Instant::now();
        let mut controller = controller_on_a_fast_short_path(&sharing, t0);
        let bbr_window = controller.bbr.window();
        assert!((SHARED_MIN_CAP + 1..ALONE_MIN_CAP).contains(&bbr_window));
        controller.on_sent(t0, 1200, 1);
        assert_eq!(controller.window(), bbr_window);
        sharing.wrote(1, t0);
        controller.on_sent(t0, 1200, 2);
        assert_eq!(controller.window(), SHARED_MIN_CAP);
        controller.on_end_acks(t0 + SHARED_FOR, 0, false, None);
        assert_eq!(controller.window(), bbr_window);
    }

    #[test]
    fn a_large_message_narrows_the_shared_floor_for_a_while() {
        let sharing = Arc::new(LaneSharing::new());
        let t0 = Instant::now();
        let mut controller = controller_on_a_fast_short_path(&sharing, t0);
        let bbr_window = controller.bbr.window();
        sharing.wrote(1, t0);
        // Alone (the same lane, SHARED_FOR later), a large message changes nothing:
        // nothing waits behind it.
        let t1 = t0 + SHARED_FOR;
        sharing.wrote(1, t1);
        sharing.queued_large_messages(LARGE_MESSAGE, t1);
        controller.on_sent(t1, 1200, 1);
        assert_eq!(controller.window(), bbr_window);
        // Shared beside large messages: the narrow floor.
        sharing.wrote(2, t1);
        controller.on_sent(t1, 1200, 2);
        assert_eq!(controller.window(), SHARED_BESIDE_LARGE_MIN_CAP);
        // SHARED_FOR later and still shared: the message counts until acknowledged...
        let later = t1 + SHARED_FOR;
        sharing.wrote(3, later);
        controller.on_sent(later, 1200, 3);
        assert_eq!(controller.window(), SHARED_BESIDE_LARGE_MIN_CAP);
        sharing.acknowledged(LARGE_MESSAGE as u64 - 1);
        controller.on_sent(later, 1200, 4);
        assert_eq!(controller.window(), SHARED_BESIDE_LARGE_MIN_CAP);
        // ...and then no longer: the wider shared floor.
        sharing.acknowledged(1200);
        controller.on_sent(later, 1200, 5);
        assert_eq!(controller.window(), SHARED_MIN_CAP);
        sharing.queued_large_messages(LARGE_MESSAGE, later);
        controller.on_end_acks(later, 0, false, None);
        assert_eq!(controller.window(), SHARED_BESIDE_LARGE_MIN_CAP);
    }
}
