//! idemproxy: an idempotency reverse proxy.
//!
//! Clients retry; idemproxy makes sure a retried `POST`/`PATCH` never runs twice on the upstream. It derives
//! a key for each protected request, claims it atomically in a durable store, forwards only first-seen
//! requests, records the upstream's answer and replays it to every retry.
//!
//! # Layout
//! Top-down; a module uses only modules below it (no import cycle).
//! - `main` and [`cli`]: the command line; [`app`]: wires the pieces together for `idemproxy run` and
//!   `idemproxy demo` ([`demo`]); [`health`]: `idemproxy health`, the probe behind the image's
//!   `HEALTHCHECK`; [`telemetry`]: logging.
//! - [`admin`]: the admin listener (`/healthz`, `/readyz`, `/metrics`, the key API).
//! - [`server`]: accept loops, TLS, connections and graceful shutdown; knows nothing about idempotency.
//! - [`proxy`]: the request pipeline (route → key → claim → forward → record → respond).
//! - [`key`]: client keys, scoped store keys and request fingerprints; [`store`]: the [`store::Store`]
//!   trait, its record state machine and the sled / Redis / in-memory backends; [`upstream`]: the
//!   client that forwards requests.
//! - [`config`]: TOML file → validated, typed [`config::Config`] (every problem reported with its path);
//!   [`metrics`]: every metric the proxy exports; [`body`]: the body type and bounded buffering;
//!   [`clock`]; [`pem`]: PEM files named in the config.

pub mod admin;
pub mod app;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod health;
pub mod key;
pub mod metrics;
pub mod pem;
pub mod proxy;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod upstream;
