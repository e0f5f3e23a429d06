//! The term walker and the lazy term views on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trust_dist_proto::etf::{self, Atom, Pid, Port, Reference, Term, Visitor};

#[derive(Default)]
struct Count {
    atoms: usize,
    ids: usize,
}

impl<'a> Visitor<'a> for Count {
    fn atom(&mut self, a: Atom<'a>) {
        self.atoms += a.to_utf8().len();
        let _ = a.to_latin1();
    }
    fn pid(&mut self, p: Pid<'a>) {
        self.ids += p.raw.len();
        let _ = p.key();
    }
    fn port(&mut self, p: Port<'a>) {
        let _ = p.key();
    }
    fn reference(&mut self, r: Reference<'a>) {
        let _ = r.key();
    }
}

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
        for i in 0..seq.len().min(16) {
            if let Ok(t) = seq.get(i) {
                browse(&t, depth - 1);
            }
            let _ = seq.raw(i);
        }
        let _ = seq.tail();
        for t in seq.iter().take(16).flatten() {
            browse(&t, depth - 1);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let walked = etf::walk(data, 128, &mut Count::default());
    let skipped = etf::skip(data);
    // The two agree on every term shallow enough for both, and never overrun.
    if let Ok(e) = walked {
        assert!(e.len <= data.len());
        assert!(e.depth <= 128);
        assert_eq!(skipped, Ok(e.len));
        let (_, len) = Term::parse(data).expect("a walkable term parses");
        assert_eq!(len, e.len);
    }
    if let Ok((term, len)) = Term::parse(data) {
        assert!(len <= data.len());
        browse(&term, 4);
    }
    if let Ok(term) = Term::peek(data) {
        browse(&term, 2);
    }
});
