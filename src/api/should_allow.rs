//! `sluicegate.v1.RateLimitService`: ShouldAllow (one key, one bucket, one decision),
//! ShouldAllowBatch (several, optionally all or nothing) and Settle (the real cost of a
//! reservation, after the work).

use std::{sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::ApiError;
use super::in_flight::InFlightApi;
use super::pipeline::{Fallback, compensate};
use crate::telemetry::{Activity, DecisionMetrics, ShedMetrics, decision_log};
use sluicegate_core::backend::{
    Backend, BackendError, BucketRequest, Reserve, SettleRequest as SettleBucket, Settled,
};
use sluicegate_core::{Decision, FailureMode, Limits, Op, Shape};
use sluicegate_proto::sluicegate::v1::{
    AcquireRequest, AcquireResponse, ReleaseRequest, ReleaseResponse, RenewRequest, SettleRequest,
    SettleResponse, ShouldAllowBatchRequest, ShouldAllowBatchResponse, ShouldAllowRequest,
    ShouldAllowResponse, rate_limit_service_server::RateLimitService,
};

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 512;

/// The longest a reservation may wait for its Settle: a day.
pub const MAX_RESERVE_TTL_MS: u32 = 86_400_000;

/// A fresh reservation id: 128 random bits in hex. Whoever knows it can settle the reservation
/// (once), so it must not be guessable.
pub(crate) fn reservation_id() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

/// How the sluicegate.v1 API answers: what it fills in for what a request leaves out, and what it
/// refuses.
#[derive(Clone, Debug)]
pub struct ShouldAllowSettings {
    pub shape: Shape,
    pub limits: Limits,
    pub bucket_prefix: String,
    pub failure_mode: FailureMode,
    pub shadow_mode: bool,
    /// ALLOW_CLIENT_SHAPES: callers may choose capacity and rate.
    pub allow_client_shapes: bool,
    /// ALLOW_REFUNDS: a Settle below its reservation gives the difference back.
    pub allow_refunds: bool,
    /// MAX_BATCH: the most requests in one ShouldAllowBatch.
    pub max_batch: usize,
}

impl ShouldAllowSettings {
    /// The README's defaults for `shape`, with `bucket_prefix`.
    pub fn new(shape: Shape, bucket_prefix: impl Into<String>) -> Self {
        Self {
            shape,
            limits: Limits::default(),
            bucket_prefix: bucket_prefix.into(),
            failure_mode: FailureMode::Error,
            shadow_mode: false,
            allow_client_shapes: true,
            allow_refunds: false,
            max_batch: 100,
        }
    }
}

/// Tokens as an answer shows them: to a thousandth, rounded down, so that the refill's float noise
/// (4.241261540000014) does not reach callers and no answer shows a token that is not there (not
/// even a hair above the capacity: 5.749999999825832 shows 5.749, never 5.75). The buckets keep
/// the exact figure.
pub fn shown(tokens: f64) -> f64 {
    // A figure already written with three decimals or fewer (4.1, whose product with 1000 is
    // 4099.999...) is shown as it is.
    let milli = tokens * 1000.0;
    if milli.round() / 1000.0 == tokens {
        return tokens;
    }
    // The product can round up onto the next thousandth (5.749999999999999 * 1000 = 5750.0):
    // then one thousandth below it.
    let down = milli.floor() / 1000.0;
    if down > tokens {
        (milli.floor() - 1.0) / 1000.0
    } else {
        down
    }
}

/// The backend key of a caller's key with a shape: a bucket's identity is its key and its shape,
/// so a caller naming someone's key with another shape (a huge rate, say) gets a bucket of its own
/// and can neither refill nor drain theirs. `prefix`, the key, then `|capacity/rate`: the suffix
/// has no `|`, so the last one splits any key unambiguously.
pub fn bucket_key(prefix: &str, key: &str, shape: Shape) -> String {
    use std::fmt::Write as _;
    let mut bucket = String::with_capacity(prefix.len() + key.len() + 24);
    bucket.push_str(prefix);
    bucket.push_str(key);
    let _ = write!(bucket, "|{}/{}", shape.capacity(), shape.rate());
    bucket
}

/// A checked request: its bucket key (prefix included), shape and operation, and the reservation
/// it asks for (id, TTL).
struct Parsed {
    key: String,
    shape: Shape,
    op: Op,
    reserve: Option<(String, u32)>,
}

impl Parsed {
    fn bucket(&self) -> BucketRequest<'_> {
        BucketRequest {
            reserve: self.reserve.as_ref().map(|(id, ttl_ms)| Reserve {
                id,
                ttl_ms: *ttl_ms,
            }),
            ..BucketRequest::new(&self.key, self.shape, self.op)
        }
    }

    /// The reservation id to answer with: only when the tokens were really taken (not by a take
    /// its all-or-nothing batch vetoed).
    fn reservation_id(&self, d: &Decision) -> String {
        match &self.reserve {
            Some((id, _)) if d.granted > 0 => id.clone(),
            _ => String::new(),
        }
    }
}

