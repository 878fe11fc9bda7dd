//! Both durable state backends keep the same records the same way: one suite of spool and
//! dead-letter tests run over the embedded store in a temporary directory and the NATS
//! store on a real nats-server ([`Backend`]); and a daemon on the NATS backend keeps its
//! runtime subscriptions, dead letters and backlog in NATS, not on its disk.

use cometd_bridge::config::RawSubscription;
use cometd_bridge::store::DeadLetterRecords;
use cometd_bridge::store::PositionRecords;
use cometd_bridge::store::Spools;
use cometd_bridge::store::SubscriptionRecords;
use cometd_bridge::store::{DeadLetter, EmbeddedStore, NatsKvStore, Settlement, SpoolAppend, Store};
use serde_json::json;
use std::sync::Arc;

use crate::support::app::TestApp;
use crate::support::bayeux::{BayeuxServer, FayeOptions};
use crate::support::nats::{NatsOptions, NatsServer};
use crate::support::peer::{WAIT, open};
use crate::support::webhook::WebhookReceiver;

fn subscription(id: &str, channel: &str) -> RawSubscription {
    serde_json::from_value(json!({
        "id": id, "source": "demo", "channel": channel,
        "sink": { "type": "nats", "subject": "out.{channel}" }
    }))
    .expect("a subscription")
}

fn letter(id: &str, sequence: u64, failed_at: &str) -> DeadLetter {
    DeadLetter {
        id: id.into(),
        subscription: "orders".into(),
        source: "demo".into(),
        session: "s1".into(),
        sequence,
        replay_id: None,
        message: json!({"channel": "/orders", "data": {"n": sequence}}),
        reason: "rejected: HTTP 400".into(),
        attempts: 1,
        failed_at: failed_at.into(),
        record: None,
    }
}

fn ids(subscriptions: &[RawSubscription]) -> Vec<&str> {
    subscriptions.iter().map(|subscription| subscription.id.as_str()).collect()
}

/// Writes, reads back, replaces and removes every kind of record through `store`.
async fn keeps_every_record(store: &dyn Store) {
    assert!(store.subscriptions().await.expect("list").is_empty());
    // An id with characters a file name or a key could not hold as they are.
    store.put_subscription(&subscription("eu orders/1", "/orders/eu")).await.expect("put");
    store.put_subscription(&subscription("a", "/a")).await.expect("put");
    store.put_subscription(&subscription("a", "/a/replaced")).await.expect("replace");
    let listed = store.subscriptions().await.expect("list");
    assert_eq!(ids(&listed), ["a", "eu orders/1"]);
    assert_eq!(listed[0].channel, "/a/replaced", "a put replaces");
    assert!(store.delete_subscription("eu orders/1").await.expect("delete"));
    assert!(!store.delete_subscription("eu orders/1").await.expect("delete again"), "already gone");
    assert_eq!(ids(&store.subscriptions().await.expect("list")), ["a"]);

    store.add_dead_letter(&letter("demo.orders.s1.2", 2, "2026-01-01T00:00:02.000Z")).await.expect("add");
    store.add_dead_letter(&letter("demo.orders.s1.1", 1, "2026-01-01T00:00:01.000Z")).await.expect("add");
    let letters = store.dead_letters().await.expect("letters");
    let sequences: Vec<u64> = letters.iter().map(|letter| letter.sequence).collect();
    assert_eq!(sequences, [1, 2], "oldest first");
    assert_eq!(letters[0], letter("demo.orders.s1.1", 1, "2026-01-01T00:00:01.000Z"), "read back whole");
    assert_eq!(
        store.dead_letter("demo.orders.s1.2").await.expect("get").map(|letter| letter.sequence),
        Some(2)
    );
    assert!(store.delete_dead_letter("demo.orders.s1.2").await.expect("delete"));
    assert!(!store.delete_dead_letter("demo.orders.s1.2").await.expect("delete again"));
    assert_eq!(store.dead_letter("demo.orders.s1.2").await.expect("get"), None);

    // Pages in id order, however many letters there are.
    for n in 2..=70u64 {
        let id = format!("demo.orders.s2.{n:03}");
        store.add_dead_letter(&letter(&id, n, "2026-01-01T00:00:03.000Z")).await.expect("add");
    }
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, more) = store.dead_letters_page(after.as_deref(), 32).await.expect("a page");
        assert!(page.len() <= 32);
        paged.extend(page.iter().map(|letter| letter.sequence));
        after = page.last().map(|letter| letter.id.clone());
        if !more {
            break;
        }
    }
    assert_eq!(paged, (1..=70).collect::<Vec<u64>>(), "every letter once, in id order");
    for n in 2..=70u64 {
        store.delete_dead_letter(&format!("demo.orders.s2.{n:03}")).await.expect("delete");
    }

    assert!(store.positions("a").await.expect("positions").is_empty(), "none committed yet");
    let positions = [("/a".to_string(), 41), ("/b".to_string(), -2)].into_iter().collect();
    store.put_positions("a", &positions).await.expect("put positions");
    assert_eq!(store.positions("a").await.expect("positions"), positions);
    store.delete_positions("a").await.expect("delete positions");
    assert!(store.positions("a").await.expect("positions").is_empty());
}

