//! rustler glue between the BEAM and `trust_dist_net`: resources for the carrier and its
//! links, term conversion, and delivery of transport events to the owning Erlang
//! processes. Every NIF here is short and never blocks a scheduler, except `stop`, which
//! runs on a dirty I/O scheduler because it waits for the runtime to wind down.

use bytes::Bytes;
use rustler::{
    Binary, Encoder, Env, LocalPid, NifResult, OwnedBinary, OwnedEnv, ResourceArc, Term,
};
use std::any::Any;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use trust_dist_net::{
    Acceptor, Carrier, DenialReport, Frames, FramesBuilder, Level, Link, LinkEvents, Log,
    NodeIdentity, Packet, PacketBuffer, PeerInfo, Settings,
};
use trust_dist_proto::etf::{self, Atom, PidKey, Term as Etf};
use trust_dist_proto::frame;
use trust_dist_proto::{
    Assertion, AtomTable, Capability, Certificate, NodeId, Policy, PublicKey, Revocations,
    SecretKey, TierOrder, TierPolicy,
};

mod atoms {
    rustler::atoms! {
        ok, error, busy, closed,
        trust_dist_hs, trust_dist_in, trust_dist_writable, trust_dist_closed, trust_dist_resume,
        trust_dist_accepted, trust_dist_connected, trust_dist_connect_failed, trust_dist_log,
        debug, info, notice, warning,
        certified_as, tier, fingerprint, mode, cross_tier, address, serial, not_after, issuer, full, restricted,
        bytes_in, bytes_out, packets_in, packets_out, queued, lanes, reopenings, lane_moves, ticks_in, ticks_out, tail_probes, copies_out, copies_used, dropped_in, writes_in_place, sent_in_place,
        identity, certificate, authorities, tiers, listen, node_name, runtime,
        policy, assertions, counters, denied, trust_dist_denied, revoked,
        peer, op, reason, outcome, detail, suppressed,
    }
}

pub struct CarrierResource {
    carrier: Mutex<Option<Carrier>>,
}

#[rustler::resource_impl]
impl rustler::Resource for CarrierResource {}

pub struct LinkResource {
    link: Link,
    events: Arc<BeamEvents>,
}

#[rustler::resource_impl]
impl rustler::Resource for LinkResource {}

/// Sends transport events to the Erlang processes that own a link. During the
/// distribution handshake both owners are the connection supervisor; afterwards input goes
/// to the input handler and output events to the controller.
struct BeamEvents {
    owners: Mutex<(LocalPid, LocalPid)>,
}

impl BeamEvents {
    fn new(owner: LocalPid) -> Self {
        BeamEvents {
            owners: Mutex::new((owner, owner)),
        }
    }
    fn input(&self) -> Option<LocalPid> {
        self.owners.lock().ok().map(|o| o.0)
    }
    fn output(&self) -> Option<LocalPid> {
        self.owners.lock().ok().map(|o| o.1)
    }
}

/// A copy of `bytes` as a binary; None if the VM cannot allocate it.
fn make_binary<'a>(env: Env<'a>, bytes: &[u8]) -> Option<Term<'a>> {
    let mut bin = OwnedBinary::new(bytes.len())?;
    bin.as_mut_slice().copy_from_slice(bytes);
    Some(bin.release(env).encode(env))
}

/// A received packet's memory: a binary the VM allocated, which the transport fills from
/// QUIC's buffers and the VM then takes over as it is. (It must be an ordinary VM binary,
/// not a resource binary: ERTS decodes the large binaries of a distribution message as
/// sub-binaries of the packet, which it can only do for a binary it allocated.)
struct VmPacket(OwnedBinary);

