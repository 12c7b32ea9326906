//! Wires sluicegate together: the backend, the gRPC services behind one layer stack, health and
//! reflection, the HTTP listener, and graceful shutdown.
//!
//! - `debug.rs`: the status page and /debug/* (what an operator can look at);
//! - `health.rs`: readiness (and gRPC health) from backend pings and shutdown;
//! - `http.rs`: the HTTP port's routes;
//! - `limits.rs`: bounded work on the gRPC port (deadlines, waiting, calls in progress, what was
//!   shed);
//! - `adaptive.rs`: the adaptive concurrency limit (AIMD on measured latency);
//! - `shed_answer.rs`: FAILURE_MODE's answer to a shed Envoy call (never an error Envoy fails
//!   open on);
//! - `tls.rs`: TLS and mTLS on the gRPC port, certificates reloaded when they change;
//! - `handshakes.rs`: admission of TLS handshakes (a timeout, a cap per peer, the oldest cut when
//!   full), so idle connections cannot keep new clients out.

mod adaptive;
mod conn;
mod debug;
mod handshakes;
mod health;
mod http;
mod limits;
mod shed_answer;
mod tls;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use handshakes::Handshakes;
use health::Health;
use http::HttpState;
use limits::LimitLayer;
use tls::Tls;

use crate::api::{EnvoyApi, Quotas, RlqsApi, ShouldAllowApi, spawn_exchange};
use crate::config::{GrpcSettings, RedisSettings, Settings, Storage};
use crate::telemetry::{
    Activity, MetricsHandle, ReloadMetrics, Timed, eviction_counters, install_metrics,
    redis_metrics,
};
use sluicegate_core::backend::{Backend, MemoryBackend, RedisBackend, redis::RedisOptions};
use sluicegate_core::rules::{ReloadObserver, RulesHandle};
use sluicegate_proto::envoy::service::rate_limit_quota::v3::rate_limit_quota_service_server::RateLimitQuotaServiceServer as RlqsServer;
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyServer;
use sluicegate_proto::sluicegate::v1::rate_limit_service_server::RateLimitServiceServer;

/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections, and how long an answer may take before the peer is dropped.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a whole call on the server side, whatever the client asked.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); a
/// client past it waits in its own queue, which is backpressure, not an error (Envoy opens another
/// connection). Unbounded (tonic's default), a busy client's requests pile up in the server's
/// buffers, all answered too late. 128 answered the most within a 20 ms deadline at twice the
/// sustainable rate of the three tried (32, 128, 1024; `scripts/bench.sh overload`).
const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// The connection's flow-control window. h2 keeps a budget of unread small DATA frames (a gRPC
/// request is one) of half this window, charging up to 256 bytes each, and ends the connection
/// with GOAWAY ENHANCE_YOUR_CALM ("too_many_data_frames") past it: the frames of the streams
/// reset while waiting (below) count too. 8 MiB: room for 16,384 such frames, twice the resets
/// allowed.
const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
/// Streams a client may have reset before the server took them up, at once per connection. A
/// reset stream leaves the client's count of open streams at once but waits in the server's
/// accept queue until the connection task gets its turn: on a busy machine, a client whose
/// deadlines pass (Envoy's 20 ms) resets streams faster than the server accepts them. h2's
/// default (20; 1,024 was still tripped by 10,000 calls with two busy cores) guards against the
/// rapid-reset attack by ending the connection with GOAWAY ENHANCE_YOUR_CALM ("too_many_resets"),
/// which fails every call on it. A reset stream waiting costs a few hundred bytes. Under a
/// sustained overload that starves the connection task (measured: four times the rate a server
/// held to a quarter of a core sustains), resets can still outrun accepts and reach this bound.
const PENDING_RESETS_PER_CONNECTION: usize = 8192;
/// How often idle memory buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Runs sluicegate on already-bound listeners until `shutdown` is cancelled, then lets in-flight
/// calls finish within SHUTDOWN_GRACE_SECS.
pub async fn run(
    settings: Settings,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Once, redacted: what this replica runs with, for whoever reads the log after an incident.
    tracing::info!(config = %serde_json::Value::Object(settings.effective.clone()), "effective configuration");
    let metrics = install_metrics();
    // rediss:// needs a TLS crypto provider; rustls takes the first one installed process-wide.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rules = Arc::new(load_rules(settings.rules.as_deref())?);
    sluicegate_core::rules::spawn_watcher(rules.clone(), shutdown.clone());
    let activity = Arc::new(Activity::new(settings.top_keys, settings.near_limit_ratio));
    let parts = Parts {
        rules,
        activity,
        metrics,
    };
    match &settings.storage {
        Storage::Memory { max_buckets } => {
            tracing::info!(
                max_buckets,
                "no REDIS_URL: buckets live in this process's memory"
            );
            let memory =
                MemoryBackend::new(*max_buckets).with_eviction_counters(eviction_counters());
            let memory = Arc::new(memory);
            memory.spawn_sweeper(SWEEP_EVERY, shutdown.clone());
            serve(settings, memory, parts, grpc, http, shutdown).await
        }
        Storage::Redis(redis) => {
            let backend = redis_backend(redis, settings.grpc.max_queue, &parts.activity)?;
            serve(settings, backend, parts, grpc, http, shutdown).await
        }
    }
}

