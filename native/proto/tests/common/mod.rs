//! Shared by the integration tests: the captured vectors (from each release's
//! `index.json`), an atom table made of every atom they contain, a parser for the
//! printed terms `index.json` describes them with, and packet builders.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;
use trust_dist_proto::control::{self, Packet};
use trust_dist_proto::etf::{self, Atom, Pid, Reference, Term, Visitor};
use trust_dist_proto::filter::{AtomTable, LinkFilter, NodeId};
use trust_dist_proto::policy::TierPolicy;

/// One captured packet and what `index.json` says about it.
#[derive(Debug, Clone)]
pub struct Vector {
    pub release: String,
    pub file: String,
    pub op: u8,
    /// lo → hi: the peer sent it to the capturing node.
    pub incoming: bool,
    pub local: NodeId,
    pub peer: NodeId,
    pub step: String,
    pub how: String,
    pub control: String,
    pub payload: Option<String>,
    pub size: usize,
    pub bytes: Vec<u8>,
}

impl Vector {
    pub fn name(&self) -> String {
        format!("otp{}/{}", self.release, self.file)
    }

    pub fn decode(&self) -> Packet<'_> {
        control::decode(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: does not decode: {e}", self.name()))
    }

    /// A fresh filter on the capturing node's link to the peer.
    pub fn filter(&self, policy: TierPolicy) -> LinkFilter {
        LinkFilter::new(self.local.clone(), self.peer.clone(), policy, Vec::new())
    }
}

pub fn vector_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

pub const RELEASES: [&str; 2] = ["otp25", "otp29"];

fn load() -> Vec<Vector> {
    let mut out = Vec::new();
    for dir in RELEASES {
        let base = vector_dir().join(dir);
        let text = std::fs::read_to_string(base.join("index.json")).expect("index.json");
        let index: serde_json::Value = serde_json::from_str(&text).expect("index.json is JSON");
        let release = index["otp_release"]
            .as_str()
            .expect("otp_release")
            .to_owned();
        for v in index["vectors"].as_array().expect("vectors") {
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
            let file = s("file");
            let bytes = std::fs::read(base.join(&file)).expect("vector file");
            let direction = s("direction");
            assert!(
                direction == "lo->hi" || direction == "hi->lo",
                "{file}: direction {direction}"
            );
            out.push(Vector {
                release: release.clone(),
                op: u8::try_from(n("op")).expect("op"),
                incoming: direction == "lo->hi",
                local: NodeId {
                    name: s("local_node"),
                    creation: u32::try_from(n("local_creation")).expect("creation"),
                },
                peer: NodeId {
                    name: s("peer_node"),
                    creation: u32::try_from(n("peer_creation")).expect("creation"),
                },
                step: s("step"),
                how: s("how"),
                control: s("control"),
                payload: v["payload"].as_str().map(str::to_owned),
                size: n("size") as usize,
                bytes,
                file,
            });
        }
    }
    out
}

pub fn vectors() -> &'static [Vector] {
    static V: OnceLock<Vec<Vector>> = OnceLock::new();
    V.get_or_init(load)
}

pub fn vector(release: &str, file: &str) -> &'static Vector {
    vectors()
        .iter()
        .find(|v| v.release == release && v.file == file)
        .unwrap_or_else(|| panic!("no vector otp{release}/{file}"))
}

pub fn incoming() -> impl Iterator<Item = &'static Vector> {
    vectors().iter().filter(|v| v.incoming)
}

/// The outgoing vectors captured in the same step as `v`, in capture order.
pub fn outgoing_of_step(v: &Vector) -> Vec<&'static Vector> {
    vectors()
        .iter()
        .filter(|o| !o.incoming && o.release == v.release && o.step == v.step)
        .collect()
}

/// Every vector of `v`'s step, in capture order.
pub fn step_of(v: &Vector) -> Vec<&'static Vector> {
    vectors()
        .iter()
        .filter(|o| o.release == v.release && o.step == v.step)
        .collect()
}

