//! Through a real HTTP proxy (tinyproxy, with Basic authentication): both transports of
//! the client (long-polling as proxied requests, websocket through a `CONNECT` tunnel),
//! also as an `https://` proxy (stunnel taking TLS in front of tinyproxy), the bridge's
//! source `proxy` and the environment's `HTTP_PROXY`/`NO_PROXY` for sources and webhooks.
//! The proxy's own log shows what went through it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cometd_bridge::cometd::{Client, ConnectionType, Error, Proxy, Tls, TransportErrorKind};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::peer::{WAIT, open};
use crate::support::scenario::publish_paced;
use crate::support::stunnel::Stunnel;
use crate::support::tinyproxy::{PASSWORD, TinyProxy, USER};
use crate::support::webhook::WebhookReceiver;

fn faye_port(faye: &BayeuxServer) -> u16 {
    reqwest::Url::parse(&faye.url()).expect("faye's URL").port().expect("a port")
}

/// How the proxy logs a transport's way to faye.
fn through_proxy(kind: ConnectionType, port: u16) -> String {
    match kind {
        ConnectionType::WebSocket => format!("CONNECT 127.0.0.1:{port} HTTP/1.1"),
        ConnectionType::LongPolling => format!("POST http://127.0.0.1:{port}/"),
    }
}

#[tokio::test]
async fn both_transports_reach_the_server_through_an_authenticating_proxy() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let proxy = TinyProxy::start().await;
    for kind in [ConnectionType::WebSocket, ConnectionType::LongPolling] {
        let client =
            open(Client::builder(faye.url()).connection_types([kind]).proxy(Proxy::Url(proxy.url()))).await;
        assert_eq!(client.connection_type(), Some(kind));
        client.subscribe("/proxied").await.expect("subscribe");
        client.publish("/proxied", json!({ "through": kind.as_str() })).await.expect("publish");
        let message =
            tokio::time::timeout(WAIT, client.receive()).await.expect("a message").expect("received");
        assert_eq!(message.data.expect("data").value()["through"], kind.as_str());
        client.close().await;
        let expected = through_proxy(kind, faye_port(&faye));
        let requests = proxy.requests();
        assert!(
            requests.iter().any(|request| request.starts_with(&expected)),
            "{kind}: {expected} in {requests:#?}"
        );
    }
}

/// tinyproxy closes the connection after each forwarded answer without saying so: a
/// long-polling client that reused such a connection failed a request now and then (the
/// first publish after a subscribe, about once in ten). Every one goes through.
#[tokio::test]
async fn long_polling_requests_through_a_proxy_that_closes_each_connection_all_succeed() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let proxy = TinyProxy::start().await;
    for n in 0..40 {
        let client = open(
            Client::builder(faye.url())
                .connection_types([ConnectionType::LongPolling])
                .proxy(Proxy::Url(proxy.url())),
        )
        .await;
        client.subscribe("/proxied/series").await.unwrap_or_else(|error| panic!("subscribe {n}: {error:?}"));
        let published = client.publish("/proxied/series", json!(n)).await;
        published.unwrap_or_else(|error| panic!("publish {n}: {error:?}"));
        client.close().await;
    }
}

#[tokio::test]
async fn wrong_proxy_credentials_fail_open_with_a_clear_error() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let proxy = TinyProxy::start().await;
    let client = Client::builder(faye.url())
        .connection_types([ConnectionType::WebSocket])
        .proxy(Proxy::Url(proxy.url_with_wrong_password()))
        .connection_timeout(Some(std::time::Duration::from_secs(1)))
        .build()
        .expect("options");
    let error = tokio::time::timeout(WAIT, client.open()).await.expect("open gives up").expect_err("refused");
    let text = cometd_bridge::telemetry::error_chain(&error);
    assert!(text.contains("requires authentication"), "{text}");
    assert!(!text.contains("wrong"), "the password never shows: {text}");
}