impl PacketBuffer for VmPacket {
    fn bytes(&self) -> &[u8] {
        self.0.as_slice()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// A batch with a packet smaller than this is worth a yield of the I/O thread (see
/// `packets`): a message, a reply or a signal someone may be waiting for. Batches of
/// large messages alone do not yield; a bulk transfer of small messages still does.
const WAITED_FOR_PACKET: usize = 4096;

/// A received packet as a term: the VM binary it was read into, or a copy of packets the
/// transport built itself (a filter's rewrite).
fn packet_binary(env: Env<'_>, packet: Packet) -> Option<Term<'_>> {
    match packet.into_any().downcast::<VmPacket>() {
        Ok(vm) => Some(vm.0.release(env).encode(env)),
        Err(other) => match other.downcast::<Vec<u8>>() {
            Ok(bytes) => make_binary(env, &bytes),
            Err(_) => None,
        },
    }
}

fn send_to(pid: Option<LocalPid>, build: impl for<'a> FnOnce(Env<'a>) -> Term<'a>) -> bool {
    let Some(pid) = pid else { return false };
    let mut env = OwnedEnv::new();
    env.send_and_clear(&pid, build).is_ok()
}

impl LinkEvents for BeamEvents {
    // An allocation failure makes these return false, which ends the link: a lost
    // packet must never pass for a delivered one.
    fn handshake_frame(&self, frame: Vec<u8>) -> bool {
        let Some(pid) = self.input() else {
            return false;
        };
        let mut env = OwnedEnv::new();
        let mut allocated = true;
        let sent = env.send_and_clear(&pid, |env| match make_binary(env, &frame) {
            Some(bin) => (atoms::trust_dist_hs(), bin).encode(env),
            None => {
                allocated = false;
                atoms::error().encode(env)
            }
        });
        sent.is_ok() && allocated
    }

    fn packet_buffer(&self, len: usize) -> Option<Packet> {
        Some(Box::new(VmPacket(OwnedBinary::new(len)?)))
    }

    fn packets(&self, packets: Vec<Packet>) -> bool {
        let Some(pid) = self.input() else {
            return false;
        };
        let waited_for = packets.iter().any(|p| p.bytes().len() < WAITED_FOR_PACKET);
        let mut env = OwnedEnv::new();
        let mut allocated = true;
        let sent = env.send_and_clear(&pid, |env| {
            match packets
                .into_iter()
                .map(|p| packet_binary(env, p))
                .collect::<Option<Vec<Term>>>()
            {
                Some(list) => (atoms::trust_dist_in(), list).encode(env),
                None => {
                    allocated = false;
                    atoms::error().encode(env)
                }
            }
        });
        // This is the link's I/O thread, and on a machine whose cores it keeps busy (a
        // bulk transfer), the scheduler that takes these packets may be spinning for work
        // (the VM's busy wait yields its core rather than sleeping), so nothing makes it
        // run before the OS's next tick, 4 ms on this project's test machines. Giving the
        // core up here lets it run now: under a 1 MiB bulk transfer on the same link, the
        // median ping round trip fell from 1.9-6.3 ms to 0.34-0.48 ms (`make
        // contention`, three runs each); without contention the call returns at once.
        // Only for a batch with a packet someone may be waiting for: each yield also keeps
        // this thread, and the acknowledgements it sends, off the core, and a bulk
        // transfer's window (`congestion.rs`) waits for those.
        if waited_for {
            std::thread::yield_now();
        }
        sent.is_ok() && allocated
    }

    fn writable(&self) -> bool {
        send_to(self.output(), |env| {
            (atoms::trust_dist_writable(),).encode(env)
        })
    }

    fn resume(&self, pids: Vec<Vec<u8>>) -> bool {
        send_to(self.output(), |env| {
            (atoms::trust_dist_resume(), pid_terms(env, &pids)).encode(env)
        })
    }

    fn closed(&self, reason: &str) {
        let (input, output) = match self.owners.lock() {
            Ok(o) => (o.0, o.1),
            Err(_) => return,
        };
        send_to(Some(output), |env| {
            (atoms::trust_dist_closed(), reason).encode(env)
        });
        if input != output {
            send_to(Some(input), |env| {
                (atoms::trust_dist_closed(), reason).encode(env)
            });
        }
    }
}

struct BeamLog {
    pid: LocalPid,
}

/// The VM's atom table, asked from the transport thread whether an atom a lower tier
/// sent already exists. Only looks: it never creates one.
///
/// The lookup the NIF API offers on every supported OTP version takes Latin-1 text, so
/// an atom with characters beyond Latin-1 cannot be checked and counts as new: a lower
/// tier cannot send such atoms (UTF-8 lookup needs NIF 2.17, which OTP 25 lacks).
struct VmAtoms;

thread_local! {
    static LOOKUP_ENV: OwnedEnv = OwnedEnv::new();
}

impl AtomTable for VmAtoms {
    fn exists(&self, atom: Atom<'_>) -> bool {
        let lookup = |latin1: &[u8]| {
            LOOKUP_ENV.with(|owned| {
                owned.run(|env| matches!(rustler::Atom::try_from_bytes(env, latin1), Ok(Some(_))))
            })
        };
        if atom.text.is_ascii() {
            return lookup(atom.text);
        }
        match atom.to_latin1() {
            Some(latin1) => lookup(&latin1),
            None => false,
        }
    }
}

impl Log for BeamLog {
    fn denied(&self, report: DenialReport) {
        send_to(Some(self.pid), |env| {
            let pairs: Vec<(Term, Term)> = vec![
                (atoms::peer().encode(env), report.peer.encode(env)),
                (atoms::tier().encode(env), report.tier.encode(env)),
                (atoms::op().encode(env), report.op.encode(env)),
                (atoms::reason().encode(env), report.reason.encode(env)),
                (atoms::outcome().encode(env), report.outcome.encode(env)),
                (atoms::detail().encode(env), report.detail.encode(env)),
                (
                    atoms::suppressed().encode(env),
                    report.suppressed.encode(env),
                ),
            ];
            let map =
                Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env));
            (atoms::trust_dist_denied(), map).encode(env)
        });
    }

