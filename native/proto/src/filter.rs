//! The filter of a restricted link: what a lower-tier peer may do to this node, decided
//! packet by packet by [`LinkFilter::decide`], with the bookkeeping that makes "answer
//! only" precise — what this node handed to the peer (capabilities), and the links,
//! monitors and spawn requests this node created on the link.
//!
//! Everything the peer sends is decoded here and nowhere else. Outgoing packets are
//! observed by [`LinkFilter::observe_outgoing`] before they are written, so a grant is
//! always recorded before the peer can use it.
//!
//! # Memory bound
//!
//! Every table is bounded ([`Limits`]); when one is full its oldest entry is evicted.
//! Eviction can only make the filter stricter: a reply to something long forgotten is
//! dropped (and logged) rather than delivered. With the default limits a link's tables
//! hold at most about 200 000 entries of at most 40 bytes each, under 8 MiB per link
//! even counting hash-table overhead, whatever the peer does.

use crate::control::{self, altact, Control, DecodeError, Op, Packet, Proc, Target};
use crate::etf::{
    self, Atom, FunKind, Pid, PidKey, Port, PortKey, RefKey, Reference, Term, Visitor,
};
use crate::policy::{Assertion, Capability, TierPolicy};
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Tells whether an atom already exists on this node (the VM's atom table).
pub trait AtomTable {
    fn exists(&self, atom: Atom<'_>) -> bool;
}

/// A node as pids name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeId {
    pub name: String,
    pub creation: u32,
}

/// Table sizes of one link's filter.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub granted_pids: usize,
    pub granted_refs: usize,
    pub granted_ports: usize,
    pub group_leaders: usize,
    pub links: usize,
    pub unlinks: usize,
    pub monitors: usize,
    pub spawns: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            granted_pids: 16_384,
            granted_refs: 65_536,
            granted_ports: 1_024,
            group_leaders: 1_024,
            links: 16_384,
            unlinks: 4_096,
            monitors: 65_536,
            spawns: 16_384,
        }
    }
}
/// How many stale insertions a [`Bounded`] may keep before it compacts, at the least.
const BOUNDED_SLACK: usize = 1024;

/// A map that forgets its least recently inserted entry when full. Inserting a key that
/// is already present makes it the newest again: a pid handed to the peer over and over
/// (a long-lived caller) must not be forgotten because it was first handed out long ago.
struct Bounded<K, V> {
    /// Each entry with the stamp of its latest insertion.
    map: HashMap<K, (V, u64)>,
    /// Insertions in order; an element whose stamp is no longer its key's is stale.
    order: VecDeque<(K, u64)>,
    next: u64,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V> Bounded<K, V> {
    fn new(cap: usize) -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
            next: 0,
            cap: cap.max(1),
        }
    }

    fn insert(&mut self, key: K, value: V) {
        let stamp = self.next;
        self.next += 1;
        self.map.insert(key, (value, stamp));
        self.order.push_back((key, stamp));
        while self.map.len() > self.cap {
            match self.order.pop_front() {
                Some((old, stamp)) => {
                    if self.map.get(&old).is_some_and(|(_, s)| *s == stamp) {
                        self.map.remove(&old);
                    }
                }
                None => break,
            }
        }
        // Stale elements (re-inserted or removed keys) linger in `order`; compact once
        // they outnumber the live ones (each compaction at least halves `order`, so the
        // cost per insertion stays constant), and give back what a burst left behind. A
        // table whose entries come and go (a monitor per call) then stays as small as
        // what is live in it, not its capacity.
        if self.order.len() > 2 * self.map.len().max(BOUNDED_SLACK) {
            let map = &self.map;
            self.order
                .retain(|(k, stamp)| map.get(k).is_some_and(|(_, s)| s == stamp));
            if self.order.capacity() > 4 * self.order.len().max(BOUNDED_SLACK) {
                self.order
                    .shrink_to(2 * self.order.len().max(BOUNDED_SLACK));
            }
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        let removed = self.map.remove(key).map(|(v, _)| v);
        // After a burst, the map keeps the room it grew to; give most of it back.
        if self.map.capacity() > 8 * self.map.len().max(BOUNDED_SLACK) {
            self.map.shrink_to(2 * self.map.len().max(BOUNDED_SLACK));
        }
        removed
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Why a packet was refused (or would have been, in audit mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Malformed,
    UnknownOperation,
    Oversized,
    TooDeep,
    SpoofedSender,
    NewAtom,
    Fun,
    ThirdNodeIdentity,
    UngrantedIdentity,
    SpawnDenied,
    ExitDenied,
    GroupLeaderDenied,
    LinkDenied,
    ObsoleteUnlink,
    NotGranted,
    SystemProcess,
    NameNotAllowed,
    SystemMessage,
    ForgedSignal,
    IoRequest,
    AdminCommand,
    UnknownLink,
    UnknownMonitor,
    UnknownSpawnRequest,
    MonitorLimit,
    MonitorNotAllowed,
    ForgedReplyTo,
    ReusedReference,
}

impl Reason {
    /// Whether audit mode may deliver what this reason refuses: the policy's grants and
    /// allowlists are what a deployment tries out; what protects the node whatever the
    /// policy says (atoms, identities, system processes and messages, io and admin
    /// requests) stays enforced.
    pub fn audit_may_deliver(self) -> bool {
        matches!(
            self,
            Reason::SpawnDenied
                | Reason::ExitDenied
                | Reason::GroupLeaderDenied
                | Reason::LinkDenied
                | Reason::NotGranted
                | Reason::NameNotAllowed
                | Reason::UngrantedIdentity
                | Reason::Fun
                | Reason::UnknownLink
                | Reason::UnknownMonitor
                | Reason::UnknownSpawnRequest
                | Reason::MonitorLimit
                | Reason::MonitorNotAllowed
        )
    }

    pub const ALL: [Reason; 28] = [
        Reason::Malformed,
        Reason::UnknownOperation,
        Reason::Oversized,
        Reason::TooDeep,
        Reason::SpoofedSender,
        Reason::NewAtom,
        Reason::Fun,
        Reason::ThirdNodeIdentity,
        Reason::UngrantedIdentity,
        Reason::SpawnDenied,
        Reason::ExitDenied,
        Reason::GroupLeaderDenied,
        Reason::LinkDenied,
        Reason::ObsoleteUnlink,
        Reason::NotGranted,
        Reason::SystemProcess,
        Reason::NameNotAllowed,
        Reason::SystemMessage,
        Reason::ForgedSignal,
        Reason::IoRequest,
        Reason::AdminCommand,
        Reason::UnknownLink,
        Reason::UnknownMonitor,
        Reason::UnknownSpawnRequest,
        Reason::MonitorLimit,
        Reason::MonitorNotAllowed,
        Reason::ForgedReplyTo,
        Reason::ReusedReference,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::UnknownOperation => "unknown_operation",
            Reason::Oversized => "oversized",
            Reason::TooDeep => "too_deep",
            Reason::SpoofedSender => "spoofed_sender",
            Reason::NewAtom => "new_atom",
            Reason::Fun => "fun_refused",
            Reason::ThirdNodeIdentity => "third_node_identity",
            Reason::UngrantedIdentity => "ungranted_local_identity",
            Reason::SpawnDenied => "spawn_denied",
            Reason::ExitDenied => "exit_denied",
            Reason::GroupLeaderDenied => "group_leader_denied",
            Reason::LinkDenied => "link_denied",
            Reason::ObsoleteUnlink => "obsolete_unlink",
            Reason::NotGranted => "pid_or_alias_not_granted",
            Reason::SystemProcess => "system_process",
            Reason::NameNotAllowed => "name_not_allowed",
            Reason::SystemMessage => "system_message",
            Reason::ForgedSignal => "forged_signal_message",
            Reason::IoRequest => "io_request",
            Reason::AdminCommand => "admin_command",
            Reason::UnknownLink => "unknown_link",
            Reason::UnknownMonitor => "unknown_monitor",
            Reason::UnknownSpawnRequest => "unknown_spawn_request",
            Reason::MonitorLimit => "monitor_limit",
            Reason::MonitorNotAllowed => "monitor_not_allowed",
            Reason::ForgedReplyTo => "forged_reply_to",
            Reason::ReusedReference => "reused_reference",
        }
    }
}

/// What happens to one incoming packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the VM unchanged.
    Deliver,
    /// Hand this instead: the same signal without its sequential-trace token, which a
    /// lower tier may not plant in this node's processes.
    DeliverRewritten(Vec<u8>),
    /// Drop it.
    Drop,
    /// Drop it and send this packet back, so the peer's caller fails at once instead of
    /// waiting forever.
    Answer(Vec<u8>),
    /// End the link.
    Close,
}

/// The decision on one packet, with what the counters and the log need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub op: Option<Op>,
    pub verdict: Verdict,
    pub reason: Option<Reason>,
    /// True when audit mode delivered a packet the policy refuses.
    pub audited: bool,
    /// More about a refusal: the name, the atom, the decode error.
    pub detail: String,
}

/// Counter columns, by what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered = 0,
    Dropped = 1,
    Answered = 2,
    Closed = 3,
    Audited = 4,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Delivered,
        Outcome::Dropped,
        Outcome::Answered,
        Outcome::Closed,
        Outcome::Audited,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Dropped => "dropped",
            Outcome::Answered => "answered",
            Outcome::Closed => "closed",
            Outcome::Audited => "audited",
        }
    }
}

impl Decision {
    pub fn outcome(&self) -> Outcome {
        match self.verdict {
            _ if self.audited => Outcome::Audited,
            Verdict::Deliver | Verdict::DeliverRewritten(_) => Outcome::Delivered,
            Verdict::Drop => Outcome::Dropped,
            Verdict::Answer(_) => Outcome::Answered,
            Verdict::Close => Outcome::Closed,
        }
    }

    pub fn is_refusal(&self) -> bool {
        self.reason.is_some()
    }
}

/// Per-link counters: packets by operation (index = op code; 0 = undecodable) and outcome.
#[derive(Debug, Clone)]
pub struct Counters([[u64; 5]; 38]);

