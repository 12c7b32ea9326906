//! `lua/token_bucket.lua` alone, through EVAL on a real redis-server: its argument checks, its
//! return contract, several buckets and groups in one call, and what it stores.

use redis::aio::MultiplexedConnection;
use sluicegate_core::backend::redis::TOKEN_BUCKET_LUA;

const MAX_MS: i64 = 9_007_199_254_740_991;

async fn eval(
    conn: &mut MultiplexedConnection,
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

/// A call with `keys` declared and `args` after them; the flat reply.
async fn eval_many(
    conn: &mut MultiplexedConnection,
    keys: &[&str],
    args: &[&str],
) -> redis::RedisResult<Vec<redis::Value>> {
    redis::cmd("EVAL")
        .arg(TOKEN_BUCKET_LUA)
        .arg(keys.len())
        .arg(keys)
        .arg(args)
        .query_async(conn)
        .await
}

/// (allowed, tokens) of each bucket in a flat reply.
fn verdicts(reply: &[redis::Value]) -> Vec<(bool, f64)> {
    answers(reply).into_iter().map(|(a, t, _)| (a, t)).collect()
}

/// (allowed, tokens, tokens taken): an allowed answer's third value is what it took.
fn answers(reply: &[redis::Value]) -> Vec<(bool, f64, u64)> {
    reply
        .chunks(4)
        .map(|c| {
            let allowed = matches!(c[0], redis::Value::Int(1));
            let redis::Value::BulkString(t) = &c[1] else {
                panic!("tokens: {:?}", c[1])
            };
            let redis::Value::Int(third) = c[2] else {
                panic!("third: {:?}", c[2])
            };
            let granted = if allowed { third as u64 } else { 0 };
            (
                allowed,
                std::str::from_utf8(t).unwrap().parse().unwrap(),
                granted,
            )
        })
        .collect()
}

async fn stored(conn: &mut MultiplexedConnection, key: &str) -> Option<(f64, f64)> {
    let raw: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    raw.map(|b| {
        assert_eq!(b.len(), 16, "two little-endian doubles");
        let tokens = f64::from_le_bytes(b[..8].try_into().unwrap());
        let ts = f64::from_le_bytes(b[8..].try_into().unwrap());
        (tokens, ts)
    })
}

#[tokio::test]
async fn every_argument_must_be_a_number_in_its_range() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let names = ["capacity", "rate", "cost", "mode"];
    for bad in ["abc", "-1", "nan", "NaN", "inf", "-inf", "1e999", ""] {
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
    for (i, name) in [(0, "capacity"), (1, "rate")] {
        let mut args = ["10", "1", "1", "1"];
        args[i] = "0";
        let err = eval(&mut conn, args).await.unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
    }
    for mode in ["0", "7", "13", "1.5"] {
        let err = eval(&mut conn, ["10", "1", "1", mode]).await.unwrap_err();
        assert!(err.to_string().contains("mode"), "{err}");
    }
    // A settle (mode 9) needs its reservation key.
    let err = eval(&mut conn, ["10", "1", "1", "9"]).await.unwrap_err();
    assert!(err.to_string().contains("reservation"), "{err}");
    // Group lengths must add up to the number of buckets.
    let err = eval_many(
        &mut conn,
        &["a", "b"],
        &["1", "1", "1", "1", "1", "1", "1", "1", "3"],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("group"), "{err}");
    // Nothing was written by any refused call.
    let keys: i64 = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(keys, 0);
}

#[tokio::test]
async fn returns_the_documented_array_and_stores_two_doubles() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let (allowed, tokens, taken, reset) = eval(&mut conn, ["10", "2", "4", "1"]).await.unwrap();
    assert_eq!(
        (allowed, tokens.parse::<f64>().unwrap(), taken),
        (1, 6.0, 4),
        "an allowed answer's third value is what it took"
    );
    assert!((1_900..=2_000).contains(&reset), "reset {reset}");
    let (tokens, _) = stored(&mut conn, "tb:lua").await.unwrap();
    assert!((tokens - 6.0).abs() < 0.01);
    let pttl: i64 = redis::cmd("PTTL")
        .arg("tb:lua")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((4_900..=5_000).contains(&pttl), "the full refill: {pttl}");

    // A denial: figures, and nothing written (the TTL runs on).
    let (allowed, _, retry, _) = eval(&mut conn, ["10", "2", "7", "1"]).await.unwrap();
    assert_eq!(allowed, 0);
    assert!((300..=500).contains(&retry), "retry {retry}");
    let before = stored(&mut conn, "tb:lua").await;
    eval(&mut conn, ["10", "2", "9", "1"]).await.unwrap();
    assert_eq!(
        stored(&mut conn, "tb:lua").await,
        before,
        "a denial writes nothing"
    );

    // Take up to (mode 10): as many of 9 as are there (6, whole), then nothing left to give: a
    // denial waiting for one token.
    let (allowed, tokens, taken, _) = eval(&mut conn, ["10", "2", "9", "10"]).await.unwrap();
    let tokens = tokens.parse::<f64>().unwrap();
    assert_eq!((allowed, taken), (1, 6), "{tokens}");
    assert!((0.0..0.1).contains(&tokens), "{tokens}");
    let (allowed, _, retry, _) = eval(&mut conn, ["10", "2", "9", "10"]).await.unwrap();
    assert_eq!(allowed, 0);
    assert!((400..=500).contains(&retry), "one token at 2/s: {retry}");
}

