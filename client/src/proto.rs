//! Code generated from the workspace's `proto/`: sluicegate's own API and Envoy's rate-limit API
//! (clients and servers; the servers are handy for fakes in tests).

/// `sluicegate.v1`: ShouldAllow, ShouldAllowBatch, Settle.
pub mod sluicegate {
    #[allow(missing_docs)]
    pub mod v1 {
        tonic::include_proto!("sluicegate.v1");
    }
}

/// Envoy's rate-limit API (a wire-compatible copy of the data-plane-api protos).
#[allow(missing_docs)]
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
