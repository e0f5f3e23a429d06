//! One verified peer connection: the identity exchange, the reader and writer tasks, flow
//! control in both directions and per-link counters.
//!
//! Streams: the connecting side opens one bidirectional stream that carries, in order,
//! the hello (certificate) frames, the distribution handshake and then the distribution
//! packets of lane 0, each as a length-prefixed frame. Once the data phase starts, each
//! side spreads its packets over [`LANES`] lanes by sending process (see
//! `trust_dist_proto::lanes`): lane 0 is that first stream, lanes 1.. are unidirectional
//! streams opened on first use. Each side also opens one unidirectional stream on which
//! it writes one byte per tick, so liveness never waits behind bulk data. Every
//! unidirectional stream starts with one byte that says which it is.

use crate::congestion::{LaneSharing, LARGE_MESSAGE};
use crate::frames::{Frames, Piece};
use crate::{runtime, tls, unix_now, Acceptor, CarrierShared};
use bytes::Bytes;
use std::any::Any;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use trust_dist_proto::copies;
use trust_dist_proto::filter::{Counters, Decision, LinkFilter, NodeId, Verdict};
use trust_dist_proto::frame::{self, BodyBuffer, FrameDecoder};
use trust_dist_proto::handshake::{self, FrameBudget, NameGuard, Side, MAX_HANDSHAKE_FRAME};
use trust_dist_proto::lanes::{self, Lane, LANES};
use trust_dist_proto::link::LinkMode;
use trust_dist_proto::CertificateBody;

/// QUIC application error codes used when closing a link.
const CLOSE_NORMAL: u32 = 0;
const CLOSE_REFUSED: u32 = 1;
const CLOSE_PROTOCOL: u32 = 2;
/// Most bytes read from the stream in one go.
const READ_CHUNK: usize = 256 * 1024;
/// Bytes read ahead of the VM while the distribution handshake runs.
const PRE_START_BUFFER: usize = 64 * 1024;
/// How long a graceful close waits for the peer to acknowledge what was sent.
pub const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);
/// About the most bytes handed to the VM in one message (the most packets is
/// `Settings::batch_packets`): a batch is built on the transport's one thread, and a
/// smaller one lets other lanes' work run in between.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Bytes queued on one lane above which the processes sending on it are paused (the
/// layer above suspends them, as a busy connection would), and below which they resume.
/// Other lanes, and the processes on them, go on meanwhile.
const LANE_HIGH_WATER: usize = 4 * 1024 * 1024;
const LANE_LOW_WATER: usize = 1024 * 1024;
/// Bytes a lane's reader holds, read from QUIC but not yet handed to the VM, before it
/// stops reading (QUIC's per-stream flow control then holds that stream back alone); and
/// the most all lanes of a link hold together, beyond which only a lane holding nothing
/// reads, it and the lane furthest into a frame (so frames still complete and every lane
/// moves, and a peer that opens every lane cannot multiply what it parks here).
const LANE_READ_AHEAD: usize = 1024 * 1024;
const LINK_READ_AHEAD: usize = 4 * 1024 * 1024;
/// The most a link's lanes hold together in packet buffers allocated at a length the peer
/// announced, for frames still arriving. Such a frame is copied into its buffer as it
/// comes; past this, frames are gathered in memory that grows with what arrived, and
/// moved into a packet buffer (not counted here) once half of them has come.
pub(crate) const RESERVED_AHEAD: usize = LINK_READ_AHEAD;
/// Bytes a lane with nothing outstanding may hand to the VM even when the link's total
/// credit is used up by other lanes, so a quiet process is never stuck behind bulk ones.
const IDLE_LANE_ALLOWANCE: usize = 64 * 1024;

/// What the transport tells the layer above about one link. Each call returns false when
/// nobody is listening any more, which closes the link.
pub trait LinkEvents: Send + Sync + 'static {
    /// One distribution-handshake frame, in answer to [`Link::request_handshake_frame`].
    fn handshake_frame(&self, frame: Vec<u8>) -> bool;
    /// Distribution packets in order; their bytes are owed back through [`Link::ack`].
    fn packets(&self, packets: Vec<Packet>) -> bool;
    /// Memory for a received packet of `len` bytes, which the transport fills and later
    /// hands to [`LinkEvents::packets`]: a packet is copied once, out of QUIC's buffers
    /// into this, so memory the layer above can take over as it is saves it a copy.
    /// `None` (out of memory) ends the link.
    fn packet_buffer(&self, len: usize) -> Option<Packet> {
        Some(Box::new(vec![0u8; len]))
    }
    /// The send queue drained below its low-water mark after [`Link::send`] said busy.
    fn writable(&self) -> bool;
    /// The link is gone; `reason` says why.
    fn closed(&self, reason: &str);
    /// The lane of these paused processes (see [`Sent::pause`]) drained below its
    /// low-water mark: they may go on.
    fn resume(&self, pids: Vec<Vec<u8>>) -> bool {
        let _ = pids;
        true
    }
}

/// A received packet's bytes, in memory from [`LinkEvents::packet_buffer`].
pub trait PacketBuffer: Send + 'static {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// For the layer above to take back the memory it gave.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

pub type Packet = Box<dyn PacketBuffer>;

impl BodyBuffer for Packet {
    fn bytes(&self) -> &[u8] {
        PacketBuffer::bytes(&**self)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        PacketBuffer::bytes_mut(&mut **self)
    }
}

/// A frame of the peer's: a slice of a received chunk, or already in a packet buffer.
type Frame = frame::Frame<Packet>;
type Decoded = frame::Decoded<Packet>;

impl PacketBuffer for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// One refused packet from a lower tier, for the log.
#[derive(Debug, Clone)]
pub struct DenialReport {
    pub peer: String,
    pub tier: String,
    pub op: &'static str,
    pub reason: &'static str,
    /// `dropped`, `answered`, `closed` or `audited` (delivered anyway).
    pub outcome: &'static str,
    pub detail: String,
    /// Refusals on this link not reported since the previous report.
    pub suppressed: u64,
}

impl std::fmt::Display for DenialReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "refused {} from {} (tier {}): {} ({}), {}",
            self.op, self.peer, self.tier, self.reason, self.detail, self.outcome
        )?;
        if self.suppressed > 0 {
            write!(f, "; {} earlier refusals not logged", self.suppressed)?;
        }
        Ok(())
    }
}

/// Reports per link and window, beyond which refusals are only counted.
const DENIALS_PER_WINDOW: u32 = 10;
const DENIAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

struct DenialLimit {
    window_start: std::time::Instant,
    reported: u32,
    suppressed: u64,
}

/// Who the peer is, as its verified certificate states.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub certificate: CertificateBody,
    pub fingerprint: String,
    pub mode: LinkMode,
    /// The peer's tier differs from ours: the connection is hidden (no `global` sync, no
    /// transitive mesh), whichever way trust runs.
    pub cross_tier: bool,
    pub address: SocketAddr,
}

/// Per-link counters, readable at any time.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Every byte received on the link's streams, partial frames and ticks included: what
    /// liveness is judged on.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    pub ticks_in: AtomicU64,
    pub ticks_out: AtomicU64,
    /// Tick bytes sent as probes after a burst's last packet (see `tail_prober`).
    pub tail_probes: AtomicU64,
    /// Lane copies sent (see `send_copies`), and received copies that brought their
    /// bytes before the stream did.
    pub copies_out: AtomicU64,
    pub copies_used: AtomicU64,
    pub dropped_in: AtomicU64,
    /// Sends written into QUIC on the sending thread, and of those, how many the
    /// connection's driver sent from there (see `write_in_place`).
    pub writes_in_place: AtomicU64,
    pub sent_in_place: AtomicU64,
}

/// Bytes handed to the VM and not yet acknowledged, per lane and in all, shared by the
/// reader (which adds) and the input handler's acks (which subtract). Acks come one per
/// batch, in the order the batches were sent, so each ack settles the oldest batch.
#[derive(Default)]
struct Credit {
    book: Mutex<CreditBook>,
    /// Set by the reader before it sleeps for lack of credit.
    waiting: AtomicBool,
    returned: tokio::sync::Notify,
}

struct CreditBook {
    outstanding: [usize; LANES],
    total: usize,
    /// Per batch not yet acknowledged: bytes by lane.
    batches: VecDeque<Vec<(usize, usize)>>,
}

impl Default for CreditBook {
    fn default() -> Self {
        CreditBook {
            outstanding: [0; LANES],
            total: 0,
            batches: VecDeque::new(),
        }
    }
}

impl CreditBook {
    /// Settles `bytes` of the oldest batches, oldest lane entries first.
    fn settle(&mut self, mut bytes: usize) {
        while bytes > 0 {
            let Some(batch) = self.batches.front_mut() else {
                break;
            };
            while bytes > 0 && !batch.is_empty() {
                let (lane, n) = &mut batch[0];
                let take = (*n).min(bytes);
                self.outstanding[*lane] = self.outstanding[*lane].saturating_sub(take);
                self.total = self.total.saturating_sub(take);
                *n -= take;
                bytes -= take;
                if *n == 0 {
                    batch.remove(0);
                }
            }
            if batch.is_empty() {
                self.batches.pop_front();
            }
        }
    }

    /// May lane `lane` hand up a packet of `len` bytes beyond what it has taken in this
    /// batch? Within the lane's credit and the link's (twice a lane's); past the link's
    /// only a small packet of a lane with little outstanding.
    fn allows(
        &self,
        lane: usize,
        taken_lane: usize,
        taken_total: usize,
        credit: usize,
        len: usize,
    ) -> bool {
        let lane_out = self.outstanding[lane] + taken_lane;
        lane_out < credit
            && (self.total + taken_total < 2 * credit
                || lane_out + len <= IDLE_LANE_ALLOWANCE.min(credit))
    }
}

/// What one inbox item costs beyond its bytes (its slot, its allocation), so that a
/// flood of tiny frames behind a barrier that is never met is bounded like bytes are.
const ITEM_OVERHEAD: usize = 64;

impl Item {
    /// What it holds in memory, as read-ahead counts it: a barrier is counted too, or a
    /// peer could park any number of markers behind one that is never met.
    fn held_bytes(&self) -> usize {
        ITEM_OVERHEAD
            + match self {
                Item::Packet(p) => p.bytes().len(),
                Item::Discarded => 0,
                Item::Barrier(_) => std::mem::size_of::<[u64; LANES]>(),
            }
    }
}

/// One unit of what a lane brings, in order.
enum Item {
    Packet(Packet),
    /// A frame the deframer threw away (over the peer's message limit): it still counts
    /// in the lane's order, for barriers.
    Discarded,
    /// Deliver nothing after this on its lane until every lane has delivered this many.
    /// On lane 0 it keeps a packet that names no sender behind everything sent before it;
    /// on lanes 1.. (a fence) it keeps a lane's next packets behind such packets.
    Barrier(Box<[u64; LANES]>),
}

/// What the lanes have brought and the VM has not yet been handed.
struct Inbox {
    lanes: Vec<VecDeque<Item>>,
    bytes: [usize; LANES],
    /// Bytes of a frame each lane reader has begun and not finished.
    partial: [usize; LANES],
    /// Items taken from each lane so far (packets, refused or not, and discarded frames).
    delivered: [u64; LANES],
    /// Items that count in each lane's order (all but barriers) received so far.
    received: [u64; LANES],
    /// Lanes whose stream the peer has opened, and those whose stream has ended.
    opened: [bool; LANES],
    ended: [bool; LANES],
    ticks_opened: bool,
    /// The lane the next delivery pass starts with.
    next_lane: usize,
    /// Why the filter closed the link, once it has: from then on nothing goes up, from
    /// any lane, even before the close itself takes effect.
    refused: Option<String>,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            lanes: (0..LANES).map(|_| VecDeque::new()).collect(),
            bytes: [0; LANES],
            partial: [0; LANES],
            delivered: [0; LANES],
            received: [0; LANES],
            opened: [false; LANES],
            ended: [false; LANES],
            ticks_opened: false,
            next_lane: 0,
            refused: None,
        }
    }
}

impl Inbox {
    fn push(&mut self, lane: usize, item: Item) {
        self.bytes[lane] += item.held_bytes();
        if !matches!(item, Item::Barrier(_)) {
            self.received[lane] += 1;
        }
        self.lanes[lane].push_back(item);
    }

    fn pop(&mut self, lane: usize) -> Option<Item> {
        let item = self.lanes[lane].pop_front()?;
        self.bytes[lane] -= item.held_bytes();
        Some(item)
    }

    /// Queues a barrier marker the peer sent on `lane`, if it is one our sending side
    /// could have written: on lane 0, counting exactly the packets sent on lane 0 before
    /// it; on the other lanes (a fence: after the link's openings, and for a sender moved
    /// there from another lane), counting other lanes only. Anything else could only
    /// hold the lane back for good, so it ends the link, saying why.
    fn push_marker(&mut self, lane: usize, counts: [u64; LANES]) -> Result<(), String> {
        if lane == 0 {
            let before = self.received[0];
            if counts[0] != before {
                return Err(format!(
                    "barrier marker on lane 0 counts {} packets before it on lane 0, not {before}",
                    counts[0]
                ));
            }
        } else if counts[lane] > 0 {
            return Err(format!(
                "barrier marker on lane {lane} counts packets of its own lane (a fence counts other lanes only)"
            ));
        }
        self.push(lane, Item::Barrier(Box::new(counts)));
        Ok(())
    }

    /// May lane `lane`'s reader read more now? See [`LINK_READ_AHEAD`].
    fn may_read(&self, lane: usize) -> bool {
        let (complete, partial) = (self.bytes[lane], self.partial[lane]);
        if complete >= LANE_READ_AHEAD {
            return false;
        }
        if !self.over_mark() || complete + partial == 0 {
            return true;
        }
        // Over the link's mark, one lane goes on: the one furthest into a frame, so it
        // completes, of those that can use what they read (under their own mark, not held
        // back by a marker). A lane that a marker waits for comes first: the lanes behind
        // that marker may be the ones holding the read-ahead, and only it can free them.
        let furthest = |awaited_only: bool| {
            (0..LANES)
                .filter(|&l| {
                    self.partial[l] > 0
                        && self.bytes[l] < LANE_READ_AHEAD
                        && !self.held_back(l)
                        && (!awaited_only || self.awaited(l))
                })
                .max_by_key(|&l| (self.partial[l], std::cmp::Reverse(l)))
        };
        furthest(true).or_else(|| furthest(false)) == Some(lane)
    }

    /// Do the lanes hold the link's read-ahead mark or more?
    fn over_mark(&self) -> bool {
        self.bytes.iter().chain(&self.partial).sum::<usize>() >= LINK_READ_AHEAD
    }

    /// Does a marker not yet met stand at the front of `lane`?
    fn held_back(&self, lane: usize) -> bool {
        matches!(self.lanes[lane].front(), Some(Item::Barrier(counts)) if !self.barrier_met(counts))
    }

