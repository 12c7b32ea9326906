//! The Envoy API's decisions at the edges, in process (the wire is covered by `envoy_api.rs`):
//! all or nothing, CHARGE_ON_DENY, failures confined to their descriptors, shadow rules at 0,
//! 0-hit checks and debt, overrides without rules, and the bounds.

use std::{sync::Arc, time::Instant};

use crate::support::envoy::{OK, OVER, descriptor, request};
use sluicegate::api::{ApiError, EnvoyApi, EnvoySettings};
use sluicegate_core::backend::{Backend, BackendError, BucketRequest, ErrorKind, MemoryBackend};
use sluicegate_core::rules::RulesHandle;
use sluicegate_core::{Decision, FailureMode};
use sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;

const RULES: &str = "domain: edge
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 100 }
  - key: ip
    rate_limit: { unit: hour, requests_per_unit: 5 }
  - key: org
    rate_limit: { unit: hour, requests_per_unit: 3 }
  - key: zero
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: zero_shadow
    shadow_mode: true
    rate_limit: { unit: second, requests_per_unit: 0, name: zs }
  - key: watched
    shadow_mode: true
    rate_limit: { unit: hour, requests_per_unit: 1 }
  - key: tokens
    debt: true
    rate_limit: { unit: hour, requests_per_unit: 10 }
";

/// A memory backend whose buckets fail when their key contains "fail".
struct Flaky(MemoryBackend);

fn broken() -> BackendError {
    BackendError {
        backend: "redis",
        kind: ErrorKind::Timeout,
        message: "test: this key's node is down".into(),
    }
}

impl Backend for Flaky {
    fn name(&self) -> &'static str {
        "flaky"
    }
    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        if req.key.contains("fail") {
            return Err(broken());
        }
        self.0.decide(req).await
    }
    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        // The healthy ones decide together (as one node would); the others fail.
        let healthy: Vec<BucketRequest<'_>> = reqs
            .iter()
            .filter(|r| !r.key.contains("fail"))
            .copied()
            .collect();
        let mut answers = self
            .0
            .decide_group(&healthy, all_or_nothing)
            .await
            .into_iter();
        reqs.iter()
            .map(|r| {
                if r.key.contains("fail") {
                    Err(broken())
                } else {
                    answers.next().unwrap()
                }
            })
            .collect()
    }
    async fn settle(
        &self,
        req: sluicegate_core::backend::SettleRequest<'_>,
    ) -> Result<sluicegate_core::backend::Settled, BackendError> {
        self.0.settle(req).await
    }
    async fn lease(
        &self,
        req: sluicegate_core::backend::LeaseRequest<'_>,
    ) -> Result<sluicegate_core::InFlight, BackendError> {
        if req.key.contains("fail") {
            return Err(broken());
        }
        self.0.lease(req).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

struct Api {
    api: EnvoyApi<Arc<Flaky>>,
    backend: Arc<Flaky>,
    _dir: tempfile::TempDir,
}

fn api_with(rules: Option<&str>, tune: impl FnOnce(&mut EnvoySettings)) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let handle = match rules {
        Some(text) => {
            let path = dir.path().join("rules.yaml");
            std::fs::write(&path, text).unwrap();
            RulesHandle::load(&path, None).unwrap()
        }
        None => RulesHandle::none(),
    };
    let mut settings = EnvoySettings::new("tb:rls:");
    tune(&mut settings);
    let backend = Arc::new(Flaky(MemoryBackend::new(10_000)));
    Api {
        api: EnvoyApi::new(backend.clone(), Arc::new(handle), settings),
        backend,
        _dir: dir,
    }
}

fn api(tune: impl FnOnce(&mut EnvoySettings)) -> Api {
    api_with(Some(RULES), tune)
}

impl Api {
    async fn ask(
        &self,
        entries: &[(&str, &str)],
    ) -> sluicegate_proto::envoy::service::ratelimit::v3::RateLimitResponse {
        let descriptors = entries.iter().map(|e| descriptor(&[*e])).collect();
        self.api
            .should_rate_limit(&request("edge", descriptors))
            .await
            .unwrap()
    }