/// The sluicegate.v1 service over any backend.
pub struct ShouldAllowApi<B> {
    /// Shared with compensations that outlive their caller.
    backend: Arc<B>,
    settings: ShouldAllowSettings,
    /// Where decisions are seen (status page, top keys, near-limit ratio).
    activity: Arc<Activity>,
    metrics: DecisionMetrics,
    fallback: Fallback,
    shed: ShedMetrics,
    /// Acquire, Release and Renew, on the same backend.
    in_flight: InFlightApi<B>,
}

impl<B: Backend> ShouldAllowApi<B> {
    pub fn new(backend: B, settings: ShouldAllowSettings) -> Self {
        Self::with_activity(backend, settings, Arc::default())
    }

    /// The same, reporting what it decides to `activity` (the status page's, shared with the
    /// other API).
    pub fn with_activity(
        backend: B,
        settings: ShouldAllowSettings,
        activity: Arc<Activity>,
    ) -> Self {
        let backend = Arc::new(backend);
        let in_flight = InFlightApi::new(
            backend.clone(),
            settings.bucket_prefix.clone(),
            settings.failure_mode,
            activity.clone(),
        );
        Self {
            backend,
            in_flight,
            metrics: DecisionMetrics::new("should_allow", activity.clone()),
            fallback: Fallback::new(settings.failure_mode),
            settings,
            activity,
            shed: ShedMetrics::default(),
        }
    }

