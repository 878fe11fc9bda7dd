//! API errors: every failure answers `{"error": "<code>", "message": "<sentence>"}` with
//! the right status, including malformed bodies and unknown routes.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::bridge::BridgeError;

/// The JSON body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code, e.g. `invalid_subscription`, `not_found`.
    pub error: String,
    /// A readable sentence.
    pub message: String,
    /// For a configuration that cannot be applied: each problem, as `check` prints it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problems: Option<Vec<String>>,
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    problems: Option<Vec<String>>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), problems: None }
    }

    /// The status it answers with.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The sentence it answers with.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// 404 for a route that does not exist.
    pub fn no_route() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.into(), message: self.message, problems: self.problems };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer realm=\"cometd-bridge\""),
            );
        }
        response
    }
}

impl From<BridgeError> for ApiError {
    fn from(error: BridgeError) -> Self {
        let message = error.to_string();
        match error {
            BridgeError::Invalid(problems) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_subscription",
                problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
            ),
            BridgeError::Forbidden(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "forbidden_destination", message)
            }
            BridgeError::UnknownSource(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_source", message),
            BridgeError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", message),
            BridgeError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            // 409, not 429: no wait makes room, only removing a subscription or a larger limit.
            BridgeError::TooMany(_) => ApiError::new(StatusCode::CONFLICT, "too_many_subscriptions", message),
            BridgeError::Upstream(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "upstream_rejected", message)
            }
            BridgeError::Unavailable(_) => ApiError::new(StatusCode::CONFLICT, "nats_unavailable", message),
            BridgeError::InvalidConfig(problems) => ApiError {
                problems: Some(problems.iter().map(ToString::to_string).collect()),
                ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_config", message)
            },
            BridgeError::RestartRequired(_) => {
                ApiError::new(StatusCode::CONFLICT, "restart_required", message)
            }
            BridgeError::Store(_) => {
                tracing::error!(error = %message, "state store failure");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store_error", message)
            }
        }
    }
}
