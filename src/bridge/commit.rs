//! Group commit, pipelined: a source's messages go to the spools in batches, one append
//! in flight at a time (so that every spool keeps arrival order), and the next batch
//! gathers while the previous one syncs. A synced append serves every message that
//! arrived during the sync before it, so the sync sets the batch size by itself and a
//! message waits for at most the sync in flight and its own, with no window of its own
//! beyond the store's [`append_window`](crate::store::Spools::append_window), which
//! overlaps the sync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::source::{Appended, Spooler};
use crate::cometd::Message;

/// Messages appended at most in one transaction.
pub const BATCH: usize = 512;

/// The batches of one source session: the one being appended and the one gathering.
pub struct Pipeline {
    /// The append in flight, on a task of its own, so that its records are built while
    /// the source goes on reading.
    in_flight: Option<JoinHandle<Appended>>,
    /// What arrived since it started.
    gathering: Vec<Message>,
    /// When the last append started.
    last_start: Option<Instant>,
    /// At most one append starts per window while messages keep coming.
    window: Duration,
}

impl Pipeline {
    /// An empty pipeline starting at most one append per `window`.
    pub fn new(window: Duration) -> Self {
        Pipeline { in_flight: None, gathering: Vec::with_capacity(BATCH), last_start: None, window }
    }

    /// Whether the gathering batch takes more messages (else the source stops reading
    /// until the append in flight is done: the server's messages wait in the session).
    pub fn has_room(&self) -> bool {
        self.gathering.len() < BATCH
    }

    /// Adds a received message to the gathering batch.
    pub fn push(&mut self, message: Message) {
        self.gathering.push(message);
    }

    /// Starts appending the gathering batch when no append is in flight and its window
    /// has passed (or it is full); `true` when one started.
    pub fn start_if_due(&mut self, spooler: &Spooler, session: &Arc<str>, stop: &CancellationToken) -> bool {
        if self.in_flight.is_some() || self.gathering.is_empty() {
            return false;
        }
        let now = Instant::now();
        if self.has_room() && self.last_start.is_some_and(|started| now < started + self.window) {
            return false;
        }
        self.last_start = Some(now);
        let batch = std::mem::replace(&mut self.gathering, Vec::with_capacity(BATCH));
        let (spooler, session, stop) = (spooler.clone(), session.clone(), stop.clone());
        self.in_flight = Some(tokio::spawn(async move { spooler.spool(batch, &session, &stop).await }));
        true
    }

    /// Waits until the append in flight is done (its outcome) or, with none in flight,
    /// until the gathering batch's window ends (`None`: time to start it). Never returns
    /// while there is nothing to wait for. Cancel-safe.
    pub async fn progress(&mut self) -> Option<Appended> {
        if let Some(in_flight) = &mut self.in_flight {
            let done = in_flight.await;
            self.in_flight = None;
            return Some(finished(done));
        }
        match self.last_start {
            Some(started) if !self.gathering.is_empty() => {
                tokio::time::sleep_until((started + self.window).into()).await;
                None
            }
            _ => std::future::pending().await,
        }
    }

    /// Waits for the append in flight and appends what gathered meanwhile; returns what
    /// they left to do.
    pub async fn flush(
        &mut self,
        spooler: &Spooler,
        session: &Arc<str>,
        stop: &CancellationToken,
    ) -> Appended {
        let mut outcome = Appended::default();
        if let Some(in_flight) = self.in_flight.take() {
            outcome.hold.extend(finished(in_flight.await).hold);
        }
        if !self.gathering.is_empty() {
            let batch = std::mem::take(&mut self.gathering);
            outcome.hold.extend(spooler.spool(batch, session, stop).await.hold);
        }
        outcome
    }
}

/// An append task's outcome; its panic goes on in the source task (whose supervisor
/// reports and restarts it).
fn finished(done: Result<Appended, tokio::task::JoinError>) -> Appended {
    match done {
        Ok(appended) => appended,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: the runtime is shutting down.
        Err(_) => Appended::default(),
    }
}
