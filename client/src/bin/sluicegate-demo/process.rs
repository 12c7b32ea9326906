//! What any binary needs around its work: `.env`, the log format, the Prometheus recorder and the
//! stop signal. The demo calls sluicegate like any other program, so it takes none of this from
//! the server crate.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Reads `.env` from the working directory when there is one; variables already set win.
pub fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        // The line itself is not shown: it may hold a secret.
        Err(dotenvy::Error::LineParse(_, index)) => Err(format!(
            ".env does not parse at byte {index}: expected NAME=value"
        )),
        Err(e) => Err(format!(".env cannot be read: {e}")),
    }
}

/// Log output: human-readable lines or one JSON object per line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The logging flag (the server's flag of the same name).
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format: text or json (level from RUST_LOG, default info).
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        default_value = "text",
        value_enum
    )]
    pub log_format: LogFormat,
}

/// Installs the global tracing subscriber; the level comes from `RUST_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The Content-Type of the Prometheus text exposition.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Request latencies, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The Prometheus recorder with process metrics, installed once per process.
#[derive(Clone)]
pub struct Metrics {
    prometheus: PrometheusHandle,
    process: &'static metrics_process::Collector,
}

impl Metrics {
    /// Installs the recorder (later calls return the same handle); `describe` runs once, after it.
    pub fn install(describe: fn()) -> Self {
        static HANDLE: OnceLock<Metrics> = OnceLock::new();
        HANDLE
            .get_or_init(|| {
                let recorder = PrometheusBuilder::new()
                    .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                    .expect("the bucket list is not empty")
                    .build_recorder();
                let prometheus = recorder.handle();
                let _ = metrics::set_global_recorder(recorder);
                let process: &'static _ =
                    Box::leak(Box::new(metrics_process::Collector::default()));
                process.describe();
                describe();
                Metrics {
                    prometheus,
                    process,
                }
            })
            .clone()
    }

    /// The exposition text, with process metrics refreshed first.
    pub fn render(&self) -> String {
        self.process.collect();
        self.prometheus.render()
    }
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