/// The daemon as a user runs it with `HTTP_PROXY` set: its source (websocket) and its
/// webhook go through the proxy; a host in `NO_PROXY` does not.
#[tokio::test]
async fn the_daemon_follows_the_environments_proxy_and_no_proxy() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let proxy = TinyProxy::start().await;
    let mut proxied = WebhookReceiver::start([]).await;
    let mut direct = WebhookReceiver::start([]).await;
    let state = tempfile::tempdir().expect("state");
    let file = state.path().join("config.toml");
    let direct_url = direct.url().replace("127.0.0.1", "localhost");
    std::fs::write(
        &file,
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[state]\npath = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\nconnection_types = [\"websocket\"]\n\
             [[subscriptions]]\nid = \"proxied\"\nsource = \"demo\"\nchannel = \"/env\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n\
             [[subscriptions]]\nid = \"direct\"\nsource = \"demo\"\nchannel = \"/env\"\nsink = {{ type = \"webhook\", url = \"{direct_url}\" }}\n",
            state.path().display(),
            faye.url(),
            proxied.url(),
        ),
    )
    .expect("write config");
    let proxy_url = proxy.url();
    let env = [("HTTP_PROXY", proxy_url.as_str()), ("NO_PROXY", "localhost"), ("RUST_LOG", "info")];
    let mut daemon = Daemon::start_with_env(&file, &env).await;
    daemon.wait_for_log("subscribed").await;
    publish_paced(faye.url(), "/env", 0..1, 100).await;
    assert_eq!(proxied.next().await.status, 200);
    assert_eq!(direct.next().await.status, 200);
    let requests = proxy.requests();
    let port = |url: &str| reqwest::Url::parse(url).expect("URL").port().expect("port");
    let seen = |expected: String| requests.iter().any(|request| request.starts_with(&expected));
    assert!(seen(through_proxy(ConnectionType::WebSocket, faye_port(&faye))), "the source: {requests:#?}");
    assert!(seen(format!("POST http://127.0.0.1:{}/", port(&proxied.url()))), "the webhook: {requests:#?}");
    assert!(!requests.iter().any(|request| request.contains("localhost")), "NO_PROXY: {requests:#?}");
}

/// A source's own `proxy` in the configuration.
#[tokio::test]
async fn a_sources_proxy_setting_is_used() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let proxy = TinyProxy::start().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = crate::support::app::TestApp::spawn(&format!(
        "[[sources]]\nname = \"demo\"\nurl = \"{}\"\nconnection_types = [\"long-polling\"]\nproxy = \"{}\"\n{}",
        faye.url(),
        proxy.url(),
        crate::support::scenario::webhook("hook", "/configured", &receiver.url())
    ))
    .await;
    app.wait_ready().await;
    publish_paced(faye.url(), "/configured", 0..1, 100).await;
    assert_eq!(receiver.next().await.status, 200);
    let expected = through_proxy(ConnectionType::LongPolling, faye_port(&faye));
    let requests = proxy.requests();
    assert!(requests.iter().any(|request| request.starts_with(&expected)), "{requests:#?}");
    let (_, sources) = app.call("GET", "/api/v1/sources", None).await;
    assert!(!sources.to_string().contains(PASSWORD), "{sources}");
    app.stop().await;
}

/// A test CA's certificate for `localhost` and `127.0.0.1` (stunnel's and faye's), and TLS
/// options that trust that CA only.
struct Pki {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    tls: Tls,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, leaf.pem()).expect("write cert");
    std::fs::write(&key, leaf_key.serialize_pem()).expect("write key");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("add the test CA");
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Pki { _dir: dir, cert, key, tls: Tls::Config(Arc::new(config)) }
}

/// tinyproxy behind stunnel: an `https://` proxy.
async fn https_proxy(pki: &Pki) -> (TinyProxy, Stunnel) {
    let proxy = TinyProxy::start().await;
    let front = Stunnel::start(proxy.port, &pki.cert, &pki.key).await;
    (proxy, front)
}

