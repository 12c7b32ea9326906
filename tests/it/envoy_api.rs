//! Envoy's ShouldRateLimit through a real sluicegate process with a rules file: the wire semantics
//! Envoy relies on (the README's "Request semantics").

use crate::support::envoy::{
    OK, OVER, RateLimitRequest, RateLimitServiceClient, descriptor, request,
};
use crate::support::{RedisServer, Sluicegate};
use tonic::Code;

const RULES: &str = "domain: edge
descriptors:
  - key: api_key
    rate_limit: { unit: minute, requests_per_unit: 3, name: per_key }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 1000 }
  - key: generic_key
    value: health
    rate_limit: { unlimited: true }
  - key: generic_key
    value: watched
    shadow_mode: true
    rate_limit: { unit: hour, requests_per_unit: 1, name: watched }
  - key: generic_key
    value: blocked
    rate_limit: { unit: second, requests_per_unit: 0 }
  - key: plan
    value: basic
    rate_limit: { unit: hour, requests_per_unit: 100, name: basic }
  - key: plan
    value: override
    rate_limit: { unit: hour, requests_per_unit: 5, name: special, replaces: [{ name: basic }] }
  - key: burst
    rate_limit: { unit: minute, requests_per_unit: 60, burst: 2 }
";

async fn start(extra: &[&str], env: &[(&str, &str)]) -> (Sluicegate, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    let mut args = vec!["--rules", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Sluicegate::start(&args, env).await, dir)
}

type Client = RateLimitServiceClient<tonic::transport::Channel>;

/// The overall code of one request.
async fn code_of(c: &mut Client, req: RateLimitRequest) -> i32 {
    c.should_rate_limit(req)
        .await
        .unwrap()
        .into_inner()
        .overall_code
}

/// The overall code for one request of single-entry descriptors `(key, value)`.
async fn overall(c: &mut Client, entries: &[(&str, &str)]) -> i32 {
    let descriptors = entries.iter().map(|e| descriptor(&[*e])).collect();
    code_of(c, request("edge", descriptors)).await
}

async fn client(t: &Sluicegate) -> RateLimitServiceClient<tonic::transport::Channel> {
    RateLimitServiceClient::connect(t.grpc_url()).await.unwrap()
}

#[tokio::test]
async fn statuses_one_per_descriptor_in_order() {
    let (t, _dir) = start(&[], &[]).await;
    let mut c = client(&t).await;
    let req = request(
        "edge",
        vec![
            descriptor(&[("unknown", "x")]),
            descriptor(&[("api_key", "k1")]),
            descriptor(&[("generic_key", "health")]),
            descriptor(&[("remote_address", "10.0.0.1")]),
        ],
    );
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, OK);
    // Neither headers nor metadata unless asked for.
    assert!(r.response_headers_to_add.is_empty(), "{r:?}");
    assert!(r.dynamic_metadata.is_none(), "{r:?}");
    assert_eq!(r.statuses.len(), 4);
    // Unmatched: OK, no current limit.
    assert_eq!(r.statuses[0].code, OK);
    assert!(r.statuses[0].current_limit.is_none());
    // Limited: the rule's limit, remaining counted down, time until full.
    let s = &r.statuses[1];
    assert_eq!(s.code, OK);
    let limit = s.current_limit.as_ref().unwrap();
    assert_eq!(
        (limit.requests_per_unit, limit.unit, limit.name.as_str()),
        (3, 2, "per_key")
    );
    assert_eq!(s.limit_remaining, 2);
    let reset = s.duration_until_reset.unwrap();
    assert!(
        (19..=20).contains(&reset.seconds),
        "one token of 3/min comes back in 20 s: {reset:?}"
    );
    // Unlimited: OK, no current limit, the largest remaining.
    assert_eq!(r.statuses[2].code, OK);
    assert!(r.statuses[2].current_limit.is_none());
    assert_eq!(r.statuses[2].limit_remaining, u32::MAX);
    assert_eq!(
        r.statuses[3]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        1000
    );

    for remaining in [1, 0] {
        let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
        assert_eq!(r.statuses[1].limit_remaining, remaining);
        assert_eq!(r.overall_code, OK);
    }
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        r.overall_code, OVER,
        "one descriptor over limit makes the request over limit"
    );
    assert_eq!(r.statuses[1].code, OVER);
    assert_eq!(r.statuses[0].code, OK);
    assert_eq!(r.statuses[3].code, OK);
    let retry = r.statuses[1].duration_until_reset.unwrap();
    assert!(
        (19..=20).contains(&retry.seconds),
        "over limit: time until a token: {retry:?}"
    );
}

