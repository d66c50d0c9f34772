//! Kiln's HTTP edge: the public REST API (`/v1/accounts/…`) and OpenAI-style inference
//! (`/v1/…` and `/inference/v1/…`), so the public platform's SDK and OpenAI clients work
//! against a self-hosted Kiln by changing only their base URL and key. Every route transcodes
//! to the gRPC contract; the services authenticate the caller's key as they do on gRPC.

pub mod config;
mod control;
mod errors;
mod inference;
mod json;
mod mesh;
mod openapi;
mod routes;
mod signing;
mod uploads;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use http::{HeaderMap, Method, Uri};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

pub use config::GatewayConfig;
use errors::{ApiError, Style};
use inference::Endpoint;
pub use mesh::Upstream;

/// Calls into the contract with messages built from its descriptors (the edge's own means,
/// for clients that go through every RPC generically, such as the tenancy suite).
pub mod dynamic {
    pub use crate::mesh::{Caller, Mesh, Upstream, method, pool};

    /// A [`Mesh`] that reaches every service area through `upstream`.
    pub fn mesh(upstream: Upstream) -> Mesh {
        Mesh::new(
            crate::config::AREAS
                .into_iter()
                .map(|area| (area, upstream.clone()))
                .collect(),
        )
    }
}
use mesh::{Caller, Mesh};
use signing::{Grant, Signer};

/// What every route shares.
pub(crate) type Edge = Arc<EdgeState>;

pub(crate) struct EdgeState {
    mesh: Mesh,
    signer: Signer,
    /// The edge's own credential, for the transfers of signed URLs (None: no service token).
    service: Option<Caller>,
    public_url: String,
    signed_url_ttl: Duration,
    max_json_bytes: u64,
    max_upload_bytes: u64,
}

impl EdgeState {
    /// A URL that allows `op` (`put`, `get`) on one file of `resource` without a key.
    fn signed_url(&self, op: &str, resource: &str, file: &str, size: u64) -> String {
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + self.signed_url_ttl.as_secs();
        let grant = Grant {
            op: op.to_owned(),
            resource: resource.to_owned(),
            file: file.to_owned(),
            size,
            expires,
        };
        format!("{}/v1/signed/{}", self.public_url, self.signer.sign(&grant))
    }
}

impl Caller {
    /// The caller's `Authorization` header, passed on as gRPC metadata.
    fn from_headers(headers: &HeaderMap) -> Result<Self, ApiError> {
        let authorization = match headers.get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            tonic::Status::unauthenticated("malformed Authorization header"),
                            Style::Control,
                        )
                    })?,
            ),
        };
        Ok(Self { authorization })
    }

    /// A caller presenting `token` as its key.
    pub fn bearer(token: &str) -> Option<Self> {
        let authorization = format!("Bearer {token}").parse().ok()?;
        Some(Self {
            authorization: Some(authorization),
        })
    }
}

/// A running edge.
pub struct Running {
    pub addr: SocketAddr,
    pub done: JoinHandle<()>,
}

/// Serves the edge on `listener` until `stop`, transcoding to the gRPC API at the
/// configuration's URLs (`local` for those it leaves empty: this process's own services).
/// `service_token` does the transfers of signed URLs (and, without `url_signing_secret`,
/// keys their signatures).
pub async fn serve(
    config: &GatewayConfig,
    listener: TcpListener,
    local: Upstream,
    service_token: Option<&str>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("gateway listener address")?;
    let mut upstreams = std::collections::HashMap::new();
    for area in config::AREAS {
        let upstream = match config.url_of(area) {
            Some(url) => {
                Upstream::remote(url).map_err(|e| anyhow::anyhow!("gateway.{area}_url: {e}"))?
            }
            None => local.clone(),
        };
        upstreams.insert(area, upstream);
    }
    let secret = match (&config.url_signing_secret, service_token) {
        (secret, _) if !secret.is_empty() => secret.clone().into_bytes(),
        (_, Some(token)) => format!("kiln-gateway-urls:{token}").into_bytes(),
        _ => uuid::Uuid::new_v4().as_bytes().to_vec(),
    };
    let public_url = match config.public_url.trim_end_matches('/') {
        "" => format!("http://{}", kiln_core::server::reachable(addr)),
        url => url.to_owned(),
    };
    let edge: Edge = Arc::new(EdgeState {
        mesh: Mesh::new(upstreams),
        signer: Signer::new(&secret),
        service: service_token.and_then(Caller::bearer),
        public_url,
        signed_url_ttl: config.signed_url_ttl,
        max_json_bytes: config.max_json_bytes,
        max_upload_bytes: config.max_upload_bytes,
    });
    let app = router(edge);
    let done = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "the HTTP edge stopped");
        }
    });
    tracing::info!(%addr, "HTTP edge serving");
    Ok(Running { addr, done })
}

