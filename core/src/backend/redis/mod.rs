//! Buckets in Redis, decided by `lua/token_bucket.lua` so every replica of sluicegate shares them.
//!
//! A decision goes to the node serving its key, through that node's lane: decisions bound for one
//! node while a call to it is in flight go together in the next call, so one EVALSHA decides many
//! buckets under load and each decision goes at once when idle. One Envoy request is one script
//! call where its keys share a node (atomic, all or nothing); across nodes, all or nothing is kept
//! by refunding what the calls that passed charged. Every call is bounded by REDIS_TIMEOUT_MS;
//! connections are made in the background and re-establish themselves, so Redis coming back needs
//! no restart of sluicegate; a node that keeps failing trips its breaker and is answered at once.
//!
//! - `script.rs`: the script's wire contract (a batch's arguments, the reply).
//! - `node.rs`: one node's connections and lane (batching).
//! - `topology.rs`: single, sentinel, cluster: which node serves a key.
//! - `connect.rs`: connection settings shared by the nodes (credentials, TLS).
//! - `breaker.rs`: a circuit breaker per node.
//! - `deny_cache.rs`: denials this replica can prove without asking Redis, and the refunds of
//!   other replicas that make it forget them.
//! - `leases.rs`: this replica's leases of hot buckets (QUOTA_LEASES), spent without Redis.

mod breaker;
mod connect;
mod deny_cache;
mod leases;
mod node;
mod script;
mod topology;

use std::{sync::Arc, time::Duration};

use futures::future::join_all;

pub use connect::RedisTls;
pub use leases::{LeaseSettings, LeaseStats};
pub use script::{IN_FLIGHT_LUA, RLQS_DEMAND_LUA, TOKEN_BUCKET_LUA};
pub use topology::Topology;

use deny_cache::DenyCache;
use leases::{Lease, Leases, Returned, Spend};
use node::{Job, Node};
use script::Placement;
use script::{Kind, Op1};
use topology::Nodes;

use super::{
    Backend, BackendError, BucketRequest, DemandShare, ErrorKind, LeaseRequest, SettleRequest,
    Settled,
};
use crate::{Ask, Decision, InFlight, Op, quota::Fleet};

const NAME: &str = "redis";

/// Makes the breaker gauge of a node, by its address.
pub type GaugeFor = Arc<dyn Fn(&str) -> metrics::Gauge + Send + Sync>;

/// The metrics the backend feeds (handles from the server's telemetry; none in plain use).
#[derive(Clone, Default)]
pub struct RedisMetrics {
    /// Buckets per script call.
    pub batch_size: Option<metrics::Histogram>,
    /// A gauge per node address: 1 while its breaker is open.
    pub circuit: Option<GaugeFor>,
    /// Tokens refunded because their caller had gone when the call answered (takes, counted).
    pub gone: Option<metrics::Counter>,
    /// Calls shed because they waited longer than MAX_QUEUE_MS.
    pub queue_shed: Option<metrics::Counter>,
    /// Leases granted, tokens leased, unspent tokens returned, takes answered from a lease.
    pub leases: Option<LeaseCounters>,
}

/// The lease counters (QUOTA_LEASES).
#[derive(Clone)]
pub struct LeaseCounters {
    pub granted: metrics::Counter,
    pub tokens: metrics::Counter,
    pub returned: metrics::Counter,
    pub answers: metrics::Counter,
}

impl RedisMetrics {
    fn batch(&self, n: usize) {
        if let Some(h) = &self.batch_size {
            h.record(n as f64);
        }
    }

    fn queue_shed(&self) {
        if let Some(c) = &self.queue_shed {
            c.increment(1);
        }
    }

    fn gone(&self, takes: usize) {
        if let Some(c) = &self.gone {
            c.increment(takes as u64);
        }
    }

    fn lease_granted(&self, tokens: u64) {
        if let Some(c) = &self.leases {
            c.granted.increment(1);
            c.tokens.increment(tokens);
        }
    }

    fn lease_returned(&self, tokens: u64) {
        if let Some(c) = &self.leases {
            c.returned.increment(tokens);
        }
    }

