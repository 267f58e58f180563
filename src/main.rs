//! The `idemproxy` binary: parse the command line, load the config, run. Exit codes: 0 success (and a
//! complete drain), 1 runtime failure or drain timeout, 2 invalid config or usage, 130 forced exit on a
//! second signal.

use std::process::ExitCode;

use clap::Parser;
use idemproxy::{
    app::{self, ConfigSource},
    cli::{Cli, Command, RunArgs},
    config::{Config, Overrides},
    demo,
    server::{shutdown::signal_then_force, Drain},
    telemetry,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => match Config::load(Some(&config), &Overrides::default())
        {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Demo { listen, log_format }) => {
            telemetry::init(log_format);
            block_on(async move { Ok(demo::run(&listen, signal_then_force()).await?) })
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
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
    telemetry::init(args.log_format);
    block_on(async move { Ok(app::run(config, Some(source), signal_then_force()).await?) })
}

fn block_on(f: impl std::future::Future<Output = anyhow::Result<Drain>>) -> ExitCode {
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
    match rt.block_on(f) {
        Ok(Drain::Complete) => ExitCode::SUCCESS,
        Ok(Drain::TimedOut) => ExitCode::FAILURE,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("idemproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
