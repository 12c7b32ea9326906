//! A throwaway `redis-server` in its own temp dir, and a set of server processes by port (for the
//! cluster and sentinel fixtures). A missing tool fails the test with the command that installs it.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::process::free_port;

pub const INSTALL_REDIS: &str = "redis-server not found: install it with `apt-get install -y redis-server` (scripts/test.sh does)";

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

    /// Makes Redis sleep `seconds` (DEBUG SLEEP), from a task of its own: every command sent
    /// meanwhile waits. Await the handle to know it is awake again.
    pub async fn sleep(&self, seconds: u64) -> tokio::task::JoinHandle<()> {
        let mut admin = self.connection().await;
        tokio::spawn(async move {
            // The admin connection may time out its own reply; only the sleep matters.
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query_async(&mut admin)
                .await;
        })
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

pub(crate) async fn ping(url: &str) -> bool {
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

/// Server processes by port, killed when dropped.
#[derive(Default)]
pub struct Procs(Vec<(u16, Child)>);

impl Procs {
    pub(crate) fn add(&mut self, port: u16, child: Child) {
        self.0.push((port, child));
    }

    pub(crate) fn ports(&self) -> impl Iterator<Item = u16> + '_ {
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
