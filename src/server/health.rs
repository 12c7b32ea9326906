//! Readiness, for `/readyz`, `/healthcheck` and gRPC health (the README's "Operating it").
//!
//! Not ready: while shutting down; and while the backend is unreachable, judged on several
//! consecutive failed pings (one missed ping is not an outage), unless FAILURE_MODE answers for
//! it (`allow`, `deny`): then the replica still answers every call and stays ready. On a cluster a
//! ping succeeds while any master answers: one dead shard never takes a replica out.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use sluicegate_core::backend::Backend;
use sluicegate_proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::SERVICE_NAME as RLQS_SERVICE;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_service_server::SERVICE_NAME as ENVOY_SERVICE;
use sluicegate_proto::sluicegate::v1::rate_limit_service_server::SERVICE_NAME as SLUICEGATE_SERVICE;

/// gRPC services reported by health, besides the server as a whole ("").
const HEALTH_SERVICES: &[&str] = &["", SLUICEGATE_SERVICE, ENVOY_SERVICE, RLQS_SERVICE];
/// How often the backend is probed.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Consecutive failed pings before the backend counts as unreachable (1.5 s at 500 ms).
const FAILED_PINGS: u32 = 3;

/// What readiness is made of; cheap to read from any task.
pub struct Health {
    reporter: HealthReporter,
    backend_up: AtomicBool,
    failed_pings: AtomicU32,
    shutting_down: AtomicBool,
    /// FAILURE_MODE answers calls while the backend is away: stay ready.
    answers_without_backend: bool,
}

impl Health {
    pub async fn new(reporter: HealthReporter, answers_without_backend: bool) -> Arc<Self> {
        let h = Arc::new(Self {
            reporter,
            backend_up: AtomicBool::new(false),
            failed_pings: AtomicU32::new(0),
            shutting_down: AtomicBool::new(false),
            answers_without_backend,
        });
        h.publish().await;
        h
    }

    /// Whether this replica should get traffic.
    pub fn ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Relaxed)
            && (self.answers_without_backend || self.backend_up.load(Ordering::Relaxed))
    }

    /// Whether the backend answered its latest pings (for the status page).
    pub fn backend_up(&self) -> bool {
        self.backend_up.load(Ordering::Relaxed)
    }

    /// Shutdown began: not ready from now on, whatever the backend does.
    pub async fn shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.publish().await;
    }

    async fn publish(&self) {
        let status = if self.ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in HEALTH_SERVICES {
            self.reporter.set_service_status(*service, status).await;
        }
    }

    /// Probes the backend until `stop`, and publishes readiness when it changes.
    pub fn spawn_monitor<B: Backend>(
        self: &Arc<Self>,
        backend: B,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut first = true;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let result = backend.ping().await;
                let was_up = health.backend_up.load(Ordering::Relaxed);
                let was_ready = health.ready();
                match result {
                    Ok(()) => {
                        health.failed_pings.store(0, Ordering::Relaxed);
                        health.backend_up.store(true, Ordering::Relaxed);
                        if !was_up && !first {
                            tracing::info!("backend reachable again");
                        }
                    }
                    Err(e) => {
                        let failed = health.failed_pings.fetch_add(1, Ordering::Relaxed) + 1;
                        // At start the backend is unreachable until it answers; afterwards it
                        // takes several misses in a row. The first pings at start race the
                        // connection being made: worth a warning only when they keep failing.
                        if (failed >= FAILED_PINGS || first) && was_up {
                            tracing::warn!(error = %e, failed, "backend unreachable");
                            health.backend_up.store(false, Ordering::Relaxed);
                        } else if !was_up && failed == FAILED_PINGS {
                            tracing::warn!(error = %e, failed, "backend not reachable yet");
                        } else {
                            tracing::debug!(error = %e, failed, "backend ping failed");
                        }
                    }
                }
                first = false;
                if health.ready() != was_ready {
                    health.publish().await;
                }
            }
        })
    }
}
