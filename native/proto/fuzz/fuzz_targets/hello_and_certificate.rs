//! The hello frame and certificate parsing: arbitrary bytes, and arbitrary changes to a
//! valid hello. Nothing but the untouched hello verifies.
//!
//! Input: `[mode, bytes...]`: mode 0 hello from bytes, 1 valid hello XOR bytes, 2
//! certificate from bytes, 3 certificate from PEM text, 4 valid certificate XOR bytes,
//! 5 the peer's TLS raw public key (SubjectPublicKeyInfo DER) from bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use trust_dist_proto::cert::{Certificate, CertificateBody};
use trust_dist_proto::handshake::{encode_hello, verify_hello};
use trust_dist_proto::identity::{KeyId, PublicKey, SecretKey};

const NOW: u64 = 1_800_000_000;

struct Fixture {
    authority: PublicKey,
    node: PublicKey,
    certificate: Vec<u8>,
    hello: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // Keys made when the fuzzer starts: the seeds and mutations never depend on
        // their bytes (modes 1 and 4 XOR whatever valid hello this run issued), and no
        // private key lives in the repository.
        let authority = SecretKey::generate();
        let node = SecretKey::generate();
        let body = CertificateBody {
            serial: 7,
            node: "worker-*@10.0.*".into(),
            public_key: node.public(),
            tier: "worker".into(),
            not_before: NOW - 10,
            not_after: NOW + 10,
            issuer: KeyId([0; 8]),
        };
        let cert = Certificate::issue(body, &authority).expect("issues");
        Fixture {
            authority: authority.public(),
            node: node.public(),
            certificate: cert.to_bytes(),
            hello: encode_hello(&cert),
        }
    })
}

fn xor(base: &[u8], noise: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    for (i, n) in noise.iter().enumerate() {
        if let Some(b) = out.get_mut(i) {
            *b ^= n;
        } else {
            out.push(*n);
        }
    }
    out
}

fn hello(frame: &[u8]) {
    let f = fixture();
    let r = verify_hello(frame, &[f.authority], &f.node, NOW);
    if r.is_ok() {
        assert_eq!(frame, &f.hello[..], "only the issued hello verifies");
    }
}

fn certificate(bytes: &[u8]) {
    let f = fixture();
    if let Ok(c) = Certificate::from_bytes(bytes) {
        // One encoding per certificate.
        assert_eq!(c.to_bytes(), bytes);
        let _ = c.to_pem();
        let _ = c.body().to_string();
        if c.verify(&[f.authority], NOW).is_ok() {
            assert_eq!(bytes, &f.certificate[..]);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    match mode % 6 {
        0 => hello(rest),
        1 => hello(&xor(&f.hello, rest)),
        2 => certificate(rest),
        3 => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(c) = Certificate::from_pem(&text) {
                let _ = c.verify(&[f.authority], NOW);
            }
        }
        4 => certificate(&xor(&f.certificate, rest)),
        _ => {
            // Exactly one DER form per key: whatever parses re-encodes to its input.
            if let Ok(key) = PublicKey::from_spki_der(rest) {
                assert_eq!(key.to_spki_der(), rest);
            }
        }
    }
});