#[tokio::test]
async fn hits_addend_precedence_check_only_and_refund() {
    let (t, _dir) = start(&["--allow-refunds", "true"], &[]).await;
    let mut c = client(&t).await;
    // Request-level hits 2 of 3.
    let mut req = request("edge", vec![descriptor(&[("api_key", "h")])]);
    req.hits_addend = 2;
    let r = c.should_rate_limit(req).await.unwrap().into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 1);
    // The descriptor's own 0 wins over the request's 5: check only, nothing spent.
    let mut d = descriptor(&[("api_key", "h")]);
    d.hits_addend = Some(0);
    let mut req = request("edge", vec![d]);
    req.hits_addend = 5;
    for _ in 0..3 {
        let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
        assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 1));
    }
    // The descriptor's own 1 wins over the request's 5.
    req.descriptors[0].hits_addend = Some(1);
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 0));
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, OVER);
    // A refund of 2 gives two back.
    req.descriptors[0].hits_addend = Some(2);
    req.descriptors[0].is_negative_hits = true;
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 2));
}

#[tokio::test]
async fn limit_override_replaces_the_rule() {
    let (t, _dir) = start(&[], &[]).await;
    let mut c = client(&t).await;
    let mut d = descriptor(&[("api_key", "o")]);
    d.limit = Some(sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride {
        requests_per_unit: 1,
        unit: 3, // HOUR
    });
    let req = request("edge", vec![d.clone()]);
    let r = c.should_rate_limit(req.clone()).await.unwrap().into_inner();
    let limit = r.statuses[0].current_limit.as_ref().unwrap();
    assert_eq!((limit.requests_per_unit, limit.unit), (1, 3));
    assert_eq!(r.statuses[0].limit_remaining, 0);
    assert_eq!(code_of(&mut c, req).await, OVER);
    // Also for a descriptor no rule matches.
    let mut d = descriptor(&[("nothing", "x")]);
    d.limit = Some(sluicegate_proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride {
        requests_per_unit: 1,
        unit: 1,
    });
    let req = request("edge", vec![d]);
    assert_eq!(code_of(&mut c, req.clone()).await, OK);
    assert_eq!(code_of(&mut c, req).await, OVER);
}

