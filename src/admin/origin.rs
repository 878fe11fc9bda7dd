//! Who may talk to a tokenless API: a web page in the operator's browser can make its own
//! name resolve to 127.0.0.1 (DNS rebinding) or post a form to loopback. Without a token,
//! only requests naming the API by its address, `localhost` or an `admin.allowed_hosts`
//! name in `Host` are served (421 otherwise), and a request that changes anything from a
//! page of another origin (`Origin`) is refused (403). With a token, the token protects.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;

/// The names and port the API answers to.
#[derive(Clone, Debug)]
pub struct HostCheck {
    address: SocketAddr,
    allowed: BTreeSet<String>,
}

impl HostCheck {
    /// The API bound to `address` (its real port), also known as `allowed` names.
    pub fn new(address: SocketAddr, allowed: &[String]) -> Self {
        HostCheck { address, allowed: allowed.iter().map(|name| name.to_ascii_lowercase()).collect() }
    }

    /// Whether a `Host` header (`name`, `name:port`, `[v6]:port`) names this API: its
    /// listen address (any address of the machine when it listens on all of them),
    /// `localhost`, 127.0.0.1, `[::1]`, or an allowed name; with a port, the API's.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else { return false };
        if port.is_some_and(|port| port != self.address.port()) {
            return false;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.address.ip() || self.address.ip().is_unspecified(),
            Err(_) => name == "localhost" || self.allowed.contains(&name),
        }
    }
}

/// `name` and port of a `Host` value; `None` when it is not one.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = match host.rfind(':') {
        // A bare IPv6 address has colons but no brackets: not a valid Host.
        Some(colon) if !host[..colon].contains(':') || host[..colon].ends_with(']') => {
            (&host[..colon], Some(host[colon + 1..].parse().ok()?))
        }
        Some(_) if !host.starts_with('[') => return None,
        _ => (host, None),
    };
    (!name.is_empty()).then_some((name, port))
}

/// Whether `method` changes something.
fn changes(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::DELETE | Method::PATCH)
}

/// The middleware: 421 for a foreign `Host`, 403 for a change from a foreign `Origin`.
/// `None` (a token is set): everything passes.
pub async fn check_host_and_origin(
    State(check): State<Option<Arc<HostCheck>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(check) = check else { return next.run(request).await };
    let headers = request.headers();
    // A request without `Host` (HTTP/1.0) does not come from a browser.
    let host = headers.get(header::HOST).map(|value| value.to_str().unwrap_or_default());
    if let Some(host) = host
        && !check.host_allowed(host)
    {
        return ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected_request",
            "this API answers only to its own address, localhost and the names in admin.allowed_hosts (or set admin.token)",
        )
        .into_response();
    }
    if changes(request.method())
        && let Some(origin) = headers.get(header::ORIGIN)
    {
        // Its own pages, served directly or through a proxy terminating TLS.
        let own = host.is_some_and(|host| {
            origin.to_str().is_ok_and(|origin| {
                let origin = origin.to_ascii_lowercase();
                let rest = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
                rest == Some(host.to_ascii_lowercase().as_str())
            })
        });
        if !own {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                "a change from a page of another origin is refused (or set admin.token)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_naming_the_api_are_allowed() {
        let check = HostCheck::new("127.0.0.1:8080".parse().unwrap(), &["bridge.internal".into()]);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "bridge.internal:8080",
            "127.0.0.1",
        ] {
            assert!(check.host_allowed(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost:9090",
            "127.0.0.1:80",
            "10.0.0.1:8080",
            "",
            "::1",
            "[::1]:x",
        ] {
            assert!(!check.host_allowed(host), "{host}");
        }
        let everywhere = HostCheck::new("0.0.0.0:8080".parse().unwrap(), &[]);
        assert!(everywhere.host_allowed("10.1.2.3:8080"), "any address of the machine");
        assert!(!everywhere.host_allowed("evil.example:8080"));
    }
}