/// A bucket's state while leases are out: (tokens, leased, generation, until), or None when it is
/// stored without them (two doubles).
async fn leased_state(conn: &mut MultiplexedConnection, key: &str) -> Option<(f64, f64, f64, f64)> {
    let raw: Vec<u8> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    let d = |i: usize| f64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap());
    match raw.len() {
        16 => None,
        40 => Some((d(0), d(2), d(3), d(4))),
        n => panic!("{n} bytes"),
    }
}

#[tokio::test]
async fn leases_are_counted_out_of_the_bucket_until_they_come_back() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let k = ["tb:lease"];
    let k2 = ["tb:lease", "tb:lease"];
    // A take of 1 and a lease of 10 in one call, on a bucket of 100 refilling 1 a second.
    let reply = eval_many(
        &mut conn,
        &k2,
        &["100", "1", "1", "1", "100", "1", "10", "11", "L", "250"],
    )
    .await
    .unwrap();
    let a = answers(&reply);
    assert_eq!((a[0].0, a[0].2), (true, 1));
    assert_eq!(
        (a[1].0, a[1].1, a[1].2),
        (true, 89.0, 10),
        "the lease took 10"
    );
    let redis::Value::Int(generation) = reply[7] else {
        panic!("a lease's fourth value is its generation: {:?}", reply[7])
    };
    let (tokens, leased, g, until) = leased_state(&mut conn, "tb:lease").await.unwrap();
    assert_eq!((tokens, leased, g as i64), (89.0, 10.0, generation));
    assert!(
        until - g >= 500.0 && until - g < 510.0,
        "twice 250 ms: {g} {until}"
    );
    // The bucket refills and takes refunds only up to what is not leased out.
    let reply = eval_many(&mut conn, &k, &["100", "1", "100", "3"])
        .await
        .unwrap();
    assert_eq!(
        answers(&reply)[0].1,
        90.0,
        "a refund stops at capacity minus the lease"
    );
    // A return of another generation changes nothing: neither the count nor the tokens.
    let stale = (generation - 1).to_string();
    let back = |unspent: &str, generation: &str| {
        vec![
            "100".to_string(),
            "1".into(),
            unspent.into(),
            "12".into(),
            "L".into(),
            "250".into(),
            "1".into(),
            "10".into(),
            generation.into(),
        ]
    };
    let args = back("4", &stale);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    eval_many(&mut conn, &k, &args).await.unwrap();
    let (tokens, leased, _, _) = leased_state(&mut conn, "tb:lease").await.unwrap();
    assert_eq!((tokens, leased), (90.0, 10.0));
    // The lease's own return: 4 unspent back, nothing leased out: two doubles again.
    let args = back("4", &generation.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reply = eval_many(&mut conn, &k, &args).await.unwrap();
    assert_eq!(answers(&reply)[0].1, 94.0);
    assert!(leased_state(&mut conn, "tb:lease").await.is_none());
    let reply = eval_many(&mut conn, &k, &["100", "1", "100", "3"])
        .await
        .unwrap();
    assert_eq!(answers(&reply)[0].1, 100.0, "all of it again");

    // No lease while the bucket would keep less than half: 45 left of 100.
    let reply = eval_many(
        &mut conn,
        &k2,
        &["100", "1", "45", "1", "100", "1", "10", "11", "L", "250"],
    )
    .await
    .unwrap();
    assert_eq!(
        answers(&reply)[1],
        (true, 55.0, 0),
        "allowed, nothing taken"
    );
    assert!(leased_state(&mut conn, "tb:lease").await.is_none());

    // A lease of a vetoed group is not taken.
    let g = ["tb:lease:a", "tb:lease:b"];
    let reply = eval_many(
        &mut conn,
        &g,
        &[
            "100", "1", "10", "11", "10", "1", "11", "1", "2", "L", "250",
        ],
    )
    .await
    .unwrap();
    let a = answers(&reply);
    assert!(!a[1].0, "11 of 10: denied");
    assert_eq!(a[0].2, 0, "the group's lease took nothing");
    let raw: Option<Vec<u8>> = redis::cmd("GET")
        .arg("tb:lease:a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(raw.is_none(), "nothing written");

    // A generation ends when its last lease expires: what it leased out is the bucket's again.
    let short = ["tb:short"];
    eval_many(&mut conn, &short, &["100", "1000", "10", "11", "L", "30"])
        .await
        .unwrap();
    let (_, leased, short_gen, _) = leased_state(&mut conn, "tb:short").await.unwrap();
    assert_eq!(leased, 10.0);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let reply = eval_many(&mut conn, &short, &["100", "1000", "0", "2"])
        .await
        .unwrap();
    assert_eq!(
        answers(&reply)[0].1,
        100.0,
        "refilled to the whole capacity"
    );
    // Its lease coming back late puts nothing back: the refill has filled its room. (Added, its
    // 10 unspent tokens would let a burst take 10 more than the bucket allows.)
    let reply = eval_many(&mut conn, &short, &["100", "1000", "50", "1"])
        .await
        .unwrap();
    let taken = answers(&reply)[0].1;
    let short_gen = short_gen.to_string();
    let late = ["100", "1000", "10", "12", "L", "30", "1", "10", &short_gen];
    let reply = eval_many(&mut conn, &short, &late).await.unwrap();
    let tokens = answers(&reply)[0].1;
    // Between the two calls the refill adds a token a millisecond; the return would add 10.
    assert!(
        tokens - taken < 8.0,
        "a late return added tokens: {taken} -> {tokens}"
    );

    // Leases need their lifetime, returns their lease.
    let err = eval_many(&mut conn, &k, &["100", "1", "10", "11"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lifetime"), "{err}");
    let err = eval_many(&mut conn, &k, &["100", "1", "10", "12", "L", "250"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lease return"), "{err}");
    let err = eval_many(
        &mut conn,
        &k,
        &["100", "1", "10", "1", "L", "250", "1", "10", "7"],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not a return"), "{err}");
}

#[tokio::test]
async fn huge_costs_and_tiny_rates_cap_the_figures() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    // The review's case: retry_after overflowed to -9223372036854775808.
    let (allowed, _, retry, _) = eval(&mut conn, ["1", "1", "1e16", "1"]).await.unwrap();
    assert_eq!((allowed, retry), (0, MAX_MS));
    let (allowed, _, retry, _) = eval(&mut conn, ["10", "1e-17", "18446744073709551615", "1"])
        .await
        .unwrap();
    assert_eq!((allowed, retry), (0, MAX_MS));
    let (allowed, _, _, reset) = eval(&mut conn, ["10", "1e-17", "1", "1"]).await.unwrap();
    assert_eq!((allowed, reset), (1, MAX_MS));
    // A forced charge of an absurd cost floors at -capacity.
    let (allowed, tokens, retry, _) = eval(&mut conn, ["10", "1e-300", "1e300", "4"])
        .await
        .unwrap();
    assert_eq!((allowed, tokens.as_str(), retry), (0, "-10", MAX_MS));
}

#[tokio::test]
async fn several_buckets_and_groups_in_one_call() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let shape = ["5", "0.001"];
    let args = |costs_modes: &[(&'static str, &'static str)], groups: &[&'static str]| {
        let mut a: Vec<&str> = Vec::new();
        for (cost, mode) in costs_modes {
            a.extend(shape);
            a.push(cost);
            a.push(mode);
        }
        a.extend(groups);
        a
    };
    // Three independent buckets: the third is denied, the others charged.
    let r = eval_many(
        &mut conn,
        &["a", "b", "c"],
        &args(&[("2", "1"), ("3", "1"), ("9", "1")], &[]),
    )
    .await
    .unwrap();
    assert_eq!(
        verdicts(&r).iter().map(|v| v.0).collect::<Vec<_>>(),
        [true, true, false]
    );
    assert!(stored(&mut conn, "a").await.is_some());

    // One group of three: d would pass, e is denied, f is a forced charge: d is not charged.
    let r = eval_many(
        &mut conn,
        &["d", "e", "f"],
        &args(&[("2", "1"), ("9", "1"), ("4", "4")], &["3"]),
    )
    .await
    .unwrap();
    let v = verdicts(&r);
    assert!(v[0].0 && !v[1].0, "{v:?}");
    assert!(
        (v[0].1 - 5.0).abs() < 0.01,
        "d reports the tokens really there: {v:?}"
    );
    assert!(stored(&mut conn, "d").await.is_none(), "d was charged");
    assert!((stored(&mut conn, "f").await.unwrap().0 - 1.0).abs() < 0.01);

    // A shadow take (mode 5) denied vetoes nothing.
    let r = eval_many(
        &mut conn,
        &["g", "h"],
        &args(&[("2", "1"), ("9", "5")], &["2"]),
    )
    .await
    .unwrap();
    assert!(!verdicts(&r)[1].0);
    assert!(stored(&mut conn, "g").await.is_some());

    // The same key twice in one group: the second sees the first.
    let r = eval_many(
        &mut conn,
        &["i", "i"],
        &args(&[("3", "1"), ("3", "1")], &["1", "1"]),
    )
    .await
    .unwrap();
    assert_eq!(
        verdicts(&r).iter().map(|v| v.0).collect::<Vec<_>>(),
        [true, false]
    );
}

#[tokio::test]
async fn keys_in_argv_for_a_cluster_node() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let r: Vec<redis::Value> = redis::cmd("EVAL")
        .arg(TOKEN_BUCKET_LUA)
        .arg(0)
        .arg(&["2", "x", "y", "5", "1", "5", "1", "5", "1", "1", "1"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let v = verdicts(&r);
    assert_eq!(v, [(true, 0.0), (true, 4.0)]);
    assert!(stored(&mut conn, "x").await.is_some() && stored(&mut conn, "y").await.is_some());
}

#[tokio::test]
async fn reads_the_hash_of_earlier_versions_and_refuses_foreign_values() {
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    let _: () = redis::cmd("HSET")
        .arg("tb:lua")
        .arg(&["tokens", "3", "ts", &now_ms.to_string()])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (allowed, tokens, _, _) = eval(&mut conn, ["10", "0.001", "1", "1"]).await.unwrap();
    assert_eq!(allowed, 1);
    assert!(
        (tokens.parse::<f64>().unwrap() - 2.0).abs() < 0.01,
        "{tokens}"
    );
    assert!(
        stored(&mut conn, "tb:lua").await.is_some(),
        "rewritten as a string"
    );

    let _: () = redis::cmd("SET")
        .arg("tb:lua")
        .arg("not a bucket")
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = eval(&mut conn, ["10", "1", "1", "1"]).await.unwrap_err();
    assert!(err.to_string().contains("did not write"), "{err}");
}

#[tokio::test]
async fn a_future_timestamp_adds_nothing() {
    // A bucket written by a server whose clock was ahead (or a replica promoted with a clock
    // behind): elapsed is negative, clamped to zero, and the stored time is not moved back.
    let server = crate::support::RedisServer::start().await;
    let mut conn = server.connection().await;
    let future_ms = 4_102_444_800_000.0_f64; // year 2100
    let mut value = 0.0f64.to_le_bytes().to_vec();
    value.extend(future_ms.to_le_bytes());
    let _: () = redis::cmd("SET")
        .arg("tb:lua")
        .arg(value)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (allowed, tokens, _, _) = eval(&mut conn, ["10", "1000", "1", "1"]).await.unwrap();
    assert_eq!(allowed, 0);
    assert_eq!(tokens.parse::<f64>().unwrap(), 0.0);
    eval(&mut conn, ["10", "1000", "1", "3"]).await.unwrap(); // a refund writes
    let (tokens, ts) = stored(&mut conn, "tb:lua").await.unwrap();
    assert_eq!((tokens, ts), (1.0, future_ms));
}

mod batched {
    //! One script call deciding many buckets answers exactly as one call per bucket (and, with
    //! groups, as the Rust arithmetic of the memory backend), on random operation sequences.
    use super::*;
    use proptest::prelude::*;
    use sluicegate_core::backend::{BucketRequest, MemoryBackend};
    use sluicegate_core::{Op, Shape};

    /// A refill so slow that the microseconds between calls add nothing measurable.
    const RATE: &str = "0.000000001";

    fn op(kind: u8, cost: u64) -> Op {
        match kind {
            0 => Op::Take(cost),
            1 => Op::Check(cost),
            2 => Op::Refund(cost),
            3 => Op::Force(cost),
            _ => Op::TakeUpTo(cost),
        }
    }

    fn mode(op: Op, veto: bool) -> u8 {
        let base = match op {
            Op::Take(_) => 1,
            Op::Check(_) => 2,
            Op::Refund(_) => return 3,
            Op::Force(_) => 4,
            Op::TakeUpTo(_) => 10,
        };
        if veto { base } else { base + 4 }
    }

    fn args(ops: &[(usize, Op, bool)]) -> Vec<String> {
        ops.iter()
            .flat_map(|&(_, op, veto)| {
                [
                    "10".to_string(),
                    RATE.to_string(),
                    op.cost().to_string(),
                    mode(op, veto).to_string(),
                ]
            })
            .collect()
    }

    fn ops_strategy() -> impl Strategy<Value = Vec<(usize, Op, bool)>> {
        prop::collection::vec((0usize..4, 0u8..5, 0u64..14, any::<bool>()), 1..30).prop_map(|v| {
            v.into_iter()
                .map(|(k, kind, cost, veto)| (k, op(kind, cost), veto))
                .collect()
        })
    }

    fn same(a: &[(bool, f64, u64)], b: &[(bool, f64, u64)]) -> Result<(), TestCaseError> {
        prop_assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            prop_assert_eq!(x.0, y.0, "verdict of op {}", i);
            prop_assert_eq!(x.2, y.2, "tokens taken by op {}", i);
            prop_assert!(
                (x.1 - y.1).abs() < 1e-6,
                "tokens of op {}: {} vs {}",
                i,
                x.1,
                y.1
            );
        }
        Ok(())
    }

    #[test]
    fn one_call_answers_like_one_call_per_bucket() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(crate::support::RedisServer::start());
        let conn = rt.block_on(server.connection());
        let cases = std::sync::atomic::AtomicU32::new(0);
        proptest!(ProptestConfig::with_cases(48), |(ops in ops_strategy())| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut conn = conn.clone();
            let (single, batched) = rt.block_on(async {
                let mut single = Vec::new();
                for &(k, o, veto) in &ops {
                    let key = format!("s{case}:{k}");
                    let r = eval_many(&mut conn, &[&key], &args(&[(k, o, veto)]).iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
                    single.extend(answers(&r));
                }
                let keys: Vec<String> = ops.iter().map(|(k, _, _)| format!("b{case}:{k}")).collect();
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let a = args(&ops);
                let r = eval_many(&mut conn, &keys, &a.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
                (single, answers(&r))
            });
            same(&single, &batched)?;
        });
    }

    #[test]
    fn groups_answer_like_the_rust_arithmetic() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(crate::support::RedisServer::start());
        let conn = rt.block_on(server.connection());
        let cases = std::sync::atomic::AtomicU32::new(0);
        proptest!(ProptestConfig::with_cases(48), |(ops in ops_strategy(), cuts in prop::collection::vec(1usize..5, 1..10))| {
            let case = cases.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut conn = conn.clone();
            // Split the ops into consecutive groups of the given lengths (the rest: one group).
            let mut groups: Vec<usize> = Vec::new();
            let mut left = ops.len();
            for c in cuts {
                if left == 0 { break; }
                let g = c.min(left);
                groups.push(g);
                left -= g;
            }
            if left > 0 { groups.push(left); }
            let memory = MemoryBackend::new(1000);
            let shape = Shape::new(10.0, 1e-9).unwrap();
            let keys: Vec<String> = ops.iter().map(|(k, _, _)| format!("g{case}:{k}")).collect();
            let mut rust = Vec::new();
            let mut at = 0;
            for &g in &groups {
                let reqs: Vec<BucketRequest<'_>> = (at..at + g)
                    .map(|i| BucketRequest::new(&keys[i], shape, ops[i].1).with_veto(ops[i].2))
                    .collect();
                rust.extend(memory.decide_group_now(&reqs, true).into_iter().map(|d| (d.allowed, d.tokens_remaining, d.granted)));
                at += g;
            }
            let lua = rt.block_on(async {
                let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                let mut a = args(&ops);
                a.extend(groups.iter().map(|g| g.to_string()));
                let r = eval_many(&mut conn, &key_refs, &a.iter().map(String::as_str).collect::<Vec<_>>()).await.unwrap();
                answers(&r)
            });
            same(&rust, &lua)?;
        });
    }
}
