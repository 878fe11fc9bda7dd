//! TLS options against faye serving HTTPS and WSS with a certificate from a test CA.

use std::sync::Arc;
use std::time::Duration;

use cometd_bridge::cometd::{Client, ClientOptions, ConnectionType, Data, Tls, TransportErrorKind};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tempfile::TempDir;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::{next, open};

/// A CA and a `localhost` certificate it signed, written where faye can read them.
struct Pki {
    _dir: TempDir,
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    files: (std::path::PathBuf, std::path::PathBuf),
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let dir = tempfile::tempdir().expect("temp dir");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, leaf.pem()).expect("write cert");
    std::fs::write(&key_file, leaf_key.serialize_pem()).expect("write key");
    Pki { ca: ca.der().clone(), leaf: leaf.der().clone(), files: (cert_file, key_file), _dir: dir }
}

async fn tls_faye(pki: &Pki) -> BayeuxServer {
    BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        tls: Some(pki.files.clone()),
        ..FayeOptions::default()
    })
    .await
}

/// Options for a round trip: a generous connection timeout, so that a loaded machine
/// does not fail the setup (the bound is not what these tests test).
fn options(server: &BayeuxServer, kind: ConnectionType, tls: Tls) -> ClientOptions {
    Client::builder(server.url())
        .connection_types([kind])
        .tls(tls)
        .connection_timeout(Some(Duration::from_secs(10)))
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
}

/// Options for a connection that must be refused: a shorter timeout, so that an open that
/// would retry a refusal gives up soon (what is tested is the error's kind).
fn refused_options(server: &BayeuxServer, kind: ConnectionType, tls: Tls) -> ClientOptions {
    options(server, kind, tls).connection_timeout(Some(Duration::from_secs(2)))
}

async fn round_trip(options: ClientOptions) {
    let client = open(options).await;
    client.subscribe("/secure").await.expect("subscribe");
    client.publish("/secure", json!("over TLS")).await.expect("publish");
    assert_eq!(next(&client).await.expect("message").data.map(Data::into_value), Some(json!("over TLS")));
}

const KINDS: [ConnectionType; 2] = [ConnectionType::WebSocket, ConnectionType::LongPolling];

#[tokio::test]
async fn default_verification_rejects_an_unknown_authority() {
    let pki = pki();
    let server = tls_faye(&pki).await;
    for kind in KINDS {
        let client = refused_options(&server, kind, Tls::Verify).build().expect("options");
        let error = client.open().await.expect_err("untrusted certificate");
        assert_eq!(error.transport_kind(), Some(&TransportErrorKind::Tls), "{kind}: {error:?}");
    }
}

#[tokio::test]
async fn insecure_accepts_any_certificate() {
    let pki = pki();
    let server = tls_faye(&pki).await;
    for kind in KINDS {
        round_trip(options(&server, kind, Tls::Insecure)).await;
    }
}

#[tokio::test]
async fn a_pinned_fingerprint_accepts_that_certificate_only() {
    let pki = pki();
    let server = tls_faye(&pki).await;
    let digest = ring::digest::digest(&ring::digest::SHA256, pki.leaf.as_ref());
    let hex: String = digest.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
    for kind in KINDS {
        round_trip(options(&server, kind, Tls::fingerprint(&format!("sha256:{hex}")).expect("fingerprint")))
            .await;
        let client = refused_options(&server, kind, Tls::Fingerprint([0; 32])).build().expect("options");
        let error = client.open().await.expect_err("another fingerprint");
        assert_eq!(error.transport_kind(), Some(&TransportErrorKind::Tls), "{kind}: {error:?}");
    }
}

#[tokio::test]
async fn a_caller_supplied_rustls_config_is_used_as_is() {
    let pki = pki();
    let server = tls_faye(&pki).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).expect("add the test CA");
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    for kind in KINDS {
        round_trip(options(&server, kind, Tls::Config(Arc::new(config.clone())))).await;
    }
}
