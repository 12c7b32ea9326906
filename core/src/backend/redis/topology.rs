//! Which node serves a key (REDIS_TYPE): the one server; the master the sentinels name, followed
//! through failovers; or, on a cluster, the master owning the key's slot, from a slot map that
//! sluicegate keeps itself (CLUSTER SLOTS, refreshed every few seconds and at once when a node
//! fails or answers for a slot it no longer owns). Its own map lets decisions be batched per
//! node, failures stay confined to the dead master's slots, and each node has its breaker.

use std::{
    collections::HashMap,
    sync::{Arc, Weak},
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::Notify;

use super::NodeContext;
use super::connect::{Template, invalid};
use super::node::Node;
use crate::backend::BackendError;

/// How often the sentinels are asked where the master is.
const SENTINEL_POLL: Duration = Duration::from_secs(1);
/// How often a cluster's slot map is read again without any sign of change.
const CLUSTER_POLL: Duration = Duration::from_secs(5);
/// The shortest wait between two refreshes triggered by failures (a burst makes one).
const REFRESH_SETTLE: Duration = Duration::from_millis(100);
const SLOTS: usize = 16384;

/// Which topology REDIS_URL describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    Single,
    Cluster,
    Sentinel,
}

/// The Redis nodes sluicegate talks to, as the topology arranges them: one, the current master
/// of a sentinel group, or a cluster's masters by slot.
pub enum Nodes {
    Single(Arc<Node>),
    Sentinel(Arc<Follower>),
    Cluster(Arc<Cluster>),
}

impl Nodes {
    /// Prepares the topology; connections are made in the background.
    pub fn start(
        kind: Topology,
        url: &str,
        tls: &super::RedisTls,
        lanes: &Arc<NodeContext>,
    ) -> Result<Self, BackendError> {
        let entries: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        Ok(match kind {
            Topology::Single => {
                let [url] = entries[..] else {
                    return Err(invalid("REDIS_URL: expected one URL".into()));
                };
                Nodes::Single(Node::start(Template::parse(url, "redis", tls)?, lanes))
            }
            Topology::Cluster => {
                let first = entries
                    .first()
                    .ok_or_else(|| invalid("REDIS_URL: expected host:port,...".into()))?;
                let template = Template::parse(first, "redis", tls)?;
                let seeds = entries
                    .iter()
                    .map(|e| Template::parse(e, template.scheme(), tls))
                    .collect::<Result<Vec<_>, _>>()?;
                Nodes::Cluster(Cluster::start(template, seeds, lanes.clone()))
            }
            Topology::Sentinel => {
                let (master, sentinels) = entries.split_first().ok_or_else(|| {
                    invalid("REDIS_URL: expected master_name,host:port,...".into())
                })?;
                let sentinels = sentinels
                    .iter()
                    .map(|e| Template::parse(e, "redis", tls))
                    .collect::<Result<Vec<_>, _>>()?;
                let first_sentinel = sentinels.first().ok_or_else(|| {
                    invalid("REDIS_URL: expected master_name,host:port,...".into())
                })?;
                // `redis://:password@mymaster` gives the master's credentials and TLS; a bare name
                // takes the first sentinel's.
                let (name, template) = if master.contains("://") {
                    let t = Template::parse(master, "redis", tls)?;
                    let name = t
                        .addr()
                        .rsplit_once(':')
                        .map(|(h, _)| h.to_string())
                        .unwrap_or_default();
                    (name, t)
                } else {
                    (master.to_string(), first_sentinel.clone())
                };
                Nodes::Sentinel(Follower::start(name, template, sentinels, lanes.clone()))
            }
        })
    }

    /// The node serving `key`, if known.
    pub fn node_for(&self, key: &[u8]) -> Option<Arc<Node>> {
        match self {
            Nodes::Single(node) => Some(node.clone()),
            Nodes::Sentinel(f) => f.current.load_full(),
            Nodes::Cluster(c) => c.node_for(key),
        }
    }