impl Default for Counters {
    fn default() -> Self {
        Counters([[0; 5]; 38])
    }
}

impl Counters {
    fn add(&mut self, op: Option<Op>, outcome: Outcome) {
        let i = op.map_or(0, |op| op as usize);
        if let Some(row) = self.0.get_mut(i) {
            row[outcome as usize] += 1;
        }
    }

    /// Non-zero counts as (operation name, outcome, count).
    pub fn entries(&self) -> Vec<(&'static str, Outcome, u64)> {
        let mut out = Vec::new();
        for (i, row) in self.0.iter().enumerate() {
            let name = if i == 0 {
                "undecodable"
            } else {
                match Op::from_code(i as i64) {
                    Some(op) => op.name(),
                    None => continue,
                }
            };
            for outcome in Outcome::ALL {
                let n = row[outcome as usize];
                if n > 0 {
                    out.push((name, outcome, n));
                }
            }
        }
        out
    }

    pub fn refused(&self) -> u64 {
        self.0
            .iter()
            .map(|r| {
                r[Outcome::Dropped as usize]
                    + r[Outcome::Answered as usize]
                    + r[Outcome::Closed as usize]
                    + r[Outcome::Audited as usize]
            })
            .sum()
    }
}

/// A spawn request this node made on the link.
#[derive(Debug, Clone, Copy)]
struct SpawnMade {
    from: PidKey,
    /// The `link` and `monitor` options of the request: a reply may only confirm these.
    link: bool,
    monitor: bool,
}

/// The filter state of one restricted link.
pub struct LinkFilter {
    local: NodeId,
    peer: NodeId,
    policy: TierPolicy,
    /// This node's system processes (pid → registered name) when the link started.
    system: HashMap<PidKey, String>,
    /// Local pids, aliases and ports that appeared in data sent to the peer.
    granted_pids: Bounded<PidKey, ()>,
    granted_refs: Bounded<RefKey, ()>,
    granted_ports: Bounded<PortKey, ()>,
    /// Group leaders this node gave processes it spawned on the peer: io requests may go
    /// to these.
    group_leaders: Bounded<PidKey, ()>,
    /// Links between a local process and a peer process.
    links: Bounded<(PidKey, PidKey), ()>,
    /// Unlinks this node started, awaiting the peer's ack.
    unlinks: Bounded<u64, (PidKey, PidKey)>,
    /// Monitors this node's processes hold on the peer's: reference → watcher.
    monitors: Bounded<RefKey, PidKey>,
    /// Spawn requests this node sent, awaiting their reply.
    spawns: Bounded<RefKey, SpawnMade>,
    /// Monitors the peer holds on this node's processes.
    peer_monitors: Bounded<RefKey, ()>,
    counters: Counters,
}

/// What a scan of a term found that the policy cares about.
struct Scan<'f> {
    filter: &'f LinkFilter,
    atoms: &'f dyn AtomTable,
    /// Off for the control message, whose identifiers the rules check one by one.
    identifiers: bool,
    problem: Option<(Reason, String)>,
}

impl Scan<'_> {
    fn flag(&mut self, reason: Reason, detail: impl FnOnce() -> String) {
        if self.problem.is_none() {
            self.problem = Some((reason, detail()));
        }
    }

    /// Local, the peer's, or a third node's (refused: it would make this node connect
    /// wherever the peer points it).
    fn node_of(&mut self, node: Atom<'_>) -> Option<bool> {
        if !self.identifiers {
            return None;
        }
        if node.is(&self.filter.local.name) {
            Some(true)
        } else if node.is(&self.filter.peer.name) {
            Some(false)
        } else {
            self.flag(Reason::ThirdNodeIdentity, || node.to_utf8());
            None
        }
    }
}

impl<'a> Visitor<'a> for Scan<'_> {
    fn atom(&mut self, atom: Atom<'a>) {
        // The two node names of the link exist; most atoms in a packet are these.
        if self.problem.is_some()
            || atom.is(&self.filter.local.name)
            || atom.is(&self.filter.peer.name)
        {
            return;
        }
        if !self.atoms.exists(atom) {
            self.flag(Reason::NewAtom, || atom.to_utf8());
        }
    }

    fn pid(&mut self, pid: Pid<'a>) {
        if self.node_of(pid.node) == Some(true) && !self.filter.granted_pids.contains(&pid.key()) {
            self.flag(Reason::UngrantedIdentity, || {
                format!("pid <{}.{}>", pid.id, pid.serial)
            });
        }
    }

    fn port(&mut self, port: Port<'a>) {
        if self.node_of(port.node) == Some(true) && !self.filter.granted_ports.contains(&port.key())
        {
            self.flag(Reason::UngrantedIdentity, || format!("port #{}", port.id));
        }
    }

    fn reference(&mut self, reference: Reference<'a>) {
        if self.node_of(reference.node) == Some(true)
            && !self.filter.granted_refs.contains(&reference.key())
        {
            self.flag(Reason::UngrantedIdentity, || "reference".into());
        }
    }

    fn fun(&mut self, kind: FunKind) {
        if !self.filter.policy.funs {
            self.flag(Reason::Fun, || {
                match kind {
                    FunKind::Closure => "closure",
                    FunKind::Export => "fun M:F/A",
                }
                .into()
            });
        }
    }
}

/// Records the local identifiers in data sent to the peer.
struct Grants<'f> {
    filter: &'f mut LinkFilter,
}

impl<'a> Visitor<'a> for Grants<'_> {
    fn pid(&mut self, pid: Pid<'a>) {
        if pid.node.is(&self.filter.local.name) {
            self.filter.granted_pids.insert(pid.key(), ());
        }
    }
    fn port(&mut self, port: Port<'a>) {
        if port.node.is(&self.filter.local.name) {
            self.filter.granted_ports.insert(port.key(), ());
        }
    }
    fn reference(&mut self, reference: Reference<'a>) {
        if reference.node.is(&self.filter.local.name) {
            self.filter.granted_refs.insert(reference.key(), ());
        }
    }
}

/// The outcome of the op-specific rules, before audit mode and counting.
enum Rule {
    Deliver,
    Refuse(Reason, String),
    Answer(Reason, String, Vec<u8>),
    /// Something no real VM sends: the link ends.
    Close(Reason, String),
}

fn refuse(reason: Reason, detail: impl Into<String>) -> Rule {
    Rule::Refuse(reason, detail.into())
}

impl LinkFilter {
    pub fn new(
        local: NodeId,
        peer: NodeId,
        policy: TierPolicy,
        system: Vec<(String, PidKey)>,
    ) -> Self {
        Self::with_limits(local, peer, policy, system, Limits::default())
    }

    pub fn with_limits(
        local: NodeId,
        peer: NodeId,
        policy: TierPolicy,
        system: Vec<(String, PidKey)>,
        limits: Limits,
    ) -> Self {
        let max_monitors = policy.max_monitors;
        LinkFilter {
            local,
            peer,
            policy,
            system: system.into_iter().map(|(n, p)| (p, n)).collect(),
            granted_pids: Bounded::new(limits.granted_pids),
            granted_refs: Bounded::new(limits.granted_refs),
            granted_ports: Bounded::new(limits.granted_ports),
            group_leaders: Bounded::new(limits.group_leaders),
            links: Bounded::new(limits.links),
            unlinks: Bounded::new(limits.unlinks),
            monitors: Bounded::new(limits.monitors),
            spawns: Bounded::new(limits.spawns),
            peer_monitors: Bounded::new(max_monitors),
            counters: Counters::default(),
        }
    }

