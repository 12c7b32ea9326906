//! Leased quota across processes and replicas: two `sluicegate-load --api leased` processes, each
//! leasing through its own replica of one Redis, on one hot key. Together they never admit more
//! than the bucket allows over the run, each run's own bound check passes, and most of the bound
//! is admitted (leases stop hoarding near the limit).

use std::process::Command;

use crate::support::{LoadRuns, RedisServer, Sluicegate, workspace_bin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_clients_on_two_replicas_hold_the_bound() {
    let redis = RedisServer::start().await;
    let env = [("REDIS_TIMEOUT_MS", "2000"), ("MAX_QUEUE_MS", "1000")];
    let a = Sluicegate::start(&["--redis-url", &redis.url()], &env).await;
    let b = Sluicegate::start(&["--redis-url", &redis.url()], &env).await;
    let dir = tempfile::tempdir().unwrap();
    let (capacity, rate) = (100.0, 200.0);
    let runs: Vec<_> = [&a, &b]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let json = dir.path().join(format!("run{i}.json"));
            let mut cmd = Command::new(workspace_bin("sluicegate-load"));
            cmd.args(["--target", &t.grpc_url(), "--api", "leased", "--keys", "1"])
                .args([
                    "--capacity",
                    &capacity.to_string(),
                    "--rate",
                    &rate.to_string(),
                ])
                .args(["--concurrency", "8", "--duration", "3s", "--check-bound"])
                .arg("--json")
                .arg(&json);
            (cmd.spawn().expect("spawn sluicegate-load"), json)
        })
        .collect();
    let runs = LoadRuns::wait(runs).await;
    let num = |j: &serde_json::Value, f: &str| j[f].as_f64().unwrap();
    for j in &runs.reports {
        assert_eq!(num(&j["bound"], "violations"), 0.0, "{j}");
        assert!(num(j, "calls_per_decision") < 0.2, "{j}");
    }
    let admitted = runs.sum("allowed");
    let bound = runs.bound(capacity, rate);
    assert!(admitted <= bound, "admitted {admitted} > {bound}");
    assert!(admitted >= 0.5 * bound, "admitted {admitted} of {bound}");
    eprintln!(
        "admitted {admitted} of a bound of {bound:.0} ({:.1}%)",
        100.0 * admitted / bound
    );
}