    /// Tokens left in the bucket of a single-entry descriptor, asked without spending.
    async fn left(&self, key: &str, value: &str) -> u32 {
        let mut d = descriptor(&[(key, value)]);
        d.hits_addend = Some(0);
        let r = self
            .api
            .should_rate_limit(&request("edge", vec![d]))
            .await
            .unwrap();
        r.statuses[0].limit_remaining
    }
}

#[tokio::test]
async fn a_request_over_the_limit_charges_none_of_its_descriptors() {
    let a = api(|_| {});
    // The per-org limit (3) is the tight one; the per-user one (100) must not drain with it.
    for _ in 0..3 {
        assert_eq!(a.ask(&[("user", "u"), ("org", "o")]).await.overall_code, OK);
    }
    for _ in 0..10 {
        let r = a.ask(&[("user", "u"), ("org", "o")]).await;
        assert_eq!(r.overall_code, OVER);
        assert_eq!(
            r.statuses[0].code, OK,
            "the user descriptor is within its limit"
        );
        assert_eq!(r.statuses[1].code, OVER);
    }
    assert_eq!(
        a.left("user", "u").await,
        97,
        "denied requests charged nothing"
    );
}

#[tokio::test]
async fn charge_on_deny_charges_what_was_within_its_limit() {
    let a = api(|s| s.charge_on_deny = true);
    for _ in 0..3 {
        a.ask(&[("user", "u"), ("org", "o")]).await;
    }
    for _ in 0..10 {
        assert_eq!(
            a.ask(&[("user", "u"), ("org", "o")]).await.overall_code,
            OVER
        );
    }
    assert_eq!(
        a.left("user", "u").await,
        87,
        "envoyproxy/ratelimit's behaviour"
    );
}

#[tokio::test]
async fn a_blocked_rule_in_the_request_charges_nothing_either() {
    let a = api(|_| {});
    let r = a.ask(&[("user", "u"), ("zero", "z")]).await;
    assert_eq!(r.overall_code, OVER);
    assert_eq!(a.left("user", "u").await, 100);
}

#[tokio::test]
async fn over_limit_statuses_say_zero_remaining() {
    let a = api(|_| {});
    let mut d = descriptor(&[("ip", "i")]);
    d.hits_addend = Some(4);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d.clone()]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 1);
    d.hits_addend = Some(3);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].code, OVER);
    assert_eq!(r.statuses[0].limit_remaining, 0, "not the 1 token left");
}

#[tokio::test]
async fn a_failed_descriptor_takes_the_fallback_alone() {
    for (mode, failed_code) in [(FailureMode::Allow, OK), (FailureMode::Deny, OVER)] {
        let a = api(|s| s.failure_mode = mode);
        // Drain the org bucket: its real answer is OVER.
        for _ in 0..3 {
            a.ask(&[("org", "o")]).await;
        }
        let r = a.ask(&[("org", "o"), ("user", "fail-node")]).await;
        assert_eq!(
            r.statuses[0].code, OVER,
            "{mode:?}: a real OVER_LIMIT stays OVER_LIMIT"
        );
        assert_eq!(r.statuses[1].code, failed_code, "{mode:?}");
        assert_eq!(r.overall_code, OVER, "{mode:?}");

        // With a healthy descriptor within its limit: it keeps its real answer and figures.
        let r = a.ask(&[("ip", "x"), ("user", "fail-node")]).await;
        assert_eq!(r.statuses[0].code, OK);
        assert_eq!(r.statuses[0].limit_remaining, 4);
        assert_eq!(r.statuses[1].code, failed_code, "{mode:?}");
        if mode == FailureMode::Deny {
            // The request is over: what the healthy bucket was charged is given back.
            assert_eq!(a.left("ip", "x").await, 5);
        }
    }
    // FAILURE_MODE=error: the whole request is UNAVAILABLE (Envoy's failure_mode_deny decides),
    // and what its healthy descriptors were charged is given back: nobody got an answer.
    let a = api(|_| {});
    let err = a
        .api
        .should_rate_limit(&request(
            "edge",
            vec![descriptor(&[("ip", "e")]), descriptor(&[("user", "fail")])],
        ))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Backend(_)), "{err:?}");
    assert_eq!(a.left("ip", "e").await, 5, "nothing stays charged");
}

/// A memory backend whose refunds take a while (a slow node), to see a compensation outlive its
/// caller.
struct SlowRefunds(Flaky);

