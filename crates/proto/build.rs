//! Compiles `proto/` with the vendored `protoc`, and writes a descriptor set for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "modelhub/common/v1/common.proto",
        "modelhub/registry/v1/registry.proto",
        "modelhub/storage/v1/storage.proto",
        "modelhub/inference/v1/inference.proto",
        "modelhub/prover/v1/prover.proto",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("modelhub_descriptor.bin"))
        .compile_with_config(
            config,
            &files.map(|f| root.join(f)),
            std::slice::from_ref(&root),
        )?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
