//! The domain: token-bucket arithmetic, bucket shapes, the request kinds and the answers.
//!
//! Nothing here knows about gRPC, HTTP, Redis or the clock: time is passed in, so every rule of
//! SPEC section 2 is a pure function that unit tests can pin down exactly.

mod bucket;
mod failure;
mod shape;

pub use bucket::{
    BucketState, Decision, GroupRequest, MAX_MS, Op, apply, apply_group, capped_ms, ttl_ms,
};
pub use failure::FailureMode;
pub use shape::{InvalidShape, Limits, MAX_SHAPE, Shape};