struct CollectAtoms<'s>(&'s mut BTreeSet<String>);
impl<'a> Visitor<'a> for CollectAtoms<'_> {
    fn atom(&mut self, atom: Atom<'a>) {
        self.0.insert(atom.to_utf8());
    }
    fn pid(&mut self, pid: Pid<'a>) {
        self.0.insert(pid.node.to_utf8());
    }
    fn reference(&mut self, r: Reference<'a>) {
        self.0.insert(r.node.to_utf8());
    }
}

/// The atoms of one term (and the node names of its identifiers).
pub fn atoms_of(bytes: &[u8]) -> Vec<String> {
    let mut set = BTreeSet::new();
    etf::walk(bytes, etf::SKIP_MAX_DEPTH, &mut CollectAtoms(&mut set)).expect("walks");
    set.into_iter().collect()
}

/// Every atom in every vector, and the node names.
pub fn all_vector_atoms() -> &'static BTreeSet<String> {
    static A: OnceLock<BTreeSet<String>> = OnceLock::new();
    A.get_or_init(|| {
        let mut set = BTreeSet::new();
        for v in vectors() {
            let p = v.decode();
            etf::walk(
                p.control_bytes,
                etf::SKIP_MAX_DEPTH,
                &mut CollectAtoms(&mut set),
            )
            .expect("control walks");
            if let Some(payload) = p.payload {
                etf::walk(payload, etf::SKIP_MAX_DEPTH, &mut CollectAtoms(&mut set))
                    .expect("payload walks");
            }
            set.insert(v.local.name.clone());
            set.insert(v.peer.name.clone());
        }
        set
    })
}

/// An atom table that knows a fixed set of atoms.
#[derive(Clone, Debug)]
pub struct Atoms(pub BTreeSet<String>);

impl Atoms {
    /// Every atom of the vectors, plus `extra`.
    pub fn of_vectors(extra: &[&str]) -> Atoms {
        let mut set = all_vector_atoms().clone();
        set.extend(extra.iter().map(|s| (*s).to_owned()));
        Atoms(set)
    }

    pub fn without(mut self, atom: &str) -> Atoms {
        self.0.remove(atom);
        self
    }
}

impl AtomTable for Atoms {
    fn exists(&self, atom: Atom<'_>) -> bool {
        self.0.contains(&atom.to_utf8())
    }
}

// ---- packet building -------------------------------------------------------------------

pub fn atom_bytes(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    etf::encode::atom(&mut v, name);
    v
}

pub fn pid_bytes(node: &str, id: u32, serial: u32, creation: u32) -> Vec<u8> {
    let mut v = vec![etf::tag::NEW_PID];
    etf::encode::atom(&mut v, node);
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&serial.to_be_bytes());
    v.extend_from_slice(&creation.to_be_bytes());
    v
}

/// A pass-through packet: `{Op, Elements...}` and an optional payload.
pub fn packet(op: u8, elements: &[&[u8]], payload: Option<&[u8]>) -> Vec<u8> {
    let mut v = vec![112, etf::VERSION];
    etf::encode::small_tuple(&mut v, u8::try_from(elements.len() + 1).expect("arity"));
    etf::encode::small_int(&mut v, op);
    for e in elements {
        v.extend_from_slice(e);
    }
    if let Some(p) = payload {
        v.push(etf::VERSION);
        v.extend_from_slice(p);
    }
    v
}

pub fn tuple(items: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    etf::encode::small_tuple(&mut v, u8::try_from(items.len()).expect("arity"));
    for i in items {
        v.extend_from_slice(i);
    }
    v
}

/// An outgoing SEND_SENDER from a local process to a peer process whose message holds
/// every term of `packet` (control and payload): observing it grants the peer every
/// local pid, alias and port that packet names.
pub fn grant_everything_in(filter: &mut LinkFilter, v: &Vector, bytes: &[u8]) {
    let p = control::decode(bytes).expect("decodes");
    let local = pid_bytes(&v.local.name, 1, 0, v.local.creation);
    let peer = pid_bytes(&v.peer.name, 1, 0, v.peer.creation);
    let mut items: Vec<&[u8]> = vec![p.control_bytes];
    if let Some(payload) = p.payload {
        items.push(payload);
    }
    let message = tuple(&items);
    filter.observe_outgoing(&packet(22, &[&local, &peer], Some(&message)));
}