/// What the APIs and the HTTP port share, whatever the backend.
struct Parts {
    rules: Arc<RulesHandle>,
    activity: Arc<Activity>,
    metrics: MetricsHandle,
}

/// RULES, loaded and watched; without them every Envoy descriptor is answered OK.
fn load_rules(path: Option<&std::path::Path>) -> anyhow::Result<RulesHandle> {
    let Some(path) = path else {
        tracing::warn!("no RULES: Envoy requests are answered OK for every descriptor (no limits)");
        return Ok(RulesHandle::none());
    };
    let reloads = ReloadMetrics::default();
    let observer: ReloadObserver = Arc::new(move |ok| reloads.record(ok));
    let handle =
        RulesHandle::load(path, Some(observer)).map_err(|e| anyhow::anyhow!("RULES: {e}"))?;
    let count = handle.current().map_or(0, |s| s.rules().len());
    tracing::info!(path = %path.display(), rules = count, "rules loaded; watching for changes");
    Ok(handle)
}

fn redis_backend(
    redis: &RedisSettings,
    max_queue: Duration,
    activity: &Arc<Activity>,
) -> anyhow::Result<RedisBackend> {
    tracing::info!(redis = %redis.url, kind = ?redis.topology, timeout_ms = redis.timeout.as_millis(), "using Redis");
    let options = RedisOptions {
        topology: redis.topology,
        timeout: redis.timeout,
        connections: redis.connections,
        deny_cache: redis.deny_cache,
        leases: redis.leases,
        max_queue,
        tls: redis.tls.clone(),
        metrics: redis_metrics(activity.clone()),
    };
    RedisBackend::with_options(redis.url.expose(), options)
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

async fn serve<B: Backend>(
    settings: Settings,
    backend: B,
    parts: Parts,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backend = Arc::new(Timed::new(backend));
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    // Stops the listeners and the background tasks; fired after readiness went down.
    let stop = CancellationToken::new();

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let answers_anyway = settings.envoy.failure_mode.fallback_allowed().is_some();
    let health = Health::new(reporter, answers_anyway).await;
    let monitor = health.spawn_monitor(backend.clone(), stop.clone());
    let upkeep = spawn_upkeep(parts.metrics.clone(), stop.clone());

    let quotas = Arc::new(Quotas::new(
        parts.rules.clone(),
        &settings.envoy.key_prefix,
        parts.activity.clone(),
    ));
    let exchange = spawn_exchange(quotas.clone(), backend.clone(), stop.clone());
    let grpc_server = grpc_server(
        &settings,
        &backend,
        &parts,
        &quotas,
        health_service,
        grpc,
        &stop,
    )?;
    let debug = settings.http.debug_endpoints.then(|| debug::DebugState {
        activity: parts.activity.clone(),
        rules: parts.rules.clone(),
        health: health.clone(),
        config: Arc::new(settings.effective.clone()),
        backend: backend.name(),
        show_keys: settings.http.show_keys,
        allowed_hosts: Arc::new(settings.http.allowed_hosts.clone()),
        quotas: quotas.clone(),
        leases: {
            let backend = backend.clone();
            Arc::new(move || backend.leases())
        },
    });
    let http_app = http::router(HttpState {
        metrics: parts.metrics,
        health: health.clone(),
        debug,
    });
    let http_server =
        axum::serve(http, http_app).with_graceful_shutdown(stop.clone().cancelled_owned());

    tracing::info!(%grpc_addr, %http_addr, backend = backend.name(), tls = settings.grpc.tls.is_some(), "sluicegate listening");
    let mut grpc_task = tokio::spawn(grpc_server);
    let mut http_task = tokio::spawn(async move { http_server.await });

    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut grpc_task => anyhow::bail!("gRPC server stopped: {:?}", r),
        r = &mut http_task => anyhow::bail!("HTTP server stopped: {:?}", r),
    }

    // Tell load balancers first (not ready, NOT_SERVING), keep answering for
    // SHUTDOWN_DELAY_SECS while they take it in, then stop accepting and let calls in flight
    // finish within SHUTDOWN_GRACE_SECS.
    health.shutting_down().await;
    if !settings.shutdown_delay.is_zero() {
        tracing::info!(
            delay_secs = settings.shutdown_delay.as_secs(),
            "shutting down: not ready, still serving"
        );
        tokio::time::sleep(settings.shutdown_delay).await;
    }
    let grace = settings.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight calls"
    );
    stop.cancel();
    let drained = tokio::time::timeout(grace, async { (grpc_task.await, http_task.await) }).await;
    monitor.abort();
    upkeep.abort();
    exchange.abort();
    // After the last decision: leases go back to their buckets (one call per Redis node).
    if tokio::time::timeout(
        settings.shutdown_grace.max(Duration::from_secs(1)),
        backend.close(),
    )
    .await
    .is_err()
    {
        tracing::warn!("leases not all given back in time; their tokens come back by refill");
    }
    match drained {
        Ok((grpc, http)) => {
            grpc.context("gRPC server task")?.context("gRPC server")?;
            http.context("HTTP server task")?.context("HTTP server")?;
            tracing::info!("shut down cleanly");
        }
        Err(_) => tracing::warn!(
            grace_secs = grace.as_secs(),
            "calls still in flight after the grace period; stopping anyway"
        ),
    }
    Ok(())
}