    fn log(&self, level: Level, message: String) {
        let level = match level {
            Level::Debug => atoms::debug(),
            Level::Info => atoms::info(),
            Level::Notice => atoms::notice(),
            Level::Warning => atoms::warning(),
            Level::Error => atoms::error(),
        };
        send_to(Some(self.pid), |env| {
            (atoms::trust_dist_log(), level, message).encode(env)
        });
    }
}

struct BeamAcceptor {
    pid: LocalPid,
}

impl Acceptor for BeamAcceptor {
    type Events = BeamEvents;

    fn new_events(&self) -> Arc<BeamEvents> {
        Arc::new(BeamEvents::new(self.pid))
    }

    fn accepted(&self, link: Link, events: Arc<BeamEvents>) {
        let info = link.peer().clone();
        let resource = ResourceArc::new(LinkResource { link, events });
        send_to(Some(self.pid), |env| {
            (
                atoms::trust_dist_accepted(),
                resource,
                peer_info(env, &info),
            )
                .encode(env)
        });
    }
}

fn peer_info<'a>(env: Env<'a>, peer: &PeerInfo) -> Term<'a> {
    let mode = match peer.mode {
        trust_dist_proto::LinkMode::Full => atoms::full(),
        trust_dist_proto::LinkMode::Restricted => atoms::restricted(),
    };
    let pairs: Vec<(Term, Term)> = vec![
        (
            atoms::certified_as().encode(env),
            peer.certificate.node.encode(env),
        ),
        (atoms::tier().encode(env), peer.certificate.tier.encode(env)),
        (
            atoms::fingerprint().encode(env),
            peer.fingerprint.encode(env),
        ),
        (atoms::mode().encode(env), mode.encode(env)),
        (atoms::cross_tier().encode(env), peer.cross_tier.encode(env)),
        (
            atoms::address().encode(env),
            address_term(env, peer.address),
        ),
        (
            atoms::serial().encode(env),
            peer.certificate.serial.encode(env),
        ),
        (
            atoms::not_after().encode(env),
            peer.certificate.not_after.encode(env),
        ),
        (
            atoms::issuer().encode(env),
            peer.certificate.issuer.to_string().encode(env),
        ),
    ];
    Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::error().encode(env))
}

/// `{IpTuple, Port}` as inet uses it; IPv4-mapped IPv6 addresses become IPv4.
fn address_term<'a>(env: Env<'a>, address: SocketAddr) -> Term<'a> {
    let ip = match address.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            (a, b, c, d).encode(env)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            rustler::types::tuple::make_tuple(
                env,
                &s.iter().map(|x| x.encode(env)).collect::<Vec<_>>(),
            )
        }
    };
    (ip, address.port()).encode(env)
}

type ConfigError = (rustler::Atom, String);

fn read_text(key: rustler::Atom, path: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| (key, format!("cannot read {path}: {e}")))
}

/// Refuses a private key that other users could read, as ssh does.
fn check_key_permissions(path: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| (atoms::identity(), format!("cannot read {path}: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            atoms::identity(),
            format!("private key {path} has mode {mode:o}; other users may read it. Run: chmod 600 {path}"),
        ));
    }
    Ok(())
}

