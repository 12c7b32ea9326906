//! `lua/token_bucket.lua` alone, through EVAL on a real redis-server: its argument checks and its
//! return contract.

mod common;

use tollgate::backend::redis::TOKEN_BUCKET_LUA;

async fn eval(
    conn: &mut redis::aio::MultiplexedConnection,
    args: [&str; 4],
) -> redis::RedisResult<(i64, String, i64, i64)> {
    redis::cmd("EVAL")
        .arg(TOKEN_BUCKET_LUA)
        .arg(1)
        .arg("tb:lua")
        .arg(&args[..])
        .query_async(conn)
        .await
}

#[tokio::test]
async fn every_argument_must_be_a_finite_positive_number() {
    let server = common::RedisServer::start().await;
    let mut conn = server.connection().await;
    let names = ["capacity", "rate", "cost", "mode"];
    for bad in ["abc", "-1", "0", "nan", "NaN", "inf", "-inf", "1e999", ""] {
        for (i, name) in names.iter().enumerate() {
            let mut args = ["10", "1", "1", "1"];
            args[i] = bad;
            let err = eval(&mut conn, args)
                .await
                .expect_err(&format!("{name}={bad:?} must be refused"));
            let text = err.to_string();
            assert!(
                text.contains(name),
                "{name}={bad:?}: error does not name it: {text}"
            );
        }
    }
    let err = eval(&mut conn, ["10", "1", "1", "4"]).await.unwrap_err();
    assert!(err.to_string().contains("mode"), "{err}");
    // Nothing was written by any refused call.
    let exists: i64 = redis::cmd("EXISTS")
        .arg("tb:lua")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn returns_the_documented_array() {
    let server = common::RedisServer::start().await;
    let mut conn = server.connection().await;
    let (allowed, tokens, retry, reset) = eval(&mut conn, ["10", "2", "4", "1"]).await.unwrap();
    assert_eq!(
        (allowed, tokens.parse::<f64>().unwrap(), retry),
        (1, 6.0, 0)
    );
    assert!((1_900..=2_000).contains(&reset), "reset {reset}");
    let (allowed, _, retry, _) = eval(&mut conn, ["10", "2", "7", "1"]).await.unwrap();
    assert_eq!(allowed, 0);
    assert!((300..=500).contains(&retry), "retry {retry}");
    let stored: Vec<String> = redis::cmd("HMGET")
        .arg("tb:lua")
        .arg("tokens")
        .arg("ts")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((stored[0].parse::<f64>().unwrap() - 6.0).abs() < 0.01);
}

#[tokio::test]
async fn a_future_timestamp_adds_nothing() {
    // A bucket written by a server whose clock was ahead (or a replica promoted with a clock
    // behind): elapsed is negative, clamped to zero, and the stored time is not moved back.
    let server = common::RedisServer::start().await;
    let mut conn = server.connection().await;
    let future_ms = 4_102_444_800_000.0_f64; // year 2100
    let _: () = redis::cmd("HSET")
        .arg("tb:lua")
        .arg("tokens")
        .arg("0")
        .arg("ts")
        .arg(future_ms.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let (allowed, tokens, _, _) = eval(&mut conn, ["10", "1000", "1", "1"]).await.unwrap();
    assert_eq!(allowed, 0);
    assert_eq!(tokens.parse::<f64>().unwrap(), 0.0);
    let ts: String = redis::cmd("HGET")
        .arg("tb:lua")
        .arg("ts")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ts.parse::<f64>().unwrap(), future_ms);
}