fn append(subscription: &str, text: &str) -> SpoolAppend {
    SpoolAppend { subscription: subscription.into(), record: text.as_bytes().to_vec() }
}

/// Appends to, reads, settles (with a dead letter and positions) and drops spools.
async fn keeps_spools(store: &dyn Store) {
    let sequences = store
        .spool_append(vec![append("s1", "a"), append("s2", "x"), append("s1", "b"), append("s1", "c")].into())
        .await
        .expect("append");
    let (a, b, c) = (sequences[0].expect("a"), sequences[2].expect("b"), sequences[3].expect("c"));
    assert!(a < b && b < c, "in order: {sequences:?}");
    let read = store.spool_read("s1", 0, 10).await.expect("read");
    assert_eq!(read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(), [b"a", b"b", b"c"]);
    assert_eq!(
        store.spool_read("s1", b, 1).await.expect("read").iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [b]
    );
    store
        .spool_settle(Settlement {
            subscription: "s1".into(),
            through: b,
            positions: Some([("/s".to_string(), 9)].into_iter().collect()),
            dead_letters: vec![letter("s1-letter", 1, "2026-01-01T00:00:00.000Z")],
        })
        .await
        .expect("settle");
    assert_eq!(store.spool_read("s1", 0, 10).await.expect("read")[0].sequence, c, "trimmed through b");
    assert_eq!(store.positions("s1").await.expect("positions")["/s"], 9);
    assert!(store.dead_letter("s1-letter").await.expect("get").is_some());
    let summaries = store.spool_summaries().await.expect("summaries");
    assert_eq!((summaries["s1"].first, summaries["s1"].last, summaries["s1"].messages), (c, c, 1));
    assert_eq!(summaries["s2"].messages, 1);
    let requeued = store.requeue_dead_letter("s1-letter", append("s1", "d")).await.expect("requeue");
    assert!(requeued.is_some_and(|sequence| sequence > c));
    assert!(store.dead_letter("s1-letter").await.expect("get").is_none(), "moved, not copied");
    assert_eq!(store.requeue_dead_letter("s1-letter", append("s1", "e")).await.expect("again"), None);
    store.spool_delete("s1").await.expect("delete");
    store.spool_delete("s2").await.expect("delete");
    assert!(store.spool_summaries().await.expect("summaries").is_empty());
    let after = store.spool_append(vec![append("s1", "f")].into()).await.expect("append");
    assert!(after[0].is_some(), "a dropped spool can be used again");
    store.spool_delete("s1").await.expect("delete");
}

/// A dead letter of subscription `bounded` of the same size as every other one made here.
fn sized(id: char, minute: u32) -> DeadLetter {
    DeadLetter {
        subscription: "bounded".into(),
        record: Some(format!(
            r#"{{"message":{{"channel":"/b","data":{{"n":12345678901234567890123,"b":1,"a":2,"id":"{id}"}}}}}}"#
        )),
        ..letter(&format!("bounded-{id}"), 1, &format!("2026-01-01T00:{minute:02}:00.000Z"))
    }
}

fn letter_ids(letters: &[DeadLetter]) -> Vec<&str> {
    letters.iter().map(|letter| letter.id.as_str()).collect()
}