fn router(edge: Edge) -> Router {
    let mut app = Router::new();
    for prefix in ["/v1", "/inference/v1"] {
        app = app
            .route(&format!("{prefix}/chat/completions"), post(chat))
            .route(&format!("{prefix}/completions"), post(completions))
            .route(&format!("{prefix}/embeddings"), post(embeddings))
            .route(&format!("{prefix}/models"), get(models));
    }
    app.route("/v1/signed/{token}", any(signed))
        .route("/openapi.json", get(openapi::document))
        .fallback(fallback)
        .layer(axum::middleware::from_fn(trace))
        .with_state(edge)
}

async fn chat(State(edge): State<Edge>, headers: HeaderMap, body: Body) -> Response {
    inference::handle(edge, Endpoint::Chat, headers, body).await
}

async fn completions(State(edge): State<Edge>, headers: HeaderMap, body: Body) -> Response {
    inference::handle(edge, Endpoint::Completions, headers, body).await
}

async fn embeddings(State(edge): State<Edge>, headers: HeaderMap, body: Body) -> Response {
    inference::handle(edge, Endpoint::Embeddings, headers, body).await
}

async fn models(State(edge): State<Edge>, headers: HeaderMap) -> Response {
    inference::models(edge, headers).await
}

async fn signed(
    State(edge): State<Edge>,
    method: Method,
    Path(token): Path<String>,
    body: Body,
) -> Response {
    uploads::signed(edge, method, token, body).await
}

async fn fallback(
    State(edge): State<Edge>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if uri.path().starts_with("/v1/") {
        return control::handle(edge, method, uri, headers, body).await;
    }
    let status = tonic::Status::not_found(format!("no route for {method} {}", uri.path()));
    ApiError::new(status, Style::Control).into_response()
}

/// The edge's request counts (by route, method and HTTP status) and durations (by route and
/// method); the route is a template of the route table, never a caller's path.
struct Families {
    requests: metrics::Family<metrics::Labels<3>, metrics::Counter>,
    durations: metrics::HistogramFamily<metrics::Labels<2>>,
}

static FAMILIES: std::sync::LazyLock<Families> = std::sync::LazyLock::new(|| Families {
    requests: metrics::register(
        "kiln_http_server_requests",
        "HTTP requests the edge answered, by route, method and status",
        false,
        metrics::Family::default(),
    ),
    durations: metrics::register(
        "kiln_http_server_request_duration",
        "Time to the answer's head (a stream's first event), by route and method",
        true,
        metrics::Family::new_with_constructor(metrics::seconds_histogram),
    ),
});

use kiln_core::metrics;

/// The route a request took, as a template: a bounded label, with no ID or token in it.
fn route_label(method: &Method, path: &str) -> String {
    const OWN: [&str; 4] = ["chat/completions", "completions", "embeddings", "models"];
    if path.starts_with("/v1/signed/") {
        return "/v1/signed/{token}".into();
    }
    let inference = ["/v1/", "/inference/v1/"].iter().any(|prefix| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| OWN.contains(&rest))
    });
    if inference || path == "/openapi.json" {
        return path.to_owned();
    }
    if let Some(rest) = path.strip_prefix("/v1/")
        && let routes::Found::Route(matched) = routes::find(method, &control::percent_decode(rest))
    {
        return openapi::template(matched.route.path);
    }
    "unmatched".into()
}

/// One span per request, parented on the caller's `traceparent`; the calls it makes carry it
/// on. Counted and timed by route.
async fn trace(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    // The route's template, not the path: a signed URL is a credential, and IDs are unbounded.
    let path = route_label(&method, request.uri().path());
    let span = tracing::info_span!(
        "http",
        otel.name = %format!("{} {path}", request.method()),
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        kiln_core::telemetry::set_parent_from_traceparent(&span, parent);
    }
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    let method = method.as_str().to_owned();
    let families = &*FAMILIES;
    families
        .durations
        .get_or_create(&[("route", path.clone()), ("method", method.clone())])
        .observe(started.elapsed().as_secs_f64());
    let status = response.status().as_u16().to_string();
    families
        .requests
        .get_or_create(&[("route", path), ("method", method), ("status", status)])
        .inc();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_label_is_a_template_never_an_id_or_a_token() {
        let label = |method: Method, path: &str| route_label(&method, path);
        assert_eq!(
            label(Method::GET, "/v1/accounts/acme/models/secret-name"),
            "/v1/accounts/{account_id}/models/{model_id}"
        );
        assert_eq!(
            label(Method::PATCH, "/v1/accounts/a/deployments/d:scale"),
            "/v1/accounts/{account_id}/deployments/{deployment_id}:scale"
        );
        assert_eq!(
            label(Method::PUT, "/v1/signed/eyJzZWNyZXQ.abc"),
            "/v1/signed/{token}"
        );
        assert_eq!(
            label(Method::POST, "/inference/v1/chat/completions"),
            "/inference/v1/chat/completions"
        );
        assert_eq!(label(Method::GET, "/v1/accounts/a/widgets/w"), "unmatched");
        assert_eq!(
            label(Method::GET, "/inference/v1/anything-else"),
            "unmatched"
        );
    }
}
