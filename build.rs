//! Compiles `proto/` with protox (pure Rust), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/latchkey/v1/broker.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // Messages carrying secrets get a hand-written, redacted Debug (src/transport/proto.rs).
        .skip_debug(["latchkey.v1.Credential"])
        .compile_fds(fds)?;
    Ok(())
}