/// Folds histogram samples into buckets every UPKEEP_EVERY until `stop`.
fn spawn_upkeep(metrics: MetricsHandle, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => metrics.run_upkeep(),
            }
        }
    })
}

type GrpcServer = futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>>;

/// The gRPC port: both APIs, health and reflection behind one layer stack, over TLS when set.
fn grpc_server<B: Backend>(
    settings: &Settings,
    backend: &Arc<Timed<B>>,
    parts: &Parts,
    quotas: &Arc<Quotas>,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    grpc: TcpListener,
    stop: &CancellationToken,
) -> anyhow::Result<GrpcServer> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(sluicegate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;

    let g: &GrpcSettings = &settings.grpc;
    let should_allow = ShouldAllowApi::with_activity(
        backend.clone(),
        settings.should_allow.clone(),
        parts.activity.clone(),
    );
    let should_allow =
        RateLimitServiceServer::new(should_allow).max_decoding_message_size(g.max_message_bytes);
    let envoy = EnvoyApi::with_activity(
        backend.clone(),
        parts.rules.clone(),
        settings.envoy.clone(),
        parts.activity.clone(),
    );
    let envoy = EnvoyServer::new(envoy).max_decoding_message_size(g.max_message_bytes);
    let rlqs = RlqsServer::new(RlqsApi::new(quotas.clone(), stop.clone()))
        .max_decoding_message_size(g.max_message_bytes.max(crate::api::MAX_REPORT_BYTES));

    // One stack for every service: a server-side deadline, a global bound on calls in progress
    // (beyond it RESOURCE_EXHAUSTED at once, never a queue), keepalives that drop dead peers, and
    // an optional maximum connection age (GOAWAY, so clients spread over new replicas).
    let mut builder = tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_EVERY))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_pending_accept_reset_streams(Some(PENDING_RESETS_PER_CONNECTION));
    // The age alone: tonic's grace would replace the GOAWAY at the age with a cut at age + grace
    // (`conn.rs` makes that cut instead).
    if let Some(age) = g.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let lifetime = g
        .max_connection_age
        .map(|age| age + settings.shutdown_grace);
    let router = builder
        .layer(
            LimitLayer::new(g.max_concurrent_requests, g.max_queue)
                .envoy_failure_mode(settings.envoy.failure_mode.fallback_allowed()),
        )
        .add_service(should_allow)
        .add_service(envoy)
        .add_service(rlqs)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let stopped = stop.clone().cancelled_owned();
    let goaways = Arc::new(conn::GoawayCounters::default());
    Ok(match &g.tls {
        None => Box::pin(
            router.serve_with_incoming_shutdown(
                TcpIncoming::from(grpc)
                    .with_nodelay(Some(true))
                    .map(conn::watch(&goaways, lifetime)),
                stopped,
            ),
        ),
        Some(tls) => {
            let tls = Tls::load(tls.clone()).map_err(anyhow::Error::msg)?;
            tls.spawn_watcher(stop.clone());
            let shed = crate::telemetry::ShedMetrics::default();
            let gate = Arc::new(Handshakes::counted(shed.handshake, shed.handshake_cut));
            let incoming = tls
                .incoming(grpc, gate, stop.clone())
                .map(conn::watch(&goaways, lifetime));
            Box::pin(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    })
}

/// Waits for SIGTERM or SIGINT (the binaries' shutdown trigger).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