    /// The bucket a key and shape name. `at` says which request of a batch, for error messages.
    fn bucket_of(
        &self,
        key: &str,
        capacity: f64,
        rate: f64,
        at: Option<usize>,
    ) -> Result<(String, Shape), ApiError> {
        let which = at.map(|i| format!("request {i}: ")).unwrap_or_default();
        if key.is_empty() {
            return Err(ApiError::invalid(
                "key",
                format!("{which}must not be empty"),
            ));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(
                "key",
                format!(
                    "{which}must be at most {MAX_KEY_BYTES} bytes, got {}",
                    key.len()
                ),
            ));
        }
        let d = &self.settings;
        if !d.allow_client_shapes && (capacity != 0.0 || rate != 0.0) {
            return Err(ApiError::PermissionDenied(format!(
                "capacity, rate: {which}this server sets bucket shapes itself \
                 (ALLOW_CLIENT_SHAPES=false); leave both at 0"
            )));
        }
        let capacity = if capacity == 0.0 {
            d.shape.capacity()
        } else {
            capacity
        };
        let rate = if rate == 0.0 { d.shape.rate() } else { rate };
        let shape = Shape::within(capacity, rate, &d.limits).map_err(|e| {
            // 0 is a valid answer to "greater than 0?" here: it asks for the default.
            let zero = if e.reason.starts_with("must be a finite") {
                ", or 0 for the server's default"
            } else {
                ""
            };
            ApiError::invalid(e.field, format!("{which}{}{zero}", e.reason))
        })?;
        Ok((bucket_key(&d.bucket_prefix, key, shape), shape))
    }

    /// Checks a ShouldAllow request and turns it into a bucket operation.
    fn parse(&self, req: &ShouldAllowRequest, at: Option<usize>) -> Result<Parsed, ApiError> {
        let (key, shape) = self.bucket_of(&req.key, req.capacity, req.rate, at)?;
        let cost = req.cost.max(1);
        // Up to: whatever the bucket holds is granted, so any cost may be asked.
        if f64::from(cost) > shape.capacity() && !req.up_to {
            let which = at.map(|i| format!("request {i}: ")).unwrap_or_default();
            return Err(ApiError::invalid(
                "cost",
                format!(
                    "{which}{cost} exceeds the bucket capacity {} and could never be allowed",
                    shape.capacity()
                ),
            ));
        }
        let op = match (req.dry_run, req.up_to) {
            // Answers as a request of this cost would be answered (at least 1 token; up to: one
            // token is enough).
            (true, false) => Op::Check(u64::from(cost)),
            (true, true) => Op::Check(1),
            (false, false) => Op::Take(u64::from(cost)),
            (false, true) => Op::TakeUpTo(u64::from(cost)),
        };
        if req.reserve_ttl_ms > MAX_RESERVE_TTL_MS {
            let which = at.map(|i| format!("request {i}: ")).unwrap_or_default();
            return Err(ApiError::invalid(
                "reserve_ttl_ms",
                format!(
                    "{which}{} ms is longer than a reservation may wait ({MAX_RESERVE_TTL_MS} ms)",
                    req.reserve_ttl_ms
                ),
            ));
        }
        // A dry run takes nothing: there is nothing to reserve.
        let reserve = (req.reserve_ttl_ms > 0 && !req.dry_run)
            .then(|| (reservation_id(), req.reserve_ttl_ms));
        Ok(Parsed {
            key,
            shape,
            op,
            reserve,
        })
    }

    /// What every decision goes through on its way out: near the limit?, the decision log, and the
    /// top-keys sketch when denied.
    fn observe(&self, key: &str, p: &Parsed, d: &Decision) {
        let activity = &self.activity;
        if activity.is_near_limit(d, p.shape.capacity()) {
            self.metrics.near_limit();
        }
        decision_log::should_allow(activity.denial_sampler(), key, p.op.cost(), d);
        if !d.allowed {
            activity.denied_str(key);
        }
    }

    /// The answer to a decision; shadow mode: the bucket was charged and the decision counted,
    /// the caller is never held.
    fn answer(&self, d: &Decision, shape: Shape, reservation_id: String) -> ShouldAllowResponse {
        let allowed = d.allowed || self.settings.shadow_mode;
        ShouldAllowResponse {
            allowed,
            tokens_remaining: shown(d.tokens_remaining),
            retry_after_ms: if allowed { 0 } else { d.retry_after_ms },
            reset_after_ms: d.reset_after_ms,
            capacity: shape.capacity(),
            rate: shape.rate(),
            degraded: false,
            reservation_id,
            granted: u32::try_from(d.granted).unwrap_or(u32::MAX),
        }
    }

    /// FAILURE_MODE's answer, flagged degraded (SHADOW_MODE holds for a deny too).
    fn degraded(&self, allowed: bool, shape: Shape) -> ShouldAllowResponse {
        ShouldAllowResponse {
            allowed: allowed || self.settings.shadow_mode,
            capacity: shape.capacity(),
            rate: shape.rate(),
            degraded: true,
            ..Default::default()
        }
    }

    /// Decides one request: the whole of ShouldAllow but the proto envelope.
    pub async fn should_allow(
        &self,
        req: &ShouldAllowRequest,
    ) -> Result<ShouldAllowResponse, ApiError> {
        let started = Instant::now();
        let p = self.parse(req, None)?;
        match self.backend.decide(p.bucket()).await {
            Ok(d) => {
                self.metrics.record(Some(d.allowed), started);
                self.metrics.local([&d]);
                self.observe(&req.key, &p, &d);
                Ok(self.answer(&d, p.shape, p.reservation_id(&d)))
            }
            Err(e) => {
                self.metrics.record(None, started);
                match self.fallback.verdict(&e) {
                    Some(allowed) => Ok(self.degraded(allowed, p.shape)),
                    None => Err(ApiError::Backend(e)),
                }
            }
        }
    }

    /// Decides several requests in one call, in order; with `all_or_nothing` a denial of any
    /// charges none.
    pub async fn should_allow_batch(
        &self,
        req: &ShouldAllowBatchRequest,
    ) -> Result<ShouldAllowBatchResponse, ApiError> {
        let started = Instant::now();
        let parsed = self.parse_batch(req)?;
        let buckets: Vec<BucketRequest<'_>> = parsed.iter().map(Parsed::bucket).collect();
        let results = self
            .backend
            .decide_group(&buckets, req.all_or_nothing)
            .await;

        let fallback = match results.iter().find_map(|r| r.as_ref().err()) {
            None => None,
            Some(e) => match self.fallback.verdict(e) {
                Some(allowed) => Some(allowed),
                None => {
                    self.metrics.record(None, started);
                    // No answer: nothing of an all-or-nothing group may stay charged.
                    if req.all_or_nothing {
                        compensate(&self.backend, &buckets, &results).await;
                    }
                    return Err(ApiError::Backend(e.clone()));
                }
            },
        };
        let responses = self.batch_answers(req, &parsed, &results, fallback);
        let allowed = responses.iter().all(|r| r.allowed);
        if req.all_or_nothing && fallback == Some(false) {
            compensate(&self.backend, &buckets, &results).await;
        }
        self.metrics.time(started);
        Ok(ShouldAllowBatchResponse { responses, allowed })
    }

    /// The batch's requests, checked: none, or more than MAX_BATCH, is refused as a whole.
    fn parse_batch(&self, req: &ShouldAllowBatchRequest) -> Result<Vec<Parsed>, ApiError> {
        if req.requests.is_empty() {
            return Err(ApiError::invalid("requests", "must not be empty"));
        }
        if req.requests.len() > self.settings.max_batch {
            self.shed.bounds.increment(1);
            let size = format!(
                "{} requests, more than MAX_BATCH ({})",
                req.requests.len(),
                self.settings.max_batch
            );
            return Err(ApiError::out_of_bounds("requests", size));
        }
        req.requests
            .iter()
            .enumerate()
            .map(|(i, r)| self.parse(r, Some(i)))
            .collect()
    }

    /// One answer per request of the batch, each counted and observed.
    fn batch_answers(
        &self,
        req: &ShouldAllowBatchRequest,
        parsed: &[Parsed],
        results: &[Result<Decision, BackendError>],
        fallback: Option<bool>,
    ) -> Vec<ShouldAllowResponse> {
        // All or nothing and not all taken: nothing was charged (or what was is refunded), so no
        // reservation stands.
        let reservations =
            !req.all_or_nothing || results.iter().all(|r| r.as_ref().is_ok_and(|d| d.allowed));
        let answer = |((r, p), request): (
            (&Result<Decision, BackendError>, &Parsed),
            &ShouldAllowRequest,
        )| match r {
            Ok(d) => {
                self.metrics.count(Some(d.allowed));
                self.metrics.local([d]);
                self.observe(&request.key, p, d);
                let id = if reservations {
                    p.reservation_id(d)
                } else {
                    String::new()
                };
                self.answer(d, p.shape, id)
            }
            Err(_) => {
                self.metrics.count(None);
                self.degraded(fallback.unwrap_or(false), p.shape)
            }
        };
        results
            .iter()
            .zip(parsed)
            .zip(&req.requests)
            .map(answer)
            .collect()
    }

    /// Settles a reservation: less than reserved refunds the difference (capped at capacity),
    /// more charges it whatever is left (down to -capacity: debt). With a reservation id, at most
    /// what that reservation took comes back, once; without, `reserved` is the caller's word, so a
    /// refund needs ALLOW_REFUNDS.
    pub async fn settle(&self, req: &SettleRequest) -> Result<SettleResponse, ApiError> {
        let started = Instant::now();
        let (key, shape) = self.bucket_of(&req.key, req.capacity, req.rate, None)?;
        let settled = if req.reservation_id.is_empty() {
            self.settle_unreserved(&key, shape, req).await
        } else {
            self.backend
                .settle(SettleBucket {
                    key: &key,
                    shape,
                    id: &req.reservation_id,
                    actual: req.actual,
                })
                .await
                .map_err(SettleError::Backend)
        };
        self.metrics.time(started);
        match settled {
            Ok(Settled::Done {
                tokens_remaining,
                reset_after_ms,
            }) => Ok(SettleResponse {
                tokens_remaining: shown(tokens_remaining),
                reset_after_ms,
                in_debt: tokens_remaining < 0.0,
                degraded: false,
            }),
            Ok(Settled::NotFound) => Err(ApiError::NotFound(format!(
                "reservation_id: no reservation {:?} for this key and shape (unknown, expired, or \
                 made for another bucket)",
                req.reservation_id
            ))),
            Err(SettleError::Api(e)) => Err(e),
            Err(SettleError::Backend(e)) => match self.fallback.verdict(&e) {
                Some(_) => Ok(SettleResponse {
                    degraded: true,
                    ..Default::default()
                }),
                None => Err(ApiError::Backend(e)),
            },
        }
    }

    /// A Settle without a reservation: `reserved` is taken on the caller's word.
    async fn settle_unreserved(
        &self,
        key: &str,
        shape: Shape,
        req: &SettleRequest,
    ) -> Result<Settled, SettleError> {
        if req.actual < req.reserved && !self.settings.allow_refunds {
            return Err(SettleError::Api(ApiError::PermissionDenied(
                "actual: below the reservation would refund the difference, and refunds without \
                 a reservation_id are disabled on this server (ALLOW_REFUNDS=false): reserve with \
                 reserve_ttl_ms and settle its reservation_id"
                    .into(),
            )));
        }
        let op = sluicegate_core::backend::settle_op(req.reserved, req.actual);
        let d = self
            .backend
            .decide(BucketRequest::new(key, shape, op))
            .await?;
        Ok(Settled::Done {
            tokens_remaining: d.tokens_remaining,
            reset_after_ms: d.reset_after_ms,
        })
    }
}

