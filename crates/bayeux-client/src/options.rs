//! [`ClientOptions`]: everything a [`Client`](super::Client) is configured with, as a
//! builder. Validation happens in [`ClientOptions::build`], so a built client is valid.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::backoff::Backoff;
use super::client::Client;
use super::error::Error;
use super::extension::{AuthExtension, Extension};
use super::transport::coalesce::ReadCoalescing;

/// The default of [`ClientOptions::max_message_size`]: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// Below this a handshake reply may not fit.
const MIN_MAX_MESSAGE_SIZE: usize = 1024;

/// A way of carrying Bayeux messages, as named in the handshake (and in a
/// [`SessionTicket`](super::SessionTicket)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ConnectionType {
    /// HTTP POSTs, with `/meta/connect` held open by the server until it has events.
    #[serde(rename = "long-polling")]
    LongPolling,
    /// One websocket for every message of the session.
    #[serde(rename = "websocket")]
    WebSocket,
}

impl ConnectionType {
    /// The name used on the wire: `long-polling` or `websocket`.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionType::LongPolling => "long-polling",
            ConnectionType::WebSocket => "websocket",
        }
    }
}

impl fmt::Display for ConnectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ConnectionType {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self, Error> {
        match name {
            "long-polling" => Ok(ConnectionType::LongPolling),
            "websocket" => Ok(ConnectionType::WebSocket),
            other => Err(Error::InvalidOptions(format!(
                "unknown connection type {other:?} (expected \"websocket\" or \"long-polling\")"
            ))),
        }
    }
}

/// How the client reaches the server: through the proxy the environment names (the
/// default), directly, or through a given HTTP proxy. Both transports follow it: HTTP
/// requests through the proxy, websockets through an HTTP `CONNECT` tunnel. An `https://`
/// proxy is spoken to over TLS, checked with the client's [`Tls`] option; other schemes
/// (`socks5://`...) are refused with an error naming these two.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Proxy {
    /// `HTTPS_PROXY` (for `https://`/`wss://`), `HTTP_PROXY` (for `http://`/`ws://`),
    /// `ALL_PROXY`, in upper or lower case, except for the hosts `NO_PROXY` lists, as curl
    /// reads them.
    #[default]
    FromEnvironment,
    /// Always directly, whatever the environment says.
    Direct,
    /// Always through this HTTP proxy, `http://[user:password@]host:port` or
    /// `https://[user:password@]host:port` (the credentials go as Basic
    /// `Proxy-Authorization`, and never into logs or errors).
    Url(String),
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Proxy::FromEnvironment => write!(f, "FromEnvironment"),
            Proxy::Direct => write!(f, "Direct"),
            // The credentials never print.
            Proxy::Url(url) => match Url::parse(url) {
                Ok(parsed) => write!(
                    f,
                    "Url({}://{}:{})",
                    parsed.scheme(),
                    parsed.host_str().unwrap_or(""),
                    parsed.port_or_known_default().unwrap_or(0)
                ),
                Err(_) => write!(f, "Url(<invalid>)"),
            },
        }
    }
}

/// How the server's TLS certificate is checked, for `https://` and `wss://` URLs.
#[derive(Clone, Default)]
pub enum Tls {
    /// Verify the certificate chain against the Mozilla root certificates (the default).
    #[default]
    Verify,
    /// Accept any certificate. Only for test servers: it allows anyone in the middle.
    Insecure,
    /// Accept exactly the certificate whose DER encoding has this SHA-256 digest, and no
    /// other, whoever signed it (certificate pinning).
    Fingerprint([u8; 32]),
    /// Use this rustls configuration as it is (own roots, client certificates, ...).
    Config(Arc<rustls::ClientConfig>),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tls::Verify => write!(f, "Verify"),
            Tls::Insecure => write!(f, "Insecure"),
            Tls::Fingerprint(digest) => {
                write!(f, "Fingerprint(sha256:")?;
                for byte in digest {
                    write!(f, "{byte:02x}")?;
                }
                write!(f, ")")
            }
            Tls::Config(_) => write!(f, "Config(..)"),
        }
    }
}

