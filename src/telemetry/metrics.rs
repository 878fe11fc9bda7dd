//! The bridge's Prometheus metrics (names as in the contract), and one function per
//! occurrence that updates them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The metrics of one bridge; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    received: Family<Labels, Counter>,
    forwarded: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
    connected: Family<Labels, Gauge>,
    pending: Family<Labels, Gauge>,
    latency: Histogram,
    fallbacks: Family<Labels, Counter>,
    session_losses: Family<Labels, Counter>,
    task_restarts: Family<Labels, Counter>,
    state_errors: Counter,
    store_healthy: Gauge,
    dead_letters_evicted: Counter,
    spool_messages: Family<Labels, Gauge>,
    spool_bytes: Family<Labels, Gauge>,
    spool_oldest_age: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    reloads: Family<Labels, Counter>,
    dropped: Family<Labels, Counter>,
    full: Family<Labels, Gauge>,
    owned: Family<Labels, Gauge>,
    lease_changes: Family<Labels, Counter>,
    /// The label sets of series per subscription, so that its series can be dropped with it.
    series: std::sync::Mutex<
        std::collections::BTreeMap<String, std::collections::BTreeSet<(&'static str, Labels)>>,
    >,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric of the contract.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let received = Family::<Labels, Counter>::default();
        let forwarded = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let dead_letters = Family::<Labels, Counter>::default();
        let connected = Family::<Labels, Gauge>::default();
        let pending = Family::<Labels, Gauge>::default();
        let latency = Histogram::new(exponential_buckets(0.0001, 2.0, 20));
        let fallbacks = Family::<Labels, Counter>::default();
        let session_losses = Family::<Labels, Counter>::default();
        let owned = Family::<Labels, Gauge>::default();
        let lease_changes = Family::<Labels, Counter>::default();
        registry.register(
            "cometd_bridge_source_owned",
            "1 while this replica owns the source (always, without replicas)",
            owned.clone(),
        );
        registry.register(
            "cometd_bridge_lease_changes",
            "Times this replica took or gave up the source's lease",
            lease_changes.clone(),
        );
        let task_restarts = Family::<Labels, Counter>::default();
        let state_errors = Counter::default();
        let store_healthy = Gauge::default();
        store_healthy.set(1);
        registry.register(
            "cometd_bridge_store_healthy",
            "1 while the state store works, 0 while it fails (an I/O error; it is being reopened)",
            store_healthy.clone(),
        );
        let dead_letters_evicted = Counter::default();
        registry.register(
            "cometd_bridge_dead_letters_evicted",
            "Dead letters removed, oldest first, to keep them within state.dead_letters_max_bytes",
            dead_letters_evicted.clone(),
        );
        let reloads = Family::<Labels, Counter>::default();
        let dropped = Family::<Labels, Counter>::default();
        let full = Family::<Labels, Gauge>::default();
        registry.register(
            "cometd_bridge_messages_dropped",
            "Messages a full subscription could not take (no replay), by reason: spool_full (its quota or all spools' bound) or store_unavailable (a full disk or a failing state store)",
            dropped.clone(),
        );
        registry.register(
            "cometd_bridge_subscription_full",
            "1 while the subscription cannot take messages (its spool quota, all spools' bound, the disk or the store)",
            full.clone(),
        );
        registry.register(
            "cometd_bridge_config_reloads",
            "Configuration reloads (SIGHUP or the API), by result: ok or error",
            reloads.clone(),
        );
        for result in ["ok", "error"] {
            drop(reloads.get_or_create(&vec![("result", result.into())]));
        }
        registry.register(
            "cometd_bridge_state_errors",
            "Records of the state store skipped because they could not be read",
            state_errors.clone(),
        );
        registry.register(
            "cometd_bridge_task_restarts",
            "Forwarder and source tasks restarted after failing unexpectedly",
            task_restarts.clone(),
        );
        let spool_messages = Family::<Labels, Gauge>::default();
        let spool_bytes = Family::<Labels, Gauge>::default();
        let spool_oldest_age = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "cometd_bridge_session_losses",
            "Sessions the CometD server forgot (a new handshake after one had succeeded)",
            session_losses.clone(),
        );
        registry.register(
            "cometd_bridge_spool_messages",
            "Messages received and not yet delivered or dead-lettered",
            spool_messages.clone(),
        );
        registry.register("cometd_bridge_spool_bytes", "Size of the spooled messages", spool_bytes.clone());
        registry.register(
            "cometd_bridge_spool_oldest_age_seconds",
            "Age of the oldest spooled message",
            spool_oldest_age.clone(),
        );
        registry.register(
            "cometd_bridge_messages_received",
            "Messages received from CometD, per subscription they were routed to",
            received.clone(),
        );
        registry.register(
            "cometd_bridge_messages_forwarded",
            "Messages the sink acknowledged",
            forwarded.clone(),
        );
        registry.register("cometd_bridge_delivery_failures", "Failed delivery attempts", failures.clone());
        registry.register(
            "cometd_bridge_dead_letters",
            "Messages stored as dead letters",
            dead_letters.clone(),
        );
        registry.register(
            "cometd_bridge_source_connected",
            "1 when the CometD session is connected",
            connected.clone(),
        );
        registry.register(
            "cometd_bridge_pending_messages",
            "Messages received and not yet taken by the bridge",
            pending.clone(),
        );
        registry.register(
            "cometd_bridge_forward_latency_seconds",
            "From receipt to the sink's acknowledgement",
            latency.clone(),
        );
        registry.register(
            "cometd_bridge_replay_fallbacks",
            "Replay positions the server refused, answered by the configured fallback",
            fallbacks.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                received,
                forwarded,
                failures,
                dead_letters,
                connected,
                pending,
                latency,
                fallbacks,
                session_losses,
                task_restarts,
                state_errors,
                store_healthy,
                dead_letters_evicted,
                spool_messages,
                spool_bytes,
                spool_oldest_age,
                reloads,
                dropped,
                full,
                owned,
                lease_changes,
                series: std::sync::Mutex::default(),
            }),
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.inner.registry).expect("writing to a String cannot fail");
        text
    }

    /// The series counting messages from `source` routed to `subscription`: looked up
    /// once per route, since building the label set for every message costs allocations.
    pub fn received_counter(&self, source: &str, subscription: &str) -> Counter {
        let labels = vec![("source", source.into()), ("subscription", subscription.into())];
        self.remember(subscription, "received", &labels);
        self.inner.received.get_or_create(&labels).clone()
    }

    /// Notes a series of `subscription` in `family`, to drop it with the subscription.
    fn remember(&self, subscription: &str, family: &'static str, labels: &Labels) {
        self.inner
            .series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(subscription.to_string())
            .or_default()
            .insert((family, labels.clone()));
    }

    /// The series counting what the sink acknowledged for `subscription`.
    pub fn forwarded_counter(&self, subscription: &str, sink: &str) -> Counter {
        let labels = vec![("subscription", subscription.into()), ("sink", sink.into())];
        self.remember(subscription, "forwarded", &labels);
        self.inner.forwarded.get_or_create(&labels).clone()
    }

    /// The sink acknowledged a message, `latency` after it was received.
    pub fn forward_latency(&self, latency: Duration) {
        self.inner.latency.observe(latency.as_secs_f64());
    }

    /// A delivery attempt failed for `reason` (e.g. `timeout`, `status_503`, `unavailable`).
    pub fn delivery_failed(&self, subscription: &str, sink: &str, reason: &str) {
        let labels =
            vec![("subscription", subscription.into()), ("sink", sink.into()), ("reason", reason.into())];
        self.remember(subscription, "failures", &labels);
        self.inner.failures.get_or_create(&labels).inc();
    }

    /// A message was stored as a dead letter.
    pub fn dead_lettered(&self, subscription: &str) {
        self.inner.dead_letters.get_or_create(&vec![("subscription", subscription.into())]).inc();
    }

    /// The session of `source` connected or lost its connection.
    pub fn source_connected(&self, source: &str, connected: bool) {
        self.inner.connected.get_or_create(&vec![("source", source.into())]).set(i64::from(connected));
    }

    /// The server refused a replay position of `source`; the fallback was applied.
    pub fn replay_fallback(&self, source: &str) {
        self.inner.fallbacks.get_or_create(&vec![("source", source.into())]).inc();
    }

    /// How many received messages `source` holds.
    pub fn pending(&self, source: &str, count: usize) {
        self.inner
            .pending
            .get_or_create(&vec![("source", source.into())])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// `count` messages for `subscription` were dropped because it was full, for `reason`.
    pub fn dropped(&self, subscription: &str, reason: &'static str, count: u64) {
        let labels = vec![("subscription", subscription.into()), ("reason", reason.into())];
        self.remember(subscription, "dropped", &labels);
        self.inner.dropped.get_or_create(&labels).inc_by(count);
    }

    /// Whether `subscription` is full now.
    pub fn subscription_full(&self, subscription: &str, full: bool) {
        self.inner.full.get_or_create(&vec![("subscription", subscription.into())]).set(i64::from(full));
    }

    /// The CometD server forgot the session of `source`.
    pub fn session_lost(&self, source: &str) {
        self.inner.session_losses.get_or_create(&vec![("source", source.into())]).inc();
    }

    /// The state store has skipped `total` unreadable records since it opened.
    pub fn state_errors(&self, total: u64) {
        let counted = self.inner.state_errors.get();
        if total > counted {
            self.inner.state_errors.inc_by(total - counted);
        }
    }

    /// Whether the state store works (see [`crate::store::Store::unhealthy`]).
    pub fn store_healthy(&self, healthy: bool) {
        self.inner.store_healthy.set(i64::from(healthy));
    }

    /// The state store has evicted `total` dead letters since it opened.
    pub fn dead_letters_evicted(&self, total: u64) {
        let counted = self.inner.dead_letters_evicted.get();
        if total > counted {
            self.inner.dead_letters_evicted.inc_by(total - counted);
        }
    }

    /// `task` (e.g. `forwarder orders`) failed and was restarted.
    pub fn task_restarted(&self, task: &str) {
        self.inner.task_restarts.get_or_create(&vec![("task", task.into())]).inc();
    }

    /// Whether this replica owns `source`.
    pub fn source_owned(&self, source: &str, owned: bool) {
        self.inner.owned.get_or_create(&vec![("source", source.into())]).set(i64::from(owned));
    }

    /// This replica took or gave up `source`'s lease.
    pub fn lease_changed(&self, source: &str) {
        self.inner.lease_changes.get_or_create(&vec![("source", source.into())]).inc();
    }

    /// Shows `source`'s per-source series from the start, at 0.
    pub fn source_added(&self, source: &str) {
        let labels = vec![("source", source.into())];
        drop(self.inner.session_losses.get_or_create(&labels));
        self.source_connected(source, false);
    }

    /// What the spool of `subscription` holds.
    pub fn spool(&self, subscription: &str, messages: u64, bytes: u64, oldest_age: Duration) {
        let labels = vec![("subscription", subscription.into())];
        self.inner.spool_messages.get_or_create(&labels).set(i64::try_from(messages).unwrap_or(i64::MAX));
        self.inner.spool_bytes.get_or_create(&labels).set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.inner.spool_oldest_age.get_or_create(&labels).set(oldest_age.as_secs_f64());
    }

    /// A configuration reload finished, applied (`ok`) or refused (`error`).
    pub fn config_reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inner.reloads.get_or_create(&vec![("result", result.into())]).inc();
    }

    /// Drops the series of a source a reload removed.
    pub fn forget_source(&self, source: &str) {
        let labels = vec![("source", source.into())];
        self.inner.connected.remove(&labels);
        self.inner.pending.remove(&labels);
        self.inner.session_losses.remove(&labels);
        self.inner.fallbacks.remove(&labels);
    }

    /// Drops the series of a removed subscription.
    pub fn forget_subscription(&self, subscription: &str) {
        let labels = vec![("subscription", subscription.into())];
        self.inner.spool_messages.remove(&labels);
        self.inner.spool_bytes.remove(&labels);
        self.inner.spool_oldest_age.remove(&labels);
        self.inner.dead_letters.remove(&labels);
        self.inner.full.remove(&labels);
        let series =
            self.inner.series.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(subscription);
        for (family, labels) in series.unwrap_or_default() {
            match family {
                "received" => drop(self.inner.received.remove(&labels)),
                "forwarded" => drop(self.inner.forwarded.remove(&labels)),
                "dropped" => drop(self.inner.dropped.remove(&labels)),
                _ => drop(self.inner.failures.remove(&labels)),
            }
        }
    }
}
