//! A CometD (Bayeux) client: the Rust counterpart of Python's aiocometd.
//!
//! This module owns everything about talking Bayeux to a server and knows nothing of the
//! bridge around it: no NATS, no HTTP API, no configuration files. It can be used on its
//! own.

#![deny(missing_docs)]

mod error;
mod message;

pub use error::{BoxError, Error, ErrorKind, ServerError, TransportErrorKind};
pub use message::{
    Advice, BAYEUX_VERSION, ErrorField, META_CONNECT, META_DISCONNECT, META_HANDSHAKE,
    META_SUBSCRIBE, META_UNSUBSCRIBE, Message, Reconnect,
};
