//! Uploading a 100 MB artifact over loopback gRPC into the store, against a plain file copy of
//! the same bytes on the same disk, in one run.
//! `cargo bench -p kiln-tests --bench upload_throughput [-- MEGABYTES]`.

use std::time::Instant;

use kiln_proto::registry::v1::model::Kind;
use kiln_tests::TestMesh;
use kiln_tests::bench::{Args, block_on, cores, median};

fn main() {
    let megabytes: usize = Args::from_env().get(0, 100);
    block_on(None, async move {
        let mesh = TestMesh::start().await;
        let ch = mesh.tenant_channel("bench").await;

        // Pseudo-random bytes (incompressible, so neither side gets a shortcut).
        let dir = mesh.data_dir.path().join("bench-src");
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("artifact.bin");
        let mut state = 0x9e3779b97f4a7c15u64;
        let bytes: Vec<u8> = (0..megabytes << 20)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        std::fs::write(&source, &bytes).unwrap();
        drop(bytes);

        // Three rounds of each, alternating; the median of each is reported.
        let (sha, size) = kiln_registry::hash_file(&source).await.unwrap();
        let mut copies = Vec::new();
        let mut uploads = Vec::new();
        for round in 0..3 {
            let copy_target = dir.join(format!("copy-{round}.bin"));
            let started = Instant::now();
            std::fs::copy(&source, &copy_target).unwrap();
            std::fs::File::open(&copy_target)
                .unwrap()
                .sync_all()
                .unwrap();
            copies.push(started.elapsed().as_secs_f64());

            let model = kiln_tests::registry::create_model(
                &ch,
                "bench",
                &format!("artifact-{round}"),
                Kind::TensorModel,
                None,
            )
            .await;
            let started = Instant::now();
            let stream = kiln_registry::file_upload_stream(
                model.name.clone(),
                "model.onnx".into(),
                source.clone(),
                size,
                sha.clone(),
                0,
                |_| {},
            );
            let response = kiln_tests::registry::models(&ch)
                .upload_model_files(stream)
                .await
                .expect("upload")
                .into_inner();
            uploads.push(started.elapsed().as_secs_f64());
            assert!(response.files[0].complete, "stored whole and verified");
        }
        let (copy_secs, upload_secs) = (median(&mut copies), median(&mut uploads));
        let mb = megabytes as f64;
        println!(
            "{megabytes} MB artifact, loopback, {} cores, median of 3 rounds",
            cores()
        );
        println!(
            "plain file copy (+fsync):       {:>8.1} MB/s  ({copy_secs:.2}s)",
            mb / copy_secs
        );
        println!(
            "gRPC upload into the store:     {:>8.1} MB/s  ({upload_secs:.2}s, SHA-256 verified, fsync)",
            mb / upload_secs
        );
        println!(
            "ratio (upload / copy):          {:>8.2}",
            copy_secs / upload_secs
        );
        mesh.shutdown().await;
    });
}