/// `packet` with the first occurrence of `old` inside its control term replaced by `new`.
pub fn replace_in_control(bytes: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let p = control::decode(bytes).expect("decodes");
    let start = p.control_bytes.as_ptr() as usize - bytes.as_ptr() as usize;
    let end = start + p.control_bytes.len();
    let at = bytes[start..end]
        .windows(old.len())
        .position(|w| w == old)
        .expect("term inside the control message")
        + start;
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(new);
    out.extend_from_slice(&bytes[at + old.len()..]);
    out
}

/// The same pid re-encoded on another node or with another creation.
pub fn pid_elsewhere(pid: &Pid<'_>, node: &str, creation: u32) -> Vec<u8> {
    pid_bytes(node, pid.id, pid.serial, creation)
}

/// A policy that lets through everything a test is not about: the capture's names,
/// its spawned functions, funs.
pub fn open_policy() -> TierPolicy {
    let mut p = TierPolicy::default();
    for name in ["cap_target", "cap_named"] {
        p.registered.insert(name.into());
    }
    for (m, f, a) in [
        ("trust_dist_capture", "spawned", 1),
        ("trust_dist_capture", "erpc_echo", 1),
    ] {
        p.rpc.insert((m.into(), f.into(), a));
    }
    p.funs = true;
    p
}

/// A filter on which everything local that `v` names has been handed to the peer, and
/// every outgoing packet of the release has been observed.
pub fn primed(v: &Vector, policy: TierPolicy) -> LinkFilter {
    let mut f = v.filter(policy);
    for o in vectors()
        .iter()
        .filter(|o| !o.incoming && o.release == v.release)
    {
        f.observe_outgoing(&o.bytes);
    }
    grant_everything_in(&mut f, v, &v.bytes);
    f
}

// ---- printed terms ----------------------------------------------------------------------

/// A term as Erlang prints it in `index.json`.
#[derive(Debug, Clone, PartialEq)]
pub enum T {
    Int(String),
    Float,
    Atom(String),
    /// `<N.X.Y>`: N = 0 is the capturing node's, otherwise the peer's.
    Pid(u64, u64, u64),
    /// `#Ref<N.Wk...W0>`: words printed from the last to the first.
    Ref(u64, Vec<u64>),
    Port(u64, u64),
    Tuple(Vec<T>),
    List(Vec<T>, Option<Box<T>>),
    Str(String),
    Bin,
    Map(Vec<(T, T)>),
    Fun,
}

pub fn parse_printed(text: &str) -> Result<T, String> {
    let mut p = Printed {
        s: text.as_bytes(),
        i: 0,
    };
    let t = p.term()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing text at {}", p.i));
    }
    Ok(t)
}

struct Printed<'s> {
    s: &'s [u8],
    i: usize,
}

