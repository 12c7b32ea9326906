//! The flags of `sluicegate serve`, in groups (each a heading of `--help`). Every flag has an `env`
//! twin, the contract of the README's Configuration section, and its doc comment is its help text.
//! Values are checked while parsing; checks that need several values are in `settings.rs`.

use std::{net::SocketAddr, path::PathBuf, str::FromStr};

use clap::Args;
use sluicegate_core::FailureMode;

use crate::telemetry::LogFormat;

use super::values::{
    RedisType, RedisUrl, display, header_name, listen_addr, positive_f64, ratio, redacted,
    shape_bound,
};

/// Where buckets live: Redis (one server, a cluster or a sentinel group) or, without REDIS_URL, this
/// process's memory.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "Redis")]
pub struct StorageArgs {
    /// Redis URL (redis:// or rediss://); for cluster and sentinel a comma-separated list. Unset: buckets live in memory.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        hide_env_values = true
    )]
    #[serde(serialize_with = "redacted")]
    pub redis_url: Option<RedisUrl>,

    /// How REDIS_URL is read: single, cluster or sentinel (sentinel: master_name,host:port,...).
    #[arg(
        long,
        env = "REDIS_TYPE",
        value_name = "REDIS_TYPE",
        default_value = "single",
        value_enum
    )]
    pub redis_type: RedisType,

    /// Multiplexed connections (and calls in flight) per Redis node.
    #[arg(long, env = "REDIS_CONNECTIONS", value_name = "REDIS_CONNECTIONS", default_value = "2", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub redis_connections: u32,

    /// rediss://: the CA (PEM) that signed Redis's certificate, instead of the system's trust store.
    #[arg(long, env = "REDIS_TLS_CACERT", value_name = "REDIS_TLS_CACERT")]
    pub redis_tls_cacert: Option<PathBuf>,

    /// rediss://: the client certificate chain (PEM) to present to Redis.
    #[arg(
        long,
        env = "REDIS_TLS_CLIENT_CERT",
        value_name = "REDIS_TLS_CLIENT_CERT"
    )]
    pub redis_tls_client_cert: Option<PathBuf>,

    /// rediss://: the client certificate's private key (PEM).
    #[arg(
        long,
        env = "REDIS_TLS_CLIENT_KEY",
        value_name = "REDIS_TLS_CLIENT_KEY"
    )]
    pub redis_tls_client_key: Option<PathBuf>,

    /// Deadline of one call to Redis, in milliseconds. Below Envoy's default rate-limit timeout
    /// (20 ms), so that FAILURE_MODE answers before Envoy gives up on the call.
    #[arg(long, env = "REDIS_TIMEOUT_MS", value_name = "REDIS_TIMEOUT_MS", default_value = "15", value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// Deny locally, without calling Redis, a key that Redis said is short of tokens while the
    /// refill cannot yet cover the cost (exact in the safe direction).
    #[arg(
        long,
        env = "LOCAL_DENY_CACHE",
        value_name = "LOCAL_DENY_CACHE",
        default_value = "true"
    )]
    pub local_deny_cache: bool,

    /// Leased quota on the Redis backend: a replica takes a slice of a hot bucket in the call of an
    /// allowed take and answers that key's next takes from it without Redis (the bound stays
    /// exact: see the README's "Leased quota").
    #[arg(
        long,
        env = "QUOTA_LEASES",
        value_name = "QUOTA_LEASES",
        default_value = "false"
    )]
    pub quota_leases: bool,

    /// How long a lease is spent before it goes back, in milliseconds.
    #[arg(long, env = "LEASE_MS", value_name = "LEASE_MS", default_value = "250", value_parser = clap::value_parser!(u32).range(1..=60_000))]
    pub lease_ms: u32,

    /// The largest share of a bucket's capacity one lease may hold (above 0, at most 0.5).
    #[arg(
        long,
        env = "LEASE_MAX_FRACTION",
        value_name = "LEASE_MAX_FRACTION",
        default_value = "0.1",
        value_parser = lease_fraction
    )]
    pub lease_max_fraction: f64,

    /// Memory backend: the most buckets held; when full, the bucket nearest to full is dropped first.
    #[arg(long, env = "MEMORY_MAX_BUCKETS", value_name = "MEMORY_MAX_BUCKETS", default_value = "1000000", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_buckets: u64,
}

/// LEASE_MAX_FRACTION: a share above 0 and at most a half (a lease is only taken while the bucket
/// keeps half its capacity).
fn lease_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 0.5 => Ok(f),
        _ => Err(format!(
            "must be a number above 0 and at most 0.5, got '{s}'"
        )),
    }
}