    pub fn policy(&self) -> &TierPolicy {
        &self.policy
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Counts a packet the transport dropped unread for exceeding the message limit.
    pub fn record_oversized(&mut self, len: usize) -> Decision {
        let decision = Decision {
            op: None,
            verdict: Verdict::Drop,
            reason: Some(Reason::Oversized),
            audited: false,
            detail: format!("{len} bytes, limit {}", self.policy.max_message_size),
        };
        self.counters.add(None, decision.outcome());
        decision
    }

    /// The decision on one packet from the peer: the one place where a lower tier's
    /// traffic is judged. Updates the link's bookkeeping and counters.
    pub fn decide(&mut self, packet: &[u8], atoms: &dyn AtomTable) -> Decision {
        let mut decision = self.judge(packet, atoms);
        if self.policy.audit
            && matches!(decision.verdict, Verdict::Drop | Verdict::Answer(_))
            && decision.reason.is_some_and(Reason::audit_may_deliver)
        {
            decision.verdict = Verdict::Deliver;
            decision.audited = true;
        }
        self.counters.add(decision.op, decision.outcome());
        decision
    }

    fn judge(&mut self, packet: &[u8], atoms: &dyn AtomTable) -> Decision {
        let done = |op, verdict, reason, detail: String| Decision {
            op,
            verdict,
            reason,
            audited: false,
            detail,
        };
        if packet.len() > self.policy.max_message_size {
            return done(
                None,
                Verdict::Drop,
                Some(Reason::Oversized),
                format!(
                    "{} bytes, limit {}",
                    packet.len(),
                    self.policy.max_message_size
                ),
            );
        }
        let decoded = match control::decode(packet) {
            Ok(p) => p,
            Err(e) => {
                let reason = match e {
                    DecodeError::UnknownOp(_) => Reason::UnknownOperation,
                    _ => Reason::Malformed,
                };
                return done(None, Verdict::Close, Some(reason), e.to_string());
            }
        };
        let op = Some(decoded.op);
        if decoded.op == Op::NodeLink {
            return done(
                op,
                Verdict::Close,
                Some(Reason::UnknownOperation),
                "NODE_LINK is obsolete".into(),
            );
        }
        // Every atom, identifier and fun in the control message and the payload.
        if let Some((reason, detail)) = self.scan(&decoded, atoms) {
            let verdict = match (reason, self.refusal_answer(&decoded)) {
                (Reason::Malformed, _) => Verdict::Close,
                (_, Some(answer)) => Verdict::Answer(answer),
                (_, None) => Verdict::Drop,
            };
            return done(op, verdict, Some(reason), detail);
        }
        match self.rules(&decoded) {
            Rule::Deliver => {
                let verdict = match decoded.token {
                    Some(_) => match strip_token(&decoded) {
                        Ok(bytes) => Verdict::DeliverRewritten(bytes),
                        Err(e) => {
                            return done(op, Verdict::Close, Some(Reason::Malformed), e.to_string())
                        }
                    },
                    None => Verdict::Deliver,
                };
                done(op, verdict, None, String::new())
            }
            Rule::Refuse(reason, detail) => done(op, Verdict::Drop, Some(reason), detail),
            Rule::Close(reason, detail) => done(op, Verdict::Close, Some(reason), detail),
            Rule::Answer(reason, detail, answer) => {
                done(op, Verdict::Answer(answer), Some(reason), detail)
            }
        }
    }

    /// The answer that spares the peer's caller a wait when a request of one of its
    /// processes is refused: a spawn reply `notsup`, a monitor exit or a link exit
    /// `noproc`. None for anything else, or when the sender is not the peer's.
    fn refusal_answer(&self, p: &Packet<'_>) -> Option<Vec<u8>> {
        match p.control {
            Control::SpawnRequest { req_id, from, .. } if self.is_peer(&from) => {
                Some(control::answer::spawn_error(req_id.raw, from.raw, "notsup"))
            }
            Control::MonitorP {
                from, reference, ..
            } if self.is_peer(&from) => {
                let (term, _) = Term::parse(p.control_bytes).ok()?;
                let target = term.as_tuple()?.raw(2).ok()?;
                Some(control::answer::monitor_exit(
                    target,
                    from.raw,
                    reference.raw,
                    "noproc",
                ))
            }
            Control::Link { from, to } if self.is_peer(&from) && self.is_local(&to) => {
                Some(control::answer::link_exit(to.raw, from.raw, "noproc"))
            }
            _ => None,
        }
    }

    /// Scans the control message (atoms only: its identifiers are checked by the rules)
    /// and the payload (atoms, identifiers, funs, depth).
    fn scan(&self, packet: &Packet<'_>, atoms: &dyn AtomTable) -> Option<(Reason, String)> {
        let mut scan = Scan {
            filter: self,
            atoms,
            identifiers: false,
            problem: None,
        };
        if let Err(e) = etf::walk(packet.control_bytes, 16, &mut scan) {
            return Some((Reason::Malformed, e.to_string()));
        }
        scan.identifiers = true;
        // The reason some operations carry inside the control message is a free term
        // like a payload; the rules look at the other elements one by one.
        match control_reason(packet) {
            Ok(Some(reason)) => {
                if let Err(e) = etf::walk(reason, self.policy.max_depth, &mut scan) {
                    return Some((Reason::Malformed, e.to_string()));
                }
            }
            Ok(None) => {}
            Err(e) => return Some((Reason::Malformed, e.to_string())),
        }
        if let Some(payload) = packet.payload {
            match etf::walk(payload, self.policy.max_depth, &mut scan) {
                Ok(_) => {}
                Err(etf::EtfError::TooDeep(n)) => {
                    return Some((Reason::TooDeep, format!("deeper than {n}")))
                }
                Err(e) => return Some((Reason::Malformed, e.to_string())),
            }
        }
        scan.problem
    }

    fn is_peer(&self, pid: &Pid<'_>) -> bool {
        pid.node.is(&self.peer.name) && pid.creation == self.peer.creation
    }

    fn is_local(&self, pid: &Pid<'_>) -> bool {
        pid.node.is(&self.local.name)
    }

    /// The sender check: every sender element must be a process of the peer, as its
    /// handshake named it.
    fn sender(&self, pid: &Pid<'_>) -> Result<(), Rule> {
        if self.is_peer(pid) {
            Ok(())
        } else {
            Err(refuse(
                Reason::SpoofedSender,
                format!(
                    "sender <{}.{}> of {} (creation {})",
                    pid.id,
                    pid.serial,
                    pid.node.to_utf8(),
                    pid.creation
                ),
            ))
        }
    }

    /// A local process the peer addresses by pid: granted, and not a system process.
    fn granted_pid(&self, pid: &Pid<'_>) -> Result<PidKey, Rule> {
        if !self.is_local(pid) {
            return Err(refuse(Reason::ThirdNodeIdentity, pid.node.to_utf8()));
        }
        let key = pid.key();
        if let Some(name) = self.system.get(&key) {
            return Err(refuse(Reason::SystemProcess, name.clone()));
        }
        if !self.granted_pids.contains(&key) {
            return Err(refuse(
                Reason::NotGranted,
                format!("<0.{}.{}>", pid.id, pid.serial),
            ));
        }
        Ok(key)
    }

    fn rules(&mut self, p: &Packet<'_>) -> Rule {
        match self.rules_inner(p) {
            Ok(rule) | Err(rule) => rule,
        }
    }

    fn rules_inner(&mut self, p: &Packet<'_>) -> Result<Rule, Rule> {
        use Control as C;
        Ok(match p.control {
            C::Send { to } => {
                self.message_to_pid(&to, None, p.payload)?;
                Rule::Deliver
            }
            C::SendSender { from, to } => {
                self.sender(&from)?;
                self.message_to_pid(&to, Some(&from), p.payload)?;
                Rule::Deliver
            }
            C::RegSend { from, to } => {
                self.sender(&from)?;
                self.message_to_name(&to, &from, p.payload)?;
                Rule::Deliver
            }
            C::AliasSend { from, alias } => {
                self.sender(&from)?;
                self.message_to_alias(&alias, Some(&from), p.payload)?;
                Rule::Deliver
            }
            C::AltactSigSend { flags, from, to } => {
                self.sender(&from)?;
                if flags & altact::EXIT != 0 {
                    return Err(refuse(
                        Reason::ExitDenied,
                        "exit signal through alternate action",
                    ));
                }
                match to {
                    Target::Pid(pid) => self.message_to_pid(&pid, Some(&from), p.payload)?,
                    Target::Alias(alias) => {
                        self.message_to_alias(&alias, Some(&from), p.payload)?
                    }
                    Target::Name(name) => self.message_to_name(&name, &from, p.payload)?,
                }
                Rule::Deliver
            }
            C::Exit { from, to } => {
                self.sender(&from)?;
                let key = (to.key(), from.key());
                if !self.is_local(&to) || self.links.remove(&key).is_none() {
                    return Err(refuse(
                        Reason::UnknownLink,
                        "exit for a link this node did not create",
                    ));
                }
                Rule::Deliver
            }
            C::Exit2 { from, .. } => {
                self.sender(&from)?;
                refuse(Reason::ExitDenied, "exit/2 from a lower tier")
            }
            C::GroupLeader { from, .. } => {
                self.sender(&from)?;
                refuse(
                    Reason::GroupLeaderDenied,
                    "group leader change from a lower tier",
                )
            }
            C::Link { from, to } => {
                self.sender(&from)?;
                if !self.is_local(&to) {
                    return Err(refuse(Reason::ThirdNodeIdentity, to.node.to_utf8()));
                }
                Rule::Answer(
                    Reason::LinkDenied,
                    "link from a lower tier".into(),
                    self.refusal_answer(p).unwrap_or_default(),
                )
            }
            C::Unlink { from, .. } => {
                self.sender(&from)?;
                refuse(Reason::ObsoleteUnlink, "pre-OTP 26 unlink")
            }
            C::UnlinkId { from, to, .. } => {
                // The peer drops a link; only links this node created exist.
                self.sender(&from)?;
                if !self.is_local(&to) || self.links.remove(&(to.key(), from.key())).is_none() {
                    return Err(refuse(
                        Reason::UnknownLink,
                        "unlink of a link this node did not create",
                    ));
                }
                Rule::Deliver
            }
            C::UnlinkIdAck { id, from, to } => {
                self.sender(&from)?;
                match self.unlinks.get(&id) {
                    Some(&(local, remote))
                        if local == to.key() && remote == from.key() && self.is_local(&to) =>
                    {
                        self.unlinks.remove(&id);
                        self.links.remove(&(local, remote));
                        Rule::Deliver
                    }
                    _ => refuse(
                        Reason::UnknownLink,
                        format!("unlink ack {id} for no unlink of this node"),
                    ),
                }
            }
            C::MonitorPExit {
                from,
                to,
                reference,
            } => {
                if let Proc::Pid(pid) = from {
                    self.sender(&pid)?;
                }
                let key = reference.key();
                match self.monitors.get(&key) {
                    Some(watcher)
                        if *watcher == to.key()
                            && self.is_local(&to)
                            && reference.node.is(&self.local.name) =>
                    {
                        self.monitors.remove(&key);
                        Rule::Deliver
                    }
                    _ => refuse(
                        Reason::UnknownMonitor,
                        "monitor exit for a monitor this node did not create",
                    ),
                }
            }
            C::MonitorP {
                from,
                to,
                reference,
            } => {
                self.sender(&from)?;
                self.peer_monitor(p, &to, &reference)?
            }
            C::DemonitorP {
                from, reference, ..
            } => {
                self.sender(&from)?;
                if !reference.node.is(&self.peer.name)
                    || self.peer_monitors.remove(&reference.key()).is_none()
                {
                    return Err(refuse(
                        Reason::UnknownMonitor,
                        "demonitor of no monitor the peer holds",
                    ));
                }
                Rule::Deliver
            }
            C::SpawnRequest {
                req_id,
                from,
                group_leader,
                module,
                function,
                options,
                ..
            } => {
                self.sender(&from)?;
                self.spawn_request(p, &req_id, &group_leader, module, function, options)?
            }
            C::SpawnReply {
                req_id,
                to,
                flags,
                result,
            } => {
                let key = req_id.key();
                let ours = self.is_local(&to) && req_id.node.is(&self.local.name);
                let made = match self.spawns.get(&key) {
                    Some(m) if m.from == to.key() && ours => *m,
                    _ => {
                        return Err(refuse(
                            Reason::UnknownSpawnRequest,
                            "spawn reply to no request of this node",
                        ))
                    }
                };
                if flags & !3 != 0
                    || (flags & 1 != 0 && !made.link)
                    || (flags & 2 != 0 && !made.monitor)
                {
                    return Err(Rule::Close(
                        Reason::UnknownSpawnRequest,
                        format!("spawn reply flags {flags} that the request did not ask for"),
                    ));
                }
                if let Term::Pid(child) = result {
                    self.sender(&child)?;
                    if flags & 1 != 0 {
                        self.links.insert((made.from, child.key()), ());
                    }
                    if flags & 2 != 0 {
                        self.monitors.insert(key, made.from);
                    }
                }
                self.spawns.remove(&key);
                Rule::Deliver
            }
            C::NodeLink => refuse(Reason::UnknownOperation, "NODE_LINK"),
        })
    }

    /// A message to a local pid: granted and not a system process, or an io request to a
    /// group leader this node gave a process spawned on the peer, or `rex`'s feature
    /// reply.
    fn message_to_pid(
        &self,
        to: &Pid<'_>,
        from: Option<&Pid<'_>>,
        payload: Option<&[u8]>,
    ) -> Result<(), Rule> {
        let shape = Shape::of(payload);
        // A group leader this node gave a process spawned on the peer takes the io
        // requests that process makes: output only (see `plain_output_request`).
        if self.is_local(to) && self.group_leaders.contains(&to.key()) && shape == Shape::IoRequest
        {
            return match from {
                Some(from) if plain_output_request(payload, from) => Ok(()),
                _ => Err(refuse(
                    Reason::IoRequest,
                    "io request other than plain output (put_chars of data, getopts, geometry)",
                )),
            };
        }
        if self.is_local(to)
            && self.system.get(&to.key()).map(String::as_str) == Some("rex")
            && from.is_some_and(|f| self.is_peer(f))
            && shape == Shape::FeaturesReply
        {
            return Ok(());
        }
        self.granted_pid(to)?;
        self.check_shape(shape, payload, from)
    }

    fn message_to_alias(
        &self,
        alias: &Reference<'_>,
        from: Option<&Pid<'_>>,
        payload: Option<&[u8]>,
    ) -> Result<(), Rule> {
        if !alias.node.is(&self.local.name) {
            return Err(refuse(Reason::ThirdNodeIdentity, alias.node.to_utf8()));
        }
        if !self.granted_refs.contains(&alias.key()) {
            return Err(refuse(Reason::NotGranted, "alias"));
        }
        self.check_shape(Shape::of(payload), payload, from)
    }

    fn message_to_name(
        &self,
        name: &Atom<'_>,
        from: &Pid<'_>,
        payload: Option<&[u8]>,
    ) -> Result<(), Rule> {
        let text = name.to_utf8();
        let shape = Shape::of(payload);
        // The narrow shapes plain distribution needs.
        match text.as_str() {
            "net_kernel" if shape.is_auth_call(payload, from, &self.peer.name) => return Ok(()),
            "rex" if shape == Shape::FeaturesRequest && features_request_from(payload, from) => {
                return Ok(())
            }
            _ => {}
        }
        if crate::policy::is_system_name(&text) {
            return Err(refuse(Reason::SystemProcess, text));
        }
        if !self.policy.registered.contains(&text) {
            return Err(refuse(Reason::NameNotAllowed, text));
        }
        self.check_shape(shape, payload, Some(from))
    }

    /// What no message from a lower tier may be, whoever it goes to.
    fn check_shape(
        &self,
        shape: Shape,
        payload: Option<&[u8]>,
        from: Option<&Pid<'_>>,
    ) -> Result<(), Rule> {
        match shape {
            Shape::System => Err(refuse(Reason::SystemMessage, "{system, From, Request}")),
            Shape::ForgedSignal(what) => Err(refuse(Reason::ForgedSignal, what)),
            Shape::IoRequest => Err(refuse(
                Reason::IoRequest,
                "io request to a process that is not a granted group leader",
            )),
            Shape::AdminCall(what) => Err(refuse(Reason::AdminCommand, what)),
            // gen_server and gen_statem send their reply to whatever the call names as
            // its caller: a registered name, another node. Only the sender may be it.
            Shape::GenCall if !from.is_some_and(|f| reply_to_is(payload, f)) => Err(refuse(
                Reason::ForgedReplyTo,
                "a call whose reply would go to someone other than its sender",
            )),
            _ => Ok(()),
        }
    }

    fn peer_monitor(
        &mut self,
        p: &Packet<'_>,
        to: &Proc<'_>,
        reference: &Reference<'_>,
    ) -> Result<Rule, Rule> {
        let allowed = match to {
            Proc::Pid(pid) => self.granted_pid(pid).map(|_| ()),
            Proc::Name(name) => {
                let text = name.to_utf8();
                if text == "net_kernel" || self.policy.registered.contains(&text) {
                    Ok(())
                } else {
                    Err(refuse(Reason::MonitorNotAllowed, text))
                }
            }
        };
        let noproc = || self.refusal_answer(p).unwrap_or_default();
        if !reference.node.is(&self.peer.name) {
            return Err(refuse(
                Reason::SpoofedSender,
                "monitor reference of another node",
            ));
        }
        // The VM makes a new monitor per request, whatever its reference: a reused one
        // would escape the count. No real VM reuses a reference.
        if self.peer_monitors.contains(&reference.key()) {
            return Err(Rule::Close(
                Reason::ReusedReference,
                "monitor reference already in use".into(),
            ));
        }
        match allowed {
            Ok(()) if self.peer_monitors.len() >= self.policy.max_monitors => Ok(Rule::Answer(
                Reason::MonitorLimit,
                format!("{} monitors held", self.peer_monitors.len()),
                noproc(),
            )),
            Ok(()) => {
                self.peer_monitors.insert(reference.key(), ());
                Ok(Rule::Deliver)
            }
            Err(Rule::Refuse(reason, detail)) => Ok(Rule::Answer(reason, detail, noproc())),
            Err(other) => Err(other),
        }
    }

    fn spawn_request(
        &mut self,
        p: &Packet<'_>,
        req_id: &Reference<'_>,
        group_leader: &Pid<'_>,
        module: Atom<'_>,
        function: Atom<'_>,
        options: Term<'_>,
    ) -> Result<Rule, Rule> {
        let notsup = |reason, detail: String| {
            Rule::Answer(reason, detail, self.refusal_answer(p).unwrap_or_default())
        };
        let Some((m, f, a)) = real_mfa(module, function, p.payload) else {
            return Ok(notsup(
                Reason::SpawnDenied,
                format!("{}:{}", module.to_utf8(), function.to_utf8()),
            ));
        };
        if !self.policy.allows_rpc(&m, &f, a) {
            return Ok(notsup(Reason::SpawnDenied, format!("{m}:{f}/{a}")));
        }
        // Only options that concern the caller or the process's own message queue; not
        // priority, heap sizes or anything else that lets a lower tier tune this node.
        let plain = match options {
            Term::Nil => true,
            Term::List(seq) => seq
                .iter()
                .all(|o| o.is_ok_and(|o| allowed_spawn_option(&o))),
            _ => false,
        };
        if !plain {
            return Ok(notsup(
                Reason::SpawnDenied,
                format!("{m}:{f}/{a} with spawn options"),
            ));
        }
        if !req_id.node.is(&self.peer.name) {
            return Err(refuse(
                Reason::SpoofedSender,
                "spawn request id of another node",
            ));
        }
        // The group leader is the peer's, or one of ours the peer was given: a process
        // this node spawned there passes its group leader on to what it spawns.
        let key = group_leader.key();
        let given = self.is_local(group_leader)
            && (self.group_leaders.contains(&key)
                || (self.granted_pids.contains(&key) && !self.system.contains_key(&key)));
        if !self.is_peer(group_leader) && !given {
            return Ok(notsup(
                Reason::UngrantedIdentity,
                format!("group leader <{}.{}>", group_leader.id, group_leader.serial),
            ));
        }
        Ok(Rule::Deliver)
    }

    /// Records what a packet this node sends to the peer grants or creates. Packets that
    /// do not decode are ignored (they are this node's own; the peer's VM judges them).
    pub fn observe_outgoing(&mut self, packet: &[u8]) {
        let Ok(p) = control::decode(packet) else {
            return;
        };
        // Grants come from what this node's processes put in messages (and a spawned
        // process's own pid, below), not from control messages: a process that sends,
        // links or replies does not thereby become addressable.
        if let Some(payload) = p.payload {
            let _ = etf::walk(payload, etf::SKIP_MAX_DEPTH, &mut Grants { filter: self });
        }
        use Control as C;
        match p.control {
            C::Link { from, to } => {
                self.links.insert((from.key(), to.key()), ());
            }
            C::Exit { from, to } => {
                self.links.remove(&(from.key(), to.key()));
            }
            C::UnlinkId { id, from, to } => {
                self.unlinks.insert(id, (from.key(), to.key()));
            }
            C::UnlinkIdAck { from, to, .. } => {
                self.links.remove(&(from.key(), to.key()));
            }
            C::MonitorP {
                from, reference, ..
            } => {
                self.monitors.insert(reference.key(), from.key());
            }
            C::DemonitorP { reference, .. } => {
                self.monitors.remove(&reference.key());
            }
            C::MonitorPExit { reference, .. } => {
                self.peer_monitors.remove(&reference.key());
            }
            C::SpawnRequest {
                req_id,
                from,
                group_leader,
                options,
                ..
            } => {
                let has = |name: &str| match options {
                    Term::List(seq) => seq.iter().any(|o| o.is_ok_and(|o| o.is_atom(name))),
                    _ => false,
                };
                let made = SpawnMade {
                    from: from.key(),
                    link: has("link"),
                    monitor: has("monitor"),
                };
                self.spawns.insert(req_id.key(), made);
                // Only for io requests: never a general message target (an application
                // master, the group leader of application processes, stops its
                // application on request).
                self.group_leaders.insert(group_leader.key(), ());
            }
            // A spawn this node granted the peer: its process is the peer's to address,
            // with the link and monitor it asked for.
            C::SpawnReply {
                req_id,
                to,
                flags,
                result: Term::Pid(child),
            } => {
                self.granted_pids.insert(child.key(), ());
                if flags & 1 != 0 {
                    self.links.insert((child.key(), to.key()), ());
                }
                if flags & 2 != 0 {
                    self.peer_monitors.insert(req_id.key(), ());
                }
            }
            _ => {}
        }
    }
}

fn allowed_spawn_option(option: &Term<'_>) -> bool {
    if option.is_atom("link") || option.is_atom("monitor") {
        return true;
    }
    let Some(tuple) = option.as_tuple().filter(|t| t.len() == 2) else {
        return false;
    };
    match (tuple.get(0), tuple.get(1)) {
        (Ok(key), Ok(value)) if key.is_atom("message_queue_data") => {
            value.is_atom("off_heap") || value.is_atom("on_heap")
        }
        _ => false,
    }
}

/// The reason term inside the control message of the old exit operations, which carry
/// it there instead of as a payload.
/// An operation that has one but whose reason cannot be found is an error, never a
/// reason left unscanned.
fn control_reason<'a>(p: &Packet<'a>) -> Result<Option<&'a [u8]>, etf::EtfError> {
    let index = match p.op {
        Op::Exit | Op::Exit2 => 3,
        Op::ExitTt | Op::Exit2Tt | Op::MonitorPExit => 4,
        _ => return Ok(None),
    };
    let (term, _) = Term::parse(p.control_bytes)?;
    let tuple = term
        .as_tuple()
        .ok_or(etf::EtfError::Malformed("control message"))?;
    Ok(Some(tuple.raw(index)?))
}

