//! The forwarder: one task per subscription that delivers its spool to the sink in order.
//! Each message of a batch ends delivered, dead-lettered (a permanent failure, or
//! transient failures past `retry.max_elapsed`), or still spooled (the bridge is
//! stopping); a settled prefix of the batch leaves the spool in one transaction with its
//! dead letters and its replay positions, so a crash at any point repeats deliveries
//! (with the same delivery ids) but loses none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::replay::ReplayState;
use super::spool::{Spool, Spooled};
use crate::delivery::Envelope;
use crate::sink::{Failure, RetryPolicy, Sink, pause};
use crate::store::{DeadLetter, Settlement, Store};
use crate::telemetry::metrics::Metrics;

/// A subscription's counts, for the API.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages routed to it.
    pub received: AtomicU64,
    /// Messages its sink acknowledged.
    pub forwarded: AtomicU64,
    /// Messages stored as dead letters.
    pub dead_letters: AtomicU64,
    /// Messages dropped because the subscription was full (without replay).
    pub dropped: AtomicU64,
    /// The forwarder's last unexpected failure.
    pub health: super::supervise::TaskHealth,
}

impl Counters {
    fn add(counter: &AtomicU64, count: u64) {
        counter.fetch_add(count, Ordering::Relaxed);
    }
}

/// How a forwarder is told to stop.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    /// Finish the attempt in flight (settling what it delivered), start no other.
    pub soon: CancellationToken,
    /// Abandon the attempt in flight: its messages stay in the spool.
    pub now: CancellationToken,
}

impl Stop {
    /// Tokens that also fire when `parent`'s do.
    pub fn child(parent: &Stop) -> Stop {
        Stop { soon: parent.soon.child_token(), now: parent.now.child_token() }
    }
}

/// Delivered messages are settled at most this long after the first of them...
const SETTLE_AFTER: Duration = Duration::from_millis(50);

/// ...or once this many are waiting: one transaction for many small batches, and a crash
/// delivers at most these again (under the same delivery ids).
const SETTLE_EVERY: u64 = 4096;

