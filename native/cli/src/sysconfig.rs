//! A strict reader for the part of Erlang's term syntax that `sys.config` files use:
//! lists, tuples, atoms (plain and quoted), strings, binaries, integers, floats, maps,
//! character literals and `%` comments, as one term ending with `.`.
//!
//! It never panics and never recurses deeper than [`MAX_DEPTH`], whatever the input:
//! operators run it on files they did not write.

use std::fmt;

/// Largest file read.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of lists, tuples, maps and binaries.
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    Atom(String),
    Int(i128),
    /// Kept as written; configuration of other applications may hold floats.
    Float(String),
    /// A `"..."` literal: a character list in Erlang.
    Str(String),
    Bin(Vec<u8>),
    List(Vec<Term>),
    /// `[A, B | Tail]`.
    Improper(Vec<Term>, Box<Term>),
    Tuple(Vec<Term>),
    Map(Vec<(Term, Term)>),
}

impl Term {
    pub fn atom(&self) -> Option<&str> {
        match self {
            Term::Atom(a) => Some(a),
            _ => None,
        }
    }

    /// The elements of a proper list (`""` is the empty list too).
    pub fn list(&self) -> Option<Vec<Term>> {
        match self {
            Term::List(items) => Some(items.clone()),
            Term::Str(s) => Some(s.chars().map(|c| Term::Int(c as i128)).collect()),
            _ => None,
        }
    }

    /// Text as `trust_dist_config` accepts it for a path: a non-empty string or character
    /// list, or a UTF-8 binary.
    pub fn text(&self) -> Option<String> {
        match self {
            Term::Str(s) if !s.is_empty() => Some(s.clone()),
            Term::Bin(b) => String::from_utf8(b.clone()).ok(),
            Term::List(items) if !items.is_empty() => items
                .iter()
                .map(|t| match t {
                    Term::Int(i) => u32::try_from(*i).ok().and_then(char::from_u32),
                    _ => None,
                })
                .collect(),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i128> {
        match self {
            Term::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn boolean(&self) -> Option<bool> {
        match self.atom() {
            Some("true") => Some(true),
            Some("false") => Some(false),
            _ => None,
        }
    }
}

/// Erlang-like rendering, for messages.
impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn seq(f: &mut fmt::Formatter<'_>, items: &[Term]) -> fmt::Result {
            for (i, t) in items.iter().enumerate() {
                if i > 0 {
                    write!(f, ",")?;
                }
                write!(f, "{t}")?;
            }
            Ok(())
        }
        match self {
            Term::Atom(a) if is_plain_atom(a) => write!(f, "{a}"),
            Term::Atom(a) => write!(f, "'{}'", a.replace('\\', "\\\\").replace('\'', "\\'")),
            Term::Int(i) => write!(f, "{i}"),
            Term::Float(s) => write!(f, "{s}"),
            Term::Str(s) => write!(f, "{s:?}"),
            Term::Bin(b) => match std::str::from_utf8(b) {
                Ok(s) => write!(f, "<<{s:?}>>"),
                Err(_) => write!(f, "<<{} bytes>>", b.len()),
            },
            Term::List(items) => {
                write!(f, "[")?;
                seq(f, items)?;
                write!(f, "]")
            }
            Term::Improper(items, tail) => {
                write!(f, "[")?;
                seq(f, items)?;
                write!(f, "|{tail}]")
            }
            Term::Tuple(items) => {
                write!(f, "{{")?;
                seq(f, items)?;
                write!(f, "}}")
            }
            Term::Map(pairs) => {
                write!(f, "#{{")?;
                for (i, (k, v)) in pairs.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{k} => {v}")?;
                }
                write!(f, "}}")
            }
        }
    }
}

fn is_plain_atom(a: &str) -> bool {
    let mut chars = a.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '@')
        && !RESERVED.contains(&a)
}

