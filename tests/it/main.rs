//! Integration tests: one binary, real servers from `support`.

mod boundary;
mod harness;
mod support;