    fn lease_answers(&self, n: usize) {
        if let (Some(c), true) = (&self.leases, n > 0) {
            c.answers.increment(n as u64);
        }
    }

    fn circuit_gauge(&self, addr: &str) -> Option<metrics::Gauge> {
        self.circuit.as_ref().map(|f| f(addr))
    }
}

/// Settings of the Redis backend besides the URL.
#[derive(Clone)]
pub struct RedisOptions {
    pub topology: Topology,
    /// REDIS_TIMEOUT_MS.
    pub timeout: Duration,
    /// REDIS_CONNECTIONS: multiplexed connections (and calls in flight) per node.
    pub connections: usize,
    /// MAX_QUEUE_MS: a call that waited longer for a connection slot is shed unsent.
    pub max_queue: Duration,
    /// LOCAL_DENY_CACHE.
    pub deny_cache: bool,
    /// QUOTA_LEASES (None: off), LEASE_MS and LEASE_MAX_FRACTION.
    pub leases: Option<LeaseSettings>,
    pub tls: RedisTls,
    pub metrics: RedisMetrics,
}

impl RedisOptions {
    /// A single server, no deny cache, two connections; a call may wait for a connection as long
    /// as it may wait for Redis (sluicegate's server sets MAX_QUEUE_MS instead).
    pub fn new(timeout: Duration) -> Self {
        Self {
            topology: Topology::Single,
            timeout,
            connections: 2,
            max_queue: timeout,
            deny_cache: false,
            leases: None,
            tls: RedisTls::default(),
            metrics: RedisMetrics::default(),
        }
    }
}

/// What every node shares: the script, the call deadline and connection count, where refunds go,
/// the metrics and the deny cache.
pub(crate) struct NodeContext {
    sha: String,
    timeout: Duration,
    connections: usize,
    max_queue: Duration,
    placement: Placement,
    metrics: RedisMetrics,
    /// The deny cache, when on: each node's refund subscription feeds it.
    deny: Option<Arc<DenyCache>>,
}

/// The Redis backend, for a single server, a cluster or a sentinel-managed master.
pub struct RedisBackend {
    /// Shared with compensating refunds that outlive their caller.
    nodes: Arc<Nodes>,
    deny: Option<Arc<DenyCache>>,
    leases: Option<Arc<Leases>>,
    metrics: RedisMetrics,
}

