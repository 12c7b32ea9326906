//! The test harness, one file per fixture: real `redis-server`, Redis Cluster and Sentinel, Envoy,
//! the `sluicegate` and `sluicegate-demo` binaries, test certificates, all on free loopback ports and
//! stopped when dropped. A missing tool fails the test with the command that installs it.
//!
//! - `process.rs`: hermetic spawning, ports, waiting, the `Sluicegate` server and its gRPC calls;
//! - `redis.rs`, `cluster.rs`, `sentinel.rs`: Redis as one server, a cluster, a sentinel group;
//! - `envoy.rs`: RLS request helpers, a real Envoy, an upstream for it;
//! - `http.rs`: a raw HTTP client, metric values, the demo app;
//! - `pki.rs`: certificates made with openssl.

pub mod cluster;
pub mod envoy;
pub mod http;
pub mod pki;
pub mod process;
pub mod redis;
pub mod sentinel;

pub use cluster::RedisCluster;
pub use envoy::{Envoy, INSTALL_ENVOY, Upstream, envoy_bin};
pub use http::{
    Demo, HttpAnswer, http_get, http_post_json, http_request, metric, metric_value, raw_http,
};
pub use process::{
    LoadRuns, NOT_SERVING, SERVING, Sluicegate, ask, eventually, free_port, health, our_binary,
    repo_path, should_allow, workspace_bin,
};
pub use redis::{INSTALL_REDIS, RedisServer};
pub use sentinel::{RedisSentinels, SENTINEL_MASTER};
