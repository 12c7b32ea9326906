//! Compiles the workspace's `proto/` (sluicegate.v1 and Envoy's RLS v3) into client stubs with protox
//! (pure Rust, so no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let fds = protox::compile(
        [
            "../proto/sluicegate/v1/sluicegate.proto",
            "../proto/envoy/service/ratelimit/v3/rls.proto",
        ],
        ["../proto"],
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
