//! The admin HTTP API: health, readiness and metrics (always open), and under `/api/v1`
//! the sources, the subscriptions (added and removed at runtime) and the dead letters,
//! behind an optional bearer token. Its OpenAPI document is generated from these handlers.

mod error;
mod extract;
mod limits;
mod origin;
mod page;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::OpenApi;

pub use error::{ApiError, ErrorBody};
pub use extract::ApiJson;
#[cfg(feature = "fuzzing")]
pub(crate) use extract::body_from_value;
pub use origin::HostCheck;

use crate::bridge::{BacklogView, Bridge, LetterFilter, Origin, ReloadReport, SourceView, SubscriptionView};
use crate::cometd::ReplayPosition;
use crate::config::{RawSink, RawSubscription, Secret};
use crate::reload::Reloader;
use crate::store::{DeadLetter, DeadLetterFilter};
use crate::telemetry::metrics::Metrics;

/// The largest request body accepted.
const BODY_LIMIT: usize = 64 * 1024;

/// What the handlers read.
#[derive(Clone)]
pub struct AdminState {
    /// The running bridge.
    pub bridge: Arc<Bridge>,
    /// Its metrics.
    pub metrics: Metrics,
    /// The bearer token `/api/*` requires, if any.
    pub token: Option<Secret>,
    /// Reloads the configuration file, when the bridge was started from one.
    pub reloader: Option<Arc<Reloader>>,
    /// The `Host` and `Origin` check of a tokenless API (`None` with a token).
    pub hosts: Option<Arc<HostCheck>>,
}

/// The OpenAPI document of the admin API.
#[derive(OpenApi)]
#[openapi(
    info(title = "cometd-bridge admin API", description = "Manage the bridge's subscriptions and dead letters at runtime."),
    paths(
        healthz, readyz, metrics, list_sources, list_subscriptions, add_subscription, get_subscription,
        delete_subscription, reset_position, list_dead_letters, retry_dead_letter, discard_dead_letter, retry_dead_letters, discard_dead_letters, reload, openapi
    ),
    components(schemas(SourceView, SubscriptionView, BacklogView, DeadLetterPage, RawSubscription, RawSink, DeadLetter, DeadLetterFilter, BulkCount, ErrorBody, Origin, PositionBody, ReloadReport)),
    modifiers(&BearerAuth, &GuardAnswers)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The answers every route may give before its handler runs (`origin.rs`, the server's
/// limits), added to each operation of the document.
struct GuardAnswers;

impl utoipa::Modify for GuardAnswers {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::ResponseBuilder;
        use utoipa::openapi::path::HttpMethod;
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Post, &mut item.post),
                (HttpMethod::Put, &mut item.put),
                (HttpMethod::Delete, &mut item.delete),
                (HttpMethod::Patch, &mut item.patch),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let mut answers = vec![
                    ("408", "the request took longer than the admin server's timeout (30 s)"),
                    ("421", "without a token: a Host other than the API's own (see admin.allowed_hosts)"),
                    ("503", "too many requests in flight; try again (Retry-After)"),
                ];
                if method != HttpMethod::Get {
                    answers.push(("403", "without a token: a change from another Origin than the API's own"));
                }
                for (code, description) in answers {
                    operation
                        .responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| ResponseBuilder::new().description(description).into());
                }
            }
        }
    }
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/api/v1/sources", get(list_sources))
        .route("/api/v1/subscriptions", get(list_subscriptions).post(add_subscription))
        .route("/api/v1/subscriptions/{id}", get(get_subscription).delete(delete_subscription))
        .route("/api/v1/subscriptions/{id}/position", post(reset_position))
        .route("/api/v1/dead-letters", get(list_dead_letters))
        .route("/api/v1/dead-letters/retry", post(retry_dead_letters))
        .route("/api/v1/dead-letters/discard", post(discard_dead_letters))
        .route("/api/v1/dead-letters/{id}", axum::routing::delete(discard_dead_letter))
        .route("/api/v1/dead-letters/{id}/retry", post(retry_dead_letter))
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/openapi.json", get(openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        // The status page holds no data: it asks for the token and sends it with its API calls.
        .route("/", get(page::status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.hosts.clone(), origin::check_host_and_origin))
        .layer(limits::limits(limits::REQUEST_TIMEOUT, limits::MAX_CONCURRENT_REQUESTS))
        .with_state(state)
}

