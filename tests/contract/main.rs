//! The contract's HTTP semantics (`CONTRACT.md`, rules 1–18), one test per rule, each named after it,
//! run on the whole pipeline in-process (see `harness`): a real `Proxy` over the memory store (or sled
//! on disk where the rule is about files), forwarding to a scripted upstream.
//!
//! The black-box suites (`tests/proxy_*.rs`, `hostile_*.rs`, ...) run the same rules on the real binary
//! over sockets; these pin each rule to the pipeline itself, in microseconds.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

mod harness;
mod rules;
