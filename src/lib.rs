//! sluicegate: a rate-limit decision service.
//!
//! "May this key spend N tokens now?" answered atomically from a token bucket kept in Redis by one
//! Lua script, or in this process's memory when no Redis is configured.
//!
//! # Layout
//!
//! - [`core`]: the domain. Bucket arithmetic (pure, time passed in), shapes, operations, decisions,
//!   failure policy. Depends on nothing else in the crate.
//! - [`backend`]: where buckets live. The [`backend::Backend`] trait, `memory.rs` (sharded maps)
//!   and `redis/` (runs `lua/token_bucket.lua`: per-node lanes that batch concurrent decisions into
//!   one script call, the topology of single, cluster and sentinel, a circuit breaker per node
//!   judged on Redis calls, the local deny cache and the refund subscription that keeps it
//!   honest), reservations for Settle.
//! - [`api`]: the gRPC transports: `sluicegate.v1` ShouldAllow, ShouldAllowBatch and Settle (with
//!   reservations), and Envoy RLS v3 (plan, decide, answer, annotate), input checks, the steps
//!   both share after the backend (`pipeline.rs`: FAILURE_MODE and compensations that outlive
//!   their caller), and the one place errors become `tonic::Status`.
//! - [`proto`]: code generated from `proto/` and the descriptor set served by reflection.
//! - [`rules`]: envoyproxy/ratelimit's YAML rules: parse and validate, match descriptors, watch
//!   and hot-reload.
//! - [`telemetry`]: tracing setup, metric names (described once), the Prometheus recorder, the
//!   timing wrapper that measures every backend call, the decision logs, and what the status page
//!   shows (the last minutes second by second, the heaviest denied keys).
//! - [`config`]: flags, environment and `.env`, validated at start; secrets redacted.
//! - [`server`]: wires it all: listeners (TLS, mTLS), the layer stack (bounded work), health,
//!   reflection, the HTTP port (`/metrics`, probes, the status page and `/debug/*`), graceful
//!   shutdown.
//! - `main.rs`: the thin `sluicegate` binary: parse flags, bind, call [`server::run`].
//!
//! Everything that *calls* sluicegate (the Rust client library with its tower layer, the
//! `sluicegate-load` and `sluicegate-demo` binaries) lives in the `sluicegate-client` crate, `client/`.
//!
//! Dependencies point inwards: `api`, `rules` and `telemetry` use `core` (and `backend`; `api`
//! and `telemetry` read `rules`); `core`
//! and `backend` import no tonic, axum, clap or exporter (`backend` counts evictions through the
//! `metrics` facade only).

pub mod api;
pub mod backend;
pub mod config;
pub mod core;
pub mod proto;
pub mod rules;
pub mod server;
pub mod telemetry;
