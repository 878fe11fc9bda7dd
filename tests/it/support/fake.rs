//! A hand-written Bayeux server for what no real server does on demand: malformed replies,
//! HTTP errors and abrupt closes, and events with the exact bytes a test gives (the real
//! servers are JavaScript: they parse and re-serialize data, so big integers change). It speaks just enough long-polling Bayeux to be useful
//! when told to behave.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the fake server answers every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Valid Bayeux: handshakes and connects succeed (a connect is held 100 ms).
    Valid,
    /// A body that is not JSON.
    BadJson,
    /// JSON that is not an array of messages.
    NotAnArray,
    /// An array whose messages lack `channel`.
    MissingFields,
    /// A valid array that holds no reply to the request.
    NoReply,
    /// HTTP 500 with an empty body.
    Http500,
    /// The connection is closed without an answer.
    AbruptClose,
    /// A `Content-Length` of 100 TB, then one message whose data never closes (what is
    /// declared never sizes a buffer; the message breaks the limit).
    HugeDeclaredLength,
    /// A chunked answer that never ends: one message whose data never closes.
    EndlessChunked,
    /// The request is read and never answered; the connection stays open.
    Blackhole,
    /// Handshakes succeed; every `/meta/connect` says `402::session_unknown`.
    UnknownClient,
}

/// The fake server; stops when dropped.
pub struct FakeServer {
    port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    /// Events (message JSON texts) the next `/meta/connect` reply carries.
    events: Arc<Mutex<Vec<String>>>,
    /// How many client connections are open now.
    open_connections: tokio::sync::watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let shared = behaviour.clone();
        let events: Arc<Mutex<Vec<String>>> = Arc::default();
        let queued = events.clone();
        let (count, open_connections) = tokio::sync::watch::channel(0usize);
        let count = Arc::new(count);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let count = count.clone();
                let shared = shared.clone();
                let queued = queued.clone();
                tokio::spawn(async move {
                    count.send_modify(|open| *open += 1);
                    serve(stream, shared, queued).await;
                    count.send_modify(|open| *open -= 1);
                });
            }
        });
        FakeServer { port, behaviour, events, open_connections, task }
    }

    /// Waits until exactly `count` client connections are open.
    pub async fn wait_for_open_connections(&self, count: usize) {
        let mut open = self.open_connections.clone();
        let reached = tokio::time::timeout(super::peer::WAIT, async {
            open.wait_for(|open| *open == count).await.map(drop)
        })
        .await;
        match reached {
            Ok(result) => result.expect("the server runs"),
            Err(_) => {
                panic!("{count} open connections within the wait; now {}", *self.open_connections.borrow())
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cometd", self.port)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("lock") = behaviour;
    }

    /// Sends `message` (a Bayeux message's JSON text, sent as it is) with the next
    /// `/meta/connect` reply (`Valid` behaviour).
    pub fn push_event(&self, message: &str) {
        self.events.lock().expect("lock").push(message.to_string());
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads an HTTP request's head up to its blank line; returns the value of `header`
/// (empty when absent), or `None` when the connection ends first.
pub async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R, header: &str) -> Option<String> {
    let mut value = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(value);
        }
        if let Some((name, found)) = line.split_once(':')
            && name.eq_ignore_ascii_case(header)
        {
            value = found.trim().to_string();
        }
    }
}

async fn serve(stream: TcpStream, behaviour: Arc<Mutex<Behaviour>>, events: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(length) = read_head(&mut reader, "content-length").await else { return };
        let length: usize = length.parse().unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let current = *behaviour.lock().expect("lock");
        let is_connect = serde_json::from_slice::<Value>(&body)
            .is_ok_and(|requests| requests[0]["channel"] == "/meta/connect");
        let stream = reader.get_mut();
        let (status, reply) = match current {
            Behaviour::AbruptClose => return,
            Behaviour::Blackhole => {
                // Holds the connection until the client closes it.
                let mut rest = [0u8; 1024];
                while stream.read(&mut rest).await.is_ok_and(|read| read > 0) {}
                return;
            }
            Behaviour::HugeDeclaredLength => {
                let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000000000\r\n\r\n[{\"channel\":\"/declared\",\"data\":\"";
                let mut written = stream.write_all(head.as_bytes()).await;
                let filler = "a".repeat(64 * 1024);
                // Bounded all the same: 64 GiB, far past any limit, ends the loop.
                for _ in 0..1024 * 1024 {
                    if written.is_err() {
                        break;
                    }
                    written = stream.write_all(filler.as_bytes()).await;
                }
                return;
            }
            Behaviour::EndlessChunked => {
                let head =
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
                let start = "[{\"channel\":\"/endless\",\"data\":\"";
                let mut written = stream.write_all(head.as_bytes()).await;
                if written.is_ok() {
                    written = stream.write_all(format!("{:x}\r\n{start}\r\n", start.len()).as_bytes()).await;
                }
                let filler = format!("{:x}\r\n{}\r\n", 64 * 1024, "a".repeat(64 * 1024));
                // Bounded all the same: 64 GiB, far past any limit, ends the loop.
                for _ in 0..1024 * 1024 {
                    if written.is_err() {
                        break;
                    }
                    written = stream.write_all(filler.as_bytes()).await;
                }
                return;
            }
            Behaviour::UnknownClient if is_connect => {
                let requests: Vec<Value> = serde_json::from_slice(&body).unwrap_or_default();
                let reply = json!([{ "channel": "/meta/connect", "id": requests[0]["id"], "successful": false,
                    "error": "402::session_unknown", "advice": { "reconnect": "handshake", "interval": 0 } }]);
                ("200 OK", reply.to_string())
            }
            Behaviour::UnknownClient => ("200 OK", valid_reply(&body).await),
            Behaviour::Http500 => ("500 Internal Server Error", String::new()),
            Behaviour::BadJson => ("200 OK", "<html>oops</html>".into()),
            Behaviour::NotAnArray => ("200 OK", "{\"unexpected\": true}".into()),
            Behaviour::MissingFields => ("200 OK", "[{\"successful\": true}]".into()),
            Behaviour::NoReply => ("200 OK", "[]".into()),
            Behaviour::Valid if is_connect => {
                let reply = valid_reply(&body).await;
                let events = std::mem::take(&mut *events.lock().expect("lock"));
                match events.is_empty() {
                    true => ("200 OK", reply),
                    false => ("200 OK", format!("{},{}]", &reply[..reply.len() - 1], events.join(","))),
                }
            }
            Behaviour::Valid => ("200 OK", valid_reply(&body).await),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn valid_reply(body: &[u8]) -> String {
    let requests: Vec<Value> = serde_json::from_slice(body).unwrap_or_default();
    let mut replies = Vec::new();
    for request in requests {
        let channel = request["channel"].as_str().unwrap_or_default().to_string();
        let mut reply = json!({ "channel": channel, "id": request["id"], "successful": true });
        match channel.as_str() {
            "/meta/handshake" => {
                reply["clientId"] = json!("fake-client");
                reply["version"] = json!("1.0");
                reply["supportedConnectionTypes"] = json!(["long-polling"]);
                reply["advice"] = json!({ "reconnect": "retry", "interval": 0, "timeout": 100 });
            }
            // The fake server's own hold, like a real server's timeout.
            "/meta/connect" if request["advice"]["timeout"] != json!(0) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            "/meta/subscribe" | "/meta/unsubscribe" => {
                reply["subscription"] = request["subscription"].clone()
            }
            _ => {}
        }
        replies.push(reply);
    }
    Value::Array(replies).to_string()
}
