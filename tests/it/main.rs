//! Integration tests: one binary, real servers from `support`.

mod ack;
mod api;
mod backpressure;
mod boundary;
mod bridge;
mod bridge_replay;
mod cli;
mod client;
mod coalescing;
mod daemon;
mod demo;
mod durable;
mod faults;
mod fuzz;
mod harness;
mod hostile;
mod interop;
mod malformed;
mod packaging;
mod recovery;
mod replay;
mod store;
mod support;
mod tls;
