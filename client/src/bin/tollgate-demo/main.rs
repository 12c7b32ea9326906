//! The `tollgate-demo` binary: parse flags, bind, serve until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tollgate::demo::{DemoConfig, run};

#[tokio::main]
async fn main() -> ExitCode {
    let _ = dotenvy::dotenv();
    let config = DemoConfig::parse();
    tollgate::telemetry::init_tracing(config.log.log_format);
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "tollgate-demo: DEMO_ADDR {}: cannot listen: {e}",
                config.addr
            );
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tollgate::server::wait_for_signal().await;
            tracing::info!("signal received: finishing in-flight requests");
            shutdown.cancel();
        });
    }
    match run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
