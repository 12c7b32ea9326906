//! Buckets in Redis, decided by `lua/token_bucket.lua` so every replica of tollgate shares them.
//!
//! Every call goes over a shared multiplexed connection: concurrent calls are written together
//! in one pipeline rather than waiting for each other. The script runs by EVALSHA and is loaded
//! again when a node answers NOSCRIPT (after a restart, a failover or SCRIPT FLUSH). Every call is
//! bounded by REDIS_TIMEOUT_MS, and connections re-establish themselves, so Redis coming back needs
//! no restart of tollgate. Single server, cluster and sentinel differ only in `connection.rs`.
//!
//! - `script.rs`: the script's wire contract (arguments, reply).
//! - `connection.rs`: single, cluster, sentinel.

mod connection;
mod script;

use std::time::Duration;

use futures::future::join_all;
use redis::cluster_routing::Slot;

use connection::Connector;
pub use connection::Topology;
pub use script::TOKEN_BUCKET_LUA;

use super::{Backend, BackendError, BucketRequest, ErrorKind};
use crate::core::{Decision, Op};

const NAME: &str = "redis";

/// The Redis backend, for a single server, a cluster or a sentinel-managed master.
pub struct RedisBackend {
    connector: Connector,
    sha: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection info would show credentials.
        f.debug_struct("RedisBackend")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A single Redis server at `url`; see [`RedisBackend::with_topology`].
    pub fn new(url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Self::with_topology(Topology::Single, url, timeout)
    }

    /// Prepares a backend without connecting: tollgate starts (and reports NOT_SERVING) while
    /// Redis is away, and connects when Redis answers. `url` is a URL (single), a comma-separated
    /// list of nodes (cluster), or `master_name,host:port,...` (sentinel).
    pub fn with_topology(
        topology: Topology,
        url: &str,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        Ok(Self {
            connector: Connector::new(topology, url, timeout)?,
            sha: redis::Script::new(TOKEN_BUCKET_LUA).get_hash().to_string(),
            timeout,
        })
    }

    /// Runs `call` on a connection within REDIS_TIMEOUT_MS (connecting included).
    async fn bounded<T, F>(&self, call: F) -> Result<T, BackendError>
    where
        F: AsyncFnOnce(connection::Conn) -> redis::RedisResult<T>,
    {
        let attempt = async {
            let conn = self.connector.get().await?;
            call(conn).await
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(BackendError {
                backend: NAME,
                kind: ErrorKind::Timeout,
                message: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
        };
        if let Err(e) = &result {
            self.connector.failed(e.kind);
        }
        result
    }

    /// One script call deciding `reqs` (their keys share a slot, or there is no cluster), as
    /// groups of `group_lens`. NOSCRIPT loads the script and sends the call again.
    async fn call(
        &self,
        reqs: &[BucketRequest<'_>],
        group_lens: &[usize],
    ) -> Result<Vec<Decision>, BackendError> {
        let cmd = script::invocation(&self.sha, reqs.iter(), group_lens);
        let value = self
            .bounded(
                async |mut conn| match cmd.query_async::<redis::Value>(&mut conn).await {
                    Err(e)
                        if e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                    {
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(TOKEN_BUCKET_LUA)
                            .query_async::<String>(&mut conn)
                            .await?;
                        cmd.query_async(&mut conn).await
                    }
                    other => other,
                },
            )
            .await?;
        script::decode(value, reqs.len())
    }

    /// The requests that one script call can decide together: all of them, or on a cluster those
    /// whose keys share a slot (Redis refuses declared keys of several slots).
    fn partition(&self, reqs: &[BucketRequest<'_>]) -> Vec<Vec<usize>> {
        if !self.connector.is_cluster() {
            return vec![(0..reqs.len()).collect()];
        }
        let mut parts: Vec<(Slot, Vec<usize>)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let slot = Slot::for_key(r.key);
            match parts.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, v)) => v.push(i),
                None => parts.push((slot, vec![i])),
            }
        }
        parts.into_iter().map(|(_, v)| v).collect()
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        let mut out = self.call(std::slice::from_ref(&req), &[]).await?;
        out.pop().ok_or_else(|| BackendError {
            backend: NAME,
            kind: ErrorKind::Script,
            message: "empty script reply".into(),
        })
    }

    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        self.decide_parts(reqs, all_or_nothing).await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.bounded(async |mut conn| redis::cmd("PING").query_async::<()>(&mut conn).await)
            .await
    }
}

