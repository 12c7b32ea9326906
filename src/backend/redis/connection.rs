//! The three ways to reach Redis (REDIS_TYPE), behind one connection type so that nothing else in
//! tollgate knows which one runs.
//!
//! - single: one multiplexed connection that re-establishes itself (redis-rs ConnectionManager);
//! - cluster: redis-rs's cluster client (slot routing, MOVED/ASK, topology refresh, reconnection),
//!   connected lazily so tollgate starts while the cluster is away;
//! - sentinel: the master found through the sentinels, watched every second and re-resolved at
//!   once when the master stops answering or turns read-only (a failover), so tollgate follows it.

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::ArcSwapOption;
use redis::{
    RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster_async::ClusterConnection,
    sentinel::{SentinelClient, SentinelServerType},
};
use tokio::sync::{Notify, OnceCell};

use crate::backend::{BackendError, ErrorKind};

/// How long one connection attempt may take. Longer than a call's deadline on purpose: the
/// attempt goes on in the background while calls fail fast, so a slow network still reconnects.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may stay silent before it is declared broken and replaced. Calls give
/// up much earlier (REDIS_TIMEOUT_MS); this catches a peer that vanished without closing TCP.
const DEAD_CONNECTION_AFTER: Duration = Duration::from_secs(2);
/// How often the sentinels are asked where the master is.
const SENTINEL_POLL: Duration = Duration::from_secs(1);

/// Which topology REDIS_URL describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
    Sentinel,
}

pub(super) enum Connector {
    Single(ConnectionManager),
    Cluster {
        // Boxed: the client is large and the connector is built once.
        client: Box<redis::cluster::ClusterClient>,
        conn: OnceCell<ClusterConnection>,
    },
    Sentinel(Arc<SentinelFollower>),
}

/// A connection for one call (cheap clones of shared multiplexed connections).
pub(super) enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn manager_config(timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(DEAD_CONNECTION_AFTER.max(timeout)))
        .set_min_delay(Duration::from_millis(10))
        .set_max_delay(Duration::from_millis(500))
        .set_number_of_retries(3)
}

fn invalid(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Other,
        message: format!("invalid REDIS_URL for {what}: {e}"),
    }
}

/// `host:port` (envoyproxy/ratelimit's form) or a full URL.
fn with_scheme(entry: &str) -> String {
    let entry = entry.trim();
    if entry.contains("://") {
        entry.to_string()
    } else {
        format!("redis://{entry}")
    }
}

impl Connector {
    /// Prepares the connection without any I/O.
    pub fn new(topology: Topology, url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Ok(match topology {
            Topology::Single => {
                let client = redis::Client::open(url).map_err(|e| invalid("single", e))?;
                let conn = ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
                    .map_err(|e| invalid("single", e))?;
                Connector::Single(conn)
            }
            Topology::Cluster => {
                let nodes: Vec<String> = url
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(with_scheme)
                    .collect();
                if nodes.is_empty() {
                    return Err(invalid("cluster", "expected host:port,host:port,..."));
                }
                let client = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(DEAD_CONNECTION_AFTER.max(timeout))
                    .retries(2)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(|e| invalid("cluster", e))?;
                Connector::Cluster {
                    client: Box::new(client),
                    conn: OnceCell::new(),
                }
            }
            Topology::Sentinel => {
                let mut parts = url.split(',').map(str::trim).filter(|s| !s.is_empty());
                let master = parts
                    .next()
                    .ok_or_else(|| invalid("sentinel", "expected master_name,host:port,..."))?
                    .to_string();
                let sentinels: Vec<String> = parts.map(with_scheme).collect();
                if sentinels.is_empty() || master.contains("://") {
                    return Err(invalid("sentinel", "expected master_name,host:port,..."));
                }
                let client = SentinelClient::build(
                    sentinels,
                    master.clone(),
                    None,
                    SentinelServerType::Master,
                )
                .map_err(|e| invalid("sentinel", e))?;
                Connector::Sentinel(SentinelFollower::start(client, master, timeout))
            }
        })
    }

    /// A connection for one call; may wait for the first connection (bounded by the caller).
    pub async fn get(&self) -> Result<Conn, redis::RedisError> {
        match self {
            Connector::Single(c) => Ok(Conn::Manager(c.clone())),
            Connector::Cluster { client, conn } => {
                let conn = conn
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                Ok(Conn::Cluster(conn.clone()))
            }
            Connector::Sentinel(f) => f.current().map(Conn::Manager).ok_or_else(|| {
                f.refresh.notify_one();
                redis::RedisError::from((
                    redis::ErrorKind::MasterNameNotFoundBySentinel,
                    "no master known yet",
                    f.master.clone(),
                ))
            }),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Connector::Cluster { .. })
    }

    /// Tells the connector a call failed in a way that may mean the topology changed.
    pub fn failed(&self, kind: ErrorKind) {
        if let (Connector::Sentinel(f), ErrorKind::Connection | ErrorKind::Timeout) = (self, kind) {
            f.refresh.notify_one();
        }
    }
}

/// Follows a sentinel-managed master.
pub(super) struct SentinelFollower {
    master: String,
    sentinel: tokio::sync::Mutex<SentinelClient>,
    current: ArcSwapOption<(String, ConnectionManager)>,
    refresh: Notify,
    timeout: Duration,
}

impl SentinelFollower {
    fn start(client: SentinelClient, master: String, timeout: Duration) -> Arc<Self> {
        let follower = Arc::new(Self {
            master,
            sentinel: tokio::sync::Mutex::new(client),
            current: ArcSwapOption::empty(),
            refresh: Notify::new(),
            timeout,
        });
        tokio::spawn(Self::watch(Arc::downgrade(&follower)));
        follower
    }

    fn current(&self) -> Option<ConnectionManager> {
        self.current.load().as_ref().map(|c| c.1.clone())
    }

    /// Asks the sentinels where the master is and switches to it when it moved.
    async fn resolve(&self) {
        let found = {
            let mut sentinel = self.sentinel.lock().await;
            tokio::time::timeout(CONNECT_TIMEOUT, sentinel.async_get_client()).await
        };
        let client = match found {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                tracing::warn!(master = %self.master, error = %e, "sentinels do not know the master");
                return;
            }
            Err(_) => {
                tracing::warn!(master = %self.master, "sentinels did not answer in time");
                return;
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        if self.current.load().as_ref().is_some_and(|c| c.0 == addr) {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client, manager_config(self.timeout)) {
            Ok(conn) => {
                tracing::info!(master = %self.master, %addr, "following the master the sentinels name");
                self.current.store(Some(Arc::new((addr, conn))));
            }
            Err(e) => tracing::warn!(error = %e, "cannot connect to the new master"),
        }
    }

    async fn watch(this: Weak<Self>) {
        loop {
            let Some(me) = this.upgrade() else { return };
            me.resolve().await;
            let wait = tokio::time::sleep(SENTINEL_POLL);
            tokio::select! {
                _ = wait => {}
                _ = me.refresh.notified() => {
                    // Let a burst of failures settle into one lookup.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
