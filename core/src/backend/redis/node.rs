//! One Redis node: its connections, made in the background, and its lane, which sends the
//! decisions bound for the node together.
//!
//! Batching without waiting: a call goes out as soon as a connection slot is free; decisions that
//! arrive while every slot is busy queue, and all of them (up to [`MAX_BUCKETS_PER_CALL`]) go in
//! the next call. At low load every decision goes alone and at once; under load each script call
//! decides many buckets. A slot is one call in flight, and there are REDIS_CONNECTIONS of them,
//! each on its own multiplexed connection.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use redis::{
    Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::{mpsc, oneshot};

use super::breaker::{Breaker, Permit};
use super::connect::{CONNECT_TIMEOUT, DEAD_CONNECTION_AFTER, Template};
use super::script::{self, Buckets, Kind, Op1};
use super::{NodeContext, map_error};
use crate::Decision;
use crate::backend::{BackendError, ErrorKind};

/// The most buckets one script call decides (the batch-size cap).
pub const MAX_BUCKETS_PER_CALL: usize = 128;
/// Calls waiting for a connection slot, at most; beyond it a call fails at once (FAILURE_MODE
/// answers).
const QUEUE: usize = 8192;

/// Decisions to make together (the buckets of one request on this node, all or nothing when
/// their group says so, or one decision), and who waits for them.
pub struct Job {
    pub buckets: Buckets,
    /// The job's slot is migrating to this node: the call goes after ASKING.
    pub asking: bool,
    /// Nobody waits for it (a refund the lane sends on its own): never dropped as gone or shed.
    detached: bool,
    /// When it joined the lane's queue.
    queued: tokio::time::Instant,
    reply: Option<oneshot::Sender<Result<Vec<Decision>, BackendError>>>,
}

impl Job {
    pub fn new(buckets: Buckets) -> Self {
        Self {
            buckets,
            asking: false,
            detached: false,
            queued: tokio::time::Instant::now(),
            reply: None,
        }
    }

    /// A job of one bucket operation.
    pub fn single(key: &str, op: Op1) -> Self {
        Self::new(Buckets::single(key, op))
    }

    fn gone(&self) -> bool {
        !self.detached && self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    /// Hands the answer to its caller; false when the caller has gone (its deadline passed while
    /// the call was in flight) and the answer reached nobody.
    fn answer(&mut self, result: Result<Vec<Decision>, BackendError>) -> bool {
        match self.reply.take() {
            Some(reply) => reply.send(result).is_ok(),
            None => self.detached,
        }
    }
}

/// The node's connections, once made.
struct Conns {
    managers: ArcSwapOption<Vec<ConnectionManager>>,
    next: AtomicUsize,
    made: tokio::sync::Notify,
}

impl Conns {
    /// Waits until the connections are made (the caller bounds the wait).
    async fn ready(&self) {
        loop {
            let made = self.made.notified();
            if self.managers.load().is_some() {
                return;
            }
            made.await;
        }
    }

