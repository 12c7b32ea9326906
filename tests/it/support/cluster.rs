//! A throwaway Redis Cluster on loopback.

use std::{
    net::TcpListener,
    process::{Command, Stdio},
    time::Duration,
};

use super::process::eventually;
use super::redis::ping;
use super::redis::{INSTALL_REDIS, Procs};

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
