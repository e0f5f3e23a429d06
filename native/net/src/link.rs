//! One verified peer connection: the identity exchange, the reader and writer tasks, flow
//! control in both directions and per-link counters.
//!
//! Streams: the connecting side opens one bidirectional stream that carries, in order,
//! the hello (certificate) frames, the distribution handshake and then every distribution
//! packet, each as a length-prefixed frame. Each side also opens one unidirectional stream
//! on which it writes one byte per tick, so liveness never waits behind bulk data.

use crate::{tls, unix_now, Acceptor, CarrierShared};
use bytes::Bytes;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use trust_dist_proto::frame::{self, FrameDecoder};
use trust_dist_proto::handshake::{self, FrameBudget, NameGuard, Side, MAX_HANDSHAKE_FRAME};
use trust_dist_proto::link::{decide, LinkMode, LinkState, Verdict};
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
/// Most packets handed to the VM in one message.
const MAX_BATCH: usize = 256;

/// What the transport tells the layer above about one link. Each call returns false when
/// nobody is listening any more, which closes the link.
pub trait LinkEvents: Send + Sync + 'static {
    /// One distribution-handshake frame, in answer to [`Link::request_handshake_frame`].
    fn handshake_frame(&self, frame: Vec<u8>) -> bool;
    /// Distribution packets in order; their bytes are owed back through [`Link::ack`].
    fn packets(&self, packets: Vec<Vec<u8>>) -> bool;
    /// The send queue drained below its low-water mark after [`Link::send`] said busy.
    fn writable(&self) -> bool;
    /// The link is gone; `reason` says why.
    fn closed(&self, reason: &str);
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
    pub dropped_in: AtomicU64,
}

/// Bytes handed to the VM and not yet acknowledged, shared by the reader (which adds)
/// and the input handler's acks (which subtract).
#[derive(Default)]
struct Credit {
    outstanding: AtomicUsize,
    /// Set by the reader before it sleeps for lack of credit.
    waiting: AtomicBool,
    returned: tokio::sync::Notify,
}

enum ReaderCommand {
    RequestHandshakeFrame,
    StartData(LinkState),
}

struct Shared {
    carrier: Arc<CarrierShared>,
    connection: quinn::Connection,
    peer: PeerInfo,
    events: Arc<dyn LinkEvents>,
    stats: LinkStats,
    queued: AtomicUsize,
    blocked: AtomicBool,
    closed: AtomicBool,
    close_reason: Mutex<Option<String>>,
    credit: Credit,
    peer_name: Mutex<Option<handshake::NameMessage>>,
}

impl Shared {
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
    writer: mpsc::UnboundedSender<Outgoing>,
    ticker: mpsc::UnboundedSender<()>,
    reader: mpsc::UnboundedSender<ReaderCommand>,
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

    /// Bytes accepted by [`Link::send`] and not yet written to QUIC.
    pub fn queued_bytes(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
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
    /// credit, and each passes the link's policy decision.
    ///
    /// Returns false if the link has already ended.
    pub fn start_data(&self) -> bool {
        let name = self.peer_name();
        let state = LinkState {
            mode: self.shared.peer.mode,
            peer_node: name.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
            peer_tier: self.shared.peer.certificate.tier.clone(),
            peer_creation: name.map(|n| n.creation).unwrap_or(0),
        };
        self.reader.send(ReaderCommand::StartData(state)).is_ok() && !self.is_closed()
    }

    /// Returns credit for `bytes` of packets the VM has taken.
    ///
    /// An atomic, not a message: the reader is woken only if it is actually waiting for
    /// credit, so a busy link does not pay a cross-thread wake-up per batch.
    pub fn ack(&self, bytes: usize) {
        let credit = &self.shared.credit;
        let _ = credit
            .outstanding
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |o| {
                Some(o.saturating_sub(bytes))
            });
        if credit.waiting.swap(false, Ordering::SeqCst) {
            credit.returned.notify_one();
        }
    }

