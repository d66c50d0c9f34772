//! Tracing and trace-context propagation.
//!
//! Every span gets an OpenTelemetry context, so W3C `traceparent` crosses each hop: a client
//! interceptor injects it into outgoing gRPC metadata, a server layer extracts it and parents
//! the request's span on it, and events carry it in NATS headers. Spans are exported over
//! OTLP/gRPC when an endpoint is configured.

use std::collections::HashMap;
use std::task::{Context as TaskContext, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::body::Body;
use tracing::Instrument;

use crate::server::{Answer, InnerService, Layered, Middleware, Request};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Keeps the tracer provider alive; flushes spans on drop.
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs the global subscriber: log lines on stderr (text or JSON, `RUST_LOG` filter,
/// default info),
/// the OpenTelemetry layer, and the OTLP exporter when `otlp_endpoint` is set.
/// Calling it a second time in one process keeps the first subscriber.
pub fn init(
    service_name: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, String> {
    init_with_default_filter(service_name, format, otlp_endpoint, "info")
}

/// [`init`] for a test binary: text logs at `warn` unless `RUST_LOG` says otherwise, no
/// export.
pub fn init_for_tests(service_name: &str) -> Result<TelemetryGuard, String> {
    init_with_default_filter(service_name, LogFormat::Text, None, "warn")
}

/// [`init`] with another filter for when `RUST_LOG` is unset.
fn init_with_default_filter(
    service_name: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
    default_filter: &str,
) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("otlp_endpoint: {e}"))?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service_name.to_owned());
    opentelemetry::global::set_tracer_provider(provider.clone());

    // Log lines follow RUST_LOG; spans reach OpenTelemetry at info whatever the log level,
    // so trace context propagates even when logging is quiet.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(false)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
    if result.is_err() {
        tracing::debug!("a global subscriber was already installed; keeping it");
    }
    Ok(TelemetryGuard { provider })
}

/// Injects the current span's trace context into any carrier (gRPC metadata, NATS headers).
pub fn inject_current(injector: &mut dyn Injector) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, injector);
}

/// Sets `span`'s parent from a carrier's trace context, when it has one.
pub fn set_parent_from(span: &tracing::Span, extractor: &dyn Extractor) {
    let cx = TraceContextPropagator::new().extract(extractor);
    let _ = span.set_parent(cx);
}

/// The current W3C `traceparent`, or empty when there is no span context: what
/// [`inject_current`] would set, written directly (every usage event asks, so no carrier map
/// and no `tracestate`).
pub fn current_traceparent() -> String {
    use opentelemetry::trace::{TraceContextExt as _, TraceFlags};
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return String::new();
    }
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags() & TraceFlags::SAMPLED
    )
}

/// Parents `span` on a `traceparent` string (as events carry it).
pub fn set_parent_from_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    set_parent_from(span, &carrier);
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Client interceptor for outgoing calls: the trace context, plus a bearer credential (the
/// service token between services, an API key from the CLI) when given.
#[derive(Clone)]
pub struct OutgoingInterceptor {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl OutgoingInterceptor {
    pub fn new(bearer: Option<&str>) -> Result<Self, crate::Error> {
        let authorization = bearer
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| crate::Error::invalid("service_token", "not a valid header value"))
            })
            .transpose()?;
        Ok(Self { authorization })
    }
}

impl tonic::service::Interceptor for OutgoingInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_current(&mut MetadataInjector(request.metadata_mut()));
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Server layer: one span per call, parented on the caller's `traceparent`.
#[derive(Debug, Clone, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = Layered<Self, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Layered::new(Self, inner)
    }
}

impl Middleware for TraceContextLayer {
    fn handle<S: InnerService>(&self, request: Request, mut inner: S) -> Answer<S::Error> {
        let path = request.uri().path();
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.grpc.status_code = tracing::field::Empty,
        );
        set_parent_from(&span, &HeaderExtractor(request.headers()));
        let call_span = span.clone();
        Box::pin(
            async move {
                let response = inner.call(request).await?;
                Ok(record_status(response, call_span))
            }
            .instrument(span),
        )
    }
}

