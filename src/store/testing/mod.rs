//! For tests of this crate and of new backends (the `testing` feature): the store conformance suite,
//! run against every backend, and a launcher of real `redis-server` processes.

// Test support: a failed step is a failed test, as in `tests/`.
#![allow(clippy::unwrap_used)]

pub mod conformance;
pub mod failing;
pub mod redis_cluster;
pub mod redis_server;
