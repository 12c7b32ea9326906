//! Processes and ports: our binaries run hermetically, free loopback ports, waiting for a process
//! to serve; the `Sluicegate` server fixture and the gRPC calls most tests make.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluicegate_proto::sluicegate::v1::{
    ShouldAllowRequest, ShouldAllowResponse, rate_limit_service_client::RateLimitServiceClient,
};
use tonic::transport::Channel;

use super::http::http_get;

/// An empty directory, made once per test process: our binaries run from it, so a `.env` in the
/// developer's checkout never leaks into a test.
pub fn hermetic_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temp dir"))
        .path()
}

/// One of this workspace's binaries, ready to spawn hermetically: a clean environment (only PATH
/// and `RUST_LOG=error`) and an empty working directory.
pub fn our_binary(path: &str) -> Command {
    let mut cmd = Command::new(path);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "error")
        .current_dir(hermetic_dir());
    cmd
}

/// A binary of another package of the workspace (sluicegate-demo, sluicegate-load: `client/`), next
/// to this test's own executable. `cargo build --workspace --bins` builds them (scripts/test.sh
/// does).
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build --workspace --bins` (scripts/test.sh does)",
        bin.display()
    );
    bin.display().to_string()
}

/// A file of this repository by its path from the root, absolute (binaries run elsewhere).
pub fn repo_path(relative: &str) -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(relative)
        .display()
        .to_string()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Polls `check` until it returns true or `within` elapses.
pub async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `up` says the process in `child` serves (true), or the process exits (false: e.g. its
/// port was taken by a parallel test between our pick and its bind).
pub(crate) async fn serving(
    child: &mut Option<Child>,
    what: &str,
    mut up: impl AsyncFnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if up().await {
            return true;
        }
        if let Some(Ok(Some(_))) = child.as_mut().map(|c| c.try_wait()) {
            *child = None;
            return false;
        }
        assert!(Instant::now() < deadline, "{what} did not come up in 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A sluicegate process with its own ports.
pub struct Sluicegate {
    pub grpc_port: u16,
    pub http_port: u16,
    child: Option<Child>,
}

impl Sluicegate {
    /// Starts `sluicegate` with extra flags and environment, and waits until its HTTP listener
    /// answers. The environment starts clean of sluicegate's variables so the host cannot leak in.
    pub async fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_logging(args, env, None).await
    }

    /// As [`Sluicegate::start`], with its stderr (the log) written to `log` when given.
    pub async fn start_logging(
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        // A port picked free can be taken by a parallel test before sluicegate binds it: then
        // sluicegate exits at once, and we try again on other ports.
        for _ in 0..5 {
            if let Some(t) = Self::try_start(args, env, log).await {
                return t;
            }
        }
        panic!("sluicegate did not start (see its stderr above)");
    }

    /// As [`Sluicegate::start`], on given ports (a restart where clients expect it).
    pub async fn start_on(
        grpc_port: u16,
        http_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::try_start_on(grpc_port, http_port, args, env, None)
            .await
            .expect("sluicegate did not start on its ports (see its stderr above)")
    }

    async fn try_start(
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Option<Self> {
        Self::try_start_on(free_port(), free_port(), args, env, log).await
    }

    async fn try_start_on(
        grpc_port: u16,
        http_port: u16,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Option<Self> {
        let mut cmd = our_binary(env!("CARGO_BIN_EXE_sluicegate"));
        // The product's REDIS_TIMEOUT_MS (15 ms) is sized to answer before Envoy's 20 ms RLS
        // timeout on a production machine; the tests run debug builds, many at once, on two
        // cores, where a Redis round trip (or the first script load) can take longer than that
        // now and then, and a test about rules or counts would fail on a timeout it is not about.
        // A test about timeouts sets its own (flag or variable), which this leaves alone.
        let sets_timeout = env.iter().any(|(k, _)| *k == "REDIS_TIMEOUT_MS")
            || args.iter().any(|a| a.starts_with("--redis-timeout-ms"));
        if !sets_timeout {
            cmd.env("REDIS_TIMEOUT_MS", "1000");
        }
        // The same for MAX_QUEUE_MS (10 ms) and the adaptive limit that aims under it: a debug
        // build on two busy cores waits that long for a turn now and then, and a test about
        // something else would see its calls shed. A test about shedding sets its own.
        let sets_queue = env.iter().any(|(k, _)| *k == "MAX_QUEUE_MS")
            || args.iter().any(|a| a.starts_with("--max-queue-ms"));
        if !sets_queue {
            cmd.env("MAX_QUEUE_MS", "1000");
        }
        cmd.envs(env.iter().copied())
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(args)
            .stdout(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).expect("create the log file"));
        }
        let child = cmd.spawn().expect("spawn sluicegate");
        let mut t = Sluicegate {
            grpc_port,
            http_port,
            child: Some(child),
        };
        let url = format!("http://127.0.0.1:{http_port}/healthz");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if http_get(&url)
                .await
                .is_some_and(|(status, _)| status == 200)
            {
                return Some(t);
            }
            if let Some(Ok(Some(_))) = t.child.as_mut().map(|c| c.try_wait()) {
                t.child = None;
                return None;
            }
            assert!(
                Instant::now() < deadline,
                "sluicegate /healthz did not answer in 15 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The Prometheus text on `/metrics`.
    pub async fn metrics(&self) -> String {
        super::http_get(&self.http_url("/metrics"))
            .await
            .expect("/metrics answers")
            .1
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(self.grpc_url())
            .await
            .expect("connect to sluicegate")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends SIGTERM and waits for the exit status (None if it did not exit within `within`).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal_term();
        self.wait_exit(within)
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        if let Some(child) = self.child.as_ref() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Waits for the process to exit (None if it did not within `within`).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sluicegate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A ShouldAllow request for `key` with the given shape (0 = server default) and cost.
pub fn ask(key: &str, capacity: f64, rate: f64, cost: u32) -> ShouldAllowRequest {
    ShouldAllowRequest {
        key: key.to_string(),
        cost,
        capacity,
        rate,
        dry_run: false,
        ..Default::default()
    }
}

pub async fn should_allow(
    client: &mut RateLimitServiceClient<Channel>,
    req: ShouldAllowRequest,
) -> Result<ShouldAllowResponse, tonic::Status> {
    client.should_allow(req).await.map(|r| r.into_inner())
}

/// The gRPC health status of `service` ("" is the whole server).
pub async fn health(grpc_url: &str, service: &str) -> Option<i32> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = Channel::from_shared(grpc_url.to_string())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let answer = client
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .ok()?;
    Some(answer.into_inner().status)
}

pub const SERVING: i32 = 1;
pub const NOT_SERVING: i32 = 2;

/// What concurrent `sluicegate-load` runs reported together: each run's JSON (each exited 0),
/// and the span they covered, from the first start to the last end (seconds since the epoch).
pub struct LoadRuns {
    pub reports: Vec<serde_json::Value>,
    pub start: f64,
    pub end: f64,
}

impl LoadRuns {
    /// Waits for every run (its command spawned, its `--json` file) and reads its report.
    pub async fn wait(runs: Vec<(std::process::Child, std::path::PathBuf)>) -> Self {
        let mut reports = Vec::new();
        for (mut child, json) in runs {
            let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
                .await
                .unwrap();
            assert!(status.success(), "sluicegate-load: {status}");
            reports.push(serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap());
        }
        let num = |j: &serde_json::Value, f: &str| j[f].as_f64().unwrap();
        let start = reports
            .iter()
            .map(|j| num(j, "started_unix_s"))
            .fold(f64::MAX, f64::min);
        let end = reports
            .iter()
            .map(|j| num(j, "started_unix_s") + num(j, "duration_s"))
            .fold(0.0, f64::max);
        Self {
            reports,
            start,
            end,
        }
    }

    /// The sum of a field over the runs.
    pub fn sum(&self, field: &str) -> f64 {
        self.reports
            .iter()
            .map(|j| j[field].as_f64().unwrap())
            .sum()
    }

    /// What a bucket allows over the runs' span: capacity + rate x span. Start times are written
    /// to the millisecond: a millisecond's refill of slack either side.
    pub fn bound(&self, capacity: f64, rate: f64) -> f64 {
        capacity + rate * (self.end - self.start + 0.002)
    }
}