/// Records the call's gRPC status code on its span: from the headers of a trailers-only
/// answer (an immediate error), else from the trailers when the body ends.
fn record_status(response: http::Response<Body>, span: tracing::Span) -> http::Response<Body> {
    if let Some(code) = grpc_status(response.headers()) {
        span.record("rpc.grpc.status_code", code);
        return response;
    }
    response.map(|body| Body::new(StatusRecordingBody { inner: body, span }))
}

/// The status code `headers` carry, as the span records it.
fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    crate::metrics::code_of(headers).map(|code| code as i64)
}

/// A response body that records the status its trailers carry on the call's span.
struct StatusRecordingBody {
    inner: Body,
    span: tracing::Span,
}

impl http_body::Body for StatusRecordingBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(grpc_status)
        {
            self.span.record("rpc.grpc.status_code", code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tower::{Layer as _, Service as _};
    use tracing_subscriber::layer::Context;

    use super::*;

    /// Collects every `rpc.grpc.status_code` recorded on a span.
    #[derive(Clone, Default)]
    struct Codes(Arc<Mutex<Vec<i64>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Codes {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: Context<'_, S>,
        ) {
            struct Visit<'a>(&'a Mutex<Vec<i64>>);
            impl tracing::field::Visit for Visit<'_> {
                fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                    if field.name() == "rpc.grpc.status_code" {
                        self.0.lock().unwrap().push(value);
                    }
                }
                fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
            }
            values.record(&mut Visit(&self.0));
        }
    }

    async fn drain(body: &mut Body) {
        use http_body::Body as _;
        while std::future::poll_fn(|cx| std::pin::Pin::new(&mut *body).poll_frame(cx))
            .await
            .is_some()
        {}
    }

    #[tokio::test]
    async fn the_server_span_records_the_grpc_status_code() {
        let codes = Codes::default();
        let subscriber = tracing_subscriber::registry().with(codes.clone());
        let _guard = tracing::subscriber::set_default(subscriber);
        let request = || http::Request::new(Body::empty());

        // An immediate error: the status is in the headers of a trailers-only answer.
        let failing = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, std::convert::Infallible>(tonic::Status::not_found("x").into_http::<Body>())
        });
        let mut service = TraceContextLayer.layer(failing);
        service.call(request()).await.unwrap();
        assert_eq!(*codes.0.lock().unwrap(), vec![tonic::Code::NotFound as i64]);

        // A streamed answer: the status comes in the trailers at the end of the body.
        let streaming = tower::service_fn(|_: http::Request<Body>| async {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            // A body that ends with `grpc-status` in its trailers, as a streamed answer does.
            let frames = [Ok::<_, tonic::Status>(http_body::Frame::trailers(trailers))];
            let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(body)))
        });
        let mut service = TraceContextLayer.layer(streaming);
        let mut response = service.call(request()).await.unwrap();
        assert_eq!(codes.0.lock().unwrap().len(), 1, "not before the body ends");
        drain(response.body_mut()).await;
        assert_eq!(codes.0.lock().unwrap()[1], 0);
    }

    #[test]
    fn the_current_traceparent_is_the_one_the_propagator_injects() {
        let tracer = SdkTracerProvider::builder().build().tracer("test");
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer));
        let _guard = tracing::subscriber::set_default(subscriber);
        assert_eq!(current_traceparent(), "", "outside any span");

        let span = tracing::info_span!("call");
        // A parent from another service: its trace and sampling carry over.
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        set_parent_from_traceparent(&span, parent);
        let _entered = span.enter();
        let mut injected = HashMap::new();
        inject_current(&mut injected);
        let traceparent = current_traceparent();
        assert_eq!(Some(&traceparent), injected.get("traceparent"));
        assert!(
            traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-")
                && traceparent.ends_with("-01"),
            "{traceparent}"
        );
    }
}
