//! Wires tollgate together: the backend, the gRPC services behind one layer stack, health and
//! reflection, the HTTP listener (`/metrics` and the probes), and graceful shutdown.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::api::{Defaults, EnvoyApi, EnvoySettings, ShouldAllowApi};
use crate::backend::{
    Backend, MemoryBackend, RedisBackend,
    redis::{RedisOptions, RedisTls, Topology},
};
use crate::config::{RedisType, ServeArgs};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitServiceServer as EnvoyServer, SERVICE_NAME as ENVOY_SERVICE,
};
use crate::proto::tollgate::v1::rate_limit_service_server::{
    RateLimitServiceServer, SERVICE_NAME as TOLLGATE_SERVICE,
};
use crate::rules::{ReloadObserver, RulesHandle};
use crate::telemetry::{
    METRICS_CONTENT_TYPE, MetricsHandle, ReloadMetrics, Timed, eviction_counters, install_metrics,
    redis_metrics,
};

/// gRPC services reported by health, besides the server as a whole ("").
const HEALTH_SERVICES: &[&str] = &["", TOLLGATE_SERVICE, ENVOY_SERVICE];
/// How often the backend is probed for health and readiness.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// Largest number of calls in progress per connection; more wait (load shedding answers the rest).
const CONCURRENCY_PER_CONNECTION: usize = 1024;
/// The deadline of a whole call on the server side, whatever the client asked.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often idle memory buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Runs tollgate on already-bound listeners until `shutdown` is cancelled, then lets in-flight
/// calls finish within SHUTDOWN_GRACE_SECS.
pub async fn run(
    args: ServeArgs,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let metrics = install_metrics();
    // rediss:// needs a TLS crypto provider; rustls takes the first one installed process-wide.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rules = Arc::new(match &args.rules {
        Some(path) => {
            let reloads = ReloadMetrics::default();
            let observer: ReloadObserver = Arc::new(move |ok| reloads.record(ok));
            let handle = RulesHandle::load(path, Some(observer))
                .map_err(|e| anyhow::anyhow!("RULES: {e}"))?;
            let count = handle.current().map_or(0, |s| s.rules().len());
            tracing::info!(path = %path.display(), rules = count, "rules loaded; watching for changes");
            handle
        }
        None => {
            tracing::warn!(
                "no RULES: Envoy requests are answered OK for every descriptor (no limits)"
            );
            RulesHandle::none()
        }
    });
    crate::rules::spawn_watcher(rules.clone(), shutdown.clone());
    let default_shape = args.default_shape().map_err(anyhow::Error::msg)?;
    let defaults = Defaults {
        shape: default_shape,
        limits: args.limits(),
        bucket_prefix: args.bucket_prefix.clone(),
        failure_mode: args.failure_mode,
        shadow_mode: args.shadow_mode,
        allow_client_shapes: args.allow_client_shapes,
        allow_refunds: args.allow_refunds,
        max_batch: args.max_batch as usize,
    };
    match &args.redis_url {
        None => {
            tracing::info!(
                max_buckets = args.memory_max_buckets,
                "no REDIS_URL: buckets live in this process's memory"
            );
            let max = usize::try_from(args.memory_max_buckets).unwrap_or(usize::MAX);
            let memory =
                Arc::new(MemoryBackend::new(max).with_eviction_counters(eviction_counters()));
            memory.spawn_sweeper(SWEEP_EVERY, shutdown.clone());
            serve(args, memory, defaults, rules, metrics, grpc, http, shutdown).await
        }
        Some(url) => {
            tracing::info!(redis = %url, kind = ?args.redis_type, timeout_ms = args.redis_timeout_ms, "using Redis");
            let options = RedisOptions {
                topology: match args.redis_type {
                    RedisType::Single => Topology::Single,
                    RedisType::Cluster => Topology::Cluster,
                    RedisType::Sentinel => Topology::Sentinel,
                },
                timeout: args.redis_timeout(),
                connections: args.redis_connections as usize,
                deny_cache: args.local_deny_cache,
                tls: RedisTls {
                    ca_cert: args.redis_tls_cacert.clone(),
                    client_cert: args.redis_tls_client_cert.clone(),
                    client_key: args.redis_tls_client_key.clone(),
                },
                metrics: redis_metrics(),
            };
            let redis = RedisBackend::with_options(url.expose(), options)
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            serve(args, redis, defaults, rules, metrics, grpc, http, shutdown).await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve<B: Backend>(
    args: ServeArgs,
    backend: B,
    defaults: Defaults,
    rules: Arc<RulesHandle>,
    metrics: MetricsHandle,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let backend = Arc::new(Timed::new(backend));
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let ready = Arc::new(AtomicBool::new(false));
    // Stops the listeners; fired only after health says NOT_SERVING.
    let stop = CancellationToken::new();

    let monitor = tokio::spawn(watch_backend(
        backend.clone(),
        health.clone(),
        ready.clone(),
        stop.clone(),
    ));
    let upkeep = {
        let metrics = metrics.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => metrics.run_upkeep(),
                }
            }
        })
    };

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;

    let should_allow = ShouldAllowApi::new(backend.clone(), defaults);
    let envoy = EnvoyApi::new(
        backend.clone(),
        rules,
        EnvoySettings {
            key_prefix: args.rls_key_prefix.clone(),
            failure_mode: args.failure_mode,
            shadow_mode: args.shadow_mode,
            charge_on_deny: args.charge_on_deny,
            allow_refunds: args.allow_refunds,
            max_descriptors: args.max_descriptors as usize,
            max_key_bytes: args.max_key_bytes as usize,
        },
    );
    let grpc_server = tonic::transport::Server::builder()
        // One stack for every service: a server-side deadline, a bound on calls in flight per
        // connection, and shedding (UNAVAILABLE) instead of queueing without end.
        .timeout(CALL_TIMEOUT)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .load_shed(true)
        .tcp_nodelay(true)
        .add_service(RateLimitServiceServer::new(should_allow))
        .add_service(EnvoyServer::new(envoy))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        );

    let http_app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "OK" }))
        .route("/readyz", get(readiness))
        .route("/healthcheck", get(healthcheck))
        .with_state(HttpState {
            metrics,
            ready: ready.clone(),
        });
    let http_server =
        axum::serve(http, http_app).with_graceful_shutdown(stop.clone().cancelled_owned());

    tracing::info!(%grpc_addr, %http_addr, backend = backend.name(), "tollgate listening");
    let mut grpc_task = tokio::spawn(grpc_server);
    let mut http_task = tokio::spawn(async move { http_server.await });

    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut grpc_task => anyhow::bail!("gRPC server stopped: {:?}", r),
        r = &mut http_task => anyhow::bail!("HTTP server stopped: {:?}", r),
    }

    // Tell load balancers first, then stop accepting; calls in flight carry on.
    tracing::info!(
        grace_secs = args.shutdown_grace_secs,
        "shutting down: draining in-flight calls"
    );
    ready.store(false, Ordering::Relaxed);
    set_health(&health, ServingStatus::NotServing).await;
    stop.cancel();
    let drained = tokio::time::timeout(args.shutdown_grace(), async {
        let grpc = grpc_task.await;
        let http = http_task.await;
        (grpc, http)
    })
    .await;
    monitor.abort();
    upkeep.abort();
    match drained {
        Ok((grpc, http)) => {
            grpc.context("gRPC server task")?.context("gRPC server")?;
            http.context("HTTP server task")?.context("HTTP server")?;
            tracing::info!("shut down cleanly");
            Ok(())
        }
        Err(_) => {
            tracing::warn!(
                grace_secs = args.shutdown_grace_secs,
                "calls still in flight after the grace period; stopping anyway"
            );
            Ok(())
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(*service, status).await;
    }
}

/// Probes the backend and mirrors its reachability into gRPC health and `/readyz`.
async fn watch_backend<B: Backend>(
    backend: B,
    health: HealthReporter,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = match backend.ping().await {
            Ok(()) => true,
            Err(e) => {
                if last != Some(false) {
                    tracing::warn!(error = %e, "backend unreachable: health NOT_SERVING");
                }
                false
            }
        };
        if stop.is_cancelled() {
            return;
        }
        if last != Some(ok) {
            if ok && last.is_some() {
                tracing::info!("backend reachable again: health SERVING");
            }
            ready.store(ok, Ordering::Relaxed);
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&health, status).await;
            last = Some(ok);
        }
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: MetricsHandle,
    ready: Arc<AtomicBool>,
}

async fn render_metrics(State(state): State<HttpState>) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        state.metrics.render(),
    )
}

async fn readiness(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "OK")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "backend unreachable or shutting down",
        )
    }
}

/// envoyproxy/ratelimit's probe: 200 `OK`, or 500 when unhealthy.
async fn healthcheck(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "unhealthy")
    }
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