    fn pick(&self) -> Option<ConnectionManager> {
        let all = self.managers.load();
        let all = all.as_ref()?;
        let i = self.next.fetch_add(1, Ordering::Relaxed) % all.len();
        Some(all[i].clone())
    }
}

/// One node: where its decisions queue, how to reach it, and its breaker.
pub struct Node {
    pub addr: String,
    jobs: mpsc::Sender<Job>,
    conns: Arc<Conns>,
    pub breaker: Arc<Breaker>,
    timeout: Duration,
}

impl Node {
    /// Starts connecting to the node in the background, and its lane. Both stop when the node is
    /// dropped.
    pub fn start(template: Template, lanes: &Arc<NodeContext>) -> Arc<Node> {
        let addr = template.addr();
        let conns = Arc::new(Conns {
            managers: ArcSwapOption::empty(),
            next: AtomicUsize::new(0),
            made: tokio::sync::Notify::new(),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let breaker = Arc::new(Breaker::new(
            lanes.timeout,
            lanes.metrics.circuit_gauge(&addr),
        ));
        let node = Arc::new(Node {
            breaker: breaker.clone(),
            addr,
            jobs: tx,
            conns: conns.clone(),
            timeout: lanes.timeout,
        });
        if let Some(cache) = &lanes.deny {
            tokio::spawn(hear_refunds(
                Arc::downgrade(&node),
                template.clone(),
                cache.clone(),
            ));
        }
        tokio::spawn(connect(
            Arc::downgrade(&node),
            template,
            conns.clone(),
            lanes.connections,
            lanes.timeout,
        ));
        let judge = Judge {
            breaker,
            addr: node.addr.clone(),
        };
        let refunds = node.jobs.downgrade();
        tokio::spawn(lane(rx, refunds, conns, lanes.clone(), Arc::new(judge)));
        node
    }

    /// The deadline of a call to this node (REDIS_TIMEOUT_MS from now); an error when the
    /// circuit is open or the node is not connected within the deadline. When the breaker's
    /// cooldown is over, the probe is a PING of this node's own, in the background: no caller
    /// waits on a node that may still hang (that caller, like the others, is answered at once).
    async fn admit(&self) -> Result<tokio::time::Instant, BackendError> {
        match self.breaker.permit() {
            Permit::Call => {}
            Permit::Probe => {
                let (conns, breaker) = (self.conns.clone(), self.breaker.clone());
                let (addr, timeout) = (self.addr.clone(), self.timeout);
                tokio::spawn(async move {
                    // Not even connected: that is the probe's outcome (else it would stay out).
                    if conns.pick().is_none() {
                        note(&breaker, &addr, true, false);
                    } else {
                        let _ = ping(&conns, &breaker, &addr, timeout).await;
                    }
                });
                return Err(circuit_open(&self.addr));
            }
            Permit::Reject => return Err(circuit_open(&self.addr)),
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Not connected yet (just started, or a slow handshake): wait for it within the
        // deadline; the attempt itself goes on in the background either way.
        if self.conns.managers.load().is_none()
            && tokio::time::timeout_at(deadline, self.conns.ready())
                .await
                .is_err()
        {
            // No call was made: this caller's wait is the outcome (one per caller, each a full
            // timeout long, so a node that never connects still opens the circuit).
            note(&self.breaker, &self.addr, false, false);
            return Err(not_connected(&self.addr));
        }
        Ok(deadline)
    }

    /// Sends `job` through the lane and waits for its answers, within REDIS_TIMEOUT_MS from now.
    pub async fn submit(&self, mut job: Job) -> Result<Vec<Decision>, BackendError> {
        let deadline = self.admit().await?;
        let (tx, rx) = oneshot::channel();
        job.reply = Some(tx);
        job.queued = tokio::time::Instant::now();
        match self.jobs.try_send(job) {
            Err(_) => Err(BackendError {
                backend: "redis",
                kind: ErrorKind::Other,
                message: format!("{}: more than {QUEUE} calls waiting", self.addr),
            }),
            Ok(()) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(BackendError {
                    backend: "redis",
                    kind: ErrorKind::Other,
                    message: "the node's lane stopped".into(),
                }),
                // The call itself is judged where it is made (`run_batch`), once for all the
                // callers it carries.
                Err(_) => Err(timeout_error(self.timeout)),
            },
        }
    }

    /// Where `key` lives now, asked of this node with a plain key command (a script only says
    /// "not here"): `None` when here, else the node's address and whether the slot is migrating
    /// there (ASK: the next call needs ASKING) or has moved (MOVED).
    pub async fn locate(&self, key: &str) -> Result<Option<(String, bool)>, BackendError> {
        let Some(mut conn) = self.conns.pick() else {
            return Err(not_connected(&self.addr));
        };
        let asked = tokio::time::timeout(
            self.timeout,
            redis::cmd("EXISTS").arg(key).query_async::<i64>(&mut conn),
        )
        .await
        .map_err(|_| timeout_error(self.timeout))?;
        match asked {
            Ok(_) => Ok(None),
            Err(e) => match e.redirect_node() {
                Some((addr, _)) => {
                    let ask = e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Ask);
                    Ok(Some((addr.to_string(), ask)))
                }
                None => Err(map_error(e)),
            },
        }
    }

    /// One lease operation (`lua/in_flight.lua`), outside the lane: one key per call, a call per
    /// request start and end, so there is nothing to batch it with.
    pub async fn in_flight(
        &self,
        key: &str,
        id: &str,
        op: crate::LeaseOp,
        asking: bool,
    ) -> Result<crate::InFlight, BackendError> {
        let cmd = script::in_flight(key, id, op);
        self.scripted(
            &cmd,
            asking,
            script::IN_FLIGHT_LUA,
            script::decode_in_flight,
        )
        .await
    }

    /// One RLQS demand exchange (`lua/rlqs_demand.lua`), outside the lane: a call per replica
    /// and interval, its keys in one slot.
    pub async fn demand(
        &self,
        replica: &str,
        ttl_ms: u64,
        shares: &[super::super::DemandShare<'_>],
    ) -> Result<Vec<crate::quota::Fleet>, BackendError> {
        let cmd = script::demand(replica, ttl_ms, shares);
        let fleets = self
            .scripted(&cmd, false, script::RLQS_DEMAND_LUA, script::decode_demand)
            .await?;
        if fleets.len() != shares.len() {
            return Err(script::unexpected("the demand script"));
        }
        Ok(fleets)
    }

    /// A script call outside the lane, bounded by REDIS_TIMEOUT_MS and judged by the breaker
    /// like the lane's calls.
    async fn scripted<T>(
        &self,
        cmd: &redis::Cmd,
        asking: bool,
        text: &str,
        decode: fn(Value) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let deadline = self.admit().await?;
        let Some(mut conn) = self.conns.pick() else {
            return Err(not_connected(&self.addr));
        };
        let called = call(&mut conn, cmd, asking, text);
        let result = match tokio::time::timeout_at(deadline, called).await {
            Ok(Ok(value)) => decode(value),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(timeout_error(self.timeout)),
        };
        let node_fault = result.as_ref().is_err_and(is_node_fault);
        note(&self.breaker, &self.addr, false, !node_fault);
        result
    }

    /// PING, within REDIS_TIMEOUT_MS. The health monitor pings every 500 ms: an answer proves the
    /// node is back, so an open circuit closes now rather than at its next probe (up to 4 s away).
    pub async fn ping(&self) -> Result<(), BackendError> {
        ping(&self.conns, &self.breaker, &self.addr, self.timeout).await
    }
}

/// PING a node within `timeout`, the outcome judged by its breaker as a probe's (the breaker's own
/// probe, and the health monitor's); not connected yet is not judged.
async fn ping(
    conns: &Conns,
    breaker: &Breaker,
    addr: &str,
    timeout: Duration,
) -> Result<(), BackendError> {
    let Some(mut conn) = conns.pick() else {
        return Err(not_connected(addr));
    };
    let answered = match tokio::time::timeout(
        timeout,
        redis::cmd("PING").query_async::<()>(&mut conn),
    )
    .await
    {
        Ok(r) => r.map_err(map_error),
        Err(_) => Err(timeout_error(timeout)),
    };
    let node_fault = answered.as_ref().is_err_and(is_node_fault);
    note(breaker, addr, true, !node_fault);
    answered
}

/// The error of a call refused because the node's circuit is open.
fn circuit_open(addr: &str) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::CircuitOpen,
        message: format!("{addr} failing: circuit open"),
    }
}

/// The breaker of a node and its name, for the lane.
struct Judge {
    breaker: Arc<Breaker>,
    addr: String,
}

/// A failure that is the node's (it did not answer in time, or the connection failed), not the
/// request's.
fn is_node_fault(e: &BackendError) -> bool {
    matches!(e.kind, ErrorKind::Timeout | ErrorKind::Connection)
}

/// Tells the breaker how one call went, and says so when that opened or closed it (at most one
/// line per node every 10 s, with how many transitions were left out).
fn note(breaker: &Breaker, addr: &str, probe: bool, ok: bool) {
    if breaker.record(probe, ok)
        && let Some(left_out) = breaker.log.admit()
    {
        if breaker.is_open() {
            tracing::warn!(node = %addr, left_out, "circuit open: answering without waiting for this node");
        } else {
            tracing::info!(node = %addr, left_out, "circuit closed: the node answers again");
        }
    }
}

async fn load_script(conn: &mut ConnectionManager, text: &str) -> redis::RedisResult<()> {
    redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(text)
        .query_async::<String>(conn)
        .await
        .map(drop)
}

/// A job the node did not decide: a key of it is not served there (its slot moved or is moving).
fn away(addr: &str) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Moved,
        message: format!("{addr} does not serve this key now (a slot moved or is moving)"),
    }
}