    /// The node at `addr` among those in use (a cluster's masters), if any: where a MOVED or ASK
    /// points.
    pub fn node_at(&self, addr: &str) -> Option<Arc<Node>> {
        match self {
            Nodes::Single(_) | Nodes::Sentinel(_) => None,
            Nodes::Cluster(c) => c.map.load().nodes.iter().find(|n| n.addr == addr).cloned(),
        }
    }

    /// Every node in use (the masters), for health.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        match self {
            Nodes::Single(node) => vec![node.clone()],
            Nodes::Sentinel(f) => f.current.load_full().into_iter().collect(),
            Nodes::Cluster(c) => c.map.load().nodes.clone(),
        }
    }

    /// A call failed in a way that may mean the topology changed: look again soon.
    pub fn suspect(&self) {
        match self {
            Nodes::Single(_) => {}
            Nodes::Sentinel(f) => f.refresh.notify_one(),
            Nodes::Cluster(c) => c.refresh.notify_one(),
        }
    }
}

/// A sentinel-managed master, followed through failovers.
pub struct Follower {
    name: String,
    template: Template,
    sentinels: Vec<Template>,
    current: ArcSwapOption<Node>,
    refresh: Notify,
    lanes: Arc<NodeContext>,
}

impl Follower {
    fn start(
        name: String,
        template: Template,
        sentinels: Vec<Template>,
        lanes: Arc<NodeContext>,
    ) -> Arc<Self> {
        let f = Arc::new(Self {
            name,
            template,
            sentinels,
            current: ArcSwapOption::empty(),
            refresh: Notify::new(),
            lanes,
        });
        tokio::spawn(Self::watch(Arc::downgrade(&f)));
        f
    }

    /// Asks the sentinels, in turn, where the master is.
    async fn master(&self) -> Option<(String, u16)> {
        for sentinel in &self.sentinels {
            let asked = async {
                let mut conn = sentinel.connect_once().await.ok()?;
                let addr: Option<(String, String)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.name)
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                let (host, port) = addr?;
                Some((host, port.parse().ok()?))
            };
            if let Ok(Some(found)) = tokio::time::timeout(Duration::from_secs(1), asked).await {
                return Some(found);
            }
        }
        None
    }

    async fn watch(this: Weak<Self>) {
        let mut unknown_logged = false;
        loop {
            let Some(me) = this.upgrade() else { return };
            match me.master().await {
                Some((host, port)) => {
                    unknown_logged = false;
                    let addr = format!("{host}:{port}");
                    if me.current.load().as_ref().is_none_or(|n| n.addr != addr) {
                        tracing::info!(master = %me.name, %addr, "following the master the sentinels name");
                        let node = Node::start(me.template.at(&host, port), &me.lanes);
                        me.current.store(Some(node));
                    }
                }
                None if !unknown_logged => {
                    tracing::warn!(master = %me.name, "no sentinel names the master (yet)");
                    unknown_logged = true;
                }
                None => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(SENTINEL_POLL) => {}
                _ = me.refresh.notified() => tokio::time::sleep(REFRESH_SETTLE).await,
            }
        }
    }
}

/// The slot map: which master owns each slot.
#[derive(Default)]
pub struct SlotMap {
    /// Index into `nodes` per slot; `u16::MAX` for a slot no master serves.
    slots: Vec<u16>,
    nodes: Vec<Arc<Node>>,
}

/// A Redis Cluster, through sluicegate's own slot map.
pub struct Cluster {
    template: Template,
    seeds: Vec<Template>,
    map: ArcSwap<SlotMap>,
    refresh: Notify,
    lanes: Arc<NodeContext>,
}

impl Cluster {
    fn start(template: Template, seeds: Vec<Template>, lanes: Arc<NodeContext>) -> Arc<Self> {
        let c = Arc::new(Self {
            template,
            seeds,
            map: ArcSwap::from_pointee(SlotMap::default()),
            refresh: Notify::new(),
            lanes,
        });
        tokio::spawn(Self::watch(Arc::downgrade(&c)));
        c
    }

    fn node_for(&self, key: &[u8]) -> Option<Arc<Node>> {
        let map = self.map.load();
        let i = *map.slots.get(usize::from(slot(key)))?;
        map.nodes.get(usize::from(i)).cloned()
    }

