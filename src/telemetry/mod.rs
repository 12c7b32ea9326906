//! Logs and metrics: tracing setup, the metric names of SPEC section 8 (described once), the
//! Prometheus recorder, and a backend wrapper that times every call.

mod metrics_setup;
mod timed;

pub use metrics_setup::{
    DecisionMetrics, FailureModeMetrics, MetricsHandle, ReloadMetrics, RuleMetrics, ShedMetrics,
    eviction_counters, install_metrics, install_recorder, names, redis_metrics,
};
pub use timed::Timed;

/// Log output: human-readable lines or one JSON object per line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The logging flag shared by every binary.
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

/// The Content-Type of the Prometheus text exposition.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Installs the global tracing subscriber; the level comes from `RUST_LOG` (default `info`).
/// Calling it twice is harmless (tests start several servers in one process).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