impl Tls {
    /// Parses a fingerprint written as 64 hex digits, optionally prefixed `sha256:` and
    /// with `:` between bytes (the way `openssl x509 -fingerprint` prints it).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when it is not a SHA-256 digest.
    pub fn fingerprint(text: &str) -> Result<Tls, Error> {
        let hex: String = text
            .trim()
            .trim_start_matches("sha256:")
            .trim_start_matches("SHA256:")
            .chars()
            .filter(|c| *c != ':')
            .collect();
        let invalid = || Error::InvalidOptions(format!("{text:?} is not a SHA-256 fingerprint"));
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(invalid());
        }
        let mut digest = [0u8; 32];
        for (index, byte) in digest.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).map_err(|_| invalid())?;
        }
        Ok(Tls::Fingerprint(digest))
    }
}

/// Settings for a [`Client`], built with chained calls and checked by [`build`](Self::build).
///
/// ```no_run
/// use std::time::Duration;
/// use bayeux_client::{Client, ConnectionType};
///
/// # fn main() -> Result<(), bayeux_client::Error> {
/// let client = Client::builder("http://127.0.0.1:8000/bayeux")
///     .connection_types([ConnectionType::WebSocket, ConnectionType::LongPolling])
///     .connection_timeout(Some(Duration::from_secs(10)))
///     .max_pending_count(100)
///     .header("X-Api-Key", "secret")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ClientOptions {
    pub(crate) url: String,
    pub(crate) connection_types: Vec<ConnectionType>,
    pub(crate) connection_timeout: Option<Duration>,
    pub(crate) request_timeout: Duration,
    pub(crate) tls: Tls,
    pub(crate) max_pending_count: i64,
    pub(crate) extensions: Vec<Arc<dyn Extension>>,
    pub(crate) auth: Option<Arc<dyn AuthExtension>>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) read_coalescing: Option<ReadCoalescing>,
    pub(crate) max_message_size: usize,
    pub(crate) proxy: Proxy,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("url", &self.url)
            .field("connection_types", &self.connection_types)
            .field("connection_timeout", &self.connection_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("max_pending_count", &self.max_pending_count)
            .field("extensions", &self.extensions.len())
            .field("auth", &self.auth.is_some())
            // Header values may be credentials: names only.
            .field("headers", &self.headers.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .field("backoff", &self.backoff)
            .field("read_coalescing", &self.read_coalescing)
            .field("max_message_size", &self.max_message_size)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl ClientOptions {
    /// Options for the CometD endpoint at `url` (`http(s)://` or `ws(s)://`), with the
    /// defaults: websocket then long-polling, a 10 s connection timeout, 100 pending
    /// messages, certificate verification on.
    pub fn new(url: impl Into<String>) -> Self {
        ClientOptions {
            url: url.into(),
            connection_types: vec![ConnectionType::WebSocket, ConnectionType::LongPolling],
            connection_timeout: Some(Duration::from_secs(10)),
            request_timeout: Duration::from_secs(30),
            tls: Tls::Verify,
            max_pending_count: 100,
            extensions: Vec::new(),
            auth: None,
            headers: Vec::new(),
            backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            read_coalescing: Some(ReadCoalescing::default()),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            proxy: Proxy::FromEnvironment,
        }
    }

    /// The connection types to use, in order of preference. The handshake offers them all
    /// and the session uses the first one the server also supports.
    pub fn connection_types(mut self, types: impl IntoIterator<Item = ConnectionType>) -> Self {
        self.connection_types = types.into_iter().collect();
        self
    }

    /// How long the link may stay down before [`Client::receive`] reports
    /// [`TransportErrorKind::ConnectionTimeout`](super::TransportErrorKind::ConnectionTimeout);
    /// also how long [`Client::open`] keeps trying an unreachable server. `None` waits for
    /// ever. The client keeps reconnecting either way.
    pub fn connection_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long a handshake, subscribe, unsubscribe, publish or disconnect may wait for its
    /// reply (default 30 s). `/meta/connect` is timed from the server's advice instead.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How the server's certificate is checked.
    pub fn tls(mut self, tls: Tls) -> Self {
        self.tls = tls;
        self
    }

    /// How many received messages may wait for [`Client::receive`] before the client stops
    /// asking the server for more (default 100). Zero or less means no limit.
    ///
    /// Replies to publish, subscribe and unsubscribe are never held back; a full queue only
    /// delays the next `/meta/connect` (and, on websocket, reading further events).
    pub fn max_pending_count(mut self, count: i64) -> Self {
        self.max_pending_count = count;
        self
    }

    /// Adds an extension; extensions see outgoing payloads in the order they were added.
    pub fn extension(mut self, extension: impl Extension) -> Self {
        self.extensions.push(Arc::new(extension));
        self
    }

    /// Sets the auth extension: it runs after the other extensions on outgoing payloads,
    /// before them on incoming ones, and is asked to re-authenticate after a 401 or 403.
    pub fn auth(mut self, auth: impl AuthExtension) -> Self {
        self.auth = Some(Arc::new(auth));
        self
    }

    /// Adds an HTTP header to every request and to the websocket upgrade.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The reconnection backoff: the first delay and the cap. Delays double after each
    /// failure, with full jitter, and reset after a successful `/meta/connect`
    /// (default 500 ms up to 30 s).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max);
        self
    }

    /// When a busy websocket reads on a timer instead of on every wake-up (default: from
    /// 20,000 wake-ups a second, reading every millisecond); `None` turns it off. Servers
    /// that write one frame per message wake a client that keeps up once per message;
    /// reading a busy socket on a timer cuts its CPU per message by more than half, at
    /// the price of up to about two intervals of added delay while the socket stays busy.
    /// A quiet or moderate stream is read as soon as data arrives.
    pub fn read_coalescing(mut self, coalescing: Option<ReadCoalescing>) -> Self {
        self.read_coalescing = coalescing;
        self
    }

    /// The read coalescing these options ask for ([`read_coalescing`](Self::read_coalescing)),
    /// so that code building options from its own settings can check what it set.
    pub fn coalescing(&self) -> Option<ReadCoalescing> {
        self.read_coalescing
    }

    /// The largest Bayeux message, websocket message, or long-polling response that is
    /// not an array of messages, the client reads, in bytes (default 16 MiB). A larger
    /// one, whether its length is declared or it just keeps coming, fails the request with
    /// [`TransportErrorKind::TooLarge`](super::TransportErrorKind::TooLarge) and drops the
    /// connection, so that one server cannot exhaust the process's memory.
    ///
    /// A long-polling response that is an array of messages (a server replaying hours of
    /// events in one answer) is not refused for its total size: past 1 MiB it is handed
    /// over message by message as it is read, and read no faster than the application
    /// takes them (see [`max_pending_count`](Self::max_pending_count)), so memory stays
    /// bounded by what waits to be received and one message.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How to reach the server (default: the proxy the environment names, if any).
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        self.proxy = proxy;
        self
    }

    /// Checks the options and makes a client (not yet open).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] naming the option that cannot work.
    pub fn build(self) -> Result<Client, Error> {
        let validated = self.validate()?;
        Client::from_options(validated)
    }

    pub(crate) fn validate(self) -> Result<ValidOptions, Error> {
        let url = Url::parse(&self.url)
            .map_err(|error| Error::InvalidOptions(format!("url {:?}: {error}", self.url)))?;
        let http_url = match url.scheme() {
            "http" | "https" => url.clone(),
            "ws" | "wss" => with_scheme(&url, if url.scheme() == "ws" { "http" } else { "https" })?,
            other => {
                return Err(Error::InvalidOptions(format!(
                    "url {:?}: scheme {other:?} is not http, https, ws or wss",
                    self.url
                )));
            }
        };
        let ws_url = with_scheme(&http_url, if http_url.scheme() == "http" { "ws" } else { "wss" })?;
        let mut connection_types = Vec::new();
        for kind in &self.connection_types {
            if !connection_types.contains(kind) {
                connection_types.push(*kind);
            }
        }
        if connection_types.is_empty() {
            return Err(Error::InvalidOptions("connection_types is empty".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(Error::InvalidOptions("request_timeout must be more than zero".into()));
        }
        let backoff = Backoff::try_new(self.backoff.0, self.backoff.1)?;
        if let Some(coalescing) = self.read_coalescing
            && (coalescing.interval.is_zero() || coalescing.wakeups_per_window == 0)
        {
            return Err(Error::InvalidOptions(
                "read_coalescing needs an interval and a wake-up count above zero".into(),
            ));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let header_name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| Error::InvalidOptions(format!("header name {name:?} is not valid")))?;
            let header_value = HeaderValue::from_str(value)
                .map_err(|_| Error::InvalidOptions(format!("the value of header {name:?} is not valid")))?;
            headers.append(header_name, header_value);
        }
        if self.max_message_size < MIN_MAX_MESSAGE_SIZE {
            return Err(Error::InvalidOptions(format!(
                "max_message_size must be at least {MIN_MAX_MESSAGE_SIZE} bytes"
            )));
        }
        if let Proxy::Url(proxy) = &self.proxy {
            let parsed =
                Url::parse(proxy).map_err(|error| Error::InvalidOptions(format!("proxy: {error}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(Error::InvalidOptions(format!(
                    "proxy: {}://{} is not supported; use an http://host:port or https://host:port proxy",
                    parsed.scheme(),
                    parsed.host_str().unwrap_or_default()
                )));
            }
        }
        let max_pending = usize::try_from(self.max_pending_count).ok().filter(|count| *count > 0);
        Ok(ValidOptions {
            http_url,
            ws_url,
            connection_types,
            connection_timeout: self.connection_timeout.filter(|timeout| !timeout.is_zero()),
            request_timeout: self.request_timeout,
            tls: self.tls,
            max_pending,
            extensions: self.extensions,
            auth: self.auth,
            headers,
            backoff,
            read_coalescing: self.read_coalescing,
            max_message_size: self.max_message_size,
            proxy: self.proxy,
        })
    }
}