/// The function a spawn request really runs: erpc's own entry points carry it in their
/// arguments; any other is the spawned function itself.
fn real_mfa(
    module: Atom<'_>,
    function: Atom<'_>,
    args: Option<&[u8]>,
) -> Option<(String, String, u32)> {
    let (args, _) = Term::parse(args?).ok()?;
    let items: Vec<Term<'_>> = match args {
        Term::Nil => Vec::new(),
        Term::List(seq) if seq.tail().ok()? == Term::Nil => {
            seq.iter().collect::<Result<_, _>>().ok()?
        }
        Term::String(bytes) => bytes.iter().map(|&b| Term::Int(i64::from(b))).collect(),
        _ => return None,
    };
    let mfa_at = |i: usize| -> Option<(String, String, u32)> {
        let m = items.get(i)?.as_atom()?;
        let f = items.get(i + 1)?.as_atom()?;
        let a = items.get(i + 2)?.list_len()?;
        Some((m.to_utf8(), f.to_utf8(), a))
    };
    if module.is("erpc") {
        return match (function.to_utf8().as_str(), items.len()) {
            ("execute_call", 4) => mfa_at(1),
            ("execute_cast", 3) => mfa_at(0),
            _ => None,
        };
    }
    if module.is("erlang") && function.is("apply") {
        return None; // a fun, or an MFA in disguise: refused as arbitrary code
    }
    Some((module.to_utf8(), function.to_utf8(), items.len() as u32))
}

