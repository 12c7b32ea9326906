//! Configuration: flags, then environment variables, then a `.env` file in the working directory.
//!
//! Every flag has an `env` twin (SPEC section 4) and its doc comment is its `--help` text. Values are
//! checked while parsing, so a bad one stops the start with one line naming the variable.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogArgs;
use sluicegate_core::{FailureMode, Limits, Shape};

#[derive(Debug, Parser)]
#[command(
    name = "sluicegate",
    version,
    about = "A rate-limit decision service (token buckets over gRPC)."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `sluicegate` with no subcommand serves, with these flags.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the decision service (the default).
    Serve(Box<ServeArgs>),
    /// Validate a rules file or directory offline and print each rule with its bucket shape.
    CheckRules {
        /// A rules file, or a directory of *.yaml files.
        path: PathBuf,
    },
}

impl Cli {
    /// Parses the command line after loading `.env` (which never overrides the real environment).
    /// A bad value prints one line naming the flag and its variable, and exits with status 2.
    pub fn load() -> Self {
        if let Err(e) = load_dotenv() {
            eprintln!("sluicegate: {e}");
            std::process::exit(2);
        }
        match Self::try_parse() {
            Ok(cli) => cli,
            Err(e) => {
                use clap::error::ErrorKind;
                if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                    e.exit();
                }
                eprintln!("sluicegate: {}", one_line(&e.render().to_string()));
                std::process::exit(2);
            }
        }
    }

    /// The serve arguments, whichever way they were given (None for another subcommand).
    pub fn into_serve(self) -> Option<ServeArgs> {
        match self.command {
            Some(Command::Serve(args)) => Some(*args),
            None => Some(self.serve),
            Some(Command::CheckRules { .. }) => None,
        }
    }
}

/// Loads `.env` from the working directory; it never overrides the real environment. A line that
/// does not parse stops the start (a setting silently dropped is worse); the message gives its
/// number, never its text, which may hold a password.
pub fn load_dotenv() -> Result<(), String> {
    match dotenvy::dotenv() {
        Ok(_) => Ok(()),
        Err(e) if e.not_found() => Ok(()),
        Err(dotenvy::Error::LineParse(line, _)) => {
            let first = line.lines().next().unwrap_or("").trim();
            let number = std::fs::read_to_string(".env")
                .ok()
                .and_then(|text| text.lines().position(|l| l.trim() == first))
                .map_or_else(|| "?".to_string(), |i| (i + 1).to_string());
            Err(format!(
                ".env line {number} does not parse: expected NAME=value (the line is not shown: \
                 it may hold a secret)"
            ))
        }
        Err(e) => Err(format!(".env cannot be read: {e}")),
    }
}

