//! What the carrier checks before and during the distribution handshake.
//!
//! 1. The *hello*: the first frame in each direction on a new QUIC connection carries the
//!    node's certificate. It is verified (authority, validity, key == the TLS key) before
//!    any distribution byte is exchanged.
//! 2. The *name binding*: the node name that the distribution handshake claims must match
//!    the certificate. [`NameGuard`] watches the peer's first handshake frames and fails
//!    before they reach `dist_util` if the claimed name is not the certified one.

use crate::cert::{node_matches, CertError, Certificate, CertificateBody};
use crate::identity::PublicKey;
use serde::{Deserialize, Serialize};

/// Version of the hello exchange; bumped when its layout changes.
pub const HELLO_VERSION: u16 = 1;
/// Hello frames larger than this are refused.
pub const MAX_HELLO_BYTES: u32 = 8 * 1024;
/// Largest distribution-handshake message accepted from a peer. The longest real one is a
/// send_challenge with a 255-byte node name (under 300 bytes); dist_util turns each into
/// a list, so a large one would cost 16 bytes of heap per byte.
pub const MAX_HANDSHAKE_FRAME: u32 = 2048;
/// The distribution flag by which a node asks the peer to name it (OTP 23+); a dynamic
/// name cannot be bound to a certificate, so it is refused.
pub const DFLAG_NAME_ME: u64 = 1 << 33;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("peer hello is malformed ({0})")]
    MalformedHello(&'static str),
    #[error("peer hello version {0} is not supported (this node speaks {HELLO_VERSION})")]
    UnsupportedHello(u16),
    #[error("peer certificate refused: {0}")]
    Certificate(#[from] CertError),
    #[error(
        "peer certificate key {cert} is not the key {tls} that authenticated the QUIC connection"
    )]
    KeyMismatch { cert: String, tls: String },
    #[error("peer certificate is for {pattern:?}, but the peer claims to be {claimed:?}")]
    NameMismatch { pattern: String, claimed: String },
    #[error("peer certificate is for {pattern:?}, but we dialled {dialled:?} (wrong address or port for that node?)")]
    NotTheDialledNode { pattern: String, dialled: String },
    #[error("peer's handshake names it {named:?}, but we dialled {dialled:?}")]
    ChallengeNameMismatch { named: String, dialled: String },
    #[error("peer certificate tier {0:?} is not among the configured tiers")]
    UnknownTier(String),
    #[error("peer handshake message is malformed ({0})")]
    MalformedHandshake(&'static str),
    #[error("peer asked for a dynamic node name, which cannot be bound to a certificate")]
    DynamicName,
}

#[derive(Serialize, Deserialize)]
struct WireHello<'a> {
    version: u16,
    #[serde(with = "serde_bytes")]
    certificate: &'a [u8],
}

/// The hello frame that carries this node's certificate.
pub fn encode_hello(certificate: &Certificate) -> Vec<u8> {
    let cert = certificate.to_bytes();
    rmp_serde::to_vec(&WireHello {
        version: HELLO_VERSION,
        certificate: &cert,
    })
    .unwrap_or_default()
}

/// Decodes a peer's hello and verifies its certificate: signed by one of `authorities`,
/// valid at `now`, and issued for `tls_key`, the key that authenticated the connection.
pub fn verify_hello(
    frame: &[u8],
    authorities: &[PublicKey],
    tls_key: &PublicKey,
    now: u64,
) -> Result<CertificateBody, HandshakeError> {
    if frame.len() > MAX_HELLO_BYTES as usize {
        return Err(HandshakeError::MalformedHello("too large"));
    }
    let hello: WireHello<'_> = rmp_serde::from_slice(frame)
        .map_err(|_| HandshakeError::MalformedHello("not a hello message"))?;
    if hello.version != HELLO_VERSION {
        return Err(HandshakeError::UnsupportedHello(hello.version));
    }
    let certificate = Certificate::from_bytes(hello.certificate)?;
    // One encoding of the hello too, as of the certificate inside it.
    if encode_hello(&certificate) != frame {
        return Err(HandshakeError::MalformedHello("not in canonical encoding"));
    }
    let body = certificate.verify(authorities, now)?;
    if &body.public_key != tls_key {
        return Err(HandshakeError::KeyMismatch {
            cert: body.public_key.fingerprint(),
            tls: tls_key.fingerprint(),
        });
    }
    Ok(body.clone())
}

/// Checks, on the connecting side, that the certificate covers the node we dialled.
pub fn check_dialled(pattern: &str, dialled: &str) -> Result<(), HandshakeError> {
    if node_matches(pattern, dialled) {
        Ok(())
    } else {
        Err(HandshakeError::NotTheDialledNode {
            pattern: pattern.to_owned(),
            dialled: dialled.to_owned(),
        })
    }
}

/// Checks that `node` is a name the certificate pattern covers.
pub fn check_name(pattern: &str, node: &str) -> Result<(), HandshakeError> {
    if node_matches(pattern, node) {
        Ok(())
    } else {
        Err(HandshakeError::NameMismatch {
            pattern: pattern.to_owned(),
            claimed: node.to_owned(),
        })
    }
}