/// Both transports to `http://` and to `https://` faye through an `https://` proxy: TLS
/// with the proxy (checked with the client's TLS option), the credentials inside it, then
/// the request or the tunnel (and the server's own TLS inside that). A client that spoke
/// plain HTTP to the proxy would never get past stunnel, so tinyproxy's log showing the
/// request means TLS.
#[tokio::test]
async fn both_transports_reach_the_server_through_an_https_proxy() {
    let pki = pki();
    let (proxy, front) = https_proxy(&pki).await;
    let plain = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let secure = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        tls: Some((pki.cert.clone(), pki.key.clone())),
        ..FayeOptions::default()
    })
    .await;
    let proxy_url = format!("https://{USER}:{PASSWORD}@127.0.0.1:{}", front.port);
    for kind in [ConnectionType::WebSocket, ConnectionType::LongPolling] {
        for server in [&plain, &secure] {
            let before = proxy.requests().len();
            let client = open(
                Client::builder(server.url())
                    .connection_types([kind])
                    .tls(pki.tls.clone())
                    .proxy(Proxy::Url(proxy_url.clone())),
            )
            .await;
            client.subscribe("/proxied").await.expect("subscribe");
            client.publish("/proxied", json!({ "to": server.url() })).await.expect("publish");
            let message =
                tokio::time::timeout(WAIT, client.receive()).await.expect("a message").expect("received");
            assert_eq!(message.data.expect("data").value()["to"], server.url());
            client.close().await;
            let port = faye_port(server);
            let expected = match (kind, server.url().starts_with("https")) {
                (ConnectionType::LongPolling, false) => format!("POST http://127.0.0.1:{port}/"),
                (_, false) => format!("CONNECT 127.0.0.1:{port} HTTP/1.1"),
                (_, true) => format!("CONNECT localhost:{port} HTTP/1.1"),
            };
            // What this client sent, not an earlier one.
            let requests = proxy.requests().split_off(before);
            assert!(
                requests.iter().any(|request| request.starts_with(&expected)),
                "{kind}: {expected} in {requests:#?}"
            );
        }
    }
}

/// The proxy's certificate is checked like the server's: one the client's TLS option does
/// not trust fails with a TLS error, and wrong credentials through the TLS session fail
/// with the proxy's answer, the password never shown.
#[tokio::test]
async fn an_https_proxy_is_checked_and_its_credentials_stay_secret() {
    let pki = pki();
    let (_proxy, front) = https_proxy(&pki).await;
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let attempt = |tls: Tls, password: &str| {
        Client::builder(faye.url())
            .connection_types([ConnectionType::WebSocket])
            .tls(tls)
            .proxy(Proxy::Url(format!("https://{USER}:{password}@127.0.0.1:{}", front.port)))
            .connection_timeout(Some(Duration::from_secs(2)))
            .build()
            .expect("options")
    };
    let untrusted = attempt(Tls::Verify, PASSWORD);
    let error =
        tokio::time::timeout(WAIT, untrusted.open()).await.expect("open gives up").expect_err("untrusted");
    assert_eq!(error.transport_kind(), Some(&TransportErrorKind::Tls), "{error:?}");
    let text = cometd_bridge::telemetry::error_chain(&error);
    assert!(text.contains(&format!("proxy https://127.0.0.1:{}", front.port)), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
    let wrong = attempt(pki.tls.clone(), "not-the-password");
    let error = tokio::time::timeout(WAIT, wrong.open()).await.expect("open gives up").expect_err("refused");
    let text = cometd_bridge::telemetry::error_chain(&error);
    assert!(text.contains("requires authentication"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
}

/// A proxy scheme the client does not speak: refused when configured, with the schemes it
/// does speak; from the environment (`HTTP_PROXY=socks5://...`), `listen` stops at once
/// with that error on either transport, instead of retrying for its whole connection
/// timeout.
#[tokio::test]
async fn a_proxy_scheme_the_client_does_not_speak_is_refused_naming_the_supported_ones() {
    let configured = Client::builder("http://127.0.0.1:1/bayeux")
        .proxy(Proxy::Url("socks5://user:socks-secret@127.0.0.1:1080".into()))
        .build()
        .expect_err("refused");
    assert!(matches!(configured, Error::InvalidOptions(_)), "{configured:?}");
    let text = configured.to_string();
    assert!(text.contains("socks5://") && text.contains("http://") && text.contains("https://"), "{text}");
    assert!(!text.contains("socks-secret"), "{text}");

    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let socks = crate::support::process::free_port();
    for transport in ["websocket", "long-polling"] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
            .args(["listen", &faye.url(), "/x", "--transport", transport, "--connection-timeout", "60s"])
            .env("HTTP_PROXY", format!("socks5://user:socks-secret@127.0.0.1:{socks}"))
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .kill_on_drop(true)
            .output();
        let output =
            tokio::time::timeout(WAIT, output).await.expect("listen stops at once").expect("run listen");
        assert_eq!(output.status.code(), Some(1), "{transport}");
        let stderr = String::from_utf8(output.stderr).expect("UTF-8");
        let expected = format!(
            "proxy socks5://127.0.0.1:{socks}: the socks5:// scheme is not supported; use an http:// or https:// proxy"
        );
        assert!(stderr.contains(&expected), "{transport}: {stderr}");
        assert!(!stderr.contains("socks-secret"), "{transport}: {stderr}");
    }
}
