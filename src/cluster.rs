//! Leases among replicas: which replica owns each source, kept in the JetStream key-value
//! bucket `<state.bucket>-leases` whose entries expire after the lease's time to live
//! unless renewed. A replica also announces itself there (its entry expires the same way),
//! so that each can count the live replicas and take only its share of the sources.
//!
//! It knows nothing of what a source is: the bridge asks it to acquire, renew and release
//! leases by name, and decides what owning one means.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

/// How long opening the bucket is tried again while its requests time out.
const OPEN_PATIENCE: Duration = Duration::from_secs(30);

/// Key prefix of the source leases.
const SOURCE: &str = "source.";
/// Key prefix of the replicas' announcements.
const REPLICA: &str = "replica.";

/// A lease operation that failed: NATS unreachable, JetStream refusing.
#[derive(Debug, thiserror::Error)]
#[error("the lease bucket {bucket}: {what}: {message}")]
pub struct LeaseError {
    bucket: String,
    what: &'static str,
    message: String,
}

/// Who holds a lease: a replica, and which run of it (a replica restarted under the same
/// name takes its own leases back at once rather than waiting for them to expire).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The replica's name (`cluster.replica`).
    pub replica: String,
    /// A random id of the process.
    pub instance: String,
}

/// The lease bucket, seen from one replica.
pub struct Leases {
    store: kv::Store,
    bucket: String,
    me: Holder,
    /// How long one operation may take: a fifth of the ttl, so that an owner whose NATS
    /// stalls finds out in time to stop before its lease expires.
    timeout: Duration,
}