impl Printed<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }
    fn expect(&mut self, lit: &str) -> Result<(), String> {
        self.ws();
        if self.eat(lit) {
            Ok(())
        } else {
            Err(format!("expected {lit:?} at {}", self.i))
        }
    }
    fn number(&mut self) -> Result<u64, String> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .map_err(|e| e.to_string())?
            .parse()
            .map_err(|e| format!("number at {start}: {e}"))
    }
    fn dotted(&mut self) -> Result<Vec<u64>, String> {
        let mut out = vec![self.number()?];
        while self.eat(".") {
            out.push(self.number()?);
        }
        self.expect(">")?;
        Ok(out)
    }
    fn seq(&mut self, close: &str) -> Result<(Vec<T>, Option<Box<T>>), String> {
        let mut items = Vec::new();
        self.ws();
        if self.eat(close) {
            return Ok((items, None));
        }
        loop {
            items.push(self.term()?);
            self.ws();
            if self.eat(",") {
                continue;
            }
            if close == "]" && self.eat("|") {
                let tail = self.term()?;
                self.expect("]")?;
                return Ok((items, Some(Box::new(tail))));
            }
            self.expect(close)?;
            return Ok((items, None));
        }
    }
    fn quoted(&mut self, q: u8) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("unterminated quote".into()),
                Some(c) if c == q => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or("dangling escape")?;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                    self.i += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|e| e.to_string())
    }
    fn term(&mut self) -> Result<T, String> {
        self.ws();
        if self.eat("...") {
            return Err("truncated".into());
        }
        let c = self.peek().ok_or("end of text")?;
        match c {
            b'{' => {
                self.i += 1;
                Ok(T::Tuple(self.seq("}")?.0))
            }
            b'[' => {
                self.i += 1;
                let (items, tail) = self.seq("]")?;
                Ok(T::List(items, tail))
            }
            b'#' if self.eat("#Ref<") => {
                let mut n = self.dotted()?;
                let node = n.remove(0);
                n.reverse();
                Ok(T::Ref(node, n))
            }
            b'#' if self.eat("#Port<") => {
                let n = self.dotted()?;
                Ok(T::Port(n[0], n[1]))
            }
            b'#' if self.eat("#Fun<") => {
                while self.peek().is_some_and(|c| c != b'>') {
                    self.i += 1;
                }
                self.expect(">")?;
                Ok(T::Fun)
            }
            b'#' if self.eat("#{") => {
                let mut pairs = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(T::Map(pairs));
                }
                loop {
                    let k = self.term()?;
                    self.expect("=>")?;
                    let v = self.term()?;
                    pairs.push((k, v));
                    self.ws();
                    if self.eat(",") {
                        continue;
                    }
                    self.expect("}")?;
                    return Ok(T::Map(pairs));
                }
            }
            b'<' if self.eat("<<") => {
                // Binary contents are not compared.
                let mut in_string = false;
                while self.i < self.s.len() {
                    match self.s[self.i] {
                        b'"' => in_string = !in_string,
                        b'>' if !in_string && self.s.get(self.i + 1) == Some(&b'>') => {
                            self.i += 2;
                            return Ok(T::Bin);
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
                Err("unterminated binary".into())
            }
            b'<' => {
                self.i += 1;
                let n = self.dotted()?;
                if n.len() != 3 {
                    return Err("pid".into());
                }
                Ok(T::Pid(n[0], n[1], n[2]))
            }
            b'\'' => {
                self.i += 1;
                Ok(T::Atom(self.quoted(b'\'')?))
            }
            b'"' => {
                self.i += 1;
                Ok(T::Str(self.quoted(b'"')?))
            }
            b'f' if self.eat("fun ") => {
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || b":/_".contains(&c))
                {
                    self.i += 1;
                }
                Ok(T::Fun)
            }
            b'-' | b'0'..=b'9' => {
                let start = self.i;
                self.i += 1;
                let mut float = false;
                while let Some(c) = self.peek() {
                    match c {
                        b'0'..=b'9' => {}
                        b'.' | b'e' => float = true,
                        b'-' | b'+' if float => {}
                        _ => break,
                    }
                    self.i += 1;
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                Ok(if float { T::Float } else { T::Int(text) })
            }
            c if c.is_ascii_lowercase() => {
                let start = self.i;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'@')
                {
                    self.i += 1;
                }
                Ok(T::Atom(
                    String::from_utf8_lossy(&self.s[start..self.i]).into_owned(),
                ))
            }
            other => Err(format!("unexpected {:?} at {}", other as char, self.i)),
        }
    }
}

/// Whether a decoded pid is the printed one, given the vector's two nodes.
pub fn pid_is(v: &Vector, pid: &Pid<'_>, printed: &T) -> bool {
    let T::Pid(n, x, y) = printed else {
        return false;
    };
    let node = if *n == 0 { &v.local } else { &v.peer };
    pid.node.is(&node.name)
        && pid.creation == node.creation
        && u64::from(pid.id) == *x
        && u64::from(pid.serial) == *y
}

pub fn ref_is(v: &Vector, r: &Reference<'_>, printed: &T) -> bool {
    let T::Ref(n, words) = printed else {
        return false;
    };
    let node = if *n == 0 { &v.local } else { &v.peer };
    let wire: Vec<u64> = r
        .words
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    r.node.is(&node.name) && r.creation == node.creation && &wire == words
}

