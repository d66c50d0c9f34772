//! The registry killed in the middle of an upload: what it had staged stays, GetModel says
//! so, and the upload resumes from there after the restart, sending only the missing bytes.

use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::Kind;
use kiln_tests::registry::{
    create_model, download, file_messages, get_model, models, upload_messages,
};
use kiln_tests::wait_for;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{Cluster, Shape};

#[tokio::test]
async fn the_registry_killed_mid_upload_keeps_what_it_stored_and_the_upload_resumes() {
    let mut cluster = Cluster::start(Shape::nodes(0)).await;
    let key = cluster.tenant("acme").await;
    let ch = cluster.channel("registry", Some(&key)).await;
    let model = create_model(&ch, "acme", "weights", Kind::TensorModel, None).await;
    let bytes: Vec<u8> = (0..40_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = [("model.onnx", bytes.as_slice())];

    // The first 20 of 40 MiB-chunks go out; the stream stays open for more.
    let (send, receive) = mpsc::channel::<regv1::UploadModelFilesRequest>(4);
    let uploading = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let stream = ReceiverStream::new(receive);
            models(&ch).upload_model_files(stream).await
        })
    };
    for message in file_messages(&model.name, &file, 0, Some(20 << 20)) {
        send.send(message).await.expect("the upload takes it");
    }
    // Its staging file (in the registry's data dir) shows the bytes arriving.
    let staging = cluster
        .data_dir("registry")
        .join("staging/models/acme/weights/files/model.onnx.part");
    let staged_before = wait_for(Duration::from_secs(30), "half the file staged", || async {
        let staged = std::fs::metadata(&staging).ok()?.len() as i64;
        (staged >= 10 << 20).then_some(staged)
    })
    .await;
    cluster.process("registry").kill().await;
    let cut = uploading.await.expect("the upload task");
    assert!(cut.is_err(), "the cut upload fails for its client: {cut:?}");
    drop(send);

    cluster.process("registry").restart().await;
    let ch = cluster.channel("registry", Some(&key)).await;
    // What the registry says it holds is every byte it staged (progress records lag behind
    // a stream: a crash must not make a client resend them, or fail on a stale offset).
    let m = get_model(&ch, &model.name)
        .await
        .expect("the model survives");
    let stored = m.files[0].uploaded_bytes;
    assert!(
        stored >= staged_before && stored <= 20 << 20 && !m.files[0].complete,
        "stored {stored} after the kill ({staged_before} staged before it)"
    );
    let rest = file_messages(&model.name, &file, stored as usize, None);
    let done = upload_messages(&ch, rest)
        .await
        .expect("the upload resumes");
    assert!(done.files[0].complete);
    assert_eq!(
        done.received_bytes,
        bytes.len() as i64 - stored,
        "only the missing bytes were sent"
    );
    let back = download(&ch, &model.name, "model.onnx", 0, 0).await;
    assert!(back.expect("download") == bytes, "the file is whole");
}
