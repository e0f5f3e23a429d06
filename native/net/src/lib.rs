//! QUIC transport of trust_dist.
//!
//! One [`Carrier`] per node owns a tokio runtime and a quinn endpoint, created at start and
//! shut down on stop. Each peer connection becomes a [`Link`] once the peer has proven its
//! key in TLS 1.3, presented a certificate from a trusted authority for that key and, on
//! the accepting side, claimed a node name its certificate covers. Nothing of an
//! unauthenticated peer is ever reported upward.
//!
//! This crate knows nothing of the BEAM: what happens to frames is told through the
//! [`LinkEvents`] and [`Acceptor`] traits, implemented by the NIF.
#![forbid(unsafe_code)]

mod congestion;
mod frames;
mod link;
pub mod reference;
mod runtime;
mod tls;

pub use frames::{Frames, FramesBuilder};
pub use link::{DenialReport, Link, LinkEvents, LinkStats, Packet, PacketBuffer, PeerInfo, Sent};
pub use quinn::ConnectionStats;
pub use tls::ALPN;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use trust_dist_proto::{
    AtomTable, Certificate, Policy, PublicKey, Revocations, SecretKey, TierOrder,
};

/// How loud a log line is; mapped onto `logger` levels by the NIF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Notice,
    Warning,
    Error,
}

/// Where the transport's log lines go.
pub trait Log: Send + Sync + 'static {
    fn log(&self, level: Level, message: String);

    /// A packet from a lower tier was refused (or, in audit mode, would have been).
    /// Reports are already rate limited per link.
    fn denied(&self, report: DenialReport) {
        self.log(Level::Warning, report.to_string());
    }
}

/// Receives links accepted from peers that passed every identity check.
pub trait Acceptor: Send + Sync + 'static {
    type Events: LinkEvents;
    /// Events of a connection that passed every check, created just before the link.
    fn new_events(&self) -> Arc<Self::Events>;
    /// `events` is what [`Acceptor::new_events`] returned for this link.
    fn accepted(&self, link: Link, events: Arc<Self::Events>);
}

/// Who this node is and whom it trusts.
pub struct NodeIdentity {
    pub secret: SecretKey,
    pub certificate: Certificate,
    pub authorities: Vec<PublicKey>,
    pub tiers: TierOrder,
    /// What each lower tier may do to this node.
    pub policy: Policy,
    /// The VM's atom table, asked whether an atom from a lower tier already exists.
    pub atoms: Arc<dyn AtomTable + Send + Sync>,
    /// Certificates and keys refused even though they verify.
    pub revocations: Revocations,
    /// Where `revocations` came from: watched, and reloaded when it changes.
    pub revocation_file: Option<std::path::PathBuf>,
}

impl NodeIdentity {
    pub fn tier(&self) -> &str {
        &self.certificate.body().tier
    }
}

/// Transport tunables. The defaults are measured choices for loopback and LAN links.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Largest frame accepted from a peer of the same tier. No link negotiates fragments,
    /// so a message is one packet whatever its size; restricted links hold the peer to its
    /// policy's `max_message_size` instead.
    pub max_frame: u32,
    /// Bytes handed to the VM and not yet acknowledged, per link, before reading pauses.
    pub recv_credit: usize,
    /// Most packets handed to the VM in one batch (one message to its input handler).
    pub batch_packets: usize,
    /// The least time a link sends on one lane after its data phase starts, so that the
    /// messages the VM queued while the connection was being set up go ahead of
    /// everything after them (see `link::SendLanes::opening`).
    pub opening: Duration,
    /// Bytes queued for QUIC above which the VM is told to stop sending.
    pub send_high_water: usize,
    /// Bytes queued below which a stopped sender is told to go on.
    pub send_low_water: usize,
    /// QUIC idle timeout: a silent peer is gone after this long.
    pub idle_timeout: Duration,
    /// Time allowed for QUIC, TLS and the certificate exchange.
    pub handshake_timeout: Duration,
    /// UDP socket send and receive buffer sizes asked of the kernel.
    pub socket_buffer: usize,
    /// How long the transport thread waits for a packet, yielding its core between looks,
    /// before it sleeps in the kernel (see `runtime::BusyPoll`); zero sleeps at once.
    pub busy_poll: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_frame: 128 * 1024 * 1024,
            recv_credit: 8 * 1024 * 1024,
            batch_packets: 256,
            opening: Duration::from_millis(250),
            send_high_water: 8 * 1024 * 1024,
            send_low_water: 2 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(7),
            socket_buffer: 4 * 1024 * 1024,
            busy_poll: Duration::from_micros(50),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot start the transport runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot bind UDP {addr}: {error} (port in use, or address not on this host)")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
}