const RESERVED: &[&str] = &[
    "after", "and", "andalso", "band", "begin", "bnot", "bor", "bsl", "bsr", "bxor", "case",
    "catch", "cond", "div", "end", "fun", "if", "let", "not", "of", "or", "orelse", "receive",
    "rem", "try", "when", "xor", "maybe", "else",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub why: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// Parses a whole file: exactly one term followed by `.`, comments and whitespace.
pub fn parse(text: &str) -> Result<Term, ParseError> {
    if text.len() > MAX_BYTES {
        return Err(ParseError {
            line: 0,
            why: format!("the file is larger than {MAX_BYTES} bytes"),
        });
    }
    let mut p = Parser {
        chars: text.chars().collect(),
        pos: 0,
        line: 1,
        depth: 0,
    };
    p.skip_blank();
    if p.peek().is_none() {
        return Err(p.error("the file is empty; expected a term such as [{trust_dist, [...]}]."));
    }
    let term = p.term()?;
    p.skip_blank();
    match p.peek() {
        Some('.') => p.pos += 1,
        Some(c) => return Err(p.error(format!("expected ',' or '.' but found {c:?}"))),
        None => return Err(p.error("the term does not end with '.'")),
    }
    p.skip_blank();
    if let Some(c) = p.peek() {
        return Err(p.error(format!(
            "unexpected {c:?} after the final '.'; a sys.config holds one term"
        )));
    }
    Ok(term)
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    line: usize,
    depth: usize,
}

impl Parser {
    fn error(&self, why: impl Into<String>) -> ParseError {
        ParseError {
            line: self.line,
            why: why.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_blank(&mut self) {
        while let Some(c) = self.peek() {
            if c == '%' {
                while let Some(c) = self.peek() {
                    if c == '\n' {
                        break;
                    }
                    self.pos += 1;
                }
            } else if c.is_whitespace() {
                self.next();
            } else {
                break;
            }
        }
    }

    fn expect(&mut self, want: char) -> Result<(), ParseError> {
        self.skip_blank();
        match self.peek() {
            Some(c) if c == want => {
                self.pos += 1;
                Ok(())
            }
            Some(c) => Err(self.error(format!("expected {want:?} but found {c:?}"))),
            None => Err(self.error(format!("expected {want:?} but the file ended"))),
        }
    }

    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, ParseError>,
    ) -> Result<T, ParseError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error(format!("terms nest deeper than {MAX_DEPTH} levels")));
        }
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn term(&mut self) -> Result<Term, ParseError> {
        self.skip_blank();
        let Some(c) = self.peek() else {
            return Err(self.error("expected a term but the file ended"));
        };
        match c {
            '[' => self.nested(Self::list),
            '{' => self.nested(Self::tuple),
            '#' => self.nested(Self::map),
            '<' => self.nested(Self::binary),
            '"' => Ok(Term::Str(self.strings()?)),
            '\'' => {
                self.pos += 1;
                Ok(Term::Atom(self.quoted('\'')?))
            }
            '$' => {
                self.pos += 1;
                Ok(Term::Int(self.char_literal()? as i128))
            }
            '-' | '+' => {
                self.pos += 1;
                self.skip_blank();
                match self.peek() {
                    Some(d) if d.is_ascii_digit() => match self.number()? {
                        Term::Int(i) if c == '-' => Ok(Term::Int(-i)),
                        Term::Float(f) if c == '-' => Ok(Term::Float(format!("-{f}"))),
                        other => Ok(other),
                    },
                    _ => Err(self.error(format!("expected a number after {c:?}"))),
                }
            }
            '0'..='9' => self.number(),
            c if c.is_lowercase() => {
                let start = self.pos;
                while let Some(c) = self.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '@' {
                        self.pos += 1;
                    } else {
                        break;
                    }
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                if RESERVED.contains(&word.as_str()) {
                    return Err(self.error(format!(
                        "{word} is a reserved word; quote it to use it as an atom: '{word}'"
                    )));
                }
                Ok(Term::Atom(word))
            }
            c if c.is_uppercase() || c == '_' => Err(self.error(
                "variables are not allowed in a configuration file (an atom starts with a \
                 lowercase letter, or quote it: 'Name')",
            )),
            c => Err(self.error(format!("unexpected {c:?}; expected a term"))),
        }
    }

    /// Comma-separated terms up to `close` (already past the opening bracket).
    fn sequence(&mut self, close: char) -> Result<Vec<Term>, ParseError> {
        let mut items = Vec::new();
        self.skip_blank();
        if self.peek() == Some(close) {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(self.term()?);
            self.skip_blank();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(c) if c == close => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(c) => {
                    return Err(self.error(format!("expected ',' or {close:?} but found {c:?}")))
                }
                None => return Err(self.error(format!("expected {close:?} but the file ended"))),
            }
        }
    }

    fn list(&mut self) -> Result<Term, ParseError> {
        self.pos += 1; // '['
        let mut items = Vec::new();
        self.skip_blank();
        if self.peek() == Some(']') {
            self.pos += 1;
            return Ok(Term::List(items));
        }
        loop {
            items.push(self.term()?);
            self.skip_blank();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {
                    self.pos += 1;
                    return Ok(Term::List(items));
                }
                Some('|') if self.peek_at(1) != Some('|') => {
                    self.pos += 1;
                    let tail = self.term()?;
                    self.expect(']')?;
                    return Ok(match tail {
                        Term::List(rest) => {
                            items.extend(rest);
                            Term::List(items)
                        }
                        Term::Str(s) if s.is_empty() => Term::List(items),
                        other => Term::Improper(items, Box::new(other)),
                    });
                }
                Some(c) => return Err(self.error(format!("expected ',' or ']' but found {c:?}"))),
                None => return Err(self.error("expected ']' but the file ended")),
            }
        }
    }

    fn tuple(&mut self) -> Result<Term, ParseError> {
        self.pos += 1; // '{'
        Ok(Term::Tuple(self.sequence('}')?))
    }

    fn map(&mut self) -> Result<Term, ParseError> {
        self.pos += 1; // '#'
        if self.peek() != Some('{') {
            return Err(self.error("expected '{' after '#' (a map is #{Key => Value})"));
        }
        self.pos += 1;
        let mut pairs = Vec::new();
        self.skip_blank();
        if self.peek() == Some('}') {
            self.pos += 1;
            return Ok(Term::Map(pairs));
        }
        loop {
            let key = self.term()?;
            self.skip_blank();
            if self.peek() == Some('=') && self.peek_at(1) == Some('>') {
                self.pos += 2;
            } else {
                return Err(self.error("expected '=>' after a map key"));
            }
            let value = self.term()?;
            pairs.push((key, value));
            self.skip_blank();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    return Ok(Term::Map(pairs));
                }
                Some(c) => return Err(self.error(format!("expected ',' or '}}' but found {c:?}"))),
                None => return Err(self.error("expected '}' but the file ended")),
            }
        }
    }

    fn binary(&mut self) -> Result<Term, ParseError> {
        if self.peek_at(1) != Some('<') {
            return Err(self.error("unexpected '<'; a binary is <<\"...\">>"));
        }
        self.pos += 2;
        let mut bytes = Vec::new();
        self.skip_blank();
        if self.peek() == Some('>') && self.peek_at(1) == Some('>') {
            self.pos += 2;
            return Ok(Term::Bin(bytes));
        }
        loop {
            self.skip_blank();
            match self.peek() {
                Some('"') => {
                    let s = self.strings()?;
                    self.skip_blank();
                    if self.peek() == Some('/') {
                        self.pos += 1;
                        let start = self.pos;
                        while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
                            self.pos += 1;
                        }
                        let ty: String = self.chars[start..self.pos].iter().collect();
                        if ty != "utf8" {
                            return Err(self.error(format!(
                                "binary segment type /{ty} is not supported here (only /utf8)"
                            )));
                        }
                        bytes.extend_from_slice(s.as_bytes());
                    } else {
                        for c in s.chars() {
                            let b = u8::try_from(c as u32).map_err(|_| {
                                self.error(format!(
                                    "{c:?} does not fit a byte; write <<\"...\"/utf8>>"
                                ))
                            })?;
                            bytes.push(b);
                        }
                    }
                }
                Some(c) if c.is_ascii_digit() => match self.number()? {
                    Term::Int(i) if (0..=255).contains(&i) => bytes.push(i as u8),
                    _ => return Err(self.error("a binary segment must be a byte (0..255)")),
                },
                _ => {
                    return Err(
                        self.error("a binary holds strings and bytes here: <<\"text\">>, <<1,2>>")
                    )
                }
            }
            self.skip_blank();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('>') if self.peek_at(1) == Some('>') => {
                    self.pos += 2;
                    return Ok(Term::Bin(bytes));
                }
                _ => return Err(self.error("expected ',' or '>>' in a binary")),
            }
        }
    }

    /// One or more adjacent string literals, concatenated as Erlang does.
    fn strings(&mut self) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            self.pos += 1; // '"'
            out.push_str(&self.quoted('"')?);
            self.skip_blank();
            if self.peek() != Some('"') {
                return Ok(out);
            }
        }
    }

    /// The body of a quoted atom or string, up to and past `close`.
    fn quoted(&mut self, close: char) -> Result<String, ParseError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(self.error(format!("unterminated {close}...{close}")));
                }
                Some(c) if c == close => return Ok(out),
                Some('\\') => out.push(self.escape()?),
                Some(c) => out.push(c),
            }
            if out.len() > MAX_BYTES {
                return Err(self.error("literal too long"));
            }
        }
    }

    /// After a backslash.
    fn escape(&mut self) -> Result<char, ParseError> {
        let Some(c) = self.next() else {
            return Err(self.error("the file ends inside an escape sequence"));
        };
        Ok(match c {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            's' => ' ',
            'e' => '\x1b',
            'd' => '\x7f',
            'b' => '\x08',
            'f' => '\x0c',
            'v' => '\x0b',
            '0'..='7' => {
                let mut value = c as u32 - '0' as u32;
                for _ in 0..2 {
                    match self.peek() {
                        Some(d @ '0'..='7') => {
                            self.pos += 1;
                            value = value * 8 + (d as u32 - '0' as u32);
                        }
                        _ => break,
                    }
                }
                char::from_u32(value).ok_or_else(|| self.error("bad octal escape"))?
            }
            'x' => {
                let mut digits = String::new();
                if self.peek() == Some('{') {
                    self.pos += 1;
                    while let Some(d) = self.peek() {
                        self.pos += 1;
                        if d == '}' {
                            break;
                        }
                        digits.push(d);
                        if digits.len() > 8 {
                            break;
                        }
                    }
                } else {
                    for _ in 0..2 {
                        if let Some(d) = self.peek().filter(|d| d.is_ascii_hexdigit()) {
                            self.pos += 1;
                            digits.push(d);
                        }
                    }
                }
                u32::from_str_radix(&digits, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| self.error(format!("bad \\x escape {digits:?}")))?
            }
            '^' => {
                let Some(c) = self.next() else {
                    return Err(self.error("the file ends inside an escape sequence"));
                };
                char::from_u32(c as u32 & 31).unwrap_or('\0')
            }
            other => other,
        })
    }

    fn char_literal(&mut self) -> Result<char, ParseError> {
        match self.next() {
            None => Err(self.error("the file ends after '$'")),
            Some('\\') => self.escape(),
            Some(c) => Ok(c),
        }
    }

    /// Integers (`42`, `1_000`, `16#ff`) and floats (`0.5`, `1.0e3`).
    fn number(&mut self) -> Result<Term, ParseError> {
        let digits = |p: &mut Parser, radix: u32| -> Result<i128, ParseError> {
            let mut value: i128 = 0;
            let mut any = false;
            let mut last_underscore = false;
            while let Some(c) = p.peek() {
                if c == '_' && any && !last_underscore {
                    last_underscore = true;
                    p.pos += 1;
                    continue;
                }
                let Some(d) = c.to_digit(radix) else { break };
                p.pos += 1;
                any = true;
                last_underscore = false;
                value = value
                    .checked_mul(radix as i128)
                    .and_then(|v| v.checked_add(d as i128))
                    .ok_or_else(|| p.error("integer too large"))?;
            }
            if !any || last_underscore {
                return Err(p.error("malformed number"));
            }
            Ok(value)
        };
        let start = self.pos;
        let value = digits(self, 10)?;
        if self.peek() == Some('#') {
            self.pos += 1;
            let radix = u32::try_from(value)
                .ok()
                .filter(|r| (2..=36).contains(r))
                .ok_or_else(|| self.error("a number base must be 2..36"))?;
            return Ok(Term::Int(digits(self, radix)?));
        }
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            digits(self, 10)?;
            if matches!(self.peek(), Some('e' | 'E')) {
                self.pos += 1;
                if matches!(self.peek(), Some('-' | '+')) {
                    self.pos += 1;
                }
                digits(self, 10)?;
            }
            return Ok(Term::Float(self.chars[start..self.pos].iter().collect()));
        }
        Ok(Term::Int(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn atom(a: &str) -> Term {
        Term::Atom(a.into())
    }

    #[test]
    fn reads_what_dev_cluster_writes() {
        let text = "%% Written by `trust-dist dev-cluster`\n\
            [{trust_dist, [\n  {identity, \"/k/a.key\"},\n  {tiers, [admin, 'worker']},\n  \
            {listen, #{port => 0, ip => <<\"127.0.0.1\">>}}, % trailing comment\n  \
            {policy, #{worker => #{rpc => [{m, f, 1}], max_message_size => 16#100_000}}}\n\
            ]}].\n";
        let term = parse(text).expect("parses");
        let Term::List(apps) = term else {
            panic!("list")
        };
        let Term::Tuple(app) = &apps[0] else {
            panic!("tuple")
        };
        assert_eq!(app[0], atom("trust_dist"));
        let env = app[1].list().expect("env");
        assert_eq!(
            env[0],
            Term::Tuple(vec![atom("identity"), Term::Str("/k/a.key".into())])
        );
        assert_eq!(
            env[1],
            Term::Tuple(vec![
                atom("tiers"),
                Term::List(vec![atom("admin"), atom("worker")])
            ])
        );
        let Term::Tuple(listen) = &env[2] else {
            panic!()
        };
        assert_eq!(
            listen[1],
            Term::Map(vec![
                (atom("port"), Term::Int(0)),
                (atom("ip"), Term::Bin(b"127.0.0.1".to_vec()))
            ])
        );
        assert!(format!("{}", env[3]).contains("1048576"));
    }

    #[test]
    fn literals() {
        let one = |s: &str| parse(&format!("{s}.")).expect(s);
        assert_eq!(one("-42"), Term::Int(-42));
        assert_eq!(one("1_000"), Term::Int(1000));
        assert_eq!(one("2#101"), Term::Int(5));
        assert_eq!(one("$a"), Term::Int(97));
        assert_eq!(one("$\\n"), Term::Int(10));
        assert_eq!(one("0.5"), Term::Float("0.5".into()));
        assert_eq!(one("\"a\" \"b\""), Term::Str("ab".into()));
        assert_eq!(one("\"\\x{263a}\\101\\\"\""), Term::Str("☺A\"".into()));
        assert_eq!(one("'hello world'"), atom("hello world"));
        assert_eq!(one("'a\\'b'"), atom("a'b"));
        assert_eq!(one("node@host"), atom("node@host"));
        assert_eq!(one("<<>>"), Term::Bin(vec![]));
        assert_eq!(one("<<1, \"ab\">>"), Term::Bin(vec![1, b'a', b'b']));
        assert_eq!(one("<<\"é\"/utf8>>"), Term::Bin("é".as_bytes().to_vec()));
        assert_eq!(one("[a|[b]]"), Term::List(vec![atom("a"), atom("b")]));
        assert_eq!(
            one("[a|b]"),
            Term::Improper(vec![atom("a")], Box::new(atom("b")))
        );
        assert_eq!(one("#{}"), Term::Map(vec![]));
        assert_eq!(one("{}"), Term::Tuple(vec![]));
        assert_eq!(one("\"\"").list(), Some(vec![]));
        assert_eq!(one("[104, 105]").text(), Some("hi".into()));
        assert_eq!(one("\"\"").text(), None);
    }

    #[test]
    fn mistakes_name_their_line() {
        for (text, line) in [
            ("", 1),
            ("[a]", 1),
            ("[a].\n[b].", 2),
            ("[a,\n b\n c].", 3),
            ("[{a, X}].", 1),
            ("\n\n\"abc", 3),
            ("#{a}.", 1),
            ("{a, 1.}.", 1),
            ("[1e5].", 1),
            ("<<256>>.", 1),
            ("<<\"x\"/binary>>.", 1),
            ("'abc.", 1),
            ("99999999999999999999999999999999999999999999.", 1),
            ("[a,].", 1),
            ("[end].", 1),
            ("{a b}.", 1),
            ("37#1.", 1),
            ("1_.", 1),
            ("fun() -> ok end.", 1),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.line, line, "{text}: {err}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        for open in ["[", "{", "#{a => ", "<<"] {
            let text = open.repeat(100_000);
            assert!(parse(&text).is_err());
        }
        let ok = format!("{}{}.", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(&ok).is_ok());
        let deep = format!(
            "{}{}.",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(parse(&deep).is_err());
    }

    /// Hostile input: random bytes, random mixes of the syntax's own characters, and every
    /// truncation and single-byte mutation of a real file. None may panic.
    #[test]
    fn hostile_input_never_panics() {
        let real = "[{trust_dist, [{identity, \"/k/a.key\"}, {tiers, [admin, 'w x']},\n\
                    {policy, #{w => #{rpc => [{m, f, 1}], n => -16#ff, s => <<\"a\", 1>>}}},\n\
                    {c, $\\x{41}}, {f, 1.5e-3}, {l, [a | b]}]} % end\n]. % done\n";
        let bytes = real.as_bytes();
        for cut in 0..=bytes.len() {
            let _ = parse(&String::from_utf8_lossy(&bytes[..cut]));
        }
        let alphabet = b"[]{}#<>\"'$\\%.,|=-+_/ \n0123456789abcxeEAZ@#^";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..bytes.len() {
            for _ in 0..8 {
                let mut m = bytes.to_vec();
                m[i] = alphabet[(rand() % alphabet.len() as u64) as usize];
                let _ = parse(&String::from_utf8_lossy(&m));
            }
        }
        for _ in 0..20_000 {
            let len = (rand() % 64) as usize;
            let s: Vec<u8> = (0..len)
                .map(|_| {
                    if rand() % 8 == 0 {
                        rand() as u8
                    } else {
                        alphabet[(rand() % alphabet.len() as u64) as usize]
                    }
                })
                .collect();
            let _ = parse(&String::from_utf8_lossy(&s));
        }
        let huge = "a".repeat(MAX_BYTES + 1);
        assert!(parse(&huge).is_err());
    }
}
