//! Node certificates: an authority's signed statement "this key is node N of tier T
//! from time A to time B".
//!
//! Wire form (MessagePack, versioned):
//!
//! ```text
//! certificate = [format: 1, body: bin, signature: bin(64)]
//! body        = [serial: u64, node: str, public_key: bin(32), tier: str,
//!                not_before: u64, not_after: u64, issuer: bin(8)]
//! signature   = ed25519(authority, "trust_dist certificate v1\0" ++ body)
//! ```
//!
//! The signature covers the body bytes exactly as they travel, and a body is accepted only
//! if re-encoding it gives the same bytes, so there is one encoding per certificate and no
//! room for malleability. Decoding borrows from the input and never allocates by a length
//! the input announces.

use crate::identity::{KeyId, PublicKey, SecretKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The only certificate format this version reads and writes.
pub const FORMAT_VERSION: u8 = 1;
/// Certificates larger than this are refused before decoding.
pub const MAX_CERTIFICATE_BYTES: usize = 4096;
const SIGNATURE_CONTEXT: &[u8] = b"trust_dist certificate v1\0";
const PEM_LABEL: &str = "TRUST DIST CERTIFICATE";
const MAX_NAME_BYTES: usize = 255;

/// Why a certificate was refused. Each variant names the likely cause, since these reach
/// operators through logs and `cert verify`.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum CertError {
    #[error("certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")]
    TooLarge,
    #[error("certificate is malformed: {0} (truncated or not a trust_dist certificate)")]
    Malformed(&'static str),
    #[error("certificate format {0} is not supported by this version (only {FORMAT_VERSION})")]
    UnsupportedFormat(u8),
    #[error("certificate body is not in canonical encoding (altered after signing?)")]
    NonCanonical,
    #[error(
        "certificate was issued by authority {0}, which is not among the configured authorities"
    )]
    UnknownAuthority(KeyId),
    #[error("certificate signature does not verify (tampered, or signed by another key with the same id)")]
    BadSignature,
    #[error("certificate is not valid before {not_before} (now {now}; clock skew or issued for the future)")]
    NotYetValid { not_before: u64, now: u64 },
    #[error("certificate expired at {not_after} (now {now}); issue a new one")]
    Expired { not_after: u64, now: u64 },
    #[error("certificate node name pattern {0:?} is not valid")]
    BadNodePattern(String),
    #[error("certificate tier name {0:?} is not valid")]
    BadTier(String),
    #[error("certificate has a validity window that ends before it starts")]
    EmptyValidity,
    #[error("certificate PEM is malformed: {0}")]
    BadPem(&'static str),
}

/// What an authority states about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateBody {
    pub serial: u64,
    /// An exact node name (`name@host`) or a pattern with `*` (`worker-*@10.0.*`).
    pub node: String,
    pub public_key: PublicKey,
    pub tier: String,
    /// Unix seconds, inclusive.
    pub not_before: u64,
    /// Unix seconds, exclusive.
    pub not_after: u64,
    pub issuer: KeyId,
}

/// A signed certificate, kept together with the exact bytes it was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    body: CertificateBody,
    body_bytes: Vec<u8>,
    signature: [u8; 64],
}

#[derive(Serialize, Deserialize)]
struct WireBody<'a> {
    serial: u64,
    node: &'a str,
    #[serde(with = "serde_bytes")]
    public_key: &'a [u8],
    tier: &'a str,
    not_before: u64,
    not_after: u64,
    #[serde(with = "serde_bytes")]
    issuer: &'a [u8],
}

#[derive(Serialize, Deserialize)]
struct WireCertificate<'a> {
    format: u8,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    #[serde(with = "serde_bytes")]
    signature: &'a [u8],
}

impl Certificate {
    /// Signs `body` with the authority key. The body's `issuer` is set from that key.
    pub fn issue(mut body: CertificateBody, authority: &SecretKey) -> Result<Self, CertError> {
        body.issuer = authority.public().key_id();
        validate_body(&body)?;
        let body_bytes = encode_body(&body);
        let signature = authority.sign(&signed_message(&body_bytes));
        Ok(Certificate {
            body,
            body_bytes,
            signature,
        })
    }

