//! The `idemproxy` binary: parse the command line, load the config, run. Exit codes: 0 success (and a
//! complete drain), 1 runtime failure or drain timeout, 2 invalid config or usage, 130 forced exit on a
//! second signal. `idemproxy health` exits 0 (healthy) or 1 (unhealthy), as container health checks expect.

use std::process::ExitCode;

/// mimalloc: the request path allocates many small, short-lived buffers (headers, bodies, sled nodes),
/// which glibc malloc serves markedly slower under two threads (seen in profiles of the proxy).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use idemproxy::{
    app::{self, ConfigSource},
    cli::{Cli, Command, RunArgs},
    config::Config,
    demo, health,
    server::{shutdown::signal_then_force, Drain},
    telemetry,
};

fn main() -> ExitCode {
    // Files the proxy creates (its store) are readable by its user only (contract rule 17).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check(args)) => check(&args),
        Some(Command::Demo { listen, log_format }) => serve(log_format, None, async move {
            Ok(demo::run(&listen, signal_then_force()).await?)
        }),
        Some(Command::Health(args)) => health::main(&args),
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

/// `idemproxy check`: the config `run` would use (same file, flags and environment), validated.
fn check(args: &RunArgs) -> ExitCode {
    let name = args.config.as_ref().map_or_else(
        || "built-in defaults".to_owned(),
        |p| p.display().to_string(),
    );
    match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(config) => {
            for w in config.warnings() {
                eprintln!("warning: {w}");
            }
            println!("{name}: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let source = ConfigSource {
        path: args.config.clone(),
        overrides: args.overrides(),
    };
    // The config is validated before anything is bound or opened.
    let config = match Config::load(source.path.as_deref(), &source.overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let otlp = config.telemetry.otlp_endpoint.clone();
    serve(args.log_format, otlp.as_deref(), async move {
        Ok(app::run(config, Some(source), signal_then_force()).await?)
    })
}

/// Starts the runtime and the logs (and traces) on it, runs `f`, then sends the last spans.
fn serve(
    log_format: telemetry::LogFormat,
    otlp_endpoint: Option<&str>,
    f: impl std::future::Future<Output = anyhow::Result<Drain>>,
) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idemproxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _in_runtime = rt.enter();
        telemetry::init(log_format, otlp_endpoint)
    };
    let telemetry = match telemetry {
        Ok(t) => t,
        Err(e) => {
            // An OTEL_* variable the exporter cannot use: a configuration error.
            eprintln!("idemproxy: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        let result = f.await;
        telemetry.shutdown().await;
        result
    });
    // Blocking work that cannot finish (a store stuck on a full disk) must not hold up the exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(Drain::Complete) => ExitCode::SUCCESS,
        Ok(Drain::TimedOut) => ExitCode::FAILURE,
        Err(e) => {
            let e = causes(&e);
            tracing::error!("{e}");
            eprintln!("idemproxy: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors already say their cause in their
/// own message, and `{:#}` would repeat it.
fn causes(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
