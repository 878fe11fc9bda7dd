//! The replay extension and Salesforce auth against faye with the Salesforce-like test
//! fixture (`tests/peers/extensions/salesforce.js`: numbered events, a retention window,
//! `ext.replay` on subscribe, `403::Unknown client` on demand, an OAuth token endpoint).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use cometd_bridge::cometd::{
    Client, ClientOptions, ConnectionType, Data, FallbackApplied, ReplayExtension, ReplayFallback,
    ReplayPosition, SalesforceAuth, SalesforceCredentials, SalesforceFlow, replay_id,
};
use serde_json::{Value, json};

use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::{next, open};

async fn salesforce_like(options: Value) -> BayeuxServer {
    BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("salesforce".into(), options)],
        ..FayeOptions::default()
    })
    .await
}

/// Publishes events carrying the `numbers` on `channel`.
async fn publish(server: &BayeuxServer, channel: &str, numbers: std::ops::Range<u64>) {
    let publisher = open(Client::builder(server.url())).await;
    for n in numbers {
        publisher.publish(channel, json!({ "n": n })).await.expect("publish");
    }
}

fn replaying(server: &BayeuxServer, extension: ReplayExtension) -> ClientOptions {
    Client::builder(server.url()).connection_types([ConnectionType::LongPolling]).extension(extension)
}

/// The numbers carried by `count` received events, with their replay ids.
async fn receive(client: &Client, count: usize) -> Vec<(u64, i64)> {
    let mut received = Vec::new();
    for _ in 0..count {
        let message = next(client).await.expect("an event");
        let id = replay_id(&message).expect("a replay id");
        let n =
            message.data.as_ref().and_then(|data| data.value()["payload"]["n"].as_u64()).expect("a number");
        received.push((n, id));
    }
    received
}

#[tokio::test]
async fn positions_replay_what_the_server_retained() {
    let server = salesforce_like(json!({})).await;
    publish(&server, "/event/Order__e", 0..5).await;

    let all =
        open(replaying(&server, ReplayExtension::new(|_: &str| ReplayPosition::All, ReplayFallback::Fail)))
            .await;
    all.subscribe("/event/Order__e").await.expect("subscribe from all");
    let replayed = receive(&all, 5).await;
    assert_eq!(replayed.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    let ids: Vec<i64> = replayed.iter().map(|(_, id)| *id).collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "increasing replay ids: {ids:?}");

    let after = ids[2];
    let later = open(replaying(
        &server,
        ReplayExtension::new(move |_: &str| ReplayPosition::After(after), ReplayFallback::Fail),
    ))
    .await;
    later.subscribe("/event/Order__e").await.expect("subscribe after an id");
    assert_eq!(receive(&later, 2).await.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [3, 4]);

    let new =
        open(replaying(&server, ReplayExtension::new(|_: &str| ReplayPosition::New, ReplayFallback::Fail)))
            .await;
    new.subscribe("/event/Order__e").await.expect("subscribe from new");
    publish(&server, "/event/Order__e", 5..6).await;
    assert_eq!(receive(&new, 1).await[0].0, 5, "only what was published after subscribing");
}

#[tokio::test]
async fn an_expired_position_falls_back_and_is_reported_or_fails() {
    let server = salesforce_like(json!({ "retention": 3 })).await;
    publish(&server, "/event/Old__e", 0..6).await;

    let reports: Arc<Mutex<Vec<FallbackApplied>>> = Arc::default();
    let seen = reports.clone();
    let extension = ReplayExtension::new(|_: &str| ReplayPosition::After(1), ReplayFallback::All)
        .on_fallback(move |applied| seen.lock().expect("lock").push(applied.clone()));
    let client = open(replaying(&server, extension)).await;
    client.subscribe("/event/Old__e").await.expect("the fallback subscription succeeds");
    assert_eq!(
        receive(&client, 3).await.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [3, 4, 5],
        "all retained"
    );
    let reports = reports.lock().expect("lock").clone();
    assert_eq!(reports.len(), 1, "reported once: {reports:?}");
    assert_eq!((reports[0].refused, reports[0].fallback), (Some(1), ReplayPosition::All));
    assert!(
        reports[0].error.starts_with("400::The replayId {1} you provided was invalid"),
        "{}",
        reports[0].error
    );

    let strict = open(replaying(
        &server,
        ReplayExtension::new(|_: &str| ReplayPosition::After(1), ReplayFallback::Fail),
    ))
    .await;
    let error = strict.subscribe("/event/Old__e").await.expect_err("no fallback");
    assert_eq!(error.as_server_error().and_then(|e| e.error_code()), Some(400), "{error}");
}

