//! The `runner` binary: parse arguments, set up logging, run a verb, map
//! errors to exit codes.

use clap::Parser;

fn main() {
    let args = runner::cli::Args::parse();
    let filter = std::env::var("RUNNER_LOG").unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::env::var_os("NO_COLOR").is_none())
        .init();
    if let Err(e) = runner::cli::run(args) {
        let code = e
            .downcast_ref::<runner::Error>()
            .map_or(1, |e| e.exit_code());
        eprintln!("error: {e:#}");
        std::process::exit(code);
    }
}
