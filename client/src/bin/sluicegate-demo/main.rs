//! `sluicegate-demo`: a small HTTP API that asks sluicegate before serving each request, through
//! sluicegate-client's tower layer; and `POST /api/generate`, the reserve-work-settle pattern for a
//! cost known only after the work.
//!
//! - `identity.rs`: who is asking (client address, `X-API-Key` or `X-User`), i.e. the bucket key.
//! - `generate.rs`: reserve an estimate, do the (fake) work, settle the real cost.
//! - `app.rs`: configuration, routes, the layer, request metrics, serving and shutdown.
//! - `process.rs`: `.env`, logs, the Prometheus recorder, the stop signal.

mod app;
mod generate;
mod identity;
mod process;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(e) = process::load_dotenv() {
        eprintln!("sluicegate-demo: {e}");
        return ExitCode::from(2);
    }
    let config = app::DemoConfig::parse();
    process::init_tracing(config.log.log_format);
    let listener = match tokio::net::TcpListener::bind(config.addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "sluicegate-demo: DEMO_ADDR {}: cannot listen: {e}",
                config.addr
            );
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            process::wait_for_signal().await;
            tracing::info!("signal received: finishing in-flight requests");
            shutdown.cancel();
        });
    }
    match app::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluicegate-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
