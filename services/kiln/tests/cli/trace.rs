//! One trace across processes: the services run as separate `kiln serve` processes on one
//! NATS, each exporting its spans over OTLP to the test's collector. A call that carries the
//! client's `traceparent` must come back as one tree: the registry's call, identity
//! authenticating the key for it, and billing's ledger reading the event the call published.
//! The key itself is in no exported span and no event.

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use kiln_proto::registry::v1 as regv1;
use kiln_tests::{NatsServer, free_port, wait_for_listener};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const SERVICE_TOKEN: &str = "a-service-token-for-the-trace-test";

/// One `kiln serve <role>` process.
struct Service {
    child: Child,
    url: String,
    data: tempfile::TempDir,
}

impl Service {
    async fn start(role: &str, nats: &str, otlp: &str, env: &[(&str, &str)]) -> Self {
        let data = tempfile::tempdir().unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(super::kiln_binary())
            .args(["serve", role])
            .env("KILN_LISTEN", &listen)
            .env("KILN_DATA_DIR", data.path())
            .env("KILN_NATS_URL", nats)
            .env("KILN_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("KILN_OTLP_ENDPOINT", otlp)
            // Export each batch of spans at once rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "50")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        wait_for_listener(
            &listen,
            Duration::from_secs(30),
            &format!("kiln serve {role}"),
        )
        .await;
        Self {
            child,
            url: format!("http://{listen}"),
            data,
        }
    }

    /// SIGTERM, then a clean exit.
    async fn stop(mut self) {
        super::terminate(&mut self.child, &self.url).await;
    }
}

/// A span as the collector received it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    id: Vec<u8>,
    parent: Vec<u8>,
}

/// The spans of `trace` in `request`.
fn spans_of(request: ExportTraceServiceRequest, trace: &[u8]) -> Vec<Span> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|a| a.key == "service.name")
            .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans.into_iter().filter(|s| s.trace_id == trace) {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    id: span.span_id,
                    parent: span.parent_span_id,
                });
            }
        }
    }
    out
}

/// Receives spans of `trace` until `done` holds for them (or a minute passes); also every
/// export received, as text.
async fn collect(
    received: &mut mpsc::UnboundedReceiver<ExportTraceServiceRequest>,
    trace: &[u8],
    done: impl Fn(&[Span]) -> bool,
) -> (Vec<Span>, String) {
    let mut spans = Vec::new();
    let mut exported = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done(&spans) {
        match tokio::time::timeout_at(deadline, received.recv()).await {
            Ok(Some(request)) => {
                exported.push_str(&format!("{request:?}"));
                spans.extend(spans_of(request, trace));
            }
            _ => panic!("the trace stayed incomplete: {spans:#?}"),
        }
    }
    (spans, exported)
}

/// Every message the stream `KILN` of `nats` holds, as bytes.
async fn stream_messages(nats: &str) -> Vec<Vec<u8>> {
    let client = async_nats::connect(nats).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream("KILN")
        .await
        .unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let mut messages = Vec::new();
    for seq in 1..=last {
        if let Ok(message) = stream.get_raw_message(seq).await {
            messages.push(message.payload.to_vec());
        }
    }
    messages
}

#[tokio::test]
async fn a_call_is_one_trace_across_registry_identity_and_billing_processes() {
    let (otlp, mut received) = super::otlp::start().await;
    let nats = NatsServer::start().await;
    let identity = Service::start("identity", &nats.url(), &otlp, &[]).await;
    let key = super::admin_key(identity.data.path()).await;
    let peer = [("KILN_IDENTITY_URL", identity.url.as_str())];
    let registry = Service::start("registry", &nats.url(), &otlp, &peer).await;
    let billing = Service::start("billing", &nats.url(), &otlp, &peer).await;

    // The client's own span: the trace's root, which the client does not export.
    let trace_hex = format!("{:032x}", uuid::Uuid::now_v7().as_u128());
    let client_span_hex = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(regv1::CreateModelRequest {
        parent: "accounts/kiln".into(),
        model_id: "traced".into(),
        model: Some(regv1::Model {
            kind: regv1::model::Kind::EmbeddingModel as i32,
            ..Default::default()
        }),
    });
    let metadata = request.metadata_mut();
    let bearer = format!("Bearer {key}");
    metadata.insert("authorization", bearer.parse().unwrap());
    let traceparent = format!("00-{trace_hex}-{client_span_hex}-01");
    metadata.insert("traceparent", traceparent.parse().unwrap());
    let channel = kiln_core::server::endpoint(&registry.url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut models = regv1::model_service_client::ModelServiceClient::new(channel);
    models.create_model(request).await.expect("model created");

    let trace = hex(&trace_hex);
    let services =
        |spans: &[Span]| -> HashSet<String> { spans.iter().map(|s| s.service.clone()).collect() };
    let (spans, exported) = collect(&mut received, &trace, |spans| {
        let services = services(spans);
        ["kiln-registry", "kiln-identity", "kiln-billing"]
            .iter()
            .all(|s| services.contains(*s))
    })
    .await;

    // One tree: one span answers the client, every other span's parent is in the trace.
    let root = hex(client_span_hex);
    let ids: HashSet<&[u8]> = spans.iter().map(|s| s.id.as_slice()).collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent == root).collect();
    assert_eq!(roots.len(), 1, "one child of the client's span: {spans:#?}");
    assert_eq!(roots[0].service, "kiln-registry");
    assert_eq!(roots[0].name, "kiln.registry.v1.ModelService/CreateModel");
    for span in &spans {
        assert!(
            span.parent == root || ids.contains(span.parent.as_slice()),
            "{span:?} hangs off no span of the trace: {spans:#?}"
        );
    }
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.id.as_slice(), s)).collect();
    let parent_service = |span: &Span| by_id.get(span.parent.as_slice()).map(|p| &p.service);
    let authenticate = spans.iter().find(|s| s.service == "kiln-identity").unwrap();
    assert_eq!(
        parent_service(authenticate).map(String::as_str),
        Some("kiln-registry"),
        "identity answers the registry's call: {spans:#?}"
    );
    let consumed = spans
        .iter()
        .find(|s| s.service == "kiln-billing" && s.name.contains("kiln.registry.model.created"))
        .unwrap_or_else(|| panic!("billing's ledger read the model's event: {spans:#?}"));
    assert_eq!(
        parent_service(consumed).map(String::as_str),
        Some("kiln-registry"),
        "the event carries the call's context over NATS: {spans:#?}"
    );

    // The key that made the call is in no span and no event.
    assert!(!exported.contains(&key), "an API key in an exported span");
    let events = stream_messages(&nats.url()).await;
    assert!(events.len() >= 4, "the stream holds the run's events");
    for payload in events {
        let holds_key = payload.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(!holds_key, "an API key in an event");
    }

    for service in [registry, billing, identity] {
        service.stop().await;
    }
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
