//! idemproxy: an idempotency reverse proxy.
//!
//! Clients retry; idemproxy makes sure a retried `POST`/`PATCH` never runs twice on the upstream. It derives
//! a key for each protected request, claims it atomically in a durable store, forwards only first-seen
//! requests, records the upstream's answer and replays it to every retry.
//!
//! # Layout
//! - [`config`]: TOML file → validated, typed [`config::Config`] (every problem reported with its path).
//! - [`key`]: client keys, scoped store keys and request fingerprints.
//! - [`store`]: the [`store::Store`] trait, its record state machine and the sled / in-memory backends.
//! - [`proxy`]: the request pipeline (route → key → claim → forward → record → respond) and the upstream client.
//! - [`server`]: accept loops, connection handling and graceful shutdown; knows nothing about idempotency.
//! - [`admin`]: the admin listener (`/healthz`, `/readyz`).
//! - [`app`]: wires the pieces together for `idemproxy run` and `idemproxy demo`.
//! - [`pem`]: PEM files named in the config, read into rustls types.
//! - [`health`]: `idemproxy health`, the shell-free probe behind the container image's `HEALTHCHECK`.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod health;
pub mod key;
pub mod pem;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telemetry;
