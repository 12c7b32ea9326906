//! The build script of the `sluicegate-proto` crate (`proto/Cargo.toml`; cargo runs it in `proto/`).
//!
//! Compiles the .proto files with protox (pure Rust, so no system protoc) and writes the descriptor set that
//! gRPC server reflection serves.
//!
//! One change from the protos as written: the generated code reads Envoy's descriptor entries
//! (`RateLimitDescriptor.Entry.key` and `.value`) as bytes. They carry header values from Envoy's
//! clients, and Envoy relays them without checking UTF-8; read as `string`, one byte 0xFF would fail
//! the whole call to decode, and Envoy lets a failed call through. `string` and `bytes` are the same
//! on the wire, so nothing else changes; reflection still serves the protos as written.

use std::{env, path::PathBuf};

use prost_types::field_descriptor_proto::Type;

const PROTOS: &[&str] = &[
    "sluicegate/v1/sluicegate.proto",
    "envoy/service/ratelimit/v3/rls.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=sluicegate");
    println!("cargo:rerun-if-changed=envoy");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let mut fds = protox::compile(PROTOS, ["."])?;
    std::fs::write(
        out.join("sluicegate_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let entry = fds
        .file
        .iter_mut()
        .filter(|f| f.package() == "envoy.extensions.common.ratelimit.v3")
        .flat_map(|f| f.message_type.iter_mut())
        .filter(|m| m.name() == "RateLimitDescriptor")
        .flat_map(|m| m.nested_type.iter_mut())
        .find(|m| m.name() == "Entry")
        .ok_or("RateLimitDescriptor.Entry not found in the Envoy protos")?;
    for field in &mut entry.field {
        field.set_type(Type::Bytes);
    }

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
