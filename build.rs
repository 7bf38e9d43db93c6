//! Compiles `proto/` with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/latchkey/v1/broker.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // The encoded descriptors, for gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("latchkey_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Messages carrying secrets get a hand-written, redacted Debug (src/transport/mod.rs).
        .skip_debug([
            "latchkey.v1.Credential",
            "latchkey.v1.MintResponse",
            "latchkey.v1.RenewRequest",
            "latchkey.v1.RevokeRequest",
            "latchkey.v1.IntrospectRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
