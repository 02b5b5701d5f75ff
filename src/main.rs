//! The `runner` binary: parse args, set up logging, run a verb, map
//! errors to exit codes.

use clap::Parser;
use std::io::IsTerminal;

/// A command-line usage error (BSD's EX_USAGE): not a bad job (2).
const USAGE_EXIT: i32 = 64;

fn main() {
    let args = match runner::cli::Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // --help and --version print to stdout and succeed.
            let code = if e.use_stderr() { USAGE_EXIT } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    let filter = std::env::var("RUNNER_LOG").unwrap_or_else(|_| "info".into());
    let colour = std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_writer(|| runner::cli::LogWriter)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(colour)
        .init();
    if let Err(e) = runner::cli::run(args) {
        let code = e
            .downcast_ref::<runner::Error>()
            .map_or(1, |e| e.exit_code());
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}
