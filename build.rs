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
//!
//! The same for RLQS's `BucketId`: its `map<string, string>` is read as a repeated (bytes, bytes)
//! entry, which is what a map is on the wire. The values are request attributes (a header's value),
//! and a map would also lose the order and the bytes Envoy sent, which an assignment must echo.

use std::{env, path::PathBuf};

use prost_types::field_descriptor_proto::Type;

const PROTOS: &[&str] = &[
    "sluicegate/v1/sluicegate.proto",
    "envoy/service/ratelimit/v3/rls.proto",
    "envoy/service/rate_limit_quota/v3/rlqs.proto",
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

    let rlqs = fds
        .file
        .iter_mut()
        .find(|f| f.package() == "envoy.service.rate_limit_quota.v3")
        .ok_or("the RLQS proto not found")?;
    // The rewritten entry has no place in the source, where prost would look its comments up.
    rlqs.source_code_info = None;
    let bucket_entry = rlqs
        .message_type
        .iter_mut()
        .filter(|m| m.name() == "BucketId")
        .flat_map(|m| m.nested_type.iter_mut())
        .find(|m| m.options.as_ref().is_some_and(|o| o.map_entry()))
        .ok_or("BucketId's map entry not found in the Envoy protos")?;
    if let Some(options) = bucket_entry.options.as_mut() {
        options.map_entry = None;
    }
    for field in &mut bucket_entry.field {
        field.set_type(Type::Bytes);
    }

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
