//! The `sluicegate` binary: parse flags, bind the listeners, run until SIGINT or SIGTERM.

use std::process::ExitCode;

use sluicegate::config::{Cli, Command};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::load();
    if let Some(Command::CheckRules { path }) = &cli.command {
        return check_rules(path);
    }
    let Some(args) = cli.into_serve() else {
        return ExitCode::FAILURE;
    };
    // Before any log line: a bad value is the one line printed.
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluicegate: {e}");
            return ExitCode::from(2);
        }
    };
    sluicegate::telemetry::init_tracing(settings.log_format);

    let (grpc_addr, http_addr) = (settings.grpc.addr, settings.http.addr);
    let grpc = match TcpListener::bind(grpc_addr).await {
        Ok(l) => l,
        Err(e) => return fail(format!("GRPC_ADDR {grpc_addr}: cannot listen: {e}")),
    };
    let http = match TcpListener::bind(http_addr).await {
        Ok(l) => l,
        Err(e) => return fail(format!("HTTP_ADDR {http_addr}: cannot listen: {e}")),
    };

    let shutdown = CancellationToken::new();
    tokio::spawn(on_signal(shutdown.clone()));
    match sluicegate::server::run(settings, grpc, http, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

/// `sluicegate check-rules PATH`: validate offline, print each rule and its bucket.
fn check_rules(path: &std::path::Path) -> ExitCode {
    match sluicegate_core::rules::load_path(path) {
        Ok(set) => {
            for rule in set.rules() {
                println!("{rule}");
            }
            let mut domains: Vec<&str> = set.domains().collect();
            domains.sort_unstable();
            let plural = |n: usize, one: &str, many: &str| {
                format!("{n} {}", if n == 1 { one } else { many })
            };
            println!(
                "OK: {} in {} ({})",
                plural(set.rules().len(), "rule", "rules"),
                plural(domains.len(), "domain", "domains"),
                domains.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluicegate: invalid rules: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One line on stderr (the contract for a bad start), exit status 1.
fn fail(message: String) -> ExitCode {
    eprintln!("sluicegate: {message}");
    ExitCode::FAILURE
}

/// The first SIGINT or SIGTERM starts a graceful shutdown; a second one exits at once.
async fn on_signal(shutdown: CancellationToken) {
    sluicegate::server::wait_for_signal().await;
    tracing::info!("signal received: shutting down gracefully (again to stop at once)");
    shutdown.cancel();
    sluicegate::server::wait_for_signal().await;
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
