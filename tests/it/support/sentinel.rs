//! Redis Sentinel: a master, a replica and three sentinels on loopback.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use super::cluster::RedisCluster;
use super::process::{eventually, free_port};
use super::redis::{INSTALL_REDIS, Procs};

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
