//! Faults of the serving side: an inference node killed in the middle of streams, and the
//! scheduler restarted under traffic.

use std::time::Duration;

use futures::StreamExt;
use kiln_proto::registry::v1::model::Kind;
use kiln_tests::billing::totals;
use kiln_tests::deployments::{deploy, replicas};
use kiln_tests::inference::client;
use kiln_tests::llm::{GGUF, chat_request};
use kiln_tests::registry::{create_model, upload_path, validate};
use kiln_tests::{AuthedChannel, asset, wait_for};
use tokio::sync::mpsc;
use tonic::Code;

use crate::cluster::{Cluster, Shape};
use crate::stream;
use crate::traffic::{DEADLINE, Traffic};

/// Streams a long chat on `model`; says on `started` when its first words arrive. The code
/// it ended with (None: it finished, with its usage).
async fn long_stream(ch: AuthedChannel, model: String, started: mpsc::Sender<()>) -> Option<Code> {
    let request = kiln_proto::kiln_inference::v1::CreateChatCompletionRequest {
        model,
        ..chat_request("Tell me a long story about a lighthouse.", 2000)
    };
    let mut chunks = client(&ch)
        .stream_chat_completion(request)
        .await
        .expect("the stream opens")
        .into_inner();
    let mut first = true;
    loop {
        let next = tokio::time::timeout(DEADLINE, chunks.next()).await;
        match next.unwrap_or_else(|_| panic!("a stream hung past {DEADLINE:?}")) {
            None => panic!("a stream of 2,000 tokens ended without an error or its usage"),
            Some(Err(status)) => return Some(status.code()),
            Some(Ok(chunk)) if chunk.usage.is_some() => return None,
            Some(Ok(_)) if first => {
                first = false;
                let _ = started.send(()).await;
            }
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn a_node_killed_mid_stream_ends_its_streams_cleanly_and_its_replica_moves() {
    let mut cluster = Cluster::start(Shape::nodes(2)).await;
    let key = cluster.tenant("acme").await;
    let registry = cluster.channel("registry", Some(&key)).await;
    let smol = create_model(&registry, "acme", "smollm2", Kind::BaseModel, None).await;
    let file = GGUF.rsplit('/').next().unwrap();
    upload_path(&registry, &smol.name, file, &asset(GGUF)).await;
    assert!(validate(&registry, &smol.name).await.valid);
    let prepare = kiln_proto::registry::v1::PrepareModelRequest {
        name: smol.name.clone(),
        ..Default::default()
    };
    kiln_tests::registry::models(&registry)
        .prepare_model(prepare)
        .await
        .expect("prepare SmolLM2");
    let scheduler = cluster.channel("scheduler", Some(&key)).await;
    let deployment = deploy(&scheduler, &smol.name).await.name;
    let admin = cluster.channel("scheduler", None).await;
    let held = replicas(&admin, &deployment).await;
    assert_eq!(held.len(), 1, "{held:?}");
    let (doomed, survivor) = match held[0].node.as_str() {
        "nodes/inference-1" => ("inference-1", "inference-2"),
        _ => ("inference-2", "inference-1"),
    };

    // Three streams through the node that does not hold the replica: it forwards them.
    let through = cluster.channel(survivor, Some(&key)).await;
    let (started, mut first_words) = mpsc::channel(3);
    let streams: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(long_stream(
                through.clone(),
                smol.name.clone(),
                started.clone(),
            ))
        })
        .collect();
    for _ in 0..3 {
        first_words.recv().await.expect("each stream starts");
    }
    // A deployment serving streams is not deleted without ignore_checks.
    let busy = kiln_tests::deployments::delete(&scheduler, &deployment).await;
    let busy = kiln_tests::expect_code(busy, Code::FailedPrecondition);
    assert!(busy.message().contains("is serving 3 requests"), "{busy:?}");
    cluster.process(doomed).kill().await;
    for ended in futures::future::join_all(streams).await {
        assert_eq!(
            ended.expect("a stream's task"),
            Some(Code::Unavailable),
            "a stream cut by the kill ends UNAVAILABLE, promptly"
        );
    }

    // The node is lost; its replica is placed on the survivor, which answers.
    let what = "the deployment to answer again from the survivor";
    let answer = wait_for(Duration::from_secs(180), what, || async {
        let request = kiln_proto::kiln_inference::v1::CreateChatCompletionRequest {
            model: smol.name.clone(),
            ..chat_request("Hi", 4)
        };
        client(&through).create_chat_completion(request).await.ok()
    })
    .await
    .into_inner();
    let now = replicas(&admin, &deployment).await;
    assert!(
        now.iter().any(|r| r.node == format!("nodes/{survivor}")),
        "{now:?}"
    );
    // Only the answered chat is billed: the cut streams recorded no usage.
    let usage = answer.usage.unwrap();
    let expected = (
        1,
        i64::from(usage.prompt_tokens),
        i64::from(usage.completion_tokens),
    );
    let billing = cluster.channel("billing", None).await;
    wait_for(Duration::from_secs(60), "the answer booked", || async {
        let row = totals(&billing, "accounts/acme").await;
        let booked = (row.request_count, row.prompt_tokens, row.completion_tokens);
        (booked == expected).then_some(())
    })
    .await;
    let chats = stream::usage_of(&cluster.nats.url(), "accounts/acme").await;
    let chats: Vec<_> = chats
        .iter()
        .filter(|u| u.api == "chat.completions")
        .collect();
    assert_eq!(chats.len(), 1, "{chats:?}");
}

#[tokio::test]
async fn a_restarted_scheduler_adopts_the_running_replicas_and_serving_goes_on() {
    let (mut cluster, key, model, deployment) = Cluster::serving_minilm(Shape::nodes(2)).await;
    let admin = cluster.channel("scheduler", None).await;
    let before = replicas(&admin, &deployment).await;

    // Serving needs no scheduler: the nodes keep their routes while it is away.
    let inference = cluster.channel("inference-1", Some(&key)).await;
    let traffic = Traffic::embeddings(&inference, &model, 2, &[]);
    traffic.answers(10).await;
    cluster.process("scheduler").kill().await;
    traffic.answers(20).await;
    cluster.process("scheduler").restart().await;
    cluster.nodes_ready(Duration::from_secs(30)).await;
    let admin = cluster.channel("scheduler", None).await;
    traffic.answers(10).await;
    // A few reconcile passes later, the same replica still serves, on the same node.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = replicas(&admin, &deployment).await;
    let names = |rs: &[kiln_proto::scheduler::v1::Replica]| {
        rs.iter()
            .map(|r| (r.name.clone(), r.node.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&after), names(&before), "adopted, not placed again");
    traffic.answers(10).await;
    let tally = traffic.stop().await;
    assert!(tally.refused.is_empty(), "{tally:?}");
}
