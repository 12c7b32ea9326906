//! Buckets in Redis, decided by `lua/token_bucket.lua` so every replica of tollgate shares them.
//!
//! One multiplexed connection carries every call: concurrent calls are written together in one
//! pipeline rather than waiting for each other. The script runs by EVALSHA and is loaded again
//! when Redis answers NOSCRIPT (after a restart or SCRIPT FLUSH). Every call is bounded by
//! REDIS_TIMEOUT_MS; the connection re-establishes itself after Redis comes back, without any
//! restart of tollgate.

use std::time::Duration;

use redis::{Script, aio::ConnectionManager, aio::ConnectionManagerConfig};

use super::{Backend, BackendError, BucketRequest, ErrorKind};
use crate::core::{Decision, Op};

/// The token-bucket script; its header states its KEYS/ARGV/return contract.
pub const TOKEN_BUCKET_LUA: &str = include_str!("../../lua/token_bucket.lua");

const NAME: &str = "redis";

/// How long one connection attempt may take. Longer than a call's deadline on purpose: the
/// attempt goes on in the background while calls fail fast, so a slow network still reconnects.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the connection may stay silent before it is declared broken and replaced. Calls give
/// up much earlier (REDIS_TIMEOUT_MS); this catches a peer that vanished without closing TCP.
const DEAD_CONNECTION_AFTER: Duration = Duration::from_secs(2);

/// The Redis backend (a single server; cluster and sentinel share this type's interface).
#[derive(Clone)]
pub struct RedisBackend {
    conn: ConnectionManager,
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
    /// Prepares a backend for `url` without connecting: tollgate starts (and reports NOT_SERVING)
    /// while Redis is away, and connects when Redis answers.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(|e| BackendError {
            backend: NAME,
            kind: ErrorKind::Other,
            message: format!("invalid REDIS_URL: {}", e),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(DEAD_CONNECTION_AFTER.max(timeout)))
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(500))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(map_error)?;
        Ok(Self {
            conn,
            script: Script::new(TOKEN_BUCKET_LUA),
            timeout,
        })
    }

    /// The SHA1 the script runs under (for operators checking `SCRIPT EXISTS`).
    pub fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BackendError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(map_error),
            Err(_) => Err(BackendError {
                backend: NAME,
                kind: ErrorKind::Timeout,
                message: format!("no answer within {} ms", self.timeout.as_millis()),
            }),
        }
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        let mut conn = self.conn.clone();
        let mut invocation = self.script.key(req.key);
        invocation
            .arg(req.shape.capacity())
            .arg(req.shape.rate())
            .arg(req.op.cost())
            .arg(req.op.lua_mode());
        // invoke_async sends EVALSHA, and on NOSCRIPT loads the script and sends it again.
        let (allowed, tokens, retry_after_ms, reset_after_ms): (i64, String, u64, u64) =
            self.bounded(invocation.invoke_async(&mut conn)).await?;
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
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }
}

fn map_error(e: redis::RedisError) -> BackendError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
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