    /// Does a marker at the front of some lane wait for more of `lane`'s packets?
    fn awaited(&self, lane: usize) -> bool {
        self.lanes.iter().any(|items| {
            matches!(items.front(), Some(Item::Barrier(counts)) if counts[lane] > self.delivered[lane])
        })
    }

    fn barrier_met(&self, counts: &[u64; LANES]) -> bool {
        self.delivered.iter().zip(counts).all(|(d, c)| d >= c)
    }
}

/// The sending side of the lanes: what each lane has been given and still holds.
struct SendLanes {
    /// Lanes are used once the data phase starts; handshake frames all go on lane 0.
    data_phase: bool,
    salt: u64,
    /// Packets put on each lane so far (barrier markers not counted).
    sent: [u64; LANES],
    /// A packet that names no sender may be from any process, whose later packets must
    /// not overtake it on their own lanes. The VM writes such packets (`SEND` without a
    /// sender) for the messages it queued while the connection was being set up, and the
    /// same processes' later messages as `SEND_SENDER`. So a link opens on lane 0 alone
    /// (`opening`). Then each other lane's first packet is preceded by a *fence*: a marker
    /// that waits for lane 0 up to the opening's end (`fence_upto`); `fenced` are the
    /// lanes that still owe theirs. Every marker waits only for packets routed before it,
    /// so nothing waits in a circle. The opening ends only when every lane has all of its
    /// data in QUIC (the rule is in `route`): what the fences wait for then already holds
    /// its share of QUIC's connection window, which the data behind them cannot take
    /// from it; and the receiver lets a lane that a marker waits for read first
    /// (`Inbox::may_read`).
    ///
    /// A process the VM suspended on the pending connection's full queue holds one
    /// message already written as `SEND`, and queues it when resumed, which can be after
    /// other processes' first packets. The first opening therefore lasts at least
    /// `Settings::opening` from the data phase's start, which covers the processes the
    /// VM resumes once the connection comes up.
    ///
    /// A packet without a sender after the opening (a late resumed `SEND`, a DOWN for a
    /// monitor set by registered name, whose process's DOWNs by pid and link exits may
    /// follow it, or an operation this version does not know) goes behind a barrier and
    /// opens the link again (`reopened`): lane 0 alone, until the same rule lets the
    /// lanes go on behind new fences.
    ///
    /// A sender whose lane carries another process's bulk transfer moves to a quiet lane
    /// behind a fence too (`moves`), which the same reasoning keeps sound: it counts only
    /// packets routed before it, all of them already written to QUIC.
    opening: bool,
    data_since: std::time::Instant,
    fenced: [bool; LANES],
    fence_upto: u64,
    /// In an opening that a packet without a sender began, not the link's first.
    reopened: bool,
    /// How many times that happened.
    reopenings: u64,
    /// Bytes given to each lane's writer and not yet written to QUIC.
    queued: [usize; LANES],
    /// Processes paused because their lane went over its high-water mark (their pids as
    /// the packets encode them), resumed together when it drains.
    paused: Vec<Vec<Vec<u8>>>,
    /// Whether the peer is sending much: [`Inbound::busy`].
    inbound: Inbound,
    /// Senders moved off a lane that carries another process's bulk transfer.
    moves: lanes::Moves,
    /// Bytes put on each lane's stream so far, written or still queued.
    routed_bytes: [u64; LANES],
}

impl SendLanes {
    /// Bytes of the lane's stream written to QUIC so far.
    fn written(&self, lane: usize) -> u64 {
        self.routed_bytes[lane].saturating_sub(self.queued[lane] as u64)
    }
}

/// How fast the peer's data came lately, for sends that would write in place: a turn of
/// the connection's driver takes in every datagram that waits for it before it sends
/// (unbounded off the transport thread, where tokio's task budget does not apply), so
/// while the peer streams to us, a scheduler polling it could be held for milliseconds.
struct Inbound {
    since: std::time::Instant,
    bytes_then: u64,
    busy: bool,
}

/// The peer's data rate over which a link is busy inbound: 16 MB/s. A ping-pong of small
/// messages brings about 1 MB/s; a stream of them or of large ones, far more.
const INBOUND_BUSY_BYTES_PER_MS: u64 = 16 * 1000;
/// How often the rate is taken again (as sends come; it is the rate since the last).
const INBOUND_RATE_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

impl Inbound {
    fn new(now: std::time::Instant) -> Self {
        Inbound {
            since: now,
            bytes_then: 0,
            busy: true,
        }
    }

    /// Whether the peer sent more than [`INBOUND_BUSY_BYTES_PER_MS`] since the rate was
    /// last taken, `bytes_in` being every byte received so far.
    fn busy(&mut self, now: std::time::Instant, bytes_in: u64) -> bool {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= INBOUND_RATE_EVERY {
            let bytes = bytes_in.saturating_sub(self.bytes_then);
            let allowed = INBOUND_BUSY_BYTES_PER_MS.saturating_mul(elapsed.as_millis() as u64);
            self.busy = bytes > allowed;
            self.since = now;
            self.bytes_then = bytes_in;
        }
        self.busy
    }
}

/// What [`Link::send_packets`] did.
#[derive(Debug, Default)]
pub struct Sent {
    /// The link's whole queue is above its high-water mark: stop until
    /// [`LinkEvents::writable`].
    pub busy: bool,
    /// Processes (pids in external form, no version byte) whose lane is above its
    /// high-water mark: pause them until [`LinkEvents::resume`] names them.
    pub pause: Vec<Vec<u8>>,
}

enum ReaderCommand {
    RequestHandshakeFrame,
    StartData,
}

pub(crate) struct Shared {
    carrier: Arc<CarrierShared>,
    connection: quinn::Connection,
    /// The connection's driver, for sends that write in place (see [`write_in_place`]).
    driver: Option<Arc<runtime::Driver>>,
    /// Each lane's send stream while its writer is not using it.
    streams: Vec<Mutex<LaneStream>>,
    /// When a lane last wrote, in nanoseconds since `born`.
    last_write: AtomicU64,
    born: std::time::Instant,
    /// Which lanes the writers use, for the connection's congestion controller.
    sharing: Arc<LaneSharing>,
    peer: PeerInfo,
    events: Arc<dyn LinkEvents>,
    stats: LinkStats,
    queued: AtomicUsize,
    blocked: AtomicBool,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    credit: Credit,
    peer_name: Mutex<Option<handshake::NameMessage>>,
    /// The filter of a restricted link, from the start of the data phase. Shared by the
    /// reader (which judges the peer's packets) and the writer (which records what this
    /// node hands out before the peer can see it).
    filter: Mutex<Option<LinkFilter>>,
    denials: Mutex<DenialLimit>,
    /// The lane writers, for the filter's answers and the close; weak, so that the
    /// writers still end when the link's handle is dropped.
    writers: Vec<mpsc::WeakUnboundedSender<Outgoing>>,
    lanes: Mutex<SendLanes>,
    inbox: Mutex<Inbox>,
    /// A lane reader brought something (or ended).
    arrived: tokio::sync::Notify,
    /// The deliverer took something: lane readers below their read-ahead read again.
    room: tokio::sync::Notify,
    /// Set with the data phase: lane readers wait for it (a restricted link's message
    /// limit is known from then on).
    data_started: AtomicBool,
    started: tokio::sync::Notify,
    /// Batches the lane writers have written, and whether [`tail_prober`] wants to hear
    /// of each (only where the round trip is long enough for a probe to matter).
    writes: AtomicU64,
    probing: AtomicBool,
    wrote: tokio::sync::Notify,
    /// A probe is queued for the tick stream and not yet written.
    probe_pending: AtomicBool,
    /// Lane copies for [`send_copies`].
    copies_out: mpsc::Sender<PendingCopy>,
    /// Each lane's copies from the peer, taken by that lane's reader when it starts.
    copies_in: Mutex<Vec<Option<CopyQueue>>>,
    /// Bytes of packet buffers the lane readers hold for frames still arriving; see
    /// [`RESERVED_AHEAD`].
    reserved_in: AtomicUsize,
}

impl Shared {
    pub(crate) fn peer(&self) -> &PeerInfo {
        &self.peer
    }

    /// Ends the link because the peer's certificate or key was revoked.
    pub(crate) fn revoke(&self, why: &str) {
        self.close(CLOSE_REFUSED, why);
    }

    /// Closes the connection, keeping the first reason given. The `closed` event is sent
    /// by the reader task when it ends, so events always come from runtime threads (the
    /// BEAM forbids sending from a scheduler thread without a process environment).
    fn close(&self, code: u32, reason: &str) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            if let Ok(mut r) = self.close_reason.lock() {
                *r = Some(reason.to_owned());
            }
            self.connection
                .close(quinn::VarInt::from_u32(code), reason.as_bytes());
        }
    }

    /// The reader ended: close (if not yet) and tell the layer above, once.
    fn finish(&self, code: u32, reason: &str) {
        self.close(code, reason);
        let reason = self
            .close_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| reason.to_owned());
        self.events.closed(&reason);
    }
}

/// A verified connection to a peer. Dropping the last handle closes the connection.
pub struct Link {
    shared: Arc<Shared>,
    /// One writer per lane; lane 0 writes the stream the link was opened with.
    writers: Vec<mpsc::UnboundedSender<Outgoing>>,
    ticker: mpsc::UnboundedSender<TickStream>,
    reader: mpsc::UnboundedSender<ReaderCommand>,
}

/// What goes on the tick stream: a tick, or a probe after the last packet of a burst
/// (see [`tail_prober`]). Both are one byte, which the peer counts as a tick.
enum TickStream {
    Tick,
    Probe,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.close(CLOSE_NORMAL, "link released");
    }
}

impl Link {
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.peer
    }

    pub fn stats(&self) -> &LinkStats {
        &self.shared.stats
    }

    /// QUIC's own counters for the connection (datagrams, frames, RTT, congestion).
    pub fn quic_stats(&self) -> quinn::ConnectionStats {
        self.shared.connection.stats()
    }

    /// The QUIC connection, for tests that write what only a misbehaving peer would.
    #[cfg(test)]
    pub(crate) fn connection(&self) -> &quinn::Connection {
        &self.shared.connection
    }

    /// What the link's congestion controller reads about its lanes.
    #[cfg(test)]
    pub(crate) fn sharing(&self) -> &LaneSharing {
        &self.shared.sharing
    }

    /// The state of both directions' lanes, for a test that found the link stuck.
    #[cfg(test)]
    pub(crate) fn lanes_report(&self) -> String {
        let mut out = String::new();
        if let Ok(inbox) = self.shared.inbox.lock() {
            for lane in 0..LANES {
                let front = match inbox.lanes[lane].front() {
                    None => "-".to_string(),
                    Some(Item::Packet(p)) => format!("packet {}", p.bytes().len()),
                    Some(Item::Discarded) => "discarded".into(),
                    Some(Item::Barrier(c)) => {
                        let need: Vec<String> = c
                            .iter()
                            .enumerate()
                            .filter(|(_, n)| **n > 0)
                            .map(|(l, n)| format!("{l}:{n}"))
                            .collect();
                        format!("barrier met={} [{}]", inbox.barrier_met(c), need.join(" "))
                    }
                };
                out += &format!(
                    "in lane {lane}: items {} bytes {} partial {} delivered {} may_read {} front {front}\n",
                    inbox.lanes[lane].len(),
                    inbox.bytes[lane],
                    inbox.partial[lane],
                    inbox.delivered[lane],
                    inbox.may_read(lane),
                );
            }
        }
        if let Ok(book) = self.shared.credit.book.lock() {
            out += &format!(
                "credit outstanding {:?} total {} batches {}\n",
                book.outstanding,
                book.total,
                book.batches.len()
            );
        }
        if let Ok(lanes) = self.shared.lanes.lock() {
            out += &format!("out sent {:?} queued {:?}\n", lanes.sent, lanes.queued);
        }
        out
    }

    /// The lanes this link sends on now: 1 while a packet without a sender has it on lane
    /// 0 alone (see `SendLanes::opening`), else all of them.
    pub fn lanes_in_use(&self) -> usize {
        match self.shared.lanes.lock() {
            Ok(lanes) if lanes.reopened => 1,
            _ => LANES,
        }
    }

    /// How many times a packet without a sender, after the link's opening, put it on lane 0
    /// alone for a while.
    pub fn reopenings(&self) -> u64 {
        self.shared.lanes.lock().map_or(0, |lanes| lanes.reopenings)
    }

    /// How many times a sender moved off a lane that another process's bulk transfer
    /// held (see `lanes::Moves`).
    pub fn lane_moves(&self) -> u64 {
        self.shared
            .lanes
            .lock()
            .map_or(0, |lanes| lanes.moves.moves())
    }

    /// The lane a packet of the VM's would go on now on this link, if it names a sender.
    #[cfg(test)]
    pub(crate) fn lane_for(&self, packet: &[u8]) -> Option<usize> {
        let lanes = self.shared.lanes.lock().ok()?;
        match lanes::lane_of(packet, lanes.salt) {
            Lane::Sender { lane, pid, .. } => Some(lanes.moves.lane(lane, pid)),
            Lane::Barrier => None,
        }
    }

    /// Bytes accepted by [`Link::send`] and not yet written to QUIC.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// Bytes of packet buffers held for the peer's frames still arriving.
    #[cfg(test)]
    pub(crate) fn reserved_bytes(&self) -> usize {
        self.shared.reserved_in.load(Ordering::Relaxed)
    }

    /// The peer's distribution-handshake name message, once seen and checked.
    pub fn peer_name(&self) -> Option<handshake::NameMessage> {
        self.shared.peer_name.lock().ok().and_then(|g| g.clone())
    }

    /// Asks for the next handshake frame from the peer, delivered through
    /// [`LinkEvents::handshake_frame`].
    ///
    /// Returns false if the link has already ended: no frame will come.
    pub fn request_handshake_frame(&self) -> bool {
        self.reader
            .send(ReaderCommand::RequestHandshakeFrame)
            .is_ok()
    }

    /// True once the link has ended, or is ending.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst) || self.reader.is_closed()
    }

    /// The distribution handshake is over: from now on packets flow in batches, under
    /// credit. On a restricted link each packet passes the link's filter, which needs
    /// this node as pids name it (`local`) and its system processes when the link starts.
    ///
    /// Returns false if the link has already ended, or if the peer's handshake name was
    /// never seen (then the link is closed: a filter without the peer's identity cannot
    /// check senders).
    pub fn start_data(
        &self,
        local: NodeId,
        system: Vec<(String, trust_dist_proto::etf::PidKey)>,
    ) -> bool {
        if self.shared.peer.mode == LinkMode::Restricted {
            let Some(name) = self.peer_name() else {
                self.shared
                    .close(CLOSE_PROTOCOL, "data phase before the peer named itself");
                return false;
            };
            let peer = NodeId {
                name: name.name,
                creation: name.creation,
            };
            let policy = self
                .shared
                .carrier
                .identity
                .policy
                .for_tier(&self.shared.peer.certificate.tier);
            let filter = LinkFilter::new(local, peer, policy, system);
            if let Ok(mut slot) = self.shared.filter.lock() {
                *slot = Some(filter);
            }
        }
        if let Ok(mut lanes) = self.shared.lanes.lock() {
            lanes.data_phase = true;
            lanes.data_since = std::time::Instant::now();
        }
        let started = self.reader.send(ReaderCommand::StartData).is_ok() && !self.is_closed();
        self.shared.data_started.store(true, Ordering::SeqCst);
        self.shared.started.notify_waiters();
        started
    }

    /// The filter's counters of a restricted link, by operation and outcome.
    pub fn filter_counters(&self) -> Option<Counters> {
        let guard = self.shared.filter.lock().ok()?;
        Some(guard.as_ref()?.counters().clone())
    }

    /// Returns credit for `bytes` of packets the VM has taken.
    ///
    /// The VM takes batches in the order they were handed up, so acks settle the oldest
    /// batches first, lane by lane. The reader is woken only if it is actually waiting
    /// for credit, so a busy link does not pay a cross-thread wake-up per batch.
    pub fn ack(&self, bytes: usize) {
        let credit = &self.shared.credit;
        if let Ok(mut book) = credit.book.lock() {
            book.settle(bytes);
        }
        if credit.waiting.swap(false, Ordering::SeqCst) {
            credit.returned.notify_one();
        }
    }

    /// Queues packets (each already a whole frame: length prefix and body) for sending.
    /// Returns false when the queue is above its high-water mark: the caller should stop
    /// and wait for [`LinkEvents::writable`]. Pauses asked for are ignored here; see
    /// [`Link::send_packets`].
    pub fn send(&self, frames: Bytes) -> bool {
        !self.send_frames(Frames::contiguous(frames)).busy
    }

    /// Queues packets behind a barrier, whoever sent them: the peer delivers none of them
    /// before everything queued before on any lane (tooling that needs an "everything
    /// before this has been judged" mark on a link, such as the red-team suite). Returns
    /// false when the link's queue is above its high-water mark. Such a caller is not
    /// the distribution controller, which alone waits for [`LinkEvents::writable`], so
    /// this leaves the busy state to the controller's sends: taking it over could clear
    /// the mark the controller waits on, and the writable that ends its wait would
    /// never come.
    pub fn send_barrier(&self, frames: Frames) -> bool {
        !self.queue(frames, true).busy
    }

    /// Queues packets (each already a whole frame: length prefix and body), each on the
    /// lane of its sending process, and says whether the caller should stop, and which
    /// processes should pause.
    pub fn send_frames(&self, frames: Frames) -> Sent {
        self.queue(frames, false)
    }

    fn queue(&self, frames: Frames, all_behind_barrier: bool) -> Sent {
        let shared = &self.shared;
        shared
            .stats
            .packets_out
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        observe_outgoing(shared, &frames);
        let Routed {
            pause,
            in_place,
            poll,
        } = route(shared, &frames, all_behind_barrier, true, &|lane| {
            Some(self.writers[lane].clone())
        });
        if let Some(poll) = poll.filter(|_| in_place.iter().any(|&bytes| bytes > 0)) {
            wrote_in_place(shared, poll, &in_place);
        }
        let queued = shared.queued.load(Ordering::SeqCst);
        let settings = &shared.carrier.settings;
        if queued <= settings.send_high_water {
            return Sent { busy: false, pause };
        }
        if all_behind_barrier {
            return Sent { busy: true, pause };
        }
        shared.blocked.store(true, Ordering::SeqCst);
        // The writers may have drained below low water before `blocked` was visible.
        let busy = !(shared.queued.load(Ordering::SeqCst) <= settings.send_low_water
            && shared.blocked.swap(false, Ordering::SeqCst));
        Sent { busy, pause }
    }

    /// Sends a tick on the tick stream.
    pub fn tick(&self) {
        let _ = self.ticker.send(TickStream::Tick);
    }

    /// Closes the link once everything queued before has reached the peer (bounded by
    /// [`CLOSE_FLUSH_TIMEOUT`]), as closing a TCP socket would: the last handshake
    /// status or exit signal a node sends is not lost to the close. `reason` is sent to
    /// the peer.
    pub fn close(&self, reason: &str) {
        if self.writers[0]
            .send(Outgoing::Close(reason.to_owned()))
            .is_err()
        {
            self.shared.close(CLOSE_NORMAL, reason);
        }
    }
}

