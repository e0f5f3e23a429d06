//! Bugs found by the vector, property and fuzz tests, one test each, kept as regressions.

mod common;

use common::*;
use trust_dist_proto::control::{self, Control};
use trust_dist_proto::etf::{self, Term};
use trust_dist_proto::filter::{Reason, Verdict};
use trust_dist_proto::policy::TierPolicy;

fn atoms() -> Atoms {
    Atoms::of_vectors(&[])
}

/// `#{a => 1, b => 2}`
fn small_map() -> Vec<u8> {
    let mut m = vec![etf::tag::MAP, 0, 0, 0, 2];
    m.extend(atom_bytes("a"));
    m.extend_from_slice(&[etf::tag::SMALL_INTEGER, 1]);
    m.extend(atom_bytes("b"));
    m.extend_from_slice(&[etf::tag::SMALL_INTEGER, 2]);
    m
}

#[test]
fn map_seq_reaches_every_key_and_value() {
    let m = small_map();
    let (term, len) = Term::parse(&m).expect("parses");
    assert_eq!(len, m.len());
    let Term::Map(seq) = term else {
        panic!("map expected")
    };
    assert_eq!(seq.len(), 4, "keys and values");
    // Keys and values alternate: a, 1, b, 2.
    let items: Vec<Term<'_>> = seq.iter().collect::<Result<_, _>>().expect("items");
    assert_eq!(items.len(), 4, "{items:?}");
    assert!(items[2].is_atom("b"));
    assert_eq!(seq.get(3), Ok(Term::Int(2)));
}

/// A REG_SEND of the `is_auth` call (delivered by default) whose unused sender slot
/// holds a pid of a node named by an atom this node does not have. The slot takes only
/// an atom now (the packet is malformed), and node atoms anywhere are checked.
#[test]
fn a_fresh_node_atom_in_the_control_message_is_refused() {
    for r in ["25", "29"] {
        let v = vector(r, "06_reg_send_net_kernel_is_auth.bin");
        let d = v.filter(TierPolicy::default()).decide(&v.bytes, &atoms());
        assert_eq!(d.verdict, Verdict::Deliver, "the original passes");
        let unused = atom_bytes("");
        let fresh = pid_bytes("fresh_atom@nowhere", 1, 0, 1);
        let bytes = replace_in_control(&v.bytes, &unused, &fresh);
        let d = v.filter(TierPolicy::default()).decide(&bytes, &atoms());
        assert!(
            matches!(
                d.reason,
                Some(Reason::Malformed | Reason::NewAtom | Reason::ThirdNodeIdentity)
            ) && !matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)),
            "fresh_atom@nowhere reaches the VM: {d:?}"
        );
    }
}

/// MONITOR_P_EXIT (21) carries its reason in the control message, where identifiers are
/// not checked: a DOWN for a real monitor can hand the local process a third node's pid
/// and a local pid the peer was never given.
#[test]
fn identifiers_in_a_control_message_reason_are_checked() {
    for r in ["25", "29"] {
        let out = vector(r, "out_19_monitor_p_by_pid.bin");
        let Control::MonitorP {
            from,
            to: control::Proc::Pid(watched),
            reference,
        } = out.decode().control
        else {
            panic!()
        };
        // A node this one knows the name of (the atom exists), but not the peer.
        let other = if r == "25" {
            "hi29x1825894@127.0.0.1"
        } else {
            "hi25x1824762@127.0.0.1"
        };
        let third = pid_bytes(other, 5, 0, 7);
        let reason = tuple(&[&third]);
        let down = packet(21, &[watched.raw, from.raw, reference.raw, &reason], None);
        let mut f = out.filter(TierPolicy::default());
        f.observe_outgoing(&out.bytes);
        let d = f.decide(&down, &atoms());
        assert_ne!(
            d.verdict,
            Verdict::Deliver,
            "a third node's pid reaches the VM in a DOWN reason: {d:?}"
        );
    }
}

/// Found by the `hello_and_certificate` fuzz target
/// (`fuzz/artifacts/hello_and_certificate/crash-bc512c36c1c07fcb570f66e479a99f7aea92f21d`,
/// input `6d 00 00 1d 00 00 00 00 00 00 00 33`: mode 4, XOR into a valid certificate,
/// turning byte 2 from 0xc4 to 0xd9). The body is checked for canonical encoding, the
/// envelope `[format, body, signature]` is not: the body as a MessagePack str8 instead of
/// bin8 decodes to the same certificate, which still verifies.
#[test]
fn a_certificate_has_one_encoding() {
    use trust_dist_proto::cert::{CertError, Certificate, CertificateBody};
    use trust_dist_proto::handshake::{encode_hello, verify_hello};
    use trust_dist_proto::identity::{KeyId, SecretKey};

    let authority = SecretKey::generate();
    let node = SecretKey::generate();
    let body = CertificateBody {
        serial: 1,
        node: "worker-*@10.0.*".into(),
        public_key: node.public(),
        tier: "worker".into(),
        not_before: 100,
        not_after: 200,
        issuer: KeyId([0; 8]),
    };
    let cert = Certificate::issue(body, &authority).expect("issues");
    let bytes = cert.to_bytes();
    // [fixarray 3, format 1, bin8 len body..., bin8 64 signature...]
    assert_eq!(bytes[..3], [0x93, 0x01, 0xc4]);
    let mut other = bytes.clone();
    other[2] = 0xd9; // str8: same length byte, same body bytes
    let decoded = Certificate::from_bytes(&other);
    if let Ok(c) = &decoded {
        assert!(c.verify(&[authority.public()], 150).is_ok());
        assert_eq!(c.to_bytes(), bytes, "re-encodes to the other form");
    }
    assert!(
        matches!(
            decoded,
            Err(CertError::NonCanonical | CertError::Malformed(_))
        ),
        "a second encoding of the same certificate is accepted: {decoded:?}"
    );
    // The same holds for the hello that carries it.
    let hello = encode_hello(&cert);
    let at = hello
        .windows(bytes.len())
        .position(|w| w == &bytes[..])
        .expect("certificate inside the hello");
    let mut other_hello = hello.clone();
    other_hello[at + 2] = 0xd9;
    assert!(verify_hello(&other_hello, &[authority.public()], &node.public(), 150).is_err());
}
