//! The service credential rotated across processes without downtime, as README's procedure
//! says: the new token accepted everywhere first, then sent, then the old one dropped, one
//! process restarted at a time under traffic. No call is ever refused as unauthenticated
//! (a restarting process may be unreachable for a moment: UNAVAILABLE), and after each step
//! the whole mesh still works: nodes registered, keys checked, usage booked.

use std::time::Duration;

use kiln_tests::{wait_for, wait_for_ok};
use tonic::Code;

use crate::cluster::{Cluster, SERVICE_TOKEN, Shape};
use crate::traffic::{Tally, Traffic};
use crate::usage::booked_exactly;

const NEW_TOKEN: &str = "faults-rotated-service-token-fedcba9876543210";

/// Every path a service credential guards works: a key never seen before (so no cache
/// answers for identity) is checked by each node at identity, and both nodes are registered
/// at the scheduler. The usage of its answers: (answers, tokens).
async fn every_link_works(cluster: &Cluster, model: &str) -> (i64, i64) {
    let mut used = (0, 0);
    let admin = cluster.channel("identity", None).await;
    let fresh = kiln_tests::create_key(&admin, "acme", "owner", None)
        .await
        .key;
    for node in ["inference-1", "inference-2"] {
        let ch = cluster.channel(node, Some(&fresh)).await;
        let what = format!("{node} to answer a new key");
        let answer = wait_for_ok(Duration::from_secs(15), &what, || async {
            match kiln_tests::inference::embed_reference(&ch, model).await {
                Ok(answer) => Ok(answer),
                Err(s) if s.code() == Code::Unauthenticated => {
                    panic!("{node} refused a key as unauthenticated: {s:?}")
                }
                Err(s) => Err(format!("{s:?}")),
            }
        })
        .await;
        used.0 += 1;
        used.1 += i64::from(answer.usage.expect("usage").prompt_tokens);
    }
    // Heartbeats after now: each node's stream to the scheduler is up (a node refused
    // there would still look READY until it is found lost).
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let scheduler = cluster.channel("scheduler", None).await;
    let ready = kiln_proto::scheduler::v1::node::State::Ready as i32;
    wait_for(Duration::from_secs(15), "both nodes heard from", || async {
        let nodes = kiln_tests::deployments::list_nodes(&scheduler).await;
        let heard = |n: &kiln_proto::scheduler::v1::Node| {
            n.state == ready
                && n.last_heartbeat_time
                    .as_ref()
                    .is_some_and(|t| t.seconds > since)
        };
        (nodes.iter().filter(|n| heard(n)).count() == 2).then_some(())
    })
    .await;
    used
}

#[tokio::test]
async fn the_service_credential_rotates_one_process_at_a_time_under_traffic() {
    let (mut cluster, key, model, _) = Cluster::serving_minilm(Shape::nodes(2)).await;
    // Clients of the node that is restarted last in each step, so most restarts are of the
    // processes behind it (identity for keys, billing, the scheduler, the other node).
    let inference = cluster.channel("inference-1", Some(&key)).await;
    let clean = &[Code::Unavailable, Code::Cancelled];
    let traffic = Traffic::embeddings(&inference, &model, 2, clean);
    traffic.answers(10).await;

    let steps: [(&str, Option<&str>); 3] = [
        // 1. Every process accepts the new token beside the one it sends.
        (SERVICE_TOKEN, Some(NEW_TOKEN)),
        // 2. Every process sends the new one and still accepts the old.
        (NEW_TOKEN, Some(SERVICE_TOKEN)),
        // 3. The old one is dropped.
        (NEW_TOKEN, None),
    ];
    let mut order: Vec<String> = cluster.processes.keys().cloned().collect();
    order.retain(|n| n != "inference-1");
    order.push("inference-1".to_owned());
    let mut checks = (0, 0);
    for (sends, accepts) in steps {
        let accepted = accepts.map(|t| format!("[{t:?}]"));
        for name in &order {
            let p = cluster.process(name);
            p.set_env("KILN_SERVICE_TOKEN", Some(sends));
            p.set_env("KILN_ACCEPTED_SERVICE_TOKENS", accepted.as_deref());
            p.rolling_restart().await;
            traffic.answers(5).await;
            let used = every_link_works(&cluster, &model).await;
            checks = (checks.0 + used.0, checks.1 + used.1);
        }
    }
    let tally = traffic.stop().await;
    assert!(!tally.refused.contains_key("Unauthenticated"), "{tally:?}");

    // After the rotation (every link was checked after the last restart), the answers'
    // usage, the checks' included, is booked once: inference to billing, over the bus.
    let booked = Tally {
        answered: tally.answered + checks.0,
        tokens: tally.tokens + checks.1,
        refused: tally.refused,
    };
    booked_exactly(&cluster, "accounts/acme", &booked).await;
    // A process still sending the old token is refused now.
    let old =
        kiln_tests::channel_to(&cluster.processes["identity"].url(), Some(SERVICE_TOKEN)).await;
    let refused = kiln_tests::try_create_account(&old, "stale", None).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
}