    /// Decodes a certificate without judging it; call [`Certificate::verify`] before
    /// trusting anything in it.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CertError> {
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(CertError::TooLarge);
        }
        let wire: WireCertificate<'_> =
            rmp_serde::from_slice(bytes).map_err(|_| CertError::Malformed("outer structure"))?;
        if wire.format != FORMAT_VERSION {
            return Err(CertError::UnsupportedFormat(wire.format));
        }
        let signature: [u8; 64] = wire
            .signature
            .try_into()
            .map_err(|_| CertError::Malformed("signature is not 64 bytes"))?;
        let raw: WireBody<'_> =
            rmp_serde::from_slice(wire.body).map_err(|_| CertError::Malformed("body"))?;
        let key: &[u8; 32] = raw
            .public_key
            .try_into()
            .map_err(|_| CertError::Malformed("public key is not 32 bytes"))?;
        let issuer: [u8; 8] = raw
            .issuer
            .try_into()
            .map_err(|_| CertError::Malformed("issuer id is not 8 bytes"))?;
        let body = CertificateBody {
            serial: raw.serial,
            node: raw.node.to_owned(),
            public_key: PublicKey::from_bytes(key)
                .map_err(|_| CertError::Malformed("public key is not an ed25519 point"))?,
            tier: raw.tier.to_owned(),
            not_before: raw.not_before,
            not_after: raw.not_after,
            issuer: KeyId(issuer),
        };
        if encode_body(&body) != wire.body {
            return Err(CertError::NonCanonical);
        }
        validate_body(&body)?;
        let certificate = Certificate {
            body,
            body_bytes: wire.body.to_vec(),
            signature,
        };
        // One encoding for the envelope too: a certificate's bytes are its identity in
        // logs and comparisons, so no other spelling of the same fields is accepted.
        if certificate.to_bytes() != bytes {
            return Err(CertError::NonCanonical);
        }
        Ok(certificate)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let wire = WireCertificate {
            format: FORMAT_VERSION,
            body: &self.body_bytes,
            signature: &self.signature,
        };
        // Serializing borrowed bytes and integers into a Vec has no failure mode.
        rmp_serde::to_vec(&wire).unwrap_or_default()
    }

    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.to_bytes());
        let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        out
    }

    pub fn from_pem(text: &str) -> Result<Self, CertError> {
        let begin = format!("-----BEGIN {PEM_LABEL}-----");
        let end = format!("-----END {PEM_LABEL}-----");
        let start = text.find(&begin).ok_or(CertError::BadPem(
            "no BEGIN TRUST DIST CERTIFICATE line (is this a key file?)",
        ))?;
        let rest = &text[start + begin.len()..];
        let stop = rest.find(&end).ok_or(CertError::BadPem("no END line"))?;
        let b64: String = rest[..stop]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if b64.len() > MAX_CERTIFICATE_BYTES * 2 {
            return Err(CertError::TooLarge);
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| CertError::BadPem("body is not base64"))?;
        Self::from_bytes(&bytes)
    }

    /// The body as decoded. Not yet trusted unless [`Certificate::verify`] returned it.
    pub fn body(&self) -> &CertificateBody {
        &self.body
    }

    /// Checks the signature against the configured authorities and the validity window
    /// against `now` (Unix seconds). Returns the body only if everything holds.
    pub fn verify(
        &self,
        authorities: &[PublicKey],
        now: u64,
    ) -> Result<&CertificateBody, CertError> {
        let authority = authorities
            .iter()
            .find(|a| a.key_id() == self.body.issuer)
            .ok_or(CertError::UnknownAuthority(self.body.issuer))?;
        if !authority.verify(&signed_message(&self.body_bytes), &self.signature) {
            return Err(CertError::BadSignature);
        }
        if now < self.body.not_before {
            return Err(CertError::NotYetValid {
                not_before: self.body.not_before,
                now,
            });
        }
        if now >= self.body.not_after {
            return Err(CertError::Expired {
                not_after: self.body.not_after,
                now,
            });
        }
        Ok(&self.body)
    }
}