/// Keeps dead letters within their bound, oldest out first (by age, not id), and
/// requeues and removes them in bulk; returns the bound it set.
async fn bounds_dead_letters(store: &dyn Store) -> u64 {
    let size = sized('a', 0).stored_size();
    store.limit_dead_letters(3 * size);
    let evicted_before = store.dead_letters_evicted();
    // Stored in the reverse of their id order: `e` is the oldest.
    for (minute, id) in ['e', 'd', 'c', 'b', 'a'].into_iter().enumerate() {
        store.add_dead_letter(&sized(id, minute as u32)).await.expect("add");
    }
    let letters = store.dead_letters().await.expect("letters");
    assert_eq!(letter_ids(&letters), ["bounded-c", "bounded-b", "bounded-a"], "the two oldest went");
    assert_eq!(store.dead_letters_evicted() - evicted_before, 2);
    // Stored again under its id (a crash repeated its batch): replaced, counted once.
    store.add_dead_letter(&sized('a', 4)).await.expect("add again");
    assert_eq!(letter_ids(&store.dead_letters().await.expect("letters")).len(), 3);
    assert_eq!(store.dead_letters_evicted() - evicted_before, 2, "nothing more evicted");
    let kept = store.dead_letter("bounded-a").await.expect("get").expect("there");
    assert_eq!(kept.record, sized('a', 4).record, "the record comes back as it was stored");

    // A settlement's dead letters count too, and evict in the same write.
    store
        .spool_settle(Settlement {
            subscription: "bounded".into(),
            through: 0,
            positions: None,
            dead_letters: vec![sized('f', 5)],
        })
        .await
        .expect("settle");
    assert_eq!(
        letter_ids(&store.dead_letters().await.expect("letters")),
        ["bounded-b", "bounded-a", "bounded-f"]
    );
    assert_eq!(store.dead_letters_evicted() - evicted_before, 3);

    // In bulk: requeued in order, one not there is `None`; removed, counting those there.
    let requeued = store
        .requeue_dead_letters(vec![
            ("bounded-b".into(), append("bounded", "b")),
            ("bounded-gone".into(), append("bounded", "gone")),
            ("bounded-a".into(), append("bounded", "a")),
        ])
        .await
        .expect("requeue");
    assert!(requeued[1].is_none(), "{requeued:?}");
    let (b, a) = (requeued[0].expect("b"), requeued[2].expect("a"));
    assert!(b < a, "{requeued:?}");
    let read = store.spool_read("bounded", 0, 10).await.expect("read");
    assert_eq!(read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(), [b"b", b"a"]);
    assert_eq!(letter_ids(&store.dead_letters().await.expect("letters")), ["bounded-f"]);
    // Room again for three: nothing more is evicted.
    store.add_dead_letter(&sized('g', 6)).await.expect("add");
    store.add_dead_letter(&sized('h', 7)).await.expect("add");
    assert_eq!(store.dead_letters_evicted() - evicted_before, 3);
    let removed = store
        .delete_dead_letters(vec!["bounded-f".into(), "bounded-nope".into(), "bounded-g".into()])
        .await
        .expect("delete");
    assert_eq!(removed, 2);
    store.spool_delete("bounded").await.expect("delete");
    3 * size
}

/// Two retries of one dead letter at once: one requeues it, the other finds it gone.
async fn requeues_a_dead_letter_once(store: Arc<dyn Store>, beside: Arc<dyn Store>) {
    store.add_dead_letter(&sized('r', 0)).await.expect("add");
    let (first, second) = tokio::join!(
        store.requeue_dead_letter("bounded-r", append("twice", "r")),
        beside.requeue_dead_letter("bounded-r", append("twice", "r")),
    );
    let outcomes = [first.expect("first"), second.expect("second")];
    assert_eq!(outcomes.iter().filter(|sequence| sequence.is_some()).count(), 1, "{outcomes:?}");
    assert_eq!(store.spool_read("twice", 0, 10).await.expect("read").len(), 1, "appended once");
    store.spool_delete("twice").await.expect("delete");
}

/// A durable backend the suite runs over: a store can be opened on it again (as after a
/// restart) once the previous one is dropped, and records can be written to it behind the
/// store's back.
enum Backend {
    /// The embedded database in a temporary directory.
    Embedded(tempfile::TempDir),
    /// The NATS store on a real nats-server, its buckets named after `bucket`.
    Nats { server: Box<NatsServer>, bucket: &'static str },
}

impl Backend {
    /// Every durable backend, each on empty state.
    async fn each(bucket: &'static str) -> Vec<Backend> {
        vec![
            Backend::Embedded(tempfile::tempdir().expect("temp dir")),
            Backend::Nats { server: Box::new(NatsServer::start().await), bucket },
        ]
    }

    fn name(&self) -> &'static str {
        match self {
            Backend::Embedded(_) => "embedded",
            Backend::Nats { .. } => "nats",
        }
    }

    /// A store on this backend's state, on a connection of its own.
    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Embedded(dir) => Arc::new(EmbeddedStore::open(dir.path()).expect("open")),
            Backend::Nats { server, bucket } => Arc::new(
                NatsKvStore::open(async_nats::connect(server.url()).await.expect("connect"), bucket)
                    .await
                    .expect("open"),
            ),
        }
    }

    /// A second store on the same state at the same time, where the backend allows one (the
    /// embedded database has one owner: there it is `store` again).
    async fn beside(&self, store: &Arc<dyn Store>) -> Arc<dyn Store> {
        match self {
            Backend::Embedded(_) => store.clone(),
            Backend::Nats { .. } => self.open().await,
        }
    }

    /// Writes a subscription and a dead letter that cannot be read, as a damaged disk or
    /// another program might (the store must be closed).
    async fn write_unreadable_records(&self) {
        match self {
            Backend::Embedded(dir) => {
                let db = redb::Database::create(dir.path().join("state.redb")).expect("the file");
                let txn = db.begin_write().expect("write");
                {
                    let letters: redb::TableDefinition<&str, &[u8]> =
                        redb::TableDefinition::new("dead_letters");
                    txn.open_table(letters)
                        .expect("table")
                        .insert("a-broken", b"{\"id\":".as_slice())
                        .expect("insert");
                    let subscriptions: redb::TableDefinition<&str, &[u8]> =
                        redb::TableDefinition::new("subscriptions");
                    txn.open_table(subscriptions)
                        .expect("table")
                        .insert("broken", b"[]".as_slice())
                        .expect("insert");
                }
                txn.commit().expect("commit");
            }
            Backend::Nats { server, bucket } => {
                let client = async_nats::connect(server.url()).await.expect("connect");
                let jetstream = async_nats::jetstream::new(client);
                let subscriptions =
                    jetstream.get_key_value(format!("{bucket}-subscriptions")).await.expect("bucket");
                subscriptions.put("eA", "{\"id\":".into()).await.expect("put garbage");
                let letters =
                    jetstream.get_key_value(format!("{bucket}-dead-letters")).await.expect("bucket");
                letters.put("eQ", "not json".into()).await.expect("put garbage");
            }
        }
    }
}

