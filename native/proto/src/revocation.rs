//! The revocation list: certificates and keys this node no longer accepts, even when
//! their signature and validity window are fine.
//!
//! A text file, one entry per line; `#` starts a comment:
//!
//! ```text
//! # ec2_node was rebuilt on 2026-11-20
//! key SHA256:3rYPJrLC2Ky0N5I2            # every certificate for this key
//! serial 0706a2a3bed0f527 544736730621768469   # one certificate: issuer key id, serial
//! ```
//!
//! A key entry names the fingerprint `trust-dist cert show` prints; a serial entry names
//! the certificate's issuer (authority key id) and serial, both as `cert show` prints them.

use crate::cert::CertificateBody;
use crate::identity::KeyId;
use std::collections::HashSet;

/// Largest revocation file read; a larger one is refused as a configuration error.
pub const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    keys: HashSet<String>,
    serials: HashSet<(KeyId, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("line {line}: {why}")]
pub struct ParseError {
    pub line: usize,
    pub why: String,
}

impl Revocations {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        if text.len() > MAX_LIST_BYTES {
            return Err(ParseError {
                line: 0,
                why: format!("the list is larger than {MAX_LIST_BYTES} bytes"),
            });
        }
        let mut list = Revocations::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| ParseError { line: i + 1, why };
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["key", fingerprint] if fingerprint.starts_with("SHA256:") && fingerprint.len() > 7 => {
                    list.keys.insert((*fingerprint).to_owned());
                }
                ["key", other] => {
                    return Err(bad(format!(
                        "{other:?} is not a key fingerprint (SHA256:..., as `trust-dist cert show` prints it)"
                    )))
                }
                ["serial", issuer, serial] => {
                    let issuer = parse_key_id(issuer).ok_or_else(|| {
                        bad(format!("{issuer:?} is not an issuer key id (16 hex digits)"))
                    })?;
                    let serial = serial
                        .parse::<u64>()
                        .map_err(|_| bad(format!("{serial:?} is not a serial number")))?;
                    list.serials.insert((issuer, serial));
                }
                _ => {
                    return Err(bad(
                        "expected `key SHA256:...` or `serial ISSUER SERIAL`".to_owned(),
                    ))
                }
            }
        }
        Ok(list)
    }

    /// Why `certificate` (whose key has `fingerprint`) is revoked, if it is.
    pub fn check(&self, certificate: &CertificateBody, fingerprint: &str) -> Option<String> {
        if self.keys.contains(fingerprint) {
            return Some(format!("key {fingerprint} is revoked"));
        }
        if self
            .serials
            .contains(&(certificate.issuer, certificate.serial))
        {
            return Some(format!(
                "certificate serial {} of issuer {} is revoked",
                certificate.serial, certificate.issuer
            ));
        }
        None
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.serials.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn parse_key_id(text: &str) -> Option<KeyId> {
    if text.len() != 16 {
        return None;
    }
    let mut id = [0u8; 8];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(KeyId(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SecretKey;

    fn body(serial: u64, issuer: [u8; 8]) -> CertificateBody {
        CertificateBody {
            serial,
            node: "b@h".into(),
            public_key: SecretKey::generate().public(),
            tier: "worker".into(),
            not_before: 0,
            not_after: 10,
            issuer: KeyId(issuer),
        }
    }

    #[test]
    fn keys_and_serials_are_revoked() {
        let list = Revocations::parse(
            "# comment\n\n key SHA256:abcdefghijklmnop  # old laptop\nserial 0706a2a3bed0f527 42\n",
        )
        .expect("parses");
        assert_eq!(list.len(), 2);
        let issuer = [0x07, 0x06, 0xa2, 0xa3, 0xbe, 0xd0, 0xf5, 0x27];
        assert!(list.check(&body(42, issuer), "SHA256:other").is_some());
        assert!(list.check(&body(43, issuer), "SHA256:other").is_none());
        assert!(list.check(&body(42, [0; 8]), "SHA256:other").is_none());
        assert!(list
            .check(&body(1, [0; 8]), "SHA256:abcdefghijklmnop")
            .is_some());
    }

    #[test]
    fn mistakes_name_their_line() {
        for (text, line) in [
            ("key 12345", 1),
            ("\nserial nothex 1", 2),
            ("serial 0706a2a3bed0f527 -1", 1),
            ("revoke everything", 1),
        ] {
            assert_eq!(
                Revocations::parse(text).map_err(|e| e.line),
                Err(line),
                "{text}"
            );
        }
        assert!(Revocations::parse("").expect("empty is fine").is_empty());
    }
}
