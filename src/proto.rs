//! Code generated from `proto/` by `build.rs`, and the descriptor set reflection serves.

pub mod sluicegate {
    pub mod v1 {
        tonic::include_proto!("sluicegate.v1");
    }
}

/// Envoy's rate-limit API (our wire-compatible copy of the data-plane-api protos).
pub mod envoy {
    pub mod service {
        pub mod ratelimit {
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
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
