//! The Prometheus recorder and the metric names, each described once.

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Metric names (the README's "Operating it"): promises to dashboards, never renamed.
pub mod names {
    pub const DECISIONS: &str = "sluicegate_decisions_total";
    pub const DECISION_DURATION: &str = "sluicegate_decision_duration_seconds";
    pub const BACKEND_DURATION: &str = "sluicegate_backend_duration_seconds";
    pub const BACKEND_ERRORS: &str = "sluicegate_backend_errors_total";
    pub const FAILURE_MODE: &str = "sluicegate_failure_mode_total";
    pub const BUILD_INFO: &str = "sluicegate_build_info";
    pub const RULE_DECISIONS: &str = "sluicegate_rule_decisions_total";
    pub const TOKENS_REMAINING: &str = "sluicegate_tokens_remaining";
    pub const RULES_RELOADS: &str = "sluicegate_rules_reloads_total";
    pub const SHED: &str = "sluicegate_shed_total";
    pub const LOCAL_ANSWERS: &str = "sluicegate_local_answers_total";
    pub const BATCH_SIZE: &str = "sluicegate_backend_batch_size";
    pub const CIRCUIT_OPEN: &str = "sluicegate_backend_circuit_open";
    pub const MEMORY_EVICTIONS: &str = "sluicegate_memory_evictions_total";
    pub const NEAR_LIMIT: &str = "sluicegate_near_limit_total";
    pub const REFUSED: &str = "sluicegate_refused_total";
    pub const IN_FLIGHT: &str = "sluicegate_in_flight";
    pub const IN_FLIGHT_EXPIRED: &str = "sluicegate_in_flight_expired_total";
    pub const RELEASES: &str = "sluicegate_in_flight_releases_total";
    pub const GONE_REFUNDS: &str = "sluicegate_gone_refunds_total";
    pub const CONCURRENCY_LIMIT: &str = "sluicegate_concurrency_limit";
    pub const GOAWAYS: &str = "sluicegate_goaways_total";
    pub const RLQS_STREAMS: &str = "sluicegate_rlqs_streams";
    pub const RLQS_BUCKETS: &str = "sluicegate_rlqs_buckets";
    pub const RLQS_REPORTS: &str = "sluicegate_rlqs_reports_total";
    pub const RLQS_ASSIGNMENTS: &str = "sluicegate_rlqs_assignments_total";
    pub const RLQS_EXCHANGES: &str = "sluicegate_rlqs_exchanges_total";
    pub const LEASES: &str = "sluicegate_leases_total";
    pub const LEASED_TOKENS: &str = "sluicegate_leased_tokens_total";
    pub const LEASE_RETURNED_TOKENS: &str = "sluicegate_lease_returned_tokens_total";
    pub const LEASE_ANSWERS: &str = "sluicegate_lease_answers_total";
}

/// Histogram buckets in seconds: fine below a millisecond (memory decisions take microseconds)
/// up to 100 ms and a little beyond (a Redis timeout shows up in the top buckets).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
];

/// Decisions per script call: 1 when idle, up to the cap (128) under load.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Renders the Prometheus text; cheap to clone.
#[derive(Clone)]
pub struct MetricsHandle {
    prometheus: PrometheusHandle,
    process: &'static metrics_process::Collector,
}

impl MetricsHandle {
    /// The exposition text, with process metrics refreshed first.
    pub fn render(&self) -> String {
        self.process.collect();
        self.prometheus.render()
    }

    /// Drains histogram samples into their buckets; run periodically.
    pub fn run_upkeep(&self) {
        self.prometheus.run_upkeep();
    }
}

/// Installs the global recorder for sluicegate (once per process; later calls return the same
/// handle) and describes every metric.
pub fn install_metrics() -> MetricsHandle {
    install_recorder(|| {
        describe();
        metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    })
}

/// Installs the Prometheus recorder with process metrics; `describe` runs once, after it.
fn install_recorder(describe: fn()) -> MetricsHandle {
    static HANDLE: OnceLock<MetricsHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(names::BATCH_SIZE.into()), BATCH_BUCKETS)
                })
                .expect("the bucket lists are not empty")
                .build_recorder();
            let prometheus = recorder.handle();
            // Another recorder may be installed already (an embedding application); keep ours
            // rendering what it can rather than failing the server.
            let _ = metrics::set_global_recorder(recorder);
            let process: &'static _ = Box::leak(Box::new(metrics_process::Collector::default()));
            process.describe();
            describe();
            MetricsHandle {
                prometheus,
                process,
            }
        })
        .clone()
}