/// The peer's frames, each held to the limit of its place in the exchange (hello,
/// handshake message, data) before a byte of its body is buffered.
struct Deframer {
    decoder: FrameDecoder<Packet>,
    budget: FrameBudget,
}

impl Deframer {
    fn new(side: Side, max_frame: u32) -> Self {
        let budget = FrameBudget::new(side, max_frame);
        Deframer {
            decoder: FrameDecoder::new(budget.limit()),
            budget,
        }
    }

    /// Frames in order, with those thrown away for the discard limit in their place;
    /// `alloc` as for [`FrameDecoder::decode_with`].
    fn decode(
        &mut self,
        input: &Bytes,
        out: &mut Vec<Decoded>,
        alloc: &mut impl FnMut(frame::Ask) -> Option<Packet>,
    ) -> Result<(), frame::FrameError> {
        let mut at = 0;
        loop {
            // One call completes a frame or throws one away, never both.
            out.extend(
                self.decoder
                    .take_discarded()
                    .into_iter()
                    .map(Decoded::Discarded),
            );
            if at >= input.len() {
                return Ok(());
            }
            self.decoder.set_max_len(self.budget.limit());
            let (used, frame) = self.decoder.decode_with(&input.slice(at..), alloc)?;
            at += used;
            if let Some(frame) = frame {
                self.budget.frame_done();
                out.push(Decoded::Frame(frame));
            }
        }
    }

    /// Bytes of a frame still being received.
    fn partial_bytes(&self) -> usize {
        self.decoder.buffered()
    }

    /// Bytes of packet buffer held for a frame still being received.
    fn reserved(&self) -> usize {
        self.decoder.reserved()
    }

    /// From now on, data frames longer than `len` are dropped unbuffered.
    fn discard_above(&mut self, len: u32) {
        self.decoder.set_discard_above(len);
    }
}

/// A frame to be kept a while, in memory of its own: a slice of a chunk would keep the
/// whole receive buffer under it alive, and [`PRE_START_BUFFER`] counts only the frame.
fn owned(frame: Frame) -> Frame {
    match frame {
        frame::Frame::Slice(bytes) => frame::Frame::Gathered(bytes.to_vec()),
        frame => frame,
    }
}

/// Reads frames until `pending` holds at least `want` of them.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    decoder: &mut Deframer,
    pending: &mut VecDeque<Frame>,
    want: usize,
    stats: Option<&LinkStats>,
) -> Result<(), String> {
    let mut frames = Vec::new();
    while pending.len() < want {
        match recv.read_chunk(READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                if let Some(stats) = stats {
                    stats
                        .bytes_in
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                }
                decoder
                    .decode(&chunk.bytes, &mut frames, &mut |_| None)
                    .map_err(|e| e.to_string())?;
                for unit in frames.drain(..) {
                    match unit {
                        Decoded::Frame(frame) => pending.push_back(owned(frame)),
                        // The discard limit is set when the data phase starts.
                        Decoded::Discarded(_) => {
                            return Err("a frame was discarded before the data phase".into())
                        }
                    }
                }
            }
            Ok(None) => return Err("peer closed the stream".into()),
            Err(e) => return Err(describe_read_error(&e)),
        }
    }
    Ok(())
}

fn describe_read_error(e: &quinn::ReadError) -> String {
    match e {
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close)) => {
            format!(
                "peer closed the connection: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::LocallyClosed) => {
            "closed locally".into()
        }
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut) => {
            "peer stopped answering (QUIC idle timeout)".into()
        }
        other => other.to_string(),
    }
}

fn write_frame(buf: &mut Vec<u8>, body: &[u8]) {
    buf.extend_from_slice(&frame::header(body.len() as u32));
    buf.extend_from_slice(body);
}

/// Verifies the peer's hello against our authorities and tiers, returning its identity.
fn check_peer(
    carrier: &CarrierShared,
    connection: &quinn::Connection,
    hello: &[u8],
) -> Result<PeerInfo, String> {
    let tls_key = tls::peer_key(connection).ok_or("peer presented no ed25519 key in TLS")?;
    let identity = &carrier.identity;
    let body = handshake::verify_hello(hello, &identity.authorities, &tls_key, unix_now())
        .map_err(|e| e.to_string())?;
    let mode = identity
        .tiers
        .mode(identity.tier(), &body.tier)
        .ok_or_else(|| handshake::HandshakeError::UnknownTier(body.tier.clone()).to_string())?;
    if let Some(why) = carrier.revoked(&body, &tls_key.fingerprint()) {
        return Err(format!("peer {} refused: {why}", body.node));
    }
    Ok(PeerInfo {
        fingerprint: tls_key.fingerprint(),
        cross_tier: body.tier != identity.tier(),
        certificate: body,
        mode,
        address: connection.remote_address(),
    })
}

/// Server side of a new connection: TLS, the client's hello, our hello, then the client's
/// first distribution frame (send_name) checked against its certificate. Only then is
/// the link reported.
pub(crate) async fn accept<A: Acceptor>(
    carrier: Arc<CarrierShared>,
    incoming: quinn::Incoming,
    acceptor: Arc<A>,
) {
    let from = incoming.remote_address();
    let timeout = carrier.settings.handshake_timeout;
    let sharing = Arc::new(LaneSharing::new());
    let server_config = carrier.server_config_for(sharing.clone());
    let result = tokio::time::timeout(timeout, async {
        // TLS may fail as the connection is accepted or later in its handshake.
        let handshake_failed = |e: quinn::ConnectionError| {
            (
                None,
                format!(
                    "QUIC/TLS handshake failed: {}",
                    tls::describe_handshake_error(&e)
                ),
            )
        };
        let (connecting, driver) = runtime::capture_driver(|| incoming.accept_with(server_config));
        let connection = connecting
            .map_err(handshake_failed)?
            .await
            .map_err(handshake_failed)?;
        let copies_up = watch_copies(&connection);
        let fail = |c: &quinn::Connection, why: String| (Some(c.clone()), why);
        let (mut send, mut recv) = connection
            .accept_bi()
            .await
            .map_err(|e| fail(&connection, e.to_string()))?;
        let mut decoder = Deframer::new(Side::Accepting, carrier.settings.max_frame);
        let mut pending = VecDeque::new();
        read_frames(&mut recv, &mut decoder, &mut pending, 1, None)
            .await
            .map_err(|e| fail(&connection, format!("no hello from peer: {e}")))?;
        let hello = pending.pop_front().unwrap_or_default().to_vec();
        let peer = check_peer(&carrier, &connection, &hello).map_err(|e| fail(&connection, e))?;
        if peer.mode == LinkMode::Restricted
            && !carrier
                .identity
                .policy
                .for_tier(&peer.certificate.tier)
                .connect
        {
            return Err(fail(
                &connection,
                format!(
                    "{} ({}) is of lower tier {} and may not open connections to this node \
                     (policy option connect is false for that tier)",
                    peer.certificate.node, peer.fingerprint, peer.certificate.tier
                ),
            ));
        }
        let mut ours = Vec::new();
        write_frame(
            &mut ours,
            &handshake::encode_hello(&carrier.identity.certificate),
        );
        send.write_all(&ours)
            .await
            .map_err(|e| fail(&connection, e.to_string()))?;
        read_frames(&mut recv, &mut decoder, &mut pending, 1, None)
            .await
            .map_err(|e| {
                fail(
                    &connection,
                    format!(
                        "{} ({}) went away before naming itself: {e}",
                        peer.certificate.node, peer.fingerprint
                    ),
                )
            })?;
        let mut guard = NameGuard::new(Side::Accepting, &peer.certificate.node);
        if let Some(first) = pending.front() {
            guard
                .on_peer_frame(first.bytes())
                .map_err(|e| fail(&connection, e.to_string()))?;
        }
        Ok::<_, (Option<quinn::Connection>, String)>(Verified {
            connection,
            driver,
            sharing,
            copies_up,
            send,
            recv,
            decoder,
            pending,
            guard,
            peer,
        })
    })
    .await;
    match result {
        Ok(Ok(verified)) => {
            let events = acceptor.new_events();
            let link = spawn_link(carrier, verified, events.clone());
            acceptor.accepted(link, events);
        }
        Ok(Err((connection, why))) => {
            carrier.refusal(format!("refused connection from {from}: {why}"));
            if let Some(c) = connection {
                c.close(quinn::VarInt::from_u32(CLOSE_REFUSED), why.as_bytes());
            }
        }
        Err(_) => carrier.refusal(format!(
            "refused connection from {from}: identity exchange took longer than {timeout:?}"
        )),
    }
}

/// The connection-level receive window for a verified peer: the full one for a peer of
/// our tier or above, a smaller one for a lower tier.
fn open_receive_window(connection: &quinn::Connection, mode: LinkMode) {
    let window = match mode {
        LinkMode::Restricted => crate::RESTRICTED_RECEIVE_WINDOW,
        _ => crate::RECEIVE_WINDOW,
    };
    connection.set_receive_window(quinn::VarInt::from_u32(window));
}

