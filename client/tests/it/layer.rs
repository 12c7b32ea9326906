//! The library against a real sluicegate (run in this process): the tower layer limiting an axum
//! app, the typed client's calls, and what each failure becomes.

use crate::support::sluicegate;
use std::time::Duration;

use axum::{Router, body::Body, routing::get};
use sluicegate_client::{Client, FailureMode, KeyError, RateLimitLayer, Request, Settle};
use tower::ServiceExt;

fn by_api_key(parts: &http::request::Parts) -> Result<String, KeyError> {
    parts
        .headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|k| format!("key:{k}"))
        .ok_or_else(|| KeyError::unauthorized("missing X-API-Key"))
}

fn app(client: Client) -> Router {
    Router::new()
        .route("/", get(|| async { "hello" }))
        .layer(RateLimitLayer::new(client, by_api_key).near_limit_ratio(0.5))
}

async fn get_with(app: &Router, key: Option<&str>) -> http::Response<Body> {
    let mut req = http::Request::get("/");
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    app.clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

fn header<'a>(r: &'a http::Response<Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_layer_limits_an_axum_app() {
    let t = sluicegate(&["--capacity", "3", "--rate", "0.5"]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let app = app(client);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = get_with(&app, Some("alice")).await;
        seen.push((
            r.status().as_u16(),
            header(&r, "x-ratelimit-remaining").map(str::to_string),
            header(&r, "x-ratelimit-warning").is_some(),
        ));
    }
    assert_eq!(
        seen,
        [
            (200, Some("2".into()), false),
            (200, Some("1".into()), true),
            (200, Some("0".into()), true)
        ],
        "a warning before the 429"
    );
    let denied = get_with(&app, Some("alice")).await;
    assert_eq!(denied.status(), 429);
    assert_eq!(
        header(&denied, "retry-after"),
        Some("2"),
        "one token at 0.5/s"
    );
    assert_eq!(header(&denied, "x-ratelimit-limit"), Some("3"));
    assert!(header(&denied, "x-ratelimit-reset").is_some_and(|v| v != "0"));
    // Another key, its own bucket; no key, 401.
    assert_eq!(get_with(&app, Some("bob")).await.status(), 200);
    assert_eq!(get_with(&app, None).await.status(), 401);
    // A key sluicegate refuses (over 512 bytes) is the client's error: 400, never served.
    let long = "k".repeat(600);
    let r = get_with(&app, Some(&long)).await;
    assert_eq!(r.status(), 400);
    // Without the application's internal prefix or its byte count (604: "key:" + 600).
    let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("over 512 bytes") && !body.contains("604"),
        "{body}"
    );
}

