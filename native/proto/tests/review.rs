//! Second review of the restricted-link filter (see the review notes for the findings).
//!
//! a lower-tier peer gets past the filter. The others pin down defences the review
//! checked against the VM's own semantics (dist.c, external.c) and found sound.

mod common;

use common::*;
use trust_dist_proto::control;
use trust_dist_proto::etf::{self, Atom, PidKey};
use trust_dist_proto::filter::{AtomTable, Decision, LinkFilter, NodeId, Reason, Verdict};
use trust_dist_proto::policy::TierPolicy;

const LOCAL: &str = "hi@host";
const PEER: &str = "lo@host";
const LOCAL_CREATION: u32 = 0x1234_5678;
const PEER_CREATION: u32 = 0x0abc_def0;

/// Every atom exists: these tests are about identities and shapes, not atoms.
struct AllAtoms;
impl AtomTable for AllAtoms {
    fn exists(&self, _: Atom<'_>) -> bool {
        true
    }
}

fn local(id: u32) -> Vec<u8> {
    pid_bytes(LOCAL, id, 0, LOCAL_CREATION)
}
fn peer(id: u32) -> Vec<u8> {
    pid_bytes(PEER, id, 0, PEER_CREATION)
}
fn key(id: u32) -> PidKey {
    PidKey {
        id,
        serial: 0,
        creation: LOCAL_CREATION,
    }
}
fn reference(node: &str, creation: u32, n: u32) -> Vec<u8> {
    let mut v = vec![etf::tag::NEWER_REFERENCE, 0, 3];
    etf::encode::atom(&mut v, node);
    v.extend_from_slice(&creation.to_be_bytes());
    for w in [n, 7, 9] {
        v.extend_from_slice(&w.to_be_bytes());
    }
    v
}
fn peer_ref(n: u32) -> Vec<u8> {
    reference(PEER, PEER_CREATION, n)
}
fn local_ref(n: u32) -> Vec<u8> {
    reference(LOCAL, LOCAL_CREATION, n)
}
fn a(name: &str) -> Vec<u8> {
    atom_bytes(name)
}
fn int(n: u8) -> Vec<u8> {
    vec![etf::tag::SMALL_INTEGER, n]
}
fn t(items: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    tuple(&refs)
}
fn list(items: &[Vec<u8>]) -> Vec<u8> {
    if items.is_empty() {
        return vec![etf::tag::NIL];
    }
    let mut v = vec![etf::tag::LIST];
    v.extend_from_slice(&(items.len() as u32).to_be_bytes());
    for i in items {
        v.extend_from_slice(i);
    }
    v.push(etf::tag::NIL);
    v
}
fn string(s: &str) -> Vec<u8> {
    let mut v = vec![etf::tag::STRING];
    v.extend_from_slice(&(s.len() as u16).to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}
fn pkt(op: u8, elements: &[Vec<u8>], payload: Option<Vec<u8>>) -> Vec<u8> {
    let refs: Vec<&[u8]> = elements.iter().map(Vec::as_slice).collect();
    packet(op, &refs, payload.as_deref())
}
fn send_sender(from: Vec<u8>, to: Vec<u8>, msg: Vec<u8>) -> Vec<u8> {
    pkt(22, &[from, to], Some(msg))
}
fn reg_send(from: Vec<u8>, name: &str, msg: Vec<u8>) -> Vec<u8> {
    pkt(6, &[from, a(""), a(name)], Some(msg))
}

fn filter_with(policy: TierPolicy, system: Vec<(String, PidKey)>) -> LinkFilter {
    LinkFilter::new(
        NodeId {
            name: LOCAL.into(),
            creation: LOCAL_CREATION,
        },
        NodeId {
            name: PEER.into(),
            creation: PEER_CREATION,
        },
        policy,
        system,
    )
}
fn filter() -> LinkFilter {
    filter_with(TierPolicy::default(), vec![("user".into(), key(50))])
}
fn delivered(d: &Decision) -> bool {
    matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)) && !d.audited
}