/// What a take's call carries besides it: this replica's lease of the bucket to give back first,
/// and the size of a lease to ask for after it (0: none).
#[derive(Clone, Copy, Debug, Default)]
struct Extra {
    give_back: Option<Lease>,
    want: u64,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection settings would show credentials.
        f.debug_struct("RedisBackend").finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// A single Redis server at `url`, without the deny cache (tests, embedding).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, BackendError> {
        Self::with_options(url, RedisOptions::new(timeout))
    }

    /// Prepares a backend without waiting for Redis: sluicegate starts (and reports NOT_SERVING)
    /// while Redis is away, and connects in the background. `url` is a URL (single), a
    /// comma-separated list of nodes (cluster), or `master_name,host:port,...` (sentinel).
    /// Must be called within a tokio runtime.
    pub fn with_options(url: &str, options: RedisOptions) -> Result<Self, BackendError> {
        let cluster = options.topology == Topology::Cluster;
        let deny = options.deny_cache.then(|| Arc::new(DenyCache::default()));
        let leases = options.leases.map(|s| Arc::new(Leases::new(s)));
        let metrics = options.metrics.clone();
        let lanes = Arc::new(NodeContext {
            sha: redis::Script::new(TOKEN_BUCKET_LUA).get_hash().to_string(),
            timeout: options.timeout,
            connections: options.connections.max(1),
            max_queue: options.max_queue,
            placement: if cluster {
                Placement::Argv
            } else {
                Placement::Keys
            },
            metrics: options.metrics,
            deny: deny.clone(),
        });
        let nodes = Arc::new(Nodes::start(options.topology, url, &options.tls, &lanes)?);
        if let Some(leases) = &leases {
            spawn_lease_sweeper(
                Arc::downgrade(leases),
                Arc::downgrade(&nodes),
                metrics.clone(),
            );
        }
        Ok(Self {
            nodes,
            deny,
            leases,
            metrics,
        })
    }

    /// Leases held now and their unspent tokens (QUOTA_LEASES).
    pub fn leases_held(&self) -> (usize, u64) {
        self.leases.as_ref().map_or((0, 0), |l| l.held())
    }

    fn lease_answers(&self, n: usize) {
        self.metrics.lease_answers(n);
        if let Some(l) = &self.leases {
            l.tally.answers(n as u64);
        }
    }

    /// Buckets the deny cache holds now.
    pub fn deny_cache_len(&self) -> usize {
        self.deny.as_ref().map_or(0, |d| d.entries())
    }

    /// Decides `reqs` (all on `node`) in one job, re-routing once if the node no longer serves
    /// them (a cluster failover or resharding).
    async fn on_node(
        &self,
        node: Option<Arc<Node>>,
        reqs: &[BucketRequest<'_>],
        extras: &[Extra],
        group: bool,
    ) -> Result<Vec<Decision>, BackendError> {
        let leasing = extras.iter().any(|e| e.give_back.is_some() || e.want > 0);
        if !leasing {
            let job = || {
                let mut buckets = script::Buckets::new(group);
                for r in reqs {
                    push_request(&mut buckets, r);
                }
                Job::new(buckets)
            };
            return submit_routed(&self.nodes, node, reqs[0].key, job).await;
        }
        let lease_ms = self.leases.as_ref().map_or(1, |l| l.settings().lease_ms);
        let job = || leasing_job(reqs, extras, group, lease_ms);
        let sent = tokio::time::Instant::now();
        let result = submit_routed(&self.nodes, node, reqs[0].key, job).await;
        self.leases_answered(reqs, extras, sent, result)
    }

    /// Hands a leasing call's answers to the lease table (leases granted, returns counted) and
    /// returns the requests' own decisions.
    fn leases_answered(
        &self,
        reqs: &[BucketRequest<'_>],
        extras: &[Extra],
        sent: tokio::time::Instant,
        result: Result<Vec<Decision>, BackendError>,
    ) -> Result<Vec<Decision>, BackendError> {
        let leases = self.leases.as_ref();
        let Ok(all) = result else {
            // Whether the returns landed is unknown: never sent twice (a second return would
            // take its size off the leases of others); lost at worst, until the generation ends.
            for (r, _) in reqs.iter().zip(extras).filter(|(_, e)| e.want > 0) {
                if let Some(l) = leases {
                    l.granted(r.key, r.ask.shape, sent, None);
                }
            }
            return result;
        };
        let mut all = all.into_iter();
        let mut out = Vec::with_capacity(reqs.len());
        for (r, e) in reqs.iter().zip(extras) {
            if let Some(l) = e.give_back {
                all.next();
                self.metrics.lease_returned(l.left);
                if let Some(leases) = leases {
                    leases.tally.returned(l.left);
                }
            }
            out.push(all.next().ok_or_else(unknown_node)?);
            if e.want > 0 {
                let lease = all.next();
                if let (Some(d), Some(l)) = (lease.as_ref().filter(|d| d.granted > 0), leases) {
                    self.metrics.lease_granted(d.granted);
                    l.tally.granted(d.granted);
                }
                if let Some(l) = leases {
                    l.granted(r.key, r.ask.shape, sent, lease.as_ref());
                }
            }
        }
        Ok(out)
    }

    /// Answers from leases the takes of `reqs` not answered yet (`local`), and notes what the
    /// others' calls carry (`extras`). A group that is all or nothing is answered from its leases
    /// only whole; else its members' leases are renewed in its call to Redis. True when every
    /// request is answered.
    fn answer_from_leases(
        &self,
        reqs: &[BucketRequest<'_>],
        local: &mut [Option<Decision>],
        extras: &mut [Extra],
        all_or_nothing: bool,
        now: tokio::time::Instant,
    ) -> bool {
        let Some(leases) = &self.leases else {
            return false;
        };
        let takes: Vec<(usize, (&str, crate::Shape, u64))> = reqs
            .iter()
            .enumerate()
            .filter(|(i, r)| local[*i].is_none() && r.reserve.is_none())
            .filter_map(|(i, r)| match r.ask.op {
                Op::Take(cost) => Some((i, (r.key, r.ask.shape, cost))),
                _ => None,
            })
            .collect();
        let spends: Vec<Spend> = if !(all_or_nothing && reqs.len() > 1) {
            takes
                .iter()
                .map(|(_, (key, shape, cost))| leases.spend(key, *shape, *cost, now))
                .collect()
        } else if takes.len() == reqs.len() {
            let t: Vec<_> = takes.iter().map(|(_, t)| *t).collect();
            leases.spend_group(&t, now)
        } else {
            // A member that is not a plain take is decided by Redis: so is the group.
            Vec::new()
        };
        let mut answered = 0;
        for ((i, _), spend) in takes.iter().zip(spends) {
            match spend {
                Spend::Local { decision, .. } => {
                    local[*i] = Some(decision);
                    answered += 1;
                }
                Spend::Remote { give_back, want } => extras[*i] = Extra { give_back, want },
            }
        }
        self.lease_answers(answered);
        answered == reqs.len()
    }

    /// A take's lease at `now`: an answer from it, or what the call to Redis carries besides
    /// the take. None when leases are off or the request is not a plain take (a reservation
    /// must be recorded in Redis).
    fn spend(&self, r: &BucketRequest<'_>, now: tokio::time::Instant) -> Option<Spend> {
        let leases = self.leases.as_ref()?;
        match (r.ask.op, r.reserve) {
            (Op::Take(cost), None) => Some(leases.spend(r.key, r.ask.shape, cost, now)),
            _ => None,
        }
    }

    /// The group over as many nodes as its keys live on; all or nothing across nodes by
    /// refunding what the nodes that passed charged.
    async fn across_nodes(
        &self,
        reqs: &[BucketRequest<'_>],
        extras: &[Extra],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        let parts = self.by_node(reqs);
        let answers = join_all(parts.iter().map(|(node, idx)| async move {
            let part: Vec<BucketRequest<'_>> = idx.iter().map(|&i| reqs[i]).collect();
            let part_extras: Vec<Extra> = idx.iter().map(|&i| extras[i]).collect();
            self.on_node(node.clone(), &part, &part_extras, all_or_nothing)
                .await
        }))
        .await;

        let mut out: Vec<Option<Result<Decision, BackendError>>> = vec![None; reqs.len()];
        let mut vetoed = vec![false; parts.len()];
        for (p, ((_, idx), answer)) in parts.iter().zip(answers).enumerate() {
            match answer {
                Ok(decisions) => {
                    for (&i, d) in idx.iter().zip(decisions) {
                        vetoed[p] |= reqs[i].ask.veto && !d.allowed;
                        out[i] = Some(Ok(d));
                    }
                }
                Err(e) => idx.iter().for_each(|&i| out[i] = Some(Err(e.clone()))),
            }
        }
        if all_or_nothing && parts.len() > 1 && vetoed.iter().any(|&v| v) {
            self.undo_passed_parts(reqs, &parts, &vetoed, &mut out)
                .await;
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(unknown_node())))
            .collect()
    }

    /// The requests' indexes grouped by the node that holds their bucket (a Vec: a request
    /// touches a handful of nodes at most).
    fn by_node(&self, reqs: &[BucketRequest<'_>]) -> Vec<(Option<Arc<Node>>, Vec<usize>)> {
        let mut parts: Vec<(Option<Arc<Node>>, Vec<usize>)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let node = self.nodes.node_for(r.key.as_bytes());
            let same = |n: &Option<Arc<Node>>| match (n, &node) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            match parts.iter_mut().find(|(n, _)| same(n)) {
                Some((_, idx)) => idx.push(i),
                None => parts.push((node, vec![i])),
            }
        }
        parts
    }

    /// An all-or-nothing group that one node's part vetoed: each node's part was atomic, so give
    /// back what the parts that passed charged, and answer with the buckets after the refund.
    async fn undo_passed_parts(
        &self,
        reqs: &[BucketRequest<'_>],
        parts: &[(Option<Arc<Node>>, Vec<usize>)],
        vetoed: &[bool],
        out: &mut [Option<Result<Decision, BackendError>>],
    ) {
        let charged: Vec<usize> = parts
            .iter()
            .zip(vetoed)
            .filter(|(_, v)| !**v)
            .flat_map(|((_, idx), _)| idx.iter().copied())
            .filter(|&i| matches!(&out[i], Some(Ok(d)) if d.granted > 0))
            .collect();
        // Detached: they land even if this caller goes away while they are in flight.
        let taken = |i: usize| match &out[i] {
            Some(Ok(d)) => d.granted,
            _ => 0,
        };
        let refunds = charged
            .iter()
            .map(|&i| refund_detached(&self.nodes, reqs[i].key, reqs[i].ask.shape, taken(i)));
        for (&i, refunded) in charged.iter().zip(join_all(refunds).await) {
            if let (Some(Ok(d)), Ok(Ok(after))) = (&mut out[i], refunded)
                && let Some(after) = after.first()
            {
                // Given back: the take took nothing in the end (and has no reservation to settle).
                d.tokens_remaining = after.tokens_remaining;
                d.reset_after_ms = after.reset_after_ms;
                d.granted = 0;
            }
        }
    }
}

/// A job of takes with their extras: each take's lease given back before it (so that the take
/// sees its tokens), the lease asked for after it. Both are part of the group: a return always
/// lands, a lease never vetoes and is not taken when the group is vetoed.
fn leasing_job(reqs: &[BucketRequest<'_>], extras: &[Extra], group: bool, lease_ms: u32) -> Job {
    let mut buckets = script::Buckets::new(group);
    buckets.lease_ms = lease_ms;
    for (r, e) in reqs.iter().zip(extras) {
        if let Some(l) = e.give_back {
            let back = Ask::new(r.ask.shape, Op::Refund(l.left));
            let kind = Kind::Return {
                size: l.size,
                generation: l.generation,
            };
            buckets.push(r.key, Op1::of(back, kind));
        }
        push_request(&mut buckets, r);
        if e.want > 0 {
            let lease = Ask::new(r.ask.shape, Op::Take(e.want));
            buckets.push(r.key, Op1::of(lease, Kind::Lease));
        }
    }
    Job::new(buckets)
}

/// The requests of a group that go to Redis (those not answered here), with their extras; when
/// the group is `vetoed` here already, its takes become checks and ask for no lease, so that
/// nothing is charged.
fn remote_part<'a>(
    reqs: &[BucketRequest<'a>],
    local: &[Option<Decision>],
    extras: &[Extra],
    vetoed: bool,
) -> (Vec<BucketRequest<'a>>, Vec<Extra>) {
    reqs.iter()
        .zip(local)
        .zip(extras)
        .filter(|((_, l), _)| l.is_none())
        .map(|((r, _), e)| match r.ask.op {
            Op::Take(_) | Op::TakeUpTo(_) if vetoed => {
                let check = Ask {
                    op: r.ask.op.as_check(),
                    ..r.ask
                };
                (BucketRequest { ask: check, ..*r }, Extra { want: 0, ..*e })
            }
            _ => (
                *r,
                Extra {
                    want: if vetoed { 0 } else { e.want },
                    ..*e
                },
            ),
        })
        .unzip()
}

/// Adds a request to a job: its operation, and its reservation when it is a take.
fn push_request(buckets: &mut script::Buckets, r: &BucketRequest<'_>) {
    buckets.push(r.key, r.ask.into());
    if let (Some(rv), Op::Take(_) | Op::TakeUpTo(_)) = (r.reserve, r.ask.op) {
        buckets.reserve_last(script::reservation_key(r.key, rv.id), rv.ttl_ms);
    }
}

/// How often quiet keys' leases are looked for, as a share of LEASE_MS.
const SWEEPS_PER_LEASE: u32 = 4;

/// Returns expired leases (of keys that went quiet) every LEASE_MS / 4, until the backend goes.
fn spawn_lease_sweeper(
    leases: std::sync::Weak<Leases>,
    nodes: std::sync::Weak<Nodes>,
    metrics: RedisMetrics,
) {
    tokio::spawn(async move {
        let every = leases.upgrade().map_or(Duration::from_millis(50), |l| {
            Duration::from_millis(u64::from(l.settings().lease_ms / SWEEPS_PER_LEASE).max(5))
        });
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (Some(leases), Some(nodes)) = (leases.upgrade(), nodes.upgrade()) else {
                return;
            };
            let back = leases.sweep(tokio::time::Instant::now());
            if !back.is_empty() {
                tokio::spawn(return_leases(nodes, back, leases, metrics.clone()));
            }
        }
    });
}

/// Gives leases back, one call per node. Never retried: a return that landed unanswered and came
/// again would take its size off the leases of others (one lost is only capacity held until its
/// generation ends).
async fn return_leases(
    nodes: Arc<Nodes>,
    back: Vec<Returned>,
    leases: Arc<Leases>,
    metrics: RedisMetrics,
) {
    let lease_ms = leases.settings().lease_ms;
    let mut by_node: Vec<(Arc<Node>, script::Buckets, u64)> = Vec::new();
    for r in &back {
        let Some(node) = nodes.node_for(r.key.as_bytes()) else {
            continue;
        };
        let i = match by_node.iter().position(|(n, _, _)| Arc::ptr_eq(n, &node)) {
            Some(i) => i,
            None => {
                let mut buckets = script::Buckets::new(false);
                buckets.lease_ms = lease_ms;
                by_node.push((node, buckets, 0));
                by_node.len() - 1
            }
        };
        let (_, buckets, tokens) = &mut by_node[i];
        let kind = Kind::Return {
            size: r.lease.size,
            generation: r.lease.generation,
        };
        buckets.push(
            &r.key,
            Op1::of(Ask::new(r.shape, Op::Refund(r.lease.left)), kind),
        );
        *tokens += r.lease.left;
    }
    join_all(by_node.into_iter().map(|(node, buckets, tokens)| {
        let (metrics, leases) = (metrics.clone(), leases.clone());
        async move {
            match node.submit(Job::new(buckets)).await {
                Ok(_) => {
                    metrics.lease_returned(tokens);
                    leases.tally.returned(tokens);
                }
                Err(e) => tracing::debug!(error = %e, "lease returns failed; their tokens come back by refill"),
            }
        }
    }))
    .await;
}

/// How many times a job follows its slot (MOVED, ASK) before its callers get the error.
const MAX_REDIRECTS: usize = 3;

/// Submits the job `make` builds to `node`; when the node does not serve `key` now (a cluster
/// failover, a slot moved or migrating), asks it where the key is and follows: MOVED to the new
/// owner, ASK to the slot's target with ASKING. The slot map is refreshed meanwhile.
async fn submit_routed(
    nodes: &Nodes,
    node: Option<Arc<Node>>,
    key: &str,
    make: impl Fn() -> Job,
) -> Result<Vec<Decision>, BackendError> {
    let Some(mut node) = node else {
        nodes.suspect();
        return Err(unknown_node());
    };
    let job = |asking: bool| {
        let mut job = make();
        job.asking = asking;
        job
    };
    let mut result = node.submit(job(false)).await;
    for _ in 0..MAX_REDIRECTS {
        match &result {
            Err(e) if e.kind == ErrorKind::Moved => {
                nodes.suspect();
                let (next, asking) = match node.locate(key).await {
                    // Served there after all (a move finished meanwhile): once more.
                    Ok(None) => (node.clone(), false),
                    Ok(Some((addr, ask))) => match nodes.node_at(&addr) {
                        Some(n) => (n, ask),
                        None => return result,
                    },
                    // The node cannot say: the map may already be right.
                    Err(_) => match nodes.node_for(key.as_bytes()) {
                        Some(n) if !Arc::ptr_eq(&n, &node) => (n, false),
                        _ => return result,
                    },
                };
                node = next;
                result = node.submit(job(asking)).await;
            }
            Err(e) if matches!(e.kind, ErrorKind::Connection | ErrorKind::Timeout) => {
                nodes.suspect();
                return result;
            }
            _ => return result,
        }
    }
    result
}

/// A refund of `hits` to one bucket, in a task of its own: a compensation must land even when the
/// caller that caused it goes away (its handler dropped at its deadline).
fn refund_detached(
    nodes: &Arc<Nodes>,
    key: &str,
    shape: crate::Shape,
    hits: u64,
) -> tokio::task::JoinHandle<Result<Vec<Decision>, BackendError>> {
    let (nodes, key) = (nodes.clone(), key.to_string());
    tokio::spawn(async move {
        let job = || Job::single(&key, Ask::new(shape, Op::Refund(hits)).into());
        let node = nodes.node_for(key.as_bytes());
        submit_routed(&nodes, node, &key, job).await
    })
}

fn unknown_node() -> BackendError {
    BackendError {
        backend: NAME,
        kind: ErrorKind::Connection,
        message: "no node known for this key (yet)".into(),
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        if let Some(local) = self
            .deny
            .as_ref()
            .and_then(|c| c.deny(req.key, req.ask.shape, req.ask.op))
        {
            return Ok(local);
        }
        let sent = tokio::time::Instant::now();
        let extra = match self.spend(&req, sent) {
            Some(Spend::Local { decision, .. }) => {
                self.lease_answers(1);
                return Ok(decision);
            }
            Some(Spend::Remote { give_back, want }) => Extra { give_back, want },
            None => Extra::default(),
        };
        let node = self.nodes.node_for(req.key.as_bytes());
        let d = self
            .on_node(node, std::slice::from_ref(&req), &[extra], false)
            .await?
            .pop()
            .ok_or_else(unknown_node)?;
        if let Some(cache) = &self.deny {
            cache.observe(req.key, req.ask.shape, req.ask.op, sent, &d);
        }
        Ok(d)
    }

    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        let now = tokio::time::Instant::now();
        // Denials provable here need no call. Under all or nothing one of them vetoes the group:
        // the other takes become checks, so that nothing is charged.
        let mut local: Vec<Option<Decision>> = match &self.deny {
            Some(cache) => reqs
                .iter()
                .map(|r| cache.deny(r.key, r.ask.shape, r.ask.op))
                .collect(),
            None => vec![None; reqs.len()],
        };
        let mut extras = vec![Extra::default(); reqs.len()];
        if self.answer_from_leases(reqs, &mut local, &mut extras, all_or_nothing, now) {
            return local.into_iter().flatten().map(Ok).collect();
        }
        let vetoed = all_or_nothing
            && reqs
                .iter()
                .zip(&local)
                .any(|(r, l)| r.ask.veto && l.is_some_and(|d| !d.allowed));
        let (remote, remote_extras) = remote_part(reqs, &local, &extras, vetoed);
        let sent = tokio::time::Instant::now();
        let mut answers = if remote.is_empty() {
            Vec::new()
        } else {
            self.across_nodes(&remote, &remote_extras, all_or_nothing)
                .await
        }
        .into_iter();
        reqs.iter()
            .zip(local)
            .map(|(r, l)| match l {
                Some(d) => Ok(d),
                None => {
                    let answer = answers.next().unwrap_or_else(|| Err(unknown_node()));
                    if let (Ok(d), Some(cache)) = (&answer, &self.deny) {
                        cache.observe(r.key, r.ask.shape, r.ask.op, sent, d);
                    }
                    answer
                }
            })
            .collect()
    }

    async fn settle(&self, req: SettleRequest<'_>) -> Result<Settled, BackendError> {
        let sent = tokio::time::Instant::now();
        let job = || {
            // The real cost travels as a forced charge's; the reservation decides what it becomes.
            let settle = Op1::of(Ask::new(req.shape, Op::Force(req.actual)), Kind::Settle);
            let mut buckets = script::Buckets::single(req.key, settle);
            buckets.reserve_last(script::reservation_key(req.key, req.id), 0);
            Job::new(buckets)
        };
        let node = self.nodes.node_for(req.key.as_bytes());
        let d = submit_routed(&self.nodes, node, req.key, job)
            .await?
            .pop()
            .ok_or_else(unknown_node)?;
        if script::not_found(&d) {
            return Ok(Settled::NotFound);
        }
        if let Some(cache) = &self.deny {
            // A settle may have given tokens back: what this replica knew no longer bounds it.
            cache.observe(req.key, req.shape, Op::Refund(0), sent, &d);
        }
        Ok(Settled::Done {
            tokens_remaining: d.tokens_remaining,
            reset_after_ms: d.reset_after_ms,
        })
    }

    async fn lease(&self, req: LeaseRequest<'_>) -> Result<InFlight, BackendError> {
        let Some(mut node) = self.nodes.node_for(req.key.as_bytes()) else {
            self.nodes.suspect();
            return Err(unknown_node());
        };
        let mut result = node.in_flight(req.key, req.id, req.op, false).await;
        // The key's slot moved or is moving (a failover, a resharding): follow it, as decisions do.
        for _ in 0..MAX_REDIRECTS {
            let Err(e) = &result else { break };
            if e.kind != ErrorKind::Moved {
                if matches!(e.kind, ErrorKind::Connection | ErrorKind::Timeout) {
                    self.nodes.suspect();
                }
                break;
            }
            self.nodes.suspect();
            let (next, asking) = match node.locate(req.key).await {
                Ok(None) => (node.clone(), false),
                Ok(Some((addr, ask))) => match self.nodes.node_at(&addr) {
                    Some(n) => (n, ask),
                    None => break,
                },
                Err(_) => break,
            };
            node = next;
            result = node.in_flight(req.key, req.id, req.op, asking).await;
        }
        result
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let nodes = self.nodes.nodes();
        if nodes.is_empty() {
            return Err(unknown_node());
        }
        // Healthy while any node answers: one dead shard must not take a replica out of service.
        let pings = join_all(nodes.iter().map(|n| n.ping())).await;
        let mut last = None;
        for p in pings {
            match p {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(unknown_node))
    }

    fn leases(&self) -> Option<LeaseStats> {
        self.leases.as_ref().map(|l| l.stats())
    }

    async fn close(&self) {
        if let Some(leases) = &self.leases {
            let back = leases.drain();
            if !back.is_empty() {
                return_leases(
                    self.nodes.clone(),
                    back,
                    leases.clone(),
                    self.metrics.clone(),
                )
                .await;
            }
        }
    }

    async fn exchange_demand(
        &self,
        replica: &str,
        ttl_ms: u64,
        shares: &[DemandShare<'_>],
    ) -> Result<Vec<Fleet>, BackendError> {
        let Some(first) = shares.first() else {
            return Ok(Vec::new());
        };
        // Every key shares a hash tag: the node of the first serves them all.
        let Some(node) = self.nodes.node_for(first.key.as_bytes()) else {
            self.nodes.suspect();
            return Err(unknown_node());
        };
        let result = node.demand(replica, ttl_ms, shares).await;
        // A slot moved, or the node went: find the topology again; the next interval retries.
        if let Err(e) = &result
            && matches!(
                e.kind,
                ErrorKind::Moved | ErrorKind::Connection | ErrorKind::Timeout
            )
        {
            self.nodes.suspect();
        }
        result
    }
}

/// Sorts a redis-rs error into what sluicegate reports and retries.
fn map_error(e: redis::RedisError) -> BackendError {
    use redis::ServerErrorKind as S;
    let text = e.to_string();
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if text.contains("non local key")
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(S::Moved | S::Ask | S::TryAgain | S::ClusterDown)
        )
    {
        ErrorKind::Moved
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            // A failover in progress: the old master is read-only, the new one loading.
            redis::ErrorKind::Server(S::ReadOnly | S::MasterDown | S::BusyLoading)
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
        message: text,
    }
}
