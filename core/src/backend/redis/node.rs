//! One Redis node: its connections, made in the background, and its lane, which sends the
//! decisions bound for the node together.
//!
//! Batching without waiting: a call goes out as soon as a connection slot is free; decisions that
//! arrive while every slot is busy queue, and all of them (up to [`MAX_BUCKETS_PER_CALL`]) go in
//! the next call. At low load every decision goes alone and at once; under load each script call
//! decides many buckets. A slot is one call in flight, and there are REDIS_CONNECTIONS of them,
//! each on its own multiplexed connection.

use std::{
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
use super::script::{self, Buckets, Op1};
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
    /// This job's caller holds the breaker's probe: the call carrying it decides whether the
    /// circuit closes.
    probe: bool,
    /// The job's slot is migrating to this node: the call goes after ASKING.
    pub asking: bool,
    reply: Option<oneshot::Sender<Result<Vec<Decision>, BackendError>>>,
}

impl Job {
    pub fn new(buckets: Buckets) -> Self {
        Self {
            buckets,
            probe: false,
            asking: false,
            reply: None,
        }
    }

    /// A job of one bucket operation.
    pub fn single(key: &str, op: Op1) -> Self {
        Self::new(Buckets::single(key, op))
    }

    fn gone(&self) -> bool {
        self.reply.as_ref().is_none_or(|r| r.is_closed())
    }

    fn answer(&mut self, result: Result<Vec<Decision>, BackendError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
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
        tokio::spawn(lane(rx, conns, lanes.clone(), Arc::new(judge)));
        node
    }

    /// Sends `job` through the lane and waits for its answers, within REDIS_TIMEOUT_MS from now.
    pub async fn submit(&self, mut job: Job) -> Result<Vec<Decision>, BackendError> {
        let permit = self.breaker.permit();
        if permit == Permit::Reject {
            return Err(BackendError {
                backend: "redis",
                kind: ErrorKind::CircuitOpen,
                message: format!("{} failing: circuit open", self.addr),
            });
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
            let e = not_connected(&self.addr);
            note(&self.breaker, &self.addr, permit == Permit::Probe, false);
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        job.reply = Some(tx);
        job.probe = permit == Permit::Probe;
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
    /// request start and end, so there is nothing to batch it with. Bounded by REDIS_TIMEOUT_MS
    /// and judged by the breaker like the lane's calls.
    pub async fn in_flight(
        &self,
        key: &str,
        id: &str,
        op: crate::LeaseOp,
        asking: bool,
    ) -> Result<crate::InFlight, BackendError> {
        let permit = self.breaker.permit();
        if permit == Permit::Reject {
            return Err(BackendError {
                backend: "redis",
                kind: ErrorKind::CircuitOpen,
                message: format!("{} failing: circuit open", self.addr),
            });
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        if self.conns.managers.load().is_none()
            && tokio::time::timeout_at(deadline, self.conns.ready())
                .await
                .is_err()
        {
            note(&self.breaker, &self.addr, permit == Permit::Probe, false);
            return Err(not_connected(&self.addr));
        }
        let Some(mut conn) = self.conns.pick() else {
            return Err(not_connected(&self.addr));
        };
        let cmd = script::in_flight(key, id, op);
        let called = call(&mut conn, &cmd, asking, script::IN_FLIGHT_LUA);
        let result = match tokio::time::timeout_at(deadline, called).await {
            Ok(Ok(value)) => script::decode_in_flight(value),
            Ok(Err(e)) => Err(map_error(e)),
            Err(_) => Err(timeout_error(self.timeout)),
        };
        let node_fault = result.as_ref().is_err_and(is_node_fault);
        note(
            &self.breaker,
            &self.addr,
            permit == Permit::Probe,
            !node_fault,
        );
        result
    }

    /// PING, within REDIS_TIMEOUT_MS.
    pub async fn ping(&self) -> Result<(), BackendError> {
        let Some(mut conn) = self.conns.pick() else {
            return Err(not_connected(&self.addr));
        };
        let answered = match tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<()>(&mut conn),
        )
        .await
        {
            Ok(r) => r.map_err(map_error),
            Err(_) => Err(timeout_error(self.timeout)),
        };
        // The health monitor pings every 500 ms: an answer proves the node is back, so an open
        // circuit closes now rather than at its next probe (up to 4 s away).
        let node_fault = answered.as_ref().is_err_and(is_node_fault);
        note(&self.breaker, &self.addr, true, !node_fault);
        answered
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

/// Tells the breaker how one call went, and says so when that opened or closed it.
fn note(breaker: &Breaker, addr: &str, probe: bool, ok: bool) {
    if breaker.record(probe, ok) {
        if breaker.is_open() {
            tracing::warn!(node = %addr, "circuit open: answering without waiting for this node");
        } else {
            tracing::info!(node = %addr, "circuit closed: the node answers again");
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
    conns: Arc<Conns>,
    lanes: Arc<NodeContext>,
    judge: Arc<Judge>,
) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        // A slot is free: take what queued (waiting for the first job only when idle).
        let job = if !open {
            None
        } else if in_flight.len() < lanes.connections {
            tokio::select! {
                job = rx.recv() => job,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => continue,
            }
        } else {
            // Every slot busy: wait for one; meanwhile decisions queue up for the next call.
            in_flight.next().await;
            continue;
        };
        let Some(first) = job else {
            open = false;
            if in_flight.next().await.is_none() {
                return;
            }
            continue;
        };
        let mut batch = vec![first];
        let mut buckets = batch[0].buckets.len();
        while buckets < MAX_BUCKETS_PER_CALL {
            match rx.try_recv() {
                Ok(job) => {
                    buckets += job.buckets.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        // A caller that gave up (its deadline passed) was answered otherwise: its decisions
        // must not be charged now.
        batch.retain(|j| !j.gone());
        if !batch.is_empty() {
            let (conns, lanes, judge) = (conns.clone(), lanes.clone(), judge.clone());
            in_flight.push(async move { run_batch(&conns, &lanes, &judge, batch).await });
        }
    }
}

/// One script call for `batch`, its answers handed back job by job.
async fn run_batch(conns: &Conns, lanes: &NodeContext, judge: &Judge, mut batch: Vec<Job>) {
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
    let probe = batch.iter().any(|j| j.probe);
    let node_fault = result.as_ref().is_err_and(is_node_fault);
    note(&judge.breaker, &judge.addr, probe, !node_fault);
    match result {
        Ok(decisions) => {
            let mut rest = decisions.into_iter();
            for job in &mut batch {
                // A job with a bucket away was decided nowhere: its caller follows the slot.
                let mine: Option<Vec<Decision>> = rest.by_ref().take(job.buckets.len()).collect();
                job.answer(mine.ok_or_else(|| away(&judge.addr)));
            }
        }
        Err(e) => batch.iter_mut().for_each(|j| j.answer(Err(e.clone()))),
    }
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
