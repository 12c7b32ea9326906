//! The integration tests, one binary: a module per area, each test starting its own real processes
//! (redis-server, Redis Cluster and Sentinel, Envoy, sluicegate, the demo) through `support/`, the
//! harness, one file per fixture.

mod support;

mod backend_contract;
mod bounded_work;
mod bucket_model;
mod concurrency;
mod debug_endpoints;
mod demo;
mod deploy_files;
mod envoy_api;
mod envoy_e2e;
mod envoy_semantics;
mod envoy_wire;
mod grpc_tls;
mod in_flight;
mod in_flight_e2e;
mod kubernetes;
mod leased;
mod lua_script;
mod observability;
mod overload;
mod readme;
mod redis_cluster;
mod redis_faults;
mod redis_tls;
mod replica_leases;
mod rlqs_e2e;
mod rlqs_wire;
mod rules;
mod rules_props;
mod rules_reload;
mod settle_batch;
mod should_allow_api;
mod shutdown;
mod structure;