fn shed(max_queue: Duration) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Shed,
        message: format!(
            "waited over MAX_QUEUE_MS ({} ms) for Redis: shed",
            max_queue.as_millis()
        ),
    }
}

fn timeout_error(timeout: Duration) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Timeout,
        message: format!("no answer within {} ms", timeout.as_millis()),
    }
}

fn not_connected(addr: &str) -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Connection,
        message: format!("{addr}: not connected (yet)"),
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

/// Makes the node's connections in the background, so that a slow handshake (TLS, another zone)
/// is never cut short by a call's deadline. Each connection re-establishes itself afterwards.
async fn connect(
    node: std::sync::Weak<Node>,
    template: Template,
    conns: Arc<Conns>,
    count: usize,
    timeout: Duration,
) {
    let mut wait = Duration::from_millis(50);
    let mut last_error = String::new();
    loop {
        if node.strong_count() == 0 {
            return;
        }
        let made: redis::RedisResult<Vec<ConnectionManager>> = async {
            let client = template.client()?;
            let mut all = Vec::with_capacity(count);
            for _ in 0..count {
                all.push(
                    ConnectionManager::new_with_config(client.clone(), manager_config(timeout))
                        .await?,
                );
            }
            Ok(all)
        }
        .await;
        match made {
            Ok(all) => {
                if !last_error.is_empty() {
                    tracing::info!(node = %template.addr(), "connected");
                }
                conns.managers.store(Some(Arc::new(all)));
                conns.made.notify_waiters();
                return;
            }
            Err(e) => {
                // The real cause (refused, unknown host, wrong password, TLS), once per cause.
                let cause = map_error(e).message;
                if cause != last_error {
                    tracing::warn!(node = %template.addr(), error = %cause, "cannot connect; retrying in the background");
                    last_error = cause;
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// Listens for the refunds the script publishes (on any replica) and makes the deny cache forget
/// those keys, until the node is dropped. A broken subscription may have missed some: the cache
/// forgets everything, then subscribes again.
async fn hear_refunds(
    node: std::sync::Weak<Node>,
    template: Template,
    cache: Arc<super::deny_cache::DenyCache>,
) {
    use futures::StreamExt;
    let mut wait = Duration::from_millis(50);
    loop {
        if node.strong_count() == 0 {
            return;
        }
        let subscribed = async {
            let mut pubsub = template.client()?.get_async_pubsub().await?;
            pubsub.subscribe(super::deny_cache::REFUNDS_CHANNEL).await?;
            redis::RedisResult::Ok(pubsub.into_on_message())
        };
        if let Ok(Ok(mut messages)) = tokio::time::timeout(CONNECT_TIMEOUT, subscribed).await {
            wait = Duration::from_millis(50);
            // Subscribed only now: anything before is unknown.
            cache.clear();
            loop {
                // Wake up now and then to notice a dropped node.
                match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                    Ok(Some(msg)) => cache.forget(msg.get_payload_bytes()),
                    Ok(None) => break,
                    Err(_) if node.strong_count() == 0 => return,
                    Err(_) => {}
                }
            }
        }
        cache.clear();
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// The lane: one call per free slot, carrying every decision that queued meanwhile. The calls in
/// flight are polled here, not spawned: one task per node, no hand-off per batch.
async fn lane(
    mut rx: mpsc::Receiver<Job>,
    refunds: mpsc::WeakSender<Job>,
    conns: Arc<Conns>,
    lanes: Arc<NodeContext>,
    judge: Arc<Judge>,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    // Calls taken off the channel while every slot is busy, oldest first: watched, so that one
    // waiting past MAX_QUEUE_MS is shed then, not when a slot frees (a slow node would otherwise
    // hold a whole timeout's worth of calls, all answered too late).
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut open = true;
    loop {
        shed_stale(&mut waiting, &lanes);
        let free = in_flight.len() < lanes.connections;
        if free && !waiting.is_empty() {
            let batch = next_batch(&mut waiting, &mut rx, &lanes);
            if !batch.is_empty() {
                in_flight.push(send_batch(&conns, &lanes, &judge, &refunds, batch));
            }
            continue;
        }
        if !open && waiting.is_empty() {
            if in_flight.next().await.is_none() {
                return;
            }
            continue;
        }
        // Idle: wait for the first call. Busy: wait for a slot, taking in what queues meanwhile
        // (the next call's batch) and waking when the oldest waiting call would go stale.
        let stale_at = waiting
            .front()
            .filter(|j| !j.detached)
            .map(|j| j.queued + lanes.max_queue);
        let room = open && (free || waiting.len() < QUEUE);
        tokio::select! {
            job = rx.recv(), if room => match job {
                Some(job) => {
                    waiting.push_back(job);
                    while waiting.len() < QUEUE && let Ok(job) = rx.try_recv() {
                        waiting.push_back(job);
                    }
                }
                None => open = false,
            },
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            () = tokio::time::sleep_until(stale_at.unwrap_or_else(tokio::time::Instant::now)), if stale_at.is_some() => {}
        }
    }
}

/// One script call for `batch`; tokens it took for callers who left while it was in flight go
/// back in a later call of this lane.
fn send_batch(
    conns: &Arc<Conns>,
    lanes: &Arc<NodeContext>,
    judge: &Arc<Judge>,
    refunds: &mpsc::WeakSender<Job>,
    batch: Vec<Job>,
) -> impl Future<Output = ()> + use<> {
    let (conns, lanes, judge) = (conns.clone(), lanes.clone(), judge.clone());
    let refunds = refunds.clone();
    async move {
        let gone = run_batch(&conns, &lanes, &judge, batch).await;
        if let (Some(job), Some(tx)) = (gone, refunds.upgrade()) {
            let n = job.buckets.len();
            if tx.try_send(job).is_ok() {
                lanes.metrics.gone(n);
            }
        }
    }
}

/// Drops, from the front of the waiting calls, those whose caller has gone and sheds those that
/// waited past MAX_QUEUE_MS (RESOURCE_EXHAUSTED, or FAILURE_MODE's answer), oldest first.
fn shed_stale(waiting: &mut VecDeque<Job>, lanes: &NodeContext) {
    let now = tokio::time::Instant::now();
    while let Some(j) = waiting.front_mut() {
        if !j.gone() && !shed_if_stale(j, now, lanes) {
            return;
        }
        waiting.pop_front();
    }
}

/// Sheds `j` if it waited past MAX_QUEUE_MS (its caller answered so, the shed counted): true
/// then. A detached job (a refund the lane sends itself) is never stale.
fn shed_if_stale(j: &mut Job, now: tokio::time::Instant, lanes: &NodeContext) -> bool {
    if j.detached || now.duration_since(j.queued) <= lanes.max_queue {
        return false;
    }
    lanes.metrics.queue_shed();
    j.answer(Err(shed(lanes.max_queue)));
    true
}

/// The next script call's jobs: the waiting ones first, then what queued on the channel, up to
/// [`MAX_BUCKETS_PER_CALL`] buckets; none whose caller has gone (its deadline passed: it was
/// answered otherwise, and must not be charged now) or that waited past MAX_QUEUE_MS.
fn next_batch(
    waiting: &mut VecDeque<Job>,
    rx: &mut mpsc::Receiver<Job>,
    lanes: &NodeContext,
) -> Vec<Job> {
    let mut batch = Vec::new();
    let mut buckets = 0;
    while buckets < MAX_BUCKETS_PER_CALL {
        let Some(job) = waiting.pop_front().or_else(|| rx.try_recv().ok()) else {
            break;
        };
        buckets += job.buckets.len();
        batch.push(job);
    }
    let now = tokio::time::Instant::now();
    batch.retain_mut(|j| !j.gone() && !shed_if_stale(j, now, lanes));
    batch
}

/// One script call for `batch`, its answers handed back job by job; the refunds of what it took
/// for callers that had gone by then, as a job of their own.
async fn run_batch(
    conns: &Conns,
    lanes: &NodeContext,
    judge: &Judge,
    mut batch: Vec<Job>,
) -> Option<Job> {
    let total: usize = batch.iter().map(|j| j.buckets.len()).sum();
    lanes.metrics.batch(total);
    let result = match conns.pick() {
        None => Err(BackendError {
            backend: "redis",
            kind: ErrorKind::Connection,
            message: "not connected (yet)".into(),
        }),
        Some(mut conn) => {
            let cmd = script::batch(
                &lanes.sha,
                batch.iter().map(|j| &j.buckets),
                lanes.placement,
            );
            let asking = batch.iter().any(|j| j.asking);
            let called = call(&mut conn, &cmd, asking, script::TOKEN_BUCKET_LUA);
            let sent = tokio::time::timeout(lanes.timeout, called).await;
            match sent {
                Ok(Ok(value)) => script::decode(value, total),
                Ok(Err(e)) => Err(map_error(e)),
                Err(_) => Err(timeout_error(lanes.timeout)),
            }
        }
    };
    let node_fault = result.as_ref().is_err_and(is_node_fault);
    note(&judge.breaker, &judge.addr, false, !node_fault);
    match result {
        Ok(decisions) => hand_out(&mut batch, decisions, &judge.addr),
        Err(e) => {
            batch.iter_mut().for_each(|j| {
                j.answer(Err(e.clone()));
            });
            None
        }
    }
}

/// Hands a script call's decisions to the batch's jobs, in order; returns the refunds of what was
/// taken for callers that had gone by then, as a job of its own (detached).
fn hand_out(batch: &mut [Job], decisions: Vec<Option<Decision>>, addr: &str) -> Option<Job> {
    let mut rest = decisions.into_iter();
    let mut refunds = Buckets::new(false);
    for job in batch {
        // A job with a bucket away was decided nowhere: its caller follows the slot.
        let mine: Option<Vec<Decision>> = rest.by_ref().take(job.buckets.len()).collect();
        let taken = mine.as_deref().map(|d| charged(&job.buckets, d));
        if !job.answer(mine.ok_or_else(|| away(addr)))
            && let Some(taken) = taken
        {
            for (i, cost, generation) in taken {
                let o = job.buckets.ops[i];
                let refund = crate::Ask::new(o.ask.shape, crate::Op::Refund(cost));
                let kind = match o.kind {
                    // A lease nobody will spend goes back as a lease, off what is leased out.
                    Kind::Lease => Kind::Return {
                        size: cost,
                        generation,
                    },
                    _ => Kind::Decide,
                };
                refunds.push(job.buckets.key(i), Op1::of(refund, kind));
                refunds.lease_ms = job.buckets.lease_ms;
            }
        }
    }
    (refunds.len() > 0).then(|| Job {
        detached: true,
        ..Job::new(refunds)
    })
}

/// The takes a job's answer charged: (bucket, tokens taken, a lease's generation). A take its
/// all-or-nothing group vetoed took nothing (granted 0); a settle is not a take (its reservation
/// decides).
fn charged(buckets: &Buckets, decisions: &[Decision]) -> Vec<(usize, u64, u64)> {
    buckets
        .ops
        .iter()
        .zip(decisions)
        .enumerate()
        .filter(|(_, (op, d))| d.granted > 0 && op.kind != Kind::Settle)
        .map(|(i, (_, d))| (i, d.granted, d.reset_after_ms))
        .collect()
}

/// EVALSHA (after ASKING, for a slot migrating here: it lets the script reach the keys already
/// moved); on NOSCRIPT (a restart, a failover, SCRIPT FLUSH) load the script and send again.
async fn call(
    conn: &mut ConnectionManager,
    cmd: &redis::Cmd,
    asking: bool,
    script: &str,
) -> redis::RedisResult<Value> {
    if asking {
        let send = |conn: &mut ConnectionManager| {
            let mut pipe = redis::pipe();
            pipe.cmd("ASKING").ignore().add_command(cmd.clone());
            let mut conn = conn.clone();
            async move { pipe.query_async::<(Value,)>(&mut conn).await.map(|(v,)| v) }
        };
        let first = send(conn).await.and_then(Value::extract_error);
        return match first {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                load_script(conn, script).await?;
                send(conn).await.and_then(Value::extract_error)
            }
            other => other,
        };
    }
    // A server error comes back as a value: make it an error.
    let first = conn
        .req_packed_command(cmd)
        .await
        .and_then(Value::extract_error);
    match first {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            load_script(conn, script).await?;
            conn.req_packed_command(cmd)
                .await
                .and_then(Value::extract_error)
        }
        other => other,
    }
}
