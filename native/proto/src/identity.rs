//! Node and authority keys: ed25519 key pairs, their file forms and fingerprints.
//!
//! Private keys are stored as PKCS#8 PEM and public keys as SubjectPublicKeyInfo PEM, the
//! forms OpenSSL and every TLS stack read, so an operator can inspect them with standard
//! tools. The same SubjectPublicKeyInfo, in DER, is the raw public key that QUIC/TLS 1.3
//! authenticates (RFC 7250), which is how a TLS key is compared with a certificate key.

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, Verifier};
use sha2::{Digest, Sha256};
use std::fmt;

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.112 }, BIT STRING (33 bytes, 0 unused bits) }, followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not a PEM `PRIVATE KEY` holding an ed25519 PKCS#8 key. Most often the
    /// file is a public key, a certificate, or a key of another algorithm.
    #[error("not an ed25519 private key in PKCS#8 PEM form (is this the .pub or .cert file?)")]
    BadPrivateKey,
    /// The text is not a PEM `PUBLIC KEY` holding an ed25519 SubjectPublicKeyInfo.
    #[error("not an ed25519 public key in SubjectPublicKeyInfo PEM form (is this the .key or .cert file?)")]
    BadPublicKey,
    /// The peer's TLS raw public key is not exactly an ed25519 SubjectPublicKeyInfo.
    #[error("TLS raw public key is not an ed25519 SubjectPublicKeyInfo")]
    BadSpki,
    /// 32 bytes that are not a valid ed25519 point.
    #[error("public key bytes are not a valid ed25519 point")]
    InvalidPoint,
}

/// An ed25519 signing key: a node's identity or an authority's.
#[derive(Clone)]
pub struct SecretKey(ed25519_dalek::SigningKey);

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        SecretKey(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(SecretKey)
            .map_err(|_| KeyError::BadPrivateKey)
    }

    pub fn to_pkcs8_pem(&self) -> String {
        // Encoding a well-formed in-memory key cannot fail; an empty string would make the
        // write of the key file fail loudly rather than produce a half key.
        self.0
            .to_pkcs8_pem(Default::default())
            .map(|pem| pem.to_string())
            .unwrap_or_default()
    }

    /// PKCS#8 DER, the form rustls takes for its signing key.
    pub fn to_pkcs8_der(&self) -> Vec<u8> {
        self.0
            .to_pkcs8_der()
            .map(|doc| doc.as_bytes().to_vec())
            .unwrap_or_default()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public {})", self.public().fingerprint())
    }
}

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

/// The first 8 bytes of SHA-256 over a public key: names an authority inside certificates.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl PublicKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::InvalidPoint)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_public_key_pem(pem)
            .map(PublicKey)
            .map_err(|_| KeyError::BadPublicKey)
    }

    pub fn to_spki_pem(&self) -> String {
        self.0
            .to_public_key_pem(Default::default())
            .unwrap_or_default()
    }

    /// Parses exactly an ed25519 SubjectPublicKeyInfo in DER, nothing more and nothing less:
    /// this is the peer's TLS raw public key, so it is read strictly.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = der
            .strip_prefix(&ED25519_SPKI_PREFIX[..])
            .and_then(|rest| <&[u8; 32]>::try_from(rest).ok())
            .ok_or(KeyError::BadSpki)?;
        Self::from_bytes(key)
    }

    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(self.as_bytes());
        der
    }

    /// Verifies an ed25519 signature (strict: rejects non-canonical and small-order forms).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let signature = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &signature).is_ok()
            && self.0.verify(message, &signature).is_ok()
    }

    pub fn key_id(&self) -> KeyId {
        let digest = Sha256::digest(self.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// `SHA256:` and the first 12 bytes of the key's SHA-256 in unpadded base64: 16
    /// characters after the prefix, short enough to compare by eye, in the form ssh
    /// users already know.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.as_bytes());
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(&digest[..12])
        )
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let key = SecretKey::generate();
        let pem = key.to_pkcs8_pem();
        assert!(pem.starts_with(concat!("-----BEGIN ", "PRIVATE", " KEY-----")));
        let again = SecretKey::from_pkcs8_pem(&pem).expect("own PEM parses");
        assert_eq!(again.public(), key.public());
        let public =
            PublicKey::from_spki_pem(&key.public().to_spki_pem()).expect("own SPKI parses");
        assert_eq!(public, key.public());
    }

    #[test]
    fn spki_der_is_strict() {
        let key = SecretKey::generate().public();
        let der = key.to_spki_der();
        assert_eq!(PublicKey::from_spki_der(&der), Ok(key));
        assert_eq!(
            PublicKey::from_spki_der(&der[..der.len() - 1]),
            Err(KeyError::BadSpki)
        );
        let mut longer = der.clone();
        longer.push(0);
        assert_eq!(PublicKey::from_spki_der(&longer), Err(KeyError::BadSpki));
        let mut other_oid = der;
        other_oid[8] = 0x71; // 1.3.101.113 is ed448
        assert_eq!(PublicKey::from_spki_der(&other_oid), Err(KeyError::BadSpki));
    }

    #[test]
    fn key_files_are_not_interchangeable() {
        let key = SecretKey::generate();
        assert_eq!(
            SecretKey::from_pkcs8_pem(&key.public().to_spki_pem()).err(),
            Some(KeyError::BadPrivateKey)
        );
        assert_eq!(
            PublicKey::from_spki_pem(&key.to_pkcs8_pem()).err(),
            Some(KeyError::BadPublicKey)
        );
    }

    #[test]
    fn signatures_verify_only_for_their_message() {
        let key = SecretKey::generate();
        let sig = key.sign(b"hello");
        assert!(key.public().verify(b"hello", &sig));
        assert!(!key.public().verify(b"hellp", &sig));
        assert!(!SecretKey::generate().public().verify(b"hello", &sig));
    }

    #[test]
    fn fingerprint_is_short_and_stable() {
        let key = SecretKey::generate().public();
        let fp = key.fingerprint();
        assert_eq!(fp.len(), "SHA256:".len() + 16);
        assert_eq!(fp, key.fingerprint());
    }
}
