//! Property tests: the parsers that see a lower tier's bytes never panic, whatever the
//! bytes; the walker measures generated terms exactly and honours its depth limit; a
//! truncated packet is never delivered.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::Config;
use trust_dist_proto::control;
use trust_dist_proto::etf::{self, EtfError, Term, Visitor};
use trust_dist_proto::filter::{LinkFilter, NodeId, Verdict};
use trust_dist_proto::policy::TierPolicy;

/// Everything that reads peer bytes, run on `bytes`: none of it may panic.
fn exercise(bytes: &[u8]) {
    struct All(usize);
    impl<'a> Visitor<'a> for All {
        fn atom(&mut self, a: etf::Atom<'a>) {
            self.0 += a.to_utf8().len() + usize::from(a.to_latin1().is_some());
        }
        fn pid(&mut self, p: etf::Pid<'a>) {
            self.0 += p.raw.len();
        }
        fn reference(&mut self, r: etf::Reference<'a>) {
            let _ = r.key();
        }
    }
    let _ = etf::walk(bytes, 64, &mut All(0));
    let _ = etf::skip(bytes);
    if let Ok((term, _)) = Term::parse(bytes) {
        browse(&term, 3);
    }
    if let Ok(term) = Term::peek(bytes) {
        browse(&term, 3);
    }
    if let Ok(p) = control::decode(bytes) {
        let _ = Term::parse(p.control_bytes);
        if let Some(payload) = p.payload {
            let _ = etf::skip(payload);
        }
    }
}

/// Looks at every part of a term view, as the filter's rules might.
fn browse(term: &Term<'_>, depth: u32) {
    let _ = (
        term.as_atom(),
        term.as_pid(),
        term.as_ref(),
        term.list_len(),
    );
    if depth == 0 {
        return;
    }
    if let Term::Tuple(seq) | Term::List(seq) | Term::Map(seq) = term {
        let n = seq.len().min(8);
        for i in 0..n {
            if let Ok(t) = seq.get(i) {
                browse(&t, depth - 1);
            }
            let _ = seq.raw(i);
        }
        let _ = seq.get(seq.len());
        let _ = seq.tail();
        for t in seq.iter().take(8).flatten() {
            browse(&t, depth - 1);
        }
    }
}

fn node(name: &str, creation: u32) -> NodeId {
    NodeId {
        name: name.into(),
        creation,
    }
}

fn fixed_filter() -> LinkFilter {
    LinkFilter::new(
        node("hi@127.0.0.1", 1),
        node("lo@127.0.0.1", 2),
        open_policy(),
        Vec::new(),
    )
}

/// The vectors small enough to mutate many times.
fn small_vectors() -> Vec<&'static Vector> {
    vectors().iter().filter(|v| v.bytes.len() < 4096).collect()
}

