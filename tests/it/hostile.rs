//! Bad input and bad actors on the API and in the configuration: secret references and
//! private webhook destinations posted by a caller are refused (never contacted), a subject
//! template cannot write into NATS' own `$` subjects, an API reachable from outside needs
//! a token, and dead letters come a page at a time.

use serde_json::{Value, json};
use tokio::process::Command;

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::peer::open;
use crate::support::webhook::WebhookReceiver;

async fn faye() -> BayeuxServer {
    BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await
}

fn source(faye: &BayeuxServer) -> String {
    format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", faye.url())
}

/// A webhook subscription body on a channel nobody publishes to.
fn webhook(id: &str, url: &str, secret: Option<&str>) -> Value {
    let mut sink = json!({ "type": "webhook", "url": url });
    if let Some(secret) = secret {
        sink["secret"] = json!(secret);
    }
    json!({ "id": id, "source": "demo", "channel": "/nobody/publishes/here", "sink": sink })
}

#[tokio::test]
async fn posted_subscriptions_may_not_reference_secrets_or_target_private_addresses() {
    let faye = faye().await;
    // The default: private destinations refused (the harness allows them elsewhere).
    let app = TestApp::spawn_with_admin(&source(&faye), "").await;
    for secret in ["env:HOME", "file:/dev/zero", "file:/etc/passwd"] {
        let (status, answer) = app
            .call(
                "POST",
                "/api/v1/subscriptions",
                Some(webhook("s", "https://hooks.example.com/x", Some(secret))),
            )
            .await;
        assert_eq!(
            (status, answer["error"].clone()),
            (400, json!("invalid_subscription")),
            "{secret}: {answer}"
        );
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("sink.secret") && message.contains("not accepted through the API"),
            "{message}"
        );
        assert!(!message.contains("root"), "nothing of the file comes back: {message}");
    }
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]:9/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://172.16.5.4/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://0.0.0.0/hook",
    ] {
        let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(webhook("p", url, None))).await;
        assert_eq!(
            (status, answer["error"].clone()),
            (400, json!("forbidden_destination")),
            "{url}: {answer}"
        );
    }
    let (_, listed) = app.call("GET", "/api/v1/subscriptions", None).await;
    assert_eq!(listed, json!([]), "nothing was stored");
    app.stop().await;
}

#[tokio::test]
async fn private_webhooks_can_be_allowed() {
    let faye = faye().await;
    let receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn_with_admin(&source(&faye), "allow_private_webhooks = true\n").await;
    let body = webhook("local", &receiver.url(), Some("inline-secret"));
    let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(body)).await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["sink"]["secret"], "***");
    let (status, _) = app.call("DELETE", "/api/v1/subscriptions/local", None).await;
    assert_eq!(status, 204);
    app.stop().await;
}

#[tokio::test]
async fn subject_templates_may_not_start_with_a_dollar() {
    let faye = faye().await;
    let nats = crate::support::nats::NatsServer::start().await;
    let app = TestApp::spawn(&format!("[nats]\nurl = \"{}\"\n{}", nats.url(), source(&faye))).await;
    for subject in ["$KV.cometd-bridge-subscriptions.x", "$JS.API.STREAM.DELETE.X", "${channel}"] {
        let body = json!({ "id": "kv", "source": "demo", "channel": "/x", "sink": { "type": "nats", "subject": subject } });
        let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(body)).await;
        assert_eq!(status, 400, "{subject}: {answer}");
        assert!(answer["message"].as_str().unwrap_or_default().contains("sink.subject"), "{answer}");
    }
    app.stop().await;
}

async fn check(toml: &str) -> (Option<i32>, String) {
    check_file("config.toml", toml.as_bytes()).await
}

