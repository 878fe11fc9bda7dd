//! A webhook receiver: axum on a free loopback port that records every request and
//! answers with a scripted list of statuses (then 200).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|value| value.to_str().ok()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct Script {
    statuses: Arc<Mutex<VecDeque<u16>>>,
    /// While set, every request gets 503 (a receiver that is down), whatever the script.
    down: Arc<std::sync::atomic::AtomicBool>,
    requests: mpsc::UnboundedSender<Received>,
    manners: Arc<Mutex<Manners>>,
}

/// How the receiver answers besides its status.
#[derive(Clone, Debug, Default)]
struct Manners {
    /// The `Retry-After` of the next answers that are not 2xx, one each (`None`: none).
    retry_after: VecDeque<Option<String>>,
    /// How long each request is held before it is answered.
    hold: std::time::Duration,
}

/// The receiver; stops when dropped.
pub struct WebhookReceiver {
    port: u16,
    statuses: Arc<Mutex<VecDeque<u16>>>,
    down: Arc<std::sync::atomic::AtomicBool>,
    requests: mpsc::UnboundedReceiver<Received>,
    manners: Arc<Mutex<Manners>>,
    task: JoinHandle<()>,
}

impl WebhookReceiver {
    /// Starts a receiver answering `statuses` in turn, then 200 for ever.
    pub async fn start(statuses: impl IntoIterator<Item = u16>) -> Self {
        let statuses = Arc::new(Mutex::new(statuses.into_iter().collect::<VecDeque<_>>()));
        let (sender, requests) = mpsc::unbounded_channel();
        let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let manners = Arc::new(Mutex::new(Manners::default()));
        let script = Script {
            statuses: statuses.clone(),
            down: down.clone(),
            requests: sender,
            manners: manners.clone(),
        };
        let router = Router::new().route("/hook", post(record)).with_state(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("serve");
        });
        WebhookReceiver { port, statuses, down, requests, manners, task }
    }

    /// The `Retry-After` of the next answers that are not 2xx, in turn (`None`: none).
    pub fn retry_after<'a>(&self, values: impl IntoIterator<Item = Option<&'a str>>) {
        let values = values.into_iter().map(|value| value.map(str::to_string));
        self.manners.lock().expect("lock").retry_after.extend(values);
    }

    /// Holds every request this long before answering it, from now on (a slow receiver);
    /// [`WebhookReceiver::next`] returns it when it arrives.
    pub fn hold(&self, hold: std::time::Duration) {
        self.manners.lock().expect("lock").hold = hold;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Answers with these statuses next (then 200).
    pub fn script(&self, statuses: impl IntoIterator<Item = u16>) {
        self.statuses.lock().expect("lock").extend(statuses);
    }

    /// Takes the receiver down (every request gets 503) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets the statuses still scripted: from now on every request gets 200.
    pub fn heal(&self) {
        self.statuses.lock().expect("lock").clear();
    }

    /// The next request, within the test's wait.
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(super::peer::WAIT, self.requests.recv())
            .await
            .expect("a webhook request within the wait")
            .expect("the receiver runs")
    }

    /// A request that has already arrived, if any.
    pub fn try_next(&mut self) -> Option<Received> {
        self.requests.try_recv().ok()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn record(State(script): State<Script>, headers: HeaderMap, body: Bytes) -> (StatusCode, HeaderMap) {
    // Recorded on arrival: a test sees a held request while it is in flight.
    let scripted = script.statuses.lock().expect("lock").pop_front().unwrap_or(200);
    let status = if script.down.load(std::sync::atomic::Ordering::Relaxed) { 503 } else { scripted };
    let _ = script.requests.send(Received { headers, body, status });
    let hold = script.manners.lock().expect("lock").hold;
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    let mut answer = HeaderMap::new();
    if !(200..300).contains(&status)
        && let Some(Some(retry_after)) = script.manners.lock().expect("lock").retry_after.pop_front()
    {
        answer.insert("retry-after", retry_after.parse().expect("a header value"));
    }
    (StatusCode::from_u16(status).expect("a valid status"), answer)
}