impl Backend for SlowRefunds {
    fn name(&self) -> &'static str {
        "slow-refunds"
    }
    async fn decide(&self, req: BucketRequest<'_>) -> Result<Decision, BackendError> {
        self.0.decide(req).await
    }
    async fn decide_group(
        &self,
        reqs: &[BucketRequest<'_>],
        all_or_nothing: bool,
    ) -> Vec<Result<Decision, BackendError>> {
        if reqs
            .iter()
            .all(|r| matches!(r.ask.op, sluicegate_core::Op::Refund(_)))
        {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.0.decide_group(reqs, all_or_nothing).await
    }
    async fn settle(
        &self,
        req: sluicegate_core::backend::SettleRequest<'_>,
    ) -> Result<sluicegate_core::backend::Settled, BackendError> {
        self.0.settle(req).await
    }
    async fn lease(
        &self,
        req: sluicegate_core::backend::LeaseRequest<'_>,
    ) -> Result<sluicegate_core::InFlight, BackendError> {
        self.0.lease(req).await
    }
    async fn ping(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The caller goes away (its deadline passes) while the refunds of its refused request are in
/// flight: they land all the same, no token stays spent for nobody.
#[tokio::test]
async fn a_compensation_finishes_when_its_caller_has_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let handle = RulesHandle::load(&path, None).unwrap();
    let mut settings = EnvoySettings::new("tb:rls:");
    settings.failure_mode = FailureMode::Deny;
    let api = Arc::new(EnvoyApi::new(
        Arc::new(SlowRefunds(Flaky(MemoryBackend::new(1000)))),
        Arc::new(handle),
        settings,
    ));
    let req = request(
        "edge",
        vec![
            descriptor(&[("ip", "gone")]),
            descriptor(&[("user", "fail")]),
        ],
    );
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(20),
        api.should_rate_limit(&req),
    )
    .await;
    assert!(
        gave_up.is_err(),
        "the caller left before the refunds were done"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut check = descriptor(&[("ip", "gone")]);
    check.hits_addend = Some(0);
    let r = api
        .should_rate_limit(&request("edge", vec![check]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 5, "the refund landed");
}

#[tokio::test]
async fn shadow_mode_holds_for_blocked_rules() {
    let a = api(|_| {});
    let r = a.ask(&[("zero_shadow", "z")]).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].code, OK);
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        0
    );
    // And a shadowed over-limit bucket reports OK with 0 remaining, charging the others.
    a.ask(&[("watched", "w")]).await;
    let r = a.ask(&[("watched", "w"), ("user", "v")]).await;
    assert_eq!(r.overall_code, OK);
    assert_eq!((r.statuses[0].code, r.statuses[0].limit_remaining), (OK, 0));
    assert_eq!(a.left("user", "v").await, 99);
}

#[tokio::test]
async fn zero_hits_is_ok_at_the_limit_and_over_in_debt() {
    let a = api(|_| {});
    for _ in 0..5 {
        a.ask(&[("ip", "i")]).await;
    }
    let mut d = descriptor(&[("ip", "i")]);
    d.hits_addend = Some(0);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(
        r.overall_code, OK,
        "exactly at the limit, as envoyproxy/ratelimit"
    );
    // A rule of 0 per unit blocks everything: a check against it is over too (a check-before-
    // charge flow must not be let through).
    let mut z = descriptor(&[("zero", "z")]);
    z.hits_addend = Some(0);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![z]))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OVER, "a check against a rule of 0 per unit");

    // A debt rule: charges land past the limit, then 0 hits is over until refill pays it back.
    let mut cost = descriptor(&[("tokens", "t")]);
    cost.hits_addend = Some(25);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![cost]))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].code, OVER, "the tokens were not there");
    let mut d = descriptor(&[("tokens", "t")]);
    d.hits_addend = Some(0);
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OVER, "in debt");
    let retry = r.statuses[0].duration_until_reset.unwrap();
    // -10 tokens at 10 per hour: an hour until 0.
    assert!((3_590..=3_600).contains(&retry.seconds), "{retry:?}");
}