/// Checks `Authorization: Bearer <token>` when a token is configured, in constant time.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if state.token.is_some() && !presents_token(&state, request.headers()) {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required")
            .into_response();
    }
    next.run(request).await
}

/// Whether `headers` carry the configured token (`Bearer`, in any case); `false` without one.
fn presents_token(state: &AdminState, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = &state.token else { return false };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    same_secret(presented, token.expose())
}

/// Compares the SHA-256 digests of both strings without an early exit, so the time taken
/// says nothing about where they differ.
fn same_secret(presented: &str, expected: &str) -> bool {
    let presented = ring::digest::digest(&ring::digest::SHA256, presented.as_bytes());
    let expected = ring::digest::digest(&ring::digest::SHA256, expected.as_bytes());
    presented.as_ref().iter().zip(expected.as_ref()).fold(0u8, |difference, (a, b)| difference | (a ^ b)) == 0
}

/// Reads the configuration file again and applies it, all or nothing: what is new
/// starts, what is gone stops, what changed restarts alone; the rest runs on untouched.
#[utoipa::path(post, path = "/api/v1/reload", security(("bearer" = [])), responses(
    (status = 200, description = "Applied: what was added, removed and changed (subscription ids and source names)", body = ReloadReport),
    (status = 400, description = "invalid_config: the problems, one per line as `check` prints them; nothing changed", body = ErrorBody),
    (status = 409, description = "restart_required ([admin], [state] or [nats] changed), or not_reloadable (not started from a file); nothing changed", body = ErrorBody)
))]
async fn reload(State(state): State<AdminState>) -> Result<Json<ReloadReport>, ApiError> {
    let reloader = state.reloader.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_reloadable",
            "the bridge was not started from a configuration file",
        )
    })?;
    let reloader = reloader.clone();
    Ok(Json(to_completion(async move { reloader.reload().await }).await?))
}

/// Runs a change on a task of its own and waits for it. When the client goes away, hyper
/// drops the handler's future: only the waiting stops, the change completes (a reload half
/// applied, or a subscription half added or removed, would otherwise stay so).
async fn to_completion<T: Send + 'static>(
    change: impl Future<Output = Result<T, crate::bridge::BridgeError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(change).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(error) => {
            tracing::error!(error = %error, "an admin operation failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the operation failed; see the log",
            ))
        }
    }
}

/// The process is running.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "The process runs")))]
async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
}

/// Every source connected and subscribed, and NATS connected when used.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "Ready"),
    (status = 503, description = "Not ready, with the reasons: in general terms, or in detail with the token")
))]
async fn readyz(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let reasons = state.bridge.unready_reasons();
    if reasons.is_empty() {
        return (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response();
    }
    // The details (source names, channels, errors, panic texts) are for the token holder;
    // without a token configured, the API is open to whoever reaches it anyway.
    let reasons: Vec<String> = if state.token.is_none() || presents_token(&state, &headers) {
        reasons.into_iter().map(|reason| reason.detail).collect()
    } else {
        let general: std::collections::BTreeSet<&str> = reasons.iter().map(|reason| reason.general).collect();
        general.into_iter().map(String::from).collect()
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not ready", "reasons": reasons })))
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AdminState>) -> Response {
    state.bridge.refresh_metrics();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
        .into_response()
}

/// Every source with its live state.
#[utoipa::path(get, path = "/api/v1/sources", security(("bearer" = [])), responses(
    (status = 200, body = [SourceView]),
    (status = 401, body = ErrorBody)
))]
async fn list_sources(State(state): State<AdminState>) -> Json<Vec<SourceView>> {
    Json(state.bridge.sources())
}

/// Every subscription, from the configuration file and from the API.
#[utoipa::path(get, path = "/api/v1/subscriptions", security(("bearer" = [])), responses(
    (status = 200, body = [SubscriptionView]),
    (status = 401, body = ErrorBody)
))]
async fn list_subscriptions(State(state): State<AdminState>) -> Json<Vec<SubscriptionView>> {
    Json(state.bridge.subscriptions())
}