impl fmt::Display for CertificateBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "node:        {}", self.node)?;
        writeln!(f, "tier:        {}", self.tier)?;
        writeln!(f, "key:         {}", self.public_key.fingerprint())?;
        writeln!(f, "serial:      {}", self.serial)?;
        writeln!(f, "not before:  {}", self.not_before)?;
        writeln!(f, "not after:   {}", self.not_after)?;
        write!(f, "issuer:      {}", self.issuer)
    }
}

fn signed_message(body_bytes: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(SIGNATURE_CONTEXT.len() + body_bytes.len());
    message.extend_from_slice(SIGNATURE_CONTEXT);
    message.extend_from_slice(body_bytes);
    message
}

fn encode_body(body: &CertificateBody) -> Vec<u8> {
    let wire = WireBody {
        serial: body.serial,
        node: &body.node,
        public_key: body.public_key.as_bytes(),
        tier: &body.tier,
        not_before: body.not_before,
        not_after: body.not_after,
        issuer: &body.issuer.0,
    };
    rmp_serde::to_vec(&wire).unwrap_or_default()
}

fn validate_body(body: &CertificateBody) -> Result<(), CertError> {
    if !is_valid_node_pattern(&body.node) {
        return Err(CertError::BadNodePattern(body.node.clone()));
    }
    if !is_valid_tier(&body.tier) {
        return Err(CertError::BadTier(body.tier.clone()));
    }
    if body.not_after <= body.not_before {
        return Err(CertError::EmptyValidity);
    }
    Ok(())
}