/// The gRPC port: its address, TLS and mTLS, and what one call or connection may take.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "gRPC and TLS")]
pub struct GrpcArgs {
    /// gRPC listener (ShouldAllow, health, reflection).
    #[arg(
        long,
        env = "GRPC_ADDR",
        value_name = "GRPC_ADDR",
        default_value = "0.0.0.0:8081",
        value_parser = listen_addr
    )]
    pub grpc_addr: SocketAddr,

    /// TLS on the gRPC port (envoyproxy/ratelimit's variable).
    #[arg(
        long = "grpc-tls",
        env = "GRPC_SERVER_USE_TLS",
        value_name = "GRPC_SERVER_USE_TLS",
        default_value = "false"
    )]
    pub grpc_tls: bool,

    /// The gRPC port's certificate chain (PEM); re-read when the file changes.
    #[arg(
        long = "grpc-tls-cert",
        env = "GRPC_SERVER_TLS_CERT",
        value_name = "GRPC_SERVER_TLS_CERT"
    )]
    pub grpc_tls_cert: Option<PathBuf>,

    /// The gRPC port's private key (PEM); re-read when the file changes.
    #[arg(
        long = "grpc-tls-key",
        env = "GRPC_SERVER_TLS_KEY",
        value_name = "GRPC_SERVER_TLS_KEY"
    )]
    pub grpc_tls_key: Option<PathBuf>,

    /// mTLS: clients must present a certificate that chains to this CA (PEM).
    #[arg(
        long = "grpc-client-ca",
        env = "GRPC_CLIENT_TLS_CACERT",
        value_name = "GRPC_CLIENT_TLS_CACERT"
    )]
    pub grpc_client_ca: Option<PathBuf>,

    /// mTLS: the client certificate SANs accepted, comma-separated (DNS names, URIs such as
    /// spiffe://..., IPs); a client whose certificate carries none of them is refused.
    #[arg(
        long = "grpc-client-san",
        env = "GRPC_CLIENT_TLS_SAN",
        value_name = "GRPC_CLIENT_TLS_SAN",
        value_delimiter = ','
    )]
    pub grpc_client_san: Vec<String>,

    /// The largest gRPC request accepted, in bytes; larger ones are refused from their length
    /// prefix, before decoding.
    #[arg(long, env = "GRPC_MAX_MESSAGE_BYTES", value_name = "GRPC_MAX_MESSAGE_BYTES", default_value = "1048576", value_parser = clap::value_parser!(u32).range(64..))]
    pub grpc_max_message_bytes: u32,

    /// Decision calls in progress at most (the adaptive limit moves under this cap); beyond it a
    /// call is refused at once with RESOURCE_EXHAUSTED (never queued).
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", value_name = "MAX_CONCURRENT_REQUESTS", default_value = "10000", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// The longest a call may wait in sluicegate (for a turn on the runtime or in a Redis node's
    /// queue) before its decision is made, in milliseconds; a call that waited longer is shed with
    /// RESOURCE_EXHAUSTED before any backend work. Below Envoy's 20 ms rate-limit timeout: an answer
    /// after it is worth nothing. Also the latency the adaptive concurrency limit aims under.
    #[arg(long, env = "MAX_QUEUE_MS", value_name = "MAX_QUEUE_MS", default_value = "10", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub max_queue_ms: u64,

    /// Close client connections older than this, gracefully (GOAWAY), so clients spread over new
    /// replicas; 0: never.
    #[arg(
        long,
        env = "GRPC_MAX_CONNECTION_AGE_SECS",
        value_name = "GRPC_MAX_CONNECTION_AGE_SECS",
        default_value = "0"
    )]
    pub grpc_max_connection_age_secs: u64,
}

/// How decisions are made and answered on both APIs.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "Decisions (both APIs)")]
pub struct DecisionArgs {
    /// On backend failure: error (gRPC UNAVAILABLE), allow or deny (an answer flagged degraded).
    #[arg(long, env = "FAILURE_MODE", value_name = "FAILURE_MODE", default_value = "error", value_parser = FailureMode::from_str)]
    #[serde(serialize_with = "display")]
    pub failure_mode: FailureMode,