/// A parsed `'N'` handshake message (send_name or send_challenge, version 6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMessage {
    pub flags: u64,
    /// For send_challenge, the 32-bit challenge precedes the creation.
    pub challenge: Option<u32>,
    pub creation: u32,
    pub name: String,
}

/// Parses `'N', Flags:64, [Challenge:32,] Creation:32, NameLen:16, Name`. Trailing bytes
/// are allowed, as dist_util allows them.
pub fn parse_name_message(
    frame: &[u8],
    with_challenge: bool,
) -> Result<NameMessage, HandshakeError> {
    let mut r = Reader(frame);
    if r.u8()? != b'N' {
        return Err(HandshakeError::MalformedHandshake(
            "expected an 'N' message",
        ));
    }
    let flags = r.u64()?;
    let challenge = if with_challenge { Some(r.u32()?) } else { None };
    let creation = r.u32()?;
    let len = r.u16()? as usize;
    let name = r.take(len)?;
    let name = std::str::from_utf8(name)
        .map_err(|_| HandshakeError::MalformedHandshake("name is not UTF-8"))?;
    Ok(NameMessage {
        flags,
        challenge,
        creation,
        name: name.to_owned(),
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandshakeError> {
        if self.0.len() < n {
            return Err(HandshakeError::MalformedHandshake("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, HandshakeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HandshakeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, HandshakeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, HandshakeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
}

/// Which side of the connection this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// We accepted: the peer's first frame is its send_name.
    Accepting,
    /// We connected: the peer answers with send_status, then send_challenge.
    Connecting,
}

impl Side {
    /// How many distribution-handshake messages the peer sends us: send_name and
    /// challenge_reply to an acceptor; send_status, send_challenge and challenge_ack to a
    /// connector. Every frame after those is distribution data.
    pub fn peer_handshake_frames(self) -> u8 {
        match self {
            Side::Accepting => 2,
            Side::Connecting => 3,
        }
    }
}

/// The size limit for each frame a peer sends on a new link, in order: the hello, then
/// its distribution-handshake messages, then data. Small frames are all a peer may send
/// before the distribution handshake is over.
#[derive(Debug, Clone)]
pub struct FrameBudget {
    hello_pending: bool,
    handshake_left: u8,
    data_max: u32,
}

impl FrameBudget {
    pub fn new(side: Side, data_max: u32) -> Self {
        FrameBudget {
            hello_pending: true,
            handshake_left: side.peer_handshake_frames(),
            data_max,
        }
    }

    /// The limit for the next frame.
    pub fn limit(&self) -> u32 {
        if self.hello_pending {
            MAX_HELLO_BYTES
        } else if self.handshake_left > 0 {
            MAX_HANDSHAKE_FRAME
        } else {
            self.data_max
        }
    }

    /// Counts one whole frame (empty ones included: a tick is no handshake message, so
    /// a peer that sends one early only shortens its own handshake).
    pub fn frame_done(&mut self) {
        if self.hello_pending {
            self.hello_pending = false;
        } else {
            self.handshake_left = self.handshake_left.saturating_sub(1);
        }
    }
}

/// Watches the peer's handshake frames until the peer's claimed name has been seen and
/// checked against its certificate, then gets out of the way.
#[derive(Debug)]
pub struct NameGuard {
    side: Side,
    /// Accepting: the certificate's name pattern. Connecting: the exact node we dialled.
    pattern: String,
    frames_seen: u8,
    peer: Option<NameMessage>,
}

impl NameGuard {
    pub fn new(side: Side, certified_pattern: &str) -> Self {
        NameGuard {
            side,
            pattern: certified_pattern.to_owned(),
            frames_seen: 0,
            peer: None,
        }
    }

    /// True once the peer's name has been checked; later frames need no inspection.
    pub fn is_done(&self) -> bool {
        self.peer.is_some()
    }

    /// The peer's name message, once seen: its name, flags and creation.
    pub fn peer(&self) -> Option<&NameMessage> {
        self.peer.as_ref()
    }

    /// Inspects one handshake frame from the peer, in order.
    pub fn on_peer_frame(&mut self, frame: &[u8]) -> Result<(), HandshakeError> {
        if self.is_done() {
            return Ok(());
        }
        self.frames_seen = self.frames_seen.saturating_add(1);
        let message = match (self.side, self.frames_seen) {
            (Side::Accepting, 1) => parse_name_message(frame, false)?,
            // send_status: 's' and a status word; dist_util judges its content.
            (Side::Connecting, 1) if frame.first() == Some(&b's') => return Ok(()),
            (Side::Connecting, 1) => {
                return Err(HandshakeError::MalformedHandshake("expected send_status"))
            }
            (Side::Connecting, 2) => parse_name_message(frame, true)?,
            _ => {
                return Err(HandshakeError::MalformedHandshake(
                    "unexpected handshake frame",
                ))
            }
        };
        if message.flags & DFLAG_NAME_ME != 0 {
            return Err(HandshakeError::DynamicName);
        }
        match self.side {
            Side::Accepting => check_name(&self.pattern, &message.name)?,
            Side::Connecting if message.name != self.pattern => {
                return Err(HandshakeError::ChallengeNameMismatch {
                    named: message.name,
                    dialled: self.pattern.clone(),
                })
            }
            Side::Connecting => {}
        }
        self.peer = Some(message);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{KeyId, SecretKey};

    fn send_name(flags: u64, creation: u32, name: &str) -> Vec<u8> {
        let mut m = vec![b'N'];
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&creation.to_be_bytes());
        m.extend_from_slice(&(name.len() as u16).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m
    }

    fn challenge(name: &str) -> Vec<u8> {
        let mut m = vec![b'N'];
        m.extend_from_slice(&0xD07DF7FBCu64.to_be_bytes());
        m.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        m.extend_from_slice(&77u32.to_be_bytes());
        m.extend_from_slice(&(name.len() as u16).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m
    }

    fn cert(node: &str, key: &SecretKey, authority: &SecretKey) -> Certificate {
        let body = CertificateBody {
            serial: 1,
            node: node.into(),
            public_key: key.public(),
            tier: "worker".into(),
            not_before: 0,
            not_after: 100,
            issuer: KeyId([0; 8]),
        };
        Certificate::issue(body, authority).expect("valid body")
    }

    #[test]
    fn hello_verifies_and_binds_the_tls_key() {
        let (authority, key) = (SecretKey::generate(), SecretKey::generate());
        let hello = encode_hello(&cert("b@h", &key, &authority));
        let body = verify_hello(&hello, &[authority.public()], &key.public(), 50).expect("valid");
        assert_eq!(body.node, "b@h");
        let other = SecretKey::generate().public();
        assert!(matches!(
            verify_hello(&hello, &[authority.public()], &other, 50),
            Err(HandshakeError::KeyMismatch { .. })
        ));
        assert!(matches!(
            verify_hello(&hello, &[authority.public()], &key.public(), 100),
            Err(HandshakeError::Certificate(CertError::Expired { .. }))
        ));
        assert!(matches!(
            verify_hello(b"\x00garbage", &[authority.public()], &key.public(), 50),
            Err(HandshakeError::MalformedHello(_))
        ));
    }

    #[test]
    fn a_hello_has_one_encoding() {
        // Found by fuzzing: the certificate field spelled as a MessagePack str8 (0xd9)
        // instead of bin8 (0xc4) decoded to the same hello.
        let (authority, key) = (SecretKey::generate(), SecretKey::generate());
        let hello = encode_hello(&cert("b@h", &key, &authority));
        assert_eq!(hello[2], 0xc4);
        let mut respelled = hello.clone();
        respelled[2] = 0xd9;
        assert!(matches!(
            verify_hello(&respelled, &[authority.public()], &key.public(), 50),
            Err(HandshakeError::MalformedHello(_))
        ));
    }

    #[test]
    fn accepting_guard_checks_the_claimed_name() {
        let mut g = NameGuard::new(Side::Accepting, "b@127.0.0.1");
        assert!(g
            .on_peer_frame(&send_name(0xD07DF7FBC, 9, "b@127.0.0.1"))
            .is_ok());
        assert!(g.is_done());
        assert_eq!(g.peer().map(|p| p.creation), Some(9));

        let mut g = NameGuard::new(Side::Accepting, "b@127.0.0.1");
        assert!(matches!(
            g.on_peer_frame(&send_name(0xD07DF7FBC, 9, "a@127.0.0.1")),
            Err(HandshakeError::NameMismatch { .. })
        ));
        let mut g = NameGuard::new(Side::Accepting, "*");
        assert_eq!(
            g.on_peer_frame(&send_name(DFLAG_NAME_ME, 0, "127.0.0.1")),
            Err(HandshakeError::DynamicName)
        );
        let mut g = NameGuard::new(Side::Accepting, "*");
        assert!(g.on_peer_frame(&send_name(0, 0, "b@h")[..12]).is_err());
    }

    #[test]
    fn connecting_guard_checks_the_challenge_name() {
        let mut g = NameGuard::new(Side::Connecting, "b@h");
        assert!(g.on_peer_frame(b"sok").is_ok());
        assert!(!g.is_done());
        assert!(g.on_peer_frame(&challenge("b@h")).is_ok());
        assert_eq!(g.peer().map(|p| p.challenge), Some(Some(0x1234_5678)));

        let mut g = NameGuard::new(Side::Connecting, "b@h");
        assert!(g.on_peer_frame(b"sok").is_ok());
        assert!(matches!(
            g.on_peer_frame(&challenge("evil@h")),
            Err(HandshakeError::ChallengeNameMismatch { .. })
        ));
        let mut g = NameGuard::new(Side::Connecting, "b@h");
        assert!(g.on_peer_frame(b"Nxx").is_err());
    }
}
