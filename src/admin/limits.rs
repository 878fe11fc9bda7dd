//! How much the admin server takes on: each request has [`REQUEST_TIMEOUT`] to be read
//! and answered (a client trickling its body does not hold a handler for ever), and at
//! most [`MAX_CONCURRENT_REQUESTS`] are handled at once across all routes; one more is
//! answered 503 at once rather than queued. tower's layers, with their errors turned into
//! the API's error shape. An operation that changes the bridge runs on a task of its own,
//! so a timeout cuts only the answer, never the operation.

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower::layer::util::{Identity, Stack};
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;

use super::ApiError;

/// How long one request may take, from its head to its answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Requests handled at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// The layers as a `ServiceBuilder`, outermost first.
pub type Limits<F> = ServiceBuilder<
    Stack<
        TimeoutLayer,
        Stack<GlobalConcurrencyLimitLayer, Stack<LoadShedLayer, Stack<HandleErrorLayer<F, ()>, Identity>>>,
    >,
>;

/// The layers: errors answered in the API's shape, load shedding over `concurrent`
/// requests in flight, `timeout` per request.
pub fn limits(
    timeout: Duration,
    concurrent: usize,
) -> Limits<impl Fn(tower::BoxError) -> std::future::Ready<Response> + Clone> {
    ServiceBuilder::new()
        .layer(HandleErrorLayer::new(|error: tower::BoxError| std::future::ready(answer(&error))))
        .load_shed()
        .layer(GlobalConcurrencyLimitLayer::new(concurrent))
        .layer(TimeoutLayer::new(timeout))
}

/// What a request the layers stopped is answered.
fn answer(error: &tower::BoxError) -> Response {
    if error.is::<tower::timeout::error::Elapsed>() {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request was not read and answered in time; an operation it started still completes",
        )
        .into_response()
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "the admin server handles as many requests as it takes; try again in a moment",
        )
        .into_response();
        response.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        response
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::get;
    use tower::ServiceExt;

    use std::sync::Arc;
    use tokio::sync::{Notify, mpsc};

    /// A router whose handlers report that they started, then wait for `release`.
    fn held_router(
        timeout: Duration,
        concurrent: usize,
    ) -> (Router, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
        let (started, entered) = mpsc::unbounded_channel();
        let release = Arc::new(Notify::new());
        let held = {
            let release = release.clone();
            move || async move {
                let _ = started.send(());
                release.notified().await;
                "done"
            }
        };
        let router = Router::new()
            .route("/held", get(held.clone()))
            .route("/other", get(held))
            .layer(limits(timeout, concurrent));
        (router, entered, release)
    }

    fn get_request(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).expect("a request")
    }

    #[tokio::test]
    async fn a_request_over_its_time_is_answered_408() {
        let (router, _entered, _release) = held_router(Duration::from_millis(50), 4);
        let response = router.oneshot(get_request("/held")).await.unwrap();
        assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[tokio::test]
    async fn requests_past_the_limit_on_any_route_are_answered_503_at_once() {
        let (router, mut entered, release) = held_router(Duration::from_secs(5), 1);
        let first = tokio::spawn(router.clone().oneshot(get_request("/held")));
        entered.recv().await.expect("the first request is being handled");
        let second = router.clone().oneshot(get_request("/other")).await.unwrap();
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(second.headers()["retry-after"], "1");
        release.notify_one();
        assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
        let third = tokio::spawn(router.oneshot(get_request("/other")));
        entered.recv().await.expect("a slot is free again");
        release.notify_one();
        assert_eq!(third.await.unwrap().unwrap().status(), StatusCode::OK);
    }
}