/// Client side: TLS, our hello, the server's hello checked and bound to `expected_node`.
pub(crate) async fn connect(
    carrier: Arc<CarrierShared>,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    expected_node: String,
    events: Arc<dyn LinkEvents>,
) -> Result<Link, String> {
    let timeout = carrier.settings.handshake_timeout;
    let sharing = Arc::new(LaneSharing::new());
    let config = carrier.client_config_for(sharing.clone());
    let attempt = async {
        let (connecting, driver) =
            runtime::capture_driver(|| endpoint.connect_with(config, addr, "trust-dist"));
        let connecting =
            connecting.map_err(|e| (None, format!("cannot connect to {addr}: {e}")))?;
        let connection = connecting.await.map_err(|e| {
            (
                None,
                format!(
                    "QUIC/TLS handshake with {addr} failed: {}",
                    tls::describe_handshake_error(&e)
                ),
            )
        })?;
        let copies_up = watch_copies(&connection);
        let fail = |c: &quinn::Connection, why: String| (Some(c.clone()), why);
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| fail(&connection, e.to_string()))?;
        let mut ours = Vec::new();
        write_frame(
            &mut ours,
            &handshake::encode_hello(&carrier.identity.certificate),
        );
        send.write_all(&ours)
            .await
            .map_err(|e| fail(&connection, e.to_string()))?;
        let mut decoder = Deframer::new(Side::Connecting, carrier.settings.max_frame);
        let mut pending = VecDeque::new();
        read_frames(&mut recv, &mut decoder, &mut pending, 1, None)
            .await
            .map_err(|e| {
                fail(
                    &connection,
                    format!("no hello from {expected_node} at {addr}: {e}"),
                )
            })?;
        let hello = pending.pop_front().unwrap_or_default().to_vec();
        let peer = check_peer(&carrier, &connection, &hello).map_err(|e| fail(&connection, e))?;
        handshake::check_dialled(&peer.certificate.node, &expected_node)
            .map_err(|e| fail(&connection, e.to_string()))?;
        let guard = NameGuard::new(Side::Connecting, &expected_node);
        Ok::<_, (Option<quinn::Connection>, String)>(Verified {
            connection,
            driver,
            sharing,
            copies_up,
            send,
            recv,
            decoder,
            pending,
            guard,
            peer,
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(verified)) => Ok(spawn_link(carrier, verified, events)),
        Ok(Err((connection, why))) => {
            if let Some(c) = connection {
                c.close(quinn::VarInt::from_u32(CLOSE_REFUSED), why.as_bytes());
            }
            Err(why)
        }
        Err(_) => Err(format!(
            "identity exchange with {addr} took longer than {timeout:?}"
        )),
    }
}

/// A connection whose peer passed the identity exchange, on either side, with what the
/// exchange left on its first stream.
struct Verified {
    connection: quinn::Connection,
    driver: Option<Arc<runtime::Driver>>,
    sharing: Arc<LaneSharing>,
    copies_up: CopiesUp,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Deframer,
    pending: VecDeque<Frame>,
    guard: NameGuard,
    peer: PeerInfo,
}