    /// Queues packets (each already a whole frame: length prefix and body) for sending.
    /// Returns false when the queue is above its high-water mark: the caller should stop
    /// and wait for [`LinkEvents::writable`].
    pub fn send(&self, frames: Bytes, packets: u64) -> bool {
        let len = frames.len();
        let shared = &self.shared;
        shared
            .stats
            .packets_out
            .fetch_add(packets, Ordering::Relaxed);
        let queued = shared.queued.fetch_add(len, Ordering::SeqCst) + len;
        if self.writer.send(Outgoing::Frames(frames)).is_err() {
            return true; // the link is closing; the closed event will follow
        }
        let settings = &shared.carrier.settings;
        if queued <= settings.send_high_water {
            return true;
        }
        shared.blocked.store(true, Ordering::SeqCst);
        // The writer may have drained below low water before `blocked` was visible to it.
        if shared.queued.load(Ordering::SeqCst) <= settings.send_low_water
            && shared.blocked.swap(false, Ordering::SeqCst)
        {
            return true;
        }
        false
    }

    /// Sends a tick on the tick stream.
    pub fn tick(&self) {
        let _ = self.ticker.send(());
    }

    /// Closes the link once everything queued before has reached the peer (bounded by
    /// [`CLOSE_FLUSH_TIMEOUT`]), as closing a TCP socket would: the last handshake
    /// status or exit signal a node sends is not lost to the close. `reason` is sent to
    /// the peer.
    pub fn close(&self, reason: &str) {
        if self
            .writer
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
    decoder: FrameDecoder,
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

    fn decode(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), frame::FrameError> {
        while !input.is_empty() {
            self.decoder.set_max_len(self.budget.limit());
            let (used, frame) = self.decoder.decode(input)?;
            input = &input[used..];
            if let Some(frame) = frame {
                self.budget.frame_done();
                out.push(frame);
            }
        }
        Ok(())
    }

    /// Bytes of a frame still being received.
    fn partial_bytes(&self) -> usize {
        self.decoder.buffered()
    }
}

/// Reads frames until `pending` holds at least `want` of them.
async fn read_frames(
    recv: &mut quinn::RecvStream,
    decoder: &mut Deframer,
    pending: &mut VecDeque<Vec<u8>>,
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
                    .decode(&chunk.bytes, &mut frames)
                    .map_err(|e| e.to_string())?;
                pending.extend(frames.drain(..));
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
    let result = tokio::time::timeout(timeout, async {
        let connection = incoming
            .await
            .map_err(|e| (None, format!("QUIC/TLS handshake failed: {e}")))?;
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
        let hello = pending.pop_front().unwrap_or_default();
        let peer = check_peer(&carrier, &connection, &hello).map_err(|e| fail(&connection, e))?;
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
                .on_peer_frame(first)
                .map_err(|e| fail(&connection, e.to_string()))?;
        }
        Ok::<_, (Option<quinn::Connection>, String)>((
            connection, send, recv, decoder, pending, guard, peer,
        ))
    })
    .await;
    match result {
        Ok(Ok((connection, send, recv, decoder, pending, guard, peer))) => {
            // Verified: now the peer may use the full window.
            connection.set_receive_window(quinn::VarInt::from_u32(crate::RECEIVE_WINDOW));
            let events = acceptor.new_events();
            let link = spawn_link(
                carrier,
                connection,
                peer,
                events.clone(),
                send,
                recv,
                decoder,
                pending,
                guard,
            );
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

/// Client side: TLS, our hello, the server's hello checked and bound to `expected_node`.
pub(crate) async fn connect(
    carrier: Arc<CarrierShared>,
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    addr: SocketAddr,
    expected_node: String,
    events: Arc<dyn LinkEvents>,
) -> Result<Link, String> {
    let timeout = carrier.settings.handshake_timeout;
    let attempt = async {
        let connecting = endpoint
            .connect_with(config, addr, "trust-dist")
            .map_err(|e| (None, format!("cannot connect to {addr}: {e}")))?;
        let connection = connecting
            .await
            .map_err(|e| (None, format!("QUIC/TLS handshake with {addr} failed: {e}")))?;
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
        let hello = pending.pop_front().unwrap_or_default();
        let peer = check_peer(&carrier, &connection, &hello).map_err(|e| fail(&connection, e))?;
        handshake::check_dialled(&peer.certificate.node, &expected_node)
            .map_err(|e| fail(&connection, e.to_string()))?;
        let guard = NameGuard::new(Side::Connecting, &expected_node);
        Ok::<_, (Option<quinn::Connection>, String)>((
            connection, send, recv, decoder, pending, guard, peer,
        ))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((connection, send, recv, decoder, pending, guard, peer))) => Ok(spawn_link(
            carrier, connection, peer, events, send, recv, decoder, pending, guard,
        )),
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

#[allow(clippy::too_many_arguments)]
fn spawn_link(
    carrier: Arc<CarrierShared>,
    connection: quinn::Connection,
    peer: PeerInfo,
    events: Arc<dyn LinkEvents>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: Deframer,
    pending: VecDeque<Vec<u8>>,
    guard: NameGuard,
) -> Link {
    let shared = Arc::new(Shared {
        carrier,
        connection: connection.clone(),
        peer,
        events,
        stats: LinkStats::default(),
        queued: AtomicUsize::new(0),
        blocked: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        close_reason: Mutex::new(None),
        credit: Credit::default(),
        peer_name: Mutex::new(guard.peer().cloned()),
    });
    let (writer_tx, writer_rx) = mpsc::unbounded_channel();
    let (tick_tx, tick_rx) = mpsc::unbounded_channel();
    let (reader_tx, reader_rx) = mpsc::unbounded_channel();
    tokio::spawn(writer(shared.clone(), send, writer_rx));
    tokio::spawn(ticker(shared.clone(), tick_rx));
    tokio::spawn(tick_reader(shared.clone()));
    let reading = shared.clone();
    tokio::spawn(async move {
        let (code, reason) = reader(&reading, recv, reader_rx, decoder, pending, guard).await;
        reading.finish(code, &reason);
    });
    Link {
        shared,
        writer: writer_tx,
        ticker: tick_tx,
        reader: reader_tx,
    }
}

/// What the writer task is asked to do, in order.
enum Outgoing {
    Frames(Bytes),
    /// Finish the stream, wait for the peer to have it all, then close the connection.
    Close(String),
}

async fn writer(
    shared: Arc<Shared>,
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut closing = None;
        match first {
            Outgoing::Frames(frames) => batch.push(frames),
            Outgoing::Close(reason) => closing = Some(reason),
        }
        while batch.len() < 64 && closing.is_none() {
            match rx.try_recv() {
                Ok(Outgoing::Frames(more)) => batch.push(more),
                Ok(Outgoing::Close(reason)) => closing = Some(reason),
                Err(_) => break,
            }
        }
        if let Some(reason) = closing {
            let _ = send.write_all_chunks(&mut batch).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, send.stopped()).await;
            shared.close(CLOSE_NORMAL, &reason);
            return;
        }
        let len: usize = batch.iter().map(|b| b.len()).sum();
        if let Err(e) = send.write_all_chunks(&mut batch).await {
            shared.close(CLOSE_NORMAL, &format!("write failed: {e}"));
            return;
        }
        batch.clear();
        shared
            .stats
            .bytes_out
            .fetch_add(len as u64, Ordering::Relaxed);
        let queued = shared.queued.fetch_sub(len, Ordering::SeqCst) - len;
        if queued <= shared.carrier.settings.send_low_water
            && shared.blocked.load(Ordering::SeqCst)
            && shared.blocked.swap(false, Ordering::SeqCst)
            && !shared.events.writable()
        {
            shared.close(CLOSE_NORMAL, "the distribution controller is gone");
            return;
        }
    }
}

async fn ticker(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<()>) {
    let mut stream: Option<quinn::SendStream> = None;
    while rx.recv().await.is_some() {
        if stream.is_none() {
            match shared.connection.open_uni().await {
                Ok(s) => {
                    // Ticks go ahead of bulk data when both are waiting.
                    let _ = s.set_priority(1);
                    stream = Some(s);
                }
                Err(_) => return,
            }
        }
        if let Some(s) = stream.as_mut() {
            if s.write_all(&[0]).await.is_err() {
                return;
            }
            shared.stats.ticks_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn tick_reader(shared: Arc<Shared>) {
    let Ok(mut stream) = shared.connection.accept_uni().await else {
        return;
    };
    let mut buf = [0u8; 64];
    while let Ok(Some(n)) = stream.read(&mut buf).await {
        shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        shared.stats.ticks_in.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Runs until the link ends and returns the close code and reason.
async fn reader(
    shared: &Shared,
    mut recv: quinn::RecvStream,
    mut commands: mpsc::UnboundedReceiver<ReaderCommand>,
    mut decoder: Deframer,
    mut pending: VecDeque<Vec<u8>>,
    mut guard: NameGuard,
) -> (u32, String) {
    let credit = shared.carrier.settings.recv_credit;
    let mut link: Option<LinkState> = None;
    let mut requested = 0usize;
    let outstanding = || shared.credit.outstanding.load(Ordering::SeqCst);
    // On the accepting side the first frame was checked before the link was reported;
    // frames still pending behind it are checked here, as are all frames on the
    // connecting side.
    let mut checked = pending.len().min(usize::from(guard.is_done()));
    let mut frames = Vec::new();
    let mut ended: Option<(u32, String)> = None;
    loop {
        while checked < pending.len() && !guard.is_done() {
            if let Err(e) = guard.on_peer_frame(&pending[checked]) {
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
                        if !shared.events.handshake_frame(frame) {
                            return (CLOSE_NORMAL, "the handshake process is gone".into());
                        }
                    }
                }
            }
            Some(state) => {
                if outstanding() < credit && !pending.is_empty() {
                    let mut batch = Vec::with_capacity(pending.len().min(MAX_BATCH));
                    let mut taken = 0usize;
                    while outstanding() + taken < credit && batch.len() < MAX_BATCH {
                        let Some(packet) = pending.pop_front() else {
                            break;
                        };
                        match decide(state, &packet) {
                            Verdict::Deliver => {
                                taken += packet.len();
                                batch.push(packet);
                            }
                            Verdict::Drop(_) => {
                                shared.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                            }
                            Verdict::Close(why) => {
                                return (CLOSE_PROTOCOL, why.into());
                            }
                        }
                    }
                    shared.credit.outstanding.fetch_add(taken, Ordering::SeqCst);
                    checked = pending.len();
                    shared
                        .stats
                        .packets_in
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if !batch.is_empty() && !shared.events.packets(batch) {
                        return (
                            CLOSE_NORMAL,
                            "the distribution input handler is gone".into(),
                        );
                    }
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
                Some(state) => {
                    let mut batch = Vec::with_capacity(pending.len());
                    for packet in pending.drain(..) {
                        match decide(state, &packet) {
                            Verdict::Deliver => batch.push(packet),
                            Verdict::Drop(_) => {
                                shared.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
                            }
                            Verdict::Close(_) => break,
                        }
                    }
                    shared
                        .stats
                        .packets_in
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    if !batch.is_empty() {
                        shared.events.packets(batch);
                    }
                    return (*code, reason.clone());
                }
            }
        }
        // Out of credit: sleep until an ack brings some back. Announce it first, then look
        // again, and decide on reading from that same look, so an ack that lands in
        // between is never missed (acks only ever lower `outstanding`).
        let mut starved = link.is_some() && outstanding() >= credit;
        if starved {
            shared.credit.waiting.store(true, Ordering::SeqCst);
            starved = outstanding() >= credit;
        }
        if link.is_some() && !pending.is_empty() && !starved {
            // Packets wait and credit remains (a batch went up, or an ack just came):
            // hand up the next batch now; sleeping here would wait for an ack that may
            // never be owed.
            tokio::task::yield_now().await;
            continue;
        }
        let want_read = ended.is_none()
            && match &link {
                // Before the data phase only handshake messages are due: read a little
                // ahead, never much.
                None => {
                    pending.iter().map(Vec::len).sum::<usize>() + decoder.partial_bytes()
                        < PRE_START_BUFFER
                }
                Some(_) => pending.is_empty() && !starved,
            };
        tokio::select! {
            command = commands.recv() => match command {
                None => return (CLOSE_NORMAL, "link released".into()),
                Some(ReaderCommand::RequestHandshakeFrame) => requested += 1,
                Some(ReaderCommand::StartData(state)) => link = Some(state),
            },
            _ = shared.credit.returned.notified(), if starved => {}
            chunk = recv.read_chunk(READ_CHUNK, true), if want_read => match chunk {
                Ok(Some(chunk)) => {
                    shared.stats.bytes_in.fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                    if let Err(e) = decoder.decode(&chunk.bytes, &mut frames) {
                        return (CLOSE_PROTOCOL, e.to_string());
                    }
                    for frame in frames.drain(..) {
                        if frame.is_empty() {
                            shared.stats.ticks_in.fetch_add(1, Ordering::Relaxed);
                        } else {
                            pending.push_back(frame);
                        }
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
