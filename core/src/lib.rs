//! sluicegate-core: the domain of sluicegate, with no gRPC server, HTTP, CLI or metrics exporter.
//!
//! # Layout
//!
//! - `bucket.rs`, `shape.rs`, `failure.rs` (re-exported at the top): the token-bucket arithmetic
//!   ([`apply`], [`apply_group`]), bucket shapes and their bounds ([`Shape`], [`Limits`]), the
//!   request kinds ([`Op`]) and answers ([`Decision`]), the failure policy ([`FailureMode`]).
//!   Pure: time is passed in, so every rule of the README's "The token bucket" section is a
//!   function unit tests pin down exactly.
//! - [`backend`]: where buckets live. The [`backend::Backend`] trait, `memory.rs` (sharded maps)
//!   and `redis/` (runs `lua/token_bucket.lua`: per-node lanes that batch concurrent decisions
//!   into one script call, the topology of single, cluster and sentinel, a circuit breaker per
//!   node judged on Redis calls, the local deny cache and the refund subscription that keeps it
//!   honest, the replica's leases of hot buckets (QUOTA_LEASES)), reservations for Settle.
//! - `in_flight.rs` (re-exported at the top): in-flight limits, at most `max` leases per key,
//!   each freed by its release or its TTL ([`Leases`], [`LeaseOp`], [`InFlight`]); pure, as the
//!   bucket arithmetic is, and run by `lua/in_flight.lua` in Redis.
//! - [`quota`]: one global limit shared between many Envoys by their demand (RLQS): each one's
//!   share of a rule's rate and burst, and the token bucket Envoy 1.40 is sent for it. Pure; the
//!   fleet's demand comes from [`backend::Backend::exchange_demand`] (`lua/rlqs_demand.lua` on
//!   Redis).
//! - [`rules`]: envoyproxy/ratelimit's YAML rules: parse and validate, match descriptors, watch
//!   and hot-reload.
//!
//! Dependencies point inwards: `rules` and `backend` use the arithmetic, nothing here uses the
//! server crate (`sluicegate`) or the client crate. Metrics go through the `metrics` facade only:
//! the server crate installs the recorder and hands the backends their handles.

pub mod backend;
mod bucket;
mod failure;
mod in_flight;
pub mod quota;
pub mod rules;
mod shape;

pub use bucket::{Ask, BucketState, Decision, MAX_MS, Op, apply, apply_group, capped_ms, ttl_ms};
pub use failure::FailureMode;
pub use in_flight::{
    InFlight, LeaseOp, Leases, MAX_LEASE_ID_BYTES, MAX_LEASE_MS, MAX_PENDING_REFUSALS, lease_id_ok,
};
pub use shape::{InvalidShape, Limits, MAX_SHAPE, Shape};
