//! Durable state. So far: dead letters, the messages that could not be delivered, kept with
//! the reason so that nothing is dropped silently. The [`FileStore`] needs no server.

mod file;

use serde::{Deserialize, Serialize};

pub use file::FileStore;

/// A message that could not be delivered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique id of this dead letter (the delivery id).
    pub id: String,
    /// The subscription it was for.
    pub subscription: String,
    /// The source it came from.
    pub source: String,
    /// The delivery as the sink would have received it (`source`, `subscription`,
    /// `channel`, `id`, `data`, `ext`).
    pub message: serde_json::Value,
    /// Why it was not delivered.
    pub reason: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When it was stored, RFC 3339.
    pub failed_at: String,
}

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store's files could not be read or written.
    #[error("state store {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A stored record could not be read back.
    #[error("state store {path}: corrupt record: {message}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}
