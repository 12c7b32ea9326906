//! `envoy.service.rate_limit_quota.v3.RateLimitQuotaService/StreamRateLimitQuotas`: Envoy's
//! quota protocol (RLQS), so Envoy decides each request locally and no request waits for a call.
//!
//! Each Envoy streams usage reports for its quota buckets; this replica matches each bucket to a
//! rule (walking the rule tree with the bucket id's pairs), and answers with the Envoy's share of
//! the rule's bucket as a `token_bucket` assignment, sized by its demand against the fleet's
//! (`sluicegate_core::quota`). Replicas exchange their Envoys' demand through the backend once per
//! interval, so the shares of every Envoy on every replica add up to the rule.
//!
//! - `fleet.rs`: the state (streams, buckets, demand, what was sent) and its three changes:
//!   a report, an exchange, a stream's end;
//! - `assign.rs`: assignments as Envoy 1.40's protos say them;
//! - here: the streams, and the exchange task.
//!
//! A stream never fails because of what a bucket id holds (Envoy relays request attributes in
//! it): values are bytes, buckets past the tracking cap still get a floor share, and a report's
//! only effect on the stream is its answer.

mod assign;
mod fleet;

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use sluicegate_core::backend::{Backend, DemandShare};
use sluicegate_core::quota::Fleet;
use sluicegate_proto::envoy::service::rate_limit_quota::v3::{
    RateLimitQuotaResponse, RateLimitQuotaUsageReports,
    rate_limit_quota_service_server::RateLimitQuotaService,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use fleet::{BucketView, EXCHANGE_EVERY, Quotas, StreamView};

use crate::telemetry::names;

/// The largest usage report a quota stream takes (GRPC_MAX_MESSAGE_BYTES when larger). A
/// periodic report carries every bucket the Envoy holds, and their number is its clients' to
/// choose (a bucket per header value): a report refused for its size would end the stream at
/// every report, and every bucket on that Envoy would lose its assignment. 16 MiB holds some
/// 50,000 buckets with 256-byte values; one report at a time per stream.
pub const MAX_REPORT_BYTES: usize = 16 << 20;

/// The RLQS service: one per server, sharing [`Quotas`] with the exchange task.
pub struct RlqsApi {
    quotas: Arc<Quotas>,
    /// Fired at shutdown: every stream ends, so Envoys reconnect elsewhere (their assignments
    /// stand until their TTL meanwhile).
    stop: CancellationToken,
}

impl RlqsApi {
    pub fn new(quotas: Arc<Quotas>, stop: CancellationToken) -> Self {
        Self { quotas, stop }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<RateLimitQuotaResponse, Status>> + Send>>;

#[tonic::async_trait]
impl RateLimitQuotaService for RlqsApi {
    type StreamRateLimitQuotasStream = Responses;

    async fn stream_rate_limit_quotas(
        &self,
        request: Request<Streaming<RateLimitQuotaUsageReports>>,
    ) -> Result<Response<Responses>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        let inbound = request.into_inner();
        let (outbox, rx) = mpsc::channel(fleet::STREAM_BUFFER);
        let id = self.quotas.open(peer, outbox.clone());
        tokio::spawn(serve_stream(
            self.quotas.clone(),
            id,
            inbound,
            outbox,
            self.stop.clone(),
        ));
        let responses =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// Reads one stream's reports and answers each, until Envoy ends it, the connection goes, or
/// the server stops.
async fn serve_stream(
    quotas: Arc<Quotas>,
    id: u64,
    mut inbound: Streaming<RateLimitQuotaUsageReports>,
    outbox: fleet::Outbox,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = outbox.closed() => break,
            _ = stop.cancelled() => break,
        };
        let reports = match message {
            Ok(Some(reports)) => reports,
            Ok(None) => break,
            Err(status) => {
                tracing::debug!(%status, "RLQS stream ended with an error");
                break;
            }
        };
        if let Some(response) = quotas.report(id, reports)
            && outbox.send(Ok(response)).await.is_err()
        {
            break;
        }
    }
    quotas.close(id);
}

/// Every [`EXCHANGE_EVERY`]: publishes this replica's demand, reads the fleet's, and pushes the
/// assignments that moved. Runs until `stop`.
pub fn spawn_exchange<B: Backend>(
    quotas: Arc<Quotas>,
    backend: Arc<B>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXCHANGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Logged when it starts failing and when it recovers, not every second in between.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match exchange(&quotas, &*backend).await {
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "RLQS: the demand exchange failed; shares stand until they go stale (15 s), then none is sent");
                }
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("RLQS: the demand exchange works again");
                }
                _ => {}
            }
        }
    })
}