/// clap's error as one line: its first line, plus the valid values and its "did you mean" tip.
fn one_line(rendered: &str) -> String {
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("invalid arguments");
    let mut line = first.trim_start_matches("error: ").to_string();
    let extras: Vec<String> = lines
        .filter_map(|l| {
            if let Some(values) = l
                .strip_prefix("[possible values: ")
                .and_then(|v| v.strip_suffix(']'))
            {
                Some(format!("expected one of: {values}"))
            } else {
                l.strip_prefix("tip: ").map(str::to_string)
            }
        })
        .collect();
    if !extras.is_empty() {
        line.push_str(&format!(" ({})", extras.join("; ")));
    }
    line
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisType {
    #[default]
    Single,
    Cluster,
    Sentinel,
}

/// Everything `sluicegate serve` reads. Value names are the environment variables.
#[derive(Clone, Debug, Args, serde::Serialize)]
pub struct ServeArgs {
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

    /// Deny locally, without calling Redis, a key that Redis said is short of tokens while the
    /// refill cannot yet cover the cost (exact in the safe direction).
    #[arg(long, env = "LOCAL_DENY_CACHE", value_name = "LOCAL_DENY_CACHE", default_value = "true", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub local_deny_cache: bool,

    /// Deadline of one call to Redis, in milliseconds. Below Envoy's default rate-limit timeout
    /// (20 ms), so that FAILURE_MODE answers before Envoy gives up on the call.
    #[arg(long, env = "REDIS_TIMEOUT_MS", value_name = "REDIS_TIMEOUT_MS", default_value = "15", value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

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

    /// Redis key prefix of Envoy descriptor buckets.
    #[arg(
        long,
        env = "RLS_KEY_PREFIX",
        value_name = "RLS_KEY_PREFIX",
        default_value = "tb:rls:"
    )]
    pub rls_key_prefix: String,

    /// Rules for the Envoy API: a YAML file or a directory of *.yaml (envoyproxy/ratelimit's format), hot-reloaded.
    #[arg(long, env = "RULES", value_name = "RULES")]
    pub rules: Option<PathBuf>,

    /// On backend failure: error (gRPC UNAVAILABLE), allow or deny (an answer flagged degraded).
    #[arg(long, env = "FAILURE_MODE", value_name = "FAILURE_MODE", default_value = "error", value_parser = FailureMode::from_str)]
    #[serde(serialize_with = "display")]
    pub failure_mode: FailureMode,

    /// gRPC listener (ShouldAllow, health, reflection).
    #[arg(
        long,
        env = "GRPC_ADDR",
        value_name = "GRPC_ADDR",
        default_value = "0.0.0.0:8081",
        value_parser = listen_addr
    )]
    pub grpc_addr: SocketAddr,

    /// HTTP listener: /metrics, /healthz (live), /readyz (ready), /healthcheck.
    #[arg(
        long,
        env = "HTTP_ADDR",
        value_name = "HTTP_ADDR",
        default_value = "0.0.0.0:8080",
        value_parser = listen_addr
    )]
    pub http_addr: SocketAddr,

    /// Decide and count, but always answer allowed.
    #[arg(long, env = "SHADOW_MODE", value_name = "SHADOW_MODE", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub shadow_mode: bool,

    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogArgs,

    /// The largest capacity a request may ask for (at most 1e15).
    #[arg(long, env = "MAX_CAPACITY", value_name = "MAX_CAPACITY", default_value = "1e9", value_parser = shape_bound, allow_negative_numbers = true)]
    pub max_capacity: f64,

    /// The largest rate a request may ask for (at most 1e15).
    #[arg(long, env = "MAX_RATE", value_name = "MAX_RATE", default_value = "1e9", value_parser = shape_bound, allow_negative_numbers = true)]
    pub max_rate: f64,

    /// Memory backend: the most buckets held; when full, the bucket nearest to full is dropped first.
    #[arg(long, env = "MEMORY_MAX_BUCKETS", value_name = "MEMORY_MAX_BUCKETS", default_value = "1000000", value_parser = clap::value_parser!(u64).range(1..))]
    pub memory_max_buckets: u64,

    /// Envoy: the most descriptors one request may carry (more: INVALID_ARGUMENT before any work).
    #[arg(long, env = "MAX_DESCRIPTORS", value_name = "MAX_DESCRIPTORS", default_value = "64", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_descriptors: u32,

    /// Envoy: the longest bucket key a descriptor may make, in bytes (more: INVALID_ARGUMENT).
    #[arg(long, env = "MAX_KEY_BYTES", value_name = "MAX_KEY_BYTES", default_value = "1024", value_parser = clap::value_parser!(u32).range(16..))]
    pub max_key_bytes: u32,

    /// ShouldAllowBatch: the most decisions one call may carry.
    #[arg(long, env = "MAX_BATCH", value_name = "MAX_BATCH", default_value = "100", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch: u32,

    /// Envoy: charge every descriptor that was within its limit even when the request is over
    /// (envoyproxy/ratelimit's behaviour). Default: a request answered OVER_LIMIT charges none.
    #[arg(long, env = "CHARGE_ON_DENY", value_name = "CHARGE_ON_DENY", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub charge_on_deny: bool,

    /// Honour refunds taken on the caller's word: a Settle without a reservation_id below what it
    /// says it reserved, and Envoy's is_negative_hits. Any caller reaching the port could then
    /// refill any bucket. False (the default): such a Settle is PERMISSION_DENIED, and Envoy's
    /// is_negative_hits is answered OK without giving anything back (counted). A Settle of a
    /// reservation_id needs no switch: it returns at most what was taken, once.
    #[arg(long, env = "ALLOW_REFUNDS", value_name = "ALLOW_REFUNDS", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub allow_refunds: bool,

    /// Let ShouldAllow callers choose a bucket's capacity and rate; false: they must leave both at
    /// 0 (the server's TB_CAPACITY and TB_RATE), else PERMISSION_DENIED.
    #[arg(long, env = "ALLOW_CLIENT_SHAPES", value_name = "ALLOW_CLIENT_SHAPES", default_value = "true", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub allow_client_shapes: bool,

    /// TLS on the gRPC port (envoyproxy/ratelimit's variable).
    #[arg(long = "grpc-tls", env = "GRPC_SERVER_USE_TLS", value_name = "GRPC_SERVER_USE_TLS", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
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

    /// Decision calls in progress at most; beyond it a call is refused at once with
    /// RESOURCE_EXHAUSTED (never queued).
    #[arg(long, env = "MAX_CONCURRENT_REQUESTS", value_name = "MAX_CONCURRENT_REQUESTS", default_value = "10000", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,

    /// Close client connections older than this, gracefully (GOAWAY), so clients spread over new
    /// replicas; 0: never.
    #[arg(
        long,
        env = "GRPC_MAX_CONNECTION_AGE_SECS",
        value_name = "GRPC_MAX_CONNECTION_AGE_SECS",
        default_value = "0"
    )]
    pub grpc_max_connection_age_secs: u64,

    /// Envoy: add RateLimit-Limit, -Remaining and -Reset headers to every answer, from the most
    /// restrictive descriptor (envoyproxy/ratelimit's variable).
    #[arg(long, env = "LIMIT_RESPONSE_HEADERS_ENABLED", value_name = "LIMIT_RESPONSE_HEADERS_ENABLED", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
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
    #[arg(long, env = "RESPONSE_DYNAMIC_METADATA", value_name = "RESPONSE_DYNAMIC_METADATA", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub response_dynamic_metadata: bool,

    /// A decision that leaves less than (1 - NEAR_LIMIT_RATIO) of the capacity is counted as near
    /// the limit (between 0 and 1).
    #[arg(long, env = "NEAR_LIMIT_RATIO", value_name = "NEAR_LIMIT_RATIO", default_value = "0.8", value_parser = ratio, allow_negative_numbers = true)]
    pub near_limit_ratio: f64,

    /// Size of the heavy-hitter sketch of denied keys (/debug/top, the status page); 0: off.
    #[arg(long, env = "TOP_KEYS", value_name = "TOP_KEYS", default_value = "100", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub top_keys: u32,

    /// Serve /debug/* (rules, configuration, top denied keys) and the status page on HTTP_ADDR;
    /// false: only /metrics and the probes.
    /// Off by default: they show the loaded rules, the configuration and the heaviest denied keys.
    #[arg(long, env = "DEBUG_ENDPOINTS", value_name = "DEBUG_ENDPOINTS", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
    pub debug_endpoints: bool,

    /// Show raw keys on /debug/top and the status page; otherwise each is truncated and hashed
    /// (keys are often secrets: API keys, user ids).
    #[arg(long, env = "DEBUG_SHOW_KEYS", value_name = "DEBUG_SHOW_KEYS", default_value = "false", action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
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

