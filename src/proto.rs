//! Code generated from `proto/` by `build.rs`, and the descriptor set reflection serves.

pub mod tollgate {
    pub mod v1 {
        tonic::include_proto!("tollgate.v1");
    }
}

/// Every file of `proto/`, encoded, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));
