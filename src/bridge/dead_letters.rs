//! The dead letters as the bridge handles them: made by the forwarder from a message it
//! gives up on, listed a page at a time, retried one at a time or in bulk by filter,
//! discarded. A retry requeues the spooled record the dead letter kept, so the sink
//! receives the bytes of the first attempt; a dead letter stored before records were kept
//! is rebuilt from its `message`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::spool::{Spool, Spooled};
use super::{Bridge, BridgeError};
use crate::cometd::{Data, Message};
use crate::delivery::Envelope;
use crate::store::{DeadLetter, DeadLetterFilter, SpoolAppend, record_id};

/// Dead letters read (and requeued or removed, in one store transaction) at a time by a
/// bulk retry or discard.
const BULK_PAGE: usize = 1000;

/// What is wrong with a [`DeadLetterFilter`].
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// `before` is not a timestamp.
    #[error("before: {0:?} is not an RFC 3339 timestamp (e.g. 2026-01-01T00:00:00Z)")]
    Before(String),
}

/// A [`DeadLetterFilter`] checked and ready to match.
#[derive(Clone, Debug)]
pub struct LetterFilter {
    subscription: Option<String>,
    reason: Option<String>,
    before: Option<SystemTime>,
}

impl LetterFilter {
    /// Checks `filter`.
    ///
    /// # Errors
    /// [`FilterError::Before`] when `before` is not an RFC 3339 timestamp.
    pub fn new(filter: DeadLetterFilter) -> Result<Self, FilterError> {
        let before = match filter.before {
            Some(text) => Some(parse_rfc3339(&text).ok_or(FilterError::Before(text))?),
            None => None,
        };
        Ok(LetterFilter { subscription: filter.subscription, reason: filter.reason, before })
    }

    /// Whether `letter` matches, among those stored no later than `until`. One whose
    /// `failed_at` cannot be read counts as old: only a filter on `before` leaves it out.
    fn matches(&self, letter: &DeadLetter, until: SystemTime) -> bool {
        let stored_in_time = match parse_rfc3339(&letter.failed_at) {
            Some(failed_at) => failed_at <= until && self.before.is_none_or(|before| failed_at < before),
            None => self.before.is_none(),
        };
        stored_in_time
            && self.subscription.as_ref().is_none_or(|subscription| *subscription == letter.subscription)
            && self.reason.as_ref().is_none_or(|reason| letter.reason.contains(reason.as_str()))
    }
}

/// An RFC 3339 timestamp (`Z` or a `±HH:MM` offset, fractions of seconds allowed).
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    if !text.is_ascii() {
        return None;
    }
    // ASCII from here: any byte index is a character boundary.
    let zone = text.get(text.len().saturating_sub(6)..).unwrap_or_default();
    let (base, offset) = match zone.as_bytes() {
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|digit| digit.is_ascii_digit()) =>
        {
            let hours = u64::from((h1 - b'0') * 10 + (h2 - b'0'));
            let minutes = u64::from((m1 - b'0') * 10 + (m2 - b'0'));
            if hours > 23 || minutes > 59 {
                return None;
            }
            let behind_utc = *sign == b'-';
            (
                format!("{}Z", &text[..text.len() - 6]),
                Some((behind_utc, Duration::from_secs(hours * 3600 + minutes * 60))),
            )
        }
        _ => (text.to_string(), None),
    };
    let local = humantime::parse_rfc3339(&base.to_ascii_uppercase()).ok()?;
    match offset {
        // Local time behind UTC: the instant is later.
        Some((true, offset)) => local.checked_add(offset),
        Some((false, offset)) => local.checked_sub(offset),
        None => Some(local),
    }
}

/// The dead letter of `envelope`, without its spooled record yet (the forwarder reads it
/// back from the spool before storing it).
pub(super) fn dead_letter(envelope: &Envelope, reason: &str, attempts: u32) -> DeadLetter {
    DeadLetter {
        id: record_id(&envelope.delivery_id()),
        subscription: envelope.subscription.to_string(),
        source: envelope.source.to_string(),
        session: envelope.session.to_string(),
        sequence: envelope.sequence,
        replay_id: envelope.replay_id,
        message: envelope.to_json(),
        reason: reason.to_string(),
        attempts,
        failed_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        record: None,
    }
}

/// What requeuing `letter` appends to its spool, and the message as the forwarder takes
/// it: the record the dead letter kept, byte for byte, or else one rebuilt from `message`.
fn requeue_of(letter: &DeadLetter) -> (Vec<u8>, Envelope) {
    if let Some(record) = &letter.record {
        match Envelope::from_record(record.as_bytes()) {
            Ok(envelope) => return (record.as_bytes().to_vec(), envelope),
            Err(error) => {
                tracing::error!(id = %letter.id, error = %error, "a dead letter's record is unreadable; retrying the message rebuilt from its JSON");
            }
        }
    }
    let message = &letter.message;
    let envelope = Envelope {
        source: letter.source.as_str().into(),
        subscription: letter.subscription.as_str().into(),
        session: letter.session.as_str().into(),
        sequence: letter.sequence,
        replay_id: letter.replay_id,
        message: Arc::new(Message {
            id: message["id"].as_str().map(str::to_owned),
            data: Some(&message["data"]).filter(|data| !data.is_null()).map(Data::from),
            ext: message["ext"].as_object().cloned(),
            ..Message::new(message["channel"].as_str().unwrap_or_default())
        }),
        received_at: SystemTime::now(),
    };
    (envelope.to_record(), envelope)
}

