//! Calling sluicegate from Rust.
//!
//! sluicegate is a rate-limit decision service: "may this key spend N tokens now?" answered from a
//! token bucket shared by every replica. This crate is everything that calls it:
//!
//! - [`Client`]: a typed client for `sluicegate.v1.RateLimitService` (ShouldAllow, ShouldAllowBatch,
//!   Settle) with a deadline per call, a [`FailureMode`] for when sluicegate cannot answer, and TLS
//!   or mTLS ([`ClientBuilder::tls`]). Only an unreachable or slow sluicegate is a failure; a request
//!   sluicegate refuses (a key too long, a shape the server forbids) is an [`Error::Rejected`], never
//!   an allow.
//! - [`RateLimitLayer`]: a `tower::Layer` that limits any HTTP service (axum, tonic, hyper) by a
//!   key taken from each request: `429 Too Many Requests` with `Retry-After` when denied, the
//!   `X-RateLimit-*` headers on every limited answer.
//! - [`ConcurrencyLimitLayer`]: a `tower::Layer` that holds one of a key's in-flight slots while
//!   each request is served (at most N at once per key, across every process): `429` beyond it,
//!   the slot released when the response body has been sent or dropped; [`Client::acquire`],
//!   [`Client::renew`] and [`Client::release`] for anything else.
//! - [`LeasedClient`]: decisions for hot keys answered in this process from quota leased in
//!   advance (`up_to` reservations, settled with what was used), never over the limit: most
//!   decisions need no call at all.
//! - [`proto`]: the generated stubs, sluicegate.v1 and Envoy's RLS v3, for anything else (the
//!   `sluicegate-proto` crate, which the server uses too; Envoy's descriptor entries are bytes).
//!
//! The binaries `sluicegate-load` (the load client that proves the limits hold) and `sluicegate-demo`
//! (an HTTP API limited through this crate's layer) are built on it, behind the default `cli`
//! feature; a library user turns it off. The crate is not published yet, so depend on it by path
//! (or git): `sluicegate-client = { path = "../sluicegate/client", default-features = false }`.
//! The binaries depend on `sluicegate-core` (the rules, for the load client's bounds) and never on
//! the server crate.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use sluicegate_client::{Client, FailureMode};
//!
//! # async fn run() -> Result<(), sluicegate_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8081")
//!     .timeout(Duration::from_millis(50))
//!     .failure_mode(FailureMode::Allow) // sluicegate down or slow: let the request through
//!     .build()?;
//! let decision = client.should_allow("user:42", 1).await?;
//! if !decision.allowed {
//!     println!("slow down: retry in {:?}", decision.retry_after);
//! }
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod client;
mod concurrency;
mod layer;
mod lease;
mod leased;
/// The generated gRPC code (the `sluicegate-proto` crate).
pub use sluicegate_proto as proto;

pub use client::{
    BatchDecision, Client, ClientBuilder, Decision, Error, FALLBACK_RETRY_AFTER, FailureMode,
    Request, Reservation, Settle, Settlement,
};
pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer, LeaseBody};
pub use layer::{KeyError, RateLimit, RateLimitLayer};
pub use lease::Lease;
pub use leased::{LeasePolicy, LeaseStats, LeasedClient, LeasedDecision};