impl Leases {
    /// Opens (or creates) the bucket `<bucket>-leases`, its entries living `ttl`, kept on
    /// `replicas` servers, for the replica named `replica`.
    ///
    /// # Errors
    /// When JetStream cannot create or open the bucket.
    pub async fn open(
        nats: &async_nats::Client,
        bucket: &str,
        replicas: usize,
        ttl: Duration,
        replica: &str,
    ) -> Result<Self, LeaseError> {
        let bucket = format!("{bucket}-leases");
        let jetstream = jetstream::new(nats.clone());
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "cometd-bridge source leases".into(),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..kv::Config::default()
        };
        // A cluster busy placing replicated buckets can take longer than a request's
        // timeout: a timed-out open is tried again, for a while.
        let started = std::time::Instant::now();
        let store = loop {
            match jetstream.create_or_update_key_value(config.clone()).await {
                Ok(store) => break store,
                // Only while connected: a server that cannot be reached is said at once.
                Err(error)
                    if error.to_string().contains("timed out")
                        && started.elapsed() < OPEN_PATIENCE
                        && nats.connection_state() == async_nats::connection::State::Connected =>
                {
                    tracing::warn!(bucket = %bucket, error = %error, "the lease bucket is slow to open; trying again");
                }
                Err(error) => {
                    return Err(LeaseError {
                        bucket: bucket.clone(),
                        what: "cannot be opened",
                        message: error.to_string(),
                    });
                }
            }
        };
        let instance = format!("{:016x}", fastrand::u64(..));
        let timeout = (ttl / 5).max(Duration::from_millis(200));
        Ok(Leases { store, bucket, me: Holder { replica: replica.to_string(), instance }, timeout })
    }

    fn error(&self, what: &'static str, error: impl std::fmt::Display) -> LeaseError {
        LeaseError { bucket: self.bucket.clone(), what, message: error.to_string() }
    }

    /// `operation`, or an error naming `what` once it takes longer than the timeout.
    async fn within<T>(
        &self,
        what: &'static str,
        operation: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        tokio::time::timeout(self.timeout, operation)
            .await
            .unwrap_or_else(|_| Err(self.error(what, format!("no answer within {:?}", self.timeout))))
    }

    fn value(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.me).expect("a holder serializes").into()
    }

    /// This replica.
    pub fn me(&self) -> &Holder {
        &self.me
    }

    /// Says this replica is alive, for another ttl.
    ///
    /// # Errors
    /// When NATS does not take it.
    pub async fn announce(&self) -> Result<(), LeaseError> {
        let key = format!("{REPLICA}{}", URL_SAFE_NO_PAD.encode(&self.me.replica));
        self.within("announce", async {
            self.store.put(key, self.value()).await.map_err(|error| self.error("announce", error))?;
            Ok(())
        })
        .await
    }

    /// The replicas alive (each announced itself within the ttl), and who holds each
    /// source's lease (with the lease's revision).
    ///
    /// # Errors
    /// When NATS cannot list the bucket.
    pub async fn view(&self) -> Result<(usize, BTreeMap<String, (Holder, u64)>), LeaseError> {
        self.within("view", self.read_view()).await
    }

    async fn read_view(&self) -> Result<(usize, BTreeMap<String, (Holder, u64)>), LeaseError> {
        let keys: Vec<String> = self
            .store
            .keys()
            .await
            .map_err(|error| self.error("keys", error))?
            .try_collect()
            .await
            .map_err(|error| self.error("keys", error))?;
        let replicas = keys.iter().filter(|key| key.starts_with(REPLICA)).count();
        let mut holders = BTreeMap::new();
        for key in keys.iter().filter_map(|key| key.strip_prefix(SOURCE)) {
            let Some(source) = URL_SAFE_NO_PAD.decode(key).ok().and_then(|name| String::from_utf8(name).ok())
            else {
                continue;
            };
            let entry = self
                .store
                .entry(format!("{SOURCE}{key}"))
                .await
                .map_err(|error| self.error("entry", error))?;
            if let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put)
                && let Ok(holder) = serde_json::from_slice::<Holder>(&entry.value)
            {
                holders.insert(source, (holder, entry.revision));
            }
        }
        Ok((replicas, holders))
    }

    /// Takes `source`'s lease if nobody holds it (or this replica's earlier run did);
    /// its revision when taken.
    ///
    /// # Errors
    /// When NATS does not answer.
    pub async fn acquire(&self, source: &str) -> Result<Option<u64>, LeaseError> {
        self.within("acquire", self.try_acquire(source)).await
    }

    async fn try_acquire(&self, source: &str) -> Result<Option<u64>, LeaseError> {
        let key = source_key(source);
        match self.store.create(&key, self.value()).await {
            Ok(revision) => return Ok(Some(revision)),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => return Err(self.error("create", error)),
        }
        let entry = self.store.entry(key.clone()).await.map_err(|error| self.error("entry", error))?;
        let Some(entry) = entry else { return Ok(None) };
        let earlier_run = serde_json::from_slice::<Holder>(&entry.value)
            .is_ok_and(|holder| holder.replica == self.me.replica && holder.instance != self.me.instance);
        if !earlier_run {
            return Ok(None);
        }
        self.update(source, entry.revision).await
    }

    /// Renews the lease held at `revision`; its new revision, or `None` when it is no
    /// longer this replica's (it expired and another took it).
    ///
    /// # Errors
    /// When NATS does not answer: the lease may still be held.
    pub async fn renew(&self, source: &str, revision: u64) -> Result<Option<u64>, LeaseError> {
        self.within("renew", self.update(source, revision)).await
    }

    async fn update(&self, source: &str, revision: u64) -> Result<Option<u64>, LeaseError> {
        let key = source_key(source);
        match self.store.update(&key, self.value(), revision).await {
            Ok(revision) => return Ok(Some(revision)),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
            Err(error) => return Err(self.error("update", error)),
        }
        // A renewal that timed out here may have reached the server all the same: the
        // lease is still this run's if the entry says so.
        let entry = self.store.entry(key.clone()).await.map_err(|error| self.error("entry", error))?;
        let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        if serde_json::from_slice::<Holder>(&entry.value).ok().as_ref() != Some(&self.me) {
            return Ok(None);
        }
        match self.store.update(&key, self.value(), entry.revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(self.error("update", error)),
        }
    }

    /// Gives the lease held at `revision` up, so that another replica takes it at once.
    ///
    /// # Errors
    /// When NATS does not answer: the lease then expires on its own.
    pub async fn release(&self, source: &str, revision: u64) -> Result<(), LeaseError> {
        self.within("release", async {
            self.store
                .delete_expect_revision(source_key(source), Some(revision))
                .await
                .map_err(|error| self.error("delete", error))
        })
        .await
    }
}

fn source_key(source: &str) -> String {
    format!("{SOURCE}{}", URL_SAFE_NO_PAD.encode(source))
}
