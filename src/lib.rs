//! sluicegate: a rate-limit decision service.
//!
//! "May this key spend N tokens now?" answered atomically from a token bucket kept in Redis by one
//! Lua script, or in this process's memory when no Redis is configured.
//!
//! # Layout
//!
//! This crate is the server. The workspace's other crates are its layers: `sluicegate-proto`
//! (`proto/`: all generated code, once) and `sluicegate-core` (`core/`: the bucket arithmetic,
//! rules and backends, with no gRPC server, HTTP, CLI or exporter). What calls sluicegate (the
//! client library, its tower layer, the `sluicegate-load` and `sluicegate-demo` binaries) is
//! `sluicegate-client` (`client/`), which never depends on this crate.
//!
//! - [`api`]: the gRPC transports: `sluicegate.v1` ShouldAllow, ShouldAllowBatch and Settle (with
//!   reservations), Acquire, Release and Renew (in-flight limits), Envoy RLS v3 (plan,
//!   leases, decide, answer, annotate), Envoy RLQS (`rlqs/`: the quota streams, this replica's
//!   quota state and its exchange of demand with the others, assignments), input checks, the steps
//!   both share after the backend (`pipeline.rs`: FAILURE_MODE and compensations that outlive
//!   their caller), and the one place errors become `tonic::Status`.
//! - [`telemetry`]: tracing setup, metric names (described once), the Prometheus recorder, the
//!   timing wrapper that measures every backend call, the decision logs, and what the status page
//!   shows (the last minutes second by second, the heaviest denied keys).
//! - [`config`]: flags in groups (each a `--help` heading), environment and `.env`, validated
//!   once into [`config::Settings`], the plain struct [`server::run`] takes; secrets redacted.
//! - [`server`]: wires it all: listeners (TLS, mTLS), the layer stack (bounded work), health,
//!   reflection, the HTTP port (`/metrics`, probes, the status page and `/debug/*`), graceful
//!   shutdown.
//! - `main.rs`: the thin `sluicegate` binary: parse flags, bind, call [`server::run`].
//!
//! Dependencies point inwards: `api` and `telemetry` use `sluicegate_core`, `server` wires `api`,
//! `telemetry` and `config`; a `tests/it` test reads `cargo metadata` and fails if a crate gains a
//! dependency its layer forbids.

pub mod api;
pub mod config;
pub mod server;
pub mod telemetry;