/// The API's form of a dead letter: without the spooled record it keeps.
fn shown(letter: DeadLetter) -> DeadLetter {
    DeadLetter { record: None, ..letter }
}

impl Bridge {
    /// Up to `limit` dead letters in id order after the id `after`, and the id to continue
    /// after when more follow.
    ///
    /// # Errors
    /// [`BridgeError::Store`].
    pub async fn dead_letters_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<String>), BridgeError> {
        let (letters, more) = self.store.dead_letters_page(after, limit).await?;
        let next = more.then(|| letters.last().map(|letter| letter.id.clone())).flatten();
        Ok((letters.into_iter().map(shown).collect(), next))
    }

    /// Removes a dead letter for good.
    ///
    /// # Errors
    /// [`BridgeError::NotFound`], [`BridgeError::Store`].
    pub async fn discard_dead_letter(&self, id: &str) -> Result<(), BridgeError> {
        match self.store.delete_dead_letter(id).await? {
            true => Ok(()),
            false => Err(BridgeError::NotFound(format!("dead letter {id:?}"))),
        }
    }

    /// The spool of a subscription, if it still exists.
    fn spool_of(&self, subscription: &str) -> Option<Arc<Spool>> {
        self.subscriptions.get(subscription, |entry| entry.spool.clone())
    }

    /// Hands a dead letter back to its subscription: in one transaction it leaves the
    /// dead letters and joins the spool, with its original delivery id (so `webhook-id`
    /// and `Nats-Msg-Id` stay the same) and its original bytes. If it fails again it is a
    /// dead letter again.
    ///
    /// # Errors
    /// [`BridgeError::NotFound`] (also when a concurrent retry took it), [`BridgeError::Conflict`]
    /// when its subscription is gone, [`BridgeError::Store`].
    pub async fn retry_dead_letter(&self, id: &str) -> Result<(), BridgeError> {
        // Not while a reload replaces the subscription's spool.
        let _one_change = self.reloading.lock().await;
        let not_found = || BridgeError::NotFound(format!("dead letter {id:?}"));
        let letter = self.store.dead_letter(id).await?.ok_or_else(not_found)?;
        let spool = self.spool_of(&letter.subscription).ok_or_else(|| {
            BridgeError::Conflict(format!(
                "subscription {:?} no longer exists; discard the dead letter instead",
                letter.subscription
            ))
        })?;
        let (record, envelope) = requeue_of(&letter);
        let bytes = record.len() as u64;
        let append = SpoolAppend { subscription: envelope.subscription.clone(), record };
        let sequence = self.store.requeue_dead_letter(id, append).await?.ok_or_else(not_found)?;
        spool.appended([Spooled { sequence, bytes, envelope }]);
        Ok(())
    }

    /// Retries every dead letter that matches `filter` and was stored before the call
    /// (one that fails again during it is not taken twice), 1,000 at a time in
    /// one store transaction each; how many were requeued. One whose subscription is gone,
    /// or whose spool has no room for it (its quota or all spools' bound), is skipped
    /// (logged, not counted); one taken meanwhile by another retry or a discard is not
    /// counted.
    ///
    /// # Errors
    /// [`BridgeError::Store`]; what was requeued before it stays requeued.
    pub async fn retry_dead_letters(&self, filter: &LetterFilter) -> Result<u64, BridgeError> {
        // Not while a reload replaces a subscription's spool.
        let _one_change = self.reloading.lock().await;
        let until = SystemTime::now();
        let mut after: Option<String> = None;
        let mut count = 0;
        loop {
            let (page, more) = self.store.dead_letters_page(after.as_deref(), BULK_PAGE).await?;
            after = page.last().map(|letter| letter.id.clone());
            let mut requeues = Vec::new();
            let mut taken = Vec::new();
            // Bytes this page adds to each spool, beside what it holds.
            let mut pending: BTreeMap<String, u64> = BTreeMap::new();
            for letter in page.iter().filter(|letter| filter.matches(letter, until)) {
                let Some(spool) = self.spool_of(&letter.subscription) else {
                    tracing::warn!(id = %letter.id, subscription = %letter.subscription, "a dead letter whose subscription no longer exists is not retried");
                    continue;
                };
                let (record, envelope) = requeue_of(letter);
                let bytes = record.len() as u64;
                // A retry does not make its subscription full: what does not fit stays a
                // dead letter, for a later retry.
                let pending = pending.entry(letter.subscription.clone()).or_insert(0);
                if let Err(cause) = spool.room_for(*pending, bytes) {
                    tracing::warn!(id = %letter.id, subscription = %letter.subscription, cause = %cause, "a dead letter is not retried: its spool has no room for it; retry again once the spool drained");
                    continue;
                }
                *pending += bytes;
                requeues.push((
                    letter.id.clone(),
                    SpoolAppend { subscription: envelope.subscription.clone(), record },
                ));
                taken.push((spool, bytes, envelope));
            }
            if !requeues.is_empty() {
                let sequences = self.store.requeue_dead_letters(requeues).await?;
                // Each spool learns of its messages in the order of their sequences.
                let mut by_spool: BTreeMap<Arc<str>, (Arc<Spool>, Vec<Spooled>)> = BTreeMap::new();
                for ((spool, bytes, envelope), sequence) in taken.into_iter().zip(sequences) {
                    let Some(sequence) = sequence else { continue };
                    count += 1;
                    by_spool
                        .entry(envelope.subscription.clone())
                        .or_insert_with(|| (spool, Vec::new()))
                        .1
                        .push(Spooled { sequence, bytes, envelope });
                }
                for (spool, spooled) in by_spool.into_values() {
                    spool.appended(spooled);
                }
            }
            if !more {
                return Ok(count);
            }
        }
    }

    /// Discards every dead letter that matches `filter` and was stored before the call,
    /// 1,000 at a time in one store transaction each; how many were discarded.
    ///
    /// # Errors
    /// [`BridgeError::Store`]; what was discarded before it stays discarded.
    pub async fn discard_dead_letters(&self, filter: &LetterFilter) -> Result<u64, BridgeError> {
        let until = SystemTime::now();
        let mut after: Option<String> = None;
        let mut count = 0;
        loop {
            let (page, more) = self.store.dead_letters_page(after.as_deref(), BULK_PAGE).await?;
            after = page.last().map(|letter| letter.id.clone());
            let ids: Vec<String> = page
                .iter()
                .filter(|letter| filter.matches(letter, until))
                .map(|letter| letter.id.clone())
                .collect();
            if !ids.is_empty() {
                count += self.store.delete_dead_letters(ids).await?;
            }
            if !more {
                return Ok(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_read_with_z_or_an_offset() {
        let utc = parse_rfc3339("2026-01-01T10:00:00Z").expect("Z");
        assert_eq!(parse_rfc3339("2026-01-01T10:00:00.000Z"), Some(utc));
        assert_eq!(parse_rfc3339("2026-01-01T12:00:00+02:00"), Some(utc));
        assert_eq!(parse_rfc3339("2026-01-01T07:30:00-02:30"), Some(utc));
        assert_eq!(parse_rfc3339("2026-01-01t10:00:00z"), Some(utc));
        for bad in [
            "",
            "yesterday",
            "2026-01-01",
            "2026-01-01T10:00:00+25:00",
            "2026-01-01T10:00:00+0200",
            "2026-01-01T10:00:00+é:00",
            "2026-01-01T10:00:00é0:00",
            "é",
            "aé12345",
            "+01:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    fn letter(subscription: &str, reason: &str, failed_at: &str) -> DeadLetter {
        DeadLetter {
            id: "x".into(),
            subscription: subscription.into(),
            source: "demo".into(),
            session: "s".into(),
            sequence: 1,
            replay_id: None,
            message: serde_json::json!({}),
            reason: reason.into(),
            attempts: 1,
            failed_at: failed_at.into(),
            record: None,
        }
    }

    #[test]
    fn a_filter_matches_on_every_field_it_has() {
        let now = SystemTime::now();
        let filter = |subscription: Option<&str>, reason: Option<&str>, before: Option<&str>| {
            LetterFilter::new(DeadLetterFilter {
                subscription: subscription.map(str::to_string),
                reason: reason.map(str::to_string),
                before: before.map(str::to_string),
            })
            .expect("valid")
        };
        let a = letter("orders", "rejected: HTTP 400", "2026-01-01T10:00:00.000Z");
        assert!(filter(None, None, None).matches(&a, now));
        assert!(filter(Some("orders"), Some("HTTP 4"), Some("2026-01-01T10:00:00.001Z")).matches(&a, now));
        assert!(!filter(Some("order"), None, None).matches(&a, now), "the subscription exactly");
        assert!(!filter(None, Some("http"), None).matches(&a, now), "case-sensitive");
        assert!(!filter(None, None, Some("2026-01-01T10:00:00Z")).matches(&a, now), "strictly before");
        assert!(!filter(None, None, None).matches(&a, parse_rfc3339("2026-01-01T09:00:00Z").unwrap()));
        let unreadable = letter("orders", "rejected: HTTP 400", "long ago");
        assert!(filter(Some("orders"), None, None).matches(&unreadable, now));
        assert!(!filter(None, None, Some("2026-01-01T10:00:00Z")).matches(&unreadable, now));
        assert!(
            LetterFilter::new(DeadLetterFilter {
                before: Some("soon".into()),
                ..DeadLetterFilter::default()
            })
            .is_err()
        );
    }
}
