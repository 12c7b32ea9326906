//! Memory per idle bucket, for `scripts/bench.sh`: N buckets made in the memory backend (resident
//! memory before and after), and, with a Redis URL, N buckets made through the Redis backend
//! (`used_memory` before and after).
//!
//!   cargo run --release --example bucket_memory -- 500000 [redis://127.0.0.1:6379/0]

use std::time::Duration;

use sluicegate_core::backend::{
    Backend, BucketRequest, MemoryBackend, RedisBackend, redis::RedisOptions,
};
use sluicegate_core::{Op, Shape};

/// Resident set size of this process, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn used_memory(url: &str) -> u64 {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    // A bucket that stays partly drained (and so stored) for the whole measurement.
    let shape = Shape::new(100.0, 0.001).unwrap();
    let keys: Vec<String> = (0..n).map(|i| format!("tb:user:load-{i}")).collect();

    let memory = MemoryBackend::new(n * 2);
    let before = rss_bytes();
    for k in &keys {
        memory.decide_now(BucketRequest::new(k, shape, Op::Take(1)));
    }
    let after = rss_bytes();
    println!(
        "memory backend: {n} buckets, {:.0} bytes of RSS per bucket",
        (after.saturating_sub(before)) as f64 / n as f64
    );

    if let Some(url) = std::env::args().nth(2) {
        let redis = RedisBackend::with_options(&url, RedisOptions::new(Duration::from_secs(5)))
            .expect("a Redis URL");
        let before = used_memory(&url).await;
        for chunk in keys.chunks(1000) {
            let calls = chunk
                .iter()
                .map(|k| redis.decide(BucketRequest::new(k, shape, Op::Take(1))));
            for r in futures::future::join_all(calls).await {
                r.expect("a decision");
            }
        }
        let after = used_memory(&url).await;
        println!(
            "redis backend: {n} buckets, {:.0} bytes of used_memory per bucket (keys like tb:user:load-123456)",
            (after.saturating_sub(before)) as f64 / n as f64
        );
    }
}
