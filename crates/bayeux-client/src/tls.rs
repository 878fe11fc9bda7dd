//! Turns [`Tls`] into one rustls configuration, shared by the long-polling HTTP client and
//! the websocket connector so both check the server the same way.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::error::Error;
use super::options::Tls;

/// The default configuration (Mozilla roots), built once per process: every client uses
/// it unless told otherwise, and the root store is the largest part of it.
static DEFAULT_CONFIG: std::sync::OnceLock<Arc<ClientConfig>> = std::sync::OnceLock::new();

/// The rustls configuration for `tls`.
pub(crate) fn client_config(tls: &Tls) -> Result<Arc<ClientConfig>, Error> {
    if let Tls::Verify = tls
        && let Some(config) = DEFAULT_CONFIG.get()
    {
        return Ok(config.clone());
    }
    let config = build(tls)?;
    if let Tls::Verify = tls {
        return Ok(DEFAULT_CONFIG.get_or_init(|| config).clone());
    }
    Ok(config)
}

fn build(tls: &Tls) -> Result<Arc<ClientConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| Error::InvalidOptions(format!("tls: {error}")))?;
    let config = match tls {
        Tls::Config(config) => return Ok(config.clone()),
        Tls::Verify => {
            let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { digest: None, provider }))
            .with_no_client_auth(),
        Tls::Fingerprint(digest) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { digest: Some(*digest), provider }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts the server's certificate by its SHA-256 digest, or any certificate when no
/// digest is set. Handshake signatures are still verified, so the server must hold the
/// certificate's key.
#[derive(Debug)]
struct Pinned {
    digest: Option<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.provider.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.digest {
            None => Ok(ServerCertVerified::assertion()),
            Some(expected) => {
                let actual = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
                if actual.as_ref() == expected {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(
                        "the server certificate does not match the pinned SHA-256 fingerprint".into(),
                    ))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}
