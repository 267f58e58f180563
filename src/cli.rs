//! The command line: `run` (also the bare form `idemproxy --config FILE`), `check`, `demo` and `health`.
//! Every flag can also come from an `IDEMPROXY_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{config::Overrides, telemetry::LogFormat};

/// An idempotency reverse proxy: retried POSTs never run twice.
#[derive(Debug, Parser)]
#[command(
    name = "idemproxy",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `run` when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy.
    Run(RunArgs),
    /// Validate a config file with the same flags and IDEMPROXY_* overrides `run` applies: exit 0
    /// (printing warnings, if any), or exit 2 printing every problem with its TOML path.
    Check(RunArgs),
    /// Start a small counting upstream and the proxy in front of it, and print curl commands to try.
    Demo {
        /// Proxy listen address.
        #[arg(long, env = "IDEMPROXY_LISTEN", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Log format.
        #[arg(long, env = "IDEMPROXY_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Probe the admin listener's /healthz: exit 0 on 200, 1 otherwise (for container health checks).
    Health(crate::health::HealthArgs),
}

/// Options of `run`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// TOML config file (built-in defaults when absent).
    #[arg(long, short, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:8080 (overrides server.listen).
    #[arg(long, env = "IDEMPROXY_LISTEN")]
    pub listen: Option<String>,
    /// Upstream URL, e.g. http://127.0.0.1:3000 (overrides upstream.url).
    #[arg(long, env = "IDEMPROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// sled data directory (overrides store.path).
    #[arg(long, env = "IDEMPROXY_DATA_DIR")]
    pub data_dir: Option<String>,
    /// Admin listen address (overrides admin.listen).
    #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Redis URL for backend = "redis" (overrides store.redis_url).
    #[arg(long, env = "IDEMPROXY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Log format.
    #[arg(long, env = "IDEMPROXY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The overrides these flags (and `IDEMPROXY_ADMIN_TOKEN`) make to the file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            data_dir: self.data_dir.clone(),
            admin_listen: self.admin_listen.clone(),
            // A secret: read from the environment only, never a flag (it would show in `ps`).
            admin_token: std::env::var("IDEMPROXY_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            redis_url: self.redis_url.clone(),
        }
    }
}
