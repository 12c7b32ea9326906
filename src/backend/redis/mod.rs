//! Buckets in Redis, decided by `lua/token_bucket.lua` so every replica of tollgate shares them.
//!
//! Every call goes over a shared multiplexed connection: concurrent calls are written together
//! in one pipeline rather than waiting for each other. The script runs by EVALSHA and is loaded
//! again when a node answers NOSCRIPT (after a restart, a failover or SCRIPT FLUSH; on a cluster,
//! SCRIPT LOAD reaches every node). Every call is bounded by REDIS_TIMEOUT_MS, and connections
//! re-establish themselves, so Redis coming back needs no restart of tollgate. Single server,
//! cluster and sentinel differ only in `connection.rs`.

mod connection;

use std::time::Duration;

use redis::Script;

use connection::Connector;
pub use connection::Topology;

use super::{Backend, BackendError, BucketRequest, ErrorKind};
use crate::core::{Decision, Op};

/// The token-bucket script; its header states its KEYS/ARGV/return contract.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../../lua/token_bucket.lua");

const NAME: &str = "redis";

/// The Redis backend, for a single server, a cluster or a sentinel-managed master.
pub struct RedisBackend {
    connector: Connector,
    script: Script,
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
            script: Script::new(TOKEN_BUCKET_LUA),
            timeout,
        })
    }

    /// The SHA1 the script runs under (for operators checking `SCRIPT EXISTS`).
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
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
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        let mut invocation = self.script.key(req.key);
        invocation
            .arg(req.shape.capacity())
            .arg(req.shape.rate())
            .arg(req.op.cost())
            .arg(req.op.lua_mode());
        // invoke_async sends EVALSHA, and on NOSCRIPT loads the script and sends it again.
        let (allowed, tokens, retry_after_ms, reset_after_ms): (i64, String, u64, u64) = self
            .bounded(async |mut conn| invocation.invoke_async(&mut conn).await)
            .await?;
        let tokens_remaining = tokens.parse::<f64>().map_err(|_| BackendError {
            backend: NAME,
            kind: ErrorKind::Script,
            message: format!("script returned tokens '{tokens}', not a number"),
        })?;
        Ok(Decision {
            allowed: allowed == 1,
            tokens_remaining,
            retry_after_ms: if matches!(req.op, Op::Refund(_)) {
                0
            } else {
                retry_after_ms
            },
            reset_after_ms,
        })
    }

    async fn ping(&self) -> Result<(), BackendError> {
        self.bounded(async |mut conn| redis::cmd("PING").query_async::<()>(&mut conn).await)
            .await
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
