//! Wires sluicegate together: the backend, the gRPC services behind one layer stack, health and
//! reflection, the HTTP listener, and graceful shutdown.
//!
//! - `debug.rs`: the status page and /debug/* (what an operator can look at);
//! - `health.rs`: readiness (and gRPC health) from backend pings and shutdown;
//! - `http.rs`: the HTTP port's routes;
//! - `limits.rs`: bounded work on the gRPC port (calls in progress, what was shed);
//! - `tls.rs`: TLS and mTLS on the gRPC port, certificates reloaded when they change.

mod debug;
mod health;
mod http;
mod limits;
mod tls;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use health::Health;
use http::HttpState;
use limits::LimitLayer;
use tls::{Tls, TlsSettings};

use crate::api::{Defaults, EnvoyApi, EnvoySettings, HeaderNames, ShouldAllowApi};
use crate::config::{RedisType, ServeArgs};
use crate::telemetry::{
    Activity, MetricsHandle, ReloadMetrics, Timed, eviction_counters, install_metrics,
    redis_metrics,
};
use sluicegate_core::backend::{
    Backend, MemoryBackend, RedisBackend,
    redis::{RedisOptions, RedisTls, Topology},
};
use sluicegate_core::rules::{ReloadObserver, RulesHandle};
use sluicegate_proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer as EnvoyServer;
use sluicegate_proto::sluicegate::v1::rate_limit_service_server::RateLimitServiceServer;

/// How often histogram samples are folded into buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections, and how long an answer may take before the peer is dropped.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// The deadline of a whole call on the server side, whatever the client asked.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often idle memory buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Runs sluicegate on already-bound listeners until `shutdown` is cancelled, then lets in-flight
/// calls finish within SHUTDOWN_GRACE_SECS.
pub async fn run(
    args: ServeArgs,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    // Once, redacted: what this replica runs with, for whoever reads the log after an incident.
    tracing::info!(config = %serde_json::Value::Object(args.effective()), "effective configuration");
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
    sluicegate_core::rules::spawn_watcher(rules.clone(), shutdown.clone());
    let default_shape = args.default_shape().map_err(anyhow::Error::msg)?;
    let activity = Arc::new(Activity::new(args.top_keys as usize, args.near_limit_ratio));
    let defaults = Defaults {
        shape: default_shape,
        limits: args.limits(),
        bucket_prefix: args.bucket_prefix.clone(),
        failure_mode: args.failure_mode,
        shadow_mode: args.shadow_mode,
        allow_client_shapes: args.allow_client_shapes,
        allow_refunds: args.allow_refunds,
        max_batch: args.max_batch as usize,
        activity: activity.clone(),
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
                metrics: redis_metrics(activity.clone()),
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
    // Stops the listeners and the background tasks; fired after readiness went down.
    let stop = CancellationToken::new();

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let answers_anyway = args.failure_mode.fallback_allowed().is_some();
    let health = Health::new(reporter, answers_anyway).await;
    let monitor = health.spawn_monitor(backend.clone(), stop.clone());
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
            .register_encoded_file_descriptor_set(sluicegate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;

    let max_message = args.grpc_max_message_bytes as usize;
    let activity = defaults.activity.clone();
    let should_allow = RateLimitServiceServer::new(ShouldAllowApi::new(backend.clone(), defaults))
        .max_decoding_message_size(max_message);
    let envoy = EnvoyServer::new(EnvoyApi::new(
        backend.clone(),
        rules.clone(),
        EnvoySettings {
            key_prefix: args.rls_key_prefix.clone(),
            failure_mode: args.failure_mode,
            shadow_mode: args.shadow_mode,
            charge_on_deny: args.charge_on_deny,
            allow_refunds: args.allow_refunds,
            allow_client_shapes: args.allow_client_shapes,
            max_descriptors: args.max_descriptors as usize,
            max_key_bytes: args.max_key_bytes as usize,
            response_headers: args.limit_response_headers_enabled.then(|| HeaderNames {
                limit: args.limit_limit_header.clone(),
                remaining: args.limit_remaining_header.clone(),
                reset: args.limit_reset_header.clone(),
            }),
            dynamic_metadata: args.response_dynamic_metadata,
            activity: activity.clone(),
        },
    ))
    .max_decoding_message_size(max_message);

    // One stack for every service: a server-side deadline, a global bound on calls in progress
    // (beyond it RESOURCE_EXHAUSTED at once, never a queue), keepalives that drop dead peers, and
    // an optional maximum connection age (GOAWAY, so clients spread over new replicas).
    let mut builder = tonic::transport::Server::builder()
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(KEEPALIVE_EVERY))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if args.grpc_max_connection_age_secs > 0 {
        builder = builder
            .max_connection_age(Duration::from_secs(args.grpc_max_connection_age_secs))
            .max_connection_age_grace(args.shutdown_grace());
    }
    let router = builder
        .layer(LimitLayer::new(args.max_concurrent_requests as usize))
        .add_service(should_allow)
        .add_service(envoy)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let grpc_server: futures::future::BoxFuture<'static, Result<(), tonic::transport::Error>> =
        match tls_settings(&args) {
            None => Box::pin(router.serve_with_incoming_shutdown(
                TcpIncoming::from(grpc).with_nodelay(Some(true)),
                stop.clone().cancelled_owned(),
            )),
            Some(settings) => {
                let tls = Tls::load(settings).map_err(anyhow::Error::msg)?;
                tls.spawn_watcher(stop.clone());
                let incoming = tls.incoming(grpc, stop.clone());
                Box::pin(
                    router.serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
                )
            }
        };

    let debug = args.debug_endpoints.then(|| debug::DebugState {
        activity: activity.clone(),
        rules,
        health: health.clone(),
        config: Arc::new(args.effective()),
        backend: backend.name(),
        show_keys: args.debug_show_keys,
        allowed_hosts: Arc::new(args.allowed_hosts()),
    });
    let http_app = http::router(HttpState {
        metrics,
        health: health.clone(),
        debug,
    });
    let http_server =
        axum::serve(http, http_app).with_graceful_shutdown(stop.clone().cancelled_owned());

    tracing::info!(%grpc_addr, %http_addr, backend = backend.name(), tls = args.grpc_tls, "sluicegate listening");
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
    if !args.shutdown_delay().is_zero() {
        tracing::info!(
            delay_secs = args.shutdown_delay_secs,
            "shutting down: not ready, still serving"
        );
        tokio::time::sleep(args.shutdown_delay()).await;
    }
    tracing::info!(
        grace_secs = args.shutdown_grace_secs,
        "shutting down: draining in-flight calls"
    );
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

/// TLS settings of the gRPC port, when GRPC_SERVER_USE_TLS (validated: cert and key are set).
fn tls_settings(args: &ServeArgs) -> Option<TlsSettings> {
    if !args.grpc_tls {
        return None;
    }
    Some(TlsSettings {
        cert: args.grpc_tls_cert.clone()?,
        key: args.grpc_tls_key.clone()?,
        client_ca: args.grpc_client_ca.clone(),
        client_sans: args.grpc_client_san.clone(),
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