/// This node spawns something on the peer (`erpc:call(Peer, ...)` from local process
/// `caller`, whose group leader is `gl`), as every desktop → server call does.
fn observe_erpc_call_from(f: &mut LinkFilter, caller: u32, gl: u32, options: Vec<u8>) {
    f.observe_outgoing(&pkt(
        29,
        &[
            local_ref(1000 + caller),
            local(caller),
            local(gl),
            t(&[a("erpc"), a("execute_call"), int(4)]),
            options,
        ],
        Some(list(&[local_ref(1), a("m"), a("f"), list(&[])])),
    ));
}

// ---- C1: io requests to a granted group leader run code ------------------------------

/// `{io_request, From, ReplyAs, {put_chars, unicode, M, F, A}}`: the io server (group.erl,
/// user.erl, file_io_server, and application_master which relays to them) calls
/// `apply(M, F, A)`. A group leader this node handed out in a spawn request (every erpc
/// call made from the shell or from an application process) is reachable with any io
/// request, system process or not.
#[test]
fn io_request_with_an_mfa_to_a_granted_group_leader_is_refused() {
    for gl in [50, 60] {
        // 50 is `user` (a system process), 60 an application master / shell group.
        let mut f = filter();
        observe_erpc_call_from(&mut f, 1, gl, list(&[a("monitor")]));
        for request in [
            t(&[
                a("put_chars"),
                a("unicode"),
                a("os"),
                a("cmd"),
                list(&[string("touch /tmp/pwned")]),
            ]),
            // The pre-unicode form and a batch, both handled by group.erl.
            t(&[a("put_chars"), a("os"), a("cmd"), list(&[string("id")])]),
            t(&[
                a("requests"),
                list(&[t(&[
                    a("put_chars"),
                    a("latin1"),
                    a("os"),
                    a("cmd"),
                    list(&[string("id")]),
                ])]),
            ]),
            // get_until applies M:F(State, Data | A) to each line the user types.
            t(&[
                a("get_until"),
                a("unicode"),
                string(""),
                a("os"),
                a("cmd"),
                list(&[]),
            ]),
        ] {
            let io = send_sender(
                peer(6),
                local(gl),
                t(&[a("io_request"), peer(6), peer_ref(3), request]),
            );
            let d = f.decide(&io, &AllAtoms);
            assert!(!delivered(&d), "gl {gl}: {d:?}");
        }
    }
}

/// The plain output requests the feature exists for still get through.
#[test]
fn plain_put_chars_to_a_granted_group_leader_is_delivered() {
    let mut f = filter();
    observe_erpc_call_from(&mut f, 1, 60, list(&[a("monitor")]));
    let io = send_sender(
        peer(6),
        local(60),
        t(&[
            a("io_request"),
            peer(6),
            peer_ref(3),
            t(&[
                a("put_chars"),
                a("unicode"),
                vec![etf::tag::BINARY, 0, 0, 0, 1, b'x'],
            ]),
        ]),
    );
    assert!(delivered(&f.decide(&io, &AllAtoms)));
}

// ---- C2: gen:reply makes any gen_server a deputy --------------------------------------

/// gen_server answers `{'$gen_call', {To, Tag}, Req}` with `To ! {Tag, Reply}` and does not
/// require To to be a pid (gen:reply/2): an atom is a local registered name, `{Name, Node}`
/// a name on any node. `{'$gen_call', {init, stop}, _}` to an allowlisted gen_server makes
/// it send `init ! {stop, Reply}`: init runs clear_system (stops every application) and
/// then crashes in do_stop/2 — the node goes down. `{{Name, 'other@host'}, Tag}` makes this
/// node connect to a third node.
#[test]
fn gen_call_reply_to_a_local_name_is_refused() {
    let policy = TierPolicy {
        registered: ["results".to_string()].into_iter().collect(),
        ..TierPolicy::default()
    };
    let mut f = filter_with(policy, Vec::new());
    for from in [
        t(&[a("init"), a("stop")]),
        t(&[a("code_server"), a("x")]),
        t(&[t(&[a("rex"), a("third@host")]), a("x")]),
        // A pid, but not the sender's: the reply is a forged message to that process.
        t(&[peer(99), a("x")]),
    ] {
        let call = reg_send(
            peer(5),
            "results",
            t(&[a("$gen_call"), from, a("anything")]),
        );
        let d = f.decide(&call, &AllAtoms);
        assert!(!delivered(&d), "{d:?}");
    }
    // The ordinary call still passes.
    let ok = reg_send(
        peer(5),
        "results",
        t(&[a("$gen_call"), t(&[peer(5), alias_tag(2)]), a("anything")]),
    );
    assert!(delivered(&f.decide(&ok, &AllAtoms)));
}