impl ServeArgs {
    /// Checks that need several values together; the message names the variables.
    pub fn validate(&self) -> Result<(), String> {
        self.default_shape()?;
        if let Some(url) = &self.redis_url {
            url.check(self.redis_type)
                .map_err(|e| format!("REDIS_URL: {e}"))?;
        }
        for (name, prefix) in [
            ("BUCKET_PREFIX", &self.bucket_prefix),
            ("RLS_KEY_PREFIX", &self.rls_key_prefix),
        ] {
            if prefix.is_empty() {
                return Err(format!(
                    "{name} must not be empty: it keeps ShouldAllow and Envoy buckets apart"
                ));
            }
        }
        match (self.grpc_tls, &self.grpc_tls_cert, &self.grpc_tls_key) {
            (true, Some(_), Some(_)) | (false, None, None) => {}
            (true, _, _) => {
                return Err(
                    "GRPC_SERVER_USE_TLS needs GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY".into(),
                );
            }
            (false, _, _) => {
                return Err(
                    "GRPC_SERVER_TLS_CERT/KEY are set but GRPC_SERVER_USE_TLS is not true".into(),
                );
            }
        }
        if self.grpc_client_ca.is_some() && !self.grpc_tls {
            return Err("GRPC_CLIENT_TLS_CACERT (mTLS) needs GRPC_SERVER_USE_TLS=true".into());
        }
        if !self.grpc_client_san.is_empty() && self.grpc_client_ca.is_none() {
            return Err("GRPC_CLIENT_TLS_SAN needs GRPC_CLIENT_TLS_CACERT (mTLS)".into());
        }
        let (a, b) = (&self.bucket_prefix, &self.rls_key_prefix);
        if a.starts_with(b.as_str()) || b.starts_with(a.as_str()) {
            return Err(format!(
                "BUCKET_PREFIX ('{a}') and RLS_KEY_PREFIX ('{b}') overlap: one starts with the \
                 other, so a ShouldAllow key could name an Envoy bucket"
            ));
        }
        Ok(())
    }

