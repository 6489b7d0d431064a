//! Compiles `tollguard/v1/*.proto` with the protoc shipped by
//! `protoc-bin-vendored`, so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single threaded.
    unsafe_env_set("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "tollguard/v1/call_event.proto",
        "tollguard/v1/ingest.proto",
        "tollguard/v1/alert.proto",
        "tollguard/v1/alerts.proto",
        "tollguard/v1/delivery.proto",
        "tollguard/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT naming the field
        // (src/codec.rs), not tonic-prost's INTERNAL.
        .codec_path("crate::codec::StrictProstCodec")
        .file_descriptor_set_path(out.join("tollguard_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env_set(key: &str, value: std::path::PathBuf) {
    // Build scripts run single-threaded, so setting the environment is sound.
    unsafe { std::env::set_var(key, value) };
}
