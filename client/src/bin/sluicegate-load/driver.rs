//! Drives the target: closed loop (a fixed number of callers) or open loop (a fixed request rate),
//! for a fixed duration, with a progress bar on a terminal.

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::{SeedableRng, rngs::SmallRng};
use tokio::task::JoinSet;

use crate::{cli::Cli, keys::KeyChooser, record::Recorder, target::Target};

/// Recorders are sharded so callers rarely wait for each other's lock.
const SHARDS: usize = 16;

struct Shared {
    target: Target,
    keys: KeyChooser,
    recorders: Vec<Mutex<Recorder>>,
    start: Instant,
    done: AtomicU64,
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
}

impl Shared {
    /// One call for key `k`; latency counts from `intended` (the open loop's schedule, or the
    /// moment the closed loop sent it).
    async fn call(&self, conn: usize, k: u32, key: &str, intended: Instant) {
        let reply = self.target.call(conn, key, self.start).await;
        let done = Instant::now();
        let latency_us = done.saturating_duration_since(intended).as_micros() as u64;
        let sent_us = intended.saturating_duration_since(self.start).as_micros() as u64;
        let done_us = done.saturating_duration_since(self.start).as_micros() as u64;
        match &reply {
            Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
            Ok((true, _)) => self.allowed.fetch_add(1, Ordering::Relaxed),
            Ok((false, _)) => self.denied.fetch_add(1, Ordering::Relaxed),
        };
        self.done.fetch_add(1, Ordering::Relaxed);
        self.recorders[conn % SHARDS]
            .lock()
            .record(k, &reply, sent_us, done_us, latency_us);
    }
}

/// What a run saw, how long it took (until the last answer), and when it started by the wall
/// clock: the timeline's second 0, for tools that line it up with their own events (the soak).
pub struct Run {
    pub recorded: Recorder,
    pub elapsed: Duration,
    pub started: SystemTime,
    /// Leased: calls made to sluicegate and decisions answered.
    pub calls: Option<(u64, u64)>,
}

/// Runs the load.
pub async fn run(cli: &Cli, target: Target, keys: KeyChooser) -> Run {
    let slots = target.slots();
    let shared = Arc::new(Shared {
        target,
        keys,
        recorders: (0..SHARDS)
            .map(|_| {
                Mutex::new(
                    Recorder::new(slots, cli.check_bound, debt(cli))
                        .with_max_in_flight(max_in_flight(cli)),
                )
            })
            .collect(),
        start: Instant::now(),
        done: AtomicU64::new(0),
        allowed: AtomicU64::new(0),
        denied: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let started = SystemTime::now();
    let deadline = shared.start + cli.duration;
    let progress = progress_bar(cli, shared.clone());

    let mut tasks = JoinSet::new();
    match cli.rps {
        None => {
            for worker in 0..cli.concurrency {
                let shared = shared.clone();
                let connections = cli.connections;
                tasks.spawn(async move {
                    let mut rng = SmallRng::from_os_rng();
                    loop {
                        let sent = Instant::now();
                        if sent >= deadline {
                            break;
                        }
                        let (k, key) = shared.keys.pick(&mut rng);
                        shared.call(worker % connections, k, key, sent).await;
                    }
                });
            }
        }
        Some(rps) => {
            // The schedule runs on its own thread: std's sleep wakes within tens of microseconds,
            // tokio's timer only to the millisecond, which would add up to 1 ms of the client's
            // own lateness to every latency measured from the intended start.
            let interval = Duration::from_secs_f64(1.0 / rps);
            let runtime = tokio::runtime::Handle::current();
            let connections = cli.connections;
            let dispatcher = shared.clone();
            let spawned = tokio::task::spawn_blocking(move || {
                let shared = dispatcher;
                let mut rng = SmallRng::from_os_rng();
                let mut sent = 0u64;
                loop {
                    let intended = shared.start + interval.mul_f64(sent as f64);
                    if intended >= deadline {
                        return sent;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let (k, _) = shared.keys.pick(&mut rng);
                    let conn = (sent as usize) % connections;
                    let shared = shared.clone();
                    runtime.spawn(async move {
                        let key = shared.keys.name(k);
                        shared.call(conn, k, key, intended).await;
                    });
                    sent += 1;
                }
            })
            .await
            .unwrap_or(0);
            while shared.done.load(Ordering::Relaxed) < spawned {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = shared.start.elapsed();
    let calls = shared.target.finish().await;
    if let Some((task, bar)) = progress {
        task.abort();
        bar.finish_and_clear();
    }

    let mut total =
        Recorder::new(slots, cli.check_bound, debt(cli)).with_max_in_flight(max_in_flight(cli));
    for r in &shared.recorders {
        let part = std::mem::replace(&mut *r.lock(), Recorder::new(slots, false, 0.0));
        total.merge(part);
    }
    Run {
        recorded: total,
        elapsed,
        started,
        calls,
    }
}

/// How many capacities of debt the bound allows: a settled cost may exceed what was left, down
/// to -capacity.
fn debt(cli: &Cli) -> f64 {
    if cli.api == crate::cli::Api::Settle {
        1.0
    } else {
        0.0
    }
}

/// The in-flight bound to check (concurrency).
fn max_in_flight(cli: &Cli) -> Option<u32> {
    (cli.api == crate::cli::Api::Concurrency).then_some(cli.max_in_flight)
}

/// A progress bar on stderr when it is a terminal; nothing on a pipe.
fn progress_bar(
    cli: &Cli,
    shared: Arc<Shared>,
) -> Option<(tokio::task::JoinHandle<()>, ProgressBar)> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let total_ms = cli.duration.as_millis() as u64;
    let bar = ProgressBar::new(total_ms);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let handle = bar.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let elapsed = shared.start.elapsed();
            let done = shared.done.load(Ordering::Relaxed);
            bar.set_position((elapsed.as_millis() as u64).min(total_ms));
            bar.set_message(format!(
                "{done} requests ({:.0}/s)  allowed {}  denied {}  errors {}",
                done as f64 / elapsed.as_secs_f64().max(1e-3),
                shared.allowed.load(Ordering::Relaxed),
                shared.denied.load(Ordering::Relaxed),
                shared.errors.load(Ordering::Relaxed),
            ));
        }
    });
    Some((task, handle))
}