fn with_scheme(url: &Url, scheme: &str) -> Result<Url, Error> {
    let text = format!("{scheme}{}", &url.as_str()[url.scheme().len()..]);
    Url::parse(&text).map_err(|error| Error::InvalidOptions(format!("url {text:?}: {error}")))
}

/// Options after validation, as the session uses them.
#[derive(Clone)]
pub(crate) struct ValidOptions {
    pub(crate) http_url: Url,
    pub(crate) ws_url: Url,
    pub(crate) connection_types: Vec<ConnectionType>,
    pub(crate) connection_timeout: Option<Duration>,
    pub(crate) request_timeout: Duration,
    pub(crate) tls: Tls,
    pub(crate) max_pending: Option<usize>,
    pub(crate) extensions: Vec<Arc<dyn Extension>>,
    pub(crate) auth: Option<Arc<dyn AuthExtension>>,
    pub(crate) headers: HeaderMap,
    pub(crate) backoff: Backoff,
    pub(crate) read_coalescing: Option<ReadCoalescing>,
    pub(crate) max_message_size: usize,
    pub(crate) proxy: Proxy,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_urls_map_to_http_for_long_polling() {
        let options = ClientOptions::new("wss://example.test:8443/cometd").validate().unwrap();
        assert_eq!(options.http_url.as_str(), "https://example.test:8443/cometd");
        assert_eq!(options.ws_url.as_str(), "wss://example.test:8443/cometd");
        let options = ClientOptions::new("http://127.0.0.1/bayeux").validate().unwrap();
        assert_eq!(options.ws_url.as_str(), "ws://127.0.0.1/bayeux");
    }

