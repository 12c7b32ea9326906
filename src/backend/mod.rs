//! Where buckets live: one async [`Backend`] trait, one file per implementation.
//!
//! Backends know buckets and keys, nothing of gRPC or HTTP. Both implementations run the arithmetic
//! of [`crate::core::apply`]; the memory one calls it directly, the Redis one through
//! `lua/token_bucket.lua`.

use std::future::Future;

use crate::core::{Decision, Op, Shape};

pub mod memory;
pub mod redis;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// One decision to make: which bucket, its shape, and what to do to it.
#[derive(Clone, Copy, Debug)]
pub struct BucketRequest<'a> {
    /// The full key, prefix included (callers keep ShouldAllow and Envoy keys apart by prefix).
    pub key: &'a str,
    pub shape: Shape,
    pub op: Op,
}

/// The kind of a backend failure, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within REDIS_TIMEOUT_MS.
    Timeout,
    /// Could not connect, or the connection broke.
    Connection,
    /// The script itself failed (bad arguments, a bug, a read-only replica).
    Script,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Script => "script",
            ErrorKind::Other => "other",
        }
    }

    /// Whether retrying later may succeed (the backend is away, not the request wrong).
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::Connection)
    }
}

/// A backend failure. Its message never carries credentials.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{backend} backend {}: {message}", kind.as_str())]
pub struct BackendError {
    pub backend: &'static str,
    pub kind: ErrorKind,
    pub message: String,
}

/// A store of token buckets that decides atomically per bucket.
///
/// Implementations must be safe to call from many tasks at once, hold no lock across an `.await`,
/// and bound every call in time.
pub trait Backend: Send + Sync + 'static {
    /// `memory` or `redis`: the `backend` label of the metrics.
    fn name(&self) -> &'static str;

    /// Decides one request.
    fn decide(
        &self,
        req: BucketRequest<'_>,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send;

    /// Decides several requests (one Envoy call with several descriptors) at once, answers in
    /// order. Each bucket is atomic on its own; the set is not a transaction.
    fn decide_many(
        &self,
        reqs: &[BucketRequest<'_>],
    ) -> impl Future<Output = Vec<Result<Decision, BackendError>>> + Send {
        // The calls go out together: on Redis they share the multiplexed connection, which writes
        // them in one pipeline instead of waiting for each answer in turn.
        futures::future::join_all(reqs.iter().map(|r| self.decide(*r)))
    }

    /// Whether the backend is reachable now (for health and readiness).
    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// A shared backend is a backend (the server and background tasks hold the same buckets).
impl<B: Backend> Backend for std::sync::Arc<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn decide(
        &self,
        req: BucketRequest<'_>,
    ) -> impl Future<Output = Result<Decision, BackendError>> + Send {
        (**self).decide(req)
    }

    fn decide_many(
        &self,
        reqs: &[BucketRequest<'_>],
    ) -> impl Future<Output = Vec<Result<Decision, BackendError>>> + Send {
        (**self).decide_many(reqs)
    }

    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).ping()
    }
}
