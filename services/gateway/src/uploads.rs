//! The routes the edge serves itself: the multipart dataset upload, signed upload and download
//! URLs, and upload validation. Bytes stream through to the registry's resumable upload; the
//! edge spools a file only because the upload's header needs its size and SHA-256 first.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt as _, TryStreamExt as _};
use http::{HeaderMap, StatusCode};
use kiln_proto::registry::v1 as regv1;
use regv1::dataset_service_client::DatasetServiceClient;
use regv1::model_service_client::ModelServiceClient;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::Edge;
use crate::control::read_json;
use crate::errors::{ApiError, Style};
use crate::mesh::Caller;
use crate::routes::EdgeRoute;
use crate::signing::Grant;

/// The registry takes up to 4 MiB a chunk.
const CHUNK: usize = 4 << 20;

fn fail(status: tonic::Status) -> ApiError {
    ApiError::new(status, Style::Control)
}

pub async fn handle(
    edge: &Edge,
    route: EdgeRoute,
    resource: &str,
    caller: &Caller,
    _query: &[(String, String)],
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, ApiError> {
    if route == EdgeRoute::DatasetUpload {
        let (file, size, sha256, filename) = spool_multipart(edge, headers, body).await?;
        let dataset = upload_dataset(edge, caller, resource, file, size, &sha256).await?;
        let created = dataset.create_time.as_ref().map_or(0, |t| t.seconds);
        return Ok(json!({
            "id": dataset.name, "object": "file", "bytes": size, "created_at": created,
            "filename": filename, "state": state_name(dataset.state),
        }));
    }
    // Every other request is read whole, whatever its route does with it: an unread body
    // (even the `{}` a client sends with a POST) makes the server close the keep-alive
    // connection, racing the client's next request on it ("disconnected without a response").
    let body = read_json(body, edge.max_json_bytes).await?;
    match route {
        EdgeRoute::DatasetUpload => unreachable!("answered above"),
        EdgeRoute::DatasetUploadEndpoint | EdgeRoute::ModelUploadEndpoint => {
            let sizes = file_sizes(&body, edge.max_upload_bytes)?;
            if route == EdgeRoute::DatasetUploadEndpoint && sizes.len() != 1 {
                return Err(ApiError::invalid(
                    "filenameToSize",
                    "a dataset is one file: name exactly one",
                    Style::Control,
                ));
            }
            visible(edge, caller, route, resource).await?;
            let mut urls = serde_json::Map::new();
            for (name, size) in sizes {
                let file = if route == EdgeRoute::ModelUploadEndpoint {
                    name.clone()
                } else {
                    String::new()
                };
                urls.insert(name, edge.signed_url("put", resource, &file, size).into());
            }
            Ok(json!({"filenameToSignedUrls": urls, "filenameToUnsignedUris": {}}))
        }
        EdgeRoute::DatasetDownloadEndpoint | EdgeRoute::ModelDownloadEndpoint => {
            let files = visible(edge, caller, route, resource).await?;
            let mut urls = serde_json::Map::new();
            for file in files {
                let name = if file.is_empty() {
                    "dataset.jsonl".to_owned()
                } else {
                    file.clone()
                };
                urls.insert(name, edge.signed_url("get", resource, &file, 0).into());
            }
            Ok(json!({"filenameToSignedUrls": urls}))
        }
        EdgeRoute::DatasetValidateUpload => {
            let mut client = DatasetServiceClient::new(edge.mesh.registry());
            let request = regv1::GetDatasetRequest {
                name: resource.to_owned(),
            };
            let dataset = client
                .get_dataset(edge.mesh.request(caller, request))
                .await
                .map_err(fail)?
                .into_inner();
            match regv1::dataset::State::try_from(dataset.state) {
                Ok(regv1::dataset::State::Ready) => Ok(json!({})),
                Ok(regv1::dataset::State::Failed) => {
                    Err(fail(tonic::Status::failed_precondition(format!(
                        "the dataset is not valid: {}",
                        dataset.status.map(|s| s.message).unwrap_or_default()
                    ))))
                }
                _ => Err(fail(tonic::Status::failed_precondition(format!(
                    "the dataset's file is not uploaded yet ({} of {} bytes)",
                    dataset.uploaded_bytes, dataset.size_bytes
                )))),
            }
        }
    }
}

fn state_name(state: i32) -> &'static str {
    regv1::dataset::State::try_from(state).map_or("STATE_UNSPECIFIED", |s| s.as_str_name())
}

/// `filenameToSize`: file name -> size (int64 as a string, or a number).
fn file_sizes(
    body: &serde_json::Map<String, Value>,
    limit: u64,
) -> Result<BTreeMap<String, u64>, ApiError> {
    let invalid = |why: String| ApiError::invalid("filenameToSize", why, Style::Control);
    let Some(Value::Object(sizes)) = body
        .get("filenameToSize")
        .or_else(|| body.get("filename_to_size"))
    else {
        return Err(invalid("is required: {file name: size in bytes}".into()));
    };
    let mut out = BTreeMap::new();
    for (name, size) in sizes {
        let size = match size {
            Value::String(s) => s.parse::<u64>().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| invalid(format!("{name}: the size must be a whole number of bytes")))?;
        if name.is_empty() || name.contains("..") || name.starts_with('/') {
            return Err(invalid(format!("{name:?} is not a file name")));
        }
        if size > limit {
            return Err(invalid(format!(
                "{name}: {size} bytes is more than the {limit} this edge takes"
            )));
        }
        out.insert(name.clone(), size);
    }
    if out.is_empty() {
        return Err(invalid("names no file".into()));
    }
    Ok(out)
}