/// `check --config` on a file named `name` holding `contents`: its exit code and stderr.
async fn check_file(name: &str, contents: &[u8]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(name);
    std::fs::write(&file, contents).expect("write config");
    let output = Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
        .args(["check", "--config"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run check");
    (output.status.code(), String::from_utf8(output.stderr).expect("UTF-8"))
}

/// `run` refuses an API other machines can reach without a token (exit 2, before binding
/// anything); `check` says so as a warning, since the token may come from the environment
/// `run` gets.
#[tokio::test]
async fn an_api_reachable_from_outside_needs_a_token() {
    let unprotected = "[admin]\nlisten = \"0.0.0.0:8080\"\n";
    let (code, errors) = check(unprotected).await;
    assert_eq!(code, Some(0), "{errors}");
    let required = "admin.token: required when admin.listen (0.0.0.0:8080) is not a loopback address";
    assert!(errors.contains(&format!("warning: {required}")), "{errors}");

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, format!("{unprotected}[state]\npath = \"{}\"\n", dir.path().display()))
        .expect("write");
    let run = tokio::time::timeout(
        crate::support::peer::WAIT,
        Command::new(env!("CARGO_BIN_EXE_cometd-bridge"))
            .args(["run", "--config"])
            .arg(&file)
            .env_remove("RUST_LOG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run exits at once")
    .expect("run");
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains(required), "{run:?}");

    for fine in [
        "[admin]\nlisten = \"0.0.0.0:8080\"\ntoken = \"s3cret\"\n",
        "[admin]\nlisten = \"0.0.0.0:8080\"\nallow_unauthenticated = true\n",
        "[admin]\nlisten = \"127.0.0.1:8080\"\n",
        "[admin]\nlisten = \"[::1]:8080\"\n",
    ] {
        let (code, errors) = check(fine).await;
        assert_eq!(code, Some(0), "{fine}: {errors}");
        assert!(!errors.contains("warning"), "{fine}: {errors}");
    }
}

#[tokio::test]
async fn dead_letters_come_a_page_at_a_time() {
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([400, 400, 400]).await;
    let app = TestApp::spawn(&format!(
        "{}[[subscriptions]]\nid = \"hook\"\nsource = \"demo\"\nchannel = \"/paged\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        source(&faye),
        receiver.url()
    ))
    .await;
    app.wait_ready().await;
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in 0..3 {
        publisher.publish("/paged", json!(n)).await.expect("publish");
        assert_eq!(receiver.next().await.status, 400);
    }
    app.wait_for_dead_letters(3).await;
    let (status, first) = app.call("GET", "/api/v1/dead-letters?limit=2", None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["dead_letters"].as_array().map(Vec::len), Some(2));
    let next = first["next"].as_str().expect("a next page").to_string();
    assert_eq!(first["dead_letters"][1]["id"], next.as_str());
    let (_, second) = app.call("GET", &format!("/api/v1/dead-letters?limit=2&after={next}"), None).await;
    assert_eq!(second["dead_letters"].as_array().map(Vec::len), Some(1), "{second}");
    assert_eq!(second["next"], Value::Null);
    let mut ids: Vec<Value> = first["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["dead_letters"].as_array().unwrap())
        .map(|letter| letter["id"].clone())
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 3, "every dead letter once over the pages");
    for bad in ["limit=0", "limit=1001", "limit=many"] {
        let (status, answer) = app.call("GET", &format!("/api/v1/dead-letters?{bad}"), None).await;
        assert_eq!((status, answer["error"].clone()), (400, json!("invalid_query")), "{bad}: {answer}");
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_keys_in_a_posted_subscription_are_named() {
    let faye = faye().await;
    let app = TestApp::spawn(&source(&faye)).await;
    let mut body = webhook("u", "https://hooks.example.com/x", None);
    body["bogus"] = json!(1);
    body["retry"] = json!({ "max_elapsed": "1h", "tries": 3 });
    let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(body)).await;
    assert_eq!((status, answer["error"].clone()), (400, json!("invalid_subscription")), "{answer}");
    let message = answer["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("bogus: unknown key") && message.contains("retry.tries: unknown key"),
        "{message}"
    );
    app.stop().await;
}

/// A YAML configuration whose aliases nest ("billion laughs": nine short lines that the
/// loader would copy into gigabytes) is refused by `check` at once, with a problem that
/// says why.
#[tokio::test]
async fn a_yaml_file_whose_aliases_explode_is_refused() {
    let corpus =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/config/yaml-billion-laughs"))
            .expect("the fuzz corpus entry");
    let (format, yaml) = corpus.split_first().expect("not empty");
    assert_eq!(*format, b'Y', "the entry is YAML");
    let (code, errors) = check_file("config.yaml", yaml).await;
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("YAML aliases expand this file to more than 100000 values"), "{errors}");
}

/// A configuration that names a file without end (`/dev/zero`) as a secret gets a problem
/// naming the key and the path, at once, instead of a read that never ends.
#[tokio::test]
async fn a_secret_file_without_end_is_a_problem() {
    let (code, errors) = check("[nats]\nurl = \"nats://127.0.0.1:4222\"\ntoken = \"file:/dev/zero\"\n").await;
    assert_eq!(code, Some(2), "{errors}");
    assert!(errors.contains("nats.token"), "{errors}");
    assert!(errors.contains("/dev/zero: larger than 1048576 bytes"), "{errors}");
}
