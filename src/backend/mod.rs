//! Where buckets live: one async [`Backend`] trait, one file per implementation.
//!
//! Backends know buckets and keys, nothing of gRPC or HTTP. Both implementations run the arithmetic
//! of [`crate::core`]; the memory one calls it directly, the Redis one through
//! `lua/token_bucket.lua`.

use std::future::Future;

use crate::core::{Decision, GroupRequest, Op, Shape};

pub mod memory;
pub mod redis;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// One decision to make: which bucket, its shape, what to do to it, and whether its denial vetoes
/// an all-or-nothing group (false for a shadow-mode rule).
#[derive(Clone, Copy, Debug)]
pub struct BucketRequest<'a> {
    /// The full key, prefix included (callers keep ShouldAllow and Envoy keys apart by prefix).
    pub key: &'a str,
    pub shape: Shape,
    pub op: Op,
    pub veto: bool,
}

impl<'a> BucketRequest<'a> {
    /// A request whose denial counts (the usual case).
    pub fn new(key: &'a str, shape: Shape, op: Op) -> Self {
        Self {
            key,
            shape,
            op,
            veto: true,
        }
    }

    pub(crate) fn group_request(&self) -> GroupRequest {
        GroupRequest {
            shape: self.shape,
            op: self.op,
            veto: self.veto,
        }
    }
}

/// The kind of a backend failure, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer within REDIS_TIMEOUT_MS.
    Timeout,
    /// Could not connect, or the connection broke.
    Connection,
    /// The script itself failed (bad arguments, a bug).
    Script,
    /// A cluster node no longer serves the key (a failover, a resharding): retried elsewhere.
    Moved,
    /// The node's circuit breaker is open: no call was made.
    CircuitOpen,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::Script => "script",
            // Counted with connection trouble: the topology moved under the call.
            ErrorKind::Moved => "connection",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Other => "other",
        }
    }
}

/// A backend failure: the backend could not decide (never the caller's fault). Its message never
/// carries credentials.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{backend} backend {}: {message}", kind.as_str())]
pub struct BackendError {
    pub backend: &'static str,
    pub kind: ErrorKind,
    pub message: String,
}

/// A store of token buckets that decides atomically per bucket, and per group when asked.
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

    /// Decides several requests together, answers in order. Each bucket is atomic; with
    /// `all_or_nothing`, a denial of any vetoing request means no Take of the group is charged
    /// (refunds and forced charges land regardless): atomically where the buckets live together,
    /// by refunding what was charged elsewhere otherwise, never admitting more than each bucket
    /// allows. A request that failed is an error in its place; the others keep their answers.
    fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> impl Future<Output = Vec<Result<Decision, BackendError>>> + Send;

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

    fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> impl Future<Output = Vec<Result<Decision, BackendError>>> + Send {
        (**self).decide_group(reqs, all_or_nothing)
    }

    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).ping()
    }
}
