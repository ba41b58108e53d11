//! Compiles proto/csi.proto into Rust (prost messages, tonic services).
//!
//! protox parses the .proto file in Rust, so building needs no `protoc` on the machine and
//! the generated code can never drift from the .proto (nothing generated is checked in).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    let fds = protox::compile(["csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Clients are for tests and tools, connected by the caller (a Unix socket).
        .build_transport(false)
        // Messages that carry `csi_secret` fields get a redacting Debug in src/proto.rs.
        .skip_debug([
            ".csi.v1.CreateVolumeRequest",
            ".csi.v1.DeleteVolumeRequest",
            ".csi.v1.ValidateVolumeCapabilitiesRequest",
            ".csi.v1.NodePublishVolumeRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
