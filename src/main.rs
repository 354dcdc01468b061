//! spotrun: run a Docker job on a fresh EC2 spot instance as if it ran locally.
//!
//! This file parses the command line, sets up logging, runs the command and turns its result
//! into the exit code; everything else lives in the modules below.

mod cleanup;
mod cli;
mod commands;
mod docker;
mod ec2;
mod exit;
mod settings;
mod ssh;
mod summary;
mod tunnel;

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            // Bad input is spotrun's own failure (125), as `docker run` reports it, so a CI step
            // cannot mistake it for the job's exit status.
            std::process::exit(if error.use_stderr() { exit::FAILURE } else { 0 });
        }
    };
    init_logging(cli.verbose, cli.quiet);

    // Two workers carry one SSH session and one container's output; a small blocking pool
    // (the threads `block_in_place` hands work to while stdout is written, file reads) keeps
    // threads, and their memory, few.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => exit::report(&error),
    };
    // Background tasks (keepalives, the signal listener) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    std::process::exit(code);
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let config = cli.config.as_deref();
    let profile = cli.profile.as_deref();
    match cli.command {
        Command::Run(args) => {
            let settings = settings::run_settings(*args, config, profile)?;
            commands::run::run(settings).await
        }
        Command::Ls(args) => {
            commands::ls::ls(&settings::aws_settings(&args, config, profile)?).await
        }
        Command::Reap(args) => {
            let aws = settings::aws_settings(&args.aws, config, profile)?;
            commands::reap::reap(&aws, args.dry_run).await
        }
    }
}

/// Logs go to stderr with `key=value` fields; stdout belongs to the container.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,spotrun={level}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .compact()
        .init();
}
