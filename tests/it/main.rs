//! Integration tests: one binary, real servers from `support`.

mod backpressure;
mod boundary;
mod client;
mod harness;
mod recovery;
mod support;
