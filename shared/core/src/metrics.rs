//! Prometheus metrics: one registry per process (every service of a `kiln dev` process shares
//! it, told apart by their labels), served as text on `[server] metrics_listen`. Names follow
//! Prometheus' conventions (base units, `_total` on counters, `_seconds` on durations) and
//! every label takes a bounded set of values: services, methods and codes of the contract,
//! model and deployment names — never request IDs or free text.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::histogram::exponential_buckets;
pub use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::{Metric, Registry, Unit};
use prost::Message;
use tokio::net::TcpListener;

use crate::server::{Answer, InnerService, Middleware, Request};

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

/// Registers `metric` as `name` (the registry adds `_total` to counters, and `_seconds` when
/// `seconds`) and gives it back: declare each metric once, in a `LazyLock`.
pub fn register<M: Metric + Clone>(name: &str, help: &str, seconds: bool, metric: M) -> M {
    let mut registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    if seconds {
        registry.register_with_unit(name, help, Unit::Seconds, metric.clone());
    } else {
        registry.register(name, help, metric.clone());
    }
    metric
}

/// Every registered metric in Prometheus' text format.
pub fn render() -> String {
    let registry = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// A histogram of durations from 0.5 ms to ~33 s.
pub fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// A histogram of short waits, from 25 µs to ~0.8 s (a thread hand-off is tens of µs).
pub fn short_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000025, 2.0, 16))
}

/// A histogram of sizes or counts from 1 to 32,768.
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// The labels of a family outside this crate: `[("model", name)]`.
pub type Labels<const N: usize> = [(&'static str, String); N];

/// A family of histograms made by `make`.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                render(),
            )
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    service: String,
    method: String,
    code: String,
}

struct GrpcMetrics {
    requests: Family<CallLabels, Counter>,
    in_flight: Family<MethodLabels, Gauge>,
    duration: HistogramFamily<CallLabels>,
    /// Every RPC this build serves, by `/package.Service/Method`; other paths count as
    /// `other`, so that a caller cannot mint label values.
    methods: HashMap<String, MethodMetrics>,
    other: MethodMetrics,
}

/// One method's series, resolved on first use and kept: a call costs a map lookup and
/// atomic increments, no label strings.
struct MethodMetrics {
    labels: MethodLabels,
    in_flight: OnceLock<Gauge>,
    /// By code (0..=16): calls and their durations.
    by_code: [OnceLock<(Counter, Histogram)>; 17],
}

impl MethodMetrics {
    fn new(service: &str, method: &str) -> Self {
        Self {
            labels: MethodLabels {
                service: service.to_owned(),
                method: method.to_owned(),
            },
            in_flight: OnceLock::new(),
            by_code: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn in_flight(&self) -> &Gauge {
        self.in_flight
            .get_or_init(|| GRPC.in_flight.get_or_create(&self.labels).clone())
    }

    fn of_code(&self, code: tonic::Code) -> &(Counter, Histogram) {
        self.by_code[(code as usize).min(16)].get_or_init(|| {
            let labels = CallLabels {
                service: self.labels.service.clone(),
                method: self.labels.method.clone(),
                code: code_name(code).to_owned(),
            };
            (
                GRPC.requests.get_or_create(&labels).clone(),
                GRPC.duration.get_or_create(&labels).clone(),
            )
        })
    }
}

static GRPC: LazyLock<GrpcMetrics> = LazyLock::new(|| GrpcMetrics {
    requests: register(
        "kiln_grpc_server_requests",
        "gRPC calls finished, by service, method and status code",
        false,
        Family::default(),
    ),
    in_flight: register(
        "kiln_grpc_server_requests_in_flight",
        "gRPC calls (and streams) being served",
        false,
        Family::default(),
    ),
    duration: register(
        "kiln_grpc_server_request_duration",
        "Time from a call's arrival to its last message (a stream's whole life)",
        true,
        Family::new_with_constructor(seconds_histogram),
    ),
    methods: known_methods()
        .into_iter()
        .map(|(path, service, method)| (path, MethodMetrics::new(&service, &method)))
        .collect(),
    other: MethodMetrics::new("other", "other"),
});

/// `(path, service, method)` of every RPC in the descriptor sets.
fn known_methods() -> Vec<(String, String, String)> {
    let mut known = Vec::new();
    for set in [
        kiln_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            for service in &file.service {
                let service_name = format!("{}.{}", file.package(), service.name());
                for method in &service.method {
                    known.push((
                        format!("/{service_name}/{}", method.name()),
                        service_name.clone(),
                        method.name().to_owned(),
                    ));
                }
            }
        }
    }
    known
}

/// The server layer that counts and times every gRPC call by service, method and code.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = crate::server::Layered<GrpcMetricsLayer, S>;