fn big_value(negative: bool, digits: &[u8]) -> Option<String> {
    if digits.len() > 16 {
        return None;
    }
    let v = digits
        .iter()
        .rev()
        .fold(0u128, |acc, &d| (acc << 8) | u128::from(d));
    Some(if negative {
        format!("-{v}")
    } else {
        v.to_string()
    })
}

/// Whether a decoded term is the printed one (binary contents and funs are not compared).
pub fn term_is(v: &Vector, term: &Term<'_>, printed: &T) -> bool {
    match (term, printed) {
        (Term::Int(n), T::Int(s)) => n.to_string() == *s,
        (Term::Big { negative, digits }, T::Int(s)) => match big_value(*negative, digits) {
            Some(b) => b == *s,
            None => true,
        },
        (Term::Float, T::Float) => true,
        (Term::Atom(a), T::Atom(s)) => a.to_utf8() == *s,
        (Term::Pid(p), T::Pid(..)) => pid_is(v, p, printed),
        (Term::Ref(r), T::Ref(..)) => ref_is(v, r, printed),
        (Term::Port(p), T::Port(n, id)) => {
            let node = if *n == 0 { &v.local } else { &v.peer };
            p.node.is(&node.name) && p.creation == node.creation && p.id == *id
        }
        (Term::Tuple(seq), T::Tuple(items)) => {
            seq.len() as usize == items.len()
                && items
                    .iter()
                    .enumerate()
                    .all(|(i, p)| seq.raw(i as u32).is_ok_and(|raw| raw_is(v, raw, p)))
        }
        (Term::Nil, T::List(items, None)) => items.is_empty(),
        (Term::Nil, T::Str(s)) => s.is_empty(),
        (Term::String(bytes), T::Str(s)) => s
            .chars()
            .map(u32::from)
            .eq(bytes.iter().map(|&b| u32::from(b))),
        (Term::List(seq), T::Str(s)) => {
            seq.len() as usize == s.chars().count()
                && seq
                    .iter()
                    .zip(s.chars())
                    .all(|(t, c)| matches!(t, Ok(Term::Int(n)) if n == i64::from(u32::from(c))))
        }
        (Term::String(bytes), T::List(items, None)) => {
            bytes.len() == items.len()
                && bytes
                    .iter()
                    .zip(items)
                    .all(|(b, p)| *p == T::Int(b.to_string()))
        }
        (Term::List(seq), T::List(items, tail)) => {
            let tail_ok = match (seq.tail(), tail) {
                (Ok(Term::Nil), None) => true,
                (Ok(t), Some(p)) => term_is(v, &t, p),
                _ => false,
            };
            tail_ok
                && seq.len() as usize == items.len()
                && items
                    .iter()
                    .enumerate()
                    .all(|(i, p)| seq.raw(i as u32).is_ok_and(|raw| raw_is(v, raw, p)))
        }
        (Term::Binary(_) | Term::BitBinary, T::Bin) => true,
        // Maps are compared from their bytes (see `raw_is`), in any order.
        (Term::Map(_), T::Map(_)) => false,
        (Term::Fun(_), T::Fun) => true,
        _ => false,
    }
}

/// Whether the term encoded at the start of `bytes` is the printed one. Maps are read
/// here, element by element, from their bytes.
pub fn raw_is(v: &Vector, bytes: &[u8], printed: &T) -> bool {
    let Ok((term, len)) = Term::parse(bytes) else {
        return false;
    };
    let (Term::Map(seq), T::Map(pairs)) = (&term, printed) else {
        return term_is(v, &term, printed);
    };
    // MAP_EXT: 116, Arity:32, then key, value, key, value...
    let mut rest = &bytes[5..len];
    let mut items = Vec::new();
    // A map's Seq counts keys and values.
    for _ in 0..seq.len() {
        let Ok(n) = etf::skip(rest) else {
            return false;
        };
        items.push(&rest[..n]);
        rest = &rest[n..];
    }
    seq.len() as usize == 2 * pairs.len()
        && pairs.iter().all(|(k, pv)| {
            items
                .chunks_exact(2)
                .any(|kv| raw_is(v, kv[0], k) && raw_is(v, kv[1], pv))
        })
}