#[tokio::test]
async fn every_backend_keeps_every_record_and_spool_across_a_restart() {
    for backend in Backend::each("test").await {
        let store = backend.open().await;
        keeps_every_record(&*store).await;
        keeps_spools(&*store).await;
        store.put_subscription(&subscription("kept", "/kept")).await.expect("put");
        drop(store);
        // Opened again, as after a restart, it finds what is there.
        let again = backend.open().await;
        assert_eq!(ids(&again.subscriptions().await.expect("list")), ["a", "kept"], "{}", backend.name());
    }
}

#[tokio::test]
async fn another_bucket_name_is_another_empty_nats_state() {
    let nats = NatsServer::start().await;
    let store = NatsKvStore::open(async_nats::connect(nats.url()).await.expect("connect"), "test")
        .await
        .expect("open");
    store.put_subscription(&subscription("kept", "/kept")).await.expect("put");
    let other = NatsKvStore::open(async_nats::connect(nats.url()).await.expect("connect"), "other")
        .await
        .expect("open other");
    assert!(other.subscriptions().await.expect("list").is_empty());
}

#[tokio::test]
async fn every_store_bounds_its_dead_letters_and_handles_them_in_bulk() {
    let memory = cometd_bridge::store::MemoryStore::new();
    bounds_dead_letters(&*memory).await;
    requeues_a_dead_letter_once(memory.clone(), memory).await;

    for backend in Backend::each("bounded").await {
        let store = backend.open().await;
        let max = bounds_dead_letters(&*store).await;
        requeues_a_dead_letter_once(store.clone(), backend.beside(&store).await).await;
        drop(store);
        // Reopened, the store knows the ages and sizes of what is there (`h` is older than `i`).
        let again = backend.open().await;
        again.limit_dead_letters(max);
        for (id, minute) in [('i', 8), ('j', 9), ('k', 10)] {
            again.add_dead_letter(&sized(id, minute)).await.expect("add");
        }
        assert_eq!(
            letter_ids(&again.dead_letters().await.expect("letters")),
            ["bounded-i", "bounded-j", "bounded-k"],
            "{}: h, the oldest, went",
            backend.name()
        );
        assert_eq!(again.dead_letters_evicted(), 1, "{}", backend.name());
    }
}

/// Five dead letters, each retried twice at once (singly, then in bulk), by two stores on
/// the same state where the backend allows two (two bridges on one NATS bucket): each is
/// requeued, and appended, once.
#[tokio::test]
async fn every_backend_requeues_each_dead_letter_once_under_concurrent_retries() {
    for backend in Backend::each("retried").await {
        let first = backend.open().await;
        let second = backend.beside(&first).await;
        for round in ["single", "bulk"] {
            let ids: Vec<String> = (0..5).map(|n| format!("{round}-{n}")).collect();
            for (n, id) in ids.iter().enumerate() {
                let letter =
                    DeadLetter { id: id.clone(), ..letter("unused", n as u64, "2026-01-01T00:00:00.000Z") };
                first.add_dead_letter(&letter).await.expect("add");
            }
            let requeue = |id: &String| (id.clone(), append(round, id));
            let outcomes: Vec<Option<u64>> = if round == "single" {
                let calls = ids.iter().flat_map(|id| {
                    [
                        first.requeue_dead_letter(id, append(round, id)),
                        second.requeue_dead_letter(id, append(round, id)),
                    ]
                });
                futures_util::future::join_all(calls)
                    .await
                    .into_iter()
                    .map(|outcome| outcome.expect("requeue"))
                    .collect()
            } else {
                let (a, b) = tokio::join!(
                    first.requeue_dead_letters(ids.iter().map(requeue).collect()),
                    second.requeue_dead_letters(ids.iter().map(requeue).collect()),
                );
                a.expect("requeue").into_iter().chain(b.expect("requeue")).collect()
            };
            assert_eq!(outcomes.iter().flatten().count(), 5, "{} {round}: {outcomes:?}", backend.name());
            let spooled = first.spool_read(round, 0, 100).await.expect("read");
            let mut records: Vec<&[u8]> = spooled.iter().map(|entry| entry.record.as_slice()).collect();
            records.sort_unstable();
            let expected: Vec<&[u8]> = ids.iter().map(|id| id.as_bytes()).collect();
            assert_eq!(records, expected, "{} {round}: each appended once", backend.name());
            for id in &ids {
                assert_eq!(
                    first.dead_letter(id).await.expect("get"),
                    None,
                    "{} {round}: moved",
                    backend.name()
                );
            }
        }
    }
}