    /// The default shape (TB_CAPACITY, TB_RATE).
    pub fn default_shape(&self) -> Result<Shape, String> {
        let shape = Shape::new(self.capacity, self.rate).map_err(|e| e.to_string())?;
        if self.capacity > self.max_capacity || self.rate > self.max_rate {
            return Err(format!(
                "TB_CAPACITY/TB_RATE ({}, {}) exceed MAX_CAPACITY/MAX_RATE ({}, {})",
                self.capacity, self.rate, self.max_capacity, self.max_rate
            ));
        }
        Ok(shape)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_capacity: self.max_capacity,
            max_rate: self.max_rate,
        }
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_secs(self.shutdown_delay_secs)
    }

    /// The Host names the status page and /debug/* answer (HTTP_ALLOWED_HOSTS, or its default),
    /// lower-cased, without ports or brackets.
    pub fn allowed_hosts(&self) -> Vec<String> {
        if !self.http_allowed_hosts.is_empty() {
            return self
                .http_allowed_hosts
                .iter()
                .map(|h| h.trim().trim_matches(['[', ']']).to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect();
        }
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
        let ip = self.http_addr.ip();
        if !ip.is_unspecified() && !hosts.contains(&ip.to_string()) {
            hosts.push(ip.to_string());
        }
        hosts
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The effective settings, keyed by environment variable, with REDIS_URL's password
    /// redacted: what /debug/config shows and the start logs.
    pub fn effective(&self) -> serde_json::Map<String, serde_json::Value> {
        let serde_json::Value::Object(mut by_field) =
            serde_json::to_value(self).expect("every setting serializes")
        else {
            unreachable!("a struct serializes to an object");
        };
        let command = <Self as Args>::augment_args(clap::Command::new("sluicegate"));
        command
            .get_arguments()
            .filter_map(|arg| {
                let env = arg.get_env()?.to_str()?.to_string();
                let value = by_field.remove(arg.get_id().as_str())?;
                Some((env, value))
            })
            .collect()
    }

    /// A default configuration with both listeners on ephemeral loopback ports (tests, embedding).
    pub fn for_tests() -> Self {
        let cli = Cli::parse_from([
            "sluicegate",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ]);
        cli.into_serve().expect("no subcommand")
    }
}

/// A Redis URL (or comma-separated list). Never printed with its password, not even when it does
/// not parse.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

const URL_SCHEMES: &[&str] = &["redis", "rediss", "unix", "redis+unix"];

impl RedisUrl {
    /// The URL itself, to hand to the Redis client. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, fit for logs.
    pub fn redacted(&self) -> String {
        self.entries()
            .map(|part| {
                if !part.contains("://") {
                    return part.to_string();
                }
                match url::Url::parse(part) {
                    Ok(mut u) => {
                        if u.password().is_some() {
                            let _ = u.set_password(Some("***"));
                        }
                        u.to_string()
                    }
                    // Whatever does not parse may still hold a password: never shown.
                    Err(_) => "<unparsable URL>".to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn entries(&self) -> impl Iterator<Item = &str> {
        self.0.split(',').map(str::trim).filter(|s| !s.is_empty())
    }

    /// Checks the URL against the topology: one URL for single; `host:port` or URLs for cluster;
    /// `master_name,host:port,...` for sentinel. Messages never repeat the value.
    pub fn check(&self, kind: RedisType) -> Result<(), String> {
        let entries: Vec<&str> = self.entries().collect();
        let url = |e: &str, i: usize| -> Result<(), String> {
            let u = url::Url::parse(e).map_err(|err| {
                format!("entry {} is not a valid URL ({err}; the value is not shown, it may hold a password)", i + 1)
            })?;
            if !URL_SCHEMES.contains(&u.scheme()) {
                return Err(format!(
                    "entry {}: scheme '{}' is not redis://, rediss:// or unix://",
                    i + 1,
                    u.scheme()
                ));
            }
            if u.scheme().starts_with("redis") && u.host_str().is_none_or(str::is_empty) {
                return Err(format!("entry {} has no host", i + 1));
            }
            let db = u.path().trim_start_matches('/');
            if u.scheme().starts_with("redis") && !db.is_empty() && db.parse::<u16>().is_err() {
                return Err(format!("entry {}: the database must be a number", i + 1));
            }
            Ok(())
        };
        let node = |e: &str, i: usize| -> Result<(), String> {
            if e.contains("://") {
                return url(e, i);
            }
            match e.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
                _ => Err(format!(
                    "entry {} must be host:port or a redis:// URL, e.g. 10.0.0.1:6379",
                    i + 1
                )),
            }
        };
        match kind {
            RedisType::Single => {
                if entries.len() != 1 {
                    return Err("with REDIS_TYPE=single, expected one redis:// or rediss:// URL (a list is for cluster or sentinel)".into());
                }
                if !entries[0].contains("://") {
                    return Err(
                        "expected a redis:// or rediss:// URL, e.g. redis://127.0.0.1:6379/0"
                            .into(),
                    );
                }
                url(entries[0], 0)
            }
            RedisType::Cluster => {
                if entries.is_empty() {
                    return Err("with REDIS_TYPE=cluster, expected host:port[,host:port...]".into());
                }
                entries.iter().enumerate().try_for_each(|(i, e)| node(e, i))
            }
            RedisType::Sentinel => {
                let Some((master, sentinels)) = entries.split_first() else {
                    return Err("expected master_name,host:port[,host:port...]".into());
                };
                // The master entry is a name, or `redis[s]://[:password@]name` to give the
                // master's credentials and TLS.
                let bad_master = if master.contains("://") {
                    url(master, 0).is_err()
                } else {
                    master.contains(':')
                };
                if bad_master || sentinels.is_empty() {
                    return Err("with REDIS_TYPE=sentinel, expected master_name,host:port[,host:port...] (the master may be redis://:password@master_name)".into());
                }
                sentinels
                    .iter()
                    .enumerate()
                    .try_for_each(|(i, e)| node(e, i + 1))
            }
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl FromStr for RedisUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err("expected a redis:// or rediss:// URL, got an empty value".into());
        }
        // The form depends on REDIS_TYPE: checked by ServeArgs::validate.
        Ok(Self(s.to_string()))
    }
}

fn display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn redacted<S: serde::Serializer>(v: &Option<RedisUrl>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(url) => s.serialize_str(&url.redacted()),
        None => s.serialize_none(),
    }
}

/// A listen address: `IP:PORT`; also `:PORT` (every interface, as Go programs take it) and
/// `localhost:PORT` (loopback).
fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let port = |p: &str| p.parse::<u16>().ok();
    let addr = match s.rsplit_once(':') {
        Some(("", p)) => port(p).map(|p| SocketAddr::from(([0, 0, 0, 0], p))),
        Some(("localhost", p)) => port(p).map(|p| SocketAddr::from(([127, 0, 0, 1], p))),
        _ => None,
    };
    addr.ok_or_else(|| {
        format!(
            "expected IP:PORT, e.g. 0.0.0.0:8081 (every interface) or 127.0.0.1:8081, got '{s}'"
        )
    })
}

/// An HTTP header name (LIMIT_*_HEADER).
fn header_name(s: &str) -> Result<String, String> {
    http::HeaderName::from_bytes(s.as_bytes())
        .map(|_| s.to_string())
        .map_err(|_| format!("expected an HTTP header name such as RateLimit-Limit, got '{s}'"))
}

/// NEAR_LIMIT_RATIO: a fraction of the capacity.
fn ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected a number between 0 and 1, such as 0.8, got '{s}'"
        )),
    }
}

