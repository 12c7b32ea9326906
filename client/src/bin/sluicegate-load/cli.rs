//! Flags of sluicegate-load (the README's "Load testing").

use std::{path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Api {
    /// sluicegate.v1.RateLimitService/ShouldAllow
    ShouldAllow,
    /// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit
    Envoy,
    /// GET an HTTP URL (the demo app, Envoy); 429 counts as denied
    Http,
    /// Reserve --cost with ShouldAllow, then Settle a random real cost between 0 and twice the
    /// reservation (refunds and debt); the bound is checked on what was settled
    Settle,
    /// Acquire one of --max-in-flight slots per key, hold it a random time up to --hold, Release
    /// it; the bound is checked on how many were held at once per key
    Concurrency,
    /// ShouldAllow answered from leased quota (sluicegate-client's LeasedClient): most decisions
    /// without a call; the bound is checked from when each lease's tokens were taken
    Leased,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::ShouldAllow => "should-allow",
            Api::Envoy => "envoy",
            Api::Http => "http",
            Api::Settle => "settle",
            Api::Concurrency => "concurrency",
            Api::Leased => "leased",
        }
    }
}

/// Drive sluicegate (or any HTTP URL) at a fixed concurrency or rate, and show that the limits hold.
#[derive(Clone, Debug, Parser)]
#[command(name = "sluicegate-load", version)]
pub struct Cli {
    /// sluicegate's gRPC address (should-allow, envoy, settle); several, comma-separated, spread the
    /// connections over replicas (the bound is then checked across them).
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub target: String,

    /// What to call.
    #[arg(long, value_enum, default_value = "should-allow")]
    pub api: Api,

    /// Closed loop: this many requests in flight, each sent when the previous answered.
    #[arg(long, default_value = "32")]
    pub concurrency: usize,

    /// Open loop: this many requests per second whatever the answers take; latency counts from
    /// each request's intended start, so a slow server cannot hide its queueing.
    #[arg(long)]
    pub rps: Option<f64>,

    /// HTTP/2 connections to spread the calls over (gRPC).
    #[arg(long, default_value = "4")]
    pub connections: usize,

    /// How long to run: 500ms, 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Number of distinct keys.
    #[arg(long, default_value = "100")]
    pub keys: usize,

    /// Choose keys Zipf-distributed with this exponent (e.g. 1.1) instead of uniformly.
    #[arg(long)]
    pub zipf: Option<f64>,

    /// Prefix of the key names ({key} is prefix + index).
    #[arg(long, default_value = "load-")]
    pub key_prefix: String,

    /// Tokens per request (should-allow cost; envoy request hits_addend).
    #[arg(long, default_value = "1")]
    pub cost: u32,

    /// Bucket size to ask for (should-allow; 0 = server default); for --check-bound with envoy or
    /// http, the shape to check against.
    #[arg(long)]
    pub capacity: Option<f64>,

    /// Refill in tokens per second (as --capacity).
    #[arg(long)]
    pub rate: Option<f64>,

    /// Concurrency: slots per key (Acquire's max_in_flight).
    #[arg(long, default_value = "5")]
    pub max_in_flight: u32,

    /// Concurrency: each granted slot is held a random time up to this (the work), then released.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Concurrency: the lease TTL asked for (what a crashed caller would hold a slot for).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,

    /// Envoy domain.
    #[arg(long, default_value = "edge")]
    pub domain: String,

    /// Envoy descriptor 'k=v,k2=v2' (repeat for several); {key} is replaced by the request's key.
    #[arg(long = "descriptor")]
    pub descriptors: Vec<String>,

    /// Envoy: the rules file or directory sluicegate serves, so --check-bound checks each bucket
    /// against its real shape (burst, unit_multiplier); without it the shape is read from
    /// current_limit (requests_per_unit per unit).
    #[arg(long)]
    pub rules: Option<PathBuf>,

    /// HTTP URL to GET (--api http); {key} is replaced by the request's key.
    #[arg(long)]
    pub url: Option<String>,

    /// HTTP header 'Name: value' (repeatable); {key} is replaced by the request's key.
    #[arg(long = "header")]
    pub headers: Vec<String>,

    /// Per-call deadline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Write the summary and a per-second timeline as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Draw allowed vs denied per second and p99 latency (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// Check per key that allowed never exceeded capacity + rate * elapsed; exit 2 if it did.
    #[arg(long)]
    pub check_bound: bool,

    /// The largest share of errors tolerated before exiting 3, as a fraction: 0.01 is 1%.
    #[arg(long, default_value = "0.01")]
    pub max_error_rate: f64,
}

impl Cli {
    /// Checks that need several flags together; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.target.split(',').all(|t| t.trim().is_empty()) {
            return Err("--target must name at least one address".into());
        }
        if self.keys == 0 {
            return Err("--keys must be at least 1".into());
        }
        if self.concurrency == 0 || self.connections == 0 {
            return Err("--concurrency and --connections must be at least 1".into());
        }
        if self.rps.is_some_and(|rps| !(rps.is_finite() && rps > 0.0)) {
            return Err("--rps must be a positive number".into());
        }
        if self.zipf.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
            return Err("--zipf must be a positive exponent".into());
        }
        if self.duration.is_zero() {
            return Err("--duration must be positive".into());
        }
        match self.api {
            Api::Envoy if self.descriptors.is_empty() => {
                return Err("--api envoy needs at least one --descriptor 'k=v'".into());
            }
            Api::Http if self.url.is_none() => return Err("--api http needs --url".into()),
            Api::Concurrency if self.max_in_flight == 0 => {
                return Err("--max-in-flight must be at least 1".into());
            }
            Api::Http if self.check_bound && self.rate.is_none() => {
                return Err("--check-bound with --api http needs --rate (and --capacity, unless the server sends X-RateLimit-Limit)".into());
            }
            _ => {}
        }
        if let Some(p) = &self.plot {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "svg" | "png") {
                return Err("--plot must end in .svg or .png".into());
            }
        }
        Ok(())
    }
}
