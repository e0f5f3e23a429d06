//! The external term format, read without building terms.
//!
//! Two tools over the same tag table:
//!
//! * [`walk`] visits every node of a term iteratively (no recursion, so no stack to
//!   exhaust), bounded in depth, and reports to a [`Visitor`] each atom, pid, port,
//!   reference and fun it meets. It returns the term's extent, so a caller can find what
//!   follows it. It never allocates by a length the input announces: every count is
//!   checked against the bytes that remain.
//! * [`Term::parse`] reads the head of one term into a borrowed view; compound terms
//!   give their elements lazily through [`Seq`], so looking at the first element of a
//!   huge tuple costs nothing.
//!
//! Anything this module does not know (an unknown tag, `ATOM_CACHE_REF` without an atom
//! cache, compressed terms, `LOCAL_EXT`) is an error: a peer's term that cannot be read
//! here is never handed to the VM.

/// The version byte in front of a whole external term.
pub const VERSION: u8 = 131;

/// Term tags, as in `erl_ext_dist`.
pub mod tag {
    pub const NEW_FLOAT: u8 = 70;
    pub const BIT_BINARY: u8 = 77;
    pub const COMPRESSED: u8 = 80;
    pub const ATOM_CACHE_REF: u8 = 82;
    pub const NEW_PID: u8 = 88;
    pub const NEW_PORT: u8 = 89;
    pub const NEWER_REFERENCE: u8 = 90;
    pub const SMALL_INTEGER: u8 = 97;
    pub const INTEGER: u8 = 98;
    pub const FLOAT: u8 = 99;
    pub const ATOM: u8 = 100;
    pub const REFERENCE: u8 = 101;
    pub const PORT: u8 = 102;
    pub const PID: u8 = 103;
    pub const SMALL_TUPLE: u8 = 104;
    pub const LARGE_TUPLE: u8 = 105;
    pub const NIL: u8 = 106;
    pub const STRING: u8 = 107;
    pub const LIST: u8 = 108;
    pub const BINARY: u8 = 109;
    pub const SMALL_BIG: u8 = 110;
    pub const LARGE_BIG: u8 = 111;
    pub const NEW_FUN: u8 = 112;
    pub const EXPORT: u8 = 113;
    pub const NEW_REFERENCE: u8 = 114;
    pub const SMALL_ATOM: u8 = 115;
    pub const MAP: u8 = 116;
    pub const ATOM_UTF8: u8 = 118;
    pub const SMALL_ATOM_UTF8: u8 = 119;
    pub const V4_PORT: u8 = 120;
    pub const LOCAL: u8 = 121;
}

/// Most characters in an atom, as the VM enforces.
pub const MAX_ATOM_CHARS: usize = 255;
/// Most 32-bit words in a reference (OTP 26+ pid references use 5).
pub const MAX_REF_WORDS: usize = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum EtfError {
    #[error("term ends early")]
    Truncated,
    #[error("unknown term tag {0}")]
    UnknownTag(u8),
    #[error("atom cache reference in a term, but no atom cache is in use")]
    AtomCacheRef,
    #[error("term nested deeper than {0}")]
    TooDeep(usize),
    #[error("atom is not valid ({0})")]
    BadAtom(&'static str),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("missing version byte 131")]
    NoVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AtomEncoding {
    Latin1,
    Utf8,
}

/// An atom's text as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Atom<'a> {
    pub text: &'a [u8],
    pub encoding: AtomEncoding,
}

impl<'a> Atom<'a> {
    /// The text as UTF-8 (Latin-1 text is converted).
    pub fn to_utf8(&self) -> String {
        match self.encoding {
            AtomEncoding::Utf8 => String::from_utf8_lossy(self.text).into_owned(),
            AtomEncoding::Latin1 => self.text.iter().map(|&b| char::from(b)).collect(),
        }
    }

    /// True if this atom is the atom whose UTF-8 text is `name`.
    pub fn is(&self, name: &str) -> bool {
        match self.encoding {
            AtomEncoding::Utf8 => self.text == name.as_bytes(),
            AtomEncoding::Latin1 if self.text.is_ascii() => self.text == name.as_bytes(),
            AtomEncoding::Latin1 => self.to_utf8() == name,
        }
    }

    /// The text as Latin-1 bytes, if every character fits; what the VM's existing-atom
    /// lookup takes before OTP 26.
    pub fn to_latin1(&self) -> Option<Vec<u8>> {
        match self.encoding {
            AtomEncoding::Latin1 => Some(self.text.to_vec()),
            AtomEncoding::Utf8 => std::str::from_utf8(self.text)
                .ok()?
                .chars()
                .map(|c| u8::try_from(u32::from(c)).ok())
                .collect(),
        }
    }
}

/// A pid: its node's atom and the numbers that identify it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid<'a> {
    pub node: Atom<'a>,
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
    /// The whole encoded term, tag included: answers copy it unchanged.
    pub raw: &'a [u8],
}

