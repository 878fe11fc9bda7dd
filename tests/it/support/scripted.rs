//! A hand-written Bayeux server on both transports (long-polling and websocket at the same
//! URL), valid unless its script says otherwise: the script may replace the reply to any
//! request with raw JSON text, for what no real server sends (a repeated key, a field of
//! the wrong type, a huge `clientId`, a long error text). Every request is recorded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as Frame;

use super::fake::read_head;

/// What the script decides for one request: `None` for the server's valid reply, or the
/// raw JSON text of the messages that replace it (one or more, comma-separated, without
/// the enclosing brackets).
pub type Script = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

/// The scripted server; stops when dropped.
pub struct ScriptedServer {
    port: u16,
    requests: Arc<Mutex<Vec<Value>>>,
    sizes: Arc<Mutex<Vec<usize>>>,
    task: JoinHandle<()>,
}

impl ScriptedServer {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let recorded = Recorded { requests: requests.clone(), sizes: sizes.clone() };
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let script = script.clone();
                let recorded = recorded.clone();
                tokio::spawn(serve(stream, script, recorded));
            }
        });
        ScriptedServer { port, requests, sizes, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/cometd", self.port)
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().expect("lock").clone()
    }

    /// The size of every request payload (HTTP body or websocket frame) so far, in bytes.
    pub fn payload_sizes(&self) -> Vec<usize> {
        self.sizes.lock().expect("lock").clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the server records of each payload.
#[derive(Clone)]
struct Recorded {
    requests: Arc<Mutex<Vec<Value>>>,
    sizes: Arc<Mutex<Vec<usize>>>,
}

async fn serve(stream: TcpStream, script: Script, recorded: Recorded) {
    let mut head = [0u8; 2048];
    let Ok(peeked) = stream.peek(&mut head).await else { return };
    let upgrade =
        String::from_utf8_lossy(&head[..peeked]).to_ascii_lowercase().contains("upgrade: websocket");
    if upgrade {
        let Ok(socket) = tokio_tungstenite::accept_async(stream).await else { return };
        let (writer, mut reader) = socket.split();
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        while let Some(Ok(frame)) = reader.next().await {
            let Frame::Text(text) = frame else { continue };
            // Each frame answered on its own, so that a held connect holds nothing else up.
            let (script, recorded, writer) = (script.clone(), recorded.clone(), writer.clone());
            tokio::spawn(async move {
                let reply = answer(text.as_bytes(), &script, &recorded).await;
                let _ = writer.lock().await.send(Frame::text(reply)).await;
            });
        }
        return;
    }
    let mut reader = BufReader::new(stream);
    loop {
        let Some(length) = read_head(&mut reader, "content-length").await else { return };
        let mut body = vec![0; length.parse().unwrap_or(0)];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let reply = answer(&body, &script, &recorded).await;
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if reader.get_mut().write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The reply payload to a request payload: each request's scripted reply, else a valid one
/// (a connect not asked to return at once is held 100 ms, like a real server's hold).
async fn answer(body: &[u8], script: &Script, recorded: &Recorded) -> String {
    let requests: Vec<Value> = serde_json::from_slice(body).unwrap_or_default();
    recorded.sizes.lock().expect("lock").push(body.len());
    recorded.requests.lock().expect("lock").extend(requests.iter().cloned());
    let mut replies = Vec::new();
    for request in &requests {
        if let Some(scripted) = script(request) {
            replies.push(scripted);
            continue;
        }
        let channel = request["channel"].as_str().unwrap_or_default();
        let mut reply = json!({ "channel": channel, "id": request["id"], "successful": true });
        match channel {
            "/meta/handshake" => {
                reply["clientId"] = json!("scripted-client");
                reply["version"] = json!("1.0");
                reply["supportedConnectionTypes"] = json!(["long-polling", "websocket"]);
                reply["advice"] = json!({ "reconnect": "retry", "interval": 0, "timeout": 100 });
            }
            "/meta/connect" if request["advice"]["timeout"] != json!(0) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            "/meta/subscribe" | "/meta/unsubscribe" => {
                reply["subscription"] = request["subscription"].clone()
            }
            _ => {}
        }
        replies.push(reply.to_string());
    }
    format!("[{}]", replies.join(","))
}