/// Adds a subscription (the body is one `[[subscriptions]]` entry). It is stored before
/// the answer, and is `active` once the server confirmed the channel, else `pending`.
#[utoipa::path(post, path = "/api/v1/subscriptions", security(("bearer" = [])), request_body = RawSubscription, responses(
    (status = 201, body = SubscriptionView),
    (status = 400, description = "Invalid body; the message names the field", body = ErrorBody),
    (status = 401, body = ErrorBody),
    (status = 404, description = "Unknown source", body = ErrorBody),
    (status = 409, description = "Id taken (conflict), admin.max_subscriptions reached (too_many_subscriptions), or a NATS sink while the bridge has no NATS connection", body = ErrorBody),
    (status = 413, body = ErrorBody),
    (status = 415, body = ErrorBody),
    (status = 422, description = "The CometD server refused the subscription", body = ErrorBody)
))]
async fn add_subscription(
    State(state): State<AdminState>,
    ApiJson(subscription): ApiJson<RawSubscription>,
) -> Result<(StatusCode, Json<SubscriptionView>), ApiError> {
    let bridge = state.bridge.clone();
    let view = to_completion(async move { bridge.add_subscription(subscription).await }).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// One subscription.
#[utoipa::path(get, path = "/api/v1/subscriptions/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 200, body = SubscriptionView),
    (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody)
))]
async fn get_subscription(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Json<SubscriptionView>, ApiError> {
    state.bridge.subscription(&id).map(Json).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("subscription {id:?} not found"))
    })
}

/// Removes a subscription added through the API (after its queue drained); unsubscribes
/// upstream unless another subscription still needs the channel.
#[utoipa::path(delete, path = "/api/v1/subscriptions/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 204, description = "Removed"),
    (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Defined in the configuration file", body = ErrorBody)
))]
async fn delete_subscription(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let bridge = state.bridge.clone();
    to_completion(async move { bridge.remove_subscription(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of a position reset.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PositionBody {
    /// `"new"`, `"all"`, or a replay id to resume after.
    #[schema(value_type = Object)]
    pub replay_from: serde_json::Value,
}

/// Resets a replay subscription's position; the live session subscribes again from it.
#[utoipa::path(post, path = "/api/v1/subscriptions/{id}/position", security(("bearer" = [])), params(("id" = String, Path)),
    request_body = PositionBody, responses(
    (status = 200, body = SubscriptionView),
    (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Its source does not use replay", body = ErrorBody),
    (status = 413, body = ErrorBody),
    (status = 415, body = ErrorBody)
))]
async fn reset_position(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PositionBody>,
) -> Result<Json<SubscriptionView>, ApiError> {
    let position = position_from(&body)?;
    let bridge = state.bridge.clone();
    Ok(Json(to_completion(async move { bridge.reset_position(&id, position).await }).await?))
}

/// The position a reset body asks for.
///
/// # Errors
/// A 400 `invalid_position` when `replay_from` is not one.
pub(crate) fn position_from(body: &PositionBody) -> Result<ReplayPosition, ApiError> {
    crate::config::parse_replay_from(&body.replay_from).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_position",
            format!("replay_from: {} is not \"new\", \"all\" or a replay id", body.replay_from),
        )
    })
}

/// Which page of dead letters: `?limit=` (default 100, at most 1000) and `?after=<id>`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Dead letters per page: 1 to 1000, 100 by default.
    limit: Option<usize>,
    /// Continue after this id (the previous page's `next`).
    after: Option<String>,
}

/// One page of dead letters.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetterPage {
    /// The dead letters, in id order.
    dead_letters: Vec<DeadLetter>,
    /// The id to continue after (`?after=`), or null on the last page.
    next: Option<String>,
}

/// Messages that could not be delivered, with the reason, a page at a time in id order.
#[utoipa::path(get, path = "/api/v1/dead-letters", security(("bearer" = [])), params(PageQuery), responses(
    (status = 200, body = DeadLetterPage),
    (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody)
))]
async fn list_dead_letters(
    State(state): State<AdminState>,
    query: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeadLetterPage>, ApiError> {
    let invalid = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
    let Query(query) = query.map_err(|rejection| invalid(rejection.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid(format!("limit: {limit} is not between 1 and 1000")));
    }
    let (dead_letters, next) = state.bridge.dead_letters_page(query.after.as_deref(), limit).await?;
    Ok(Json(DeadLetterPage { dead_letters, next }))
}

/// Hands a dead letter back to its subscription's sink (same delivery id as before).
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/retry", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 202, description = "Queued for delivery"),
    (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody),
    (status = 409, description = "Its subscription no longer exists", body = ErrorBody)
))]
async fn retry_dead_letter(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let bridge = state.bridge.clone();
    let retried = id.clone();
    to_completion(async move { bridge.retry_dead_letter(&retried).await }).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "status": "queued", "id": id }))).into_response())
}