/// The node's QUIC endpoint and the runtime it runs on.
pub struct Carrier {
    driver: Option<Driver>,
    endpoint: quinn::Endpoint,
    shared: Arc<CarrierShared>,
}

pub(crate) struct CarrierShared {
    pub(crate) identity: NodeIdentity,
    pub(crate) settings: Settings,
    pub(crate) log: Arc<dyn Log>,
    /// TLS and transport settings for outgoing and incoming connections. Each connection
    /// gets a copy with its own transport config (`client_config_for`,
    /// `server_config_for`).
    client_config: quinn::ClientConfig,
    server_config: quinn::ServerConfig,
    refusals: std::sync::Mutex<RefusalLimit>,
    /// The revocation list in force (the file's, as last read successfully).
    pub(crate) revocations: std::sync::RwLock<Revocations>,
    /// Every link, so that a revocation reaches connected peers too.
    pub(crate) links: std::sync::Mutex<Vec<std::sync::Weak<link::Shared>>>,
}

impl CarrierShared {
    /// The config for one outgoing connection: the carrier's, with a transport config
    /// whose congestion controller sees which lanes this connection's writers use.
    pub(crate) fn client_config_for(
        &self,
        sharing: Arc<congestion::LaneSharing>,
    ) -> quinn::ClientConfig {
        let mut config = self.client_config.clone();
        let transport = transport_config(&self.settings, Role::Client, sharing);
        config.transport_config(Arc::new(transport));
        config
    }

    /// The same for one incoming connection.
    pub(crate) fn server_config_for(
        &self,
        sharing: Arc<congestion::LaneSharing>,
    ) -> Arc<quinn::ServerConfig> {
        let mut config = self.server_config.clone();
        let transport = transport_config(&self.settings, Role::Server, sharing);
        config.transport_config(Arc::new(transport));
        Arc::new(config)
    }