    /// Reads CLUSTER SLOTS from the first node that answers: the known masters, then the seeds.
    async fn read_slots(&self) -> Option<Vec<(u16, u16, String, u16)>> {
        let known: Vec<Template> = self
            .map
            .load()
            .nodes
            .iter()
            .filter_map(|n| {
                n.addr
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some(self.template.at(h, p.parse().ok()?)))
            })
            .collect();
        for node in known.iter().chain(&self.seeds) {
            let asked = async {
                let mut conn = node.connect_once().await.ok()?;
                let value: redis::Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
                    .ok()?;
                parse_slots(&value)
            };
            if let Ok(Some(ranges)) = tokio::time::timeout(Duration::from_secs(1), asked).await
                && !ranges.is_empty()
            {
                return Some(ranges);
            }
        }
        None
    }

    /// A new map from `ranges`, keeping the nodes (and their connections) that stay.
    fn rebuild(&self, ranges: &[(u16, u16, String, u16)]) -> bool {
        let old = self.map.load_full();
        let mut by_addr: HashMap<String, Arc<Node>> = old
            .nodes
            .iter()
            .map(|n| (n.addr.clone(), n.clone()))
            .collect();
        let mut nodes: Vec<Arc<Node>> = Vec::new();
        let mut slots = vec![u16::MAX; SLOTS];
        for (start, end, host, port) in ranges {
            let addr = format!("{host}:{port}");
            let i = match nodes.iter().position(|n| n.addr == addr) {
                Some(i) => i,
                None => {
                    let node = by_addr
                        .remove(&addr)
                        .unwrap_or_else(|| Node::start(self.template.at(host, *port), &self.lanes));
                    nodes.push(node);
                    nodes.len() - 1
                }
            };
            for s in *start..=(*end).min(SLOTS as u16 - 1) {
                slots[usize::from(s)] = i as u16;
            }
        }
        let changed = old.slots != slots
            || old
                .nodes
                .iter()
                .map(|n| &n.addr)
                .ne(nodes.iter().map(|n| &n.addr));
        if changed {
            tracing::info!(masters = nodes.len(), "cluster slot map updated");
            self.map.store(Arc::new(SlotMap { slots, nodes }));
        }
        changed
    }

    async fn watch(this: Weak<Self>) {
        let mut unknown_logged = false;
        loop {
            let Some(me) = this.upgrade() else { return };
            match me.read_slots().await {
                Some(ranges) => {
                    unknown_logged = false;
                    me.rebuild(&ranges);
                }
                None if !unknown_logged => {
                    tracing::warn!("no cluster node answers CLUSTER SLOTS (yet)");
                    unknown_logged = true;
                }
                None => {}
            }
            let wait = if me.map.load().nodes.is_empty() {
                Duration::from_millis(200)
            } else {
                CLUSTER_POLL
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = me.refresh.notified() => tokio::time::sleep(REFRESH_SETTLE).await,
            }
        }
    }
}

/// (first slot, last slot, master host, master port) of each range in a CLUSTER SLOTS reply.
fn parse_slots(value: &redis::Value) -> Option<Vec<(u16, u16, String, u16)>> {
    use redis::Value;
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(items) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).to_string(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        // "?" or "": the node does not know its own address; skip the range until it does.
        if host.is_empty() || host == "?" {
            continue;
        }
        out.push((*start as u16, *end as u16, host, *port as u16));
    }
    Some(out)
}

/// The cluster slot of a key: CRC16 (XMODEM) of the key, or of its `{hash tag}`, mod 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS as u16
}

#[cfg(test)]
mod tests {
    use super::slot;

    #[test]
    fn slots_match_redis() {
        // CLUSTER KEYSLOT on redis-server 7.0.
        assert_eq!(slot(b"a"), 15495);
        assert_eq!(slot(b"b"), 3300);
        assert_eq!(slot(b"f"), 3168);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag: the whole key is hashed (not "bar", whose slot is 5061).
        assert_eq!(slot(b"foo{}{bar}"), 8363);
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }
}
