//! The (server, transport) pairs every client behaviour is tested on, and client helpers.

use std::time::Duration;

use cometd_bridge::cometd::{Client, ClientOptions, ConnectionType, Error, Message};

use super::bayeux::{BayeuxServer, CometdOptions, FayeOptions};

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(15);

/// A Bayeux server and the transport the client is limited to.
#[derive(Clone, Copy, Debug)]
pub enum Peer {
    FayeWebSocket,
    FayeLongPolling,
    CometdLongPolling,
}

impl Peer {
    /// Starts the server, holding `/meta/connect` for 2 s so that connect cycles are quick.
    pub async fn start(self) -> BayeuxServer {
        self.start_with(FayeOptions::default()).await
    }

    /// Starts the server; faye gets `options` (with a 2 s timeout unless set).
    pub async fn start_with(self, mut options: FayeOptions) -> BayeuxServer {
        match self {
            Peer::FayeWebSocket | Peer::FayeLongPolling => {
                options.timeout.get_or_insert(2);
                BayeuxServer::faye(options).await
            }
            Peer::CometdLongPolling => {
                BayeuxServer::cometd(CometdOptions { timeout: Some(2000), ..CometdOptions::default() }).await
            }
        }
    }

    pub fn connection_type(self) -> ConnectionType {
        match self {
            Peer::FayeWebSocket => ConnectionType::WebSocket,
            Peer::FayeLongPolling | Peer::CometdLongPolling => ConnectionType::LongPolling,
        }
    }

    /// Client options for this peer: its transport only, quick backoff.
    pub fn options(self, server: &BayeuxServer) -> ClientOptions {
        Client::builder(server.url())
            .connection_types([self.connection_type()])
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .request_timeout(Duration::from_secs(5))
    }

    /// An open client for this peer.
    pub async fn open(self, server: &BayeuxServer) -> Client {
        open(self.options(server)).await
    }
}

/// Builds and opens a client, failing the test with the error.
pub async fn open(options: ClientOptions) -> Client {
    let client = options.build().expect("valid options");
    tokio::time::timeout(WAIT, client.open()).await.expect("open finishes").expect("open succeeds");
    client
}

/// The next message, failing the test if none comes within [`WAIT`].
pub async fn next(client: &Client) -> Result<Message, Error> {
    tokio::time::timeout(WAIT, client.receive()).await.expect("a message within the wait")
}

/// Generates one test per peer for `$scenario(peer)`.
#[macro_export]
macro_rules! on_every_peer {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use $crate::support::peer::Peer;
            #[tokio::test]
            async fn faye_websocket() { super::$scenario(Peer::FayeWebSocket).await }
            #[tokio::test]
            async fn faye_long_polling() { super::$scenario(Peer::FayeLongPolling).await }
            #[tokio::test]
            async fn cometd_long_polling() { super::$scenario(Peer::CometdLongPolling).await }
        }
    )*};
}

/// Waits until the client's session reaches `state`.
pub async fn wait_for_state(client: &Client, state: cometd_bridge::cometd::SessionState) {
    let mut status = client.watch_status().expect("the client was opened");
    tokio::time::timeout(WAIT * 2, status.wait_for(|status| status.state == state))
        .await
        .unwrap_or_else(|_| panic!("the session did not reach {state:?}; it is {:?}", client.status()))
        .expect("the session task is alive");
}
