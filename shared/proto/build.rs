//! Compiles every `.proto` under the workspace's `proto/` with protox (no system protoc),
//! generates tonic clients and servers, and keeps the encoded descriptor set for reflection.

use std::path::{Path, PathBuf};

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect_protos(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let proto_root = manifest_dir.join("../../proto");
    let mut files = Vec::new();
    collect_protos(&proto_root, &mut files);
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let fds = protox::compile(&files, [&proto_root]).unwrap_or_else(|e| panic!("{e:?}"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(
        out_dir.join("kiln_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )
    .expect("write descriptor set");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // NodeService has an RPC named Connect, which would clash with the generated
        // `connect` constructor; clients are built with `new(channel)` instead.
        .build_transport(false)
        // File chunks and tensors move without copies.
        .bytes(".")
        .compile_fds(fds)
        .expect("generate code");
}
