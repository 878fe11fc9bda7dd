//! `ApiJson`: axum's JSON extractor with its rejections turned into the API's error shape
//! (415 for a wrong content type, 413 for a body too large, 400 naming the field with its
//! path: every unknown key, and a value of the wrong type).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<serde_json::Value>::from_request(request, state).await {
            Ok(axum::Json(value)) => body_from_value(value).map(ApiJson),
            Err(rejection) => Err(match &rejection {
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "the body must be JSON with Content-Type: application/json",
                ),
                JsonRejection::JsonSyntaxError(_) => {
                    ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", rejection.body_text())
                }
                _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the body is larger than 64 KiB",
                ),
                _ => ApiError::new(rejection.status(), "bad_request", rejection.body_text()),
            }),
        }
    }
}

/// Reads a JSON body into `T` as [`ApiJson`] does: every unknown key is named with its
/// path, and so is a value that does not fit (both a 400 `invalid_subscription`).
///
/// # Errors
/// The [`ApiError`] the request is answered with.
pub(crate) fn body_from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    let mut unknown = Vec::new();
    let parsed: Result<T, _> = crate::config::deserialize_named(value, |key| unknown.push(key));
    let invalid = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_subscription", message);
    match parsed {
        Ok(_) if !unknown.is_empty() => Err(invalid(
            unknown.iter().map(|key| format!("{key}: unknown key")).collect::<Vec<_>>().join("; "),
        )),
        Ok(value) => Ok(value),
        Err(problem) if problem.key.is_empty() => Err(invalid(format!("the body does not fit: {problem}"))),
        Err(problem) => Err(invalid(problem.to_string())),
    }
}
