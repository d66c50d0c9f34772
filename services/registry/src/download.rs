//! Reading files back: whole files or byte ranges, streamed in pieces.

use futures::StreamExt;
use futures::stream::BoxStream;
use kiln_core::auth::Principal;
use kiln_proto::registry::v1::{
    DownloadModelFilesRequest, DownloadModelFilesResponse, ModelFile, prepared_bundle,
};

use crate::service::Registry;
use crate::stored::{file_key, precision_name};
use kiln_core::{Error, Result};

/// Bytes per streamed message.
pub const CHUNK: usize = 1 << 20;

/// A range's fields as a request gives them: checked before anything is read, so a bad
/// argument is named whatever the state of the file.
pub fn check_range_fields(offset: i64, length: i64) -> Result<()> {
    if offset < 0 {
        return Err(Error::invalid(
            "offset",
            format!("must not be negative, got {offset}"),
        ));
    }
    if length < 0 {
        return Err(Error::invalid("length", "must not be negative"));
    }
    Ok(())
}

/// The byte range a request asks of a file of `size` bytes.
pub fn byte_range(size: u64, offset: i64, length: i64) -> Result<std::ops::Range<u64>> {
    check_range_fields(offset, length)?;
    if offset as u64 > size {
        return Err(Error::invalid(
            "offset",
            format!("{offset} is outside the file's {size} bytes"),
        ));
    }
    let start = offset as u64;
    let end = if length == 0 {
        size
    } else {
        (start + length as u64).min(size)
    };
    Ok(start..end)
}

/// Streams `range` of `key` as messages built by `make(offset, data, first)`.
pub async fn stream_object<T: Send + 'static>(
    registry: &Registry,
    key: String,
    range: std::ops::Range<u64>,
    make: impl Fn(u64, bytes::Bytes, bool) -> T + Send + 'static,
) -> Result<BoxStream<'static, Result<T, Error>>> {
    if range.is_empty() {
        return Ok(
            futures::stream::iter([Ok(make(range.start, bytes::Bytes::new(), true))]).boxed(),
        );
    }
    let pieces = registry
        .artifacts()
        .stream(&key, range.clone(), CHUNK)
        .await?;
    let mut offset = range.start;
    let mut first = true;
    Ok(pieces
        .map(move |piece| {
            let data = piece?;
            let message = make(offset, data.clone(), first);
            first = false;
            offset += data.len() as u64;
            Ok(message)
        })
        .boxed())
}

impl Registry {
    pub async fn download_model_files(
        &self,
        caller: &Principal,
        request: DownloadModelFilesRequest,
    ) -> Result<BoxStream<'static, Result<DownloadModelFilesResponse, Error>>> {
        check_range_fields(request.offset, request.length)?;
        let stored = self.readable_model(caller, "name", &request.name).await?;
        let (bundle, files): (String, Vec<ModelFile>) = match request.bundle_precision {
            None => (String::new(), stored.model.files.clone()),
            Some(precision) => {
                let bundle = stored
                    .model
                    .prepared_bundles
                    .iter()
                    .find(|b| {
                        b.precision == precision && b.state == prepared_bundle::State::Ready as i32
                    })
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "{} has no READY {} bundle; PrepareModel first",
                            stored.model.name,
                            precision_name(precision)
                        ))
                    })?;
                (precision_name(precision), bundle.files.clone())
            }
        };
        let selected: Vec<ModelFile> = if request.path.is_empty() {
            if request.offset != 0 || request.length != 0 {
                return Err(Error::invalid("offset", "a range needs a path"));
            }
            files.into_iter().filter(|f| f.complete).collect()
        } else {
            let file = files
                .into_iter()
                .find(|f| f.path == request.path)
                .ok_or_else(|| {
                    Error::not_found(format!("{}/files/{}", stored.model.name, request.path))
                })?;
            if !file.complete {
                return Err(Error::FailedPrecondition(format!(
                    "{} is not completely uploaded",
                    file.path
                )));
            }
            vec![file]
        };
        let mut streams = Vec::new();
        for file in selected {
            let range = byte_range(file.size_bytes as u64, request.offset, request.length)?;
            let key = file_key(stored.account(), stored.id(), &bundle, &file.path);
            let (path, size, sha) = (file.path.clone(), file.size_bytes, file.sha256.clone());
            streams.push(
                stream_object(self, key, range, move |offset, data, first| {
                    DownloadModelFilesResponse {
                        path: path.clone(),
                        offset: offset as i64,
                        data,
                        size_bytes: if first { size } else { 0 },
                        sha256: if first { sha.clone() } else { String::new() },
                    }
                })
                .await?,
            );
        }
        Ok(futures::stream::iter(streams).flatten().boxed())
    }
}