impl Pid<'_> {
    pub fn key(&self) -> PidKey {
        PidKey {
            id: self.id,
            serial: self.serial,
            creation: self.creation,
        }
    }
}

/// What identifies a pid on a known node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PidKey {
    pub id: u32,
    pub serial: u32,
    pub creation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port<'a> {
    pub node: Atom<'a>,
    pub id: u64,
    pub creation: u32,
}

impl Port<'_> {
    pub fn key(&self) -> PortKey {
        PortKey {
            id: self.id,
            creation: self.creation,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub id: u64,
    pub creation: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference<'a> {
    pub node: Atom<'a>,
    pub creation: u32,
    /// The id words, big-endian u32 each, as on the wire (1 to 5 of them).
    pub words: &'a [u8],
    /// The whole encoded term, tag included.
    pub raw: &'a [u8],
}

impl Reference<'_> {
    pub fn key(&self) -> RefKey {
        let mut words = [0u32; MAX_REF_WORDS];
        for (w, chunk) in words.iter_mut().zip(self.words.chunks_exact(4)) {
            *w = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        RefKey {
            creation: self.creation,
            len: (self.words.len() / 4) as u8,
            words,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefKey {
    pub creation: u32,
    pub len: u8,
    pub words: [u32; MAX_REF_WORDS],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FunKind {
    /// A closure (`NEW_FUN_EXT`): code of a module, with captured values.
    Closure,
    /// `fun M:F/A` (`EXPORT_EXT`): any exported function.
    Export,
}

/// What [`walk`] reports. Every method has a default that ignores the node.
pub trait Visitor<'a> {
    fn atom(&mut self, _atom: Atom<'a>) {}
    fn pid(&mut self, _pid: Pid<'a>) {}
    fn port(&mut self, _port: Port<'a>) {}
    fn reference(&mut self, _reference: Reference<'a>) {}
    fn fun(&mut self, _kind: FunKind) {}
}

/// A visitor that looks at nothing: [`skip`].
struct Nothing;
impl Visitor<'_> for Nothing {}

/// What a walk found besides what it told the visitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Extent {
    /// Bytes the term occupies.
    pub len: usize,
    /// Deepest nesting of compound terms (a flat term is 0).
    pub depth: usize,
}

/// Byte reader over the input; every read is bounds-checked.
#[derive(Clone, Copy)]
struct Input<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EtfError> {
        let end = self.pos.checked_add(n).ok_or(EtfError::Truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or(EtfError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, EtfError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EtfError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, EtfError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, EtfError> {
        let s = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Ok(u64::from_be_bytes(b))
    }
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    /// A count of things still to read, each at least `min_bytes` long: a count that
    /// could not fit in what remains is refused before anything is sized by it.
    fn count(&self, n: u64, min_bytes: u64) -> Result<u32, EtfError> {
        if n.saturating_mul(min_bytes) > self.remaining() as u64 {
            return Err(EtfError::Truncated);
        }
        u32::try_from(n).map_err(|_| EtfError::Truncated)
    }
}

fn atom_text(text: &[u8], encoding: AtomEncoding) -> Result<Atom<'_>, EtfError> {
    // Nearly every atom is ASCII: one character per byte, valid in both encodings.
    if text.is_ascii() {
        if text.len() > MAX_ATOM_CHARS {
            return Err(EtfError::BadAtom("longer than 255 characters"));
        }
        return Ok(Atom { text, encoding });
    }
    match encoding {
        AtomEncoding::Latin1 => {
            if text.len() > MAX_ATOM_CHARS {
                return Err(EtfError::BadAtom("longer than 255 characters"));
            }
        }
        AtomEncoding::Utf8 => {
            let s = std::str::from_utf8(text).map_err(|_| EtfError::BadAtom("invalid UTF-8"))?;
            if s.chars().count() > MAX_ATOM_CHARS {
                return Err(EtfError::BadAtom("longer than 255 characters"));
            }
        }
    }
    Ok(Atom { text, encoding })
}

/// Reads an atom whose tag has been read.
fn atom_body<'a>(input: &mut Input<'a>, tag: u8) -> Result<Atom<'a>, EtfError> {
    let (len, encoding) = match tag {
        tag::ATOM => (usize::from(input.u16()?), AtomEncoding::Latin1),
        tag::SMALL_ATOM => (usize::from(input.u8()?), AtomEncoding::Latin1),
        tag::ATOM_UTF8 => (usize::from(input.u16()?), AtomEncoding::Utf8),
        tag::SMALL_ATOM_UTF8 => (usize::from(input.u8()?), AtomEncoding::Utf8),
        tag::ATOM_CACHE_REF => return Err(EtfError::AtomCacheRef),
        _ => return Err(EtfError::Malformed("atom expected")),
    };
    atom_text(input.take(len)?, encoding)
}

/// Reads a whole atom term (tag and body): the node of a pid, port or reference.
fn atom_term<'a>(input: &mut Input<'a>) -> Result<Atom<'a>, EtfError> {
    let tag = input.u8()?;
    atom_body(input, tag)
}

/// The one place that knows the layout of each leaf tag. For compound tags it reads
/// the header only and says how many sub-terms follow.
enum Head<'a> {
    Leaf(Term<'a>),
    /// `n` sub-terms follow (their kind is in the term).
    Compound(Term<'a>, u32),
}

fn head<'a>(input: &mut Input<'a>) -> Result<Head<'a>, EtfError> {
    let start = input.pos;
    let t = input.u8()?;
    let leaf = |term| Ok(Head::Leaf(term));
    match t {
        tag::SMALL_INTEGER => leaf(Term::Int(i64::from(input.u8()?))),
        tag::INTEGER => leaf(Term::Int(i64::from(input.u32()? as i32))),
        // The VM refuses a float that is not finite when it decodes (and then drops the
        // connection itself): refuse it here, so it never reaches the VM's decoder.
        tag::NEW_FLOAT => {
            let bytes: [u8; 8] = input.take(8)?.try_into().map_err(|_| EtfError::Truncated)?;
            if !f64::from_be_bytes(bytes).is_finite() {
                return Err(EtfError::Malformed("float (not finite)"));
            }
            leaf(Term::Float)
        }
        // The old text form ("%.20e", NUL padded): only a finite number in that form.
        tag::FLOAT => {
            let text = input.take(31)?;
            let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
            let finite = std::str::from_utf8(&text[..end])
                .ok()
                .and_then(|t| t.trim().parse::<f64>().ok())
                .is_some_and(f64::is_finite);
            if !finite {
                return Err(EtfError::Malformed("float (text form)"));
            }
            leaf(Term::Float)
        }
        tag::SMALL_BIG | tag::LARGE_BIG => {
            let n = if t == tag::SMALL_BIG {
                u64::from(input.u8()?)
            } else {
                u64::from(input.u32()?)
            };
            let sign = input.u8()?;
            if sign > 1 {
                return Err(EtfError::Malformed("bignum sign"));
            }
            let n = input.count(n, 1)?;
            let digits = input.take(n as usize)?;
            leaf(Term::Big {
                negative: sign == 1,
                digits,
            })
        }
        tag::ATOM
        | tag::SMALL_ATOM
        | tag::ATOM_UTF8
        | tag::SMALL_ATOM_UTF8
        | tag::ATOM_CACHE_REF => leaf(Term::Atom(atom_body(input, t)?)),
        tag::PID | tag::NEW_PID => {
            let node = atom_term(input)?;
            let id = input.u32()?;
            let serial = input.u32()?;
            let creation = if t == tag::PID {
                u32::from(input.u8()?)
            } else {
                input.u32()?
            };
            let raw = &input.bytes[start..input.pos];
            leaf(Term::Pid(Pid {
                node,
                id,
                serial,
                creation,
                raw,
            }))
        }
        tag::PORT | tag::NEW_PORT | tag::V4_PORT => {
            let node = atom_term(input)?;
            let id = if t == tag::V4_PORT {
                input.u64()?
            } else {
                u64::from(input.u32()?)
            };
            let creation = if t == tag::PORT {
                u32::from(input.u8()?)
            } else {
                input.u32()?
            };
            leaf(Term::Port(Port { node, id, creation }))
        }
        tag::REFERENCE => {
            let node = atom_term(input)?;
            let words = input.take(4)?;
            let creation = u32::from(input.u8()?);
            let raw = &input.bytes[start..input.pos];
            leaf(Term::Ref(Reference {
                node,
                creation,
                words,
                raw,
            }))
        }
        tag::NEW_REFERENCE | tag::NEWER_REFERENCE => {
            let len = usize::from(input.u16()?);
            if len == 0 || len > MAX_REF_WORDS {
                return Err(EtfError::Malformed("reference length"));
            }
            let node = atom_term(input)?;
            let creation = if t == tag::NEW_REFERENCE {
                u32::from(input.u8()?)
            } else {
                input.u32()?
            };
            let words = input.take(len * 4)?;
            let raw = &input.bytes[start..input.pos];
            leaf(Term::Ref(Reference {
                node,
                creation,
                words,
                raw,
            }))
        }
        tag::NIL => leaf(Term::Nil),
        tag::STRING => {
            let len = usize::from(input.u16()?);
            leaf(Term::String(input.take(len)?))
        }
        tag::BINARY => {
            let len = input.u32()?;
            let len = input.count(u64::from(len), 1)?;
            leaf(Term::Binary(input.take(len as usize)?))
        }
        tag::BIT_BINARY => {
            let len = input.u32()?;
            let bits = input.u8()?;
            if !(1..=8).contains(&bits) || len == 0 {
                return Err(EtfError::Malformed("bitstring"));
            }
            let len = input.count(u64::from(len), 1)?;
            input.take(len as usize)?;
            leaf(Term::BitBinary)
        }
        tag::SMALL_TUPLE | tag::LARGE_TUPLE => {
            let n = if t == tag::SMALL_TUPLE {
                u64::from(input.u8()?)
            } else {
                u64::from(input.u32()?)
            };
            let n = input.count(n, 1)?;
            Ok(Head::Compound(Term::Tuple(Seq::new(n, input)), n))
        }
        tag::LIST => {
            let n = input.u32()?;
            // The elements and the tail.
            let n = input.count(u64::from(n) + 1, 1)?;
            Ok(Head::Compound(Term::List(Seq::new(n - 1, input)), n))
        }
        tag::MAP => {
            let n = input.u32()?;
            let n = input.count(u64::from(n) * 2, 1)?;
            Ok(Head::Compound(Term::Map(Seq::new(n, input)), n))
        }
        tag::NEW_FUN => {
            // Size:32 Arity:8 Uniq:16 Index:32 NumFree:32, then Module, OldIndex,
            // OldUniq and Pid terms, then NumFree free variables.
            input.take(4 + 1 + 16 + 4)?;
            let free = input.u32()?;
            let n = input.count(u64::from(free) + 4, 1)?;
            Ok(Head::Compound(Term::Fun(FunKind::Closure), n))
        }
        tag::EXPORT => Ok(Head::Compound(Term::Fun(FunKind::Export), 3)),
        tag::COMPRESSED | tag::LOCAL => Err(EtfError::UnknownTag(t)),
        other => Err(EtfError::UnknownTag(other)),
    }
}

/// Walks the term at the start of `bytes` (no version byte), telling `visitor` about
/// every atom, pid, port, reference and fun in it, and returns its extent. Terms nested
/// deeper than `max_depth` are refused.
pub fn walk<'a, V: Visitor<'a>>(
    bytes: &'a [u8],
    max_depth: usize,
    visitor: &mut V,
) -> Result<Extent, EtfError> {
    let mut input = Input { bytes, pos: 0 };
    // Sub-terms still to read at each open level.
    let mut open = Levels::default();
    let mut depth = 0;
    loop {
        match head(&mut input)? {
            // The node atom of a pid, port or reference is an atom like any other: the
            // visitor sees it (it would be created if it did not exist).
            Head::Leaf(term) => match term {
                Term::Atom(a) => visitor.atom(a),
                Term::Pid(p) => {
                    visitor.atom(p.node);
                    visitor.pid(p)
                }
                Term::Port(p) => {
                    visitor.atom(p.node);
                    visitor.port(p)
                }
                Term::Ref(r) => {
                    visitor.atom(r.node);
                    visitor.reference(r)
                }
                _ => {}
            },
            Head::Compound(term, n) => {
                if let Term::Fun(kind) = term {
                    visitor.fun(kind);
                }
                if n > 0 {
                    if open.len() >= max_depth {
                        return Err(EtfError::TooDeep(max_depth));
                    }
                    open.push(n);
                    depth = depth.max(open.len());
                    continue;
                }
            }
        }
        // One term finished: count it against the levels it closes.
        loop {
            match open.last_mut() {
                None => {
                    return Ok(Extent {
                        len: input.pos,
                        depth,
                    })
                }
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    open.pop();
                }
            }
        }
    }
}

/// The open levels of a walk: on the stack for ordinary terms, on the heap only for
/// deep ones, so walking a small term allocates nothing.
#[derive(Default)]
struct Levels {
    inline: [u32; 32],
    used: usize,
    spill: Vec<u32>,
}

impl Levels {
    fn len(&self) -> usize {
        self.used + self.spill.len()
    }
    fn push(&mut self, n: u32) {
        if self.used < self.inline.len() {
            self.inline[self.used] = n;
            self.used += 1;
        } else {
            self.spill.push(n);
        }
    }
    fn last_mut(&mut self) -> Option<&mut u32> {
        if !self.spill.is_empty() {
            return self.spill.last_mut();
        }
        match self.used {
            0 => None,
            n => self.inline.get_mut(n - 1),
        }
    }
    fn pop(&mut self) {
        if self.spill.pop().is_none() && self.used > 0 {
            self.used -= 1;
        }
    }
}

/// Deepest nesting [`skip`] follows; deeper terms are refused.
pub const SKIP_MAX_DEPTH: usize = 4096;

/// The byte length of the term at the start of `bytes`.
pub fn skip(bytes: &[u8]) -> Result<usize, EtfError> {
    Ok(walk(bytes, SKIP_MAX_DEPTH, &mut Nothing)?.len)
}

/// A borrowed view of one term. Compound terms read their elements on demand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term<'a> {
    Int(i64),
    Big {
        negative: bool,
        digits: &'a [u8],
    },
    Float,
    Atom(Atom<'a>),
    Pid(Pid<'a>),
    Port(Port<'a>),
    Ref(Reference<'a>),
    Nil,
    /// `STRING_EXT`: a list of bytes.
    String(&'a [u8]),
    Binary(&'a [u8]),
    BitBinary,
    Tuple(Seq<'a>),
    /// A list's elements; the tail follows them (see [`Seq::tail`]).
    List(Seq<'a>),
    /// A map's keys and values, alternating (its `len` counts both).
    Map(Seq<'a>),
    Fun(FunKind),
}

impl<'a> Term<'a> {
    /// Reads the term at the start of `bytes`, returning it and its byte length.
    pub fn parse(bytes: &'a [u8]) -> Result<(Term<'a>, usize), EtfError> {
        let mut input = Input { bytes, pos: 0 };
        match head(&mut input)? {
            Head::Leaf(t) => Ok((t, input.pos)),
            Head::Compound(t, n) => {
                // The header is read; the sub-terms follow one after another.
                let mut end = input.pos;
                for _ in 0..n {
                    let rest = bytes.get(end..).ok_or(EtfError::Truncated)?;
                    end += walk(rest, SKIP_MAX_DEPTH - 1, &mut Nothing)?.len;
                }
                Ok((t, end))
            }
        }
    }

    /// Reads the head of the term at the start of `bytes`, without finding its end.
    pub fn peek(bytes: &'a [u8]) -> Result<Term<'a>, EtfError> {
        let mut input = Input { bytes, pos: 0 };
        Ok(match head(&mut input)? {
            Head::Leaf(t) | Head::Compound(t, _) => t,
        })
    }

    pub fn as_atom(&self) -> Option<Atom<'a>> {
        match self {
            Term::Atom(a) => Some(*a),
            _ => None,
        }
    }

    pub fn as_pid(&self) -> Option<Pid<'a>> {
        match self {
            Term::Pid(p) => Some(*p),
            _ => None,
        }
    }

    pub fn as_ref(&self) -> Option<Reference<'a>> {
        match self {
            Term::Ref(r) => Some(*r),
            _ => None,
        }
    }

    pub fn as_tuple(&self) -> Option<Seq<'a>> {
        match self {
            Term::Tuple(s) => Some(*s),
            _ => None,
        }
    }

    /// True if this is the atom `name`.
    pub fn is_atom(&self, name: &str) -> bool {
        self.as_atom().is_some_and(|a| a.is(name))
    }

    /// The elements of a proper list (`[]`, a string or a list with a `[]` tail).
    pub fn list_len(&self) -> Option<u32> {
        match self {
            Term::Nil => Some(0),
            Term::String(s) => u32::try_from(s.len()).ok(),
            Term::List(seq) => match seq.tail() {
                Ok(Term::Nil) => Some(seq.len()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The elements of a tuple, list or map, read on demand from the bytes after its header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Seq<'a> {
    len: u32,
    body: &'a [u8],
}

impl<'a> Seq<'a> {
    fn new(len: u32, input: &Input<'a>) -> Self {
        Seq {
            len,
            body: &input.bytes[input.pos..],
        }
    }

    /// Number of elements (keys plus values, for a map).
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements in order.
    pub fn iter(&self) -> SeqIter<'a> {
        SeqIter {
            rest: self.body,
            left: self.len,
        }
    }

    /// The `i`th element (0-based).
    pub fn get(&self, i: u32) -> Result<Term<'a>, EtfError> {
        if i >= self.len {
            return Err(EtfError::Malformed("element index"));
        }
        self.iter()
            .nth(i as usize)
            .unwrap_or(Err(EtfError::Truncated))
    }

    /// The bytes of the `i`th element.
    pub fn raw(&self, i: u32) -> Result<&'a [u8], EtfError> {
        let mut rest = self.body;
        for _ in 0..i {
            let n = skip(rest)?;
            rest = &rest[n..];
        }
        let n = skip(rest)?;
        Ok(&rest[..n])
    }

    /// The tail of a list (the term after its elements).
    pub fn tail(&self) -> Result<Term<'a>, EtfError> {
        let mut rest = self.body;
        for _ in 0..self.len {
            let n = skip(rest)?;
            rest = &rest[n..];
        }
        Term::peek(rest)
    }
}

pub struct SeqIter<'a> {
    rest: &'a [u8],
    left: u32,
}

impl<'a> Iterator for SeqIter<'a> {
    type Item = Result<Term<'a>, EtfError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let item = Term::parse(self.rest).map(|(term, len)| {
            self.rest = &self.rest[len..];
            term
        });
        if item.is_err() {
            self.left = 0;
        }
        Some(item)
    }
}

/// Encoding of the few terms the carrier writes itself (answers to refused requests).
pub mod encode {
    use super::tag;

    pub fn small_tuple(out: &mut Vec<u8>, arity: u8) {
        out.extend_from_slice(&[tag::SMALL_TUPLE, arity]);
    }

    pub fn small_int(out: &mut Vec<u8>, n: u8) {
        out.extend_from_slice(&[tag::SMALL_INTEGER, n]);
    }

    /// An atom of at most 255 bytes of UTF-8 (all the carrier writes are ASCII).
    pub fn atom(out: &mut Vec<u8>, name: &str) {
        let len = u8::try_from(name.len()).unwrap_or(u8::MAX);
        out.extend_from_slice(&[tag::SMALL_ATOM_UTF8, len]);
        out.extend_from_slice(&name.as_bytes()[..usize::from(len)]);
    }

    // Whole terms, for the packets the carrier builds to probe its own policy
    // (assertions, `policy explain`) and for tests.

    pub fn atom_term(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        atom(&mut out, name);
        out
    }

    pub fn pid(node: &str, id: u32, serial: u32, creation: u32) -> Vec<u8> {
        let mut out = vec![tag::NEW_PID];
        atom(&mut out, node);
        for n in [id, serial, creation] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        out
    }

    /// A reference of 1 to 5 words (more are cut to 5).
    pub fn reference(node: &str, creation: u32, words: &[u32]) -> Vec<u8> {
        let words = &words[..words.len().min(super::MAX_REF_WORDS)];
        let mut out = vec![tag::NEWER_REFERENCE, 0, words.len() as u8];
        atom(&mut out, node);
        out.extend_from_slice(&creation.to_be_bytes());
        for w in words {
            out.extend_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// A tuple of at most 255 encoded elements.
    pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        small_tuple(&mut out, items.len().min(255) as u8);
        for item in items.iter().take(255) {
            out.extend_from_slice(item);
        }
        out
    }

    /// A proper list of encoded elements.
    pub fn list(items: &[Vec<u8>]) -> Vec<u8> {
        if items.is_empty() {
            return vec![tag::NIL];
        }
        let mut out = vec![tag::LIST];
        out.extend_from_slice(&(items.len() as u32).to_be_bytes());
        for item in items {
            out.extend_from_slice(item);
        }
        out.push(tag::NIL);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        atoms: Vec<String>,
        pids: Vec<(String, u32, u32, u32)>,
        refs: usize,
        funs: Vec<FunKind>,
    }
    impl<'a> Visitor<'a> for Collect {
        fn atom(&mut self, a: Atom<'a>) {
            self.atoms.push(a.to_utf8());
        }
        fn pid(&mut self, p: Pid<'a>) {
            self.pids
                .push((p.node.to_utf8(), p.id, p.serial, p.creation));
        }
        fn reference(&mut self, _r: Reference<'a>) {
            self.refs += 1;
        }
        fn fun(&mut self, k: FunKind) {
            self.funs.push(k);
        }
    }

    #[test]
    fn walks_a_tuple_with_atoms_pids_and_a_binary() {
        // {hello, <pid>, <<1,2,3>>, [1, 2 | x]}
        let mut t = vec![tag::SMALL_TUPLE, 4];
        encode::atom(&mut t, "hello");
        t.extend(encode::pid("a@h", 7, 0, 3));
        t.extend_from_slice(&[tag::BINARY, 0, 0, 0, 3, 1, 2, 3]);
        t.extend_from_slice(&[tag::LIST, 0, 0, 0, 2, tag::SMALL_INTEGER, 1]);
        t.extend_from_slice(&[tag::SMALL_INTEGER, 2]);
        encode::atom(&mut t, "x");
        t.push(0xff); // trailing byte: not part of the term
        let mut c = Collect::default();
        let ext = walk(&t, 10, &mut c).expect("walks");
        assert_eq!(ext.len, t.len() - 1);
        assert_eq!(ext.depth, 2);
        assert_eq!(
            c.atoms,
            vec!["hello", "a@h", "x"],
            "node atoms are atoms too"
        );
        assert_eq!(c.pids, vec![("a@h".into(), 7, 0, 3)]);

        let (term, len) = Term::parse(&t).expect("parses");
        assert_eq!(len, t.len() - 1);
        let seq = term.as_tuple().expect("tuple");
        assert_eq!(seq.len(), 4);
        assert!(seq.get(0).expect("first").is_atom("hello"));
        assert_eq!(seq.get(1).expect("pid").as_pid().map(|p| p.id), Some(7));
        assert_eq!(seq.get(3).expect("list").list_len(), None, "improper list");
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(skip(&[tag::ATOM_CACHE_REF, 0]), Err(EtfError::AtomCacheRef));
        assert_eq!(
            skip(&[tag::COMPRESSED, 0, 0, 0, 1]),
            Err(EtfError::UnknownTag(80))
        );
        assert_eq!(skip(&[tag::LOCAL]), Err(EtfError::UnknownTag(121)));
        assert_eq!(skip(&[200]), Err(EtfError::UnknownTag(200)));
        assert_eq!(skip(&[]), Err(EtfError::Truncated));
        // A list announcing four billion elements in a few bytes.
        assert_eq!(
            skip(&[tag::LIST, 0xff, 0xff, 0xff, 0xff, tag::NIL]),
            Err(EtfError::Truncated)
        );
        // A binary announcing more bytes than there are.
        assert_eq!(
            skip(&[tag::BINARY, 0, 0, 1, 0, 1]),
            Err(EtfError::Truncated)
        );
        // Invalid UTF-8 in an atom.
        assert!(matches!(
            skip(&[tag::SMALL_ATOM_UTF8, 1, 0xff]),
            Err(EtfError::BadAtom(_))
        ));
    }

    #[test]
    fn floats_the_vm_would_refuse_are_refused_here() {
        // Found by the red team (test/redteam_test.exs, etf_float_nan): a NaN in a
        // payload went through to the VM, whose decoder then dropped the connection.
        let new_float = |x: f64| {
            let mut t = vec![tag::NEW_FLOAT];
            t.extend_from_slice(&x.to_be_bytes());
            t
        };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                skip(&new_float(bad)),
                Err(EtfError::Malformed("float (not finite)"))
            );
        }
        let mut nan = vec![tag::NEW_FLOAT];
        nan.extend_from_slice(&0x7FF8_0000_0000_0001u64.to_be_bytes());
        assert!(skip(&nan).is_err());
        for good in [0.0, -0.0, 1.5e300, f64::MIN_POSITIVE / 2.0] {
            assert_eq!(skip(&new_float(good)), Ok(9));
        }
        let float_text = |text: &str| {
            let mut t = vec![tag::FLOAT];
            let mut body = text.as_bytes().to_vec();
            body.resize(31, 0);
            t.extend(body);
            t
        };
        assert_eq!(skip(&float_text("1.50000000000000000000e+00")), Ok(32));
        for bad in ["inf", "nan", "1e999", "", "x"] {
            assert_eq!(
                skip(&float_text(bad)),
                Err(EtfError::Malformed("float (text form)")),
                "{bad}"
            );
        }
    }

    #[test]
    fn depth_is_bounded_without_recursion() {
        let mut t = Vec::new();
        for _ in 0..100_000 {
            t.extend_from_slice(&[tag::SMALL_TUPLE, 1]);
        }
        t.push(tag::NIL);
        assert_eq!(walk(&t, 1000, &mut Nothing), Err(EtfError::TooDeep(1000)));
        let ext = walk(&t, 200_000, &mut Nothing).expect("deep but allowed");
        assert_eq!(ext.depth, 100_000);
    }

    #[test]
    fn funs_are_reported() {
        // fun lists:map/2
        let mut t = vec![tag::EXPORT];
        encode::atom(&mut t, "lists");
        encode::atom(&mut t, "map");
        encode::small_int(&mut t, 2);
        let mut c = Collect::default();
        walk(&t, 10, &mut c).expect("walks");
        assert_eq!(c.funs, vec![FunKind::Export]);
    }

    #[test]
    fn latin1_and_utf8_atoms_compare_by_text() {
        let latin = Atom {
            text: &[0xe9],
            encoding: AtomEncoding::Latin1,
        };
        let utf = Atom {
            text: "é".as_bytes(),
            encoding: AtomEncoding::Utf8,
        };
        assert!(latin.is("é") && utf.is("é"));
        assert_eq!(utf.to_latin1(), Some(vec![0xe9]));
        let wide = Atom {
            text: "日".as_bytes(),
            encoding: AtomEncoding::Utf8,
        };
        assert_eq!(wide.to_latin1(), None);
    }
}
