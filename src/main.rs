//! The `idemproxy` binary: parse the command line, load the config, run. Exit codes: 0 success (and a
//! complete drain), 1 runtime failure or drain timeout, 2 invalid config or usage.

use std::process::ExitCode;

use clap::Parser;
use idemproxy::{
    app,
    cli::{Cli, Command, RunArgs},
    config::Config,
    demo,
    server::{shutdown::signal, Drain},
    telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => {
            match Config::load(Some(&config), &RunArgs::overrides_none()) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Command::Demo { listen, log_format }) => {
            telemetry::init(log_format);
            runtime_then(|| async move {
                demo::run(&listen, signal())
                    .await
                    .map_err(anyhow::Error::from)
            })
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    // The config is validated before anything is bound or opened.
    let config = match Config::load(args.config.as_deref(), &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(args.log_format);
    runtime_then(|| async move {
        app::run(config, signal())
            .await
            .map_err(anyhow::Error::from)
    })
}

fn runtime_then<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Drain>>,
{
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
    match rt.block_on(f()) {
        Ok(Drain::Complete) => ExitCode::SUCCESS,
        Ok(Drain::TimedOut) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("idemproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