#[tokio::test]
async fn failure_modes_apply_to_an_unreachable_sluicegate_only() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = format!("http://127.0.0.1:{port}");
    for (mode, status) in [(FailureMode::Allow, 200), (FailureMode::Deny, 503)] {
        let client = Client::builder(&down)
            .timeout(Duration::from_millis(200))
            .failure_mode(mode)
            .build()
            .unwrap();
        let r = get_with(&app(client.clone()), Some("x")).await;
        assert_eq!(r.status(), status, "{mode:?}");
        // Seen from outside: marked degraded; a denial says when to retry, never "at once".
        assert_eq!(header(&r, "x-ratelimit-degraded"), Some("1"), "{mode:?}");
        assert_eq!(
            header(&r, "retry-after"),
            (status == 503).then_some("1"),
            "{mode:?}"
        );
        assert_eq!(
            header(&r, "x-ratelimit-limit"),
            None,
            "no bucket, no figures"
        );
        let d = client.should_allow("x", 1).await.unwrap();
        assert!(d.degraded);
    }
    let strict = Client::builder(&down)
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let err = strict.should_allow("x", 1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // The cause is named: nothing listens on that port.
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    let r = get_with(&app(strict), Some("x")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-ratelimit-degraded"), Some("1"));
    assert_eq!(header(&r, "retry-after"), Some("1"));

    // A live sluicegate refusing the request is never an allow, whatever the mode.
    let t = sluicegate(&["--allow-client-shapes", "false"]).await;
    let open = Client::builder(&t.url)
        .timeout(Duration::from_secs(2))
        .failure_mode(FailureMode::Allow)
        .build()
        .unwrap();
    let shaped = Request {
        key: "k",
        cost: 1,
        capacity: 5.0,
        rate: 1.0,
        dry_run: false,
        ..Default::default()
    };
    let err = open.check(shaped).await.unwrap_err();
    assert!(!err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("ALLOW_CLIENT_SHAPES"), "{err}");
}

/// Up to: a reservation takes what the bucket can give (20 of 50 asked), says so in `granted`,
/// and settling what was used gives the rest back; with not even one token, a denial that took
/// nothing.
#[tokio::test]
async fn reserve_up_to_takes_what_is_there_and_settles_the_rest_back() {
    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let ask = |cost, up_to| Request {
        key: "lease:ann",
        cost,
        capacity: 100.0,
        rate: 0.001,
        up_to,
        ..Default::default()
    };
    let first = client.check(ask(80, false)).await.unwrap();
    assert_eq!((first.allowed, first.granted), (true, 80));
    let lease = client
        .reserve(ask(50, true), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(lease.decision.allowed && lease.id.is_some(), "{lease:?}");
    assert_eq!(lease.decision.granted, 20);
    assert!(lease.decision.tokens_remaining < 0.01, "{lease:?}");
    let none = client.check(ask(5, true)).await.unwrap();
    assert_eq!((none.allowed, none.granted), (false, 0));
    assert!(none.retry_after > Duration::ZERO);
    // 5 of the 20 used: 15 go back.
    let s = client.settle_reservation(&lease, 5).await.unwrap();
    assert!((s.tokens_remaining - 15.0).abs() < 0.01, "{s:?}");
}

#[tokio::test]
async fn reserve_then_settle() {
    let t = sluicegate(&[]).await;
    let client = Client::builder(&t.url)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let reserve = Request {
        key: "llm:ann",
        cost: 80,
        capacity: 100.0,
        rate: 0.001,
        dry_run: false,
        ..Default::default()
    };
    let reservation = client
        .reserve(reserve, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(reservation.decision.allowed && reservation.id.is_some());
    let s = client.settle_reservation(&reservation, 30).await.unwrap();
    assert!((s.tokens_remaining - 70.0).abs() < 0.01, "{s:?}");
    let again = client.settle_reservation(&reservation, 0).await.unwrap();
    assert_eq!(again, s, "once: a retry answers the same");
    // Without an id the server refunds nothing on the caller's word (ALLOW_REFUNDS=false), but
    // charges what is more.
    let bucket = Settle {
        key: "llm:ann",
        capacity: 100.0,
        rate: 0.001,
        ..Default::default()
    };
    let err = client
        .settle(Settle {
            reserved: 80,
            actual: 30,
            ..bucket
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ALLOW_REFUNDS"), "{err}");
    let s = client
        .settle(Settle {
            reserved: 0,
            actual: 120,
            ..bucket
        })
        .await
        .unwrap();
    assert!(
        s.in_debt && (s.tokens_remaining + 50.0).abs() < 0.01,
        "{s:?}"
    );
    let batch = client
        .check_batch(
            &[
                reserve,
                Request {
                    key: "llm:bob",
                    ..reserve
                },
            ],
            true,
        )
        .await
        .unwrap();
    assert!(!batch.allowed);
    assert!(!batch.decisions[0].allowed && batch.decisions[1].allowed);
    let bob = Request {
        key: "llm:bob",
        dry_run: true,
        cost: 100,
        ..reserve
    };
    assert!(
        client.check(bob).await.unwrap().allowed,
        "all or nothing: bob uncharged"
    );
}

/// A CA, a server certificate for `localhost` and a client certificate, made with rcgen; PEM files
/// in `dir`: ca.pem, server.pem/key, client.pem/key.
fn certificates(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for (name, san) in [("server", "localhost"), ("client", "client.test")] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![san.to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// The client's TLS options against a sluicegate requiring mutual TLS.
#[tokio::test]
async fn tls_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let path = |f: &str| dir.path().join(f).display().to_string();
    let t = sluicegate(&[
        "--grpc-tls",
        "--grpc-tls-cert",
        &path("server.pem"),
        "--grpc-tls-key",
        &path("server.key"),
        "--grpc-client-ca",
        &path("ca.pem"),
        "--grpc-client-san",
        "client.test",
    ])
    .await;
    let url = t.url.replace("http://", "https://");
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    let client = Client::builder(&url)
        .timeout(Duration::from_secs(2))
        .tls(read("ca.pem"), "localhost")
        .client_certificate(read("client.pem"), read("client.key"))
        .build()
        .unwrap();
    assert!(client.should_allow("tls", 1).await.unwrap().allowed);
    // Without the client certificate the server refuses: unavailable, never an answer.
    let anonymous = Client::builder(&url)
        .timeout(Duration::from_secs(2))
        .tls(read("ca.pem"), "localhost")
        .build()
        .unwrap();
    assert!(
        anonymous
            .should_allow("tls", 1)
            .await
            .unwrap_err()
            .is_unavailable()
    );
}