#[tokio::test]
async fn a_limit_override_applies_in_a_domain_without_rules() {
    for rules in [Some(RULES), None] {
        let a = api_with(rules, |_| {});
        let mut d = descriptor(&[("anything", "x")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 2,
            unit: 3,
        });
        let req = request("nowhere", vec![d]);
        let codes: Vec<i32> = [(); 3].iter().map(|_| 0).collect();
        let mut got = Vec::new();
        for _ in &codes {
            got.push(a.api.should_rate_limit(&req).await.unwrap().overall_code);
        }
        assert_eq!(got, [OK, OK, OVER], "rules: {}", rules.is_some());
    }
}

#[tokio::test]
async fn past_the_bounds_is_over_limit_before_any_work() {
    let a = api(|s| {
        s.max_descriptors = 64;
        s.max_key_bytes = 1024;
    });
    // 100k descriptors: OVER_LIMIT at once (an error would be Envoy's fail-open), nothing touched.
    let many: Vec<_> = (0..100_000)
        .map(|i| descriptor(&[("user", &format!("u{i}"))]))
        .collect();
    let started = Instant::now();
    let r = a
        .api
        .should_rate_limit(&request("edge", many))
        .await
        .unwrap();
    assert!(
        started.elapsed().as_millis() < 2_000,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(r.overall_code, OVER);
    assert_eq!(r.statuses.len(), 100_000, "one status per descriptor");
    assert!(r.statuses.iter().all(|s| s.code == OVER));
    assert!(a.backend.0.is_empty());

    // One descriptor deeper than any rule tree: the whole request is OVER_LIMIT, none charged.
    let deep: Vec<(String, String)> = (0..=sluicegate::api::MAX_DESCRIPTOR_ENTRIES)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let deep: Vec<(&str, &str)> = deep.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = a
        .api
        .should_rate_limit(&request(
            "edge",
            vec![descriptor(&[("user", "u")]), descriptor(&deep)],
        ))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OVER);
    assert!(a.backend.0.is_empty(), "descriptor 0 was not charged");
}

#[tokio::test]
async fn a_value_longer_than_max_key_bytes_keeps_a_bucket_of_its_own() {
    let a = api(|s| s.max_key_bytes = 1024);
    // A 3 MB value would be a 3 MB bucket key: its digest stands in, the same for the same value.
    let huge = "v".repeat(3 << 20);
    let other = format!("{huge}w");
    for left in (0..5).rev() {
        let r = a.ask(&[("ip", &huge)]).await;
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses[0].limit_remaining, left, "5 an hour, one bucket");
    }
    assert_eq!(a.ask(&[("ip", &huge)]).await.overall_code, OVER);
    assert_eq!(
        a.ask(&[("ip", &other)]).await.overall_code,
        OK,
        "another value, another bucket"
    );
    assert_eq!(a.backend.0.len(), 2);
    // A long value no rule limits needs no bucket: answered.
    let r = a.ask(&[("unlimited_header", &huge)]).await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn bytes_that_are_not_utf8_are_values_like_any_other() {
    use sluicegate_proto::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    let a = api(|_| {});
    let raw = |value: &[u8]| RateLimitDescriptor {
        entries: vec![Entry {
            key: b"ip".to_vec(),
            value: value.to_vec(),
        }],
        ..Default::default()
    };
    for value in [&b"\xff"[..], b"\xfe", b""] {
        for left in (0..5).rev() {
            let r = a
                .api
                .should_rate_limit(&request("edge", vec![raw(value)]))
                .await
                .unwrap();
            assert_eq!(r.statuses[0].limit_remaining, left, "{value:?}");
        }
        let r = a
            .api
            .should_rate_limit(&request("edge", vec![raw(value)]))
            .await
            .unwrap();
        assert_eq!(r.overall_code, OVER, "{value:?}: limited like any value");
    }
    assert_eq!(a.backend.0.len(), 3, "0xff, 0xfe and empty: a bucket each");
}

#[tokio::test]
async fn a_descriptor_with_no_entries_is_ok_with_no_limit() {
    let a = api(|_| {});
    let r = a
        .api
        .should_rate_limit(&request(
            "edge",
            vec![descriptor(&[]), descriptor(&[("ip", "1")])],
        ))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OK);
    assert!(r.statuses[0].current_limit.is_none());
    assert!(r.statuses[1].current_limit.is_some());
}

