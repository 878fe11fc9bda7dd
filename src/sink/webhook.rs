//! The webhook sink: one signed HTTP POST per message, retried on timeouts, connection
//! errors, 408, 429 and 5xx with jittered exponential backoff (honouring `Retry-After`),
//! bounded by an attempt count and a total time.
//!
//! Signing follows Standard Webhooks: `webhook-id` (the same on every attempt, so the
//! receiver can de-duplicate), `webhook-timestamp` and `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`), recomputed on each attempt.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tokio_util::sync::CancellationToken;

use super::{Outcome, pause, retry_backoff};
use crate::bridge::envelope::Envelope;
use crate::config::WebhookSinkConfig;
use crate::telemetry::metrics::Metrics;

/// What one attempt came to.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Delivered,
    /// Worth trying again, after at least the server's `Retry-After`.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Not worth trying again.
    Reject {
        reason: String,
    },
}

/// Decides what an HTTP status means for the message.
fn classify(status: StatusCode, retry_after: Option<Duration>) -> Attempt {
    match status.as_u16() {
        200..=299 => Attempt::Delivered,
        408 | 429 | 500..=599 => {
            Attempt::Retry { reason: format!("HTTP {}", status.as_u16()), after: retry_after }
        }
        _ => Attempt::Reject { reason: format!("HTTP {}", status.as_u16()) },
    }
}

/// Posts a subscription's messages to one endpoint.
pub struct WebhookSink {
    http: reqwest::Client,
    config: WebhookSinkConfig,
    key: Option<Vec<u8>>,
    metrics: Metrics,
}

impl WebhookSink {
    /// A sink posting with `http` as `config` says.
    pub fn new(http: reqwest::Client, config: WebhookSinkConfig, metrics: Metrics) -> Self {
        let key = config.secret.as_ref().map(|secret| signing_key(secret.expose()));
        WebhookSink { http, config, key, metrics }
    }

    /// Delivers one message; `None` when `stop` was cancelled before it was delivered.
    pub(super) async fn deliver(&self, envelope: &Envelope, stop: &CancellationToken) -> Option<Outcome> {
        let body = serde_json::to_vec(&envelope.to_json()).expect("JSON values serialize");
        let id = format!("msg_{}", envelope.delivery_id());
        let started = Instant::now();
        let backoff = retry_backoff();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                attempt = self.attempt(&id, &body) => attempt,
            };
            let (reason, after) = match attempt {
                Attempt::Delivered => return Some(Outcome::Delivered),
                Attempt::Reject { reason } => {
                    self.metrics.delivery_failed(&envelope.subscription, "webhook", &reason);
                    return Some(Outcome::DeadLetter { reason: format!("rejected: {reason}"), attempts });
                }
                Attempt::Retry { reason, after } => (reason, after),
            };
            self.metrics.delivery_failed(&envelope.subscription, "webhook", &reason);
            let delay = backoff.delay(attempts - 1).max(after.unwrap_or_default());
            if attempts >= self.config.max_attempts || started.elapsed() + delay > self.config.max_elapsed {
                return Some(Outcome::DeadLetter {
                    reason: format!("gave up after {attempts} attempts: {reason}"),
                    attempts,
                });
            }
            tracing::info!(subscription = %envelope.subscription, attempt = attempts, reason, delay = ?delay, "webhook delivery failed; retrying");
            if !pause(delay, stop).await {
                return None;
            }
        }
    }

    async fn attempt(&self, id: &str, body: &[u8]) -> Attempt {
        let mut request = self
            .http
            .post(self.config.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .timeout(self.config.timeout)
            .body(body.to_vec());
        if let Some(key) = &self.key {
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            request = request
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", sign(key, id, timestamp, body));
        }
        match request.send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                classify(response.status(), retry_after)
            }
            Err(error) if error.is_timeout() => Attempt::Retry { reason: "timeout".into(), after: None },
            Err(error) if error.is_connect() => {
                Attempt::Retry { reason: "connection failed".into(), after: None }
            }
            Err(error) => Attempt::Retry { reason: format!("request failed: {error}"), after: None },
        }
    }
}

/// The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`, or the raw bytes
/// of any other secret.
fn signing_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64.decode(encoded).unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(b".");
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!("v1,{}", BASE64.encode(context.sign().as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification.
    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn statuses_are_classified_for_retry() {
        let retry_after = Some(Duration::from_secs(3));
        for (status, expected) in [
            (200, Attempt::Delivered),
            (204, Attempt::Delivered),
            (408, Attempt::Retry { reason: "HTTP 408".into(), after: None }),
            (429, Attempt::Retry { reason: "HTTP 429".into(), after: None }),
            (500, Attempt::Retry { reason: "HTTP 500".into(), after: None }),
            (503, Attempt::Retry { reason: "HTTP 503".into(), after: None }),
            (400, Attempt::Reject { reason: "HTTP 400".into() }),
            (404, Attempt::Reject { reason: "HTTP 404".into() }),
            (410, Attempt::Reject { reason: "HTTP 410".into() }),
        ] {
            assert_eq!(classify(StatusCode::from_u16(status).unwrap(), None), expected, "{status}");
        }
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, retry_after),
            Attempt::Retry { reason: "HTTP 429".into(), after: retry_after }
        );
    }
}
