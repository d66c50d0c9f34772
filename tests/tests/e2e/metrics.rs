//! The Prometheus endpoint: after traffic (chats, a call that fails, a call to a method that
//! does not exist) every family the services export is there, every label takes a value
//! from a bounded set, and every query of the Grafana dashboard (deploy/grafana) names
//! metrics and labels that are exported.

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_proto::identity::v1 as idv1;
use kiln_tests::llm::{SMOLLM2, chat, first_chat, smollm2_asset_dir};
use kiln_tests::wait_for;

/// The families the services export, by name as scraped (a histogram by its `_count`).
const FAMILIES: &[&str] = &[
    "kiln_grpc_server_requests_total",
    "kiln_grpc_server_requests_in_flight",
    "kiln_grpc_server_request_duration_seconds_count",
    "kiln_llm_waiting_requests",
    "kiln_llm_running_sequences",
    "kiln_llm_time_to_first_token_seconds_count",
    "kiln_llm_decode_step_duration_seconds_count",
    "kiln_llm_decode_batch_size_count",
    "kiln_llm_generated_tokens_total",
    "kiln_llm_prompt_tokens_total",
    "kiln_llm_cached_prompt_tokens_total",
    "kiln_llm_loaded_adapters",
    "kiln_scheduler_replicas_desired",
    "kiln_scheduler_replicas_ready",
    "kiln_scheduler_pending_placements",
    "kiln_scheduler_nodes",
    "kiln_events_published_total",
    "kiln_event_publish_duration_seconds_count",
    "kiln_outbox_backlog",
    "kiln_event_consumer_lag",
    "kiln_billing_events_booked_total",
    "kiln_billing_events_duplicate_total",
    "kiln_http_server_requests_total",
    "kiln_http_server_request_duration_seconds_count",
];

/// The only label names a series may carry.
const LABELS: &[&str] = &[
    "service",
    "method",
    "code",
    "model",
    "lora_slots",
    "deployment",
    "state",
    "consumer",
    "route",
    "status",
    "le",
];

/// `(name, labels)` of every sample line.
fn samples(text: &str) -> Vec<(String, Vec<(String, String)>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|line| {
            let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            (name.to_owned(), labels)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_exported_with_bounded_labels() {
    let assets = smollm2_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let (key, acme) = mesh.tenant("acme").await;
    first_chat(&acme, "Hi", 1, Duration::from_secs(300)).await;
    // Through the HTTP edge too, by a path with an ID in it.
    http_get(
        mesh.http_addr,
        "/v1/accounts/acme/models/some-model-id",
        &key,
    )
    .await;
    // The same question twice: the second prompt comes from the prefix cache.
    for _ in 0..2 {
        chat(&acme, "What is the capital of Japan?", 8)
            .await
            .unwrap();
    }
    let missing = kiln_tests::accounts(&acme)
        .get_account(idv1::GetAccountRequest {
            name: "accounts/nobody-here".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // A method no service has: counted, under no label value the caller chose.
    let mut raw = tonic::client::Grpc::new(acme.clone());
    raw.ready().await.unwrap();
    let bogus: Result<tonic::Response<()>, tonic::Status> = raw
        .unary(
            tonic::Request::new(()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/kiln.Bogus123/Evil456"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(bogus.unwrap_err().code(), tonic::Code::Unimplemented);

    // Billing books the chats' usage and the relays publish: wait for every family.
    let text = wait_for(Duration::from_secs(60), "every metric family", || async {
        let text = mesh.scrape().await;
        let names: BTreeSet<String> = samples(&text).into_iter().map(|(n, _)| n).collect();
        FAMILIES.iter().all(|f| names.contains(*f)).then_some(text)
    })
    .await;

    let samples = samples(&text);
    let with = |name: &str, label: &str, value: &str| {
        samples
            .iter()
            .any(|(n, ls)| n == name && ls.iter().any(|(k, v)| k == label && v == value))
    };
    let requests = "kiln_grpc_server_requests_total";
    assert!(with(requests, "code", "NOT_FOUND"), "{text}");
    assert!(with(requests, "method", "CreateChatCompletion"), "{text}");
    assert!(with(requests, "service", "other"), "{text}");
    assert!(!text.contains("Bogus123") && !text.contains("Evil456"));
    let http = "kiln_http_server_requests_total";
    assert!(
        with(http, "route", "/v1/accounts/{account_id}/models/{model_id}")
            && with(http, "status", "404"),
        "{text}"
    );
    assert!(!text.contains("some-model-id"));
    assert!(
        with("kiln_llm_generated_tokens_total", "model", SMOLLM2),
        "{text}"
    );
    assert!(with("kiln_scheduler_nodes", "state", "READY"), "{text}");
    for (name, labels) in &samples {
        for (key, value) in labels {
            assert!(LABELS.contains(&key.as_str()), "{name} has label {key}");
            if key == "code" {
                let known = (0..=16).map(|c| kiln_core::metrics::code_name(tonic::Code::from(c)));
                assert!(
                    known.into_iter().any(|k| k == value),
                    "{name}: code {value}"
                );
            }
        }
    }
    dashboard_queries_name_what_is_exported(&samples);
    // The prefix cache served the repeated prompt.
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(SMOLLM2))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    };
    assert!(value("kiln_llm_cached_prompt_tokens_total") > 0.0, "{text}");
    assert!(value("kiln_llm_prompt_tokens_total") > value("kiln_llm_cached_prompt_tokens_total"));
}

/// `GET path` on the HTTP edge with `key`, over a connection of its own.
async fn http_get(addr: std::net::SocketAddr, path: &str, key: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ask = format!("GET {path} HTTP/1.0\r\nHost: kiln\r\nAuthorization: Bearer {key}\r\n\r\n");
    stream.write_all(ask.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1."), "{answer}");
}

/// Every query of deploy/grafana/dashboards/kiln.json names exported metrics, and every label
/// it groups or filters by is carried by a series of those metrics.
fn dashboard_queries_name_what_is_exported(samples: &[(String, Vec<(String, String)>)]) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/dashboards/kiln.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    assert!(exprs.len() >= 13, "the dashboard's queries: {exprs:?}");
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    for expr in exprs {
        let names: BTreeSet<&str> = expr
            .split(|c: char| !is_name(c))
            .filter(|word| word.starts_with("kiln_"))
            .collect();
        assert!(!names.is_empty(), "{expr} names no Kiln metric");
        let mut carried = BTreeSet::new();
        for name in &names {
            let series: Vec<_> = samples.iter().filter(|(n, _)| n == name).collect();
            assert!(!series.is_empty(), "{expr}: {name} is not exported");
            carried.extend(
                series
                    .iter()
                    .flat_map(|(_, ls)| ls.iter().map(|(k, _)| k.as_str())),
            );
        }
        // Labels in `by (...)` groups and `{label="..."}` matchers.
        let mut labels = Vec::new();
        for group in expr.split("by (").skip(1) {
            let inside = group.split(')').next().unwrap();
            labels.extend(inside.split(',').map(str::trim));
        }
        for matcher in expr.split('{').skip(1) {
            let inside = matcher.split('}').next().unwrap();
            labels.extend(
                inside
                    .split(',')
                    .map(|m| m.split(['=', '!', '~']).next().unwrap().trim()),
            );
        }
        for label in labels {
            assert!(
                carried.contains(label),
                "{expr}: no series of {names:?} carries {label}"
            );
        }
    }
}
