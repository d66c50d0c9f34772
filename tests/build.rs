//! Generates the bench-only echo service (the bare tonic baseline).

fn main() {
    println!("cargo:rerun-if-changed=proto/echo.proto");
    let fds = protox::compile(["proto/echo.proto"], ["proto"]).unwrap_or_else(|e| panic!("{e:?}"));
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate echo service");
}
