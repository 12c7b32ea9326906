//! sluicegate's generated gRPC code, compiled once for the workspace by the top-level `build.rs`
//! from the .proto files beside this crate: `sluicegate.v1` and Envoy's rate-limit API, clients and
//! servers, and the descriptor set reflection serves.
//!
//! One change from the protos as written: Envoy's descriptor entries
//! (`RateLimitDescriptor.Entry.key` and `.value`) are bytes here (`Vec<u8>`), since Envoy relays
//! header values without checking UTF-8, and RLQS's `BucketId` is a list of (bytes, bytes) entries,
//! which is its map on the wire (see `build.rs`).

/// `sluicegate.v1`: ShouldAllow, ShouldAllowBatch, Settle.
pub mod sluicegate {
    #[allow(missing_docs)]
    pub mod v1 {
        tonic::include_proto!("sluicegate.v1");
    }
}

/// Envoy's rate-limit APIs, RLS v3 and RLQS v3 (our wire-compatible copy of the data-plane-api
/// protos at v1.40).
#[allow(missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
        pub mod rate_limit_quota {
            pub mod v3 {
                tonic::include_proto!("envoy.service.rate_limit_quota.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod common {
            pub mod ratelimit {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// Every file of `proto/` (and the well-known types they import), encoded, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/sluicegate_descriptor.bin"));