/// The top-level shape of a message, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    /// `{system, From, Request}`: sys/proc_lib control (replace_state, suspend, ...).
    System,
    /// A message shaped like a signal the VM itself delivers.
    ForgedSignal(&'static str),
    IoRequest,
    /// A supervisor or gen_event administrative call.
    AdminCall(&'static str),
    FeaturesRequest,
    FeaturesReply,
    GenCall,
}

const ADMIN_CALLS: &[&str] = &[
    "which_children",
    "count_children",
    "start_child",
    "restart_child",
    "delete_child",
    "terminate_child",
    "get_childspec",
    "get_callback_module",
    "add_handler",
    "add_sup_handler",
    "delete_handler",
    "swap_handler",
    "swap_sup_handler",
    "which_handlers",
];

/// The commands a gen_event manager takes as administration (name, arity of the command
/// tuple; 0 for a bare atom).
const GEN_EVENT_ADMIN: &[(&str, u32)] = &[
    ("stop", 0),
    ("which_handlers", 0),
    ("get_modules", 0),
    ("add_handler", 3),
    ("add_sup_handler", 4),
    ("delete_handler", 3),
    ("swap_handler", 5),
    ("swap_sup_handler", 6),
];

impl Shape {
    fn of(payload: Option<&[u8]>) -> Shape {
        let Some(Ok(term)) = payload.map(Term::peek) else {
            return Shape::Plain;
        };
        let Some(tuple) = term.as_tuple() else {
            return Shape::Plain;
        };
        let Ok(first) = tuple.get(0) else {
            return Shape::Plain;
        };
        let tag = first.as_atom();
        let signal = tag.is_some_and(|t| t.is("system") || t.is("EXIT"));
        if tuple.len() == 3 && !signal {
            if let Some(shape) = Shape::gen_event(&tuple) {
                return shape;
            }
        }
        let Some(tag) = tag else {
            return Shape::Plain;
        };
        // Every tag below is ASCII: compare bytes (a Latin-1 or UTF-8 spelling of an
        // ASCII atom is the same bytes).
        let tag = std::str::from_utf8(tag.text).unwrap_or("");
        match (tag, tuple.len()) {
            ("system", 3) => Shape::System,
            ("EXIT", 3) => Shape::ForgedSignal("{'EXIT', _, _}"),
            ("DOWN", 5) => Shape::ForgedSignal("{'DOWN', _, _, _, _}"),
            ("spawn_reply", 4) => Shape::ForgedSignal("{spawn_reply, _, _, _}"),
            ("nodeup" | "nodedown", 2 | 3) => Shape::ForgedSignal("{nodeup | nodedown, ...}"),
            ("io_request", 4) => Shape::IoRequest,
            ("features_reply", 3) => Shape::FeaturesReply,
            ("$gen_call", 3) => {
                let request = tuple.get(2).ok();
                let name = request.and_then(|r| match r {
                    Term::Atom(a) => Some(a),
                    Term::Tuple(t) => t.get(0).ok().and_then(|x| x.as_atom()),
                    _ => None,
                });
                match name.and_then(|n| ADMIN_CALLS.iter().find(|c| n.is(c))) {
                    Some(call) => Shape::AdminCall(call),
                    None => Shape::GenCall,
                }
            }
            _ => match tuple.get(1) {
                Ok(second) if tuple.len() == 2 && second.is_atom("features_request") => {
                    Shape::FeaturesRequest
                }
                _ => Shape::Plain,
            },
        }
    }

    /// gen_event's own protocol, `{Any, ReplyTag, Command}` with no `'$gen_call'` (its
    /// manager matches only the command, whatever the first element): the manager's
    /// administration (`stop`, handlers added, removed or swapped, listed) is refused to a
    /// lower tier, and a call or sync notify must name its sender as the reply-to, since
    /// the manager replies there (and crashes on a reply tag it cannot use). A
    /// `gen_server:call(Name, stop)` has the same shape and is refused alike: a lower
    /// tier stops nothing.
    fn gen_event(tuple: &etf::Seq<'_>) -> Option<Shape> {
        let command = tuple.get(2).ok()?;
        let (name, arity) = match &command {
            Term::Atom(a) => (*a, 0),
            Term::Tuple(t) => (t.get(0).ok()?.as_atom()?, t.len()),
            _ => return None,
        };
        let admin = GEN_EVENT_ADMIN
            .iter()
            .find(|(n, a)| name.is(n) && *a == arity);
        if let Some((n, _)) = admin {
            return Some(Shape::AdminCall(n));
        }
        match arity {
            3 if name.is("call") => Some(Shape::GenCall),
            2 if name.is("sync_notify") => Some(Shape::GenCall),
            _ => None,
        }
    }

    /// `{'$gen_call', {From, Tag}, {is_auth, CallerNode}}`: the call `net_adm:ping` makes
    /// (it names the caller's own node).
    fn is_auth_call(self, payload: Option<&[u8]>, from: &Pid<'_>, caller_node: &str) -> bool {
        if self != Shape::GenCall {
            return false;
        }
        let check = || -> Option<bool> {
            let tuple = Term::peek(payload?).ok()?.as_tuple()?;
            let reply_to = tuple.get(1).ok()?.as_tuple()?;
            let caller = reply_to.get(0).ok()?.as_pid()?;
            let request = tuple.get(2).ok()?.as_tuple()?;
            Some(
                reply_to.len() == 2
                    && caller == *from
                    && request.len() == 2
                    && request.get(0).ok()?.is_atom("is_auth")
                    && request.get(1).ok()?.is_atom(caller_node),
            )
        };
        check().unwrap_or(false)
    }
}

/// `{'$gen_call', {Pid, Tag}, Request}` whose `Pid` is `from`.
fn reply_to_is(payload: Option<&[u8]>, from: &Pid<'_>) -> bool {
    let check = || -> Option<bool> {
        let tuple = Term::peek(payload?).ok()?.as_tuple()?;
        let reply_to = tuple.get(1).ok()?.as_tuple()?;
        Some(reply_to.len() == 2 && reply_to.get(0).ok()?.as_pid()? == *from)
    };
    check().unwrap_or(false)
}

/// `{io_request, From, ReplyAs, Request}` from `from` asking for output only:
/// `{put_chars, Encoding, Chars}`, `{put_chars, Chars}`, `{put_chars, Encoding, io_lib,
/// format | fwrite | write, Args}` (io:format and io:write), `getopts`,
/// `{get_geometry, _}`, or `{requests, [...]}` of those. Refused: any other function for
/// the io server to apply, `get_until`, reading from the console (`get_line`,
/// `get_chars`), and changing it (`setopts`).
fn plain_output_request(payload: Option<&[u8]>, from: &Pid<'_>) -> bool {
    fn plain(request: &Term<'_>, depth: u8) -> bool {
        if request.is_atom("getopts") {
            return true;
        }
        let Some(t) = request.as_tuple() else {
            return false;
        };
        let Ok(first) = t.get(0) else {
            return false;
        };
        let data = |i: u32| {
            t.get(i).is_ok_and(|c| {
                matches!(
                    c,
                    Term::Binary(_) | Term::String(_) | Term::Nil | Term::List(_)
                )
            })
        };
        let encoding = || {
            t.get(1)
                .is_ok_and(|e| e.is_atom("unicode") || e.is_atom("latin1"))
        };
        match t.len() {
            2 if first.is_atom("put_chars") => data(1),
            3 if first.is_atom("put_chars") => encoding() && data(2),
            // What io:format/fwrite/write send: the io server formats with io_lib, which
            // runs no code of the sender's choosing. No other function is applied.
            5 if first.is_atom("put_chars") => {
                encoding()
                    && t.get(2).is_ok_and(|m| m.is_atom("io_lib"))
                    && t.get(3).is_ok_and(|f| {
                        f.is_atom("format") || f.is_atom("fwrite") || f.is_atom("write")
                    })
                    && t.get(4).is_ok_and(|a| a.list_len().is_some())
            }
            2 if first.is_atom("get_geometry") => true,
            2 if first.is_atom("requests") && depth == 0 => match t.get(1) {
                Ok(Term::List(list)) => list.iter().all(|r| r.is_ok_and(|r| plain(&r, 1))),
                Ok(Term::Nil) => true,
                _ => false,
            },
            _ => false,
        }
    }
    let check = || -> Option<bool> {
        let tuple = Term::peek(payload?).ok()?.as_tuple()?;
        let sender = tuple.get(1).ok()?.as_pid()?;
        Some(tuple.len() == 4 && sender == *from && plain(&tuple.get(3).ok()?, 0))
    };
    check().unwrap_or(false)
}

/// `{From, features_request}` where From is the sender.
fn features_request_from(payload: Option<&[u8]>, from: &Pid<'_>) -> bool {
    let check = || -> Option<bool> {
        let tuple = Term::peek(payload?).ok()?.as_tuple()?;
        Some(tuple.get(0).ok()?.as_pid()? == *from)
    };
    check().unwrap_or(false)
}

/// The same signal without its sequential-trace token, in the pass-through form.
fn strip_token(p: &Packet<'_>) -> Result<Vec<u8>, etf::EtfError> {
    let (control, _) = Term::parse(p.control_bytes)?;
    let tuple = control
        .as_tuple()
        .ok_or(etf::EtfError::Malformed("control"))?;
    let (plain_op, token_at, flags) = match p.op {
        Op::SendTt => (Op::Send, 3, None),
        Op::ExitTt => (Op::Exit, 3, None),
        Op::RegSendTt => (Op::RegSend, 4, None),
        Op::Exit2Tt => (Op::Exit2, 3, None),
        Op::SendSenderTt => (Op::SendSender, 3, None),
        Op::PayloadExitTt => (Op::PayloadExit, 3, None),
        Op::PayloadExit2Tt => (Op::PayloadExit2, 3, None),
        Op::SpawnRequestTt => (Op::SpawnRequest, 6, None),
        Op::SpawnReplyTt => (Op::SpawnReply, 5, None),
        Op::AliasSendTt => (Op::AliasSend, 3, None),
        Op::AltactSigSend => match p.control {
            Control::AltactSigSend { flags, .. } => {
                (Op::AltactSigSend, 4, Some(flags & !altact::TOKEN))
            }
            _ => return Err(etf::EtfError::Malformed("control")),
        },
        _ => {
            return Err(etf::EtfError::Malformed(
                "token on an operation without one",
            ))
        }
    };
    let mut out = vec![112, etf::VERSION];
    etf::encode::small_tuple(&mut out, (tuple.len() - 1) as u8);
    etf::encode::small_int(&mut out, plain_op as u8);
    for i in 1..tuple.len() {
        if i == token_at {
            continue;
        }
        match (i, flags) {
            (1, Some(flags)) => {
                // ALTACT flags fit a small integer (five bits).
                etf::encode::small_int(&mut out, flags as u8);
            }
            _ => out.extend_from_slice(tuple.raw(i)?),
        }
    }
    if let Some(payload) = p.payload {
        out.push(etf::VERSION);
        out.extend_from_slice(payload);
    }
    Ok(out)
}

/// Checks one assertion against the policy as the engine applies it: a packet standing
/// for the capability goes through [`LinkFilter::decide`] on a fresh link from a peer of
/// the asserted tier.
pub fn check_assertion(
    assertion: &Assertion,
    policy: &crate::policy::Policy,
    tiers: &crate::link::TierOrder,
    local_tier: &str,
) -> Result<(), String> {
    let restricted = tiers
        .mode(local_tier, &assertion.tier)
        .ok_or_else(|| format!("tier {} is not among the configured tiers", assertion.tier))?
        == crate::link::LinkMode::Restricted;
    let tier_policy = policy.for_tier(&assertion.tier);
    let holds = if !restricted {
        true // same or higher tier: ordinary distribution
    } else if assertion.capability == Capability::Connect {
        tier_policy.connect
    } else {
        probe(&assertion.capability, tier_policy)
    };
    if holds == assertion.may {
        Ok(())
    } else {
        Err(format!(
            "assertion {{{}, {}, {}}} does not hold: the policy {} it",
            assertion.tier,
            if assertion.may { "may" } else { "may_not" },
            describe(&assertion.capability),
            if holds { "allows" } else { "refuses" }
        ))
    }
}

fn describe(c: &Capability) -> String {
    match c {
        Capability::Spawn => "spawn".into(),
        Capability::Call(m, f, a) => format!("{{call, {m}, {f}, {a}}}"),
        Capability::Send(n) => format!("{{send, {n}}}"),
        Capability::Monitor(n) => format!("{{monitor, {n}}}"),
        Capability::Connect => "connect".into(),
        Capability::Exit => "exit".into(),
        Capability::Link => "link".into(),
        Capability::GroupLeader => "group_leader".into(),
        Capability::Funs => "funs".into(),
        Capability::MessageSize(n) => format!("{{message_size, {n}}}"),
    }
}

struct EveryAtomExists;
impl AtomTable for EveryAtomExists {
    fn exists(&self, _: Atom<'_>) -> bool {
        true
    }
}

/// Runs a packet standing for `capability` through a fresh filter.
fn probe(capability: &Capability, policy: TierPolicy) -> bool {
    use control::answer::packet as build;
    use etf::encode::{self, atom_term as atom, list, tuple};
    const LOCAL: &str = "local@assertion";
    const PEER: &str = "peer@assertion";
    let pid = |node: &str, id: u32| encode::pid(node, id, 0, 1);
    let reference = |node: &str| encode::reference(node, 1, &[1, 2, 3]);
    let packet = |op: u8, elements: &[Vec<u8>], payload: Option<Vec<u8>>| {
        let elements: Vec<&[u8]> = elements.iter().map(Vec::as_slice).collect();
        build(op, &elements, payload.as_deref())
    };
    let list = |items: Vec<Vec<u8>>| list(&items);
    let mut filter = LinkFilter::new(
        NodeId {
            name: LOCAL.into(),
            creation: 1,
        },
        NodeId {
            name: PEER.into(),
            creation: 1,
        },
        policy,
        Vec::new(),
    );
    // A local process handed to the peer (as a GenServer.call from it would).
    let handed = pid(LOCAL, 100);
    filter.observe_outgoing(&packet(
        22,
        &[handed.clone(), pid(PEER, 5)],
        Some(handed.clone()),
    ));
    let from = pid(PEER, 7);
    let mfa =
        |m: &str, f: &str, a: u8| tuple(&[atom(m), atom(f), vec![etf::tag::SMALL_INTEGER, a]]);
    let test = match capability {
        Capability::Spawn => packet(
            29,
            &[
                reference(PEER),
                from.clone(),
                from.clone(),
                mfa("os", "cmd", 1),
                list(vec![]),
            ],
            Some(list(vec![atom("x")])),
        ),
        Capability::Call(m, f, a) => {
            let args = list((0..*a).map(|_| atom("x")).collect());
            let payload = list(vec![reference(PEER), atom(m), atom(f), args]);
            packet(
                29,
                &[
                    reference(PEER),
                    from.clone(),
                    from.clone(),
                    mfa("erpc", "execute_call", 4),
                    list(vec![atom("monitor")]),
                ],
                Some(payload),
            )
        }
        Capability::Send(name) => packet(
            6,
            &[from.clone(), atom(""), atom(name)],
            Some(atom("hello")),
        ),
        Capability::Monitor(name) => packet(19, &[from.clone(), atom(name), reference(PEER)], None),
        Capability::Exit => packet(26, &[from.clone(), handed.clone()], Some(atom("kill"))),
        Capability::Link => packet(1, &[from.clone(), handed.clone()], None),
        Capability::GroupLeader => packet(7, &[from.clone(), handed.clone()], None),
        Capability::Funs => {
            let mut fun = vec![etf::tag::EXPORT];
            fun.extend(atom("lists"));
            fun.extend(atom("map"));
            encode::small_int(&mut fun, 2);
            packet(22, &[from.clone(), handed.clone()], Some(fun))
        }
        Capability::MessageSize(n) => {
            // A packet of exactly n bytes: the limit counts the whole packet.
            let binary = |len: usize| {
                let mut bin = vec![etf::tag::BINARY];
                bin.extend_from_slice(&(len as u32).to_be_bytes());
                bin.resize(5 + len, 0);
                bin
            };
            let overhead = packet(22, &[from.clone(), handed.clone()], Some(binary(0))).len();
            packet(
                22,
                &[from.clone(), handed.clone()],
                Some(binary(n.saturating_sub(overhead))),
            )
        }
        Capability::Connect => return false,
    };
    let decision = filter.decide(&test, &EveryAtomExists);
    decision.reason.is_none()
        && matches!(
            decision.verdict,
            Verdict::Deliver | Verdict::DeliverRewritten(_)
        )
        || decision.audited
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etf::{encode, tag};

    const LOCAL: &str = "hi@host";
    const PEER: &str = "lo@host";

    struct Known(&'static [&'static str]);
    impl AtomTable for Known {
        fn exists(&self, atom: Atom<'_>) -> bool {
            self.0.iter().any(|a| atom.is(a))
        }
    }
    const ATOMS: Known = Known(&[
        "",
        "ok",
        "hello",
        "system",
        "EXIT",
        "io_request",
        "put_chars",
        "unicode",
        "erpc",
        "execute_call",
        "m",
        "f",
        "monitor",
        "features_reply",
        "features_request",
        "x",
        "normal",
        "results",
        "rex",
        "net_kernel",
        "$gen_call",
        "is_auth",
        "events",
        "stop",
        "add_handler",
        "delete_handler",
        "which_handlers",
        "call",
        "sync_notify",
        PEER,
        LOCAL,
        "third@host",
    ]);

    use crate::etf::encode::{atom_term as atom, list, tuple};

    fn pid(node: &str, id: u32, creation: u32) -> Vec<u8> {
        encode::pid(node, id, 0, creation)
    }
    fn local(id: u32) -> Vec<u8> {
        pid(LOCAL, id, 1)
    }
    fn peer(id: u32) -> Vec<u8> {
        pid(PEER, id, 2)
    }
    fn reference(node: &str, n: u32) -> Vec<u8> {
        let creation = if node == LOCAL { 1 } else { 2 };
        encode::reference(node, creation, &[n, 0, 0])
    }
    fn packet(op: u8, elements: &[Vec<u8>], payload: Option<Vec<u8>>) -> Vec<u8> {
        let elements: Vec<&[u8]> = elements.iter().map(Vec::as_slice).collect();
        control::answer::packet(op, &elements, payload.as_deref())
    }
    /// A default-policy filter with smaller tables, to reach their bounds in a test.
    fn filter_with_limits(limits: Limits) -> LinkFilter {
        filter_of(TierPolicy::default(), Vec::new(), limits)
    }

    fn filter(policy: TierPolicy, system: Vec<(String, PidKey)>) -> LinkFilter {
        filter_of(policy, system, Limits::default())
    }

    fn filter_of(policy: TierPolicy, system: Vec<(String, PidKey)>, limits: Limits) -> LinkFilter {
        let local = NodeId {
            name: LOCAL.into(),
            creation: 1,
        };
        let peer = NodeId {
            name: PEER.into(),
            creation: 2,
        };
        LinkFilter::with_limits(local, peer, policy, system, limits)
    }
    fn key(id: u32) -> PidKey {
        PidKey {
            id,
            serial: 0,
            creation: 1,
        }
    }
    fn send_sender(from: Vec<u8>, to: Vec<u8>, payload: Vec<u8>) -> Vec<u8> {
        packet(22, &[from, to], Some(payload))
    }
    fn delivered(d: &Decision) -> bool {
        matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)) && !d.audited
    }

    #[test]
    fn a_pid_is_reachable_only_once_handed_out_and_never_if_a_system_process() {
        let mut f = filter(TierPolicy::default(), vec![("rex".into(), key(9))]);
        let msg = send_sender(peer(5), local(100), atom("hello"));
        let d = f.decide(&msg, &ATOMS);
        assert_eq!(
            (d.verdict.clone(), d.reason),
            (Verdict::Drop, Some(Reason::NotGranted))
        );
        // This node sends the peer a message carrying pid 100 and rex's pid 9.
        f.observe_outgoing(&send_sender(
            local(1),
            peer(5),
            tuple(&[local(100), local(9)]),
        ));
        assert!(delivered(&f.decide(&msg, &ATOMS)));
        let to_rex = send_sender(peer(5), local(9), atom("hello"));
        assert_eq!(
            f.decide(&to_rex, &ATOMS).reason,
            Some(Reason::SystemProcess)
        );
        // Only rex's own feature reply reaches it.
        let reply = send_sender(
            peer(5),
            local(9),
            tuple(&[atom("features_reply"), atom(PEER), list(&[atom("erpc")])]),
        );
        assert!(delivered(&f.decide(&reply, &ATOMS)));
    }

    #[test]
    fn granted_processes_still_get_no_system_messages_or_forged_exits() {
        let mut f = filter(TierPolicy::default(), Vec::new());
        f.observe_outgoing(&send_sender(local(1), peer(5), local(100)));
        let sys = send_sender(
            peer(5),
            local(100),
            tuple(&[atom("system"), peer(5), atom("x")]),
        );
        assert_eq!(f.decide(&sys, &ATOMS).reason, Some(Reason::SystemMessage));
        let exit = send_sender(
            peer(5),
            local(100),
            tuple(&[atom("EXIT"), peer(5), atom("normal")]),
        );
        assert_eq!(f.decide(&exit, &ATOMS).reason, Some(Reason::ForgedSignal));
        let io = send_sender(
            peer(5),
            local(100),
            tuple(&[atom("io_request"), peer(5), peer(5), atom("x")]),
        );
        assert_eq!(f.decide(&io, &ATOMS).reason, Some(Reason::IoRequest));
    }

    #[test]
    fn io_requests_reach_a_group_leader_given_in_a_spawn_request() {
        let mut f = filter(TierPolicy::default(), vec![("user".into(), key(50))]);
        let spawn = packet(
            29,
            &[
                reference(LOCAL, 1),
                local(1),
                local(50),
                tuple(&[atom("m"), atom("f"), vec![tag::SMALL_INTEGER, 0]]),
                list(&[]),
            ],
            Some(list(&[])),
        );
        f.observe_outgoing(&spawn);
        let io = send_sender(
            peer(6),
            local(50),
            tuple(&[
                atom("io_request"),
                peer(6),
                reference(PEER, 3),
                tuple(&[
                    atom("put_chars"),
                    atom("unicode"),
                    vec![tag::BINARY, 0, 0, 0, 1, b'x'],
                ]),
            ]),
        );
        assert!(delivered(&f.decide(&io, &ATOMS)));
        // Anything else to that system process is still refused.
        let other = send_sender(peer(6), local(50), atom("hello"));
        assert!(!delivered(&f.decide(&other, &ATOMS)));
    }

    #[test]
    fn a_spawn_request_may_pass_on_a_group_leader_we_gave_but_not_a_guessed_one() {
        let policy = TierPolicy {
            rpc: [("m".into(), "f".into(), 0)].into_iter().collect(),
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let request = |gl: Vec<u8>| {
            packet(
                29,
                &[
                    reference(PEER, 1),
                    peer(5),
                    gl,
                    tuple(&[atom("m"), atom("f"), vec![tag::SMALL_INTEGER, 0]]),
                    list(&[]),
                ],
                Some(list(&[])),
            )
        };
        assert!(delivered(&f.decide(&request(peer(5)), &ATOMS)));
        let guessed = f.decide(&request(local(77)), &ATOMS);
        assert!(matches!(guessed.verdict, Verdict::Answer(_)), "{guessed:?}");
        f.observe_outgoing(&packet(
            29,
            &[
                reference(LOCAL, 2),
                local(3),
                local(77),
                tuple(&[atom("m"), atom("f"), vec![tag::SMALL_INTEGER, 0]]),
                list(&[]),
            ],
            Some(list(&[])),
        ));
        assert!(delivered(&f.decide(&request(local(77)), &ATOMS)));
    }

    #[test]
    fn refused_requests_are_answered_so_callers_fail_fast() {
        let mut f = filter(TierPolicy::default(), Vec::new());
        let spawn = packet(
            29,
            &[
                reference(PEER, 1),
                peer(5),
                peer(5),
                tuple(&[
                    atom("erpc"),
                    atom("execute_call"),
                    vec![tag::SMALL_INTEGER, 4],
                ]),
                list(&[atom("monitor")]),
            ],
            Some(list(&[reference(PEER, 2), atom("m"), atom("f"), list(&[])])),
        );
        let d = f.decide(&spawn, &ATOMS);
        let Verdict::Answer(answer) = d.verdict else {
            panic!("{d:?}")
        };
        let reply = control::decode(&answer).expect("answer decodes");
        match reply.control {
            Control::SpawnReply {
                to, result, flags, ..
            } => {
                assert_eq!(to.raw, peer(5).as_slice());
                assert!(result.is_atom("notsup"));
                assert_eq!(flags, 0);
            }
            other => panic!("{other:?}"),
        }
        // A spawn request with an atom this node does not know is answered all the same.
        let unknown = packet(
            29,
            &[
                reference(PEER, 1),
                peer(5),
                peer(5),
                tuple(&[atom("nosuchmodule"), atom("f"), vec![tag::SMALL_INTEGER, 0]]),
                list(&[]),
            ],
            Some(list(&[])),
        );
        let d = f.decide(&unknown, &ATOMS);
        assert_eq!(d.reason, Some(Reason::NewAtom));
        assert!(matches!(d.verdict, Verdict::Answer(_)));
    }

    #[test]
    fn an_exposed_gen_event_manager_takes_no_administration() {
        // Found by the red team (test/redteam_test.exs, gen_event_admin_events and
        // gen_event_stop_events): gen_event's protocol is `{From, ReplyTag, Command}`
        // without '$gen_call', so a lower tier sending to an exposed manager could add,
        // swap or delete its handlers (running any module's init/1) and stop it.
        let policy = TierPolicy {
            registered: ["events".to_string()].into_iter().collect(),
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let send =
            |payload: Vec<u8>| packet(6, &[peer(5), atom(""), atom("events")], Some(payload));
        let reply_tag = || tuple(&[peer(5), reference(PEER, 9)]);
        let admin = [
            atom("stop"),
            atom("which_handlers"),
            tuple(&[atom("add_handler"), atom("m"), atom("x")]),
            tuple(&[atom("delete_handler"), atom("m"), atom("x")]),
        ];
        for command in admin {
            for first in [peer(5), atom("x"), atom("$gen_call")] {
                let d = f.decide(&send(tuple(&[first, reply_tag(), command.clone()])), &ATOMS);
                assert_eq!(d.reason, Some(Reason::AdminCommand), "{d:?}");
            }
        }
        // Calls and sync notifies: the manager replies to the tag, which must be the
        // sender's (a tag it cannot use crashes the manager).
        let call = tuple(&[atom("call"), atom("m"), atom("x")]);
        let notify = tuple(&[atom("sync_notify"), atom("hello")]);
        for command in [call, notify] {
            let ok = send(tuple(&[peer(5), reply_tag(), command.clone()]));
            assert!(delivered(&f.decide(&ok, &ATOMS)));
            for tag in [atom("x"), tuple(&[peer(6), reference(PEER, 9)])] {
                let bad = send(tuple(&[peer(5), tag, command.clone()]));
                assert_eq!(f.decide(&bad, &ATOMS).reason, Some(Reason::ForgedReplyTo));
            }
        }
        // Ordinary three-element messages still pass.
        let plain = send(tuple(&[atom("hello"), atom("x"), atom("ok")]));
        assert!(delivered(&f.decide(&plain, &ATOMS)));
    }

    #[test]
    fn senders_must_be_the_peer_as_its_handshake_named_it() {
        let policy = TierPolicy {
            registered: ["results".to_string()].into_iter().collect(),
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let reg =
            |from: Vec<u8>| packet(6, &[from, atom(""), atom("results")], Some(atom("hello")));
        assert!(delivered(&f.decide(&reg(peer(5)), &ATOMS)));
        for spoof in [pid(PEER, 5, 3), local(5), pid("third@host", 5, 2)] {
            assert_eq!(
                f.decide(&reg(spoof), &ATOMS).reason,
                Some(Reason::SpoofedSender)
            );
        }
    }

    #[test]
    fn links_exits_and_monitor_exits_pass_only_for_what_this_node_created() {
        let mut f = filter(TierPolicy::default(), Vec::new());
        let exit = packet(24, &[peer(5), local(1)], Some(atom("normal")));
        assert_eq!(f.decide(&exit, &ATOMS).reason, Some(Reason::UnknownLink));
        f.observe_outgoing(&packet(1, &[local(1), peer(5)], None));
        assert!(delivered(&f.decide(&exit, &ATOMS)));
        assert_eq!(
            f.decide(&exit, &ATOMS).reason,
            Some(Reason::UnknownLink),
            "a link ends once"
        );

        let down = packet(
            28,
            &[peer(5), local(1), reference(LOCAL, 7)],
            Some(atom("normal")),
        );
        assert_eq!(f.decide(&down, &ATOMS).reason, Some(Reason::UnknownMonitor));
        f.observe_outgoing(&packet(19, &[local(1), peer(5), reference(LOCAL, 7)], None));
        assert!(delivered(&f.decide(&down, &ATOMS)));
        // exit/2 is never allowed, link or not.
        let exit2 = packet(26, &[peer(5), local(1)], Some(atom("normal")));
        assert_eq!(f.decide(&exit2, &ATOMS).reason, Some(Reason::ExitDenied));
    }

    #[test]
    fn monitors_the_peer_holds_are_bounded() {
        let policy = TierPolicy {
            registered: ["results".to_string()].into_iter().collect(),
            max_monitors: 3,
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let outcomes: Vec<_> = (0..5)
            .map(|i| {
                f.decide(
                    &packet(19, &[peer(5), atom("results"), reference(PEER, i)], None),
                    &ATOMS,
                )
            })
            .map(|d| d.reason)
            .collect();
        assert_eq!(
            outcomes,
            vec![
                None,
                None,
                None,
                Some(Reason::MonitorLimit),
                Some(Reason::MonitorLimit)
            ]
        );
        f.decide(
            &packet(20, &[peer(5), atom("results"), reference(PEER, 0)], None),
            &ATOMS,
        );
        assert_eq!(
            f.decide(
                &packet(19, &[peer(5), atom("results"), reference(PEER, 9)], None),
                &ATOMS
            )
            .reason,
            None
        );
    }

    #[test]
    fn grants_are_bounded_and_forget_the_oldest() {
        let limits = Limits {
            granted_pids: 4,
            ..Limits::default()
        };
        let mut f = filter_with_limits(limits);
        for id in 100..110 {
            f.observe_outgoing(&send_sender(local(1), peer(5), local(id)));
        }
        assert!(f.granted_pids.len() <= 4);
        assert!(!delivered(
            &f.decide(&send_sender(peer(5), local(100), atom("ok")), &ATOMS)
        ));
        assert!(delivered(
            &f.decide(&send_sender(peer(5), local(109), atom("ok")), &ATOMS)
        ));
    }

    #[test]
    fn a_pid_granted_again_is_the_newest_grant_not_the_oldest() {
        let limits = Limits {
            granted_pids: 4,
            ..Limits::default()
        };
        let mut f = filter_with_limits(limits);
        // A long-lived process (1) hands its pid over again after two fresh ones (100,
        // 101) were granted; two more fresh ones then push the table over its capacity.
        // The least recently granted goes (100), not the long-lived one.
        let grant = |f: &mut LinkFilter, id| {
            f.observe_outgoing(&send_sender(local(id), peer(5), local(id)))
        };
        for id in [1, 100, 101, 1, 102, 103] {
            grant(&mut f, id);
        }
        assert_eq!(f.granted_pids.len(), 4);
        for (id, granted) in [(1, true), (100, false), (101, true), (103, true)] {
            let d = f.decide(&send_sender(peer(5), local(id), atom("ok")), &ATOMS);
            assert_eq!(delivered(&d), granted, "pid {id}");
        }
        // Re-grants leave stale entries in `order`; they are compacted away.
        for _ in 0..5000 {
            grant(&mut f, 1);
        }
        assert!(f.granted_pids.order.len() <= 2 * BOUNDED_SLACK + 1);
        assert_eq!(f.granted_pids.len(), 4);
    }

    #[test]
    fn a_table_whose_entries_come_and_go_stays_as_small_as_what_is_live() {
        // A monitor set and dropped on every call: nothing stays, and neither may the
        // room it took, at a capacity far above what is ever live.
        let mut table: Bounded<u64, ()> = Bounded::new(65_536);
        for key in 0..400_000u64 {
            table.insert(key, ());
            table.remove(&key);
        }
        assert_eq!(table.len(), 0);
        assert!(
            table.order.capacity() <= 4 * BOUNDED_SLACK,
            "{}",
            table.order.capacity()
        );
        // A burst of 50,000 live at once, then all gone: the room is given back.
        for key in 0..50_000u64 {
            table.insert(key, ());
        }
        for key in 0..50_000u64 {
            table.remove(&key);
        }
        table.insert(1, ());
        assert!(
            table.map.capacity() <= 4 * BOUNDED_SLACK,
            "{}",
            table.map.capacity()
        );
        assert!(
            table.order.capacity() <= 4 * BOUNDED_SLACK,
            "{}",
            table.order.capacity()
        );
        assert!(table.contains(&1));
    }

    #[test]
    fn audit_mode_delivers_what_it_would_refuse_but_not_what_it_cannot_read() {
        let policy = TierPolicy {
            audit: true,
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let d = f.decide(&send_sender(peer(5), local(100), atom("hello")), &ATOMS);
        assert!(d.audited && d.verdict == Verdict::Deliver && d.reason == Some(Reason::NotGranted));
        assert_eq!(f.decide(&[112, 131, 200], &ATOMS).verdict, Verdict::Close);
        assert!(f
            .counters()
            .entries()
            .iter()
            .any(|(op, o, n)| *op == "send_sender" && *o == Outcome::Audited && *n == 1));
    }

    #[test]
    fn sequential_trace_tokens_are_stripped() {
        let policy = TierPolicy {
            registered: ["results".to_string()].into_iter().collect(),
            ..TierPolicy::default()
        };
        let mut f = filter(policy, Vec::new());
        let token = tuple(&[
            vec![tag::SMALL_INTEGER, 1],
            vec![tag::SMALL_INTEGER, 17],
            vec![tag::SMALL_INTEGER, 0],
            peer(5),
            vec![tag::SMALL_INTEGER, 0],
        ]);
        let traced = packet(
            16,
            &[peer(5), atom(""), atom("results"), token],
            Some(atom("hello")),
        );
        let d = f.decide(&traced, &ATOMS);
        let Verdict::DeliverRewritten(plain) = d.verdict else {
            panic!("{d:?}")
        };
        let p = control::decode(&plain).expect("rewritten packet decodes");
        assert_eq!((p.op, p.token), (Op::RegSend, None));
        assert_eq!(p.payload, Some(atom("hello").as_slice()));
    }

    #[test]
    fn assertions_are_checked_by_the_engine() {
        let tiers =
            crate::link::TierOrder::new(vec!["admin".into(), "worker".into()]).expect("tiers");
        let policy = crate::policy::Policy::new(
            [(
                "worker".to_string(),
                TierPolicy {
                    registered: ["results".to_string()].into_iter().collect(),
                    rpc: [("my_app".into(), "report".into(), 1)]
                        .into_iter()
                        .collect(),
                    max_message_size: 1000,
                    ..TierPolicy::default()
                },
            )]
            .into_iter()
            .collect(),
        )
        .expect("policy");
        let check = |may, capability| {
            check_assertion(
                &Assertion {
                    tier: "worker".into(),
                    may,
                    capability,
                },
                &policy,
                &tiers,
                "admin",
            )
        };
        assert!(check(false, Capability::Spawn).is_ok());
        assert!(check(true, Capability::Call("my_app".into(), "report".into(), 1)).is_ok());
        assert!(check(true, Capability::Send("results".into())).is_ok());
        assert!(check(true, Capability::Monitor("results".into())).is_ok());
        assert!(check(false, Capability::Send("other".into())).is_ok());
        assert!(check(false, Capability::Exit).is_ok());
        assert!(check(false, Capability::Link).is_ok());
        assert!(check(false, Capability::GroupLeader).is_ok());
        assert!(check(false, Capability::Funs).is_ok());
        assert!(check(false, Capability::Connect).is_ok());
        assert!(check(true, Capability::MessageSize(1000)).is_ok());
        assert!(check(false, Capability::MessageSize(1001)).is_ok());
        let failed = check(true, Capability::Spawn).expect_err("worker may not spawn");
        assert!(failed.contains("{worker, may, spawn}"), "{failed}");
        // From below, everything is allowed: the same tier or a higher one is trusted.
        assert!(check_assertion(
            &Assertion {
                tier: "admin".into(),
                may: true,
                capability: Capability::Spawn
            },
            &policy,
            &tiers,
            "worker"
        )
        .is_ok());
    }
}