    /// Logs a refused connection, at most [`REFUSALS_PER_WINDOW`] per
    /// [`REFUSAL_WINDOW`]: a flood of bad connection attempts must not become a flood of
    /// log lines. How many were not logged is said when logging resumes.
    pub(crate) fn refusal(&self, message: String) {
        let Ok(mut limit) = self.refusals.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if now.duration_since(limit.window_start) >= REFUSAL_WINDOW {
            if limit.suppressed > 0 {
                self.log.log(
                    Level::Warning,
                    format!(
                        "{} more refused connections were not logged",
                        limit.suppressed
                    ),
                );
            }
            *limit = RefusalLimit {
                window_start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if limit.logged < REFUSALS_PER_WINDOW {
            limit.logged += 1;
            self.log.log(Level::Warning, message);
        } else {
            limit.suppressed += 1;
        }
    }
}

/// How often the revocation file is looked at: a revoked peer is gone within about this.
const REVOCATION_POLL: Duration = Duration::from_millis(250);

/// Reloads the revocation list whenever its file changes, and disconnects every
/// connected peer it now revokes. Ends with the carrier.
async fn watch_revocations(carrier: std::sync::Weak<CarrierShared>, path: std::path::PathBuf) {
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        tokio::time::sleep(REVOCATION_POLL).await;
        let Some(carrier) = carrier.upgrade() else {
            return;
        };
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        if let Err(why) = carrier.reload_revocations() {
            carrier.log.log(
                Level::Warning,
                format!(
                    "revocation list {} not reloaded, the previous one stays in force: {why}",
                    path.display()
                ),
            );
        }
    }
}

impl CarrierShared {
    /// Reads the revocation file again; on success the new list is in force at once,
    /// for new connections and for every connected peer.
    pub(crate) fn reload_revocations(&self) -> Result<usize, String> {
        let Some(path) = &self.identity.revocation_file else {
            return Err("no revocation list is configured (key revoked)".into());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let list = Revocations::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let entries = list.len();
        if let Ok(mut current) = self.revocations.write() {
            *current = list;
        }
        self.log.log(
            Level::Notice,
            format!(
                "revocation list {} loaded: {entries} entries",
                path.display()
            ),
        );
        self.disconnect_revoked();
        Ok(entries)
    }

    /// Why this certificate and key are refused, if the revocation list says so.
    pub(crate) fn revoked(
        &self,
        certificate: &trust_dist_proto::CertificateBody,
        fingerprint: &str,
    ) -> Option<String> {
        self.revocations
            .read()
            .ok()?
            .check(certificate, fingerprint)
    }

    fn disconnect_revoked(&self) {
        let links: Vec<_> = match self.links.lock() {
            Ok(mut links) => {
                links.retain(|l| l.strong_count() > 0);
                links.iter().filter_map(|l| l.upgrade()).collect()
            }
            Err(_) => return,
        };
        for link in links {
            let peer = link.peer();
            if let Some(why) = self.revoked(&peer.certificate, &peer.fingerprint) {
                self.log.log(
                    Level::Warning,
                    format!(
                        "disconnecting {} ({}): {why}",
                        peer.certificate.node, peer.fingerprint
                    ),
                );
                link.revoke(&why);
            }
        }
    }
}

const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
const REFUSALS_PER_WINDOW: u32 = 20;

struct RefusalLimit {
    window_start: std::time::Instant,
    logged: u32,
    suppressed: u64,
}

impl Carrier {
    /// Binds `bind` (port 0 picks one) and starts the runtime. The endpoint serves both
    /// directions: it accepts once [`Carrier::start_accepting`] is called and connects
    /// whenever asked.
    pub fn start(
        identity: NodeIdentity,
        settings: Settings,
        bind: SocketAddr,
        log: Arc<dyn Log>,
    ) -> Result<Carrier, StartError> {
        let (socket, report) = bind_socket(bind, settings.socket_buffer)
            .map_err(|error| StartError::Bind { addr: bind, error })?;
        // Its second handle on the socket (a dup) fails only when the process is out of
        // file descriptors: a runtime failure, not the bind's.
        let busy_poll =
            runtime::BusyPoll::new(&socket, settings.busy_poll).map_err(StartError::Runtime)?;
        // One thread does all of the link's I/O. Under a bulk transfer its run queue is
        // never empty, and by default it looks at wake-ups from other threads (a packet the
        // VM just queued) only every 31 tasks and at the sockets only every 61, so a ping
        // waited milliseconds behind bulk work already queued; here both come round
        // every few tasks (ping round trip during a 1 MiB bulk transfer, median: ~8 ms
        // before, ~1 ms after, on the 2-core development machine). Before it sleeps it
        // waits a little for the next packet (`runtime::BusyPoll`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .global_queue_interval(2)
            .event_interval(4)
            .enable_all()
            .on_thread_park({
                let busy_poll = busy_poll.clone();
                move || busy_poll.before_park()
            })
            .on_thread_unpark(move || busy_poll.after_unpark())
            .build()
            .map_err(StartError::Runtime)?;
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(tls::server_config(&identity.secret)?));
        // Connections are accepted with a config of their own (`server_config_for`);
        // this one only lets the endpoint take connection attempts.
        server.transport_config(Arc::new(transport_config(
            &settings,
            Role::Server,
            Arc::new(congestion::LaneSharing::new()),
        )));
        server.migration(false);
        let client = quinn::ClientConfig::new(Arc::new(tls::client_config(&identity.secret)?));

