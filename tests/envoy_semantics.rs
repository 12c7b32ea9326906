//! The Envoy API's decisions at the edges, in process (the wire is covered by `envoy_api.rs`):
//! all or nothing, CHARGE_ON_DENY, failures confined to their descriptors, shadow rules at 0,
//! 0-hit checks and debt, overrides without rules, and the bounds.

mod common;

use std::{sync::Arc, time::Instant};

use common::envoy::{OK, OVER, descriptor, request};
use tollgate::api::{ApiError, EnvoyApi, EnvoySettings};
use tollgate::backend::{Backend, BackendError, BucketRequest, ErrorKind, MemoryBackend};
use tollgate::core::{Decision, FailureMode};
use tollgate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use tollgate::rules::RulesHandle;

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
    ) -> tollgate::proto::envoy::service::ratelimit::v3::RateLimitResponse {
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
    // FAILURE_MODE=error: the whole request is UNAVAILABLE (Envoy's failure_mode_deny decides).
    let a = api(|_| {});
    let err = a
        .api
        .should_rate_limit(&request("edge", vec![descriptor(&[("user", "fail")])]))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Backend(_)), "{err:?}");
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
async fn bounds_are_checked_before_any_work() {
    let a = api(|s| {
        s.max_descriptors = 64;
        s.max_key_bytes = 1024;
    });
    // 100k descriptors: refused at once, nothing touched.
    let many: Vec<_> = (0..100_000)
        .map(|i| descriptor(&[("user", &format!("u{i}"))]))
        .collect();
    let started = Instant::now();
    let err = a
        .api
        .should_rate_limit(&request("edge", many))
        .await
        .unwrap_err();
    assert!(
        started.elapsed().as_millis() < 2_000,
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().starts_with("descriptors"), "{err}");
    assert!(err.to_string().contains("MAX_DESCRIPTORS"), "{err}");
    assert!(a.backend.0.is_empty());

    // A 3 MB value would be a 3 MB bucket key.
    let huge = "v".repeat(3 << 20);
    let err = a
        .api
        .should_rate_limit(&request(
            "edge",
            vec![descriptor(&[("ip", "ok")]), descriptor(&[("user", &huge)])],
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("descriptor 1"), "{err}");
    assert!(err.to_string().contains("MAX_KEY_BYTES"), "{err}");
    assert!(
        a.backend.0.is_empty(),
        "nothing was charged, not even descriptor 0"
    );
    // A long value no rule limits needs no bucket: answered.
    let r = a.ask(&[("unlimited_header", &huge)]).await;
    assert_eq!(r.overall_code, OK);
}

#[tokio::test]
async fn refunds_can_be_refused() {
    let a = api(|s| s.allow_refunds = false);
    let mut d = descriptor(&[("user", "u")]);
    d.hits_addend = Some(1);
    d.is_negative_hits = true;
    let err = a
        .api
        .should_rate_limit(&request("edge", vec![d]))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::PermissionDenied(_)), "{err:?}");
    assert!(err.to_string().contains("ALLOW_REFUNDS"), "{err}");
}