#[tokio::test]
async fn an_override_has_a_bucket_of_its_own() {
    let a = api(|_| {});
    let drain = || async { while a.ask(&[("ip", "victim")]).await.overall_code == OK {} };
    drain().await;
    // A generous override on the same descriptor neither refills nor reads the rule's bucket.
    let mut d = descriptor(&[("ip", "victim")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 1_000_000_000,
        unit: 1,
    });
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(
        a.ask(&[("ip", "victim")]).await.overall_code,
        OVER,
        "the rule's bucket is still empty"
    );
}

#[tokio::test]
async fn without_client_shapes_an_override_is_ignored_and_the_rule_answers() {
    let a = api(|s| s.allow_client_shapes = false);
    let overridden = || {
        let mut d = descriptor(&[("ip", "o")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 1_000_000_000,
            unit: 1,
        });
        request("edge", vec![d])
    };
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(
            a.api
                .should_rate_limit(&overridden())
                .await
                .unwrap()
                .overall_code,
        );
    }
    assert_eq!(codes, [OK, OK, OK, OK, OK, OVER], "the rule's 5 an hour");
    // An override with a unit that does not exist: the rule answers too, never an error.
    let mut d = descriptor(&[("ip", "p")]);
    d.limit = Some(RateLimitOverride {
        requests_per_unit: 7,
        unit: 99,
    });
    let r = api(|_| {})
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .map(|l| l.requests_per_unit),
        Some(5)
    );
}

#[tokio::test]
async fn refunds_can_be_refused_and_are_answered_ok() {
    let a = api(|s| s.allow_refunds = false);
    for _ in 0..5 {
        a.ask(&[("ip", "r")]).await;
    }
    let mut d = descriptor(&[("ip", "r")]);
    d.hits_addend = Some(3);
    d.is_negative_hits = true;
    let r = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap();
    assert_eq!(
        r.overall_code, OK,
        "never an error: Envoy would let it through"
    );
    assert_eq!(
        a.ask(&[("ip", "r")]).await.overall_code,
        OVER,
        "nothing was given back"
    );
}

/// Envoy floors `duration_until_reset` to whole seconds for `x-ratelimit-reset`: a retry 200 ms
/// away must not read 0 on a 429 (a client honouring it would retry at once). Rounded up, at
/// least one second.
#[tokio::test]
async fn an_over_limit_status_never_says_retry_in_under_a_second() {
    let a = api(|_| {});
    let fast = || {
        let mut d = descriptor(&[("ip", "fast")]);
        d.limit = Some(RateLimitOverride {
            requests_per_unit: 5,
            unit: 1,
        });
        request("edge", vec![d])
    };
    for _ in 0..5 {
        a.api.should_rate_limit(&fast()).await.unwrap();
    }
    let r = a.api.should_rate_limit(&fast()).await.unwrap();
    assert_eq!(r.overall_code, OVER);
    let retry = r.statuses[0].duration_until_reset.unwrap();
    assert_eq!((retry.seconds, retry.nanos), (1, 0), "200 ms, rounded up");
}

const JOBS: &str = "domain: edge
descriptors:
  - key: user
    rate_limit: { unit: hour, requests_per_unit: 100 }
  - key: job
    concurrency: { max: 2, lease: 60s, name: jobs }
  - key: watched_job
    shadow_mode: true
    concurrency: { max: 1, name: watched_jobs }
";

impl Api {
    /// One request of several descriptors, each of several entries.
    async fn ask_many(
        &self,
        descriptors: &[&[(&str, &str)]],
    ) -> sluicegate_proto::envoy::service::ratelimit::v3::RateLimitResponse {
        let descriptors = descriptors.iter().map(|d| descriptor(d)).collect();
        self.api
            .should_rate_limit(&request("edge", descriptors))
            .await
            .unwrap()
    }
}