#[tokio::test]
async fn shadow_unlimited_blocked_replaces_and_burst() {
    let (t, _dir) = start(&[], &[]).await;
    let mut c = client(&t).await;
    for _ in 0..3 {
        let watched = overall(&mut c, &[("generic_key", "watched")]).await;
        assert_eq!(watched, OK, "a shadow rule never limits");
        assert_eq!(overall(&mut c, &[("generic_key", "health")]).await, OK);
    }
    let blocked = overall(&mut c, &[("generic_key", "blocked")]).await;
    assert_eq!(blocked, OVER, "requests_per_unit 0 blocks");

    // `special` replaces `basic` when both match in one request: basic is not charged.
    let both = request(
        "edge",
        vec![
            descriptor(&[("plan", "basic")]),
            descriptor(&[("plan", "override")]),
        ],
    );
    let r = c.should_rate_limit(both).await.unwrap().into_inner();
    assert!(
        r.statuses[0].current_limit.is_none(),
        "replaced: {:?}",
        r.statuses[0]
    );
    assert_eq!(
        r.statuses[1].current_limit.as_ref().unwrap().name,
        "special"
    );
    let alone = request("edge", vec![descriptor(&[("plan", "basic")])]);
    let r = c.should_rate_limit(alone).await.unwrap().into_inner();
    assert_eq!(
        r.statuses[0].limit_remaining, 99,
        "basic was untouched by the replaced call"
    );

    // burst: 2 deep although 60 per minute.
    let b = request("edge", vec![descriptor(&[("burst", "x")])]);
    let codes: Vec<i32> = futures::future::join_all((0..3).map(|_| {
        let mut c = c.clone();
        let b = b.clone();
        async move { code_of(&mut c, b).await }
    }))
    .await;
    assert_eq!(codes.iter().filter(|&&c| c == OK).count(), 2, "{codes:?}");

    let (_, metrics) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    for series in [
        "sluicegate_rule_decisions_total{domain=\"edge\",rule=\"watched\",result=\"shadow_denied\"} 2",
        "sluicegate_rule_decisions_total{domain=\"edge\",rule=\"watched\",result=\"allowed\"} 1",
        "sluicegate_tokens_remaining{domain=\"edge\",rule=\"basic\"} 99",
        "sluicegate_rules_reloads_total{outcome=\"ok\"} 1",
    ] {
        assert!(metrics.contains(series), "missing {series}:\n{metrics}");
    }
}

#[tokio::test]
async fn global_shadow_mode_answers_ok() {
    let (t, _dir) = start(&["--shadow-mode"], &[]).await;
    let mut c = client(&t).await;
    let req = request("edge", vec![descriptor(&[("generic_key", "blocked")])]);
    assert_eq!(code_of(&mut c, req).await, OK);
}

#[tokio::test]
async fn invalid_requests() {
    let (t, _dir) = start(&[], &[]).await;
    let mut c = client(&t).await;
    let cases = [
        (request("", vec![descriptor(&[("a", "b")])]), "domain"),
        (request("edge", vec![]), "descriptors"),
    ];
    for (req, field) in cases {
        let err = c.should_rate_limit(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn without_rules_everything_is_ok() {
    let t = Sluicegate::start(&[], &[]).await;
    let mut c = client(&t).await;
    for _ in 0..5 {
        let r = c
            .should_rate_limit(request(
                "edge",
                vec![descriptor(&[("api_key", "x")]), descriptor(&[("a", "b")])],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses.len(), 2);
        assert!(
            r.statuses
                .iter()
                .all(|s| s.code == OK && s.current_limit.is_none())
        );
    }
}

#[tokio::test]
async fn redis_backend_and_its_failure() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let (strict, _d1) = start(&["--redis-timeout-ms", "500"], &[("REDIS_URL", &url)]).await;
    let (open, _d2) = start(
        &["--redis-timeout-ms", "500", "--failure-mode", "allow"],
        &[("REDIS_URL", &url)],
    )
    .await;
    let (mut cs, mut co) = (client(&strict).await, client(&open).await);
    // Several descriptors, one request: buckets shared by both replicas through Redis.
    let req = request(
        "edge",
        vec![
            descriptor(&[("api_key", "r")]),
            descriptor(&[("remote_address", "1.2.3.4")]),
        ],
    );
    let r1 = cs
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    let r2 = co
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            r1.statuses[0].limit_remaining,
            r2.statuses[0].limit_remaining
        ),
        (2, 1)
    );
    let mut admin = redis.connection().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tb:rls:*")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2, "{keys:?}");

    redis.kill();
    let err = cs.should_rate_limit(req.clone()).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unavailable,
        "Envoy's failure_mode_deny decides"
    );
    let r = co
        .should_rate_limit(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OK, "FAILURE_MODE=allow answers OK");
    assert_eq!(r.statuses.len(), 2);
}