        {
            // Logged from the runtime: the caller may be a BEAM scheduler thread.
            let log = log.clone();
            runtime.spawn(async move { log.log(report.level, report.message) });
        }
        let endpoint = {
            let _guard = runtime.enter();
            // No server config until start_accepting: incoming connections are refused.
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                Arc::new(runtime::TransportRuntime::new(runtime.handle().clone())),
            )
            .map_err(|error| StartError::Bind { addr: bind, error })?
        };
        let revocations = std::sync::RwLock::new(identity.revocations.clone());
        let shared = Arc::new(CarrierShared {
            revocations,
            links: std::sync::Mutex::new(Vec::new()),
            identity,
            settings,
            log,
            client_config: client,
            server_config: server,
            refusals: std::sync::Mutex::new(RefusalLimit {
                window_start: std::time::Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        });
        if let Some(path) = shared.identity.revocation_file.clone() {
            runtime.spawn(watch_revocations(Arc::downgrade(&shared), path));
        }
        let driver = Driver::start(runtime).map_err(StartError::Runtime)?;
        Ok(Carrier {
            driver: Some(driver),
            endpoint,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn identity(&self) -> &NodeIdentity {
        &self.shared.identity
    }

    /// Reads the revocation file now (it is also watched), returning its entry count.
    /// Blocks until the runtime has done it (log lines and disconnections must come from
    /// the runtime's thread): call it from a thread that may block.
    pub fn reload_revocations(&self) -> Result<usize, String> {
        let Some(handle) = self.handle() else {
            return Err("transport is shut down".into());
        };
        let shared = self.shared.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(shared.reload_revocations());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .map_err(|_| "the transport did not answer".to_string())?
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.driver.as_ref().map(|d| &d.handle)
    }

    /// Starts accepting connections; each verified one is handed to `acceptor`.
    pub fn start_accepting<A: Acceptor>(&self, acceptor: Arc<A>) {
        self.endpoint
            .set_server_config(Some(self.shared.server_config.clone()));
        let endpoint = self.endpoint.clone();
        let shared = self.shared.clone();
        if let Some(handle) = self.handle() {
            handle.spawn(async move {
                // Identity exchanges under way at once: beyond this, new connection
                // attempts are refused outright, so a flood of them cannot take the
                // runtime (and with it every established link) for itself.
                let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_ACCEPTS));
                while let Some(incoming) = endpoint.accept().await {
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        shared.refusal(format!(
                            "refused connection from {}: {MAX_PENDING_ACCEPTS} identity exchanges \
                             already under way",
                            incoming.remote_address()
                        ));
                        incoming.refuse();
                        continue;
                    };
                    let shared = shared.clone();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        link::accept(shared, incoming, acceptor).await;
                        drop(slot);
                    });
                }
            });
        }
    }

    /// Connects to `addr`, expecting the peer to be `expected_node`. `done` is called once
    /// with the verified link or the reason it failed.
    pub fn connect(
        &self,
        addr: SocketAddr,
        expected_node: String,
        events: Arc<dyn LinkEvents>,
        done: Box<dyn FnOnce(Result<Link, String>) + Send>,
    ) {
        let endpoint = self.endpoint.clone();
        let shared = self.shared.clone();
        match self.handle() {
            Some(handle) => {
                handle.spawn(async move {
                    let result = link::connect(shared, endpoint, addr, expected_node, events).await;
                    done(result);
                });
            }
            None => done(Err("transport is shut down".into())),
        }
    }

    /// Closes every connection and stops the runtime, waiting at most `timeout`.
    pub fn shutdown(mut self, timeout: Duration) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
        if let Some(driver) = self.driver.take() {
            driver.stop(Some((self.endpoint.clone(), timeout)));
        }
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopping");
        if let Some(driver) = self.driver.take() {
            driver.stop(None);
        }
    }
}