/// A tier is a lowercase Erlang-atom-like word, so it can be written unquoted in
/// `sys.config`.
pub fn is_valid_tier(tier: &str) -> bool {
    let mut chars = tier.chars();
    matches!(chars.next(), Some('a'..='z'))
        && tier.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// `name@host`, where either part may hold `*` wildcards; characters are those of node
/// names (letters, digits, `_ - .`) plus `:` for IPv6 literals.
pub fn is_valid_node_pattern(pattern: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "_-.:*".contains(c);
    match pattern.split_once('@') {
        Some((name, host)) => {
            !name.is_empty()
                && !host.is_empty()
                && pattern.len() <= MAX_NAME_BYTES
                && name.chars().all(allowed)
                && host.chars().all(allowed)
        }
        None => false,
    }
}

/// Whether `node` (an exact `name@host`) matches a certificate's node pattern, where `*`
/// matches any run of characters, including none. Linear-time two-pointer glob match.
pub fn node_matches(pattern: &str, node: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), node.as_bytes());
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some((star, matched)) = backtrack {
            pi = star + 1;
            ni = matched + 1;
            backtrack = Some((star, matched + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body_for(key: &SecretKey) -> CertificateBody {
        CertificateBody {
            serial: 7,
            node: "a@127.0.0.1".into(),
            public_key: key.public(),
            tier: "admin".into(),
            not_before: 1_000,
            not_after: 2_000,
            issuer: KeyId([0; 8]),
        }
    }

    fn issued() -> (SecretKey, Certificate) {
        let authority = SecretKey::generate();
        let cert =
            Certificate::issue(body_for(&SecretKey::generate()), &authority).expect("valid body");
        (authority, cert)
    }

    #[test]
    fn issued_certificate_verifies_and_round_trips() {
        let (authority, cert) = issued();
        let again = Certificate::from_bytes(&cert.to_bytes()).expect("own bytes decode");
        assert_eq!(again, cert);
        let from_pem = Certificate::from_pem(&cert.to_pem()).expect("own PEM decodes");
        assert_eq!(from_pem, cert);
        let body = again
            .verify(&[authority.public()], 1_500)
            .expect("valid now");
        assert_eq!(body.issuer, authority.public().key_id());
        assert_eq!(body.tier, "admin");
    }

    #[test]
    fn unknown_authority_is_named() {
        let (authority, cert) = issued();
        let other = SecretKey::generate().public();
        assert_eq!(
            cert.verify(&[other], 1_500),
            Err(CertError::UnknownAuthority(authority.public().key_id()))
        );
    }

    #[test]
    fn validity_window_is_enforced() {
        let (authority, cert) = issued();
        let auth = [authority.public()];
        assert!(matches!(
            cert.verify(&auth, 999),
            Err(CertError::NotYetValid { .. })
        ));
        assert!(cert.verify(&auth, 1_000).is_ok());
        assert!(cert.verify(&auth, 1_999).is_ok());
        assert!(matches!(
            cert.verify(&auth, 2_000),
            Err(CertError::Expired { .. })
        ));
    }

    #[test]
    fn every_single_byte_change_is_refused() {
        let (authority, cert) = issued();
        let bytes = cert.to_bytes();
        for i in 0..bytes.len() {
            for flip in [0x01u8, 0x80] {
                let mut tampered = bytes.clone();
                tampered[i] ^= flip;
                let verdict = Certificate::from_bytes(&tampered)
                    .and_then(|c| c.verify(&[authority.public()], 1_500).map(|_| ()));
                assert!(
                    verdict.is_err(),
                    "byte {i} flipped with {flip:#x} still verified"
                );
            }
        }
    }

    #[test]
    fn a_changed_tier_breaks_the_signature() {
        let (authority, cert) = issued();
        let mut forged_body = cert.body().clone();
        forged_body.tier = "worker".into();
        let forged = Certificate {
            body_bytes: encode_body(&forged_body),
            body: forged_body,
            signature: cert.signature,
        };
        let decoded = Certificate::from_bytes(&forged.to_bytes()).expect("well formed");
        assert_eq!(
            decoded.verify(&[authority.public()], 1_500),
            Err(CertError::BadSignature)
        );
    }

    #[test]
    fn oversized_and_garbage_inputs_are_refused() {
        assert_eq!(
            Certificate::from_bytes(&vec![0x90; MAX_CERTIFICATE_BYTES + 1]),
            Err(CertError::TooLarge)
        );
        assert!(matches!(
            Certificate::from_bytes(&[]),
            Err(CertError::Malformed(_))
        ));
        // A bin header announcing 4 GiB must not be trusted as an allocation size.
        assert!(Certificate::from_bytes(&[0x93, 0x01, 0xc6, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(matches!(
            Certificate::from_pem(concat!("-----BEGIN ", "PRIVATE", " KEY-----")),
            Err(CertError::BadPem(_))
        ));
    }

    #[test]
    fn bodies_are_validated_at_issue() {
        let authority = SecretKey::generate();
        let mut body = body_for(&SecretKey::generate());
        body.node = "no-at-sign".into();
        assert!(matches!(
            Certificate::issue(body.clone(), &authority),
            Err(CertError::BadNodePattern(_))
        ));
        body.node = "a@h".into();
        body.tier = "Admin".into();
        assert!(matches!(
            Certificate::issue(body.clone(), &authority),
            Err(CertError::BadTier(_))
        ));
        body.tier = "admin".into();
        body.not_after = body.not_before;
        assert_eq!(
            Certificate::issue(body, &authority),
            Err(CertError::EmptyValidity)
        );
    }

    #[test]
    fn node_patterns_match_like_globs() {
        assert!(node_matches("a@127.0.0.1", "a@127.0.0.1"));
        assert!(!node_matches("a@127.0.0.1", "a@127.0.0.10"));
        assert!(!node_matches("a@127.0.0.1", "b@127.0.0.1"));
        assert!(node_matches("worker-*@10.0.*", "worker-17@10.0.3.4"));
        assert!(!node_matches("worker-*@10.0.*", "admin@10.0.3.4"));
        assert!(!node_matches("worker-*@10.0.*", "worker-1@10.1.0.1"));
        assert!(node_matches("*", "anything@at.all"));
        assert!(node_matches("a*b*c@h", "axxbyyc@h"));
        assert!(!node_matches("a*b*c@h", "axxbyy@h"));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Certificate::from_bytes(&bytes);
        }

        #[test]
        fn exact_patterns_match_only_themselves(a in "[a-z]{1,8}@[a-z0-9.]{1,12}", b in "[a-z]{1,8}@[a-z0-9.]{1,12}") {
            prop_assert!(node_matches(&a, &a));
            prop_assert_eq!(node_matches(&a, &b), a == b);
        }
    }
}