    #[test]
    fn bad_options_are_rejected_with_the_option_named() {
        let message = |options: ClientOptions| match options.validate() {
            Err(error) => error.to_string(),
            Ok(_) => panic!("accepted"),
        };
        assert!(message(ClientOptions::new("ftp://x/")).contains("scheme \"ftp\""));
        assert!(message(ClientOptions::new("not a url")).contains("url"));
        assert!(message(ClientOptions::new("http://x/").connection_types([])).contains("connection_types"));
        assert!(message(ClientOptions::new("http://x/").header("bad name", "v")).contains("bad name"));
    }

    #[test]
    fn zero_or_negative_pending_counts_mean_unbounded() {
        for count in [0, -1] {
            let options = ClientOptions::new("http://x/").max_pending_count(count).validate().unwrap();
            assert_eq!(options.max_pending, None);
        }
        let options = ClientOptions::new("http://x/").validate().unwrap();
        assert_eq!(options.max_pending, Some(100));
        assert_eq!(options.connection_types, vec![ConnectionType::WebSocket, ConnectionType::LongPolling]);
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let hex = "AB".repeat(32);
        let colons = vec!["ab"; 32].join(":");
        for text in [hex.clone(), format!("sha256:{hex}"), colons] {
            match Tls::fingerprint(&text) {
                Ok(Tls::Fingerprint(digest)) => assert_eq!(digest, [0xab; 32]),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(Tls::fingerprint("abcd").is_err());
    }
}