/// One unreadable subscription and one unreadable dead letter: each listing skips them,
/// and pages still page, and both are counted.
#[tokio::test]
async fn every_backend_skips_and_counts_unreadable_records() {
    for backend in Backend::each("corrupt").await {
        let store = backend.open().await;
        store.put_subscription(&subscription("fine", "/fine")).await.expect("put");
        store.add_dead_letter(&letter("z-fine", 1, "2026-01-01T00:00:00.000Z")).await.expect("add");
        drop(store);
        backend.write_unreadable_records().await;
        let store = backend.open().await;
        let name = backend.name();
        assert_eq!(store.unreadable_records(), 0, "{name}: nothing read yet");
        assert_eq!(ids(&store.subscriptions().await.expect("the listing still works")), ["fine"], "{name}");
        assert_eq!(store.unreadable_records(), 1, "{name}: the subscription counted");
        assert_eq!(
            letter_ids(&store.dead_letters().await.expect("the listing still works")),
            ["z-fine"],
            "{name}"
        );
        assert_eq!(store.unreadable_records(), 2, "{name}: the dead letter counted");
        let (page, more) = store.dead_letters_page(None, 10).await.expect("the page still works");
        assert_eq!((letter_ids(&page), more), (vec!["z-fine"], false), "{name}");
        assert_eq!(store.unreadable_records(), 3, "{name}: each listing that skips it counts it");
    }
}

