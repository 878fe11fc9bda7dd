//! Dead letters, third release: retried with the bytes of the first attempt (one at a
//! time and in bulk), bulk retry and discard by filter, bounded by
//! `state.dead_letters_max_bytes` with counted eviction, and one delivery for two
//! concurrent retries of one dead letter.

use cometd_bridge::store::Spools;
use std::time::{Duration, Instant};

use cometd_bridge::store::{DeadLetter, EmbeddedStore, Settlement, Store};
use serde_json::{Value, json};

use crate::support::app::TestApp;
use crate::support::fake::{Behaviour, FakeServer};
use crate::support::scenario::{faye, source, webhook};
use crate::support::webhook::{Received, WebhookReceiver};

/// The data of `request`'s body as its exact text (the body is the bridge's: `"data":`
/// then the data, then `,"ext":`), without parsing it.
fn data_text(request: &Received) -> String {
    let body = std::str::from_utf8(&request.body).expect("UTF-8");
    let start = body.find(r#""data":"#).expect("a data key") + r#""data":"#.len();
    let end = body.rfind(r#","ext":"#).expect("an ext key");
    body[start..end].to_string()
}

/// Big integers, key order and 200 levels of nesting: the first attempt (answered 400)
/// and the retries (by id, and in bulk) carry the data as the server sent it.
#[tokio::test]
async fn a_retried_dead_letter_is_delivered_byte_for_byte() {
    // JavaScript servers re-serialize data (12345678901234567890123 would change in faye
    // itself): the fake server sends the exact bytes.
    let server = FakeServer::start(Behaviour::Valid).await;
    let mut receiver = WebhookReceiver::start([400, 400]).await;
    let app = TestApp::spawn(&format!(
        "[[sources]]\nname = \"demo\"\nurl = \"{}\"\n{}",
        server.url(),
        webhook("raw", "/raw", &receiver.url())
    ))
    .await;
    app.wait_ready().await;
    let big = r#"{"n":12345678901234567890123,"b":1,"a":2}"#;
    let deep = format!("{}{big}{}", "[".repeat(199), "]".repeat(199));
    server.push_event(&format!(r#"{{"channel":"/raw","id":"big","data":{big}}}"#));
    server.push_event(&format!(r#"{{"channel":"/raw","id":"deep","data":{deep}}}"#));
    let first = receiver.next().await;
    let second = receiver.next().await;
    assert_eq!((first.status, second.status), (400, 400));
    assert_eq!(data_text(&first), big, "the first attempt carries the data as sent");
    assert_eq!(data_text(&second), deep);

    let letters = app.wait_for_dead_letters(2).await;
    // Listed with `message` as a value (too deep for one: as its text), without the record.
    let listed: Vec<&Value> = letters.as_array().expect("letters").iter().collect();
    let big_letter = listed.iter().find(|letter| letter["message"]["id"] == "big").expect("big");
    assert_eq!(big_letter["message"]["data"]["b"], 1);
    assert!(big_letter.get("record").is_none(), "{big_letter}");
    let deep_letter = listed.iter().find(|letter| letter["message"]["id"] == "deep").expect("deep");
    assert_eq!(deep_letter["message"]["data"], Value::String(deep.clone()));

    let id = big_letter["id"].as_str().expect("id");
    let (status, answer) = app.call("POST", &format!("/api/v1/dead-letters/{id}/retry"), None).await;
    assert_eq!(status, 202, "{answer}");
    let retried = receiver.next().await;
    assert_eq!((retried.status, data_text(&retried)), (200, big.to_string()));
    assert_eq!(retried.header("webhook-id"), first.header("webhook-id"));
    assert_eq!(retried.body, first.body, "the whole body as the first attempt's");

    let (status, answer) =
        app.call("POST", "/api/v1/dead-letters/retry", Some(json!({"subscription": "raw"}))).await;
    assert_eq!((status, answer), (200, json!({"count": 1})));
    let retried = receiver.next().await;
    assert_eq!((retried.status, data_text(&retried)), (200, deep));
    assert_eq!(retried.body, second.body);
    app.stop().await;
}

/// The NATS sink publishes the data as it came too (checked beside the webhook's: the
/// same bytes a retry would send).
#[tokio::test]
async fn a_nats_sink_publishes_the_data_byte_for_byte() {
    use futures_util::StreamExt;
    let server = FakeServer::start(Behaviour::Valid).await;
    let nats = crate::support::nats::NatsServer::start().await;
    let app = TestApp::spawn(&format!(
        "[nats]\nurl = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n[[subscriptions]]\nid = \"raw\"\nsource = \"demo\"\nchannel = \"/raw\"\nsink = {{ type = \"nats\", subject = \"raw\" }}\n",
        nats.url(),
        server.url()
    ))
    .await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut subscriber = client.subscribe("raw").await.expect("subscribe");
    client.flush().await.expect("flush");
    app.wait_ready().await;
    let big = r#"{"n":12345678901234567890123,"b":1,"a":2}"#;
    let deep = format!("{}{big}{}", "[".repeat(199), "]".repeat(199));
    for data in [big, deep.as_str()] {
        server.push_event(&format!(r#"{{"channel":"/raw","data":{data}}}"#));
        let message = tokio::time::timeout(crate::support::peer::WAIT, subscriber.next())
            .await
            .expect("a NATS message within the wait")
            .expect("subscribed");
        assert_eq!(std::str::from_utf8(&message.payload).expect("UTF-8"), data);
    }
    app.stop().await;
}

/// A spooled record as the bridge writes it, for subscription `subscription` of source
/// `demo` on channel `channel`.
fn record(subscription: &str, channel: &str, sequence: u64) -> String {
    format!(
        r#"{{"source":"demo","subscription":"{subscription}","session":"s1","sequence":{sequence},"received_at_ms":1767225600000,"message":{{"channel":"{channel}","data":{{"n":{sequence}}}}}}}"#
    )
}

/// A dead letter such as the forwarder stores, with its record.
fn letter(subscription: &str, channel: &str, sequence: u64, reason: &str, failed_at: &str) -> DeadLetter {
    DeadLetter {
        id: format!("demo.{subscription}.s1.{sequence}"),
        subscription: subscription.into(),
        source: "demo".into(),
        session: "s1".into(),
        sequence,
        replay_id: None,
        message: json!({"source": "demo", "subscription": subscription, "channel": channel, "id": null, "data": {"n": sequence}, "ext": null}),
        reason: reason.into(),
        attempts: 1,
        failed_at: failed_at.into(),
        record: Some(record(subscription, channel, sequence)),
    }
}

/// A state directory holding `letters`, written in one transaction (the daemon holds
/// the database open once it runs).
async fn state_with(letters: Vec<DeadLetter>) -> tempfile::TempDir {
    let state = tempfile::tempdir().expect("state");
    let store = EmbeddedStore::open(state.path()).expect("open");
    store
        .spool_settle(Settlement {
            subscription: "seed".into(),
            through: 0,
            positions: None,
            dead_letters: letters,
        })
        .await
        .expect("stored");
    store.sync().await.expect("synced");
    state
}

/// Collects `count` delivered numbers, then publishes a marker on `channel` and waits for
/// it: whatever else arrived by then (a second delivery) is counted too.
async fn delivered_then_marker(
    receiver: &mut WebhookReceiver,
    faye_url: String,
    channel: &str,
    count: usize,
) -> std::collections::BTreeMap<u64, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..count {
        let request = receiver.next().await;
        assert_eq!(request.status, 200);
        *seen.entry(request.json()["data"]["n"].as_u64().expect("n")).or_insert(0) += 1;
    }
    let publisher = crate::support::peer::open(cometd_bridge::cometd::Client::builder(faye_url)).await;
    publisher.publish(channel, json!({"marker": true})).await.expect("publish");
    loop {
        let request = receiver.next().await;
        if request.json()["data"]["marker"] == true {
            break;
        }
        *seen.entry(request.json()["data"]["n"].as_u64().expect("n")).or_insert(0) += 1;
    }
    publisher.close().await;
    seen
}

/// 10,000 dead letters of one subscription: one call requeues them all, each is
/// delivered once.
#[tokio::test]
async fn ten_thousand_dead_letters_are_retried_in_one_call() {
    const COUNT: u64 = 10_000;
    let letters = (0..COUNT)
        .map(|n| letter("bulk", "/bulk", n, "rejected: HTTP 401", "2026-01-01T00:00:00.000Z"))
        .collect();
    let state = state_with(letters).await;
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn_in(
        &format!("{}{}", source(&faye), webhook("bulk", "/bulk", &receiver.url())),
        state,
        None,
    )
    .await;
    app.wait_ready().await;
    let started = Instant::now();
    let (status, answer) =
        app.call("POST", "/api/v1/dead-letters/retry", Some(json!({"subscription": "bulk"}))).await;
    let call = started.elapsed();
    assert_eq!((status, answer), (200, json!({"count": COUNT})));
    let seen = delivered_then_marker(&mut receiver, faye.url(), "/bulk", COUNT as usize).await;
    println!(
        "bulk retry of {COUNT}: the call took {} ms, all delivered after {} ms",
        call.as_millis(),
        started.elapsed().as_millis()
    );
    assert_eq!(seen.len() as u64, COUNT);
    assert!(seen.values().all(|times| *times == 1), "each once");
    let (_, page) = app.call("GET", "/api/v1/dead-letters", None).await;
    assert_eq!(page["dead_letters"], json!([]));
    app.stop().await;
}

/// Two retries of one dead letter at once (and two bulk retries of many): each dead letter
/// is delivered once.
#[tokio::test]
async fn concurrent_retries_deliver_a_dead_letter_once() {
    let letters = (0..200)
        .map(|n| letter("twice", "/twice", n, "rejected: HTTP 400", "2026-01-01T00:00:00.000Z"))
        .collect();
    let state = state_with(letters).await;
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn_in(
        &format!("{}{}", source(&faye), webhook("twice", "/twice", &receiver.url())),
        state,
        None,
    )
    .await;
    app.wait_ready().await;
    let path = "/api/v1/dead-letters/demo.twice.s1.0/retry";
    let (one, other) = tokio::join!(app.call("POST", path, None), app.call("POST", path, None));
    let mut statuses = [one.0, other.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 404], "{one:?} {other:?}");
    let filter = Some(json!({"subscription": "twice"}));
    let (one, other) = tokio::join!(
        app.call("POST", "/api/v1/dead-letters/retry", filter.clone()),
        app.call("POST", "/api/v1/dead-letters/retry", filter.clone())
    );
    assert_eq!((one.0, other.0), (200, 200));
    let counts = one.1["count"].as_u64().expect("count") + other.1["count"].as_u64().expect("count");
    assert_eq!(counts, 199, "{one:?} {other:?}");
    let seen = delivered_then_marker(&mut receiver, faye.url(), "/twice", 200).await;
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|times| *times == 1), "{seen:?}");
    app.stop().await;
}

/// Discard by each field of the filter, alone and together; a retry skips (and does not
/// count) dead letters whose subscription is gone; bad filters are 400.
#[tokio::test]
async fn dead_letters_are_discarded_and_retried_by_filter() {
    let at = |minute: u32| format!("2026-01-01T00:{minute:02}:00.000Z");
    let mut letters = Vec::new();
    for n in 0..4 {
        letters.push(letter("a", "/a", n, "rejected: HTTP 400", &at(n as u32)));
        letters.push(letter("b", "/b", n, "rejected: HTTP 401", &at(n as u32)));
        letters.push(letter("gone", "/gone", n, "gave up after 3 attempts: HTTP 503", &at(n as u32)));
    }
    // One stored before dead letters kept their record.
    letters.push(DeadLetter { record: None, ..letter("a", "/a", 9, "rejected: HTTP 410", &at(9)) });
    let state = state_with(letters).await;
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let app = TestApp::spawn_in(
        &format!(
            "{}{}{}",
            source(&faye),
            webhook("a", "/a", &receiver.url()),
            webhook("b", "/b", &receiver.url())
        ),
        state,
        None,
    )
    .await;
    app.wait_ready().await;
    let discard = async |filter: Value| app.call("POST", "/api/v1/dead-letters/discard", Some(filter)).await;
    let remaining = async || {
        let (_, page) = app.call("GET", "/api/v1/dead-letters?limit=1000", None).await;
        let mut ids: Vec<String> = page["dead_letters"]
            .as_array()
            .expect("letters")
            .iter()
            .map(|letter| letter["id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        ids
    };
    for bad in
        [json!({"subscription": "a", "colour": "red"}), json!({"before": "yesterday"}), json!({"reason": 4})]
    {
        let (status, answer) = discard(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|message| !message.is_empty()), "{answer}");
    }
    let (status, answer) =
        app.call("POST", "/api/v1/dead-letters/retry", Some(json!({"colour": "red"}))).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(remaining().await.len(), 13, "a bad filter takes nothing");

    // The one without a record is retried rebuilt from its `message`.
    let (status, answer) =
        app.call("POST", "/api/v1/dead-letters/retry", Some(json!({"reason": "410"}))).await;
    assert_eq!((status, answer), (200, json!({"count": 1})));
    let retried = receiver.next().await;
    assert_eq!((retried.status, retried.json()["data"].clone()), (200, json!({"n": 9})));

    // Before 00:01 (with an offset): the three letters at 00:00.
    assert_eq!(discard(json!({"before": "2026-01-01T01:01:00+01:00"})).await, (200, json!({"count": 3})));
    // The reason, as a substring: b's three left.
    assert_eq!(discard(json!({"reason": "HTTP 401"})).await, (200, json!({"count": 3})));
    // The subscription and the reason together: a's letters whose reason says 400.
    assert_eq!(discard(json!({"subscription": "a", "reason": "400"})).await, (200, json!({"count": 3})));
    assert_eq!(remaining().await, ["demo.gone.s1.1", "demo.gone.s1.2", "demo.gone.s1.3"]);
    // Their subscription is gone: skipped, not counted, still there.
    let (status, answer) = app.call("POST", "/api/v1/dead-letters/retry", Some(json!({}))).await;
    assert_eq!((status, answer), (200, json!({"count": 0})));
    assert_eq!(remaining().await.len(), 3);
    assert_eq!(discard(json!({"subscription": "gone"})).await, (200, json!({"count": 3})));
    assert!(remaining().await.is_empty());
    app.stop().await;
}

/// `state.dead_letters_max_bytes`: more rejected messages than fit, the oldest dead
/// letters go, counted in `cometd_bridge_dead_letters_evicted_total`; the newest remain.
#[tokio::test]
async fn the_oldest_dead_letters_are_evicted_beyond_the_bound() {
    const PUBLISHED: u64 = 12;
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start(std::iter::repeat_n(401, PUBLISHED as usize)).await;
    let app = TestApp::spawn_with_state(
        &format!("{}{}", source(&faye), webhook("full", "/full", &receiver.url())),
        tempfile::tempdir().expect("state"),
        None,
        "dead_letters_max_bytes = \"3KiB\"\n",
    )
    .await;
    app.wait_ready().await;
    crate::support::scenario::publish_paced(faye.url(), "/full", 0..PUBLISHED, 200).await;
    for _ in 0..PUBLISHED {
        assert_eq!(receiver.next().await.status, 401);
    }
    // Settled once the forwarder commits; the metric says when all were stored.
    let deadline = tokio::time::Instant::now() + crate::support::peer::WAIT;
    let metrics = loop {
        let metrics = app.metrics().await;
        if metrics.contains(&format!("cometd_bridge_dead_letters_total{{subscription=\"full\"}} {PUBLISHED}"))
        {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all dead-lettered:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let letters = app.dead_letters().await;
    let mut kept: Vec<u64> =
        letters.iter().map(|letter| letter.message["data"]["n"].as_u64().expect("n")).collect();
    kept.sort_unstable();
    let evicted = PUBLISHED - kept.len() as u64;
    println!("kept {kept:?} of {PUBLISHED} within 3 KiB");
    assert!((1..PUBLISHED).contains(&(kept.len() as u64)), "some, not all, kept: {kept:?}");
    assert_eq!(kept, (evicted..PUBLISHED).collect::<Vec<u64>>(), "the newest remain");
    assert!(
        metrics.contains(&format!("cometd_bridge_dead_letters_evicted_total {evicted}")),
        "{evicted} evicted:\n{metrics}"
    );
    app.stop().await;
}

/// A bulk retry does not make its subscription full: what does not fit the spool's
/// quota stays a dead letter (not counted), and a later retry takes it once the spool
/// drained; each is delivered once.
#[tokio::test]
async fn a_bulk_retry_takes_what_fits_the_spool_and_leaves_the_rest() {
    const COUNT: u64 = 10;
    let letters = (0..COUNT)
        .map(|n| letter("small", "/small", n, "rejected: HTTP 400", "2026-01-01T00:00:00.000Z"))
        .collect();
    let state = state_with(letters).await;
    let faye = faye().await;
    let mut receiver = WebhookReceiver::start([]).await;
    let subscription = format!(
        "[[subscriptions]]\nid = \"small\"\nsource = \"demo\"\nchannel = \"/small\"\nspool_max_bytes = \"1KiB\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        receiver.url()
    );
    let app = TestApp::spawn_in(&format!("{}{subscription}", source(&faye)), state, None).await;
    app.wait_ready().await;
    let mut counts = Vec::new();
    let mut delivered = std::collections::BTreeMap::new();
    // Bounded: each call takes at least one (an empty spool takes any message).
    for _ in 0..COUNT {
        let (status, answer) =
            app.call("POST", "/api/v1/dead-letters/retry", Some(json!({"subscription": "small"}))).await;
        assert_eq!(status, 200, "{answer}");
        let count = answer["count"].as_u64().expect("count");
        counts.push(count);
        for _ in 0..count {
            let request = receiver.next().await;
            *delivered.entry(request.json()["data"]["n"].as_u64().expect("n")).or_insert(0) += 1;
        }
        if counts.iter().sum::<u64>() == COUNT {
            break;
        }
        // The spool drained (its messages were delivered) before the next call: wait
        // until the API says so.
        let deadline = tokio::time::Instant::now() + crate::support::peer::WAIT;
        loop {
            let (_, view) = app.call("GET", "/api/v1/subscriptions/small", None).await;
            if view["backlog"]["messages"] == 0 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the spool did not drain: {view}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("retried {COUNT} through a 1 KiB quota in calls taking {counts:?}");
    assert!(counts[0] < COUNT, "the first call took only what fits: {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), COUNT);
    assert_eq!(delivered.len() as u64, COUNT);
    assert!(delivered.values().all(|times| *times == 1), "{delivered:?}");
    app.stop().await;
}