/// The runtime: single-threaded, driven by one thread of its own. Every task of the
/// carrier (endpoint, connections, links) runs there, so handing work between them never
/// wakes another thread; the only cross-thread wake-ups are the unavoidable ones between
/// this thread and the BEAM's schedulers.
struct Driver {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<Option<(quinn::Endpoint, Duration)>>,
    thread: std::thread::JoinHandle<()>,
}

impl Driver {
    fn start(runtime: tokio::runtime::Runtime) -> std::io::Result<Driver> {
        let handle = runtime.handle().clone();
        let (stop, stopped) =
            tokio::sync::oneshot::channel::<Option<(quinn::Endpoint, Duration)>>();
        let thread = std::thread::Builder::new()
            .name("trust_dist".into())
            .spawn(move || {
                let linger = runtime.block_on(async move {
                    match stopped.await {
                        // The close frames are written by the endpoint's driver task: let it
                        // run, or peers only notice the close at their idle timeout.
                        Ok(Some((endpoint, timeout))) => {
                            let started = std::time::Instant::now();
                            let _ = tokio::time::timeout(timeout, endpoint.wait_idle()).await;
                            timeout.saturating_sub(started.elapsed())
                        }
                        Ok(None) | Err(_) => Duration::ZERO,
                    }
                });
                runtime.shutdown_timeout(linger);
            })?;
        Ok(Driver {
            handle,
            stop,
            thread,
        })
    }

    /// Stops the runtime; with `Some`, first waits (bounded) for the endpoint to finish
    /// closing and joins the thread, with `None` lets it wind down on its own.
    fn stop(self, wait: Option<(quinn::Endpoint, Duration)>) {
        let join = wait.is_some();
        let _ = self.stop.send(wait);
        if join && std::thread::current().id() != self.thread.thread().id() {
            let _ = self.thread.join();
        }
    }
}

/// Largest UDP payload probed for by path MTU discovery.
const MTU_UPPER_BOUND: u16 = 16_384;

/// Which end of connections a transport configuration is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Server,
    Client,
}

/// Connection-level receive window once a peer is verified: room for several lanes'
/// stream windows at once, so lanes held back by their own flow control (a bulk transfer
/// the VM has not taken yet) do not use up the window the other lanes need.
pub(crate) const RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
/// The same for a peer of a lower tier: what it can park in our buffers stays near what
/// a single stream allowed before lanes.
pub(crate) const RESTRICTED_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Per-stream (per-lane) receive window.
const STREAM_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// Connection-level receive window before that: room for the hello and the handshake,
/// not for an unauthenticated peer to park megabytes in our buffers.
const UNVERIFIED_RECEIVE_WINDOW: u32 = 256 * 1024;
/// How long we ask a peer to wait at most before acknowledging (see `transport_config`).
const MAX_ACK_DELAY: Duration = Duration::from_millis(2);
/// Identity exchanges that may run at once on the accepting side.
const MAX_PENDING_ACCEPTS: usize = 64;