/// MAX_CAPACITY, MAX_RATE: positive, and at most 1e15 (SPEC 2 item 10).
fn shape_bound(s: &str) -> Result<f64, String> {
    let v = positive_f64(s)?;
    if v > sluicegate_core::MAX_SHAPE {
        return Err(format!(
            "expected at most 1e15 (larger shapes lose token precision), got '{s}'"
        ));
    }
    Ok(v)
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a finite number greater than 0, got '{s}'"
        )),
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("expected true or false, got '{s}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_go_programs_take_them() {
        let ok = |s| listen_addr(s).unwrap().to_string();
        assert_eq!(ok(":8081"), "0.0.0.0:8081");
        assert_eq!(ok("localhost:8080"), "127.0.0.1:8080");
        assert_eq!(ok(" 127.0.0.1:0 "), "127.0.0.1:0");
        assert_eq!(ok("[::1]:9"), "[::1]:9");
        for bad in ["8081", "host:8081", ":", ":70000", "localhost:x"] {
            let e = listen_addr(bad).unwrap_err();
            assert!(e.contains("IP:PORT") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn redacts_passwords() {
        let url: RedisUrl = "redis://user:s3cret@localhost:6379/0".parse().unwrap();
        assert!(!format!("{url:?}").contains("s3cret"));
        assert!(!url.to_string().contains("s3cret"));
        assert!(url.to_string().contains("***"));
        assert_eq!(url.expose(), "redis://user:s3cret@localhost:6379/0");
    }

    #[test]
    fn effective_settings_name_every_variable_and_hide_the_password() {
        let mut a = ServeArgs::for_tests();
        a.redis_url = Some("redis://user:s3cret@localhost:6379/0".parse().unwrap());
        let e = a.effective();
        let text = serde_json::to_string(&e).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert_eq!(e["REDIS_URL"], "redis://user:***@localhost:6379/0");
        assert_eq!(e["FAILURE_MODE"], "error");
        assert_eq!(e["REDIS_TYPE"], "single");
        assert_eq!(e["LOG_FORMAT"], "text");
        assert_eq!(e["REDIS_TIMEOUT_MS"], 15);
        assert_eq!(e["NEAR_LIMIT_RATIO"], 0.8);
        // Every variable of --help is there, under its own name.
        let command = <ServeArgs as Args>::augment_args(clap::Command::new("t"));
        let envs: Vec<String> = command
            .get_arguments()
            .filter_map(|a| Some(a.get_env()?.to_str()?.to_string()))
            .collect();
        assert_eq!(e.len(), envs.len());
        assert!(envs.iter().all(|v| e.contains_key(v)), "{envs:?}");
    }

    #[test]
    fn never_shows_a_password_that_does_not_parse() {
        for raw in [
            "redis://user:s3cret@host:port/0",
            "redis://:s3cret@[::1",
            "rediss://u:s3cret@h:99999",
        ] {
            let url: RedisUrl = raw.parse().unwrap();
            assert!(!url.redacted().contains("s3cret"), "{raw}");
            let err = url.check(RedisType::Single).unwrap_err();
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn urls_are_checked_against_the_topology() {
        let ok = |s: &str, t| s.parse::<RedisUrl>().unwrap().check(t);
        assert!(ok("redis://127.0.0.1:6379/0", RedisType::Single).is_ok());
        assert!(ok("localhost:6379", RedisType::Single).is_err());
        assert!(
            ok("10.0.0.1:6379", RedisType::Cluster).is_ok(),
            "one seed is enough"
        );
        assert!(ok("10.0.0.1:6379,redis://10.0.0.2:6379", RedisType::Cluster).is_ok());
        assert!(ok("10.0.0.1", RedisType::Cluster).is_err());
        assert!(ok("mymaster,10.0.0.1:26379", RedisType::Sentinel).is_ok());
        assert!(ok("10.0.0.1:26379", RedisType::Sentinel).is_err());
        assert!(ok("redis://:pw@mymaster,10.0.0.1:26379", RedisType::Sentinel).is_ok());
        assert!(ok("redis://h:1/db", RedisType::Single).is_err());
    }

    #[test]
    fn prefixes_must_be_set_and_apart() {
        let mut a = ServeArgs::for_tests();
        assert!(a.validate().is_ok());
        a.bucket_prefix = String::new();
        assert!(a.validate().unwrap_err().contains("BUCKET_PREFIX"));
        a.bucket_prefix = "tb:".into();
        let err = a.validate().unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        a.bucket_prefix = "tb:rls:x".into();
        assert!(a.validate().is_err());
        a.bucket_prefix = "tb:user:".into();
        assert!(a.validate().is_ok());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(positive_f64("0").is_err());
        assert!(positive_f64("nan").is_err());
        assert!(positive_f64("inf").is_err());
        assert_eq!(positive_f64("2.5"), Ok(2.5));
    }

    #[test]
    fn defaults_match_the_spec() {
        let a = Cli::parse_from(["sluicegate"]).into_serve().unwrap();
        assert_eq!(a.capacity, 20.0);
        assert_eq!(a.rate, 20.0);
        assert_eq!(a.redis_timeout_ms, 15);
        assert_eq!(a.bucket_prefix, "tb:user:");
        assert_eq!(a.rls_key_prefix, "tb:rls:");
        assert_eq!(a.failure_mode, FailureMode::Error);
        assert_eq!(a.grpc_addr.to_string(), "0.0.0.0:8081");
        assert_eq!(a.http_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(a.memory_max_buckets, 1_000_000);
        assert_eq!(a.shutdown_grace_secs, 10);
        assert!(!a.shadow_mode);
    }

    #[test]
    fn serve_subcommand_takes_the_same_flags() {
        let a = Cli::parse_from(["sluicegate", "serve", "--capacity", "5"])
            .into_serve()
            .unwrap();
        assert_eq!(a.capacity, 5.0);
    }
}
