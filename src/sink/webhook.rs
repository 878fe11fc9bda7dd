//! The webhook sink: one signed HTTP POST per message, up to `max_in_flight` at once. 2xx
//! is delivered; timeouts, connection errors, 408, 429 and 5xx are transient (honouring
//! `Retry-After`); redirects (never followed) and other 4xx are permanent.
//!
//! Signing follows Standard Webhooks: `webhook-id` (the same on every attempt, so the
//! receiver can de-duplicate), `webhook-timestamp` and `webhook-signature`
//! (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body`), recomputed on each attempt.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use tokio_util::sync::CancellationToken;

use super::destination::{PrivateDestination, WebhookClients};
use super::settings::WebhookSinkConfig;
use super::{Attempted, Failure, FailureKind};
use crate::delivery::{Envelope, visible_ascii};

/// What an HTTP status means for the message.
fn classify(status: StatusCode, retry_after: Option<Duration>) -> Result<(), Failure> {
    let code = status.as_u16();
    match code {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(Failure {
            reason: format!("HTTP {code}"),
            label: status_label(code),
            kind: FailureKind::Transient { retry_after },
        }),
        300..=399 => Err(Failure::permanent("redirect", format!("HTTP {code}: redirects are not followed"))),
        _ => Err(Failure::permanent(status_label(code), format!("rejected: HTTP {code}"))),
    }
}

/// A bounded metrics label for a status.
fn status_label(code: u16) -> &'static str {
    match code {
        408 => "http_408",
        429 => "http_429",
        500 => "http_500",
        502 => "http_502",
        503 => "http_503",
        504 => "http_504",
        501..=599 => "http_5xx",
        400 => "http_400",
        401 => "http_401",
        403 => "http_403",
        404 => "http_404",
        410 => "http_410",
        _ => "http_4xx",
    }
}

/// Posts a subscription's messages to one endpoint.
#[derive(Clone)]
pub struct WebhookSink {
    http: reqwest::Client,
    config: WebhookSinkConfig,
    key: Option<Vec<u8>>,
    /// Why every message is refused: a URL posted through the API whose literal address
    /// is private (names are checked by the guarded client's resolver).
    refused: Option<String>,
}

impl WebhookSink {
    /// A sink posting with `http` (which must not follow redirects) as `config` says.
    pub fn new(http: reqwest::Client, config: WebhookSinkConfig) -> Self {
        let key = config.secret.as_ref().map(|secret| signing_key(secret.expose()));
        WebhookSink { http, config, key, refused: None }
    }

    /// The sink of a webhook posted through the API: `clients.guarded` checks every
    /// address a name resolves to, and a private literal address is refused here (it was
    /// refused when posted, but the check may have been allowed then).
    pub fn posted(clients: &WebhookClients, config: WebhookSinkConfig) -> Self {
        let refused = clients
            .checked
            .then(|| crate::config::private_destination(&config.url))
            .flatten()
            .map(|kind| format!("the URL's host is a {kind} address; webhooks posted through the API may not reach it (admin.allow_private_webhooks = true allows it)"));
        WebhookSink { refused, ..WebhookSink::new(clients.guarded.clone(), config) }
    }

    /// Requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.config.max_in_flight.max(1)
    }

    /// Posts `batch`, `max_in_flight` messages at a time, until a group has a transient
    /// failure (the rest are not tried: with one at a time, that keeps the order) or
    /// `stop` is cancelled.
    pub(super) async fn attempt(&self, batch: &[&Envelope], stop: &CancellationToken) -> Attempted {
        let mut results = Vec::with_capacity(batch.len());
        for group in batch.chunks(self.max_in_flight()) {
            let attempts = futures_util::future::join_all(group.iter().map(|envelope| self.post(envelope)));
            let group_results = tokio::select! {
                biased;
                _ = stop.cancelled() => return results,
                group_results = attempts => group_results,
            };
            let failed = group_results
                .iter()
                .any(|result| result.as_ref().is_err_and(|failure| !failure.is_permanent()));
            results.extend(group_results);
            if failed {
                break;
            }
        }
        results
    }

    async fn post(&self, envelope: &Envelope) -> Result<(), Failure> {
        if let Some(refused) = &self.refused {
            return Err(Failure::permanent("private_destination", refused.clone()));
        }
        let body = envelope.to_body();
        let id = visible_ascii(&format!("msg_{}", envelope.delivery_id()));
        // `webhook-id` on every request, signed or not: the receiver's key to drop a
        // redelivery.
        let mut request = self
            .http
            .post(self.config.url.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("webhook-id", id.as_str())
            .timeout(self.config.timeout);
        if let Some(key) = &self.key {
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let signature = sign(key, &id, timestamp, &body);
            request = request
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        }
        match request.body(body).send().await {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                classify(response.status(), retry_after)
            }
            Err(error) if error.is_timeout() => Err(Failure::transient("timeout", "timeout")),
            Err(error) if PrivateDestination::find(&error).is_some() => {
                let refused = PrivateDestination::find(&error).expect("found in the guard");
                Err(Failure::permanent("private_destination", format!("refused: {refused}")))
            }
            Err(error) => {
                // reqwest's text quotes the URL, credentials and all: the reason goes to logs,
                // dead letters and the API.
                let connect = error.is_connect();
                let chain = crate::redact::mask_urls_in(&crate::telemetry::error_chain(&error.without_url()));
                if chain.contains("certificate") || chain.contains("tls") || chain.contains("TLS") {
                    Err(Failure::transient("tls", format!("TLS failed: {chain}")))
                } else if connect {
                    Err(Failure::transient("connect", format!("connection failed: {chain}")))
                } else {
                    Err(Failure::transient("request", format!("request failed: {chain}")))
                }
            }
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
        for status in [200, 204] {
            assert_eq!(classify(StatusCode::from_u16(status).unwrap(), None), Ok(()), "{status}");
        }
        for status in [408, 429, 500, 503] {
            let failure = classify(StatusCode::from_u16(status).unwrap(), None).unwrap_err();
            assert!(!failure.is_permanent(), "{status}");
            assert_eq!(failure.reason, format!("HTTP {status}"));
        }
        for status in [301, 302, 303, 307, 400, 404, 410] {
            let failure = classify(StatusCode::from_u16(status).unwrap(), None).unwrap_err();
            assert!(failure.is_permanent(), "{status}");
        }
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, retry_after).unwrap_err().retry_after(),
            retry_after
        );
    }
}