fn mutated() -> impl Strategy<Value = (usize, Vec<u8>)> {
    let n = small_vectors().len();
    (
        0..n,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        prop::option::of(any::<prop::sample::Index>()),
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(move |(i, flips, cut, tail)| {
            let v = small_vectors()[i];
            let mut bytes = v.bytes.clone();
            for (at, b) in flips {
                let at = at.index(bytes.len());
                bytes[at] = b;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes.extend(tail);
            (i, bytes)
        })
}

proptest! {
    #![proptest_config(Config { cases: 2048, ..Config::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        exercise(&bytes);
        let mut f = fixed_filter();
        let _ = f.decide(&bytes, &Atoms::of_vectors(&[]));
        f.observe_outgoing(&bytes);
    }

    /// Bytes that start like a packet get further into the decoder.
    #[test]
    fn arbitrary_packets_never_panic(
        header in prop::sample::select(vec![vec![112u8, 131], vec![131, 68, 0]]),
        body in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = header;
        bytes.extend(body);
        exercise(&bytes);
        let _ = fixed_filter().decide(&bytes, &Atoms::of_vectors(&[]));
    }

    #[test]
    fn mutated_vectors_never_panic((i, bytes) in mutated()) {
        let v = small_vectors()[i];
        exercise(&bytes);
        let mut f = primed(v, open_policy());
        let _ = f.decide(&bytes, &Atoms::of_vectors(&[]));
        f.observe_outgoing(&bytes);
        let _ = f.decide(&v.bytes, &Atoms::of_vectors(&[]));
    }
}

// ---- generated terms --------------------------------------------------------------------

/// A term's encoding and its nesting depth as `etf::walk` counts it.
#[derive(Debug, Clone)]
struct Encoded {
    bytes: Vec<u8>,
    depth: usize,
}

fn leaf() -> impl Strategy<Value = Encoded> {
    let flat = |bytes: Vec<u8>| Encoded { bytes, depth: 0 };
    prop_oneof![
        any::<u8>().prop_map(move |n| flat(vec![etf::tag::SMALL_INTEGER, n])),
        any::<i32>().prop_map(move |n| {
            let mut b = vec![etf::tag::INTEGER];
            b.extend_from_slice(&n.to_be_bytes());
            flat(b)
        }),
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..12)).prop_map(move |(neg, d)| {
            let mut b = vec![etf::tag::SMALL_BIG, d.len() as u8, u8::from(neg)];
            b.extend(d);
            flat(b)
        }),
        any::<f64>().prop_map(move |x| {
            let mut b = vec![etf::tag::NEW_FLOAT];
            b.extend_from_slice(&x.to_be_bytes());
            flat(b)
        }),
        "[a-z_@.]{0,20}".prop_map(move |s| flat(atom_bytes(&s))),
        "\\PC{0,10}".prop_map(move |s| {
            let mut b = vec![etf::tag::ATOM_UTF8];
            b.extend_from_slice(&(s.len() as u16).to_be_bytes());
            b.extend_from_slice(s.as_bytes());
            flat(b)
        }),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(move |d| {
            let mut b = vec![etf::tag::BINARY];
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend(d);
            flat(b)
        }),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(move |d| {
            let mut b = vec![etf::tag::STRING];
            b.extend_from_slice(&(d.len() as u16).to_be_bytes());
            b.extend(d);
            flat(b)
        }),
        Just(flat(vec![etf::tag::NIL])),
        (
            "[a-z]{1,8}@[a-z]{1,8}",
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(move |(n, id, serial, cr)| flat(pid_bytes(&n, id, serial, cr))),
        (
            "[a-z]{1,8}@[a-z]{1,8}",
            1..=5usize,
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(move |(n, words, cr, w)| {
                let mut b = vec![etf::tag::NEWER_REFERENCE, 0, words as u8];
                b.extend(atom_bytes(&n));
                b.extend_from_slice(&cr.to_be_bytes());
                for i in 0..words {
                    b.extend_from_slice(&w.wrapping_add(i as u32).to_be_bytes());
                }
                flat(b)
            }),
        ("[a-z]{1,8}@[a-z]{1,8}", any::<u64>(), any::<u32>()).prop_map(move |(n, id, cr)| {
            let mut b = vec![etf::tag::V4_PORT];
            b.extend(atom_bytes(&n));
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&cr.to_be_bytes());
            flat(b)
        }),
    ]
}

fn compound(items: Vec<Encoded>, header: Vec<u8>, extra_subterms: Vec<Encoded>) -> Encoded {
    let mut bytes = header;
    let n = items.len() + extra_subterms.len();
    let mut depth = 0;
    for i in items.into_iter().chain(extra_subterms) {
        depth = depth.max(i.depth);
        bytes.extend(i.bytes);
    }
    Encoded {
        bytes,
        depth: if n == 0 { 0 } else { depth + 1 },
    }
}

fn term() -> impl Strategy<Value = Encoded> {
    leaf().prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                let header = vec![etf::tag::SMALL_TUPLE, items.len() as u8];
                compound(items, header, Vec::new())
            }),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|items| {
                let mut header = vec![etf::tag::LARGE_TUPLE];
                header.extend_from_slice(&(items.len() as u32).to_be_bytes());
                compound(items, header, Vec::new())
            }),
            (prop::collection::vec(inner.clone(), 1..6), inner.clone()).prop_map(
                |(items, tail)| {
                    let mut header = vec![etf::tag::LIST];
                    header.extend_from_slice(&(items.len() as u32).to_be_bytes());
                    compound(items, header, vec![tail])
                }
            ),
            prop::collection::vec((inner.clone(), inner), 0..4).prop_map(|pairs| {
                let mut header = vec![etf::tag::MAP];
                header.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
                let items = pairs.into_iter().flat_map(|(k, v)| [k, v]).collect();
                compound(items, header, Vec::new())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(Config { cases: 1024, ..Config::default() })]

    #[test]
    fn skip_measures_a_generated_term_exactly(
        t in term(),
        trailing in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut bytes = t.bytes.clone();
        bytes.extend(&trailing);
        prop_assert_eq!(etf::skip(&bytes), Ok(t.bytes.len()));
        let (_, len) = Term::parse(&bytes).expect("parses");
        prop_assert_eq!(len, t.bytes.len());
        let ext = etf::walk(&bytes, 64, &mut Nothing).expect("walks");
        prop_assert_eq!(ext.len, t.bytes.len());
        prop_assert_eq!(ext.depth, t.depth);
        // Every strict prefix is refused.
        for cut in 0..t.bytes.len() {
            prop_assert!(etf::skip(&t.bytes[..cut]).is_err(), "prefix {} of {}", cut, t.bytes.len());
        }
    }

    #[test]
    fn the_depth_limit_is_exact(t in term()) {
        prop_assert!(etf::walk(&t.bytes, t.depth, &mut Nothing).is_ok());
        if t.depth > 0 {
            prop_assert_eq!(
                etf::walk(&t.bytes, t.depth - 1, &mut Nothing),
                Err(EtfError::TooDeep(t.depth - 1))
            );
        }
    }

    #[test]
    fn a_generated_term_wrapped_n_deep_is_refused_past_the_limit(
        t in term(),
        wraps in 0usize..200,
        limit in 0usize..300,
    ) {
        let mut bytes = Vec::new();
        for _ in 0..wraps {
            bytes.extend_from_slice(&[etf::tag::SMALL_TUPLE, 1]);
        }
        bytes.extend(&t.bytes);
        let depth = wraps + t.depth;
        let r = etf::walk(&bytes, limit, &mut Nothing);
        if depth <= limit {
            prop_assert_eq!(r.map(|e| (e.len, e.depth)), Ok((bytes.len(), depth)));
        } else {
            prop_assert_eq!(r, Err(EtfError::TooDeep(limit)));
        }
    }

    #[test]
    fn a_generated_message_goes_through_decode(t in term()) {
        // {22, From, To} with the generated term as the message.
        let from = pid_bytes("lo@127.0.0.1", 7, 0, 2);
        let to = pid_bytes("hi@127.0.0.1", 8, 0, 1);
        let bytes = packet(22, &[&from, &to], Some(&t.bytes));
        let p = control::decode(&bytes).expect("decodes");
        prop_assert_eq!(p.payload, Some(&t.bytes[..]));
        let _ = fixed_filter().decide(&bytes, &Atoms::of_vectors(&[]));
    }
}