/// Loads and cross-checks this node's key, certificate, authorities and tiers.
fn load_identity(
    key_path: &str,
    cert_path: &str,
    authority_paths: &[String],
    tiers: Vec<String>,
    node_name: &str,
    trust: Trust,
) -> Result<NodeIdentity, ConfigError> {
    check_key_permissions(key_path)?;
    let secret = SecretKey::from_pkcs8_pem(&read_text(atoms::identity(), key_path)?)
        .map_err(|e| (atoms::identity(), format!("{key_path}: {e}")))?;
    let certificate = Certificate::from_pem(&read_text(atoms::certificate(), cert_path)?)
        .map_err(|e| (atoms::certificate(), format!("{cert_path}: {e}")))?;
    let mut authorities = Vec::new();
    for path in authority_paths {
        let key = PublicKey::from_spki_pem(&read_text(atoms::authorities(), path)?)
            .map_err(|e| (atoms::authorities(), format!("{path}: {e}")))?;
        authorities.push(key);
    }
    if authorities.is_empty() {
        return Err((
            atoms::authorities(),
            "no authority is configured; no peer could be verified".into(),
        ));
    }
    let tiers = TierOrder::new(tiers).map_err(|e| (atoms::tiers(), e))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let body = certificate
        .verify(&authorities, now)
        .map_err(|e| (atoms::certificate(), format!("{cert_path}: {e}")))?;
    if body.public_key != secret.public() {
        return Err((
            atoms::certificate(),
            format!(
                "{cert_path} is for key {}, but the identity key is {}; they do not belong together",
                body.public_key.fingerprint(),
                secret.public().fingerprint()
            ),
        ));
    }
    if !trust_dist_proto::cert::node_matches(&body.node, node_name) {
        return Err((
            atoms::certificate(),
            format!(
                "{cert_path} is for node {:?}, but this node is {node_name:?}",
                body.node
            ),
        ));
    }
    if tiers.rank(&body.tier).is_none() {
        return Err((
            atoms::tiers(),
            format!(
                "this node's certificate tier {:?} is not in the configured tiers {:?}",
                body.tier,
                tiers.tiers()
            ),
        ));
    }
    let policy = build_policy(&tiers, trust.policy)?;
    let (revocations, revocation_file) = load_revocations(&trust.revoked)?;
    if let Some(why) = revocations.check(body, &body.public_key.fingerprint()) {
        return Err((
            atoms::revoked(),
            format!("this node's own certificate is revoked ({why}): every peer would refuse it; issue a new key and certificate"),
        ));
    }
    for assertion in trust.assertions {
        let assertion = build_assertion(assertion)?;
        trust_dist_proto::filter::check_assertion(&assertion, &policy, &tiers, &body.tier)
            .map_err(|e| (atoms::assertions(), e))?;
    }
    Ok(NodeIdentity {
        secret,
        certificate,
        authorities,
        tiers,
        policy,
        atoms: Arc::new(VmAtoms),
        revocations,
        revocation_file,
    })
}

/// One tier's policy as trust_dist_config validated it: `{Tier, #{Option => Value}}`
/// with names as binaries; options left out take the defaults of [`TierPolicy`].
struct TierOptions {
    tier: String,
    policy: TierPolicy,
}

impl<'a> rustler::Decoder<'a> for TierOptions {
    fn decode(term: Term<'a>) -> NifResult<Self> {
        let (tier, options): (String, Term<'a>) = term.decode()?;
        let env = term.get_env();
        let get = |key: &str| -> Option<Term<'a>> {
            options
                .map_get(rustler::Atom::from_str(env, key).ok()?.encode(env))
                .ok()
        };
        let mut policy = TierPolicy::default();
        if let Some(t) = get("registered") {
            policy.registered = t.decode::<Vec<String>>()?.into_iter().collect();
        }
        if let Some(t) = get("rpc") {
            policy.rpc = t
                .decode::<Vec<(String, String, u32)>>()?
                .into_iter()
                .collect();
        }
        if let Some(t) = get("max_message_size") {
            policy.max_message_size = t.decode()?;
        }
        if let Some(t) = get("funs") {
            policy.funs = t.decode()?;
        }
        if let Some(t) = get("connect") {
            policy.connect = t.decode()?;
        }
        if let Some(t) = get("audit") {
            policy.audit = t.decode()?;
        }
        if let Some(t) = get("max_monitors") {
            policy.max_monitors = t.decode()?;
        }
        if let Some(t) = get("max_depth") {
            policy.max_depth = t.decode()?;
        }
        Ok(TierOptions { tier, policy })
    }
}

/// `{Tier, May, Kind, Names, Number}`: an assertion as trust_dist_config normalised it.
type AssertionTerm = (String, bool, String, Vec<String>, u64);

struct Trust {
    policy: Vec<TierOptions>,
    assertions: Vec<AssertionTerm>,
    /// The revocation list's path; empty for none.
    revoked: String,
}

fn load_revocations(path: &str) -> Result<(Revocations, Option<std::path::PathBuf>), ConfigError> {
    if path.is_empty() {
        return Ok((Revocations::default(), None));
    }
    let text = read_text(atoms::revoked(), path)?;
    let list = Revocations::parse(&text).map_err(|e| (atoms::revoked(), format!("{path}: {e}")))?;
    Ok((list, Some(path.into())))
}

fn build_policy(tiers: &TierOrder, options: Vec<TierOptions>) -> Result<Policy, ConfigError> {
    let mut map = std::collections::BTreeMap::new();
    for o in options {
        if tiers.rank(&o.tier).is_none() {
            return Err((
                atoms::policy(),
                format!(
                    "has an entry for tier {}, which is not among the configured tiers {:?}",
                    o.tier,
                    tiers.tiers()
                ),
            ));
        }
        map.insert(o.tier, o.policy);
    }
    Policy::new(map).map_err(|e| (atoms::policy(), e))
}