fn transport_config(
    settings: &Settings,
    role: Role,
    sharing: Arc<congestion::LaneSharing>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The streams a peer may open: the client opens the one bidirectional stream (lane
    // 0), and each side one unidirectional tick stream and one per further lane.
    let bidi: u32 = if role == Role::Server { 1 } else { 0 };
    t.max_concurrent_bidi_streams(bidi.into());
    t.max_concurrent_uni_streams((trust_dist_proto::lanes::LANES as u32).into());
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(match role {
        // Raised once the peer's certificate says how far it is trusted
        // (`link::open_receive_window`).
        Role::Server => UNVERIFIED_RECEIVE_WINDOW,
        Role::Client => RESTRICTED_RECEIVE_WINDOW,
    }));
    t.send_window(u64::from(RECEIVE_WINDOW));
    // Datagrams carry lane copies (`link::lane_copy`): small, and dropped oldest first
    // when either end holds too many.
    t.datagram_receive_buffer_size(Some(link::COPY_RECEIVE_BUFFER));
    t.datagram_send_buffer_size(link::COPY_SEND_BUFFER);
    // BBR paces to the path's measured bandwidth and RTT instead of halving at every
    // lost packet: under 1 % random loss at 50 ms RTT, CUBIC falls to the loss formula's
    // ~0.4 MB/s and holds a bulk transfer's queue for seconds, BBR moves ~50 MB/s with
    // pings at about the bare RTT (`make bench`, loss rows). Its window is capped at what
    // the path's delay needs, over a floor set by whether the connection's lanes share
    // it (`congestion.rs`).
    t.congestion_controller_factory(Arc::new(congestion::DelayBoundedConfig::new(sharing)));
    // Ask the peer to acknowledge within 2 ms rather than QUIC's 25 ms (the ACK frequency
    // extension, which both ends of a link support). Where one direction carries only a
    // reply now and then, as a ping's way back beside a bulk transfer does, a lost reply
    // is found only when its probe timeout expires, and that timeout includes the peer's
    // acknowledgement delay. Under 1 % loss at 50 ms RTT the ping's p99 during bulk fell
    // from 158 to 114 ms, its way back from 83 to 37 ms (`bench/run.sh --loss-only`, one
    // run each).
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency.max_ack_delay(Some(MAX_ACK_DELAY));
    t.ack_frequency_config(Some(ack_frequency));
    // The RTT assumed before the first sample sets how often an unanswered handshake is
    // retried (about three times it, doubling). QUIC's 333 ms default means a node that
    // dials a peer while it is down (as `global` does at nodedown) reaches it only about
    // 2 s after it is back; at 100 ms that is a few hundred ms, and a slower path costs
    // at most a spurious retransmission of the first packets.
    t.initial_rtt(Duration::from_millis(100));
    // Probe for path MTUs above the common 1452, up to what the peer accepts: quinn's
    // default `max_udp_payload_size` of 1472, which the endpoint keeps. Accepting 16 KiB
    // datagrams (so that loopback and jumbo-frame LANs could use them) measured no better
    // on loopback, where GSO already batches: one `bench/run.sh --quick` each, 1 MiB
    // messages 564 against 598 MB/s, raw quinn 366 against 591, ping p99 under bulk 23
    // against 8.6 ms.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    t.mtu_discovery_config(Some(mtu));
    if let Ok(idle) = quinn::IdleTimeout::try_from(settings.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // Keep-alives well inside the idle timeout, so an idle but live link is not dropped
    // by QUIC before net_ticktime would drop it.
    t.keep_alive_interval(Some(settings.idle_timeout / 4));
    t
}

/// What the kernel granted the UDP socket, for the log.
struct SocketReport {
    level: Level,
    message: String,
}

fn bind_socket(
    addr: SocketAddr,
    buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, SocketReport)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // A wildcard IPv6 bind also serves IPv4 (mapped) peers where the host allows it.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    // Linux reports twice the value it grants; anything below the request means the
    // kernel limit (net.core.rmem_max / wmem_max) capped it.
    let recv = socket.recv_buffer_size().unwrap_or(0);
    let send = socket.send_buffer_size().unwrap_or(0);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    let socket: std::net::UdpSocket = socket.into();
    // quinn-udp probes the same socket options quinn will use: segmentation offload on
    // send (GSO) and coalescing on receive (GRO).
    let (gso, gro) = quinn_udp::UdpSocketState::new((&socket).into())
        .map(|s| (s.max_gso_segments(), s.gro_segments()))
        .unwrap_or((1, 1));
    let report = if recv < buffer || send < buffer {
        SocketReport {
            level: Level::Warning,
            message: format!(
                "UDP socket buffers are {recv}/{send} bytes (recv/send), below the {buffer} asked \
                 for; raise net.core.rmem_max and net.core.wmem_max for full throughput"
            ),
        }
    } else {
        SocketReport {
            level: Level::Info,
            message: format!(
                "UDP {addr}: buffers {recv}/{send} bytes (recv/send), GSO up to {gso} segments, \
                 GRO {gro} segments"
            ),
        }
    };
    Ok((socket, report))
}

/// Unix seconds now, for certificate validity checks.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
