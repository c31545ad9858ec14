//! Compiles proto/ with the vendored protoc, so a fresh machine needs only cargo. The
//! vendored include path supplies google/protobuf/struct.proto for the SPIFFE Workload API.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Messages that carry secrets (AWS keys, a WIT-SVID's private key) get a redacting
    // Debug (api.rs), not prost's.
    config.skip_debug(["mayfly.v1.AwsCredentials", "mayfly.v1.BreakGlassResponse", ".WITSVID"]);
    let protos: Vec<PathBuf> =
        ["proto/mayfly/v1/broker.proto", "proto/mayfly/v1/admin.proto", "proto/spiffe/workload.proto"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
    let includes = [PathBuf::from("proto"), protoc_bin_vendored::include_path()?];
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &protos, &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