/// Why a Settle did not settle: the request, or the backend.
enum SettleError {
    Api(ApiError),
    Backend(BackendError),
}

impl From<BackendError> for SettleError {
    fn from(e: BackendError) -> Self {
        SettleError::Backend(e)
    }
}

#[tonic::async_trait]
impl<B: Backend> RateLimitService for ShouldAllowApi<B> {
    async fn should_allow(
        &self,
        request: Request<ShouldAllowRequest>,
    ) -> Result<Response<ShouldAllowResponse>, Status> {
        let answer = ShouldAllowApi::should_allow(self, request.get_ref()).await?;
        Ok(Response::new(answer))
    }

    async fn should_allow_batch(
        &self,
        request: Request<ShouldAllowBatchRequest>,
    ) -> Result<Response<ShouldAllowBatchResponse>, Status> {
        let answer = ShouldAllowApi::should_allow_batch(self, request.get_ref()).await?;
        Ok(Response::new(answer))
    }

    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        let answer = ShouldAllowApi::settle(self, request.get_ref()).await?;
        Ok(Response::new(answer))
    }

    async fn acquire(
        &self,
        request: Request<AcquireRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let answer = self.in_flight.acquire(request.get_ref()).await?;
        Ok(Response::new(answer))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let answer = self.in_flight.release(request.get_ref()).await?;
        Ok(Response::new(answer))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<AcquireResponse>, Status> {
        let answer = self.in_flight.renew(request.get_ref()).await?;
        Ok(Response::new(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn answers_show_tokens_to_a_thousandth_never_more_than_there_are() {
        assert_eq!(shown(4.241261540000014), 4.241);
        assert_eq!(shown(4.1), 4.1);
        // Noise just below a thousandth rounds down: never a token that is not there.
        assert_eq!(shown(4.099_999_999_999_999), 4.099);
        assert_eq!(
            shown(0.9996),
            0.999,
            "rounded down: no token that is not there"
        );
        assert_eq!(shown(-0.0004), -0.001, "debt rounds away from zero");
        // Found by fuzzing: a full bucket of an odd capacity never shows more than it holds.
        for capacity in [5.749999999825832, 5.749_999_999_999_999, 1e15 - 0.1] {
            assert!(
                shown(capacity) <= capacity,
                "{capacity}: {}",
                shown(capacity)
            );
            assert!(
                capacity - shown(capacity) < 0.002,
                "{capacity}: {}",
                shown(capacity)
            );
        }
        assert_eq!(shown(20.0), 20.0);
        assert_eq!(shown(1e15), 1e15);
    }
}