/// A concurrency rule through the Envoy API: an acquire holds a slot until its release; a request
/// refused for its slot charges none of its buckets; a release answers OK whatever it finds.
#[tokio::test]
async fn acquires_hold_slots_and_a_refused_one_charges_nothing() {
    let a = api_with(Some(JOBS), |_| {});
    let acquire = |id: &'static str| [("job", "nightly"), ("acquire", id)];
    for id in ["r1", "r2"] {
        let r = a.ask_many(&[&acquire(id), &[("user", "u")]]).await;
        assert_eq!(r.overall_code, OK, "{id}: {r:?}");
        let limit = r.statuses[0].current_limit.as_ref().unwrap();
        assert_eq!((limit.name.as_str(), limit.requests_per_unit), ("jobs", 2));
    }
    let refused = a.ask_many(&[&acquire("r3"), &[("user", "u")]]).await;
    assert_eq!(refused.overall_code, OVER);
    assert_eq!(refused.statuses[0].code, OVER);
    assert_eq!(refused.statuses[1].code, OK, "the user's bucket had room");
    assert!(refused.statuses[0].duration_until_reset.is_some());
    assert_eq!(
        a.left("user", "u").await,
        98,
        "the refused request charged nothing"
    );
    // r3's own stream-done release frees nothing; r1's frees a slot for r4.
    let release = |id: &'static str| [("job", "nightly"), ("release", id)];
    assert_eq!(a.ask_many(&[&release("r3")]).await.overall_code, OK);
    assert_eq!(a.ask_many(&[&acquire("r4")]).await.overall_code, OVER);
    assert_eq!(a.ask_many(&[&release("r4")]).await.overall_code, OK);
    assert_eq!(a.ask_many(&[&release("r1")]).await.overall_code, OK);
    let r4 = a.ask_many(&[&acquire("r4")]).await;
    assert_eq!(r4.overall_code, OK, "{r4:?}");
    assert_eq!(r4.statuses[0].limit_remaining, 0, "2 of 2 held");
    // Another job has slots of its own.
    let other = a.ask_many(&[&[("job", "hourly"), ("acquire", "h1")]]).await;
    assert_eq!(other.overall_code, OK);
    // A shadow rule's refusal refuses nothing.
    let watched = |id: &'static str| [("watched_job", "w"), ("acquire", id)];
    assert_eq!(a.ask_many(&[&watched("w1")]).await.overall_code, OK);
    assert_eq!(a.ask_many(&[&watched("w2")]).await.overall_code, OK);
}

/// What a client of Envoy could put in the lease entry is answered: an id with control bytes,
/// empty, or too long is OVER_LIMIT (no slot without a usable id); a concurrency rule's
/// descriptor without its acquire entry is OK with no lease (a config that names no request).
#[tokio::test]
async fn lease_ids_that_cannot_name_a_slot_are_refused() {
    let a = api_with(Some(JOBS), |_| {});
    let long = "x".repeat(129);
    for id in ["", "a\u{1}b", long.as_str()] {
        let r = a.ask_many(&[&[("job", "j"), ("acquire", id)]]).await;
        assert_eq!(r.overall_code, OVER, "{id:?}");
    }
    assert_eq!(a.ask_many(&[&[("job", "j")]]).await.overall_code, OK);
    // The slots are all still free.
    for id in ["a", "b"] {
        let r = a.ask_many(&[&[("job", "j"), ("acquire", id)]]).await;
        assert_eq!(r.overall_code, OK, "{id}");
    }
}

/// A backend failure on an acquire is FAILURE_MODE's: error (UNAVAILABLE), deny, or allow.
#[tokio::test]
async fn a_failed_acquire_is_the_failure_modes() {
    let rules = "domain: edge\ndescriptors:\n  - key: job\n    concurrency: { max: 2 }\n";
    let req = || {
        request(
            "edge",
            vec![descriptor(&[("job", "fail"), ("acquire", "x")])],
        )
    };
    let error = api_with(Some(rules), |_| {});
    let err = error.api.should_rate_limit(&req()).await.unwrap_err();
    assert!(matches!(err, ApiError::Backend(_)), "{err:?}");
    let deny = api_with(Some(rules), |s| s.failure_mode = FailureMode::Deny);
    assert_eq!(
        deny.api
            .should_rate_limit(&req())
            .await
            .unwrap()
            .overall_code,
        OVER
    );
    let allow = api_with(Some(rules), |s| s.failure_mode = FailureMode::Allow);
    assert_eq!(
        allow
            .api
            .should_rate_limit(&req())
            .await
            .unwrap()
            .overall_code,
        OK
    );
}