fn build_assertion(
    (tier, may, kind, names, number): AssertionTerm,
) -> Result<Assertion, ConfigError> {
    let name = |i: usize| names.get(i).cloned().unwrap_or_default();
    let capability = match kind.as_str() {
        "spawn" => Capability::Spawn,
        "call" => Capability::Call(name(0), name(1), number as u32),
        "send" => Capability::Send(name(0)),
        "monitor" => Capability::Monitor(name(0)),
        "connect" => Capability::Connect,
        "exit" => Capability::Exit,
        "link" => Capability::Link,
        "group_leader" => Capability::GroupLeader,
        "funs" => Capability::Funs,
        "message_size" => Capability::MessageSize(number as usize),
        other => return Err((atoms::assertions(), format!("unknown capability {other}"))),
    };
    Ok(Assertion {
        tier,
        may,
        capability,
    })
}

#[derive(rustler::NifMap)]
struct StartOptions {
    identity: String,
    certificate: String,
    authorities: Vec<String>,
    tiers: Vec<String>,
    node_name: String,
    ip: String,
    port: u16,
    log: LocalPid,
    revoked: String,
    idle_timeout_ms: u64,
    handshake_timeout_ms: u64,
    max_frame: u32,
    busy_poll_us: u64,
}

#[rustler::nif]
fn start<'a>(
    env: Env<'a>,
    options: StartOptions,
    policy: Vec<TierOptions>,
    assertions: Vec<AssertionTerm>,
) -> NifResult<Term<'a>> {
    let error = |key: rustler::Atom, why: String| Ok((atoms::error(), (key, why)).encode(env));
    let identity = match load_identity(
        &options.identity,
        &options.certificate,
        &options.authorities,
        options.tiers,
        &options.node_name,
        Trust {
            policy,
            assertions,
            revoked: options.revoked,
        },
    ) {
        Ok(identity) => identity,
        Err((key, why)) => return error(key, why),
    };
    let ip: IpAddr = match options.ip.parse() {
        Ok(ip) => ip,
        Err(_) => {
            return error(
                atoms::listen(),
                format!("{:?} is not an IP address", options.ip),
            )
        }
    };
    let settings = Settings {
        idle_timeout: Duration::from_millis(options.idle_timeout_ms),
        handshake_timeout: Duration::from_millis(options.handshake_timeout_ms),
        max_frame: options.max_frame,
        busy_poll: Duration::from_micros(options.busy_poll_us),
        ..Settings::default()
    };
    let log = Arc::new(BeamLog { pid: options.log });
    match Carrier::start(identity, settings, SocketAddr::new(ip, options.port), log) {
        Ok(carrier) => {
            let resource = ResourceArc::new(CarrierResource {
                carrier: Mutex::new(Some(carrier)),
            });
            Ok((atoms::ok(), resource).encode(env))
        }
        Err(e) => error(atoms::listen(), e.to_string()),
    }
}

fn with_carrier<T>(resource: &CarrierResource, f: impl FnOnce(&Carrier) -> T) -> Option<T> {
    resource
        .carrier
        .lock()
        .ok()
        .and_then(|guard| guard.as_ref().map(f))
}

#[rustler::nif]
fn local_port(resource: ResourceArc<CarrierResource>) -> Option<u16> {
    with_carrier(&resource, |c| c.local_addr().ok().map(|a| a.port())).flatten()
}

#[rustler::nif]
fn accept(resource: ResourceArc<CarrierResource>, acceptor: LocalPid) -> rustler::Atom {
    match with_carrier(&resource, |c| {
        c.start_accepting(Arc::new(BeamAcceptor { pid: acceptor }))
    }) {
        Some(()) => atoms::ok(),
        None => atoms::closed(),
    }
}

#[rustler::nif]
fn connect(
    resource: ResourceArc<CarrierResource>,
    ip: String,
    port: u16,
    node: String,
    owner: LocalPid,
) -> NifResult<rustler::Atom> {
    let ip: IpAddr = ip.parse().map_err(|_| rustler::Error::BadArg)?;
    let events = Arc::new(BeamEvents::new(owner));
    let link_events = events.clone();
    let done = Box::new(move |result: Result<Link, String>| match result {
        Ok(link) => {
            let info = link.peer().clone();
            let resource = ResourceArc::new(LinkResource { link, events });
            send_to(Some(owner), |env| {
                (
                    atoms::trust_dist_connected(),
                    resource,
                    peer_info(env, &info),
                )
                    .encode(env)
            });
        }
        Err(why) => {
            send_to(Some(owner), |env| {
                (atoms::trust_dist_connect_failed(), why).encode(env)
            });
        }
    });
    match with_carrier(&resource, |c| {
        c.connect(SocketAddr::new(ip, port), node, link_events, done)
    }) {
        Some(()) => Ok(atoms::ok()),
        None => Ok(atoms::closed()),
    }
}

