//! A real headless Chromium, driven over the W3C WebDriver protocol: Debian's
//! `chromedriver` on a free loopback port, spoken to with reqwest (JSON over HTTP). The
//! session and the driver (with the browser it started) end when the `Browser` is
//! dropped, also when the test panics.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use super::peer::WAIT;
use super::process::free_port;

/// Debian's `chromium`.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's `chromium-driver`.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);
/// The key of an element reference in W3C WebDriver.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An element of the current page.
#[derive(Clone, Debug)]
pub struct Element(String);

/// One entry of the browser's console log.
#[derive(Clone, Debug, Deserialize)]
pub struct LogEntry {
    /// `SEVERE`, `WARNING`, `INFO`, `DEBUG`.
    pub level: String,
    /// The text, prefixed with where it came from.
    pub message: String,
    /// `console-api`, `network`, `javascript`, `security`…
    #[serde(default)]
    pub source: Option<String>,
}

/// What WebDriver answered to a command that failed.
#[derive(Debug)]
pub struct WebDriverError {
    pub status: u16,
    /// The W3C error code (`no such element`, `no such alert`…).
    pub error: String,
    pub message: String,
}

/// A headless Chromium with one WebDriver session.
pub struct Browser {
    http: reqwest::Client,
    port: u16,
    session: String,
    driver: Child,
    profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose window is `width`×`height`;
    /// fails the test when either is not installed.
    pub async fn start(width: u32, height: u32) -> Self {
        for (binary, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(binary).is_file(),
                "{binary} is missing: the browser tests need Debian's `{package}`; run `scripts/setup.sh` \
                 (it installs chromium and chromium-driver with apt-get)"
            );
        }
        let profile = tempfile::tempdir().expect("a profile directory");
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that the browsers it starts go with it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {CHROMEDRIVER}: {error}"));
        let http = super::http_client();
        let mut browser = Browser { http, port, session: String::new(), driver, profile };
        browser.wait_for_driver().await;
        browser.session = browser.new_session(width, height).await;
        browser.set_viewport(width, height).await;
        browser.check_console_log().await;
        browser
    }

    /// Sizes the window so that the page's viewport (and a screenshot) is `width`×`height`:
    /// headless Chromium still counts a window frame around it.
    async fn set_viewport(&self, width: u32, height: u32) {
        let script = "return [window.innerWidth, window.innerHeight];";
        let frame = self
            .execute(
                "return [window.outerWidth - window.innerWidth, window.outerHeight - window.innerHeight];",
                vec![],
            )
            .await;
        let extra =
            |index: usize| u32::try_from(frame[index].as_u64().expect("a size")).expect("a small size");
        let rect = json!({ "width": width + extra(0), "height": height + extra(1) });
        self.must("POST", "/window/rect", Some(rect)).await;
        assert_eq!(
            self.execute(script, vec![]).await,
            json!([width, height]),
            "the viewport is not {width}x{height}"
        );
    }

    async fn wait_for_driver(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let status = self.http.get(format!("http://127.0.0.1:{}/status", self.port)).send().await;
            if let Ok(response) = status
                && let Ok(bytes) = response.bytes().await
                && let Ok(body) = serde_json::from_slice::<Value>(&bytes)
                && body["value"]["ready"] == true
            {
                return;
            }
            if let Ok(Some(exit)) = self.driver.try_wait() {
                panic!("{CHROMEDRIVER} exited at start: {exit}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{CHROMEDRIVER} did not answer on port {}",
                self.port
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn new_session(&self, width: u32, height: u32) -> String {
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "unhandledPromptBehavior": "ignore",
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--disable-quic", "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                        format!("--window-size={width},{height}"),
                        format!("--user-data-dir={}", self.profile.path().display()),
                    ],
                },
                "goog:loggingPrefs": { "browser": "ALL" },
            }}
        });
        let answer = self
            .raw("POST", "/session", Some(capabilities))
            .await
            .unwrap_or_else(|error| panic!("chromedriver could not start {CHROMIUM}: {error:?}"));
        answer["sessionId"].as_str().expect("a session id").to_string()
    }

    /// Checks that console messages reach [`Browser::console_log`] (and empties it).
    async fn check_console_log(&self) {
        self.execute("console.warn('webdriver console probe')", vec![]).await;
        let entries = self.console_log().await;
        assert!(
            entries
                .iter()
                .any(|entry| entry.level == "WARNING" && entry.message.contains("webdriver console probe")),
            "chromedriver's browser log does not carry console messages: {entries:?}"
        );
    }

    /// One WebDriver command; `path` starts with `/`.
    async fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WebDriverError> {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let mut request = self.http.request(method.parse().expect("a method"), url).timeout(WAIT * 4);
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        } else if method == "POST" {
            request = request.header("content-type", "application/json").body("{}");
        }
        let response =
            request.send().await.unwrap_or_else(|error| panic!("chromedriver: {method} {path}: {error}"));
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap_or_else(|error| panic!("chromedriver: {path}: {error}"));
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|error| panic!("chromedriver: {path}: not JSON ({error}): {bytes:?}"));
        let value = body["value"].clone();
        if status == 200 {
            Ok(value)
        } else {
            Err(WebDriverError {
                status,
                error: value["error"].as_str().unwrap_or_default().to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            })
        }
    }

    /// A command of this session; `path` is relative to it (`/url`, `/element`…).
    pub async fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        self.raw(method, &format!("/session/{}{path}", self.session), body).await
    }

    async fn must(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.command(method, path, body)
            .await
            .unwrap_or_else(|error| panic!("WebDriver {method} {path}: {error:?}"))
    }

    /// Opens `url` and waits until it has loaded.
    pub async fn goto(&self, url: &str) {
        self.must("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The elements matching a CSS selector, maybe none.
    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        let found =
            self.must("POST", "/elements", Some(json!({ "using": "css selector", "value": css }))).await;
        found.as_array().expect("a list of elements").iter().map(element).collect()
    }

    /// The first element matching a CSS selector, if any.
    pub async fn try_find(&self, css: &str) -> Option<Element> {
        self.find_all(css).await.into_iter().next()
    }

    /// The first element matching a CSS selector; fails the test when there is none.
    pub async fn find(&self, css: &str) -> Element {
        self.try_find(css).await.unwrap_or_else(|| panic!("no element matches {css}"))
    }

    /// Clicks an element as a user would (scrolled into view, must be visible and enabled).
    pub async fn click(&self, element: &Element) {
        self.must("POST", &format!("/element/{}/click", element.0), None).await;
    }

    /// Types `text` into an element.
    pub async fn send_keys(&self, element: &Element, text: &str) {
        self.must("POST", &format!("/element/{}/value", element.0), Some(json!({ "text": text }))).await;
    }

    /// An element's rendered text (empty when it is not displayed).
    pub async fn text(&self, element: &Element) -> String {
        let text = self.must("GET", &format!("/element/{}/text", element.0), None).await;
        text.as_str().expect("text").to_string()
    }

    /// Whether an element is displayed.
    pub async fn is_displayed(&self, element: &Element) -> bool {
        self.must("GET", &format!("/element/{}/displayed", element.0), None).await == true
    }

    /// The rendered text of the first element matching `css`, if there is one.
    pub async fn text_of(&self, css: &str) -> Option<String> {
        let text = self
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : null;",
                vec![json!(css)],
            )
            .await;
        text.as_str().map(str::to_string)
    }

    /// Whether an element matches `css` and is displayed.
    pub async fn shows(&self, css: &str) -> bool {
        self.execute(
            "const e = document.querySelector(arguments[0]); return !!e && e.checkVisibility();",
            vec![json!(css)],
        )
        .await
            == true
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.must("POST", "/execute/sync", Some(json!({ "script": script, "args": args }))).await
    }

    /// Polls `check` every 50 ms until it gives a value, failing the test after the wait
    /// with `what` and the page's text.
    pub async fn wait_for<T>(&self, what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                let page = self.text_of("body").await.unwrap_or_default();
                let log = self.console_log().await;
                panic!("waited {WAIT:?} for {what}; the page shows:\n{page}\nconsole: {log:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The text of the open `alert`/`confirm`, if one is open.
    pub async fn alert_text(&self) -> Option<String> {
        match self.command("GET", "/alert/text", None).await {
            Ok(text) => Some(text.as_str().unwrap_or_default().to_string()),
            Err(error) if error.error == "no such alert" => None,
            Err(error) => panic!("WebDriver GET /alert/text: {error:?}"),
        }
    }

    /// Answers the open `confirm` with OK.
    pub async fn accept_alert(&self) {
        self.must("POST", "/alert/accept", None).await;
    }

    /// Answers the open `confirm` with Cancel.
    pub async fn dismiss_alert(&self) {
        self.must("POST", "/alert/dismiss", None).await;
    }

    /// The viewport as a PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.must("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("base64 text"))
            .expect("a base64 PNG")
    }

    /// The browser console's entries since the last call (chromedriver's `se/log`), errors
    /// of the page's scripts and failed loads included.
    pub async fn console_log(&self) -> Vec<LogEntry> {
        let entries = self.must("POST", "/se/log", Some(json!({ "type": "browser" }))).await;
        serde_json::from_value(entries).expect("log entries")
    }
}

fn element(reference: &Value) -> Element {
    Element(reference[ELEMENT].as_str().expect("an element reference").to_string())
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Drop cannot await: end the session over a plain blocking socket (Chromium exits),
        // then kill the driver's process group with anything left in it.
        if !self.session.is_empty() {
            let _ = delete_session(self.port, &self.session);
        }
        if let Some(pid) = self.driver.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) with a negative pid signals that process group; the group is
            // the one chromedriver leads (started with process_group(0) above).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
}

fn delete_session(port: u16, session: &str) -> std::io::Result<()> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "DELETE /session/{session} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    // chromedriver keeps the connection open: read the one answer, not to the end.
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = stream.read(&mut buffer)?;
        if read == 0 {
            return Ok(());
        }
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length:").map(str::to_string)
                })
                .and_then(|length| length.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return Ok(());
            }
        }
    }
}