fn describe() {
    use metrics::Unit;
    describe_counter!(names::DECISIONS, "Decisions answered, by API and result.");
    describe_histogram!(
        names::DECISION_DURATION,
        Unit::Seconds,
        "Time to answer one decision call, by API."
    );
    describe_histogram!(
        names::BACKEND_DURATION,
        Unit::Seconds,
        "Time of one backend call, by backend."
    );
    describe_counter!(
        names::BACKEND_ERRORS,
        "Failed backend calls, by backend and kind."
    );
    describe_counter!(
        names::FAILURE_MODE,
        "Answers decided by FAILURE_MODE because the backend failed, by mode."
    );
    describe_gauge!(
        names::BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_counter!(
        names::RULE_DECISIONS,
        "Hits decided per Envoy rule, by domain, rule and result (allowed, denied, shadow_denied; near_limit counts allowed hits that left the bucket near its limit)."
    );
    describe_counter!(
        names::NEAR_LIMIT,
        "Allowed decisions that left less than (1 - NEAR_LIMIT_RATIO) of the capacity, by API."
    );
    describe_gauge!(
        names::TOKENS_REMAINING,
        "Tokens left after the latest decision of the rule, by domain and rule."
    );
    describe_counter!(
        names::RULES_RELOADS,
        "Rules loads and reloads, by outcome (ok, error)."
    );
    describe_counter!(
        names::MEMORY_EVICTIONS,
        "Memory buckets dropped because MEMORY_MAX_BUCKETS was reached, by whether they were full (nothing lost) or partial (the key starts full again)."
    );
    describe_counter!(
        names::LOCAL_ANSWERS,
        "Decisions answered by the local deny cache without calling Redis, by API."
    );
    describe_histogram!(
        names::BATCH_SIZE,
        "Bucket decisions per Redis script call, by backend."
    );
    describe_gauge!(
        names::CIRCUIT_OPEN,
        "1 while the circuit breaker of a Redis node is open (calls answered at once), by node."
    );
    describe_counter!(
        names::REFUSED,
        "Requests answered without evaluating all of them as asked (past the bounds, a descriptor with no entries, an ignored override, a refused refund), by API and reason."
    );
    describe_gauge!(
        names::IN_FLIGHT,
        "In-flight leases held, by domain and rule (the Acquire API: domain sluicegate.v1, rule Acquire); each replica counts what it granted and freed, so sum over replicas."
    );
    describe_counter!(
        names::IN_FLIGHT_EXPIRED,
        "In-flight leases that expired without a release (a leak indicator: a crashed caller, a lost stream-done call), by domain and rule."
    );
    describe_counter!(
        names::RELEASES,
        "Releases of in-flight leases, by API and result (released, or unknown: the id was not held, or had expired)."
    );
    describe_counter!(
        names::GONE_REFUNDS,
        "Takes given back because their caller had gone (its deadline passed) when the backend answered: tokens spent for nobody, returned, by backend."
    );
    describe_counter!(
        names::GOAWAYS,
        "GOAWAY frames sent on the gRPC port, by HTTP/2 error code: no_error is an orderly close (shutdown, MAX_CONNECTION_AGE); any other ends every call in flight on the connection."
    );
    describe_gauge!(
        names::CONCURRENCY_LIMIT,
        "The adaptive concurrency limit: decision calls worked on at once at most, following measured latency against MAX_QUEUE_MS (MAX_CONCURRENT_REQUESTS the cap)."
    );
    describe_gauge!(
        names::RLQS_STREAMS,
        "Envoy quota (RLQS) streams open on this replica."
    );
    describe_gauge!(
        names::RLQS_BUCKETS,
        "Envoy quota buckets tracked on this replica (one per Envoy and bucket id)."
    );
    describe_counter!(
        names::RLQS_REPORTS,
        "Requests Envoys reported deciding from their quota assignments, by domain, rule and result (allowed, denied)."
    );
    describe_counter!(
        names::RLQS_ASSIGNMENTS,
        "Quota assignments sent to Envoys, by domain and rule (abandon: buckets given up)."
    );
    describe_counter!(
        names::RLQS_EXCHANGES,
        "Backend calls exchanging quota demand with the other replicas (one per second, per 1,000 rule buckets), by outcome (ok, error)."
    );
    describe_counter!(
        names::LEASES,
        "Leases of Redis buckets granted to this replica (QUOTA_LEASES)."
    );
    describe_counter!(
        names::LEASED_TOKENS,
        "Tokens taken from Redis buckets as this replica's leases."
    );
    describe_counter!(
        names::LEASE_RETURNED_TOKENS,
        "Leased tokens given back unspent (a lease expired, a shape changed, shutdown)."
    );
    describe_counter!(
        names::LEASE_ANSWERS,
        "Takes answered from this replica's leases, without a call to Redis."
    );
    // Registered at 0 whatever the backend (the memory one never leases).
    let _ = crate::telemetry::handles::lease_counters();
    describe_counter!(
        names::SHED,
        "Calls refused before any work, by reason (concurrency: MAX_CONCURRENT_REQUESTS; adaptive: the adaptive limit; queue: waited longer than MAX_QUEUE_MS; message_size; bounds; deadline: a grpc-timeout under 1 ms or passed while waiting), and TLS connections shed before their handshake (handshake: their peer had its share in progress; handshake_cut: cut for a newer one when the gate was full)."
    );
}