/// Discards a dead letter.
#[utoipa::path(delete, path = "/api/v1/dead-letters/{id}", security(("bearer" = [])), params(("id" = String, Path)), responses(
    (status = 204, description = "Discarded"),
    (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody)
))]
async fn discard_dead_letter(
    State(state): State<AdminState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let bridge = state.bridge.clone();
    to_completion(async move { bridge.discard_dead_letter(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How many dead letters a bulk retry or discard took.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BulkCount {
    /// Dead letters requeued, or discarded.
    count: u64,
}

/// The checked filter of a bulk request.
fn letter_filter(filter: DeadLetterFilter) -> Result<LetterFilter, ApiError> {
    LetterFilter::new(filter)
        .map_err(|error| ApiError::new(StatusCode::BAD_REQUEST, "invalid_filter", error.to_string()))
}

/// Hands back to their subscriptions' sinks every dead letter that matches the filter
/// (every field given must match; `{}` takes them all), each with its original bytes and
/// delivery id. Those whose subscription no longer exists are skipped (logged, not
/// counted); those stored during the call are not taken.
#[utoipa::path(post, path = "/api/v1/dead-letters/retry", security(("bearer" = [])), request_body = DeadLetterFilter, responses(
    (status = 200, description = "Queued for delivery: how many", body = BulkCount),
    (status = 400, description = "Unknown key, or `before` not an RFC 3339 timestamp", body = ErrorBody),
    (status = 401, body = ErrorBody),
    (status = 413, body = ErrorBody),
    (status = 415, body = ErrorBody)
))]
async fn retry_dead_letters(
    State(state): State<AdminState>,
    ApiJson(filter): ApiJson<DeadLetterFilter>,
) -> Result<Json<BulkCount>, ApiError> {
    let filter = letter_filter(filter)?;
    Ok(Json(BulkCount { count: state.bridge.retry_dead_letters(&filter).await? }))
}

/// Discards every dead letter that matches the filter (every field given must match;
/// `{}` takes them all); those stored during the call are kept.
#[utoipa::path(post, path = "/api/v1/dead-letters/discard", security(("bearer" = [])), request_body = DeadLetterFilter, responses(
    (status = 200, description = "Discarded: how many", body = BulkCount),
    (status = 400, description = "Unknown key, or `before` not an RFC 3339 timestamp", body = ErrorBody),
    (status = 401, body = ErrorBody),
    (status = 413, body = ErrorBody),
    (status = 415, body = ErrorBody)
))]
async fn discard_dead_letters(
    State(state): State<AdminState>,
    ApiJson(filter): ApiJson<DeadLetterFilter>,
) -> Result<Json<BulkCount>, ApiError> {
    let filter = letter_filter(filter)?;
    Ok(Json(BulkCount { count: state.bridge.discard_dead_letters(&filter).await? }))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", security(("bearer" = [])), responses((status = 200, description = "The OpenAPI document")))]
async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_equal_only_when_equal() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cret", "s3creT"));
        assert!(!same_secret("", "s3cret"));
    }

    #[test]
    fn the_openapi_document_lists_every_route() {
        let document = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        let paths = document["paths"].as_object().expect("paths");
        for path in [
            "/healthz",
            "/readyz",
            "/metrics",
            "/api/v1/sources",
            "/api/v1/subscriptions",
            "/api/v1/subscriptions/{id}",
            "/api/v1/subscriptions/{id}/position",
            "/api/v1/dead-letters",
            "/api/v1/dead-letters/{id}",
            "/api/v1/dead-letters/{id}/retry",
            "/api/v1/dead-letters/retry",
            "/api/v1/dead-letters/discard",
            "/api/v1/openapi.json",
        ] {
            assert!(paths.contains_key(path), "{path} is missing from the OpenAPI document");
        }
    }
}
