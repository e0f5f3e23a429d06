//! TLS 1.3 over QUIC with raw ed25519 public keys (RFC 7250) on both sides.
//!
//! At the TLS layer any well-formed ed25519 key is accepted and proven (the peer signs the
//! handshake with it); *which* keys are trusted is decided right after, by the certificate
//! exchange in [`crate::link`], before a single distribution byte flows. There is no
//! X.509 chain, no host name and no system trust store involved.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring as provider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;
use trust_dist_proto::{PublicKey, SecretKey};

/// Application protocol name: a peer that speaks anything else fails the TLS handshake.
///
/// Version 2: packets travel on lanes (see `trust_dist_proto::lanes`). Version 3: lanes
/// 1.. also carry barrier markers (fences behind packets that name no sender), which a
/// version 2 node would take for a protocol error. Version 4: fences come after any
/// packet that names no sender, not only in a link's opening, and a version 3 receiver
/// could let the lanes behind them hold its read-ahead for good. Version 5: QUIC
/// datagrams carry lane copies (`trust_dist_proto::copies`), and senders use lanes 1..
/// only. Version 6: a sender moves off a lane that carries another process's bulk
/// transfer, behind a fence that counts the lane it left, which a version 5 receiver
/// refuses (its fences count lane 0 only).
pub const ALPN: &[u8] = b"trust-dist/6";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("the node key cannot be used for TLS: {0}")]
    Key(String),
    #[error("TLS configuration failed: {0}")]
    Config(#[from] rustls::Error),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

fn certified_key(secret: &SecretKey) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let der = PrivatePkcs8KeyDer::from(secret.to_pkcs8_der());
    let key =
        provider::sign::any_eddsa_type(&der).map_err(|e| TlsSetupError::Key(e.to_string()))?;
    let spki = CertificateDer::from(secret.public().to_spki_der());
    Ok(Arc::new(CertifiedKey::new(vec![spki], key)))
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider::default_provider().signature_verification_algorithms
}

fn check_raw_key(der: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    PublicKey::from_spki_der(der.as_ref())
        .map(|_| ())
        .map_err(|e| rustls::Error::General(format!("peer raw public key refused: {e}")))
}

fn verify_signature(
    message: &[u8],
    der: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(der.as_ref()),
        dss,
        &algorithms(),
    )
}

/// Accepts any ed25519 raw public key whose owner proves possession in the handshake.
#[derive(Debug)]
pub(crate) struct RawKeyVerifier;

impl ServerCertVerifier for RawKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "raw public keys carry no chain".into(),
            ));
        }
        check_raw_key(end_entity).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for RawKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "raw public keys carry no chain".into(),
            ));
        }
        check_raw_key(end_entity).map(|_| ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not spoken".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

pub fn server_config(
    secret: &SecretKey,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsSetupError> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(RawKeyVerifier))
            .with_cert_resolver(Arc::new(
                rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(secret)?),
            ));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    quinn::crypto::rustls::QuicServerConfig::try_from(config)
        .map_err(|e| TlsSetupError::Quic(e.to_string()))
}

pub fn client_config(
    secret: &SecretKey,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsSetupError> {
    client_config_offering(secret, ALPN)
}

/// A client configuration offering `alpn` (a test's other wire protocol version).
pub(crate) fn client_config_offering(
    secret: &SecretKey,
    alpn: &[u8],
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsSetupError> {
    let mut config =
        rustls::ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RawKeyVerifier))
            .with_client_cert_resolver(Arc::new(
                rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(secret)?),
            ));
    config.alpn_protocols = vec![alpn.to_vec()];
    config.enable_early_data = false;
    quinn::crypto::rustls::QuicClientConfig::try_from(config)
        .map_err(|e| TlsSetupError::Quic(e.to_string()))
}

/// The raw public key the peer proved in the TLS handshake.
pub fn peer_key(connection: &quinn::Connection) -> Option<PublicKey> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    match certs.as_slice() {
        [only] => PublicKey::from_spki_der(only.as_ref()).ok(),
        _ => None,
    }
}

/// Why a QUIC/TLS handshake failed, with its likely cause where the error shows one: a
/// TLS `no_application_protocol` alert means the two ends offered no ALPN in common.
pub(crate) fn describe_handshake_error(e: &quinn::ConnectionError) -> String {
    let no_protocol = quinn::TransportErrorCode::crypto(u8::from(
        rustls::AlertDescription::NoApplicationProtocol,
    ));
    let code = match e {
        quinn::ConnectionError::TransportError(error) => Some(error.code),
        quinn::ConnectionError::ConnectionClosed(close) => Some(close.error_code),
        _ => None,
    };
    if code == Some(no_protocol) {
        format!(
            "{e} (the peer does not speak this node's trust_dist wire protocol, {}: run \
             trust_dist versions of the same wire protocol on both nodes; or it is not a \
             trust_dist node)",
            String::from_utf8_lossy(ALPN)
        )
    } else {
        e.to_string()
    }
}
