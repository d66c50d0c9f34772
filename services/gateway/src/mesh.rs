//! Calls into the gRPC contract with messages built at run time from its descriptors: the edge
//! has no model of its own, it sends what the services define.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Buf;
use http::uri::PathAndQuery;
use kiln_core::server::LocalService;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, MethodDescriptor};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

/// Every Kiln proto, as the services were built with.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        DescriptorPool::decode(kiln_proto::FILE_DESCRIPTOR_SET)
            .expect("the generated descriptor set decodes")
    })
}

/// A method of the contract by its full name, e.g. `kiln.registry.v1.ModelService/GetModel`.
pub fn method(full_name: &str) -> MethodDescriptor {
    let (service, method) = full_name
        .split_once('/')
        .unwrap_or_else(|| panic!("{full_name}: service/method"));
    pool()
        .get_service_by_name(service)
        .and_then(|s| s.methods().find(|m| m.name() == method))
        .unwrap_or_else(|| panic!("{full_name} is in the contract"))
}

/// What the edge forwards of the HTTP caller: its credential (the services authenticate it
/// exactly as a gRPC caller's).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Caller {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        if let Some(value) = &self.authorization {
            metadata.insert("authorization", value.clone());
        }
        let traceparent = kiln_core::telemetry::current_traceparent();
        if let Ok(value) = MetadataValue::try_from(traceparent.as_str())
            && !traceparent.is_empty()
        {
            metadata.insert("traceparent", value);
        }
        request
    }
}

/// Where the services of an area answer: a gRPC channel, or this process's own services
/// called in process (the same layers, no transport).
#[derive(Clone)]
pub enum Upstream {
    Remote(Channel),
    Local(LocalService),
}

impl Upstream {
    /// A lazily connected channel to `url`.
    pub fn remote(url: &str) -> Result<Self, kiln_core::Error> {
        Ok(Self::Remote(
            kiln_core::server::endpoint(url)?.connect_lazy(),
        ))
    }
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl tower::Service<HttpRequest> for Upstream {
    type Response = HttpResponse;
    type Error = tonic::transport::Error;
    type Future = futures::future::BoxFuture<'static, Result<HttpResponse, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match self {
            Self::Remote(channel) => channel.poll_ready(cx),
            Self::Local(local) => match local.poll_ready(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        match self {
            Self::Remote(channel) => Box::pin(channel.call(request)),
            Self::Local(local) => {
                let answer = local.call(request);
                Box::pin(async move {
                    match answer.await {
                        Ok(response) => Ok(response),
                        Err(never) => match never {},
                    }
                })
            }
        }
    }
}

/// The gRPC API behind the edge: where each service area (`identity`, `registry`…) answers.
#[derive(Clone)]
pub struct Mesh {
    upstreams: HashMap<&'static str, Upstream>,
}

impl Mesh {
    pub fn new(upstreams: HashMap<&'static str, Upstream>) -> Self {
        Self { upstreams }
    }

    /// The registry, for the typed clients of uploads and downloads.
    pub fn registry(&self) -> Upstream {
        self.upstreams["registry"].clone()
    }

    fn upstream_of(&self, method: &MethodDescriptor) -> Upstream {
        let package = method.parent_service().package_name();
        let area = package
            .strip_prefix("kiln.")
            .and_then(|p| p.strip_suffix(".v1"))
            .unwrap_or(package);
        self.upstreams
            .get(area)
            .unwrap_or_else(|| panic!("{package} is a service area of the edge"))
            .clone()
    }

    pub fn request<T>(&self, caller: &Caller, message: T) -> Request<T> {
        caller.request(message)
    }

    /// One unary call.
    pub async fn unary(
        &self,
        caller: &Caller,
        method: &MethodDescriptor,
        message: DynamicMessage,
    ) -> Result<DynamicMessage, Status> {
        let mut grpc = self.ready(method).await?;
        let answer = grpc
            .unary(caller.request(message), path(method), codec(method))
            .await?;
        Ok(answer.into_inner())
    }

    /// A call that answers with a stream.
    pub async fn server_streaming(
        &self,
        caller: &Caller,
        method: &MethodDescriptor,
        message: DynamicMessage,
    ) -> Result<Streaming<DynamicMessage>, Status> {
        let mut grpc = self.ready(method).await?;
        let answer = grpc
            .server_streaming(caller.request(message), path(method), codec(method))
            .await?;
        Ok(answer.into_inner())
    }

    /// A call that takes a stream (the uploads), here the messages `messages`.
    pub async fn client_streaming(
        &self,
        caller: &Caller,
        method: &MethodDescriptor,
        messages: Vec<DynamicMessage>,
    ) -> Result<DynamicMessage, Status> {
        let mut grpc = self.ready(method).await?;
        let stream = futures::stream::iter(messages);
        let answer = grpc
            .client_streaming(caller.request(stream), path(method), codec(method))
            .await?;
        Ok(answer.into_inner())
    }

    async fn ready(
        &self,
        method: &MethodDescriptor,
    ) -> Result<tonic::client::Grpc<Upstream>, Status> {
        let mut grpc = tonic::client::Grpc::new(self.upstream_of(method));
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("the gRPC API is not reachable: {e}")))?;
        Ok(grpc)
    }
}

fn path(method: &MethodDescriptor) -> PathAndQuery {
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    PathAndQuery::try_from(path).expect("a method path is a valid URI path")
}

fn codec(method: &MethodDescriptor) -> DynamicCodec {
    DynamicCodec(method.output())
}

/// Encodes any message; decodes the method's output type.
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicEncoder;
    type Decoder = DynamicCodecDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        DynamicEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        DynamicCodecDecoder(self.0.clone())
    }
}

struct DynamicEncoder;

impl Encoder for DynamicEncoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

struct DynamicCodecDecoder(MessageDescriptor);

impl Decoder for DynamicCodecDecoder {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), bytes)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding the answer: {e}")))
    }
}