impl RedisBackend {
    /// A group over as many script calls as its keys need; all or nothing across calls by
    /// refunding what the calls that passed charged.
    async fn decide_parts(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        let parts = self.partition(reqs);
        let calls = parts.iter().map(|idx| async move {
            let part: Vec<BucketRequest<'_>> = idx.iter().map(|&i| reqs[i]).collect();
            let lens: Vec<usize> = if all_or_nothing {
                vec![part.len()]
            } else {
                Vec::new()
            };
            self.call(&part, &lens).await
        });
        let answers = join_all(calls).await;

        let mut out: Vec<Option<Result<Decision, BackendError>>> = vec![None; reqs.len()];
        let mut vetoed = vec![false; parts.len()];
        for (p, (idx, answer)) in parts.iter().zip(answers).enumerate() {
            match answer {
                Ok(decisions) => {
                    for (&i, d) in idx.iter().zip(decisions) {
                        vetoed[p] |= reqs[i].veto && !d.allowed;
                        out[i] = Some(Ok(d));
                    }
                }
                Err(e) => idx.iter().for_each(|&i| out[i] = Some(Err(e.clone()))),
            }
        }
        if all_or_nothing && vetoed.iter().any(|&v| v) {
            // Atomic per call only: give back what the calls that passed charged.
            let charged: Vec<usize> = parts
                .iter()
                .zip(&vetoed)
                .filter(|(_, v)| !**v)
                .flat_map(|(idx, _)| idx.iter().copied())
                .filter(|&i| {
                    matches!(reqs[i].op, Op::Take(c) if c > 0)
                        && matches!(&out[i], Some(Ok(d)) if d.allowed)
                })
                .collect();
            let refunds: Vec<BucketRequest<'_>> = charged
                .iter()
                .map(|&i| BucketRequest {
                    op: Op::Refund(reqs[i].op.cost()),
                    ..reqs[i]
                })
                .collect();
            let refunded = self.refund(&refunds).await;
            for (&i, r) in charged.iter().zip(refunded) {
                if let (Some(Ok(d)), Ok(after)) = (&mut out[i], r) {
                    d.tokens_remaining = after.tokens_remaining;
                    d.reset_after_ms = after.reset_after_ms;
                }
            }
        }
        out.into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(BackendError {
                        backend: NAME,
                        kind: ErrorKind::Other,
                        message: "no answer".into(),
                    })
                })
            })
            .collect()
    }

    /// Refunds, each on its own (they always succeed, so no group is needed).
    async fn refund(&self, refunds: &[BucketRequest<'_>]) -> Vec<Result<Decision, BackendError>> {
        join_all(refunds.iter().map(|r| self.decide(*r))).await
    }
}

fn map_error(e: redis::RedisError) -> BackendError {
    use redis::ServerErrorKind as S;
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::MasterNameNotFoundBySentinel
                | redis::ErrorKind::NoValidReplicasFoundBySentinel
                // A failover in progress: the old master is read-only, the new one loading.
                | redis::ErrorKind::Server(S::ReadOnly | S::MasterDown | S::BusyLoading)
        )
    {
        ErrorKind::Connection
    } else if matches!(e.kind(), redis::ErrorKind::Server(_)) {
        ErrorKind::Script
    } else {
        ErrorKind::Other
    };
    BackendError {
        backend: NAME,
        kind,
        message: e.to_string(),
    }
}