#[rustler::nif(schedule = "DirtyIo")]
fn stop(resource: ResourceArc<CarrierResource>) -> rustler::Atom {
    let carrier = resource
        .carrier
        .lock()
        .ok()
        .and_then(|mut guard| guard.take());
    if let Some(carrier) = carrier {
        carrier.shutdown(Duration::from_secs(2));
    }
    atoms::ok()
}

/// Hands the link's events to new owners. `closed` if the link has already ended: its
/// closed event may have gone to the previous owner.
#[rustler::nif]
fn set_owners(link: ResourceArc<LinkResource>, input: LocalPid, output: LocalPid) -> rustler::Atom {
    if let Ok(mut owners) = link.events.owners.lock() {
        *owners = (input, output);
    }
    if link.link.is_closed() {
        atoms::closed()
    } else {
        atoms::ok()
    }
}

#[rustler::nif]
fn recv_handshake(link: ResourceArc<LinkResource>) -> rustler::Atom {
    if link.link.request_handshake_frame() {
        atoms::ok()
    } else {
        atoms::closed()
    }
}

/// Queues packets for the peer. `packets` is a list whose elements are each one whole
/// packet: a binary or a list of binaries (the iovec `dist_ctrl_get_data` returns).
/// Returns `ok`, or `busy` when the caller must wait for `{trust_dist_writable}`; either
/// as `{Status, Pids}` when the lanes of those sending processes are over their
/// high-water mark: the caller pauses them until `{trust_dist_resume, Pids}`.
#[rustler::nif]
fn send<'a>(
    env: Env<'a>,
    link: ResourceArc<LinkResource>,
    packets: Vec<Term<'a>>,
) -> NifResult<Term<'a>> {
    let frames = frame_packets(&packets)?;
    let sent = link.link.send_frames(frames);
    let status = if sent.busy {
        atoms::busy()
    } else {
        atoms::ok()
    };
    Ok(if sent.pause.is_empty() {
        status.encode(env)
    } else {
        (status, pid_terms(env, &sent.pause)).encode(env)
    })
}

/// Queues packets behind a barrier: the peer delivers none of them before everything
/// queued before on any lane. `ok` or `busy`, as for send/2. For tooling and tests that
/// need an "everything before this has been judged" mark on a link.
#[rustler::nif]
fn send_barrier(link: ResourceArc<LinkResource>, packets: Vec<Term>) -> NifResult<rustler::Atom> {
    let frames = frame_packets(&packets)?;
    Ok(if link.link.send_barrier(frames) {
        atoms::ok()
    } else {
        atoms::busy()
    })
}

/// Binaries at least this long are sent from where the VM keeps them; shorter ones are
/// copied, which costs less than keeping a reference.
const SHARE_AT: usize = 64 * 1024;

/// Each packet (a binary or a list of binaries) as a length-prefixed frame.
fn frame_packets(packets: &[Term]) -> NifResult<Frames> {
    let mut parts: Vec<Vec<Term>> = Vec::with_capacity(packets.len());
    let mut copied = 0usize;
    for packet in packets {
        let chunks: Vec<Term> = if packet.is_binary() {
            vec![*packet]
        } else {
            packet.decode::<Vec<Term>>()?
        };
        let mut len = 0usize;
        for chunk in &chunks {
            let bin = chunk.decode::<Binary>()?;
            len += bin.len();
            if bin.len() < SHARE_AT {
                copied += bin.len();
            }
        }
        if u32::try_from(len).is_err() {
            return Err(rustler::Error::BadArg);
        }
        copied += frame::HEADER_BYTES;
        parts.push(chunks);
    }
    let mut frames = FramesBuilder::with_capacity(copied);
    for chunks in &parts {
        let bins = chunks
            .iter()
            .map(|c| c.decode::<Binary>())
            .collect::<NifResult<Vec<Binary>>>()?;
        let len: usize = bins.iter().map(|b| b.len()).sum();
        frames.begin(len as u32);
        for (bin, term) in bins.iter().zip(chunks) {
            if bin.len() >= SHARE_AT {
                frames.share(vm_bytes(*term).ok_or(rustler::Error::BadArg)?);
            } else {
                frames.copy(bin.as_slice());
            }
        }
    }
    Ok(frames.finish())
}

/// A binary's bytes where the VM keeps them, kept alive by a reference of our own: no
/// copy, however large.
fn vm_bytes(term: Term) -> Option<Bytes> {
    let env = OwnedEnv::new();
    let saved = env.save(term);
    let (ptr, len) = env.run(|env| {
        let bin = saved.load(env).decode::<Binary>().ok()?;
        Some((bin.as_slice().as_ptr(), bin.len()))
    })?;
    Some(Bytes::from_owner(VmBytes {
        _env: env,
        ptr,
        len,
    }))
}

