//! The status page at `GET /`: one HTML file with its style and script inline, built into
//! the binary. It holds no data (it is served without the token) and shows the bridge
//! through the API, asking for the token when the API wants one. It must not know the
//! bridge: everything it shows comes from `/api/v1`.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine;

/// The page: HTML, one `<style>` and one `<script>`, no other asset.
const PAGE: &str = include_str!("status_page.html");

/// The page's `Content-Security-Policy`: nothing loads but the page's own inline style
/// and script (named by their SHA-256), which may only call back the server it came from.
static POLICY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        inline_hash(PAGE, "script"),
        inline_hash(PAGE, "style")
    )
});

/// Serves the status page.
pub(super) async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY.as_str()),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// `sha256-<base64>` of the text of the one `<tag>` element of `html`, as a CSP source.
///
/// # Panics
/// When `html` has no `<tag>…</tag>`: the page is a constant, and a test reads it.
fn inline_hash(html: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = html.find(&open).map(|at| at + open.len()).expect("the page has its inline element");
    let end = start + html[start..].find(&close).expect("the inline element is closed");
    let digest = ring::digest::digest(&ring::digest::SHA256, &html.as_bytes()[start..end]);
    format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_one_inline_script_and_style() {
        for tag in ["script", "style"] {
            assert_eq!(PAGE.matches(&format!("<{tag}")).count(), 1, "one <{tag}> element");
        }
        let policy = POLICY.as_str();
        assert!(policy.contains(&format!("script-src '{}'", inline_hash(PAGE, "script"))), "{policy}");
        assert!(policy.contains(&format!("style-src '{}'", inline_hash(PAGE, "style"))), "{policy}");
        assert!(!policy.contains("unsafe"), "{policy}");
        assert_eq!(
            inline_hash("<b><script>alert(1)</script>", "script"),
            // printf 'alert(1)' | openssl dgst -sha256 -binary | base64
            "sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI="
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_writes_no_markup_from_data() {
        // The SVG namespace is a name, not something fetched.
        let without_namespace = PAGE.replace("http://www.w3.org/2000/svg", "");
        for forbidden in ["http://", "https://", "//cdn", "src=", "@import", "url(", "innerHTML", "outerHTML"]
        {
            assert!(!without_namespace.contains(forbidden), "the page contains {forbidden:?}");
        }
        assert!(!PAGE.contains(" style=\""), "inline style attributes would need 'unsafe-inline'");
    }
}
