//! Through a real HTTP proxy (tinyproxy, with Basic authentication): both transports of
//! the client (long-polling as proxied requests, websocket through a `CONNECT` tunnel),
//! the bridge's source `proxy` and the environment's `HTTP_PROXY`/`NO_PROXY` for sources
//! and webhooks. The proxy's own log shows what went through it.

use cometd_bridge::cometd::{Client, ConnectionType, Proxy};
use serde_json::json;

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::daemon::Daemon;
use crate::support::peer::{WAIT, open};
use crate::support::scenario::publish_paced;
use crate::support::tinyproxy::TinyProxy;
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
    assert!(!sources.to_string().contains(crate::support::tinyproxy::PASSWORD), "{sources}");
    app.stop().await;
}