/// Bytes of a binary held by a process-independent environment.
struct VmBytes {
    // The environment holds a reference to the binary (its refcount), which keeps its
    // bytes where they are until it is freed, whichever thread drops this.
    _env: OwnedEnv,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes stay allocated while `_env` holds its reference, and do not change:
// the binaries `dist_ctrl_get_data` hands out are the same ones ERTS gives a port driver
// to write at its own pace, which it guarantees immutable (a binary still open for
// appending is made ordinary before it is shared). `OwnedEnv` is itself `Send`.
unsafe impl Send for VmBytes {}
// SAFETY: only read, never written, through `as_ref`.
unsafe impl Sync for VmBytes {}

impl AsRef<[u8]> for VmBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` describe the binary's bytes as the VM gave them; see
        // the `Send` note above for why they stay valid and unchanged.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Pids from their external form as packets carry them (no version byte); any that do
/// not decode are left out.
fn pid_terms<'a>(env: Env<'a>, pids: &[Vec<u8>]) -> Vec<Term<'a>> {
    pids.iter()
        .filter_map(|pid| {
            let mut external = Vec::with_capacity(1 + pid.len());
            external.push(etf::VERSION);
            external.extend_from_slice(pid);
            env.binary_to_term(&external).map(|(term, _)| term)
        })
        .collect()
}

/// A pid's identity from its external form (`term_to_binary(Pid)`).
fn pid_from_binary(bin: &[u8]) -> Option<(String, PidKey)> {
    let rest = bin.strip_prefix(&[etf::VERSION])?;
    let pid = Etf::parse(rest).ok()?.0.as_pid()?;
    Some((pid.node.to_utf8(), pid.key()))
}

/// Starts the data phase. `me` is `term_to_binary(self())` (this node's name and
/// creation as pids carry them); `system` is `[{Name, term_to_binary(Pid)}]` for the
/// system processes running now.
#[rustler::nif]
fn start_data(
    link: ResourceArc<LinkResource>,
    me: Binary,
    system: Vec<(String, Binary)>,
) -> NifResult<rustler::Atom> {
    let (name, me) = pid_from_binary(me.as_slice()).ok_or(rustler::Error::BadArg)?;
    let local = NodeId {
        name,
        creation: me.creation,
    };
    let system = system
        .iter()
        .filter_map(|(name, pid)| Some((name.clone(), pid_from_binary(pid.as_slice())?.1)))
        .collect();
    Ok(if link.link.start_data(local, system) {
        atoms::ok()
    } else {
        atoms::closed()
    })
}

#[rustler::nif]
fn ack(link: ResourceArc<LinkResource>, bytes: usize) -> rustler::Atom {
    link.link.ack(bytes);
    atoms::ok()
}

#[rustler::nif]
fn tick(link: ResourceArc<LinkResource>) -> rustler::Atom {
    link.link.tick();
    atoms::ok()
}

/// `{ok, Received, Sent, Pending}` in the shape `dist_util` expects from getstat; the
/// received count includes partial frames and ticks, so a long transfer keeps the link
/// alive.
#[rustler::nif]
fn getstat(link: ResourceArc<LinkResource>) -> (rustler::Atom, u64, u64, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = link.link.stats();
    (
        atoms::ok(),
        s.bytes_in.load(Relaxed),
        s.packets_out.load(Relaxed),
        link.link.queued_bytes(),
    )
}

/// QUIC's view of the link, for operators: path RTT, congestion window, losses, and the
/// flow-control frames that show which side is holding data back.
fn quic_stats<'a>(env: Env<'a>, q: &trust_dist_net::ConnectionStats) -> NifResult<Term<'a>> {
    let fields: [(&str, u64); 14] = [
        ("rtt_us", q.path.rtt.as_micros() as u64),
        ("cwnd", q.path.cwnd),
        ("mtu", u64::from(q.path.current_mtu)),
        ("sent_packets", q.path.sent_packets),
        ("lost_packets", q.path.lost_packets),
        ("lost_bytes", q.path.lost_bytes),
        ("congestion_events", q.path.congestion_events),
        ("udp_tx_datagrams", q.udp_tx.datagrams),
        ("udp_rx_datagrams", q.udp_rx.datagrams),
        ("max_data_rx", q.frame_rx.max_data),
        ("max_stream_data_rx", q.frame_rx.max_stream_data),
        ("data_blocked_tx", q.frame_tx.data_blocked),
        ("stream_data_blocked_tx", q.frame_tx.stream_data_blocked),
        ("stream_data_blocked_rx", q.frame_rx.stream_data_blocked),
    ];
    let pairs = fields
        .iter()
        .map(|(k, v)| Ok((rustler::Atom::from_str(env, k)?.encode(env), v.encode(env))))
        .collect::<NifResult<Vec<(Term, Term)>>>()?;
    Term::map_from_pairs(env, &pairs)
}

#[rustler::nif]
fn stats<'a>(env: Env<'a>, link: ResourceArc<LinkResource>) -> NifResult<Term<'a>> {
    use std::sync::atomic::Ordering::Relaxed;
    let s = link.link.stats();
    let counters = [
        (atoms::bytes_in(), &s.bytes_in),
        (atoms::bytes_out(), &s.bytes_out),
        (atoms::packets_in(), &s.packets_in),
        (atoms::packets_out(), &s.packets_out),
        (atoms::ticks_in(), &s.ticks_in),
        (atoms::ticks_out(), &s.ticks_out),
        (atoms::tail_probes(), &s.tail_probes),
        (atoms::copies_out(), &s.copies_out),
        (atoms::copies_used(), &s.copies_used),
        (atoms::dropped_in(), &s.dropped_in),
        (atoms::writes_in_place(), &s.writes_in_place),
        (atoms::sent_in_place(), &s.sent_in_place),
    ];
    let mut pairs: Vec<(Term, Term)> = counters
        .iter()
        .map(|(name, counter)| (name.encode(env), counter.load(Relaxed).encode(env)))
        .collect();
    pairs.extend([
        (
            atoms::queued().encode(env),
            link.link.queued_bytes().encode(env),
        ),
        (
            atoms::lanes().encode(env),
            link.link.lanes_in_use().encode(env),
        ),
        (
            atoms::reopenings().encode(env),
            link.link.reopenings().encode(env),
        ),
        (
            atoms::lane_moves().encode(env),
            link.link.lane_moves().encode(env),
        ),
    ]);
    pairs.push((
        rustler::Atom::from_str(env, "quic")?.encode(env),
        quic_stats(env, &link.link.quic_stats())?,
    ));
    if let Some(counters) = link.link.filter_counters() {
        let (entries, refused) = (counters.entries(), counters.refused());
        // #{Op => #{Outcome => Count}}, names as binaries (the Erlang side makes atoms of
        // this fixed vocabulary).
        let mut by_op: std::collections::BTreeMap<&str, Vec<(Term, Term)>> = Default::default();
        for (op, outcome, n) in entries {
            by_op
                .entry(op)
                .or_default()
                .push((outcome.as_str().encode(env), n.encode(env)));
        }
        let mut ops = Vec::new();
        for (op, outcomes) in by_op {
            ops.push((op.encode(env), Term::map_from_pairs(env, &outcomes)?));
        }
        pairs.push((
            atoms::counters().encode(env),
            Term::map_from_pairs(env, &ops)?,
        ));
        pairs.push((atoms::denied().encode(env), refused.encode(env)));
    }
    Term::map_from_pairs(env, &pairs)
}

#[rustler::nif]
fn peer<'a>(env: Env<'a>, link: ResourceArc<LinkResource>) -> Term<'a> {
    peer_info(env, link.link.peer())
}

#[rustler::nif]
fn close(link: ResourceArc<LinkResource>, reason: String) -> rustler::Atom {
    link.link.close(&reason);
    atoms::ok()
}

/// Reads the revocation list again: `{ok, Entries}` or `{error, Why}`. Connected peers
/// it now revokes are disconnected.
#[rustler::nif(schedule = "DirtyIo")]
fn reload_revocations<'a>(env: Env<'a>, resource: ResourceArc<CarrierResource>) -> Term<'a> {
    match with_carrier(&resource, |c| c.reload_revocations()) {
        Some(Ok(n)) => (atoms::ok(), n).encode(env),
        Some(Err(why)) => (atoms::error(), why).encode(env),
        None => (atoms::error(), "the carrier is stopped").encode(env),
    }
}

/// OTP's system processes, by name: the filter's list, so that the Erlang side finds
/// their pids for it.
#[rustler::nif]
fn system_process_names(env: Env) -> Vec<rustler::Atom> {
    trust_dist_proto::policy::SYSTEM_PROCESS_NAMES
        .iter()
        .filter_map(|name| rustler::Atom::from_str(env, name).ok())
        .collect()
}

/// Every name the filter reports (operations, outcomes, reasons), as atoms. Called once
/// when the carrier starts, so that reports and counters never create an atom later:
/// a lower tier's traffic must not move this node's atom count at all.
#[rustler::nif]
fn vocabulary(env: Env) -> Vec<rustler::Atom> {
    use trust_dist_proto::control::Op;
    use trust_dist_proto::filter::{Outcome, Reason};
    Op::ALL
        .iter()
        .map(|op| op.name())
        .chain(Outcome::ALL.iter().map(|o| o.as_str()))
        .chain(Reason::ALL.iter().map(|r| r.as_str()))
        .chain(["undecodable", "packet", "refused"])
        .filter_map(|name| rustler::Atom::from_str(env, name).ok())
        .collect()
}

rustler::init!("trust_dist_nif");
