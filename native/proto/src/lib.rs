//! Sans-IO core of trust_dist.
//!
//! Everything that decides lives here: node identities, authority-signed certificates,
//! the framing of the QUIC distribution stream, the checks on the distribution handshake
//! and the per-packet decision for an established link. There is no I/O, no clock and no
//! runtime in this crate: time is an argument, bytes go in and verdicts come out, so every
//! parser that sees peer bytes can be driven byte by byte from tests and fuzz targets.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cert;
pub mod control;
pub mod copies;
pub mod etf;
pub mod filter;
pub mod frame;
pub mod handshake;
pub mod identity;
pub mod lanes;
pub mod link;
pub mod policy;
pub mod revocation;

pub use cert::{CertError, Certificate, CertificateBody};
pub use filter::{AtomTable, Decision, LinkFilter, NodeId, Reason, Verdict};
pub use identity::{KeyError, KeyId, PublicKey, SecretKey};
pub use link::{LinkMode, TierOrder};
pub use policy::{Assertion, Capability, Policy, TierPolicy};
pub use revocation::Revocations;