/// Delivered or dead-lettered messages not settled yet, as one settlement.
struct Unsettled {
    since: Instant,
    settlement: Settlement,
    messages: u64,
    bytes: u64,
    /// When the first message after them was received, if one is in flight.
    oldest_after: Option<SystemTime>,
    /// The spool sequence of each dead letter of the settlement whose spooled record is
    /// still to be read back (see [`Forwarder::attach_records`]).
    letter_sequences: Vec<u64>,
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// What became of one message of a batch.
#[derive(Clone, Debug)]
enum Status {
    /// Not settled yet.
    Spooled,
    /// The sink acknowledged it.
    Delivered,
    /// It becomes a dead letter.
    DeadLetter { reason: String, attempts: u32 },
}

/// A subscription's delivery task; a clone delivers through the same sink connection
/// (a supervisor starts a clone again after a failure).
#[derive(Clone)]
pub struct Forwarder {
    /// The subscription's id.
    pub subscription: Arc<str>,
    /// Where messages go.
    pub sink: Sink,
    /// Where they come from.
    pub spool: Arc<Spool>,
    /// Where settlements go.
    pub store: Arc<dyn Store>,
    /// Metrics.
    pub metrics: Metrics,
    /// The subscription's counts.
    pub counters: Arc<Counters>,
    /// The source's replay state, when it uses replay: positions advance here.
    pub replay: Option<Arc<ReplayState>>,
    /// How transient failures are retried.
    pub retry: RetryPolicy,
    /// Until when this replica may deliver and settle (see [`LeaseClock`](super::gate::LeaseClock)).
    pub lease: Arc<super::gate::LeaseClock>,
}

impl Forwarder {
    /// Delivers the spool while this replica owns the subscription's source (`owned`;
    /// always, with one replica), until told to stop. Each time it owns the source again
    /// it resumes where the spool says (the store, refreshed by the taker).
    pub async fn run_while_owned(self, stop: Stop, mut gate: super::gate::Gate) {
        loop {
            tokio::select! {
                biased;
                _ = stop.soon.cancelled() => return,
                owned = gate.opened() => if !owned { return },
            }
            let _running = gate.enter();
            let period = Stop::child(&stop);
            let run = self.clone().run(self.spool.resume_from(), period.clone());
            tokio::pin!(run);
            tokio::select! {
                () = &mut run => {}
                () = gate.closed() => {
                    // The batch in flight is finished and settled; no other is started.
                    period.soon.cancel();
                    run.await;
                }
            }
            if stop.soon.is_cancelled() {
                return;
            }
            // Stopped by a lapsed lease while still owned: wait for the renewal or the
            // end of ownership rather than start again at once.
            while !self.lease.may_write() {
                tokio::select! {
                    biased;
                    _ = stop.soon.cancelled() => return,
                    () = gate.closed() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }

    /// Delivers the spool from sequence `first` on until told to stop.
    pub async fn run(self, first: u64, stop: Stop) {
        let forwarded = self.metrics.forwarded_counter(&self.subscription, self.sink.kind());
        let mut next = first;
        let mut unsettled: Option<Unsettled> = None;
        loop {
            let commit_by = unsettled.as_ref().map(|unsettled| unsettled.since + SETTLE_AFTER);
            let batch = tokio::select! {
                biased;
                _ = stop.soon.cancelled() => break,
                _ = sleep_until_some(commit_by) => {
                    if !self.commit(&mut unsettled, &stop.now).await {
                        return;
                    }
                    continue;
                }
                batch = self.spool.next_batch(next, self.sink.batch_size()) => batch,
            };
            let mut batch = match batch {
                Ok(batch) if batch.is_empty() => continue,
                Ok(batch) => batch,
                Err(error) => {
                    tracing::error!(subscription = %self.subscription, error = %error, "cannot read the spool; trying again");
                    if !pause(Duration::from_secs(1), &stop.soon).await {
                        break;
                    }
                    continue;
                }
            };
            if !self.lease.may_write() {
                tracing::warn!(subscription = %self.subscription, "this replica's lease on the source has lapsed: not delivering");
                break;
            }
            if unsettled.is_none() {
                self.spool.set_oldest(Some(batch[0].envelope.received_at));
            }
            if !self.deliver(&mut batch, &stop, &forwarded, &mut unsettled).await {
                break;
            }
            if unsettled.as_ref().is_some_and(|unsettled| unsettled.messages >= SETTLE_EVERY)
                && !self.commit(&mut unsettled, &stop.now).await
            {
                return;
            }
            next = batch.last().expect("a batch is not empty").sequence + 1;
        }
        // What was delivered is settled before the forwarder goes.
        self.commit(&mut unsettled, &stop.now).await;
    }

    /// Delivers `batch` until every message is delivered or dead-lettered, adding what
    /// is done to `unsettled`; `false` when stopped first (what is not done stays in the
    /// spool).
    async fn deliver(
        &self,
        batch: &mut [Spooled],
        stop: &Stop,
        forwarded: &prometheus_client::metrics::counter::Counter,
        unsettled: &mut Option<Unsettled>,
    ) -> bool {
        let mut status = vec![Status::Spooled; batch.len()];
        let mut attempts = vec![0u32; batch.len()];
        let mut settled = 0;
        let mut failures = 0u32;
        let mut failing_since: Option<Instant> = None;
        loop {
            let pending: Vec<usize> =
                (0..batch.len()).filter(|index| matches!(status[*index], Status::Spooled)).collect();
            if pending.is_empty() {
                break;
            }
            let envelopes: Vec<&Envelope> = pending.iter().map(|index| &batch[*index].envelope).collect();
            let results = self.sink.attempt(&envelopes, &stop.now).await;
            let mut failure: Option<Failure> = None;
            for (result, index) in results.into_iter().zip(&pending) {
                attempts[*index] += 1;
                match result {
                    Ok(()) => {
                        status[*index] = Status::Delivered;
                        forwarded.inc();
                        Counters::add(&self.counters.forwarded, 1);
                        let received_at = batch[*index].envelope.received_at;
                        self.metrics.forward_latency(
                            SystemTime::now().duration_since(received_at).unwrap_or_default(),
                        );
                    }
                    Err(failed) => {
                        self.metrics.delivery_failed(&self.subscription, self.sink.kind(), failed.label);
                        if failed.is_permanent() {
                            status[*index] = Status::DeadLetter {
                                reason: failed.reason.clone(),
                                attempts: attempts[*index],
                            };
                        } else {
                            failure = Some(failed);
                        }
                    }
                }
            }
            if stop.soon.is_cancelled() || stop.now.is_cancelled() {
                self.done(batch, &status, &mut settled, unsettled);
                return false;
            }
            if status.iter().all(|status| !matches!(status, Status::Spooled)) {
                break;
            }
            let failure = failure.unwrap_or_else(|| Failure::transient("unavailable", "not attempted"));
            failures += 1;
            let since = *failing_since.get_or_insert_with(Instant::now);
            let delay = self.retry.delay(failures, failure.retry_after());
            let most_attempts = pending.iter().map(|index| attempts[*index]).max().unwrap_or(0);
            if self.retry.exhausted(since, most_attempts, delay) {
                let reason = format!(
                    "gave up after {most_attempts} attempts over {}: {}",
                    humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                    failure.reason
                );
                for index in pending {
                    if matches!(status[index], Status::Spooled) {
                        status[index] =
                            Status::DeadLetter { reason: reason.clone(), attempts: attempts[index] };
                    }
                }
                continue;
            }
            tracing::warn!(subscription = %self.subscription, sink = self.sink.kind(), reason = %failure.reason, attempt = most_attempts, delay = ?delay, "delivery failed; retrying from the spool");
            if failures == 1 {
                // Held for retries, perhaps for hours: in buffers of their own, not pinning
                // the network buffers they arrived in.
                for spooled in batch.iter_mut() {
                    spooled.envelope.message =
                        Arc::new(super::source::detached((*spooled.envelope.message).clone()));
                }
            }
            // What is done before the failing message is settled now: the wait may be long.
            self.done(batch, &status, &mut settled, unsettled);
            if !self.commit(unsettled, &stop.now).await || !pause(delay, &stop.soon).await {
                return false;
            }
        }
        self.done(batch, &status, &mut settled, unsettled);
        true
    }

    /// Adds the messages from `settled` up to the first one still spooled to `unsettled`.
    fn done(
        &self,
        batch: &[Spooled],
        status: &[Status],
        settled: &mut usize,
        unsettled: &mut Option<Unsettled>,
    ) {
        let end = status.iter().position(|status| matches!(status, Status::Spooled)).unwrap_or(batch.len());
        if end <= *settled {
            // Nothing more is done, but what waits first is now this batch's message: the
            // settlement of an earlier batch must not report the backlog as fresh.
            if let Some(entry) = unsettled {
                entry.oldest_after = batch.get(end).map(|spooled| spooled.envelope.received_at);
            }
            return;
        }
        let part = &batch[*settled..end];
        let (letter_sequences, dead_letters): (Vec<u64>, Vec<DeadLetter>) = part
            .iter()
            .zip(&status[*settled..end])
            .filter_map(|(spooled, status)| match status {
                Status::DeadLetter { reason, attempts } => Some((
                    spooled.sequence,
                    super::dead_letters::dead_letter(&spooled.envelope, reason, *attempts),
                )),
                _ => None,
            })
            .unzip();
        let through = part.last().expect("not empty").sequence;
        let positions = self.positions(part);
        let entry = unsettled.get_or_insert_with(|| Unsettled {
            since: Instant::now(),
            settlement: Settlement {
                subscription: self.subscription.to_string(),
                through,
                positions: None,
                dead_letters: Vec::new(),
            },
            messages: 0,
            bytes: 0,
            oldest_after: None,
            letter_sequences: Vec::new(),
        });
        entry.settlement.through = through;
        entry.settlement.dead_letters.extend(dead_letters);
        entry.letter_sequences.extend(letter_sequences);
        entry.settlement.positions = positions.or(entry.settlement.positions.take());
        entry.messages += part.len() as u64;
        entry.bytes += part.iter().map(|spooled| spooled.bytes).sum::<u64>();
        entry.oldest_after = batch.get(end).map(|spooled| spooled.envelope.received_at);
        *settled = end;
    }

    /// Settles what `unsettled` holds: trims it from the spool with its dead letters and
    /// positions in one transaction, retrying a failing store until `stop`. `false` when
    /// stopped first (the messages stay in the spool and are delivered again).
    async fn commit(&self, unsettled: &mut Option<Unsettled>, stop: &CancellationToken) -> bool {
        let Some(mut done) = unsettled.take() else { return true };
        if !self.lease.may_write() {
            // The next owner delivers them again, under the same ids.
            tracing::warn!(subscription = %self.subscription, messages = done.messages, "this replica's lease on the source has lapsed: not settling what it delivered");
            return false;
        }
        let mut failures = 0;
        loop {
            let settled = match self.attach_records(&mut done).await {
                Ok(()) => self.store.spool_settle(done.settlement.clone()).await,
                Err(error) => Err(error),
            };
            let Err(error) = settled else { break };
            tracing::error!(subscription = %self.subscription, error = %error, "cannot settle delivered messages in the state store; trying again (they stay in the spool meanwhile)");
            failures += 1;
            if !pause(Duration::from_millis(100 * 2u64.pow(failures.min(6))), stop).await {
                return false;
            }
        }
        let letters = &done.settlement.dead_letters;
        for letter in letters {
            tracing::warn!(subscription = %self.subscription, id = %letter.id, reason = %letter.reason, "message stored as a dead letter");
            self.metrics.dead_lettered(&self.subscription);
        }
        Counters::add(&self.counters.dead_letters, letters.len() as u64);
        self.spool.settled(done.settlement.through, done.messages, done.bytes);
        self.spool.set_oldest(done.oldest_after);
        true
    }

    /// Gives each dead letter of `done` its spooled record, read back from the store (it
    /// is trimmed only by this settlement), so that a retry requeues exactly those bytes.
    /// One read covers the span of the batch's dead letters (several when it is larger
    /// than one read returns); dead letters are the exception, so deliveries pay nothing.
    async fn attach_records(&self, done: &mut Unsettled) -> Result<(), crate::store::StoreError> {
        let (Some(&first), Some(&last)) = (done.letter_sequences.first(), done.letter_sequences.last())
        else {
            return Ok(());
        };
        let mut records = std::collections::HashMap::with_capacity(done.letter_sequences.len());
        let wanted: std::collections::HashSet<u64> = done.letter_sequences.iter().copied().collect();
        let mut next = first;
        while next <= last {
            let span = usize::try_from(last - next + 1).unwrap_or(usize::MAX);
            let entries = self.store.spool_read(&self.subscription, next, span).await?;
            let Some(read_through) = entries.last().map(|entry| entry.sequence) else { break };
            for entry in entries {
                if wanted.contains(&entry.sequence) {
                    records.insert(entry.sequence, entry.record);
                }
            }
            next = read_through + 1;
        }
        for (letter, sequence) in done.settlement.dead_letters.iter_mut().zip(&done.letter_sequences) {
            match records.remove(sequence).map(String::from_utf8) {
                Some(Ok(record)) => letter.record = Some(record),
                // Not there or not text (never seen): its retry rebuilds it from `message`.
                _ => {
                    tracing::warn!(subscription = %self.subscription, id = %letter.id, "the spooled record of a dead letter could not be read back; a retry will rebuild it")
                }
            }
        }
        done.letter_sequences.clear();
        Ok(())
    }

    /// The committed positions after `part`, when it carries replay ids.
    fn positions(&self, part: &[Spooled]) -> Option<crate::store::Positions> {
        let replay = self.replay.as_ref()?;
        let mut positions = None;
        for spooled in part {
            if let Some(replay_id) = spooled.envelope.replay_id {
                positions = replay
                    .commit(&self.subscription, &spooled.envelope.message.channel, replay_id)
                    .or(positions);
            }
        }
        positions
    }
}
