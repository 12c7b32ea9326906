//! Hot reload of rules in a running sluicegate: a valid edit takes effect without a restart or a
//! failed request, an invalid one keeps the old rules (and is counted), and a Kubernetes
//! ConfigMap's `..data` symlink swap is picked up.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::support::envoy::{RateLimitServiceClient, descriptor, request};
use crate::support::{Sluicegate, eventually, http_get};

fn rules(rpu: u32) -> String {
    format!(
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: {{ unit: minute, requests_per_unit: {rpu} }}\n"
    )
}

/// Replaces a file atomically, as editors and config management tools do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn limit_now(c: &mut RateLimitServiceClient<tonic::transport::Channel>) -> Option<u32> {
    let r = c
        .should_rate_limit(request("edge", vec![descriptor(&[("api_key", "probe")])]))
        .await
        .ok()?
        .into_inner();
    r.statuses[0]
        .current_limit
        .as_ref()
        .map(|l| l.requests_per_unit)
}

async fn reloads(t: &Sluicegate, outcome: &str) -> u64 {
    let (_, m) = http_get(&t.http_url("/metrics")).await.unwrap();
    let series = format!("sluicegate_rules_reloads_total{{outcome=\"{outcome}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_edit_applies_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules(3)).unwrap();
    let t = Sluicegate::start(&["--rules", path.to_str().unwrap()], &[]).await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    assert_eq!(limit_now(&mut c).await, Some(3));

    // Callers keep calling through the swap; not one call may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let hammer = {
        let (mut c, stop, calls, failures) =
            (c.clone(), stop.clone(), calls.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let req = request("edge", vec![descriptor(&[("api_key", "busy")])]);
                match c.should_rate_limit(req).await {
                    Ok(r) if r.get_ref().statuses.len() == 1 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    replace(&path, &rules(1000));
    eventually(Duration::from_secs(10), "the new limit", async || {
        limit_now(&mut c).await == Some(1000)
    })
    .await;
    // A plain in-place rewrite is picked up too.
    std::fs::write(&path, rules(500)).unwrap();
    eventually(Duration::from_secs(10), "the rewritten limit", async || {
        limit_now(&mut c).await == Some(500)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    hammer.await.unwrap();
    assert!(calls.load(Ordering::Relaxed) > 10, "the hammer ran");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "a request failed during the reload"
    );
    assert!(reloads(&t, "ok").await >= 3);
}

#[tokio::test]
async fn invalid_edit_keeps_the_old_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules(7)).unwrap();
    let t = Sluicegate::start(&["--rules", path.to_str().unwrap()], &[]).await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    assert_eq!(limit_now(&mut c).await, Some(7));
    let errors_before = reloads(&t, "error").await;
    replace(
        &path,
        "domain: edge\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: fortnight, requests_per_unit: 1 }\n",
    );
    eventually(
        Duration::from_secs(10),
        "the rejected reload to be counted",
        async || reloads(&t, "error").await > errors_before,
    )
    .await;
    assert_eq!(
        limit_now(&mut c).await,
        Some(7),
        "the old rules stay in force"
    );
    // Fixing the file recovers.
    replace(&path, &rules(8));
    eventually(Duration::from_secs(10), "the fixed rules", async || {
        limit_now(&mut c).await == Some(8)
    })
    .await;
}

#[cfg(unix)]
#[tokio::test]
async fn configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    // The layout a ConfigMap volume has: the visible file is a symlink through `..data`, itself a
    // symlink to a timestamped directory; an update swaps `..data` atomically.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_12_01_v1")).unwrap();
    std::fs::write(d.join("..2026_12_01_v1/rules.yaml"), rules(11)).unwrap();
    symlink("..2026_12_01_v1", d.join("..data")).unwrap();
    symlink("..data/rules.yaml", d.join("rules.yaml")).unwrap();

    let t = Sluicegate::start(&["--rules", d.to_str().unwrap()], &[]).await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    assert_eq!(limit_now(&mut c).await, Some(11));

    std::fs::create_dir(d.join("..2026_12_01_v2")).unwrap();
    std::fs::write(d.join("..2026_12_01_v2/rules.yaml"), rules(22)).unwrap();
    symlink("..2026_12_01_v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_12_01_v1")).unwrap();

    eventually(Duration::from_secs(10), "the swapped rules", async || {
        limit_now(&mut c).await == Some(22)
    })
    .await;
    assert_eq!(
        reloads(&t, "error").await,
        0,
        "the swap never exposed a broken state"
    );
}

/// `--rules rules.yaml` (a bare file name, relative to the working directory) is watched like any
/// other path: no fallback to slow polling, the edit applies at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_file_name_is_watched() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), rules(3)).unwrap();
    let (grpc, http) = (crate::support::free_port(), crate::support::free_port());
    let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
    let mut child = crate::support::our_binary(env!("CARGO_BIN_EXE_sluicegate"))
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .args(["--rules", "rules.yaml"])
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{grpc}");
    eventually(Duration::from_secs(15), "sluicegate up", async || {
        RateLimitServiceClient::connect(url.clone()).await.is_ok()
    })
    .await;
    let mut c = RateLimitServiceClient::connect(url).await.unwrap();
    assert_eq!(limit_now(&mut c).await, Some(3));
    replace(&dir.path().join("rules.yaml"), &rules(8));
    // Polling would take up to 2 s; a watched directory reacts within a few hundred ms.
    eventually(
        Duration::from_millis(1500),
        "the edit to apply",
        async || limit_now(&mut c).await == Some(8),
    )
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap();
    assert!(!stderr.contains("cannot watch"), "{stderr}");
}

/// A file written in two steps (a valid prefix, the rest a moment later, as a slow copy or a
/// `>` redirect does) is never loaded half-written: the limit holds at every moment. Then a
/// change that would leave the domain with no rules is refused, unless the file says
/// `descriptors: []`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_never_lifts_the_limits() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, rules(3)).unwrap();
    let t = Sluicegate::start(&["--rules", path.to_str().unwrap()], &[]).await;
    let mut c = RateLimitServiceClient::connect(t.grpc_url()).await.unwrap();
    assert_eq!(limit_now(&mut c).await, Some(3));

    let watch = {
        let mut c = c.clone();
        tokio::spawn(async move {
            // Every answer until the new rules are in: a limit, never none.
            let mut seen = Vec::new();
            loop {
                let limit = limit_now(&mut c).await;
                seen.push(limit);
                if limit == Some(4) || seen.len() > 2_000 {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let text = rules(4);
    let (prefix, rest) = text.split_at(text.find("descriptors").unwrap());
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(prefix.as_bytes()).unwrap();
    f.flush().unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    let seen = watch.await.unwrap();
    assert_eq!(seen.last(), Some(&Some(4)), "the whole file is loaded");
    assert!(
        seen.iter().all(|l| l.is_some()),
        "a moment without the limit: {seen:?}"
    );

    // A file with no descriptors at all: refused, the rules stay.
    let refused = reloads(&t, "error").await;
    replace(&path, "domain: edge\n");
    eventually(Duration::from_secs(10), "the refusal", async || {
        reloads(&t, "error").await > refused
    })
    .await;
    assert_eq!(limit_now(&mut c).await, Some(4));
    // Said on purpose: the domain's rules go.
    replace(&path, "domain: edge\ndescriptors: []\n");
    eventually(Duration::from_secs(10), "the rules to go", async || {
        limit_now(&mut c).await.is_none()
    })
    .await;
}