fn spawn_link(
    carrier: Arc<CarrierShared>,
    verified: Verified,
    events: Arc<dyn LinkEvents>,
) -> Link {
    let Verified {
        connection,
        driver,
        sharing,
        copies_up,
        send,
        recv,
        decoder,
        pending,
        guard,
        peer,
    } = verified;
    // Verified: now the peer may use the window its tier allows.
    open_receive_window(&connection, peer.mode);
    let (writer_txs, writer_rxs): (Vec<_>, Vec<_>) =
        (0..LANES).map(|_| mpsc::unbounded_channel()).unzip();
    let (copies_out, copies_to_send) = mpsc::channel(COPIES_QUEUED);
    let (copy_txs, copy_rxs): (Vec<_>, Vec<_>) = (0..LANES)
        .map(|_| {
            let (tx, rx) = mpsc::channel(COPIES_QUEUED_PER_LANE);
            (tx, Some(rx))
        })
        .unzip();
    let mut streams: Vec<Mutex<LaneStream>> = (0..LANES)
        .map(|_| Mutex::new(LaneStream::default()))
        .collect();
    if let Ok(lane_0) = streams[0].get_mut() {
        lane_0.stream = Some(send);
    }
    let shared = Arc::new(Shared {
        writers: writer_txs.iter().map(|w| w.downgrade()).collect(),
        carrier,
        connection: connection.clone(),
        driver,
        streams,
        last_write: AtomicU64::new(0),
        born: std::time::Instant::now(),
        sharing,
        peer,
        events,
        stats: LinkStats::default(),
        queued: AtomicUsize::new(0),
        blocked: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        close_reason: Mutex::new(None),
        credit: Credit::default(),
        peer_name: Mutex::new(guard.peer().cloned()),
        filter: Mutex::new(None),
        denials: Mutex::new(DenialLimit {
            window_start: std::time::Instant::now(),
            reported: 0,
            suppressed: 0,
        }),
        lanes: Mutex::new(SendLanes {
            data_phase: false,
            salt: {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            sent: [0; LANES],
            opening: true,
            data_since: std::time::Instant::now(),
            fenced: [false; LANES],
            fence_upto: 0,
            reopened: false,
            reopenings: 0,
            queued: [0; LANES],
            paused: (0..LANES).map(|_| Vec::new()).collect(),
            inbound: Inbound::new(std::time::Instant::now()),
            moves: lanes::Moves::default(),
            routed_bytes: [0; LANES],
        }),
        inbox: Mutex::new(Inbox::default()),
        arrived: tokio::sync::Notify::new(),
        room: tokio::sync::Notify::new(),
        data_started: AtomicBool::new(false),
        writes: AtomicU64::new(0),
        // Until a round trip is measured, as QUIC assumes a long one.
        probing: AtomicBool::new(true),
        probe_pending: AtomicBool::new(false),
        wrote: tokio::sync::Notify::new(),
        started: tokio::sync::Notify::new(),
        copies_out,
        copies_in: Mutex::new(copy_rxs),
        reserved_in: AtomicUsize::new(0),
    });
    if let Ok(mut links) = shared.carrier.links.lock() {
        links.retain(|l| l.strong_count() > 0);
        links.push(Arc::downgrade(&shared));
    }
    tokio::spawn(end_at_expiry(Arc::downgrade(&shared)));
    let (tick_tx, tick_rx) = mpsc::unbounded_channel();
    let (reader_tx, reader_rx) = mpsc::unbounded_channel();
    for (lane, rx) in writer_rxs.into_iter().enumerate() {
        tokio::spawn(writer(shared.clone(), lane, rx));
    }
    tokio::spawn(tail_prober(shared.clone(), tick_tx.downgrade()));
    tokio::spawn(ticker(shared.clone(), tick_rx));
    tokio::spawn(send_copies(shared.clone(), copies_to_send));
    let _ = copies_up.send((Arc::downgrade(&shared), copy_txs));
    tokio::spawn(accept_streams(shared.clone()));
    let reading = shared.clone();
    tokio::spawn(async move {
        let (code, reason) = reader(&reading, recv, reader_rx, decoder, pending, guard).await;
        reading.finish(code, &reason);
    });
    Link {
        shared,
        writers: writer_txs,
        ticker: tick_tx,
        reader: reader_tx,
    }
}

/// Ends the link when the peer's certificate expires: validity is not only checked when
/// a connection is made.
async fn end_at_expiry(link: std::sync::Weak<Shared>) {
    let Some(shared) = link.upgrade() else {
        return;
    };
    let not_after = shared.peer.certificate.not_after;
    let connection = shared.connection.clone();
    drop(shared);
    // In steps of at most a day, so the clock is read again and no timer is asked for
    // a span longer than the runtime supports.
    loop {
        let left = not_after.saturating_sub(unix_now());
        if left == 0 {
            break;
        }
        let step = std::time::Duration::from_secs(left.min(86_400));
        tokio::select! {
            _ = connection.closed() => return,
            _ = tokio::time::sleep(step) => {}
        }
    }
    if let Some(shared) = link.upgrade() {
        let why = format!(
            "certificate of {} expired (not_after {not_after})",
            shared.peer.certificate.node
        );
        shared
            .carrier
            .log
            .log(crate::Level::Notice, format!("disconnecting: {why}"));
        shared.close(CLOSE_REFUSED, &why);
    }
}

/// A lane's send stream, kept here while its writer waits for work.
struct LaneStream {
    /// `None` while the writer writes, and on lanes 1.. until first used.
    stream: Option<quinn::SendStream>,
    /// The stream offset of the next byte written: lanes 1.. start with the byte that
    /// names the lane. (Lane 0 is never copied.)
    offset: u64,
}

impl Default for LaneStream {
    fn default() -> Self {
        LaneStream {
            stream: None,
            offset: 1,
        }
    }
}

/// How long a link must have written nothing for a send to write in place. A quiet link's
/// packet then leaves from the sending thread; a busy link's writer batches many sends
/// into one write and fills whole packets, which writes in place would break up. (No lane
/// may have anything queued either, and the peer must be sending little: see
/// [`Inbound`]. Beside a bulk transfer, sends in place made a ping's p99 1.5-2.8 ms
/// against 0.95-0.99 without: a turn of the driver there takes in the transfer's
/// acknowledgements.)
const IN_PLACE_QUIET: std::time::Duration = std::time::Duration::from_micros(50);

/// The most a send writes in place: one turn of the connection's driver sends it.
const IN_PLACE_MAX_BYTES: usize = 16 * 1024;

impl Shared {
    fn note_write(&self, now: std::time::Instant) {
        let at = now.saturating_duration_since(self.born).as_nanos() as u64;
        self.last_write.fetch_max(at, Ordering::Relaxed);
    }

    fn quiet_at(&self, now: std::time::Instant) -> bool {
        let at = now.saturating_duration_since(self.born).as_nanos() as u64;
        at.saturating_sub(self.last_write.load(Ordering::Relaxed))
            >= IN_PLACE_QUIET.as_nanos() as u64
    }
}

/// Writes `chunk` straight into the lane's QUIC stream, on the calling thread, when the
/// link has nothing queued (the caller checked, under the lane lock) and the lane's
/// writer is not using the stream. Returns the bytes written; what is left of `chunk`
/// goes to the writer as usual. Lane order holds: the writer puts the stream back before
/// it counts its last bytes as written, so nothing of the lane is still to be written.
fn write_in_place(shared: &Shared, lane: usize, chunk: &mut Vec<Bytes>) -> usize {
    let Ok(mut slot) = shared.streams[lane].try_lock() else {
        return 0;
    };
    let Some(stream) = slot.stream.as_mut() else {
        return 0;
    };
    // Not waited for: when QUIC's window is closed nothing is written, and the writer,
    // which can wait, takes it all.
    let polled = {
        let write = std::pin::pin!(stream.write_chunks(chunk));
        std::future::Future::poll(
            write,
            &mut std::task::Context::from_waker(std::task::Waker::noop()),
        )
    };
    let written = match polled {
        std::task::Poll::Ready(Ok(written)) => written,
        _ => return 0,
    };
    chunk.drain(..written.chunks);
    slot.offset += written.bytes as u64;
    written.bytes
}

/// After a send wrote in place: a turn of the connection's driver on this thread, so that
/// the packet leaves now rather than when the transport thread wakes, then what a writer
/// records after its writes.
fn wrote_in_place(shared: &Shared, poll: runtime::PollHere, in_place: &[usize; LANES]) {
    if poll.poll() {
        shared.stats.sent_in_place.fetch_add(1, Ordering::Relaxed);
    }
    let now = std::time::Instant::now();
    for (lane, _) in in_place.iter().enumerate().filter(|(_, &bytes)| bytes > 0) {
        shared.sharing.wrote(lane, now);
        shared.writes.fetch_add(1, Ordering::Relaxed);
    }
    shared.note_write(now);
    shared
        .stats
        .bytes_out
        .fetch_add(in_place.iter().sum::<usize>() as u64, Ordering::Relaxed);
    shared.stats.writes_in_place.fetch_add(1, Ordering::Relaxed);
}

/// What a lane's writer task is asked to do, in order.
enum Outgoing {
    /// Whole frames, length prefixes included.
    Frames(Vec<Bytes>),
    /// Lane 0 only: finish every lane, wait for the peer to have it all (bounded), then
    /// close the connection.
    Close(String),
    /// Lanes 1..: finish the stream once what came before is written, wait (bounded) for
    /// the peer to have it, then say so.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Frames split by lane: slices of one buffer, a run of adjacent frames of one lane kept
/// as one slice.
struct Split<'a> {
    frames: &'a Frames,
    chunks: Vec<Vec<Bytes>>,
    /// Where the last slice given to each lane starts and ends.
    runs: [Option<(usize, usize)>; LANES],
    bytes: [usize; LANES],
}

impl<'a> Split<'a> {
    fn new(frames: &'a Frames) -> Self {
        Split {
            frames,
            chunks: (0..LANES).map(|_| Vec::new()).collect(),
            runs: [None; LANES],
            bytes: [0; LANES],
        }
    }

    /// Puts a frame on a lane.
    fn put_frame(&mut self, lane: usize, frame: &[Piece]) {
        for piece in frame {
            match piece {
                Piece::Buf(range) => self.put(lane, range.start, range.end),
                Piece::Shared(bytes) => self.put_owned(lane, bytes.clone()),
            }
        }
    }

    fn put(&mut self, lane: usize, start: usize, end: usize) {
        self.bytes[lane] += end - start;
        match self.runs[lane] {
            Some((run_start, run_end)) if run_end == start => {
                if let Some(last) = self.chunks[lane].last_mut() {
                    *last = self.frames.buf.slice(run_start..end);
                }
                self.runs[lane] = Some((run_start, end));
            }
            _ => {
                self.chunks[lane].push(self.frames.buf.slice(start..end));
                self.runs[lane] = Some((start, end));
            }
        }
    }

    fn put_owned(&mut self, lane: usize, frame: Bytes) {
        self.bytes[lane] += frame.len();
        self.chunks[lane].push(frame);
        self.runs[lane] = None;
    }
}

/// Splits whole frames by lane and hands each lane's share to its writer, under the lane
/// lock so that each lane's order and the counts a barrier carries agree. Returns the
/// bytes queued and the senders to pause. `from_vm` is false for the filter's answers.
fn route(
    shared: &Shared,
    frames: &Frames,
    all_behind_barrier: bool,
    from_vm: bool,
    writer: &dyn Fn(usize) -> Option<mpsc::UnboundedSender<Outgoing>>,
) -> Routed {
    let Ok(mut state) = shared.lanes.lock() else {
        return Routed::default();
    };
    let mut split = Split::new(frames);
    // The lanes and pids of the processes that sent messages here: only they may pause.
    let mut senders: Vec<(usize, Cow<[u8]>)> = Vec::new();
    let mut large_bytes = 0;
    if !state.data_phase {
        for frame in frames.each() {
            split.put_frame(0, frame);
        }
    } else {
        let now = std::time::Instant::now();
        for frame in frames.each() {
            let frame_bytes = frame.iter().map(Piece::len).sum::<usize>();
            if frame_bytes >= LARGE_MESSAGE {
                large_bytes += frame_bytes;
            }
            let head = frames.head(frame);
            let sender = if all_behind_barrier {
                None
            } else {
                match lanes::lane_of(head, state.salt) {
                    Lane::Sender { lane, pid, message } => {
                        Some((lane, Cow::Borrowed(pid), message))
                    }
                    // The head holds the control message unless that itself carries a
                    // large binary; only then is the body put together to read it.
                    Lane::Barrier if frame.len() > 1 => {
                        let whole = frames.body(frame);
                        match lanes::lane_of(&whole, state.salt) {
                            Lane::Sender { lane, pid, message } => {
                                Some((lane, Cow::Owned(pid.to_vec()), message))
                            }
                            Lane::Barrier => None,
                        }
                    }
                    Lane::Barrier => None,
                }
            };
            // The opening ends with a packet that names its sender, once its least time
            // has passed and every lane has all of its data in QUIC (so the data the
            // fences and barriers wait for already has its share of the connection's
            // window).
            let opening_ends = state.opening
                && sender.is_some()
                && state.queued.iter().all(|&bytes| bytes == 0)
                && split.bytes.iter().all(|&bytes| bytes == 0)
                && state.data_since.elapsed() >= shared.carrier.settings.opening;
            match sender {
                _ if head.is_empty() && frame.len() == 1 => split.put_frame(0, frame),
                // On one lane, everything is in order by the stream itself.
                _ if state.opening && !opening_ends => {
                    split.put_frame(0, frame);
                    state.sent[0] += 1;
                    if let Some((_, pid, true)) = sender {
                        if !senders.iter().any(|(l, p)| *l == 0 && *p == pid) {
                            senders.push((0, pid));
                        }
                    }
                }
                Some((home, pid, message)) => {
                    if state.opening {
                        state.opening = false;
                        state.reopened = false;
                        state.fence_upto = state.sent[0];
                        let owed = state.fence_upto > 0;
                        state.fenced[1..].fill(owed);
                    }
                    let from = state.moves.lane(home, &pid);
                    let mut lane = from;
                    // The fence this packet goes behind, if any (most go behind none).
                    let mut fence: Option<[u64; LANES]> = None;
                    // Only the VM's own packets move: the filter's answers follow the
                    // moves the VM's packets made.
                    if from_vm
                        && state.moves.should_move(
                            from,
                            &pid,
                            state.written(from),
                            state.queued[from] + split.bytes[from],
                            now,
                        )
                    {
                        let queued = std::array::from_fn(|l| state.queued[l] + split.bytes[l]);
                        let written = std::array::from_fn(|l| state.written(l));
                        if let Some((to, counts)) = state
                            .moves
                            .move_sender(home, from, &pid, &queued, &written, now)
                        {
                            lane = to;
                            fence = Some(counts);
                            // If it was paused on the lane it left, it stays paused until
                            // that lane drains: the new lane may never be written by its
                            // writer (sends write in place) to resume it.
                        }
                    }
                    if let Some(owed) = state.moves.take_owed_fence(lane) {
                        let counts = fence.get_or_insert([0; LANES]);
                        for (count, owed) in counts.iter_mut().zip(owed) {
                            *count = (*count).max(owed);
                        }
                    }
                    if std::mem::take(&mut state.fenced[lane]) {
                        fence.get_or_insert([0; LANES])[0] = state.fence_upto;
                    }
                    if let Some(counts) = fence.filter(|counts| counts.iter().any(|&n| n > 0)) {
                        split.put_owned(lane, barrier_marker(&counts));
                    }
                    let start = state.routed_bytes[lane] + split.bytes[lane] as u64;
                    split.put_frame(lane, frame);
                    let end = state.routed_bytes[lane] + split.bytes[lane] as u64;
                    let sent_before = state.sent[lane];
                    state.moves.routed(
                        lane,
                        &pid,
                        frame_bytes >= LARGE_MESSAGE,
                        sent_before,
                        (start, end),
                        now,
                    );
                    state.sent[lane] += 1;
                    if message && !senders.iter().any(|(l, p)| *l == lane && *p == pid) {
                        senders.push((lane, pid));
                    }
                }
                None => {
                    if state.sent[1..].iter().any(|&n| n > 0) {
                        split.put_owned(0, barrier_marker(&state.sent));
                    }
                    split.put_frame(0, frame);
                    state.sent[0] += 1;
                    // Its sender's later packets must not overtake it either. (The filter's
                    // answers have no sender whose later packets could.)
                    if !all_behind_barrier && from_vm {
                        state.opening = true;
                        state.reopened = true;
                        state.reopenings += 1;
                        state.moves.forget_moved();
                    }
                }
            }
        }
    }
    let Split {
        chunks, mut bytes, ..
    } = split;
    for (routed, &lane_bytes) in state.routed_bytes.iter_mut().zip(&bytes) {
        *routed += lane_bytes as u64;
    }
    if large_bytes > 0 {
        // Until it is through, a send on another lane would wait behind it.
        shared
            .sharing
            .queued_large_messages(large_bytes, std::time::Instant::now());
    }
    let mut routed = Routed::default();
    // A quiet link's sends write in place (see `write_in_place`). Not while the lanes'
    // copies are made: the writers make them. With nothing queued on the link (read
    // under the lane lock, and the writers count a lane down before the link), no lane
    // has anything still to write before this send: that is what keeps each lane's
    // order, as well as keeping sends beside a bulk transfer with the writers.
    let in_place = if from_vm
        && shared.driver.is_some()
        && !shared.probing.load(Ordering::Relaxed)
        && shared.queued.load(Ordering::SeqCst) == 0
        && bytes.iter().sum::<usize>() <= IN_PLACE_MAX_BYTES
    {
        let now = std::time::Instant::now();
        let bytes_in = shared.stats.bytes_in.load(Ordering::Relaxed);
        shared.quiet_at(now) && !state.inbound.busy(now, bytes_in)
    } else {
        false
    };
    let in_place = shared.driver.as_ref().filter(|_| in_place);
    for (lane, mut chunk) in chunks.into_iter().enumerate() {
        if chunk.is_empty() {
            continue;
        }
        if let Some(driver) = in_place {
            // Promised before the write, whose wake-up of the driver it holds back.
            if routed.poll.is_none() {
                routed.poll = Some(driver.about_to_poll());
            }
            let written = write_in_place(shared, lane, &mut chunk);
            routed.in_place[lane] = written;
            bytes[lane] -= written;
            if routed.in_place.iter().all(|&bytes| bytes == 0) {
                // Nothing to send: whatever the driver was woken for is its task's.
                routed.poll = None;
            }
            if chunk.is_empty() {
                continue;
            }
        }
        let Some(tx) = writer(lane) else {
            continue;
        };
        state.queued[lane] += bytes[lane];
        shared.queued.fetch_add(bytes[lane], Ordering::SeqCst);
        if tx.send(Outgoing::Frames(chunk)).is_err() {
            // The link is closing; the closed event will follow.
            state.queued[lane] -= bytes[lane];
            shared.queued.fetch_sub(bytes[lane], Ordering::SeqCst);
            continue;
        }
    }
    let mut pause = Vec::new();
    // The filter's answers name processes the peer chose: they pause nobody.
    if !from_vm {
        senders.clear();
    }
    // Only a process sending messages pauses, as only messages make the VM suspend a
    // sender on a busy connection; its other signals ride along.
    for (lane, pid) in senders {
        if state.queued[lane] > LANE_HIGH_WATER && !state.paused[lane].iter().any(|p| **p == *pid) {
            state.paused[lane].push(pid.to_vec());
            pause.push(pid.into_owned());
        }
    }
    routed.pause = pause;
    routed
}

/// What [`route`] did besides queueing.
#[derive(Default)]
struct Routed {
    /// The senders to pause.
    pause: Vec<Vec<u8>>,
    /// Bytes each lane wrote in place.
    in_place: [usize; LANES],
    /// This thread's promise to poll the connection's driver, made before writing in
    /// place.
    poll: Option<runtime::PollHere>,
}

/// A barrier marker frame (length prefix and body) with these counts.
fn barrier_marker(counts: &[u64; LANES]) -> Bytes {
    let mut marker = Vec::with_capacity(frame::HEADER_BYTES + 1 + 8 * LANES);
    write_frame(&mut marker, &lanes::encode_barrier(counts));
    Bytes::from(marker)
}

async fn writer(shared: Arc<Shared>, lane: usize, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    let mut low_priority = false;
    while let Some(first) = rx.recv().await {
        let mut closing = None;
        let mut flush = None;
        let take =
            |item: Outgoing,
             batch: &mut Vec<Bytes>,
             closing: &mut Option<String>,
             flush: &mut Option<tokio::sync::oneshot::Sender<()>>| match item {
                Outgoing::Frames(frames) => batch.extend(frames),
                Outgoing::Close(reason) => *closing = Some(reason),
                Outgoing::Flush(done) => *flush = Some(done),
            };
        take(first, &mut batch, &mut closing, &mut flush);
        while batch.len() < 64 && closing.is_none() && flush.is_none() {
            match rx.try_recv() {
                Ok(item) => take(item, &mut batch, &mut closing, &mut flush),
                Err(_) => break,
            }
        }
        // Out of its slot while this writes: a send writes in place only while it is
        // there (and nothing is queued on the lane before it).
        let (mut stream, offset) = match shared.streams[lane].lock() {
            Ok(mut slot) => (slot.stream.take(), slot.offset),
            Err(_) => return,
        };
        if stream.is_none() && (!batch.is_empty() || closing.is_some()) {
            // Lanes 1.. open their stream on first use; its first byte names the lane.
            let opened = match shared.connection.open_uni().await {
                Ok(mut s) => s.write_all(&[lane as u8]).await.map(|_| s).ok(),
                Err(_) => None,
            };
            match opened {
                Some(s) => stream = Some(s),
                None => {
                    shared.close(CLOSE_NORMAL, "cannot open a lane stream");
                    return;
                }
            }
        }
        let len: usize = batch.iter().map(|b| b.len()).sum();
        if let Some(reason) = closing {
            // Every other lane first: each finishes its stream and waits for the peer to
            // have it, so the last signals of any process reach the peer before the close.
            let mut waits = Vec::new();
            for other in shared.writers.iter().skip(1).filter_map(|w| w.upgrade()) {
                let (done, wait) = tokio::sync::oneshot::channel();
                if other.send(Outgoing::Flush(done)).is_ok() {
                    waits.push(wait);
                }
            }
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, async {
                for wait in waits {
                    let _ = wait.await;
                }
            })
            .await;
            if let Some(send) = stream.as_mut() {
                let _ = send.write_all_chunks(&mut batch).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, send.stopped()).await;
            }
            shared.close(CLOSE_NORMAL, &reason);
            return;
        }
        let copy = if lane != 0 && len > 0 {
            lane_copy(&shared, lane, offset, &batch, len)
        } else {
            None
        };
        if let Some(send) = stream.as_mut() {
            if let Err(e) = send.write_all_chunks(&mut batch).await {
                shared.close(CLOSE_NORMAL, &format!("write failed: {e}"));
                return;
            }
        }
        batch.clear();
        if flush.is_none() {
            // Back before the lane's queued bytes drop: a send that then finds the lane
            // empty finds the stream too.
            match shared.streams[lane].lock() {
                Ok(mut slot) => {
                    slot.stream = stream.take();
                    slot.offset = offset + len as u64;
                }
                Err(_) => return,
            }
        }
        if let Some(copy) = copy {
            // Best effort: with the queue full, this write goes without a copy.
            let _ = shared.copies_out.try_send(copy);
        }
        if len > 0 {
            let now = std::time::Instant::now();
            shared.sharing.wrote(lane, now);
            shared.note_write(now);
            shared.writes.fetch_add(1, Ordering::Relaxed);
            if shared.probing.load(Ordering::Relaxed) {
                shared.wrote.notify_one();
            }
            shared
                .stats
                .bytes_out
                .fetch_add(len as u64, Ordering::Relaxed);
            let (lane_queued, resume) = match shared.lanes.lock() {
                Ok(mut state) => {
                    state.queued[lane] = state.queued[lane].saturating_sub(len);
                    let resume = if state.queued[lane] <= LANE_LOW_WATER {
                        std::mem::take(&mut state.paused[lane])
                    } else {
                        Vec::new()
                    };
                    (state.queued[lane], resume)
                }
                Err(_) => (0, Vec::new()),
            };
            // Before anyone is resumed: a resumed sender's next packets are checked
            // against this total at once, and with this batch still counted the link
            // went busy at twice the lane's mark, and held every lane's packets in the
            // VM's queue behind the bulk (a ping beside a 1 MiB transfer under 1 % loss at
            // 50 ms RTT waited about 100 ms, 20 times in 20 s).
            shared.queued.fetch_sub(len, Ordering::SeqCst);
            // A lane with a backlog yields to the others in QUIC's scheduling: a quiet
            // process's packet goes out before the next bulk chunk.
            let behind = lane_queued > LANE_LOW_WATER;
            if behind != low_priority {
                let priority = if behind { -1 } else { 0 };
                if let Some(send) = stream.as_ref() {
                    let _ = send.set_priority(priority);
                } else if let Ok(slot) = shared.streams[lane].lock() {
                    if let Some(send) = slot.stream.as_ref() {
                        let _ = send.set_priority(priority);
                    }
                }
                low_priority = behind;
            }
            if !resume.is_empty() && !shared.events.resume(resume) {
                shared.close(CLOSE_NORMAL, "the distribution controller is gone");
                return;
            }
            // `queued` again, not the value from before the resume: a resumed sender may
            // have filled the link past its mark since, and then it stays busy.
            if shared.queued.load(Ordering::SeqCst) <= shared.carrier.settings.send_low_water
                && shared.blocked.load(Ordering::SeqCst)
                && shared.blocked.swap(false, Ordering::SeqCst)
                && !shared.events.writable()
            {
                shared.close(CLOSE_NORMAL, "the distribution controller is gone");
                return;
            }
        }
        if let Some(done) = flush {
            if let Some(send) = stream.as_mut() {
                let _ = send.finish();
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, send.stopped()).await;
            }
            let _ = done.send(());
            return;
        }
    }
}