/// The most rule buckets in one script call: Redis runs a script alone, so a replica with many
/// buckets (one per user, say) exchanges them in several short calls rather than one long one.
const EXCHANGE_CHUNK: usize = 1_000;

/// One exchange: publish, read back, rebalance, push. An error is the backend's message (the
/// pushes that do not need it are made anyway, and the shares stand until they go stale).
pub async fn exchange<B: Backend>(quotas: &Quotas, backend: &B) -> Result<(), String> {
    let (demand, mut pushes) = quotas.demand();
    let fleets = publish(quotas, backend, &demand).await;
    let failed = fleets.as_ref().err().cloned();
    pushes.extend(quotas.rebalance(fleets.ok()));
    for (outbox, response) in pushes {
        // A stream that does not read its pushes misses them; its next report is answered.
        let _ = outbox.try_send(Ok(response));
    }
    failed.map_or(Ok(()), Err)
}

/// Publishes this replica's demand and reads the fleet's, [`EXCHANGE_CHUNK`] buckets per call;
/// all or nothing (a partial view would misplace shares).
async fn publish<B: Backend>(
    quotas: &Quotas,
    backend: &B,
    demand: &[(String, f64, u32)],
) -> Result<Vec<(String, u32, Fleet)>, String> {
    let ttl_ms = fleet::PUBLISHED_TTL.as_millis() as u64;
    let mut out = Vec::with_capacity(demand.len());
    for chunk in demand.chunks(EXCHANGE_CHUNK) {
        let shares: Vec<DemandShare<'_>> = chunk
            .iter()
            .map(|(key, d, n)| DemandShare {
                key,
                demand: *d,
                participants: *n,
            })
            .collect();
        match backend
            .exchange_demand(&quotas.replica, ttl_ms, &shares)
            .await
        {
            Ok(fleets) => {
                metrics::counter!(names::RLQS_EXCHANGES, "outcome" => "ok").increment(1);
                out.extend(
                    chunk
                        .iter()
                        .zip(fleets)
                        .map(|((key, _, n), f)| (key.clone(), *n, f)),
                );
            }
            Err(e) => {
                metrics::counter!(names::RLQS_EXCHANGES, "outcome" => "error").increment(1);
                return Err(e.message);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluicegate_core::backend::{
        BackendError, BucketRequest, LeaseRequest, MemoryBackend, SettleRequest, Settled,
    };
    use sluicegate_core::{Decision, InFlight};

    /// The memory backend, counting demand exchanges and the buckets in each.
    struct Counting {
        inner: MemoryBackend,
        calls: std::sync::Mutex<Vec<usize>>,
    }

    impl Backend for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
            self.inner.decide(req).await
        }
        async fn decide_group(
            &self,
            reqs: &[BucketRequest<'_>],
            all_or_nothing: bool,
        ) -> Vec<Result<Decision, BackendError>> {
            self.inner.decide_group(reqs, all_or_nothing).await
        }
        async fn settle(&self, req: SettleRequest<'_>) -> Result<Settled, BackendError> {
            self.inner.settle(req).await
        }
        async fn lease(&self, req: LeaseRequest<'_>) -> Result<InFlight, BackendError> {
            self.inner.lease(req).await
        }
        async fn ping(&self) -> Result<(), BackendError> {
            Ok(())
        }
        async fn exchange_demand(
            &self,
            replica: &str,
            ttl_ms: u64,
            shares: &[DemandShare<'_>],
        ) -> Result<Vec<Fleet>, BackendError> {
            self.calls.lock().unwrap().push(shares.len());
            self.inner.exchange_demand(replica, ttl_ms, shares).await
        }
    }

    #[tokio::test]
    async fn many_buckets_are_exchanged_in_short_calls_and_come_back_in_order() {
        let backend = Counting {
            inner: MemoryBackend::new(1_000),
            calls: Default::default(),
        };
        let demand: Vec<(String, f64, u32)> = (0..2_500)
            .map(|i| (format!("k{i}"), i as f64, 1 + i % 3))
            .collect();
        let rules = Arc::new(sluicegate_core::rules::RulesHandle::none());
        let quotas = Quotas::new(rules, "p:", Arc::default());
        let fleets = publish(&quotas, &backend, &demand).await.unwrap();
        assert_eq!(*backend.calls.lock().unwrap(), [1_000, 1_000, 500]);
        assert_eq!(fleets.len(), 2_500);
        for (i, (key, published, fleet)) in fleets.iter().enumerate() {
            assert_eq!(key, &format!("k{i}"));
            assert_eq!(*published, 1 + i as u32 % 3);
            assert_eq!(fleet.demand, i as f64);
        }
    }
}
