//! cometd-bridge: a CometD (Bayeux) client, and a daemon that forwards CometD channels to
//! NATS and webhooks.
//!
//! # Layout
//! - [`cometd`]: the client. It uses nothing else from this crate, so it can be used alone.
//! - [`cli`]: the command line (`listen`, `publish`).

#![forbid(unsafe_code)]

pub mod cli;
pub mod cometd;