/// The server forgets the session (`403::Unknown client`); the client handshakes again and
/// resubscribes from the positions it committed, so nothing published meanwhile is lost.
#[tokio::test]
async fn an_unknown_client_resumes_from_the_committed_positions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trigger = dir.path().join("forget");
    let server = salesforce_like(json!({ "unknownClientFile": trigger })).await;
    let committed: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let positions = committed.clone();
    let extension = ReplayExtension::new(
        move |channel: &str| {
            positions
                .lock()
                .expect("lock")
                .get(channel)
                .map_or(ReplayPosition::New, |id| ReplayPosition::After(*id))
        },
        ReplayFallback::Fail,
    );
    let client = open(replaying(&server, extension)).await;
    client.subscribe("/event/Gap__e").await.expect("subscribe");
    let first_session = client.status().client_id;
    let mut seen = BTreeSet::new();
    publish(&server, "/event/Gap__e", 0..3).await;
    for (n, id) in receive(&client, 3).await {
        seen.insert(n);
        committed.lock().expect("lock").insert("/event/Gap__e".into(), id);
    }
    std::fs::write(&trigger, "").expect("arm the fixture");
    publish(&server, "/event/Gap__e", 3..10).await;
    while seen.len() < 10 {
        let (n, id) = receive(&client, 1).await[0];
        seen.insert(n);
        committed.lock().expect("lock").insert("/event/Gap__e".into(), id);
    }
    assert_eq!(seen, (0..10).collect::<BTreeSet<_>>(), "no event lost");
    assert!(!trigger.exists(), "the fixture forgot the session");
    assert_ne!(client.status().client_id, first_session, "a new handshake");
}

fn oauth(dir: &std::path::Path) -> Value {
    json!({
        "tokenFile": dir.join("token"),
        "clientId": "app",
        "clientSecret": "app-secret",
        "username": "user@example.com",
        "password": "pa ss&word",
        "refreshToken": "refresh",
        "jwtKeyOut": dir.join("jwt.pem"),
    })
}

#[tokio::test]
async fn every_oauth_flow_gets_a_token_that_the_server_accepts_and_renews_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "first").expect("token");
    let server = BayeuxServer::faye(FayeOptions {
        timeout: Some(2),
        extensions: vec![("token-auth".into(), json!({ "tokenFile": token_file }))],
        oauth: Some(oauth(dir.path())),
        ..FayeOptions::default()
    })
    .await;
    let login = server.url().replace("/bayeux", "");
    let key = std::fs::read_to_string(dir.path().join("jwt.pem")).expect("the fixture wrote its key");
    let flows = [
        (
            "password",
            Some("app-secret"),
            SalesforceFlow::Password { username: "user@example.com".into(), password: "pa ss&word".into() },
        ),
        (
            "refresh token",
            Some("app-secret"),
            SalesforceFlow::RefreshToken { refresh_token: "refresh".into() },
        ),
        ("client credentials", Some("app-secret"), SalesforceFlow::ClientCredentials),
        (
            "JWT bearer",
            None,
            SalesforceFlow::JwtBearer { username: "user@example.com".into(), private_key_pem: key },
        ),
    ];
    for (name, secret, flow) in flows {
        std::fs::write(&token_file, format!("{name}-1")).expect("token");
        let auth = SalesforceAuth::new(SalesforceCredentials {
            login_url: login.clone(),
            client_id: "app".into(),
            client_secret: secret.map(str::to_owned),
            flow,
        })
        .expect("credentials");
        let token = auth.login().await.unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(token.access_token, format!("{name}-1"));
        let url = SalesforceAuth::cometd_url(&token.instance_url, "62.0").replace("/cometd/62.0", "/bayeux");
        let client =
            open(Client::builder(url).connection_types([ConnectionType::LongPolling]).auth(auth)).await;
        client.subscribe("/event/Auth__e").await.unwrap_or_else(|error| panic!("{name}: {error}"));

        // The token expires: the next request is refused, the client logs in again.
        std::fs::write(&token_file, format!("{name}-2")).expect("rotate");
        client
            .publish("/event/Auth__e", json!({ "n": 1 }))
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(
            next(&client).await.expect("delivery continues").data.map(Data::into_value),
            Some(json!({ "n": 1 })),
            "{name}"
        );
        client.close().await;
    }

    let refused = SalesforceAuth::new(SalesforceCredentials {
        login_url: login,
        client_id: "app".into(),
        client_secret: Some("wrong".into()),
        flow: SalesforceFlow::ClientCredentials,
    })
    .expect("credentials");
    let error = refused.login().await.expect_err("wrong secret");
    assert!(error.to_string().contains("invalid_grant: authentication failure"), "{error}");
}