    /// Decide and count, but always answer allowed.
    #[arg(
        long,
        env = "SHADOW_MODE",
        value_name = "SHADOW_MODE",
        default_value = "false"
    )]
    pub shadow_mode: bool,

    /// Honour refunds taken on the caller's word: a Settle without a reservation_id below what it
    /// says it reserved, and Envoy's is_negative_hits. Any caller reaching the port could then
    /// refill any bucket. False (the default): such a Settle is PERMISSION_DENIED, and Envoy's
    /// is_negative_hits is answered OK without giving anything back (counted). A Settle of a
    /// reservation_id needs no switch: it returns at most what was taken, once.
    #[arg(
        long,
        env = "ALLOW_REFUNDS",
        value_name = "ALLOW_REFUNDS",
        default_value = "false"
    )]
    pub allow_refunds: bool,

    /// Let ShouldAllow callers choose a bucket's capacity and rate; false: they must leave both at
    /// 0 (the server's TB_CAPACITY and TB_RATE), else PERMISSION_DENIED.
    #[arg(
        long,
        env = "ALLOW_CLIENT_SHAPES",
        value_name = "ALLOW_CLIENT_SHAPES",
        default_value = "true"
    )]
    pub allow_client_shapes: bool,

    /// The largest capacity a request may ask for (at most 1e15).
    #[arg(long, env = "MAX_CAPACITY", value_name = "MAX_CAPACITY", default_value = "1e9", value_parser = shape_bound, allow_negative_numbers = true)]
    pub max_capacity: f64,

    /// The largest rate a request may ask for (at most 1e15).
    #[arg(long, env = "MAX_RATE", value_name = "MAX_RATE", default_value = "1e9", value_parser = shape_bound, allow_negative_numbers = true)]
    pub max_rate: f64,

    /// A decision that leaves less than (1 - NEAR_LIMIT_RATIO) of the capacity is counted as near
    /// the limit (between 0 and 1).
    #[arg(long, env = "NEAR_LIMIT_RATIO", value_name = "NEAR_LIMIT_RATIO", default_value = "0.8", value_parser = ratio, allow_negative_numbers = true)]
    pub near_limit_ratio: f64,
}

/// `sluicegate.v1` ShouldAllow: the default bucket, its keys, batches.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "ShouldAllow")]
pub struct ShouldAllowArgs {
    /// Default bucket size (burst) when a request gives none.
    #[arg(long = "capacity", env = "TB_CAPACITY", value_name = "TB_CAPACITY", default_value = "20", value_parser = positive_f64, allow_negative_numbers = true)]
    pub capacity: f64,

    /// Default refill, tokens per second, when a request gives none.
    #[arg(long = "rate", env = "TB_RATE", value_name = "TB_RATE", default_value = "20", value_parser = positive_f64, allow_negative_numbers = true)]
    pub rate: f64,

    /// Redis key prefix of ShouldAllow buckets.
    #[arg(
        long,
        env = "BUCKET_PREFIX",
        value_name = "BUCKET_PREFIX",
        default_value = "tb:user:"
    )]
    pub bucket_prefix: String,

    /// ShouldAllowBatch: the most decisions one call may carry.
    #[arg(long, env = "MAX_BATCH", value_name = "MAX_BATCH", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,
}

/// Envoy's rate-limit API: the rules, its keys, the bounds of one request, what answers carry.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "Envoy")]
pub struct EnvoyArgs {
    /// Rules for the Envoy API: a YAML file or a directory of *.yaml (envoyproxy/ratelimit's format), hot-reloaded.
    #[arg(long, env = "RULES", value_name = "RULES")]
    pub rules: Option<PathBuf>,

