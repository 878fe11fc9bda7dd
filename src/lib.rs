//! cometd-bridge: a CometD (Bayeux) client, and a daemon that forwards CometD channels to
//! NATS and webhooks.
//!
//! # Layout
//! - [`cometd`]: the client, the `bayeux-client` crate of this workspace (`crates/`),
//!   re-exported here; a project that wants only the client depends on that crate alone.
//! - [`config`]: loading and validating the daemon's configuration; [`secret`]: values
//!   that never print.
//! - [`bridge`]: source tasks (one per CometD server) and forwarders (one per subscription).
//! - [`delivery`]: a message on its way to a sink, and its spooled form.
//! - [`sink`]: NATS and webhook delivery, and how failures are retried; [`store`]: the
//!   state store (subscriptions, positions, dead letters, spools).
//! - [`admin`]: health, readiness and metrics over HTTP; [`telemetry`]: logs and metrics.
//! - [`app`]: the daemon put together; [`reload`]: the configuration applied again while it
//!   runs; [`shutdown`]: signals; [`cli`]: the command line.
//! - `fuzzing` (hidden, with the `fuzzing` feature only): the fuzz harnesses of `fuzz/`, not
//!   an API.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod bridge;
pub mod cli;
pub mod cluster;
/// The CometD client: the `bayeux-client` crate (`crates/bayeux-client`), under the name
/// the daemon's code and tests have always used.
pub use bayeux_client as cometd;
pub mod config;
pub mod delivery;
pub mod files;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod redact;
pub mod reload;
pub mod secret;
pub mod shutdown;
pub mod sink;
pub mod store;
pub mod telemetry;
