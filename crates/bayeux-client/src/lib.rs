//! A CometD (Bayeux) client: the Rust counterpart of Python's aiocometd.
//!
//! This crate owns everything about talking Bayeux to a server and knows nothing of the
//! bridge it was written for (cometd-bridge, which re-exports it as `cometd_bridge::cometd`):
//! no NATS, no HTTP API, no configuration files.
//!
//! ```no_run
//! use bayeux_client::{Client, ConnectionType};
//! use futures_util::StreamExt;
//!
//! # async fn example() -> Result<(), bayeux_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8000/bayeux")
//!     .connection_types([ConnectionType::WebSocket, ConnectionType::LongPolling])
//!     .build()?;
//! client.open().await?;
//! client.subscribe("/chat/**").await?;
//! let mut messages = client.messages();
//! while let Some(message) = messages.next().await {
//!     match message {
//!         Ok(message) => println!("{} {:?}", message.channel, message.data),
//!         // The link was down longer than connection_timeout; the client keeps trying.
//!         Err(error) => eprintln!("{error}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Options are checked when the client is built, before anything touches the network, and
//! an event's data stays the JSON text the server sent until it is asked for:
//!
//! ```
//! use bayeux_client::{ChannelPattern, Client, Data, ErrorKind};
//! use serde_json::json;
//!
//! let error = Client::builder("ftp://127.0.0.1/bayeux").build().unwrap_err();
//! assert_eq!(error.kind(), ErrorKind::Client);
//! assert!(error.to_string().contains("is not http, https, ws or wss"), "{error}");
//!
//! let data = Data::from(json!({ "text": "hello" }));
//! assert_eq!(data.value()["text"], "hello");
//! let pattern = ChannelPattern::new("/chat/**")?;
//! assert!(pattern.matches("/chat/rooms/1"));
//! # Ok::<(), bayeux_client::Error>(())
//! ```
//!
//! The crate's examples (`listen`, `publish`, `salesforce_replay`) are command-line tools
//! built on it: `cargo run -p bayeux-client --example listen -- <url> <channel>...`.
//!
//! # Features
//! - `fuzzing` (off): the payload parsers for fuzz harnesses, in a hidden `fuzzing`
//!   module. Not an API.
//!
//! # Layout
//! - `client`: the [`Client`] handle; `status`: what it reports; `session`: the task that
//!   owns the session, with its steps in `negotiation`, `subscribe` and `connect`, its
//!   request/reply plumbing in `exchange`, and its decisions in `machine` and `refused`;
//! - `transport`: long-polling and websocket; `tls`: certificate checks;
//! - `message`: the wire types; `error`: the error hierarchy;
//! - `options`: the builder; `extension`: hooks; `backoff`; `pending`: the receive queue.

#![deny(missing_docs)]

mod ack;
mod backoff;
mod channel;
mod client;
mod clock;
mod connect;
mod error;
mod exchange;
mod extension;
mod machine;
mod message;
mod negotiation;
mod options;
mod pending;
mod refused;
mod replay;
mod salesforce;
mod session;
mod status;
mod subscribe;
mod ticket;
mod tls;
mod transport;

/// The parsing doors for fuzz harnesses (cometd-bridge's `fuzz/` and its corpus-replay
/// test), with the `fuzzing` feature only: not an API, hidden from the docs, and free to
/// change with the parsers.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::transport::{ChunkedPayload, Received, STREAM_AFTER, parse_payload, socket_config};
}

pub use ack::{AckConfirmer, AckExtension, DEFAULT_CONFIRM_WAIT};
pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use channel::ChannelPattern;
pub use client::Client;
pub use error::{BoxError, Error, ErrorKind, ServerError, TransportErrorKind};
pub use extension::{AuthExtension, Extension};
pub use message::{
    Advice, BAYEUX_VERSION, Data, ErrorField, META_CONNECT, META_DISCONNECT, META_HANDSHAKE, META_SUBSCRIBE,
    META_UNSUBSCRIBE, Message, Protocol, Reconnect,
};
pub use options::{ClientOptions, ConnectionType, DEFAULT_MAX_MESSAGE_SIZE, Proxy, Tls};
pub use replay::{
    FallbackApplied, ReplayExtension, ReplayFallback, ReplayPosition, ReplayPositions, replay_id,
};
pub use reqwest::header::HeaderMap;
pub use salesforce::{
    LOGIN_PRODUCTION, LOGIN_SANDBOX, SalesforceAuth, SalesforceCredentials, SalesforceFlow, SalesforceToken,
};
pub use status::{SessionState, SessionStatus};
pub use ticket::{Resumed, SessionTicket};
pub use transport::coalesce::ReadCoalescing;
