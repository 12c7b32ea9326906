//! `sluicegate.v1` Acquire, Release and Renew: in-flight (concurrency) limits, at most
//! `max_in_flight` leases per key, each freed by Release or by its TTL.
//!
//! A key's leases live apart from its token buckets (`|in_flight` after the key), so the same key
//! can carry a rate and an in-flight limit. Lease ids are 128 random bits: whoever knows one can
//! release it, so it must not be guessable. The limit is what each call says: callers naming one
//! key with different maxima share its leases, each refused once its own maximum is reached.

use std::{sync::Arc, time::Instant};

use super::ApiError;
use super::pipeline::Fallback;
use super::should_allow::{MAX_KEY_BYTES, reservation_id};
use crate::telemetry::{Activity, DecisionMetrics, InFlightMetrics, names};
use sluicegate_core::backend::{Backend, LeaseRequest};
use sluicegate_core::{FailureMode, InFlight, LeaseOp, MAX_LEASE_ID_BYTES, MAX_LEASE_MS};
use sluicegate_proto::sluicegate::v1::{
    AcquireRequest, AcquireResponse, ReleaseRequest, ReleaseResponse, RenewRequest,
};

/// A lease lasts this long when the caller leaves `lease_ttl_ms` at 0.
pub const DEFAULT_LEASE_MS: u32 = 60_000;

/// The backend key of a caller's in-flight limit: apart from any token bucket of the same key
/// (those end in `|capacity/rate`, a number; this never does).
pub fn in_flight_key(prefix: &str, key: &str) -> String {
    let mut k = String::with_capacity(prefix.len() + key.len() + 10);
    k.push_str(prefix);
    k.push_str(key);
    k.push_str("|in_flight");
    k
}

/// Acquire, Release and Renew over any backend.
pub(crate) struct InFlightApi<B> {
    backend: Arc<B>,
    prefix: String,
    fallback: Fallback,
    decisions: DecisionMetrics,
    leases: InFlightMetrics,
    released: metrics::Counter,
    unknown: metrics::Counter,
}

impl<B: Backend> InFlightApi<B> {
    pub fn new(
        backend: Arc<B>,
        prefix: String,
        failure_mode: FailureMode,
        activity: Arc<Activity>,
    ) -> Self {
        let release = |result: &'static str| metrics::counter!(names::RELEASES, "api" => "concurrency", "result" => result);
        Self {
            backend,
            prefix,
            fallback: Fallback::new(failure_mode),
            decisions: DecisionMetrics::new("concurrency", activity),
            leases: InFlightMetrics::new("sluicegate.v1", "Acquire"),
            released: release("released"),
            unknown: release("unknown"),
        }
    }

    pub async fn acquire(&self, req: &AcquireRequest) -> Result<AcquireResponse, ApiError> {
        let started = Instant::now();
        let key = self.key(&req.key)?;
        if req.max_in_flight == 0 {
            return Err(ApiError::invalid(
                "max_in_flight",
                "must be at least 1 (how many leases the key may hold at once)",
            ));
        }
        let ttl_ms = ttl("lease_ttl_ms", req.lease_ttl_ms)?;
        let id = reservation_id();
        // Not paired: a refused caller gets no id, so no release follows.
        let op = LeaseOp::Acquire {
            max: req.max_in_flight,
            ttl_ms,
            paired: false,
        };
        let answer = self.call(&key, &id, op).await;
        if let Ok(a) = &answer {
            if a.done {
                self.leases.granted();
            }
            self.leases.freed(false, a.expired);
        }
        self.decisions
            .record(answer.as_ref().ok().map(|a| a.done), started);
        self.answer(answer, id)
    }

    pub async fn renew(&self, req: &RenewRequest) -> Result<AcquireResponse, ApiError> {
        let key = self.key(&req.key)?;
        let id = lease_id(&req.lease_id)?;
        let ttl_ms = ttl("lease_ttl_ms", req.lease_ttl_ms)?;
        let answer = self.call(&key, id, LeaseOp::Renew { ttl_ms }).await;
        if let Ok(a) = &answer {
            self.leases.freed(false, a.expired);
        }
        self.answer(answer, id.to_string())
    }

    pub async fn release(&self, req: &ReleaseRequest) -> Result<ReleaseResponse, ApiError> {
        let key = self.key(&req.key)?;
        let id = lease_id(&req.lease_id)?;
        // A release is no decision: FAILURE_MODE has nothing to say. UNAVAILABLE lets the caller
        // retry; otherwise the lease's TTL frees the slot.
        let a = self.call(&key, id, LeaseOp::Release).await?;
        self.leases.freed(a.done, a.expired);
        if a.done {
            self.released.increment(1);
        } else {
            self.unknown.increment(1);
        }
        Ok(ReleaseResponse {
            released: a.done,
            in_flight: a.in_flight,
        })
    }

    async fn call(
        &self,
        key: &str,
        id: &str,
        op: LeaseOp,
    ) -> Result<InFlight, sluicegate_core::backend::BackendError> {
        self.backend.lease(LeaseRequest { key, id, op }).await
    }

    /// An Acquire's or Renew's answer; a backend failure is FAILURE_MODE's (a granted lease then
    /// carries an id that Release accepts and finds unknown).
    fn answer(
        &self,
        answer: Result<InFlight, sluicegate_core::backend::BackendError>,
        id: String,
    ) -> Result<AcquireResponse, ApiError> {
        match answer {
            Ok(a) => Ok(AcquireResponse {
                granted: a.done,
                lease_id: if a.done { id } else { String::new() },
                in_flight: a.in_flight,
                retry_after_ms: a.retry_after_ms,
                degraded: false,
            }),
            Err(e) => match self.fallback.verdict(&e) {
                Some(granted) => Ok(AcquireResponse {
                    granted,
                    lease_id: if granted { id } else { String::new() },
                    retry_after_ms: if granted { 0 } else { 1000 },
                    degraded: true,
                    ..Default::default()
                }),
                None => Err(ApiError::Backend(e)),
            },
        }
    }

    fn key(&self, key: &str) -> Result<String, ApiError> {
        if key.is_empty() {
            return Err(ApiError::invalid("key", "must not be empty"));
        }
        if key.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(
                "key",
                format!("must be at most {MAX_KEY_BYTES} bytes, got {}", key.len()),
            ));
        }
        Ok(in_flight_key(&self.prefix, key))
    }
}

fn lease_id(id: &str) -> Result<&str, ApiError> {
    if !sluicegate_core::lease_id_ok(id) {
        return Err(ApiError::invalid(
            "lease_id",
            format!(
                "must be 1 to {MAX_LEASE_ID_BYTES} bytes without control characters (the id \
                 Acquire answered), got {} bytes",
                id.len()
            ),
        ));
    }
    Ok(id)
}

fn ttl(field: &'static str, ms: u32) -> Result<u32, ApiError> {
    match ms {
        0 => Ok(DEFAULT_LEASE_MS),
        ms if ms > MAX_LEASE_MS => Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_LEASE_MS} (a day; renew a longer lease), got {ms}"),
        )),
        ms => Ok(ms),
    }
}