/// Checks with the caller's own credential that it may see `resource` (NOT_FOUND otherwise:
/// a URL is never signed for a resource its caller could not reach), and gives its files
/// (a model's paths; one "" for a dataset).
async fn visible(
    edge: &Edge,
    caller: &Caller,
    route: EdgeRoute,
    resource: &str,
) -> Result<Vec<String>, ApiError> {
    let name = resource.to_owned();
    match route {
        EdgeRoute::ModelUploadEndpoint | EdgeRoute::ModelDownloadEndpoint => {
            let mut client = ModelServiceClient::new(edge.mesh.registry());
            let model = client
                .get_model(edge.mesh.request(caller, regv1::GetModelRequest { name }))
                .await
                .map_err(fail)?
                .into_inner();
            Ok(model.files.into_iter().map(|f| f.path).collect())
        }
        _ => {
            let mut client = DatasetServiceClient::new(edge.mesh.registry());
            client
                .get_dataset(edge.mesh.request(caller, regv1::GetDatasetRequest { name }))
                .await
                .map_err(fail)?;
            Ok(vec![String::new()])
        }
    }
}

/// A spooled file: its handle at the start, size and SHA-256.
type Spooled = (tokio::fs::File, u64, String);

/// Writes `chunks` to a temporary file (gone when dropped), hashing as it goes; more than
/// `limit` bytes is refused.
async fn spool<E: std::fmt::Display>(
    mut chunks: impl Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    limit: u64,
) -> Result<Spooled, ApiError> {
    let io = |e: std::io::Error| {
        tracing::error!(error = %e, "spooling an upload");
        fail(tonic::Status::internal(
            "the edge could not spool the upload",
        ))
    };
    let std_file = tempfile::tempfile().map_err(io)?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid("body", format!("unreadable: {e}"), Style::Control))?;
        size += chunk.len() as u64;
        if size > limit {
            return Err(ApiError::invalid(
                "body",
                format!("is larger than the {limit} bytes allowed"),
                Style::Control,
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    file.seek(std::io::SeekFrom::Start(0)).await.map_err(io)?;
    Ok((file, size, kiln_core::auth::hex(hasher.finalize())))
}

/// The `file` part of a multipart body, spooled (with its file name).
async fn spool_multipart(
    edge: &Edge,
    headers: &HeaderMap,
    body: Body,
) -> Result<(tokio::fs::File, u64, String, String), ApiError> {
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::invalid(
            "Content-Type",
            "must be multipart/form-data with a boundary",
            Style::Control,
        )
    })?;
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    let bad = |e: multer::Error| {
        ApiError::invalid("body", format!("malformed multipart: {e}"), Style::Control)
    };
    while let Some(field) = multipart.next_field().await.map_err(bad)? {
        if field.name() != Some("file") {
            continue;
        }
        let filename = field.file_name().unwrap_or("upload").to_owned();
        let (file, size, sha256) = spool(field, edge.max_upload_bytes).await?;
        return Ok((file, size, sha256, filename));
    }
    Err(ApiError::invalid(
        "file",
        "the multipart body has no file part",
        Style::Control,
    ))
}

/// The chunks of a spooled file, as the upload RPCs take them.
fn chunks(file: tokio::fs::File) -> impl Stream<Item = regv1::FileChunk> + Send {
    futures::stream::unfold((file, 0i64), |(mut file, offset)| async move {
        let mut data = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match file.read(&mut data[filled..]).await {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) => {
                    tracing::error!(error = %e, "reading a spooled upload");
                    return None;
                }
            }
        }
        if filled == 0 {
            return None;
        }
        data.truncate(filled);
        let chunk = regv1::FileChunk {
            offset,
            data: data.into(),
        };
        Some((chunk, (file, offset + filled as i64)))
    })
}

async fn upload_dataset(
    edge: &Edge,
    caller: &Caller,
    dataset: &str,
    file: tokio::fs::File,
    size: u64,
    sha256: &str,
) -> Result<regv1::Dataset, ApiError> {
    use regv1::upload_dataset_request::Payload;
    let header = regv1::UploadDatasetRequest {
        payload: Some(Payload::Header(regv1::DatasetFileHeader {
            dataset: dataset.to_owned(),
            size_bytes: size as i64,
            sha256: sha256.to_owned(),
        })),
    };
    let messages = futures::stream::once(async { header }).chain(chunks(file).map(|c| {
        regv1::UploadDatasetRequest {
            payload: Some(Payload::Chunk(c)),
        }
    }));
    let mut client = DatasetServiceClient::new(edge.mesh.registry());
    Ok(client
        .upload_dataset(edge.mesh.request(caller, messages))
        .await
        .map_err(fail)?
        .into_inner())
}