/// The text of a field of a dynamic-metadata struct.
fn text(s: &prost_types::Struct, field: &str) -> Option<String> {
    match s.fields.get(field)?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(v) => Some(v.clone()),
        prost_types::value::Kind::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The structs of the `descriptors` list.
fn fired(s: &prost_types::Struct) -> Vec<prost_types::Struct> {
    let Some(prost_types::value::Kind::ListValue(l)) =
        s.fields.get("descriptors").and_then(|v| v.kind.clone())
    else {
        return Vec::new();
    };
    l.values
        .into_iter()
        .filter_map(|v| match v.kind {
            Some(prost_types::value::Kind::StructValue(s)) => Some(s),
            _ => None,
        })
        .collect()
}

fn header<'a>(r: &'a crate::support::envoy::RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

#[tokio::test]
async fn headers_and_metadata_name_the_limit() {
    let (t, _dir) = start(
        &[
            "--limit-response-headers-enabled",
            "--response-dynamic-metadata",
            "--limit-remaining-header",
            "X-Left",
        ],
        &[],
    )
    .await;
    let mut c = client(&t).await;
    let req = || {
        request(
            "edge",
            vec![
                descriptor(&[("remote_address", "10.0.0.9")]),
                descriptor(&[("api_key", "k-meta")]),
            ],
        )
    };
    // Within the limits: the headers describe the descriptor with the fewest left (the api_key,
    // 3 per minute), and no rule fired.
    let r = c.should_rate_limit(req()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, OK);
    assert_eq!(header(&r, "RateLimit-Limit"), Some("3"), "{r:?}");
    assert_eq!(header(&r, "X-Left"), Some("2"), "{r:?}");
    assert_eq!(header(&r, "RateLimit-Remaining"), None, "renamed");
    let reset: u64 = header(&r, "RateLimit-Reset").unwrap().parse().unwrap();
    assert!((1..=20).contains(&reset), "one token back in 20 s: {reset}");
    assert!(r.dynamic_metadata.is_none(), "{r:?}");

    for _ in 0..2 {
        c.should_rate_limit(req()).await.unwrap();
    }
    let r = c.should_rate_limit(req()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, OVER);
    assert_eq!(header(&r, "RateLimit-Limit"), Some("3"));
    assert_eq!(header(&r, "X-Left"), Some("0"));
    let m = r
        .dynamic_metadata
        .expect("metadata for a request over its limit");
    assert_eq!(text(&m, "domain").as_deref(), Some("edge"));
    assert_eq!(text(&m, "rule").as_deref(), Some("per_key"));
    assert_eq!(text(&m, "rules").as_deref(), Some("per_key"));
    let d = fired(&m);
    assert_eq!(d.len(), 1, "only the descriptor over its limit: {d:?}");
    assert_eq!(text(&d[0], "descriptor").as_deref(), Some("api_key=k-meta"));
    assert_eq!(text(&d[0], "limit").as_deref(), Some("3/minute"));
    assert_eq!(text(&d[0], "shadow").as_deref(), Some("false"));

    // A shadow rule over its limit: the request passes, the metadata says which rule would have
    // denied it (marked shadow), and names no enforced rule.
    let watched = || request("edge", vec![descriptor(&[("generic_key", "watched")])]);
    c.should_rate_limit(watched()).await.unwrap();
    let r = c.should_rate_limit(watched()).await.unwrap().into_inner();
    assert_eq!(r.overall_code, OK);
    let m = r.dynamic_metadata.expect("the shadow rule fired");
    assert_eq!(text(&m, "rule"), None);
    let d = fired(&m);
    assert_eq!(text(&d[0], "rule").as_deref(), Some("watched"));
    assert_eq!(text(&d[0], "shadow").as_deref(), Some("true"));
}

/// Whatever a client of Envoy puts in a header becomes a descriptor value; Envoy lets a request
/// through when the call fails, so every one of these must be answered, none an error.
#[tokio::test]
async fn every_descriptor_envoy_can_send_is_answered() {
    use sluicegate_proto::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    let (t, _dir) = start(&[], &[]).await;
    let mut c = client(&t).await;
    let raw = |entries: Vec<(Vec<u8>, Vec<u8>)>| RateLimitDescriptor {
        entries: entries
            .into_iter()
            .map(|(key, value)| Entry { key, value })
            .collect(),
        ..Default::default()
    };
    let cases: Vec<(&str, RateLimitRequest, i32)> = vec![
        (
            "a value that is not UTF-8",
            request("edge", vec![raw(vec![(b"api_key".to_vec(), vec![0xff])])]),
            OK,
        ),
        (
            "a key that is not UTF-8",
            request("edge", vec![raw(vec![(vec![0xc3, 0x28], b"v".to_vec())])]),
            OK,
        ),
        (
            "a value of 100 kB",
            request(
                "edge",
                vec![raw(vec![(b"api_key".to_vec(), vec![b'k'; 100_000])])],
            ),
            OK,
        ),
        (
            "an empty value",
            request("edge", vec![raw(vec![(b"api_key".to_vec(), Vec::new())])]),
            OK,
        ),
        (
            "20 000 descriptors",
            request(
                "edge",
                (0..20_000)
                    .map(|i| raw(vec![(b"api_key".to_vec(), format!("{i}").into_bytes())]))
                    .collect(),
            ),
            OVER,
        ),
        (
            "20 000 entries in one descriptor",
            request(
                "edge",
                vec![raw((0..20_000)
                    .map(|i| (format!("k{i}").into_bytes(), vec![0xfe]))
                    .collect())],
            ),
            OVER,
        ),
    ];
    for (what, req, want) in cases {
        let n = req.descriptors.len();
        let r = c
            .should_rate_limit(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: an error is Envoy's fail-open: {e:?}"))
            .into_inner();
        assert_eq!(r.overall_code, want, "{what}");
        assert_eq!(r.statuses.len(), n, "{what}: one status per descriptor");
    }
    // The long value has a bucket of its own: 3 a minute, like any key.
    let long = || {
        request(
            "edge",
            vec![raw(vec![(b"api_key".to_vec(), vec![b'k'; 100_000])])],
        )
    };
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(code_of(&mut c, long()).await);
    }
    assert_eq!(codes, [OK, OK, OVER], "one was spent above");
    let m = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap()
        .1;
    for reason in ["descriptors", "entries"] {
        let line = format!("sluicegate_refused_total{{api=\"envoy\",reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "{line}\n{m}");
    }
}

/// The local deny cache answers the Envoy API too: once Redis said a bucket is short of tokens,
/// the denials that refill cannot yet cover are answered here (counted), without a script call.
#[tokio::test]
async fn the_deny_cache_answers_envoy_denials_without_redis() {
    let redis = RedisServer::start().await;
    let (t, _dir) = start(
        &["--local-deny-cache", "true"],
        &[("REDIS_URL", &redis.url())],
    )
    .await;
    let mut c = client(&t).await;
    let mut admin = redis.connection().await;
    let evalsha = async |admin: &mut redis::aio::MultiplexedConnection| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(admin)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // 3 a minute: three allowed, then denials for the next 20 s.
    let codes: Vec<i32> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(overall(&mut c, &[("api_key", "cached")]).await);
        }
        v
    };
    assert_eq!(codes, [OK, OK, OK]);
    assert_eq!(overall(&mut c, &[("api_key", "cached")]).await, OVER);
    let before = evalsha(&mut admin).await;
    for _ in 0..20 {
        assert_eq!(overall(&mut c, &[("api_key", "cached")]).await, OVER);
    }
    let calls = evalsha(&mut admin).await - before;
    assert!(
        calls <= 2,
        "{calls} script calls for 20 denials the cache could prove"
    );
    let (_, m) = crate::support::http_get(&t.http_url("/metrics"))
        .await
        .unwrap();
    assert!(
        crate::support::metric(&m, "sluicegate_local_answers_total{api=\"envoy\"}") >= 18.0,
        "{m}"
    );
}