    /// Redis key prefix of Envoy descriptor buckets.
    #[arg(
        long,
        env = "RLS_KEY_PREFIX",
        value_name = "RLS_KEY_PREFIX",
        default_value = "tb:rls:"
    )]
    pub rls_key_prefix: String,

    /// Envoy: the most descriptors one request may carry (more: INVALID_ARGUMENT before any work).
    #[arg(long, env = "MAX_DESCRIPTORS", value_name = "MAX_DESCRIPTORS", default_value = "64", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_descriptors: u32,

    /// Envoy: the longest bucket key a descriptor may make, in bytes (more: INVALID_ARGUMENT).
    #[arg(long, env = "MAX_KEY_BYTES", value_name = "MAX_KEY_BYTES", default_value = "1024", value_parser = clap::value_parser!(u32).range(16..))]
    pub max_key_bytes: u32,

    /// Envoy: charge every descriptor that was within its limit even when the request is over
    /// (envoyproxy/ratelimit's behaviour). Default: a request answered OVER_LIMIT charges none.
    #[arg(
        long,
        env = "CHARGE_ON_DENY",
        value_name = "CHARGE_ON_DENY",
        default_value = "false"
    )]
    pub charge_on_deny: bool,

    /// Envoy: add RateLimit-Limit, -Remaining and -Reset headers to every answer, from the most
    /// restrictive descriptor (envoyproxy/ratelimit's variable).
    #[arg(
        long,
        env = "LIMIT_RESPONSE_HEADERS_ENABLED",
        value_name = "LIMIT_RESPONSE_HEADERS_ENABLED",
        default_value = "false"
    )]
    pub limit_response_headers_enabled: bool,

    /// Envoy: the name of the limit header (with LIMIT_RESPONSE_HEADERS_ENABLED).
    #[arg(long, env = "LIMIT_LIMIT_HEADER", value_name = "LIMIT_LIMIT_HEADER", default_value = "RateLimit-Limit", value_parser = header_name)]
    pub limit_limit_header: String,

    /// Envoy: the name of the remaining header (with LIMIT_RESPONSE_HEADERS_ENABLED).
    #[arg(long, env = "LIMIT_REMAINING_HEADER", value_name = "LIMIT_REMAINING_HEADER", default_value = "RateLimit-Remaining", value_parser = header_name)]
    pub limit_remaining_header: String,

    /// Envoy: the name of the reset header, in seconds (with LIMIT_RESPONSE_HEADERS_ENABLED).
    #[arg(long, env = "LIMIT_RESET_HEADER", value_name = "LIMIT_RESET_HEADER", default_value = "RateLimit-Reset", value_parser = header_name)]
    pub limit_reset_header: String,

    /// Envoy: put the domain, rule and entries of each descriptor over the limit in the answer's
    /// dynamic_metadata, so Envoy's access log can name the limit that fired.
    #[arg(
        long,
        env = "RESPONSE_DYNAMIC_METADATA",
        value_name = "RESPONSE_DYNAMIC_METADATA",
        default_value = "false"
    )]
    pub response_dynamic_metadata: bool,
}

/// The HTTP port: metrics and probes, and what an operator may look at.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "HTTP and debug")]
pub struct HttpArgs {
    /// HTTP listener: /metrics, /healthz (live), /readyz (ready), /healthcheck.
    #[arg(
        long,
        env = "HTTP_ADDR",
        value_name = "HTTP_ADDR",
        default_value = "0.0.0.0:8080",
        value_parser = listen_addr
    )]
    pub http_addr: SocketAddr,

    /// Serve /debug/* (rules, configuration, top denied keys) and the status page on HTTP_ADDR;
    /// false: only /metrics and the probes.
    /// Off by default: they show the loaded rules, the configuration and the heaviest denied keys.
    #[arg(
        long,
        env = "DEBUG_ENDPOINTS",
        value_name = "DEBUG_ENDPOINTS",
        default_value = "false"
    )]
    pub debug_endpoints: bool,

    /// Show raw keys on /debug/top and the status page; otherwise each is truncated and hashed
    /// (keys are often secrets: API keys, user ids).
    #[arg(
        long,
        env = "DEBUG_SHOW_KEYS",
        value_name = "DEBUG_SHOW_KEYS",
        default_value = "false"
    )]
    pub debug_show_keys: bool,

    /// Host names (comma-separated) that the status page and /debug/* answer; a request naming
    /// another Host gets 403, which closes DNS rebinding. Unset: localhost, 127.0.0.1, ::1 and
    /// HTTP_ADDR's host. /metrics and the probes answer any Host.
    #[arg(
        long,
        env = "HTTP_ALLOWED_HOSTS",
        value_name = "HTTP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub http_allowed_hosts: Vec<String>,

    /// Size of the heavy-hitter sketch of denied keys (/debug/top, the status page); 0: off.
    #[arg(long, env = "TOP_KEYS", value_name = "TOP_KEYS", default_value = "100", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub top_keys: u32,
}

/// Stopping gracefully.
#[derive(Clone, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "Shutdown")]
pub struct ShutdownArgs {
    /// After SIGTERM: report not ready (readiness and gRPC health) at once but keep serving this
    /// many seconds, so load balancers stop sending first; then drain.
    #[arg(
        long,
        env = "SHUTDOWN_DELAY_SECS",
        value_name = "SHUTDOWN_DELAY_SECS",
        default_value = "0"
    )]
    pub shutdown_delay_secs: u64,

    /// Seconds in-flight calls may take to finish after SIGTERM/SIGINT.
    #[arg(
        long,
        env = "SHUTDOWN_GRACE_SECS",
        value_name = "SHUTDOWN_GRACE_SECS",
        default_value = "10"
    )]
    pub shutdown_grace_secs: u64,
}

/// Logging.
#[derive(Clone, Copy, Debug, Args, serde::Serialize)]
#[command(next_help_heading = "Logging")]
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
