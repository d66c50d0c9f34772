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

/// An address as a client reaches it: an unspecified IP (a server bound to 0.0.0.0) as the
/// loopback one.
pub fn reachable(mut addr: std::net::SocketAddr) -> std::net::SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// HTTP/2 flow-control windows of servers and clients.
pub const STREAM_WINDOW: u32 = 8 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// A client endpoint for `url` with Kiln's transport settings (windows, nodelay, timeouts).
/// An `https://` URL gets TLS, trusting the process's CAs ([`crate::tls::trust`]).
pub fn endpoint(url: &str) -> Result<tonic::transport::Endpoint, crate::Error> {
    let endpoint = tonic::transport::Channel::from_shared(url.to_owned())
        .map_err(|e| crate::Error::invalid("url", format!("{url:?}: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW));
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    endpoint
        .tls_config(crate::tls::client_config())
        .map_err(|e| crate::Error::invalid("url", format!("{url:?}: {e}")))
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

/// A server's services called in process: the same trace, metrics and auth layers as over
/// the network, without a transport (an HTTP edge in the same process calls these).
pub type LocalService =
    tower::util::BoxCloneSyncService<Request, Response, std::convert::Infallible>;

/// The gRPC services one server hosts, with the names health checks report.
#[derive(Default, Clone)]
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

    /// These services behind the layers a network call passes (trace context, metrics, `auth`).
    pub fn local(&self, auth: AuthLayer) -> LocalService {
        use tower::Layer as _;
        let routes = self.routes.clone().routes();
        let layered =
            TraceContextLayer.layer(crate::metrics::GrpcMetricsLayer.layer(auth.layer(routes)));
        tower::util::BoxCloneSyncService::new(layered)
    }
}

/// Serves `services` on `listener` until `shutdown` resolves.
/// Serves until `shutdown`, then stops accepting, reports NOT_SERVING on gRPC health, and lets
/// the calls in flight finish for up to `grace`; the connections still open after it are
/// closed (their callers see the call fail as UNAVAILABLE).
pub async fn serve(
    listener: TcpListener,
    services: ServiceSet,
    auth: AuthLayer,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send,
    grace: std::time::Duration,
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
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let (end_calls, calls_end) = tokio::sync::watch::channel(false);
    let signal = async move {
        shutdown.await;
        // Probes and load balancers learn first; the calls in flight go on.
        for name in names.iter().copied().chain([""]) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        tracing::info!(
            ?grace,
            "stopping: no new calls, the ones in flight may finish"
        );
        let _ = stopping.send(());
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        // Large flow-control windows: artifact uploads stream hundreds of MB per call, and the
        // 64 KiB HTTP/2 default makes every window update a round trip.
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        // Frames of up to 1 MiB instead of 16 KiB: a 4 MiB chunk is 4 frames, not 256.
        .max_frame_size(Some(1 << 20))
        .layer(TraceContextLayer)
        .layer(crate::metrics::GrpcMetricsLayer)
        .layer(auth)
        .layer(GraceLayer(calls_end))
        .add_routes(routes.routes())
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    let grace_over = async move {
        match stopped.await {
            Ok(()) => tokio::time::sleep(grace).await,
            // The server ended before any shutdown (an error): nothing to wait for.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        served = &mut server => served,
        () = grace_over => {
            tracing::warn!(?grace, "the grace period is over: ending the calls still open");
            let _ = end_calls.send(true);
            server.await
        }
    }
}

/// Ends the calls still open when the grace period of a shutdown is over: one whose handler
/// has not answered gets UNAVAILABLE (the handler is dropped), a stream under way ends with
/// UNAVAILABLE in its trailers. Until then it only passes calls through.
#[derive(Debug, Clone)]
struct GraceLayer(tokio::sync::watch::Receiver<bool>);

impl<S> tower::Layer<S> for GraceLayer {
    type Service = Layered<GraceLayer, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Layered::new(self.clone(), inner)
    }
}

/// Resolves once the grace period is over.
fn grace_over(mut calls_end: tokio::sync::watch::Receiver<bool>) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        if calls_end.wait_for(|over| *over).await.is_err() {
            // The server is gone without ending calls: they end with it.
            std::future::pending::<()>().await;
        }
    })
}

const SHUTTING_DOWN: &str = "the server is shutting down and its grace period is over";

impl Middleware for GraceLayer {
    fn handle<S: InnerService>(&self, request: Request, mut inner: S) -> Answer<S::Error> {
        // One wait for the end of the grace period serves the handler and then the body.
        let mut over = grace_over(self.0.clone());
        Box::pin(async move {
            let answered = tokio::select! {
                answered = inner.call(request) => answered?,
                () = &mut over => {
                    return Ok(tonic::Status::unavailable(SHUTTING_DOWN).into_http());
                }
            };
            let (parts, body) = answered.into_parts();
            let body = tonic::body::Body::new(Graced {
                body,
                over,
                ended: false,
            });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// An answer's body that ends with UNAVAILABLE once the grace period is over.
struct Graced {
    body: tonic::body::Body,
    over: BoxFuture<'static, ()>,
    ended: bool,
}

impl http_body::Body for Graced {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if this.over.as_mut().poll(cx).is_ready() {
            this.ended = true;
            let mut trailers = http::HeaderMap::new();
            let status = tonic::Status::unavailable(SHUTTING_DOWN);
            if status.add_header(&mut trailers).is_ok() {
                return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
            }
            return Poll::Ready(Some(Err(status)));
        }
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    use super::*;
    use crate::auth::AuthCache;
    use crate::auth::tests::NoKeys;

    /// On shutdown a server reports NOT_SERVING to a stream already open, lets it go on for
    /// the grace period, then closes it: the caller sees UNAVAILABLE, the server returns.
    #[tokio::test]
    async fn shutdown_lets_open_calls_run_for_the_grace_period_then_ends_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let auth = AuthLayer::new(
            std::sync::Arc::new(NoKeys),
            std::sync::Arc::new(AuthCache::new(Duration::from_secs(60))),
            &[],
        );
        let grace = Duration::from_millis(600);
        let server = tokio::spawn(serve(
            listener,
            ServiceSet::new(),
            auth,
            None,
            async move {
                let _ = stopped.await;
            },
            grace,
        ));
        let channel = endpoint(&format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status(), ServingStatus::Serving);

        let asked = Instant::now();
        stop.send(()).unwrap();
        let update = watch.message().await.unwrap().unwrap();
        assert_eq!(update.status(), ServingStatus::NotServing);
        // The stream stays open through the grace period, then is ended.
        let ended = watch.message().await;
        let waited = asked.elapsed();
        assert!(
            waited >= grace,
            "ended after {waited:?}, before the grace period"
        );
        let code = ended.err().map(|status| status.code());
        assert_eq!(code, Some(tonic::Code::Unavailable), "{waited:?}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returns once the grace period is over")
            .unwrap()
            .unwrap();
    }
}