async fn upload_model_file(
    edge: &Edge,
    caller: &Caller,
    model: &str,
    path: &str,
    spooled: Spooled,
) -> Result<regv1::UploadModelFilesResponse, ApiError> {
    use regv1::upload_model_files_request::Payload;
    let (file, size, sha256) = spooled;
    let header = regv1::UploadModelFilesRequest {
        payload: Some(Payload::Header(regv1::ModelFileHeader {
            model: model.to_owned(),
            path: path.to_owned(),
            size_bytes: size as i64,
            sha256,
        })),
    };
    let messages = futures::stream::once(async { header }).chain(chunks(file).map(|c| {
        regv1::UploadModelFilesRequest {
            payload: Some(Payload::Chunk(c)),
        }
    }));
    let mut client = ModelServiceClient::new(edge.mesh.registry());
    Ok(client
        .upload_model_files(edge.mesh.request(caller, messages))
        .await
        .map_err(fail)?
        .into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `PUT` or `GET /v1/signed/{token}`: the transfer a signed URL allows, done with the edge's
/// own credential (the grant was made for a caller who could reach the resource).
pub async fn signed(edge: Edge, method: http::Method, token: String, body: Body) -> Response {
    let result = async {
        let grant = edge
            .signer
            .check(&token, now())
            .map_err(|why| fail(tonic::Status::permission_denied(why)))?;
        let service = edge.service.clone().ok_or_else(|| {
            fail(tonic::Status::unimplemented(
                "signed URLs need the service credential",
            ))
        })?;
        match (method.as_str(), grant.op.as_str()) {
            ("PUT", "put") => put(&edge, &service, &grant, body).await,
            ("GET", "get") => get(&edge, &service, &grant).await,
            _ => Err(fail(tonic::Status::permission_denied(format!(
                "this URL allows {} only",
                grant.op.to_ascii_uppercase()
            )))),
        }
    };
    match result.await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    }
}

async fn put(
    edge: &Edge,
    service: &Caller,
    grant: &Grant,
    body: Body,
) -> Result<Response, ApiError> {
    let spooled = spool(body.into_data_stream(), grant.size).await?;
    if spooled.1 != grant.size {
        return Err(ApiError::invalid(
            "body",
            format!(
                "has {} bytes; the URL was signed for {}",
                spooled.1, grant.size
            ),
            Style::Control,
        ));
    }
    if grant.file.is_empty() {
        let (file, size, sha256) = spooled;
        upload_dataset(edge, service, &grant.resource, file, size, &sha256).await?;
    } else {
        upload_model_file(edge, service, &grant.resource, &grant.file, spooled).await?;
    }
    Ok(StatusCode::OK.into_response())
}

async fn get(edge: &Edge, service: &Caller, grant: &Grant) -> Result<Response, ApiError> {
    let name = grant.resource.clone();
    let bytes: futures::stream::BoxStream<'static, Result<bytes::Bytes, tonic::Status>> =
        if grant.file.is_empty() {
            let mut client = DatasetServiceClient::new(edge.mesh.registry());
            let request = regv1::DownloadDatasetRequest {
                name,
                offset: 0,
                length: 0,
            };
            let stream = client
                .download_dataset(edge.mesh.request(service, request))
                .await
                .map_err(fail)?
                .into_inner();
            stream.map_ok(|m| m.data).boxed()
        } else {
            let mut client = ModelServiceClient::new(edge.mesh.registry());
            let request = regv1::DownloadModelFilesRequest {
                name,
                path: grant.file.clone(),
                ..Default::default()
            };
            let stream = client
                .download_model_files(edge.mesh.request(service, request))
                .await
                .map_err(fail)?
                .into_inner();
            stream.map_ok(|m| m.data).boxed()
        };
    let mut response = Body::from_stream(bytes).into_response();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(body: Value) -> Result<BTreeMap<String, u64>, String> {
        let Value::Object(body) = body else {
            unreachable!()
        };
        file_sizes(&body, 1000).map_err(|e| e.status.message().to_owned())
    }

    #[test]
    fn declared_sizes_are_whole_bounded_and_name_plain_files() {
        let ok = sizes(json!({"filenameToSize": {"a.json": "10", "b.bin": 20}})).unwrap();
        assert_eq!(
            ok,
            BTreeMap::from([("a.json".into(), 10), ("b.bin".into(), 20)])
        );
        for (body, says) in [
            (json!({}), "filenameToSize: is required"),
            (json!({"filenameToSize": {}}), "names no file"),
            (json!({"filenameToSize": {"a": "-1"}}), "whole number"),
            (json!({"filenameToSize": {"a": "1e3"}}), "whole number"),
            (
                json!({"filenameToSize": {"../etc/passwd": "1"}}),
                "not a file name",
            ),
            (
                json!({"filenameToSize": {"big": "10000000000"}}),
                "more than the 1000",
            ),
        ] {
            let err = sizes(body.clone()).unwrap_err();
            assert!(
                err.starts_with("filenameToSize:") && err.contains(says),
                "{body}: {err}"
            );
        }
    }
}
