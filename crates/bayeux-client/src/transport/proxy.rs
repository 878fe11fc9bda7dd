//! The websocket's way through a proxy: a `CONNECT` tunnel through an `http://` proxy, or
//! through an `https://` one after a TLS handshake with the proxy itself (checked with the
//! client's own TLS options), with the URL's credentials as `Proxy-Authorization`. Any
//! other proxy scheme is refused with an error naming the ones supported.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::proxy::matcher::Intercept;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::http::Uri;

use super::coalesce::{Coalescing, CoalescingStream};
use crate::error::{Error, TransportErrorKind};

/// The longest answer head accepted from a proxy.
const PROXY_ANSWER_LIMIT: usize = 16 * 1024;

/// The byte stream a websocket runs on: straight to the server (or through an `http://`
/// proxy's tunnel), or inside the TLS session with an `https://` proxy.
pub(crate) enum Link {
    /// A TCP connection, read as the coalescing policy says.
    Plain(CoalescingStream),
    /// A TLS session with the proxy, over such a connection.
    ProxyTls(Box<TlsStream<CoalescingStream>>),
}

impl Link {
    /// Connects straight to `uri` (`ws://` or `wss://`).
    pub(crate) async fn direct(uri: &Uri, coalescing: &Coalescing) -> Result<Link, Error> {
        Ok(Link::Plain(CoalescingStream::counted(connect_tcp(uri).await?, coalescing)))
    }

    /// Opens a tunnel to `target` through `proxy`: TLS with the proxy first when it is an
    /// `https://` one (checked with `tls`, the client's configuration), then `CONNECT`.
    pub(crate) async fn through(
        proxy: &Intercept,
        target: &Uri,
        coalescing: &Coalescing,
        tls: &Arc<rustls::ClientConfig>,
    ) -> Result<Link, Error> {
        let secure = is_secure(proxy)?;
        let tcp = CoalescingStream::counted(connect_tcp(proxy.uri()).await?, coalescing);
        let mut link = if secure {
            let host = proxy.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(host.to_string()).map_err(|error| {
                Error::transport_from(
                    TransportErrorKind::Connect,
                    format!("proxy {}: {error}", proxy_address(proxy)),
                )
            })?;
            let session = TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|error| {
                Error::transport_from(
                    TransportErrorKind::Tls,
                    format!("TLS with proxy {}: {error}", proxy_address(proxy)),
                )
            })?;
            Link::ProxyTls(Box::new(session))
        } else {
            Link::Plain(tcp)
        };
        tunnel(&mut link, proxy, target).await?;
        Ok(link)
    }
}

/// Whether `proxy` is an `https://` proxy (else an `http://` one); any other scheme
/// (`socks5://`...) is refused, naming the two supported.
pub(crate) fn is_secure(proxy: &Intercept) -> Result<bool, Error> {
    match proxy.uri().scheme_str().unwrap_or_default() {
        "http" => Ok(false),
        "https" => Ok(true),
        other => Err(Error::transport(TransportErrorKind::UnsupportedProxy {
            scheme: other.to_string(),
            proxy: proxy_address(proxy),
        })),
    }
}

/// `scheme://host:port` of the proxy, never its credentials (the matcher keeps those apart).
fn proxy_address(proxy: &Intercept) -> String {
    let uri = proxy.uri();
    format!(
        "{}://{}",
        uri.scheme_str().unwrap_or_default(),
        uri.authority()
            .map(|authority| authority.as_str().rsplit('@').next().unwrap_or_default())
            .unwrap_or_default()
    )
}

/// Opens the TCP connection for `uri`, with Nagle's algorithm off; the port defaults to
/// 443 for `wss://` and `https://`, else to 80.
async fn connect_tcp(uri: &Uri) -> Result<TcpStream, Error> {
    let host = uri
        .host()
        .ok_or_else(|| Error::transport_from(TransportErrorKind::Connect, "the URL has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let secure = matches!(uri.scheme_str(), Some("wss" | "https"));
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|error| Error::transport_from(TransportErrorKind::Connect, error))?;
    stream.set_nodelay(true).map_err(|error| Error::transport_from(TransportErrorKind::Connect, error))?;
    Ok(stream)
}

/// Asks the proxy on `stream` for a tunnel to `target` (`CONNECT`), with its credentials,
/// and reads its answer.
async fn tunnel<S>(stream: &mut S, proxy: &Intercept, target: &Uri) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let address = proxy_address(proxy);
    let failed = |what: String| Error::transport_from(TransportErrorKind::Connect, what);
    let host = target.host().ok_or_else(|| failed("the URL has no host".into()))?;
    let port = target.port_u16().unwrap_or(if target.scheme_str() == Some("wss") { 443 } else { 80 });
    let authority = format!("{host}:{port}");
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(credentials) = proxy.basic_auth().and_then(|value| value.to_str().ok()) {
        head.push_str(&format!("Proxy-Authorization: {credentials}\r\n"));
    }
    head.push_str("\r\n");
    let proxy_error = |error: std::io::Error| failed(format!("proxy {address}: {error}"));
    stream.write_all(head.as_bytes()).await.map_err(proxy_error)?;
    stream.flush().await.map_err(proxy_error)?;
    // The answer's head; nothing follows it until the client speaks through the tunnel.
    let mut answer = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= PROXY_ANSWER_LIMIT {
            return Err(failed(format!("proxy {address}: an answer head over {PROXY_ANSWER_LIMIT} bytes")));
        }
        if stream.read(&mut byte).await.map_err(proxy_error)? == 0 {
            return Err(failed(format!("proxy {address} closed the connection before answering CONNECT")));
        }
        answer.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_string();
    match status_line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        // 407 is the standard answer; some proxies (tinyproxy) say 401.
        Some("407" | "401") => Err(failed(format!(
            "proxy {address} requires authentication ({status_line}): give the credentials in the proxy URL"
        ))),
        _ => Err(failed(format!("proxy {address} refused the tunnel to {authority}: {status_line}"))),
    }
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Link::ProxyTls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Link::ProxyTls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Link::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Link::ProxyTls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Link::Plain(stream) => stream.is_write_vectored(),
            Link::ProxyTls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Link::ProxyTls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Link::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Link::ProxyTls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper_util::client::proxy::matcher::Matcher;

    use super::*;

    fn intercept(proxy: &str) -> Intercept {
        let target: Uri = "http://127.0.0.1:8000/bayeux".parse().expect("URI");
        Matcher::builder().all(proxy.to_string()).build().intercept(&target).expect("a proxy")
    }

    #[test]
    fn http_and_https_proxies_are_spoken_and_others_are_refused_without_their_credentials() {
        assert!(!is_secure(&intercept("http://user:pass@127.0.0.1:3128")).expect("http"));
        assert!(is_secure(&intercept("https://user:pass@127.0.0.1:3129")).expect("https"));
        let error = is_secure(&intercept("socks5://user:pass@127.0.0.1:1080")).expect_err("socks");
        assert!(!error.is_retryable());
        assert_eq!(
            error.to_string(),
            "proxy socks5://127.0.0.1:1080: the socks5:// scheme is not supported; use an http:// or https:// proxy"
        );
    }
}
