//! Logs and metrics: tracing setup, the metric names of the README's "Operating it" (described
//! once), the Prometheus recorder, a backend wrapper that times every call, and what the status
//! page shows.
//!
//! - `recorder.rs`: the recorder and the metric names;
//! - `handles.rs`: the handles the hot path increments (per API, FAILURE_MODE, shedding, ...);
//! - `rule_metrics.rs`: per-rule series and the counts the status page shows;
//! - `activity.rs`: what this process saw, for `/` and `/debug` (it composes the next three);
//! - `live.rs`: the last minutes second by second; `top_keys.rs`: the heaviest denied keys;
//! - `decision_log.rs`: a line per decision at debug, denials sampled at info;
//! - `timed.rs`: the backend wrapper.

mod activity;
pub(crate) mod decision_log;
mod handles;
pub(crate) mod live;
mod recorder;
mod rule_metrics;
mod timed;
pub(crate) mod top_keys;

pub use activity::Activity;
pub(crate) use decision_log::DenialSampler;
pub(crate) use handles::{
    DecisionMetrics, FailureModeMetrics, RefusedMetrics, ReloadMetrics, ShedMetrics,
    eviction_counters, redis_metrics,
};
pub(crate) use recorder::{MetricsHandle, install_metrics, names};
pub(crate) use rule_metrics::{InFlightMetrics, RuleMetrics};
pub(crate) use timed::Timed;

/// Log output: human-readable lines or one JSON object per line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The Content-Type of the Prometheus text exposition.
pub(crate) const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Installs the global tracing subscriber; the level comes from `RUST_LOG` (default `info`).
/// Calling it twice is harmless (tests start several servers in one process).
pub fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a file or a log collector.
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
