//! Serving: every Kiln server exposes its services behind the trace, metrics and auth layers, plus
//! `grpc.health.v1` and server reflection (v1 and v1alpha) without authentication.

use std::future::Future;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use tokio::net::TcpListener;
use tonic::service::RoutesBuilder;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::auth::AuthLayer;
use crate::telemetry::TraceContextLayer;

/// A server layer written as one async function of the call and the service it wraps
/// (`inner`, ready to be called).
pub trait Middleware: Clone + Send + 'static {
    fn handle<S: InnerService>(&self, request: Request, inner: S) -> Answer<S::Error>;
}

pub type Request = http::Request<tonic::body::Body>;
pub type Response = http::Response<tonic::body::Body>;
pub type Answer<E> = BoxFuture<'static, Result<Response, E>>;

/// The gRPC service a layer wraps, as tonic's router hands it over.
pub trait InnerService: Clone + Send + 'static
where
    Self: tower::Service<Request, Response = Response, Future: Send + 'static>,
{
}

impl<S: Clone + Send + 'static> InnerService for S where
    S: tower::Service<Request, Response = Response, Future: Send + 'static>
{
}

/// The service a [`Middleware`]'s layer makes of the service it wraps.
#[derive(Debug, Clone)]
pub struct Layered<M, S> {
    middleware: M,
    inner: S,
}

impl<M, S> Layered<M, S> {
    pub fn new(middleware: M, inner: S) -> Self {
        Self { middleware, inner }
    }
}

impl<M: Middleware, S: InnerService> tower::Service<Request> for Layered<M, S> {
    type Response = Response;
    type Error = S::Error;
    type Future = Answer<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Hand over the service that was polled ready, keep a fresh clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        self.middleware.handle(request, inner)
    }
}

/// HTTP/2 flow-control windows of servers and clients.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// A client endpoint for `url` with Kiln's transport settings (windows, nodelay, timeouts).
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, crate::Error> {
    Ok(tonic::transport::Channel::from_shared(url.to_owned())
        .map_err(|e| crate::Error::invalid("url", format!("{url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW)))
}

/// A channel to another Kiln service that presents the service credential and the trace
/// context on every call.
pub type ServiceChannel = tonic::service::interceptor::InterceptedService<
    tonic::transport::Channel,
    crate::telemetry::OutgoingInterceptor,
>;

/// A lazily connected [`ServiceChannel`] to `url`; errors name the setting it came from
/// (`key`, e.g. `registry_url`).
pub fn service_channel(
    key: &str,
    url: &str,
    service_token: &str,
) -> Result<ServiceChannel, crate::Error> {
    let channel = endpoint(url)
        .map_err(|e| crate::Error::invalid(key, e.to_string()))?
        .connect_lazy();
    let interceptor = crate::telemetry::OutgoingInterceptor::new(Some(service_token))?;
    Ok(ServiceChannel::new(channel, interceptor))
}

/// The gRPC services one server hosts, with the names health checks report.
#[derive(Default)]
pub struct ServiceSet {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
}

impl ServiceSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a generated tonic server (e.g. `AccountServiceServer::new(handler)`).
    pub fn add<S>(&mut self, service: S) -> &mut Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }
}

/// Serves `services` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    services: ServiceSet,
    auth: AuthLayer,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let ServiceSet { mut routes, names } = services;

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in &names {
        health
            .set_service_status(*name, ServingStatus::Serving)
            .await;
    }
    health.set_service_status("", ServingStatus::Serving).await;
    routes.add_service(health_service);

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the generated descriptor set is valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kiln_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the generated descriptor set is valid");
    routes.add_service(reflection_v1);
    routes.add_service(reflection_v1alpha);

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(services = ?names, "serving gRPC");
    tonic::transport::Server::builder()
        // Large flow-control windows: artifact uploads stream hundreds of MB per call, and the
        // 64 KiB HTTP/2 default makes every window update a round trip.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        // Frames of up to 1 MiB instead of 16 KiB: a 4 MiB chunk is 4 frames, not 256.
        .max_frame_size(Some(1 << 20))
        .layer(TraceContextLayer)
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(auth)
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