/// Dead letters stored before they were bounded (no index by age): indexed on open, by
/// `failed_at`, and the oldest of them go first.
#[tokio::test]
async fn dead_letters_stored_before_the_bound_are_indexed_by_age_on_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let db = redb::Database::create(dir.path().join("state.redb")).expect("the file");
        let txn = db.begin_write().expect("write");
        {
            let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("dead_letters");
            let mut table = txn.open_table(table).expect("table");
            for (minute, id) in ['a', 'b', 'c'].into_iter().rev().enumerate() {
                let letter = DeadLetter { record: None, ..sized(id, minute as u32) };
                table
                    .insert(letter.id.as_str(), serde_json::to_vec(&letter).unwrap().as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let store = EmbeddedStore::open(dir.path()).expect("open");
    store.limit_dead_letters(3 * DeadLetter { record: None, ..sized('a', 0) }.stored_size());
    store.add_dead_letter(&DeadLetter { record: None, ..sized('d', 3) }).await.expect("add");
    assert_eq!(
        letter_ids(&store.dead_letters().await.expect("letters")),
        ["bounded-b", "bounded-a", "bounded-d"],
        "c, stored first, went"
    );
    assert_eq!(store.dead_letters_evicted(), 1);
}

#[tokio::test]
async fn the_memory_store_keeps_every_record_while_it_runs() {
    let store = cometd_bridge::store::MemoryStore::new();
    keeps_every_record(&*store).await;
    keeps_spools(&*store).await;
}

/// One unreadable record (embedded): reported and skipped, and a daemon on that state
/// starts, lists its dead letters and counts it in `cometd_bridge_state_errors_total`.
#[tokio::test]
async fn an_unreadable_embedded_record_is_skipped_and_counted() {
    let state = tempfile::tempdir().expect("state");
    {
        let store = EmbeddedStore::open(state.path()).expect("open");
        store.add_dead_letter(&letter("b-fine", 1, "2026-01-01T00:00:00.000Z")).await.expect("add");
    }
    {
        let db = redb::Database::create(state.path().join("state.redb")).expect("the file");
        let txn = db.begin_write().expect("write");
        {
            let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("dead_letters");
            let mut table = txn.open_table(table).expect("table");
            table.insert("a-broken", b"{\"id\":".as_slice()).expect("insert");
            let subscriptions: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("subscriptions");
            txn.open_table(subscriptions).expect("table").insert("broken", b"[]".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let app =
        TestApp::spawn_in(&format!("[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", faye.url()), state, None)
            .await;
    let letters = app.dead_letters().await;
    assert_eq!(letters.iter().map(|letter| letter.id.as_str()).collect::<Vec<_>>(), ["b-fine"]);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("cometd_bridge_state_errors_total 2"),
        "the broken subscription and dead letter:\n{metrics}"
    );
    app.stop().await;
}

/// The daemon with `state.backend = "nats-kv"`: a subscription added through the API, and
/// a dead letter, are still there for a daemon started on another, empty, directory.
#[tokio::test]
async fn a_daemon_on_the_nats_kv_backend_keeps_its_state_in_nats() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let mut receiver = WebhookReceiver::start([400]).await;
    let config =
        format!("[nats]\nurl = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n", nats.url(), faye.url());
    let state_keys = "backend = \"nats-kv\"\nbucket = \"bridge\"\n";
    let app = TestApp::spawn_with_state(&config, tempfile::tempdir().expect("dir"), None, state_keys).await;
    app.wait_ready().await;
    let body = json!({ "id": "kept", "source": "demo", "channel": "/kept", "sink": { "type": "webhook", "url": receiver.url() } });
    let (status, answer) = app.call("POST", "/api/v1/subscriptions", Some(body)).await;
    assert_eq!(status, 201, "{answer}");
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    publisher.publish("/kept", json!("refused")).await.expect("publish");
    assert_eq!(receiver.next().await.status, 400, "the receiver refuses the first delivery");
    let letters = app.wait_for_dead_letters(1).await;
    let state = app.stop().await;
    assert!(
        std::fs::read_dir(state.path())
            .expect("state dir")
            .all(|entry| { entry.map(|entry| entry.file_name() == "config.toml").unwrap_or(false) }),
        "nothing but the config was written to the state directory"
    );

    let app = TestApp::spawn_with_state(&config, tempfile::tempdir().expect("dir"), None, state_keys).await;
    app.wait_ready().await;
    let (status, kept) = app.call("GET", "/api/v1/subscriptions/kept", None).await;
    assert_eq!((status, kept["origin"].clone()), (200, json!("api")), "{kept}");
    let (_, listed) = app.call("GET", "/api/v1/dead-letters", None).await;
    assert_eq!(listed["dead_letters"], letters, "the dead letter is still listed");
    publisher.publish("/kept", json!("after restart")).await.expect("publish");
    assert_eq!(receiver.next().await.json()["data"], "after restart");
    app.stop().await;
}

/// The daemon on the NATS backend with a webhook down: its backlog is in JetStream, so a
/// daemon started on another, empty, directory delivers it.
#[tokio::test]
async fn a_daemon_on_the_nats_backend_keeps_its_backlog_in_jetstream() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start().await;
    let failing = WebhookReceiver::start(std::iter::repeat_n(503, 1_000_000)).await;
    let mut working = WebhookReceiver::start([]).await;
    let config = |url: String| {
        format!(
            "[nats]\nurl = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n[[subscriptions]]\nid = \"later\"\nsource = \"demo\"\nchannel = \"/later\"\nsink = {{ type = \"webhook\", url = \"{url}\" }}\n",
            nats.url(),
            faye.url()
        )
    };
    let state_keys = "backend = \"nats\"\nbucket = \"bridge\"\n";
    let app = TestApp::spawn_with_state(
        &config(failing.url()),
        tempfile::tempdir().expect("dir"),
        None,
        state_keys,
    )
    .await;
    app.wait_ready().await;
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    for n in 0..10 {
        publisher.publish("/later", json!(n)).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.call("GET", "/api/v1/subscriptions/later", None).await.1["backlog"]["messages"] != 10 {
        assert!(tokio::time::Instant::now() < deadline, "not spooled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.stop().await;

    let app = TestApp::spawn_with_state(
        &config(working.url()),
        tempfile::tempdir().expect("dir"),
        None,
        state_keys,
    )
    .await;
    let mut data = Vec::new();
    while data.len() < 10 {
        data.push(working.next().await.json()["data"].clone());
    }
    assert_eq!(data, (0..10).map(|n| json!(n)).collect::<Vec<_>>(), "the backlog, in order");
    app.stop().await;
}

/// With no NATS server to hold its state, the daemon does not start, and says which
/// bucket it could not open.
#[tokio::test]
async fn without_nats_a_daemon_on_the_nats_kv_backend_does_not_start() {
    let unused =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let dir = tempfile::tempdir().expect("dir");
    let config = TestApp::config(
        &format!("[nats]\nurl = \"nats://127.0.0.1:{unused}\"\n"),
        &dir,
        None,
        "backend = \"nats-kv\"\n",
    );
    let built = tokio::time::timeout(WAIT * 2, cometd_bridge::app::App::build(config))
        .await
        .expect("gives up in time");
    let error = built.err().expect("no state, no start").to_string();
    assert!(error.contains("NATS KV bucket cometd-bridge-subscriptions"), "{error}");
}

/// The stream behind a bucket or spool of the NATS store.
async fn stream_config(nats: &NatsServer, name: &str) -> async_nats::jetstream::stream::Config {
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut stream = jetstream.get_stream(name).await.expect("the stream");
    stream.info().await.expect("its info").config.clone()
}

/// `state.replicas` is the replication factor of every bucket and spool stream the store
/// creates: 1 is applied; 3 on a single server is refused by it, with its reason, at open.
#[tokio::test]
async fn the_nats_store_creates_its_buckets_and_spools_with_the_replicas_asked() {
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let store = NatsKvStore::open_with(client.clone(), "one", 1).await.expect("open");
    store.spool_append(vec![append("s", "a")].into()).await.expect("append");
    for name in ["KV_one-subscriptions", "KV_one-dead-letters", "KV_one-positions", "one-spool-73"] {
        let config = stream_config(&nats, name).await;
        assert_eq!(config.num_replicas, 1, "{name}");
    }
    let error = NatsKvStore::open_with(client, "three", 3).await.expect_err("one server holds one replica");
    let message = error.to_string();
    assert!(message.contains("three-subscriptions") && message.contains("cannot be created"), "{message}");
    assert!(
        message.contains("replicas > 1 not supported in non-clustered mode"),
        "the server says why: {message}"
    );
}

/// A batch appended again (its publish failed in the middle, or its acknowledgement was
/// lost) is stored once: the records already there keep their sequences. The spool
/// streams remember message ids for two minutes.
#[tokio::test]
async fn the_nats_spool_stores_a_repeated_append_once() {
    let nats = NatsServer::start().await;
    let store = NatsKvStore::open(async_nats::connect(nats.url()).await.expect("connect"), "idem")
        .await
        .expect("open");
    let first = store.spool_append(vec![append("s", "a"), append("s", "b")].into()).await.expect("append");
    let again = store
        .spool_append(vec![append("s", "a"), append("s", "b"), append("s", "c")].into())
        .await
        .expect("append again");
    assert_eq!(again[..2], first[..], "the same sequences");
    let read = store.spool_read("s", 0, 10).await.expect("read");
    assert_eq!(read.iter().map(|entry| entry.record.as_slice()).collect::<Vec<_>>(), [b"a", b"b", b"c"]);
    // The same record on another subscription is another message.
    let other = store.spool_append(vec![append("t", "a")].into()).await.expect("append");
    assert_eq!(store.spool_read("t", 0, 10).await.expect("read")[0].sequence, other[0].expect("stored"));
    let config = stream_config(&nats, "idem-spool-73").await;
    assert_eq!(config.duplicate_window, std::time::Duration::from_secs(120));
}

/// A record of the server's `max_payload` + 1 byte gets no sequence (the bridge
/// dead-letters it), and one that fits is spooled; the store says why in terms of
/// max_payload; a dead letter that large is stored without its data and cannot be retried.
#[tokio::test]
async fn the_nats_store_refuses_a_record_over_max_payload_and_keeps_its_dead_letter_small() {
    let nats = NatsServer::start_with(NatsOptions { max_payload: Some(64 << 10) }).await;
    let store = NatsKvStore::open(async_nats::connect(nats.url()).await.expect("connect"), "big")
        .await
        .expect("open");
    let over = SpoolAppend { subscription: "s".into(), record: vec![b'x'; (64 << 10) + 1] };
    let fits = SpoolAppend { subscription: "s".into(), record: vec![b'y'; 32 << 10] };
    let sequences = store.spool_append(vec![over, fits].into()).await.expect("append");
    assert!(sequences[0].is_none() && sequences[1].is_some(), "{sequences:?}");
    assert!(
        store.refused_reason((64 << 10) + 1).contains("max_payload (65536 bytes"),
        "{}",
        store.refused_reason(1)
    );

    let data = "z".repeat(100 << 10);
    let big = DeadLetter {
        message: json!({"source": "demo", "subscription": "orders", "channel": "/orders", "id": "7", "data": data}),
        reason: "too large".into(),
        ..letter("big-one", 7, "2026-01-01T00:00:00.000Z")
    };
    store.add_dead_letter(&big).await.expect("stored, smaller");
    let kept = store.dead_letter("big-one").await.expect("get").expect("there");
    assert_eq!(kept.message["channel"], "/orders");
    assert_eq!(kept.message["truncated"]["bytes"], data.len() + 2, "the data's JSON size");
    assert!(kept.message.get("data").is_none());
    assert!(kept.reason.starts_with("too large; stored without its data"), "{}", kept.reason);
    assert_eq!(store.requeue_dead_letter("big-one", append("s", "rebuilt")).await.expect("requeue"), None);
    assert!(store.dead_letter("big-one").await.expect("get").is_some(), "still there, to discard");
}

/// A daemon on the NATS backend, nats-server's max_payload at 64 KiB, a webhook that
/// answers 503: a ~100 KiB CometD message is a dead letter whose reason names max_payload,
/// not lost; a small one after it is in the backlog.
#[tokio::test]
async fn a_message_over_max_payload_is_a_dead_letter_on_the_nats_backend() {
    let faye = BayeuxServer::faye(FayeOptions { timeout: Some(2), ..FayeOptions::default() }).await;
    let nats = NatsServer::start_with(NatsOptions { max_payload: Some(64 << 10) }).await;
    let failing = WebhookReceiver::start(std::iter::repeat_n(503, 1_000_000)).await;
    let config = format!(
        "[nats]\nurl = \"{}\"\n[[sources]]\nname = \"demo\"\nurl = \"{}\"\n[[subscriptions]]\nid = \"big\"\nsource = \"demo\"\nchannel = \"/big\"\nsink = {{ type = \"webhook\", url = \"{}\" }}\n",
        nats.url(),
        faye.url(),
        failing.url()
    );
    let state_keys = "backend = \"nats\"\nbucket = \"bridge\"\n";
    let app = TestApp::spawn_with_state(&config, tempfile::tempdir().expect("dir"), None, state_keys).await;
    app.wait_ready().await;
    let publisher = open(cometd_bridge::cometd::Client::builder(faye.url())).await;
    publisher.publish("/big", json!({ "blob": "b".repeat(100 << 10) })).await.expect("publish");
    let letters = app.wait_for_dead_letters(1).await;
    let letter = &letters[0];
    assert_eq!(letter["subscription"], "big", "{letter}");
    let reason = letter["reason"].as_str().expect("a reason");
    assert!(reason.contains("max_payload"), "{reason}");
    assert!(
        letter["message"]["truncated"]["bytes"].as_u64().is_some_and(|bytes| bytes > 100 << 10),
        "{letter}"
    );
    publisher.publish("/big", json!("small")).await.expect("publish");
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.call("GET", "/api/v1/subscriptions/big", None).await.1["backlog"]["messages"] != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the small one is not spooled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    app.stop().await;
}

/// Two stores on one NATS state settle the same subscription at once (as two bridges
/// would, before leases): a settlement that arrives late with older positions does not
/// move them backwards, channel by channel, and a reset through the API still applies.
#[tokio::test]
async fn racing_settlements_on_the_nats_backend_never_move_a_position_backwards() {
    let nats = NatsServer::start().await;
    let open = || async {
        NatsKvStore::open(async_nats::connect(nats.url()).await.expect("connect"), "raced")
            .await
            .expect("open")
    };
    let (first, second) = (open().await, open().await);
    let settle = |a: i64, b: i64| Settlement {
        subscription: "s".into(),
        through: 0,
        positions: Some([("/a".to_string(), a), ("/b".to_string(), b)].into_iter().collect()),
        dead_letters: Vec::new(),
    };
    first.spool_settle(settle(20, 5)).await.expect("settle");
    second.spool_settle(settle(10, 7)).await.expect("settle late");
    let expected = [("/a".to_string(), 20), ("/b".to_string(), 7)].into_iter().collect();
    assert_eq!(first.positions("s").await.expect("positions"), expected);
    // Many at once: the greatest of each channel wins.
    let settlements = (0..10).map(|n| {
        let store = if n % 2 == 0 { &first } else { &second };
        store.spool_settle(settle(30 + n, 100 - n))
    });
    for outcome in futures_util::future::join_all(settlements).await {
        outcome.expect("settle");
    }
    let expected = [("/a".to_string(), 39), ("/b".to_string(), 100)].into_iter().collect();
    assert_eq!(second.positions("s").await.expect("positions"), expected);
    // A reset (the API's put) is what the next settlement builds on.
    let reset = [("/a".to_string(), -2), ("/b".to_string(), -2)].into_iter().collect();
    second.put_positions("s", &reset).await.expect("reset");
    first.spool_settle(settle(3, -2)).await.expect("settle after the reset");
    let expected = [("/a".to_string(), 3), ("/b".to_string(), -2)].into_iter().collect();
    assert_eq!(first.positions("s").await.expect("positions"), expected);
}

/// Five dead letters discarded twice at once in bulk, by two stores on the same state
/// where the backend allows two: each is counted as removed once.
#[tokio::test]
async fn every_backend_counts_each_discarded_dead_letter_once_under_concurrent_discards() {
    for backend in Backend::each("discarded").await {
        let first = backend.open().await;
        let second = backend.beside(&first).await;
        let ids: Vec<String> = (0..5).map(|n| format!("gone-{n}")).collect();
        for (n, id) in ids.iter().enumerate() {
            let letter =
                DeadLetter { id: id.clone(), ..letter("unused", n as u64, "2026-01-01T00:00:00.000Z") };
            first.add_dead_letter(&letter).await.expect("add");
        }
        let (a, b) =
            tokio::join!(first.delete_dead_letters(ids.clone()), second.delete_dead_letters(ids.clone()));
        assert_eq!(a.expect("discard") + b.expect("discard"), 5, "{}", backend.name());
        assert!(first.dead_letters().await.expect("letters").is_empty(), "{}", backend.name());
    }
}