    fn layer(&self, inner: S) -> Self::Service {
        crate::server::Layered::new(*self, inner)
    }
}

impl Middleware for GrpcMetricsLayer {
    fn handle<S: InnerService>(&self, request: Request, mut inner: S) -> Answer<S::Error> {
        let metrics = &*GRPC;
        let method = metrics
            .methods
            .get(request.uri().path())
            .unwrap_or(&metrics.other);
        method.in_flight().inc();
        let call = Call {
            method,
            start: Instant::now(),
            finished: false,
        };
        Box::pin(async move {
            let response = inner.call(request).await?;
            let (parts, body) = response.into_parts();
            // A trailers-only answer (an error before any message) carries its code in the
            // headers; otherwise the code comes in the trailers, at the end of the body.
            let body = match code_of(&parts.headers) {
                Some(code) => {
                    call.finish(code);
                    body
                }
                None => tonic::body::Body::new(Observed { body, call }),
            };
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// The gRPC status code `headers` (an answer's, or its trailers) carry.
pub(crate) fn code_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    Some(tonic::Code::from_bytes(value.as_bytes()))
}

/// One call being served; counted when its code is known, or as CANCELLED when its answer
/// is dropped before the end (the client went away).
struct Call {
    method: &'static MethodMetrics,
    start: Instant,
    finished: bool,
}

impl Call {
    fn finish(mut self, code: tonic::Code) {
        self.record(code);
    }

    fn record(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let (requests, duration) = self.method.of_code(code);
        requests.inc();
        duration.observe(self.start.elapsed().as_secs_f64());
        self.method.in_flight().dec();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

/// The response body, watched for the trailers that carry the call's code.
struct Observed {
    body: tonic::body::Body,
    call: Call,
}

impl http_body::Body for Observed {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_of) {
                    this.call.record(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.call.record(status.code()),
            Poll::Ready(None) => this.call.record(tonic::Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The code's name as the gRPC spec writes it (`OK`, `NOT_FOUND`…).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contracts_methods_are_known_and_nothing_else() {
        let known = &GRPC.methods;
        let get = &known["/kiln.identity.v1.AccountService/GetAccount"].labels;
        assert_eq!(
            (get.service.as_str(), get.method.as_str()),
            ("kiln.identity.v1.AccountService", "GetAccount")
        );
        assert!(known.contains_key("/grpc.health.v1.Health/Check"));
        assert!(!known.contains_key("/kiln.identity.v1.AccountService/Nope"));
        assert!(known.len() > 50, "{}", known.len());
    }

    #[test]
    fn registered_metrics_render_in_the_text_format() {
        let counter: Counter = register("kiln_test_things", "Things", false, Counter::default());
        counter.inc_by(3);
        let family: HistogramFamily<MethodLabels> = register(
            "kiln_test_wait",
            "Waits",
            true,
            Family::new_with_constructor(seconds_histogram),
        );
        let labels = MethodLabels {
            service: "s".into(),
            method: "m".into(),
        };
        family.get_or_create(&labels).observe(0.01);
        let text = render();
        assert!(text.contains("kiln_test_things_total 3"), "{text}");
        assert!(
            text.contains("kiln_test_wait_seconds_count{service=\"s\",method=\"m\"} 1"),
            "{text}"
        );
    }
}
