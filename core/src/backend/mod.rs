//! Where buckets live: one async [`Backend`] trait, one file per implementation.
//!
//! Backends know buckets and keys, nothing of gRPC or HTTP. Both implementations run the arithmetic
//! of [`crate::core`]; the memory one calls it directly, the Redis one through
//! `lua/token_bucket.lua`.

use std::future::Future;

use crate::{Ask, Decision, InFlight, LeaseOp, Op, Shape, quota::Fleet};

pub mod memory;
pub mod redis;

pub use memory::MemoryBackend;
pub use redis::RedisBackend;

/// One decision to make: which bucket (its key), what is asked of it (shape, operation, veto), and
/// the reservation to record with it.
#[derive(Clone, Copy, Debug)]
pub struct BucketRequest<'a> {
    /// The full key, prefix included (callers keep ShouldAllow and Envoy keys apart by prefix).
    pub key: &'a str,
    pub ask: Ask,
    /// For a Take: when its tokens are charged, record a reservation under this id, so that a
    /// Settle can later give back at most what was taken, once.
    pub reserve: Option<Reserve<'a>>,
}

/// A reservation to record with a Take that is charged.
#[derive(Clone, Copy, Debug)]
pub struct Reserve<'a> {
    /// Chosen by the caller (random: whoever knows it can settle it).
    pub id: &'a str,
    /// How long it can be settled; then it is gone and what it took stays spent.
    pub ttl_ms: u32,
}

/// A Settle of a reservation: the bucket it was taken from, its id and the real cost.
#[derive(Clone, Copy, Debug)]
pub struct SettleRequest<'a> {
    pub key: &'a str,
    pub shape: Shape,
    pub id: &'a str,
    pub actual: u64,
}

/// An operation on the in-flight leases of one key (the README's "In-flight limits").
#[derive(Clone, Copy, Debug)]
pub struct LeaseRequest<'a> {
    /// The full key, prefix included; leases live apart from token buckets.
    pub key: &'a str,
    /// The lease: chosen by sluicegate (random) for Acquire, or Envoy's `x-request-id`.
    pub id: &'a str,
    pub op: LeaseOp,
}

/// The answer to a Settle of a reservation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Settled {
    /// Settled now (less than reserved refunded, more charged) or earlier (the same answer again,
    /// nothing changed): the bucket after that settlement.
    Done {
        tokens_remaining: f64,
        reset_after_ms: u64,
    },
    /// No reservation of that id for that bucket: never made, or expired.
    NotFound,
}

impl<'a> BucketRequest<'a> {
    /// A request whose denial counts (the usual case).
    pub fn new(key: &'a str, shape: Shape, op: Op) -> Self {
        Self {
            key,
            ask: Ask::new(shape, op),
            reserve: None,
        }
    }

    /// The same request, whose denial vetoes its group or not (a shadow rule's does not).
    pub fn with_veto(mut self, veto: bool) -> Self {
        self.ask.veto = veto;
        self
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
    /// The call waited longer than MAX_QUEUE_MS for a connection slot: shed, no call was made
    /// (an answer that late is worth nothing to its caller). FAILURE_MODE answers it as it
    /// answers a timeout (a queue backs up behind a slow node); without one it is
    /// RESOURCE_EXHAUSTED.
    Shed,
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
            ErrorKind::Shed => "shed",
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

    /// Settles a reservation made with a Take: `actual` below what it took refunds the difference,
    /// above it charges the rest (debt allowed); atomically with marking it settled, so that a
    /// second Settle of the id (a retry, another replica) answers the same and changes nothing.
    fn settle(
        &self,
        req: SettleRequest<'_>,
    ) -> impl Future<Output = Result<Settled, BackendError>> + Send;

    /// Acquires, releases or renews one lease of a key's in-flight limit, atomically with
    /// dropping the key's expired leases.
    fn lease(
        &self,
        req: LeaseRequest<'_>,
    ) -> impl Future<Output = Result<InFlight, BackendError>> + Send;

    /// Whether the backend is reachable now (for health and readiness).
    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Gives back what this process holds of shared buckets (leases) before it stops; after the
    /// last decision.
    fn close(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }

    /// What this replica's leases of shared buckets hold and have done (None: no leases).
    fn leases(&self) -> Option<redis::LeaseStats> {
        None
    }

    /// Publishes this replica's demand per RLQS quota bucket (valid for `ttl_ms`) and answers each
    /// bucket's demand summed over every replica, in order. A backend that only this process
    /// uses (memory) is the whole fleet: it answers what it was given. A shared one must sum.
    fn exchange_demand(
        &self,
        replica: &str,
        ttl_ms: u64,
        shares: &[DemandShare<'_>],
    ) -> impl Future<Output = Result<Vec<Fleet>, BackendError>> + Send {
        let _ = (replica, ttl_ms);
        let fleets = shares
            .iter()
            .map(|s| Fleet {
                demand: s.demand,
                participants: s.participants,
            })
            .collect();
        std::future::ready(Ok(fleets))
    }
}

/// One RLQS quota bucket's demand on this replica (see [`Backend::exchange_demand`]).
#[derive(Clone, Copy, Debug)]
pub struct DemandShare<'a> {
    /// The bucket's backend key; every key of one exchange shares a Redis hash tag.
    pub key: &'a str,
    /// Requests per second, allowed plus denied, over this replica's participants.
    pub demand: f64,
    /// This replica's Envoy buckets in it; 0 withdraws the replica's figures.
    pub participants: u32,
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

    fn settle(
        &self,
        req: SettleRequest<'_>,
    ) -> impl Future<Output = Result<Settled, BackendError>> + Send {
        (**self).settle(req)
    }

    fn lease(
        &self,
        req: LeaseRequest<'_>,
    ) -> impl Future<Output = Result<InFlight, BackendError>> + Send {
        (**self).lease(req)
    }

    fn ping(&self) -> impl Future<Output = Result<(), BackendError>> + Send {
        (**self).ping()
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        (**self).close()
    }

    fn leases(&self) -> Option<redis::LeaseStats> {
        (**self).leases()
    }

    fn exchange_demand(
        &self,
        replica: &str,
        ttl_ms: u64,
        shares: &[DemandShare<'_>],
    ) -> impl Future<Output = Result<Vec<Fleet>, BackendError>> + Send {
        (**self).exchange_demand(replica, ttl_ms, shares)
    }
}

/// What a Settle of a reservation does to its bucket: less than reserved refunds the difference,
/// more charges it whatever is left (debt), equal changes nothing.
pub fn settle_op(reserved: u64, actual: u64) -> Op {
    match actual.cmp(&reserved) {
        std::cmp::Ordering::Less => Op::Refund(reserved - actual),
        std::cmp::Ordering::Greater => Op::Force(actual - reserved),
        std::cmp::Ordering::Equal => Op::Check(0),
    }
}