async fn ticker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<TickStream>) {
    let mut stream: Option<quinn::SendStream> = None;
    while let Some(what) = rx.recv().await {
        if stream.is_none() {
            match shared.connection.open_uni().await {
                Ok(mut s) => {
                    // Ticks go ahead of bulk data when both are waiting.
                    let _ = s.set_priority(1);
                    if s.write_all(&[lanes::stream_kind::TICKS]).await.is_err() {
                        return;
                    }
                    stream = Some(s);
                }
                Err(_) => return,
            }
        }
        if let Some(s) = stream.as_mut() {
            if s.write_all(&[0]).await.is_err() {
                return;
            }
            let counter = match what {
                TickStream::Tick => &shared.stats.ticks_out,
                TickStream::Probe => {
                    shared.probe_pending.store(false, Ordering::Relaxed);
                    &shared.stats.tail_probes
                }
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Round trips from which the tail of each burst is probed ([`tail_prober`]) and small
/// writes are copied ([`lane_copy`]); below, a lost packet costs little time however it
/// is found.
const LONG_PATH_RTT: std::time::Duration = std::time::Duration::from_millis(5);
/// How often the prober looks at the round trip while nothing is written.
const TAIL_PROBE_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends one tick byte an eighth of a round trip after the last write of a burst (so in
/// a later packet than the burst's last, unless the window still held that back), where
/// the round trip is at least [`LONG_PATH_RTT`]. When a burst's last packet is lost
/// (a reply, on a direction where nothing else travels), QUIC finds it only at the
/// probe timeout: the round trip, four times its variance and the peer's
/// acknowledgement delay, which a bulk transfer's queue beside the reply inflates. Once
/// the probe after it is acknowledged, the loss shows at 9/8 of a round trip after it
/// was sent (QUIC's time threshold). At most one probe waits to be written at a time, so
/// a peer that starves the tick stream of flow-control credit holds back one byte, not
/// a queue. The measurement is suggestive rather than conclusive (each p99 is the
/// fourth-worst of about 350 pings): ping p99 beside a bulk transfer at 50 ms RTT and
/// 1 % loss, four alternating `bench/run.sh --loss-only` runs each, 113, 114, 161 and
/// 113 ms with probes, 145, 141, 107 and 123 ms without.
async fn tail_prober(shared: Arc<Shared>, ticks: mpsc::WeakUnboundedSender<TickStream>) {
    let closed = shared.connection.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            _ = &mut closed => return,
            _ = shared.wrote.notified() => {}
            _ = tokio::time::sleep(TAIL_PROBE_RECHECK) => {
                let rtt = shared.connection.rtt();
                shared.probing.store(rtt >= LONG_PATH_RTT, Ordering::Relaxed);
                continue;
            }
        }
        let rtt = shared.connection.rtt();
        let probing = rtt >= LONG_PATH_RTT;
        shared.probing.store(probing, Ordering::Relaxed);
        if !probing {
            continue;
        }
        let seen = shared.writes.load(Ordering::Relaxed);
        tokio::select! {
            _ = &mut closed => return,
            _ = tokio::time::sleep(rtt / 8) => {}
        }
        // Later data went out, and probes this burst's tail itself.
        if shared.writes.load(Ordering::Relaxed) != seen {
            continue;
        }
        if shared.probe_pending.swap(true, Ordering::Relaxed) {
            continue;
        }
        let Some(ticks) = ticks.upgrade() else {
            return;
        };
        if ticks.send(TickStream::Probe).is_err() {
            return;
        }
    }
}

/// The largest write on a lane that is copied: one packet's worth, so that the copy
/// itself fits a QUIC datagram on any path (QUIC's smallest MTU leaves about 1,150 bytes).
const COPY_MAX_BYTES: usize = 1024;
/// A copy goes this fraction of the round trip after its write, so in a later packet
/// (and, where the path drops packets in bursts, not in the same burst), within
/// [`COPY_DELAY_MIN`, `COPY_DELAY_MAX`].
const COPY_DELAY_DIVISOR: u32 = 16;
const COPY_DELAY_MIN: std::time::Duration = std::time::Duration::from_millis(1);
const COPY_DELAY_MAX: std::time::Duration = std::time::Duration::from_millis(10);
/// Copies waiting for their time, per link, and received copies waiting for their lane.
const COPIES_QUEUED: usize = 64;
const COPIES_QUEUED_PER_LANE: usize = 8;
/// What QUIC holds of the peer's datagrams before our reader takes them, and of ours
/// before the window lets them go (older ones are dropped first).
pub(crate) const COPY_RECEIVE_BUFFER: usize = 64 * 1024;
pub(crate) const COPY_SEND_BUFFER: usize = 16 * 1024;

/// One lane's copies from the peer: each copy's stream offset and data.
type CopyQueue = mpsc::Receiver<(u64, Bytes)>;

/// A lane copy waiting for its time.
struct PendingCopy {
    datagram: Bytes,
    due: std::time::Instant,
    /// Packets the connection had sent when the write was made.
    sent_before: u64,
    /// A round trip after the write: by then the write has arrived or is known lost, and
    /// QUIC retransmits it anyway.
    stale: std::time::Instant,
}

/// A copy of a small write on a lane (see `trust_dist_proto::copies`), due a little
/// after the write, where the path is long enough for a lost packet to cost much.
fn lane_copy(
    shared: &Shared,
    lane: usize,
    offset: u64,
    batch: &[Bytes],
    len: usize,
) -> Option<PendingCopy> {
    if len > COPY_MAX_BYTES || !shared.probing.load(Ordering::Relaxed) {
        return None;
    }
    let path = shared.connection.stats().path;
    if path.rtt < LONG_PATH_RTT
        || shared.connection.max_datagram_size()? < copies::HEADER_BYTES + len
    {
        return None;
    }
    let mut datagram = Vec::with_capacity(copies::HEADER_BYTES + len);
    datagram.extend_from_slice(&copies::header(lane, offset));
    for piece in batch {
        datagram.extend_from_slice(piece);
    }
    let delay = (path.rtt / COPY_DELAY_DIVISOR).clamp(COPY_DELAY_MIN, COPY_DELAY_MAX);
    let now = std::time::Instant::now();
    Some(PendingCopy {
        datagram: Bytes::from(datagram),
        due: now + delay,
        sent_before: path.sent_packets,
        stale: now + path.rtt,
    })
}

/// How long a due copy waits for its write to leave at most (see
/// [`copies::write_has_left`]), and how often it looks.
const COPY_WAIT_FOR_PACKETS: std::time::Duration = std::time::Duration::from_millis(20);
const COPY_PACKET_CHECK: std::time::Duration = std::time::Duration::from_millis(1);

/// Sends each lane copy when it is due and its write has left, as [`copies::CopyPacer`]
/// allows.
async fn send_copies(shared: Arc<Shared>, mut copies: mpsc::Receiver<PendingCopy>) {
    let closed = shared.connection.closed();
    tokio::pin!(closed);
    let mut pacer = copies::CopyPacer::new(std::time::Instant::now());
    loop {
        let copy = tokio::select! {
            _ = &mut closed => return,
            next = copies.recv() => match next {
                Some(copy) => copy,
                None => return,
            },
        };
        tokio::select! {
            _ = &mut closed => return,
            _ = tokio::time::sleep_until(copy.due.into()) => {}
        }
        let waited_since = std::time::Instant::now();
        let mut sent = shared.connection.stats().path.sent_packets;
        let mut quiet = false;
        while !copies::write_has_left(copy.sent_before, sent, quiet)
            && waited_since.elapsed() < COPY_WAIT_FOR_PACKETS
        {
            tokio::select! {
                _ = &mut closed => return,
                _ = tokio::time::sleep(COPY_PACKET_CHECK) => {}
            }
            let now_sent = shared.connection.stats().path.sent_packets;
            quiet = now_sent == sent;
            sent = now_sent;
        }
        if !pacer.admit(std::time::Instant::now(), copy.stale) {
            continue;
        }
        if shared.connection.send_datagram(copy.datagram).is_ok() {
            shared.stats.copies_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What [`receive_copies`] waits for: the link, and its lanes' copy queues.
type LinkCopies = (std::sync::Weak<Shared>, Vec<mpsc::Sender<(u64, Bytes)>>);
type CopiesUp = tokio::sync::oneshot::Sender<LinkCopies>;

/// Reads the connection's datagrams from the moment it exists ([`receive_copies`]);
/// the link, once up, is sent on the returned channel.
fn watch_copies(connection: &quinn::Connection) -> CopiesUp {
    let (up, wait) = tokio::sync::oneshot::channel();
    tokio::spawn(receive_copies(connection.clone(), wait));
    up
}

/// Takes the peer's lane copies and hands each to its lane's reader. Before the link is
/// up (while the peer is not yet verified) there is no lane to copy, so a datagram then
/// ends the connection: quinn would otherwise hold it, and the packet buffer it points
/// into, until then. Once up, a datagram that is not a lane copy is a protocol error; a
/// lane whose queue is full loses the copy (its stream still brings the bytes). A copy
/// is kept as a copy of its own, not as a slice that would hold its packet's buffer.
async fn receive_copies(
    connection: quinn::Connection,
    up: tokio::sync::oneshot::Receiver<LinkCopies>,
) {
    let (link, lanes) = tokio::select! {
        biased;
        up = up => match up {
            Ok(up) => up,
            Err(_) => return,
        },
        datagram = connection.read_datagram() => {
            if datagram.is_ok() {
                connection.close(
                    quinn::VarInt::from_u32(CLOSE_PROTOCOL),
                    b"a datagram before the link was up",
                );
            }
            return;
        }
    };
    while let Ok(datagram) = connection.read_datagram().await {
        let (lane, offset, data) = match copies::decode(&datagram) {
            Ok(copy) => (copy.lane, copy.offset, Bytes::copy_from_slice(copy.data)),
            Err(e) => {
                if let Some(shared) = link.upgrade() {
                    shared.close(CLOSE_PROTOCOL, &e.to_string());
                }
                return;
            }
        };
        if let Some(queue) = lanes.get(lane) {
            let _ = queue.try_send((offset, data));
        }
    }
}

/// The next copy of this lane's bytes from the peer, or never once there can be none.
async fn next_copy(copies: &mut Option<CopyQueue>) -> (u64, Bytes) {
    if let Some(queue) = copies.as_mut() {
        if let Some(copy) = queue.recv().await {
            return copy;
        }
    }
    *copies = None;
    std::future::pending().await
}

/// Takes the peer's unidirectional streams: its tick stream and its lanes 1.., each
/// named by its first byte. A second stream of one kind, or an unknown kind, is a
/// protocol error.
async fn accept_streams(shared: Arc<Shared>) {
    while let Ok(mut stream) = shared.connection.accept_uni().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut kind = [0u8; 1];
            if stream.read_exact(&mut kind).await.is_err() {
                return;
            }
            let kind = usize::from(kind[0]);
            let claimed = shared
                .inbox
                .lock()
                .map(|mut inbox| {
                    if kind == usize::from(lanes::stream_kind::TICKS) {
                        !std::mem::replace(&mut inbox.ticks_opened, true)
                    } else if kind < LANES {
                        !std::mem::replace(&mut inbox.opened[kind], true)
                    } else {
                        false
                    }
                })
                .unwrap_or(false);
            match claimed {
                true if kind == usize::from(lanes::stream_kind::TICKS) => {
                    tick_reader(&shared, stream).await
                }
                true => {
                    if let Err(why) = lane_reader(&shared, kind, stream).await {
                        shared.close(CLOSE_PROTOCOL, &why);
                    }
                    // A lane that ended (or whose connection did) holds no frame under
                    // way: what it read of one must not keep the others below the mark.
                    if let Ok(mut inbox) = shared.inbox.lock() {
                        inbox.ended[kind] = true;
                        inbox.partial[kind] = 0;
                    }
                    shared.room.notify_waiters();
                    shared.arrived.notify_one();
                }
                _ => shared.close(
                    CLOSE_PROTOCOL,
                    &format!("peer opened a second or unknown stream (kind {kind})"),
                ),
            }
        });
    }
}

async fn tick_reader(shared: &Shared, mut stream: quinn::RecvStream) {
    let mut buf = [0u8; 64];
    while let Ok(Some(n)) = stream.read(&mut buf).await {
        shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        shared.stats.ticks_in.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// One stream reader's share of [`RESERVED_AHEAD`] (a lane's, or lane 0's): the packet
/// buffer its decoder fills for the frame under way, if it has one.
struct Reservation<'a> {
    shared: &'a Shared,
    held: std::cell::Cell<usize>,
}

impl<'a> Reservation<'a> {
    fn new(shared: &'a Shared) -> Self {
        Reservation {
            shared,
            held: std::cell::Cell::new(0),
        }
    }

    /// The decoder's allocator: a packet buffer of the frame's size, reserved at once if
    /// it is lent ahead and the link's reservations leave room for it. One given for
    /// what has arrived (half the frame or more) is not counted: it takes no more than
    /// the memory it replaces.
    fn alloc(&self) -> impl FnMut(frame::Ask) -> Option<Packet> + '_ {
        move |ask| {
            let len = match ask {
                frame::Ask::Ahead(len) => len,
                frame::Ask::Earned(len) => return self.shared.events.packet_buffer(len),
            };
            // The decoder asks ahead only once the frame it was filling is complete, so
            // what this reader held is given back in the same step.
            let held = self.held.get();
            self.shared
                .reserved_in
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |total| {
                    let next = total.saturating_sub(held).saturating_add(len);
                    (next <= RESERVED_AHEAD).then_some(next)
                })
                .ok()?;
            self.held.set(len);
            let buffer = self.shared.events.packet_buffer(len);
            if buffer.is_none() {
                self.settle(0);
            }
            buffer
        }
    }

    /// Brings the link's count to what this reader's decoder holds now.
    fn settle(&self, now: usize) {
        let held = self.held.replace(now);
        if now > held {
            self.shared
                .reserved_in
                .fetch_add(now - held, Ordering::SeqCst);
        } else {
            self.shared
                .reserved_in
                .fetch_sub(held - now, Ordering::SeqCst);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// Reads one lane's stream into the inbox, at most [`LANE_READ_AHEAD`] ahead of the VM,
/// until the peer finishes it. Returns why the link must close, if it must.
async fn lane_reader(
    shared: &Shared,
    lane: usize,
    mut stream: quinn::RecvStream,
) -> Result<(), String> {
    // Nothing is read before the data phase: a restricted link's limits apply from then.
    // Every wait also ends with the connection, so a link that closes before its data
    // phase (or while this lane waits for room) does not keep its reader, and the link's
    // state, alive.
    loop {
        let started = shared.started.notified();
        if shared.data_started.load(Ordering::SeqCst) {
            break;
        }
        tokio::select! {
            _ = started => {}
            _ = shared.connection.closed() => return Ok(()),
        }
    }
    let mut decoder = FrameDecoder::<Packet>::new(shared.carrier.settings.max_frame);
    let reservation = Reservation::new(shared);
    if let Ok(Some(filter)) = shared.filter.lock().as_deref() {
        decoder
            .set_discard_above(u32::try_from(filter.policy().max_message_size).unwrap_or(u32::MAX));
    }
    let mut frames = Vec::new();
    let mut copies = shared
        .copies_in
        .lock()
        .ok()
        .and_then(|mut lanes| lanes.get_mut(lane).and_then(Option::take));
    // Everything before this stream offset has gone to the decoder, from the stream or
    // from a copy; the byte at offset 0 named the lane.
    let mut delivered: u64 = 1;
    // The connection is gone, closed by the peer: what QUIC already holds of this lane is
    // still owed to the VM (a graceful close waits only for it to be acknowledged), so
    // it is read out whatever the marks say.
    let mut gone = false;
    loop {
        loop {
            let room = shared.room.notified();
            let full = !gone
                && shared
                    .inbox
                    .lock()
                    .map(|inbox| !inbox.may_read(lane))
                    .unwrap_or(false);
            if !full {
                break;
            }
            tokio::select! {
                _ = room => {}
                _ = shared.connection.closed() => {
                    // After a close of ours nothing more goes up.
                    if shared.closed.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    gone = true;
                }
            }
        }
        // The stream first when both have something: then the copy brings nothing new.
        let (offset, bytes, from_copy) = tokio::select! {
            biased;
            read = stream.read_chunk(READ_CHUNK, true) => match read {
                Ok(Some(chunk)) => {
                    shared
                        .stats
                        .bytes_in
                        .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    (chunk.offset, chunk.bytes, false)
                }
                Ok(None) if decoder.is_idle() => return Ok(()),
                Ok(None) => return Err(format!("lane {lane} ended inside a frame")),
                Err(quinn::ReadError::ConnectionLost(_)) => return Ok(()),
                Err(e) => return Err(describe_read_error(&e)),
            },
            (offset, bytes) = next_copy(&mut copies) => (offset, bytes, true),
        };
        // Ordered reads continue the stream, so a chunk never starts past what was
        // handed on; a copy that does waits for the stream instead.
        if !from_copy && offset > delivered {
            return Err(format!("lane {lane} skipped from {delivered} to {offset}"));
        }
        if gone {
            // What QUIC holds comes without waiting: let the runtime's other links run.
            tokio::task::yield_now().await;
        }
        let Some(fresh) = copies::unseen(delivered, offset, bytes.len()) else {
            continue;
        };
        delivered = offset + bytes.len() as u64;
        if from_copy {
            shared.stats.copies_used.fetch_add(1, Ordering::Relaxed);
        }
        let fresh = if fresh == 0 {
            bytes
        } else {
            bytes.slice(fresh..)
        };
        decoder
            .decode_all_in_order_with(&fresh, &mut frames, &mut reservation.alloc())
            .map_err(|e| e.to_string())?;
        reservation.settle(decoder.reserved());
        // A copy is one write, and writes are whole frames: one that ends inside a frame
        // could only build a frame out of many small pieces.
        if from_copy && !decoder.is_idle() {
            return Err(format!("a lane copy on lane {lane} ends inside a frame"));
        }
        // Most chunks of a large frame complete nothing: they leave the inbox as it was,
        // and there is nothing new to hand up.
        let brought = !frames.is_empty();
        let mut thrown = Vec::new();
        let Ok(mut inbox) = shared.inbox.lock() else {
            return Err("link inbox lost".into());
        };
        for unit in frames.drain(..) {
            match unit {
                // Thrown away for the peer's message limit, but it still counts in this
                // lane's order, where it was, for barriers.
                Decoded::Discarded(len) => {
                    inbox.push(lane, Item::Discarded);
                    thrown.push(len);
                }
                Decoded::Frame(frame) if frame.is_empty() => {
                    shared.stats.ticks_in.fetch_add(1, Ordering::Relaxed);
                }
                Decoded::Frame(frame) if is_barrier(&frame) => {
                    // A fence: this lane's later packets wait for other lanes' (see SendLanes).
                    let counts = marker_counts(&frame)
                        .ok_or_else(|| format!("malformed barrier marker on lane {lane}"))?;
                    inbox.push_marker(lane, counts)?;
                }
                Decoded::Frame(frame) => {
                    inbox.push(lane, Item::Packet(into_packet(shared, frame)?));
                }
            }
        }
        inbox.partial[lane] = decoder.buffered();
        // Over the link's mark, which lane may read next depends on what every lane holds.
        let others_may_read = inbox.over_mark();
        drop(inbox);
        if others_may_read {
            shared.room.notify_waiters();
        }
        if !thrown.is_empty() {
            discarded(shared, thrown);
        }
        // Hand up what came, from this task: waking the link's reader to do it would
        // cost every packet of lanes 1.. a task switch. That reader still takes over
        // whenever credit runs out (it waits for acks), a chunk brought more than one
        // batch (it passes again until nothing moves; this lane may never bring another
        // chunk to pass again for) or the link must close.
        if !brought {
            continue;
        }
        let pass = if shared.data_started.load(Ordering::SeqCst) {
            deliver(shared, false)
        } else {
            Pass::default()
        };
        if let Some(why) = pass.close {
            return Err(why);
        }
        if pass.credit_blocked || pass.full || !pass.progress {
            shared.arrived.notify_one();
        }
    }
}

/// Records what the VM's outgoing packets hand to a restricted peer, before they are
/// written. `frames` is whole frames, each with its length prefix.
fn observe_outgoing(shared: &Shared, frames: &Frames) {
    if shared.peer.mode != LinkMode::Restricted {
        return;
    }
    let Ok(mut guard) = shared.filter.lock() else {
        return;
    };
    let Some(filter) = guard.as_mut() else {
        return;
    };
    for frame in frames.each() {
        let whole;
        let body = if frame.len() == 1 {
            frames.head(frame)
        } else {
            whole = frames.body(frame);
            &whole
        };
        if !body.is_empty() {
            filter.observe_outgoing(body);
        }
    }
}

/// What the reader does with one packet of the peer.
enum Judged {
    Deliver(Packet),
    Skip,
    Close(String),
}

/// Runs a packet through the link's filter (restricted links only) and carries out the
/// verdict's side effects: counting, the rate-limited report, the answer.
fn judge(shared: &Shared, packet: Packet) -> Judged {
    if shared.peer.mode != LinkMode::Restricted {
        return Judged::Deliver(packet);
    }
    let decision = {
        let Ok(mut guard) = shared.filter.lock() else {
            return Judged::Close("link filter state lost".into());
        };
        match guard.as_mut() {
            Some(filter) => filter.decide(packet.bytes(), &*shared.carrier.identity.atoms),
            None => return Judged::Close("restricted link without its filter".into()),
        }
    };
    settle(shared, decision, packet)
}

fn settle(shared: &Shared, decision: Decision, packet: Packet) -> Judged {
    if decision.is_refusal() {
        report_denial(shared, &decision);
    }
    match decision.verdict {
        Verdict::Deliver => Judged::Deliver(packet),
        Verdict::DeliverRewritten(bytes) => Judged::Deliver(Box::new(bytes)),
        Verdict::Drop => {
            shared.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
            Judged::Skip
        }
        Verdict::Answer(answer) => {
            shared.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
            send_answer(shared, answer);
            Judged::Skip
        }
        Verdict::Close => Judged::Close(format!(
            "refused {}: {} ({})",
            decision.op.map_or("packet", |op| op.name()),
            decision.reason.map_or("refused", |r| r.as_str()),
            decision.detail
        )),
    }
}

/// Queues an answer unless the peer is not reading what we send: answers to a flood of
/// refused requests must not pile up here.
fn send_answer(shared: &Shared, answer: Vec<u8>) {
    if answer.is_empty()
        || shared.queued.load(Ordering::SeqCst) > shared.carrier.settings.send_high_water
    {
        return;
    }
    let mut frame = Vec::with_capacity(frame::HEADER_BYTES + answer.len());
    write_frame(&mut frame, &answer);
    route(
        shared,
        &Frames::contiguous(Bytes::from(frame)),
        false,
        false,
        &|lane| shared.writers[lane].upgrade(),
    );
}

fn report_denial(shared: &Shared, decision: &Decision) {
    let Ok(mut limit) = shared.denials.lock() else {
        return;
    };
    let now = std::time::Instant::now();
    if now.duration_since(limit.window_start) >= DENIAL_WINDOW {
        limit.window_start = now;
        limit.reported = 0;
    }
    if limit.reported >= DENIALS_PER_WINDOW {
        limit.suppressed += 1;
        return;
    }
    limit.reported += 1;
    let suppressed = std::mem::take(&mut limit.suppressed);
    drop(limit);
    let peer = shared
        .peer_name
        .lock()
        .ok()
        .and_then(|n| n.as_ref().map(|n| n.name.clone()))
        .unwrap_or_else(|| shared.peer.certificate.node.clone());
    shared.carrier.log.denied(DenialReport {
        peer,
        tier: shared.peer.certificate.tier.clone(),
        op: decision.op.map_or("packet", |op| op.name()),
        reason: decision.reason.map_or("refused", |r| r.as_str()),
        outcome: decision.outcome().as_str(),
        // The detail quotes the peer (an atom's text): no control characters reach a log.
        detail: decision
            .detail
            .chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect(),
        suppressed,
    });
}

/// Frames the deframer threw away for exceeding the restricted peer's message limit.
fn discarded(shared: &Shared, lengths: Vec<usize>) {
    for len in lengths {
        let decision = match shared.filter.lock() {
            Ok(mut guard) => match guard.as_mut() {
                Some(filter) => filter.record_oversized(len),
                None => continue,
            },
            Err(_) => continue,
        };
        settle(shared, decision, Box::new(Vec::new()));
    }
}

/// Moves lane 0's frames, read since the last pass, into the inbox: packets, and barrier
/// markers as barriers.
fn lane0_to_inbox(shared: &Shared, pending: &mut VecDeque<Frame>) -> Result<(), String> {
    if pending.is_empty() {
        return Ok(());
    }
    let Ok(mut inbox) = shared.inbox.lock() else {
        return Err("link inbox lost".into());
    };
    lane0_to_inbox_locked(shared, &mut inbox, pending)
}

fn lane0_to_inbox_locked(
    shared: &Shared,
    inbox: &mut Inbox,
    pending: &mut VecDeque<Frame>,
) -> Result<(), String> {
    for frame in pending.drain(..) {
        if frame.is_empty() {
            shared.stats.ticks_in.fetch_add(1, Ordering::Relaxed);
        } else if is_barrier(&frame) {
            let counts = marker_counts(&frame).ok_or("malformed barrier marker on lane 0")?;
            inbox.push_marker(0, counts)?;
        } else {
            inbox.push(0, Item::Packet(into_packet(shared, frame)?));
        }
    }
    Ok(())
}

/// A barrier marker's counts; `None` if it is malformed.
fn marker_counts(frame: &Frame) -> Option<[u64; LANES]> {
    if frame.len() != lanes::BARRIER_BYTES {
        return None;
    }
    lanes::decode_barrier(frame.bytes())
}

fn is_barrier(frame: &Frame) -> bool {
    lanes::is_barrier(frame.bytes())
}

/// A frame in memory the layer above chose: where it already is, or its one copy out
/// of QUIC's buffers (a second one for a frame gathered and never moved into a packet
/// buffer: one that fit in its first gathering memory, or for which the VM gave none).
fn into_packet(shared: &Shared, frame: Frame) -> Result<Packet, String> {
    let frame = match frame {
        frame::Frame::Filled(packet) => return Ok(packet),
        frame => frame,
    };
    let mut packet = shared
        .events
        .packet_buffer(frame.len())
        .ok_or_else(|| format!("no memory for a packet of {} bytes", frame.len()))?;
    if packet.bytes().len() != frame.len() {
        return Err("the packet buffer given is not the size asked for".into());
    }
    packet.bytes_mut().copy_from_slice(frame.bytes());
    Ok(packet)
}

/// What one delivery pass did.
#[derive(Default)]
struct Pass {
    /// Something was taken from a lane.
    progress: bool,
    /// A lane had a packet waiting that its credit did not allow.
    credit_blocked: bool,
    /// The batch filled up: more may be deliverable now, and someone must come back for it.
    full: bool,
    /// The filter ended the link, after what was judged deliverable before went up.
    close: Option<String>,
}

/// Hands the VM one batch from the lanes: each lane's packets in order, every lane within
/// its credit (unless `drain`), a barrier only once every lane has delivered what it
/// counts. Lanes take turns, so none waits behind another's backlog.
fn deliver(shared: &Shared, drain: bool) -> Pass {
    let credit = shared.carrier.settings.recv_credit;
    let max_batch = shared.carrier.settings.batch_packets.max(1);
    let mut pass = Pass::default();
    let mut batch = Vec::new();
    let mut taken = [0usize; LANES];
    let mut taken_total = 0usize;
    {
        let (Ok(mut inbox), Ok(mut book)) = (shared.inbox.lock(), shared.credit.book.lock()) else {
            pass.close = Some("link inbox lost".into());
            return pass;
        };
        if let Some(why) = &inbox.refused {
            pass.close = Some(why.clone());
            return pass;
        }
        'passes: loop {
            let mut moved = false;
            for k in 0..LANES {
                let lane = (inbox.next_lane + k) % LANES;
                while batch.len() < max_batch && taken_total < MAX_BATCH_BYTES {
                    let ready = match inbox.lanes[lane].front() {
                        None => break,
                        Some(Item::Barrier(counts)) => inbox.barrier_met(counts),
                        Some(Item::Discarded) => true,
                        Some(Item::Packet(p)) => {
                            drain
                                || book.allows(
                                    lane,
                                    taken[lane],
                                    taken_total,
                                    credit,
                                    p.bytes().len(),
                                )
                        }
                    };
                    if !ready {
                        if matches!(inbox.lanes[lane].front(), Some(Item::Packet(_))) {
                            pass.credit_blocked = true;
                        }
                        break;
                    }
                    moved = true;
                    match inbox.pop(lane) {
                        Some(Item::Barrier(_)) | None => {}
                        Some(Item::Discarded) => inbox.delivered[lane] += 1,
                        Some(Item::Packet(packet)) => {
                            inbox.delivered[lane] += 1;
                            match judge(shared, packet) {
                                Judged::Deliver(packet) => {
                                    let len = packet.bytes().len();
                                    taken[lane] += len;
                                    taken_total += len;
                                    batch.push(packet);
                                }
                                Judged::Skip => {}
                                Judged::Close(why) => {
                                    inbox.refused = Some(why.clone());
                                    pass.close = Some(why);
                                    break 'passes;
                                }
                            }
                        }
                    }
                }
            }
            pass.progress |= moved;
            pass.full = batch.len() >= max_batch || taken_total >= MAX_BATCH_BYTES;
            // Another round only if this one moved something that may meet a barrier.
            if !moved || pass.full {
                break;
            }
        }
        inbox.next_lane = (inbox.next_lane + 1) % LANES;
        if !batch.is_empty() {
            let mut settled = Vec::new();
            for (lane, &n) in taken.iter().enumerate() {
                if n > 0 {
                    book.outstanding[lane] += n;
                    settled.push((lane, n));
                }
            }
            book.total += taken_total;
            book.batches.push_back(settled);
        }
    }
    if pass.progress {
        shared.room.notify_waiters();
    }
    if !batch.is_empty() {
        shared
            .stats
            .packets_in
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if !shared.events.packets(batch) && pass.close.is_none() {
            pass.close = Some("the distribution input handler is gone".into());
        }
    }
    pass
}

/// After the peer ended the link: what its lanes still bring (bounded in time), then
/// everything deliverable, beyond credit, as a TCP socket's last bytes would be.
async fn drain_lanes(shared: &Shared) {
    let deadline = tokio::time::Instant::now() + CLOSE_FLUSH_TIMEOUT;
    loop {
        let arrived = shared.arrived.notified();
        let waiting = shared
            .inbox
            .lock()
            .map(|inbox| (1..LANES).any(|l| inbox.opened[l] && !inbox.ended[l]))
            .unwrap_or(false);
        if !waiting || tokio::time::timeout_at(deadline, arrived).await.is_err() {
            break;
        }
    }
    // Up to a receive window's worth: let the runtime's other links run in between.
    while deliver(shared, true).progress {
        tokio::task::yield_now().await;
    }
}

/// Runs until the link ends and returns the close code and reason.
async fn reader(
    shared: &Shared,
    mut recv: quinn::RecvStream,
    mut commands: mpsc::UnboundedReceiver<ReaderCommand>,
    mut decoder: Deframer,
    mut pending: VecDeque<Frame>,
    mut guard: NameGuard,
) -> (u32, String) {
    // Some(()) once the data phase has started.
    let mut link: Option<()> = None;
    let mut requested = 0usize;
    // On the accepting side the first frame was checked before the link was reported;
    // frames still pending behind it are checked here, as are all frames on the
    // connecting side.
    let mut checked = pending.len().min(usize::from(guard.is_done()));
    let reservation = Reservation::new(shared);
    let mut frames = Vec::new();
    let mut ended: Option<(u32, String)> = None;
    // The connection is gone: what QUIC holds of lane 0 is read out whatever the marks
    // say (see `lane_reader`).
    let mut gone = false;
    loop {
        while checked < pending.len() && !guard.is_done() {
            if let Err(e) = guard.on_peer_frame(pending[checked].bytes()) {
                return (CLOSE_REFUSED, e.to_string());
            }
            checked += 1;
            if guard.is_done() {
                if let Ok(mut name) = shared.peer_name.lock() {
                    *name = guard.peer().cloned();
                }
            }
        }
        if guard.is_done() {
            checked = pending.len();
        }
        let mut credit_blocked = false;
        match &link {
            None => {
                while requested > 0 && checked > 0 {
                    if let Some(frame) = pending.pop_front() {
                        checked -= 1;
                        requested -= 1;
                        if frame.len() > MAX_HANDSHAKE_FRAME as usize {
                            return (
                                CLOSE_PROTOCOL,
                                format!(
                                    "handshake message of {} bytes exceeds the limit of {MAX_HANDSHAKE_FRAME}",
                                    frame.len()
                                ),
                            );
                        }
                        if !shared.events.handshake_frame(frame.to_vec()) {
                            return (CLOSE_NORMAL, "the handshake process is gone".into());
                        }
                    }
                }
            }
            Some(()) => {
                if let Err(why) = lane0_to_inbox(shared, &mut pending) {
                    return (CLOSE_PROTOCOL, why);
                }
                checked = 0;
                if ended.is_none() {
                    let pass = deliver(shared, false);
                    if let Some(why) = pass.close {
                        return (CLOSE_PROTOCOL, why);
                    }
                    if pass.progress {
                        // More may be deliverable now; let the runtime breathe first.
                        tokio::task::yield_now().await;
                        continue;
                    }
                    credit_blocked = pass.credit_blocked;
                }
            }
        }
        if let Some((code, reason)) = &ended {
            // The peer is gone, but what it sent before it went is still owed to the VM,
            // as a TCP socket's last bytes are (a handshake's final status, an exit
            // signal). During the handshake it goes up as asked for, one frame per
            // request, to whoever owns the link by then (never unasked into an
            // acceptor's mailbox); after it, all at once, beyond credit.
            match &link {
                None if pending.is_empty() => return (*code, reason.clone()),
                None => {}
                Some(()) => {
                    // Lane 0's frame under way will not complete.
                    if let Ok(mut inbox) = shared.inbox.lock() {
                        inbox.partial[0] = 0;
                    }
                    shared.room.notify_waiters();
                    // Only what the peer sent before it ended the link is owed; after a
                    // close of ours (a refusal among them) nothing more goes up.
                    if !shared.closed.load(Ordering::SeqCst) {
                        drain_lanes(shared).await;
                    }
                    return (*code, reason.clone());
                }
            }
        }
        // Out of credit: sleep until an ack brings some back. Announce it first, then look
        // again, so an ack that lands in between is never missed.
        if credit_blocked {
            shared.credit.waiting.store(true, Ordering::SeqCst);
            let pass = deliver(shared, false);
            if let Some(why) = pass.close {
                return (CLOSE_PROTOCOL, why);
            }
            if pass.progress {
                continue;
            }
        }
        // Taken before `want_read` is worked out, so a delivery that makes room in
        // between still wakes this reader.
        let room = shared.room.notified();
        let want_read = ended.is_none()
            && match &link {
                // Before the data phase only handshake messages are due: read a little
                // ahead, never much.
                None => {
                    pending.iter().map(Frame::len).sum::<usize>() + decoder.partial_bytes()
                        < PRE_START_BUFFER
                }
                // Lane 0 obeys the same marks as the other lanes, its frame under way
                // counted with theirs.
                Some(_) => {
                    gone || shared
                        .inbox
                        .lock()
                        .map(|inbox| inbox.may_read(0))
                        .unwrap_or(false)
                }
            };
        let in_data = link.is_some();
        tokio::select! {
            command = commands.recv() => match command {
                None => return (CLOSE_NORMAL, "link released".into()),
                Some(ReaderCommand::RequestHandshakeFrame) => requested += 1,
                Some(ReaderCommand::StartData) => {
                    if let Ok(Some(filter)) = shared.filter.lock().as_deref() {
                        let limit = u32::try_from(filter.policy().max_message_size).unwrap_or(u32::MAX);
                        decoder.discard_above(limit);
                    }
                    link = Some(());
                }
            },
            _ = shared.credit.returned.notified(), if credit_blocked => {}
            _ = shared.arrived.notified(), if in_data => {}
            // Lane readers deliver too, lane 0's packets among them: when lane 0's read-ahead
            // was full, their deliveries are what make room for reading it again.
            _ = room, if in_data && !want_read && ended.is_none() => {}
            // Not reading, this reader would not see the connection go; lanes that end
            // with it may leave the link over its mark for good.
            lost = shared.connection.closed(), if in_data && !want_read && ended.is_none() => {
                if shared.closed.load(Ordering::SeqCst) {
                    ended = Some((CLOSE_NORMAL, describe_read_error(&quinn::ReadError::ConnectionLost(lost))));
                } else {
                    gone = true;
                }
            }
            chunk = recv.read_chunk(READ_CHUNK, true), if want_read => match chunk {
                Ok(Some(chunk)) => {
                    if gone {
                        // As in `lane_reader`.
                        tokio::task::yield_now().await;
                    }
                    shared.stats.bytes_in.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    // Packet buffers only for the data phase's frames: the handshake's
                    // go up as lists, and are small.
                    let decoded = if in_data {
                        decoder.decode(&chunk.bytes, &mut frames, &mut reservation.alloc())
                    } else {
                        decoder.decode(&chunk.bytes, &mut frames, &mut |_| None)
                    };
                    reservation.settle(decoder.reserved());
                    if let Err(e) = decoded {
                        return (CLOSE_PROTOCOL, e.to_string());
                    }
                    let mut thrown = Vec::new();
                    for unit in frames.drain(..) {
                        match unit {
                            Decoded::Frame(frame) if frame.is_empty() => {
                                shared.stats.ticks_in.fetch_add(1, Ordering::Relaxed);
                            }
                            // In the data phase the next pass takes it into a packet
                            // buffer; before, it may wait a while.
                            Decoded::Frame(frame) if in_data => pending.push_back(frame),
                            Decoded::Frame(frame) => pending.push_back(owned(frame)),
                            // Only in the data phase (its start sets the limit): what came
                            // before goes into the inbox first, so the frame thrown away
                            // still counts in lane 0's order where it was, for barriers.
                            Decoded::Discarded(len) => {
                                if let Ok(mut inbox) = shared.inbox.lock() {
                                    if let Err(why) = lane0_to_inbox_locked(shared, &mut inbox, &mut pending) {
                                        return (CLOSE_PROTOCOL, why);
                                    }
                                    inbox.push(0, Item::Discarded);
                                }
                                thrown.push(len);
                            }
                        }
                    }
                    if in_data {
                        // The frames completed and the one under way are counted together.
                        let others_may_read = match shared.inbox.lock() {
                            Ok(mut inbox) => {
                                if let Err(why) = lane0_to_inbox_locked(shared, &mut inbox, &mut pending) {
                                    return (CLOSE_PROTOCOL, why);
                                }
                                inbox.partial[0] = decoder.partial_bytes();
                                inbox.over_mark()
                            }
                            Err(_) => return (CLOSE_PROTOCOL, "link inbox lost".into()),
                        };
                        // Over the link's mark, which lane may read next depends on what
                        // every lane holds, lane 0's frame under way among them.
                        if others_may_read {
                            shared.room.notify_waiters();
                        }
                    }
                    if !thrown.is_empty() {
                        discarded(shared, thrown);
                    }
                }
                Ok(None) => {
                    // A graceful close: the peer finished the stream and closes the
                    // connection once we have acknowledged it; its reason says why.
                    let why = match tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, shared.connection.closed()).await {
                        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                            format!("peer closed the connection: {}", String::from_utf8_lossy(&close.reason))
                        }
                        _ => "peer closed the distribution stream".into(),
                    };
                    ended = Some((CLOSE_NORMAL, why));
                }
                Err(e) => ended = Some((CLOSE_NORMAL, describe_read_error(&e))),
            },
        }
    }
}

#[cfg(test)]
mod inbox_tests {
    use super::*;

    #[test]
    fn lanes_read_ahead_within_their_own_and_the_links_marks() {
        let mut inbox = Inbox::default();
        assert!(inbox.may_read(3));
        inbox.bytes[3] = LANE_READ_AHEAD;
        assert!(!inbox.may_read(3), "a lane stops at its own mark");
        assert!(inbox.may_read(4));
        // Over the link's mark, lanes holding something wait, except the one furthest
        // into a frame; a lane holding nothing may always start.
        inbox.bytes[3] = LANE_READ_AHEAD - 1;
        inbox.partial[5] = LINK_READ_AHEAD;
        inbox.partial[6] = 10;
        assert!(!inbox.may_read(3));
        assert!(!inbox.may_read(6));
        assert!(
            inbox.may_read(5),
            "the frame furthest along must be able to complete"
        );
        assert!(inbox.may_read(7));
    }

    #[test]
    fn over_the_links_mark_the_lane_a_marker_waits_for_reads_first() {
        let mut inbox = Inbox::default();
        // Lanes 1-4 wait behind fences for lane 0, each at its own mark and partway into a
        // large frame; lane 0 waits behind a barrier for lane 5's first packet.
        for lane in 1..=4 {
            let mut fence = [0u64; LANES];
            fence[0] = 3;
            inbox.push(lane, Item::Barrier(Box::new(fence)));
            inbox.bytes[lane] = LANE_READ_AHEAD;
            inbox.partial[lane] = 600 * 1024;
        }
        let mut barrier = [0u64; LANES];
        barrier[5] = 1;
        inbox.push(0, Item::Barrier(Box::new(barrier)));
        inbox.partial[5] = 100 * 1024;
        inbox.partial[6] = 200 * 1024;
        assert!(inbox.over_mark());
        assert!(
            inbox.may_read(5),
            "the lane the barrier waits for must read on"
        );
        assert!(!inbox.may_read(6), "one lane at a time over the mark");
        assert!((1..=4).all(|lane| !inbox.may_read(lane)));
        // Once the barrier has what it counts, the furthest lane that can use more goes on.
        inbox.delivered[5] = 1;
        assert!(inbox.may_read(6) && !inbox.may_read(5));
    }

    #[test]
    fn lane_0s_frame_under_way_counts_with_the_others() {
        let mut inbox = Inbox::default();
        for lane in 1..=3 {
            inbox.bytes[lane] = LANE_READ_AHEAD - 1;
        }
        inbox.partial[4] = 1;
        assert!(!inbox.over_mark());
        inbox.partial[0] = 2 * LANE_READ_AHEAD;
        assert!(inbox.over_mark());
        assert!(!inbox.may_read(4), "lane 0 is further into its frame");
        assert!(inbox.may_read(0));
        // Behind a barrier it cannot use what it reads: the next furthest goes on.
        inbox.push(0, Item::Barrier(Box::new([u64::MAX; LANES])));
        assert!(!inbox.may_read(0) && inbox.may_read(4));
    }

    #[test]
    fn a_frame_kept_before_the_data_phase_holds_none_of_its_receive_buffer() {
        let buffer = Bytes::from(vec![7u8; 64 * 1024]);
        let frame = owned(frame::Frame::Slice(buffer.slice(..100)));
        assert_eq!(frame.bytes(), &[7u8; 100][..]);
        assert!(
            buffer.is_unique(),
            "the kept frame still points into the buffer"
        );
    }

    #[test]
    fn barrier_markers_count_against_read_ahead() {
        let mut inbox = Inbox::default();
        let mut markers = 0;
        while inbox.may_read(0) {
            inbox.push(0, Item::Barrier(Box::new([u64::MAX; LANES])));
            markers += 1;
            assert!(markers <= LANE_READ_AHEAD / 256, "markers are not counted");
        }
        assert!(inbox.pop(0).is_some());
        assert!(inbox.may_read(0));
    }

    #[test]
    fn only_markers_our_sender_could_write_are_taken() {
        let mut inbox = Inbox::default();
        for _ in 0..3 {
            inbox.push(0, Item::Discarded);
        }
        // Taken as a delivery pass takes it.
        let _ = inbox.pop(0);
        inbox.delivered[0] += 1;
        let mut counts = [0u64; LANES];
        counts[5] = 7;
        // Lane 0: exactly the three items sent on lane 0 before it (one already taken).
        counts[0] = 2;
        assert!(inbox.push_marker(0, counts).unwrap_err().contains("not 3"));
        counts[0] = 3;
        assert!(inbox.push_marker(0, counts).is_ok());
        // A marker does not count itself.
        assert!(inbox.push_marker(0, counts).is_ok());
        // A fence counts other lanes: lane 0 after an opening, the lane a moved sender
        // left; never its own.
        assert!(inbox.push_marker(4, counts).is_ok());
        counts[4] = 1;
        assert!(inbox
            .push_marker(4, counts)
            .unwrap_err()
            .contains("lane 4 counts packets of its own lane"));
        counts[4] = 0;
        counts[0] = 1_000;
        assert!(inbox.push_marker(4, counts).is_ok());
    }

    #[test]
    fn credit_settles_the_oldest_batches_lane_by_lane() {
        let mut book = CreditBook::default();
        book.batches.push_back(vec![(1, 100), (2, 50)]);
        book.batches.push_back(vec![(2, 30)]);
        book.outstanding[1] = 100;
        book.outstanding[2] = 80;
        book.total = 180;
        book.settle(120);
        assert_eq!(
            (book.outstanding[1], book.outstanding[2], book.total),
            (0, 60, 60)
        );
        book.settle(60);
        assert_eq!((book.outstanding[2], book.total), (0, 0));
        assert!(book.batches.is_empty());
        book.settle(10); // more than owed: nothing goes below zero
        assert_eq!(book.total, 0);
    }
}
