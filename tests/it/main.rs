//! Integration tests: one binary, real servers from `support`.

mod boundary;
mod client;
mod harness;
mod recovery;
mod support;