struct Nothing;
impl Visitor<'_> for Nothing {}

// ---- truncation -------------------------------------------------------------------------

/// Every strict prefix of every incoming vector (on a filter where the whole packet
/// would pass as far as the state goes) is refused and closes the link.
#[test]
fn a_truncated_packet_is_never_delivered() {
    let atoms = Atoms::of_vectors(&[]);
    let mut cuts = 0;
    for v in incoming().filter(|v| v.bytes.len() < 8192) {
        let mut f = primed(v, open_policy());
        for cut in 0..v.bytes.len() {
            let d = f.decide(&v.bytes[..cut], &atoms);
            assert!(
                !matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)),
                "{} cut at {cut}: {d:?}",
                v.name()
            );
            assert_eq!(
                d.verdict,
                Verdict::Close,
                "{} cut at {cut}: {d:?}",
                v.name()
            );
            cuts += 1;
        }
    }
    assert!(cuts > 10_000, "{cuts}");
}

/// The 1 MiB vector, cut at a sample of points.
#[test]
fn the_big_vector_truncated_is_never_delivered() {
    let v = vector("25", "22_send_sender_big_binary.bin");
    let atoms = Atoms::of_vectors(&[]);
    let mut f = primed(v, open_policy());
    let n = v.bytes.len();
    for cut in (0..200).chain((200..n).step_by(4099)).chain(n - 64..n) {
        let d = f.decide(&v.bytes[..cut], &atoms);
        assert_eq!(d.verdict, Verdict::Close, "cut at {cut}: {d:?}");
    }
    assert_eq!(f.decide(&v.bytes, &atoms).verdict, Verdict::Deliver);
}

proptest! {
    #![proptest_config(Config { cases: 1024, ..Config::default() })]

    /// A truncated packet with arbitrary bytes appended (the shape of a frame boundary
    /// error) is never delivered with its original meaning unchanged: if it is
    /// delivered at all, it decodes as a complete packet by itself.
    #[test]
    fn truncated_then_extended_is_delivered_only_if_whole(
        (i, cut) in (0..small_vectors().len()).prop_flat_map(|i| {
            (Just(i), 0..small_vectors()[i].bytes.len())
        }),
        tail in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let v = small_vectors()[i];
        let mut bytes = v.bytes[..cut].to_vec();
        bytes.extend(&tail);
        let d = primed(v, open_policy()).decide(&bytes, &Atoms::of_vectors(&[]));
        if matches!(d.verdict, Verdict::Deliver | Verdict::DeliverRewritten(_)) {
            prop_assert!(control::decode(&bytes).is_ok());
        }
    }
}

#[test]
fn the_filter_is_unchanged_by_policy_defaults() {
    // The properties above run with the open policy; the default one must be as safe.
    let v = vector("29", "22_send_sender.bin");
    let mut f = primed(v, TierPolicy::default());
    for cut in 0..v.bytes.len() {
        assert_eq!(
            f.decide(&v.bytes[..cut], &Atoms::of_vectors(&[])).verdict,
            Verdict::Close
        );
    }
}
