//! A hand-written Bayeux server for what no real server does on demand: malformed replies,
//! HTTP errors and abrupt closes. It speaks just enough long-polling Bayeux to be useful
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
}

/// The fake server; stops when dropped.
pub struct FakeServer {
    port: u16,
    behaviour: Arc<Mutex<Behaviour>>,
    task: JoinHandle<()>,
}

impl FakeServer {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let behaviour = Arc::new(Mutex::new(behaviour));
        let shared = behaviour.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        FakeServer { port, behaviour, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cometd", self.port)
    }

    pub fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().expect("lock") = behaviour;
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(stream: TcpStream, behaviour: Arc<Mutex<Behaviour>>) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let current = *behaviour.lock().expect("lock");
        let (status, reply) = match current {
            Behaviour::AbruptClose => return,
            Behaviour::Http500 => ("500 Internal Server Error", String::new()),
            Behaviour::BadJson => ("200 OK", "<html>oops</html>".into()),
            Behaviour::NotAnArray => ("200 OK", "{\"unexpected\": true}".into()),
            Behaviour::MissingFields => ("200 OK", "[{\"successful\": true}]".into()),
            Behaviour::NoReply => ("200 OK", "[]".into()),
            Behaviour::Valid => ("200 OK", valid_reply(&body).await),
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if reader.get_mut().write_all(response.as_bytes()).await.is_err() {
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