/// `[alias | PeerRef]`, the tag of an OTP 24+ gen_server:call.
fn alias_tag(n: u32) -> Vec<u8> {
    let mut v = vec![etf::tag::LIST, 0, 0, 0, 1];
    v.extend(a("alias"));
    v.extend(peer_ref(n));
    v
}

/// The same deputy reached by pid: any local gen_server whose pid the peer was handed
/// (a GenServer.call from that gen_server to the peer hands it in the From tuple).
#[test]
fn gen_call_reply_to_a_local_name_is_refused_by_pid_too() {
    let mut f = filter();
    // Local gen_server 80 calls a process of the peer.
    f.observe_outgoing(&reg_send(
        local(80),
        "peer_server",
        t(&[a("$gen_call"), t(&[local(80), local_ref(5)]), a("hello")]),
    ));
    let call = send_sender(
        peer(5),
        local(80),
        t(&[a("$gen_call"), t(&[a("init"), a("stop")]), a("anything")]),
    );
    let d = f.decide(&call, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

// ---- H1: the monitor bound counts references, the VM counts packets ------------------

/// dist.c inserts one monitor per MONITOR_P (erts_monitor_dist_insert appends to a list;
/// the target appends too) whatever its reference. The filter counts distinct references,
/// so re-using one reference creates unbounded monitors on net_kernel (or any granted
/// process or listed name) while the filter believes the peer holds one.
#[test]
fn monitors_with_a_reused_reference_are_bounded() {
    let policy = TierPolicy {
        max_monitors: 2,
        ..TierPolicy::default()
    };
    let mut f = filter_with(policy, Vec::new());
    let monitor = pkt(19, &[peer(5), a("net_kernel"), peer_ref(1)], None);
    let passed = (0..100)
        .filter(|_| delivered(&f.decide(&monitor, &AllAtoms)))
        .count();
    assert!(
        passed <= 2,
        "{passed} monitors reached the VM with max_monitors 2"
    );
}

/// For contrast: distinct references are bounded.
#[test]
fn monitors_with_distinct_references_are_bounded() {
    let policy = TierPolicy {
        max_monitors: 2,
        ..TierPolicy::default()
    };
    let mut f = filter_with(policy, Vec::new());
    let passed = (0..100)
        .filter(|i| {
            let m = pkt(19, &[peer(5), a("net_kernel"), peer_ref(*i)], None);
            delivered(&f.decide(&m, &AllAtoms))
        })
        .count();
    assert_eq!(passed, 2);
}

// ---- H2: every local pid in an outgoing control message becomes a message target ----

/// The group leader of an erpc call from an application process is that application's
/// master (unregistered, so not a system process by name). application_master handles
/// `{stop, Tag, From}` by terminating the application and exiting.
#[test]
fn a_granted_group_leader_takes_only_io_requests() {
    let mut f = filter();
    observe_erpc_call_from(&mut f, 1, 60, list(&[a("monitor")]));
    let stop = send_sender(peer(5), local(60), t(&[a("stop"), a("x"), peer(5)]));
    let d = f.decide(&stop, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

/// A supervisor's pid is handed out whenever the supervisor itself links to or spawns on
/// the peer. Supervisor commands are refused only to registered names; to a pid,
/// `start_child` with a child spec `{Id, {os, cmd, [..]}, ...}` makes the supervisor call
/// os:cmd.
#[test]
fn supervisor_commands_are_refused_to_pids_too() {
    let mut f = filter();
    // Local supervisor 70 spawn-links a worker on the peer (its start function runs in
    // the supervisor process).
    f.observe_outgoing(&pkt(1, &[local(70), peer(9)], None));
    let spec = t(&[
        a("x"),
        t(&[a("os"), a("cmd"), list(&[string("id")])]),
        a("temporary"),
        int(5),
        a("worker"),
        list(&[a("os")]),
    ]);
    let call = send_sender(
        peer(5),
        local(70),
        t(&[
            a("$gen_call"),
            t(&[peer(5), alias_tag(4)]),
            t(&[a("start_child"), spec]),
        ]),
    );
    let d = f.decide(&call, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

// ---- M1: spawn reply flags are taken from the peer ------------------------------------

/// The filter records a link for a spawn reply whose flags say "link", whether or not this
/// node asked for one, and then lets the peer's exit through it. The request here asked
/// only for a monitor.
#[test]
fn spawn_reply_link_flag_needs_a_link_request() {
    let mut f = filter();
    observe_erpc_call_from(&mut f, 1, 60, list(&[a("monitor")]));
    let reply = pkt(31, &[local_ref(1001), local(1), int(3), peer(40)], None);
    let d = f.decide(&reply, &AllAtoms);
    assert_eq!(
        d.verdict,
        Verdict::Close,
        "a reply confirming a link never asked for: {d:?}"
    );
    let exit = pkt(24, &[peer(40), local(1)], Some(a("kill")));
    let d = f.decide(&exit, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

/// With the link asked for, the exit is the point of the link.
#[test]
fn spawn_reply_link_flag_with_a_link_request_lets_the_exit_through() {
    let mut f = filter();
    observe_erpc_call_from(&mut f, 1, 60, list(&[a("link"), a("monitor")]));
    let reply = pkt(31, &[local_ref(1001), local(1), int(3), peer(40)], None);
    assert!(delivered(&f.decide(&reply, &AllAtoms)));
    let exit = pkt(24, &[peer(40), local(1)], Some(a("normal")));
    assert!(delivered(&f.decide(&exit, &AllAtoms)));
}

// ---- L: header form the VM will not accept on this link --------------------------------

/// Restricted links negotiate neither DIST_HDR_ATOM_CACHE nor FRAGMENTS, so
/// erts_prepare_dist_ext skips one byte and wants 131 next: a `131, 68, 0` packet is a
/// "corrupted external term" and the VM drops the connection. The filter delivers it; no
/// harm beyond the peer's own link, but the filter's view and the VM's differ.
#[test]
fn the_no_cache_header_form_is_refused_on_a_pass_through_link() {
    let mut f = filter();
    f.observe_outgoing(&send_sender(local(1), peer(5), local(100)));
    let mut p = vec![131, 68, 0];
    p.extend(t(&[int(22), peer(5), local(100)]));
    p.extend(a("hello"));
    assert!(control::decode(&p).is_err());
    let d = f.decide(&p, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

// ---- defences checked and found sound ------------------------------------------------

/// external.c dec_get_node: a pid with this node's name and creation 0 is a local pid.
/// Grants carry the real creation, so such a pid is never granted (fail closed).
#[test]
fn a_local_pid_with_creation_zero_is_not_granted() {
    let mut f = filter();
    f.observe_outgoing(&send_sender(local(1), peer(5), local(100)));
    let zero = pid_bytes(LOCAL, 100, 0, 0);
    let d = f.decide(&send_sender(peer(5), zero.clone(), a("hello")), &AllAtoms);
    assert_eq!(d.reason, Some(Reason::NotGranted));
    // Nor inside a payload.
    let d = f.decide(&send_sender(peer(5), local(100), t(&[zero])), &AllAtoms);
    assert_eq!(d.reason, Some(Reason::UngrantedIdentity));
    // Old PID_EXT (1-byte creation) of a granted pid: not the same key either.
    let mut old = vec![etf::tag::PID];
    etf::encode::atom(&mut old, LOCAL);
    old.extend_from_slice(&100u32.to_be_bytes());
    old.extend_from_slice(&0u32.to_be_bytes());
    old.push(0);
    let d = f.decide(&send_sender(peer(5), old, a("hello")), &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

/// A Latin-1 ATOM_EXT spelling of a system name is the same atom in the VM.
#[test]
fn a_latin1_spelling_of_a_system_name_is_still_a_system_name() {
    let mut f = filter();
    let mut name = vec![etf::tag::ATOM, 0, 4];
    name.extend_from_slice(b"init");
    let p = pkt(6, &[peer(5), a(""), name], Some(t(&[a("stop"), a("stop")])));
    assert_eq!(f.decide(&p, &AllAtoms).reason, Some(Reason::SystemProcess));
}

/// `[Ref, M, F | "ab"]` is a proper list to the VM; the filter reads it as improper and
/// refuses (fail closed), so no arity confusion lets an erpc call past the allowlist.
#[test]
fn erpc_argument_lists_ending_in_a_string_fail_closed() {
    let policy = TierPolicy {
        rpc: [("m".to_string(), "f".to_string(), 2)]
            .into_iter()
            .collect(),
        ..TierPolicy::default()
    };
    let mut f = filter_with(policy, Vec::new());
    // A = [x | "y"] (2 elements to the VM).
    let mut args = vec![etf::tag::LIST, 0, 0, 0, 1];
    args.extend(a("x"));
    args.extend(string("y"));
    let spawn = pkt(
        29,
        &[
            peer_ref(1),
            peer(5),
            peer(5),
            t(&[a("erpc"), a("execute_call"), int(4)]),
            list(&[a("monitor")]),
        ],
        Some(list(&[peer_ref(2), a("m"), a("f"), args])),
    );
    let d = f.decide(&spawn, &AllAtoms);
    assert!(matches!(d.verdict, Verdict::Answer(_)), "{d:?}");
    // erpc:execute_call/3 (exported) is not unwrapped and so not allowed either.
    let three = pkt(
        29,
        &[
            peer_ref(1),
            peer(5),
            peer(5),
            t(&[a("erpc"), a("execute_call"), int(3)]),
            list(&[]),
        ],
        Some(list(&[a("m"), a("f"), list(&[a("x"), a("y")])])),
    );
    assert!(!delivered(&f.decide(&three, &AllAtoms)));
}

/// An exit signal through ALTACT_SIG_SEND is refused whatever its target form.
#[test]
fn altact_exit_is_refused_for_every_target_form() {
    let mut f = filter();
    f.observe_outgoing(&send_sender(
        local(1),
        peer(5),
        t(&[local(100), local_ref(9)]),
    ));
    for (flags, to) in [
        (16u8, local(100)),
        (16 | 4, local_ref(9)),
        (16 | 8, a("results")),
    ] {
        let p = pkt(37, &[int(flags), peer(5), to], Some(a("kill")));
        assert_eq!(f.decide(&p, &AllAtoms).reason, Some(Reason::ExitDenied));
    }
}

/// Even without an MFA, a granted group leader answers input requests: the peer can
/// prompt at the desktop's console and read what the user types (group.erl replies to
/// From with the line).
#[test]
fn input_requests_to_a_granted_group_leader_are_refused() {
    let mut f = filter();
    observe_erpc_call_from(&mut f, 1, 60, list(&[a("monitor")]));
    let io = send_sender(
        peer(6),
        local(60),
        t(&[
            a("io_request"),
            peer(6),
            peer_ref(3),
            t(&[a("get_line"), a("unicode"), string("Password: ")]),
        ]),
    );
    let d = f.decide(&io, &AllAtoms);
    assert!(!delivered(&d), "{d:?}");
}

/// Audit mode delivers what it would refuse — including atoms that do not exist (the atom
/// table grows) and system messages. The design says "logs what would be denied but
/// delivers it"; the review suggests audit keep the hard invariants (no new atoms, no
/// system processes or messages, no spawn) and relax only the grant/allowlist rules.
#[test]
fn audit_mode_keeps_the_hard_invariants() {
    struct NoNewAtoms;
    impl AtomTable for NoNewAtoms {
        fn exists(&self, a: Atom<'_>) -> bool {
            a.text != b"fresh_atom_1"
        }
    }
    let policy = TierPolicy {
        audit: true,
        ..TierPolicy::default()
    };
    let mut f = filter_with(policy, Vec::new());
    f.observe_outgoing(&send_sender(local(1), peer(5), local(100)));
    let fresh = send_sender(peer(5), local(100), a("fresh_atom_1"));
    let d = f.decide(&fresh, &NoNewAtoms);
    assert!(
        !matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)),
        "{d:?}"
    );
    let sys = send_sender(
        peer(5),
        local(100),
        t(&[a("system"), peer(5), a("suspend")]),
    );
    let d = f.decide(&sys, &NoNewAtoms);
    assert!(
        !matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)),
        "{d:?}"
    );
}
