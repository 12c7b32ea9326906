//! The gRPC transports, `sluicegate.v1` (ShouldAllow, and Acquire/Release/Renew in `in_flight.rs`),
//! Envoy RLS v3 (`envoy/`) and Envoy's quota protocol, RLQS (`rlqs/`): conversion between protos and
//! [`sluicegate_core`], input checks, and the one place where errors become `tonic::Status`.

mod envoy;
mod error;
mod in_flight;
mod pipeline;
mod rlqs;
mod should_allow;

pub use envoy::{EnvoyApi, EnvoySettings, HeaderNames, MAX_DESCRIPTOR_ENTRIES};
pub use error::ApiError;
pub use in_flight::{DEFAULT_LEASE_MS, in_flight_key};
pub use rlqs::{
    BucketView, EXCHANGE_EVERY, MAX_REPORT_BYTES, Quotas, RlqsApi, StreamView, exchange,
    spawn_exchange,
};
pub use should_allow::{ShouldAllowApi, ShouldAllowSettings, bucket_key};
