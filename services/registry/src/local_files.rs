//! Local files as uploads: their SHA-256 and the upload messages that carry them. The library
//! import uses them, and so do clients (the CLI).

use std::path::{Path, PathBuf};

use futures::Stream;
use kiln_core::auth::hex;
use kiln_proto::registry::v1::{
    FileChunk, ModelFileHeader, UploadModelFilesRequest, upload_model_files_request::Payload,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Bytes per upload message (the server accepts up to 8 MiB). 1 MiB measured fastest here:
/// pieces that stay in cache beat fewer, larger ones (4 MiB ran at less than half the rate).
pub const UPLOAD_CHUNK: usize = 1 << 20;

/// Lowercase hex SHA-256 and size of a local file.
pub async fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex(hasher.finalize()), size))
}

/// The upload messages of one local file, from `offset` on: a header, then chunks read
/// lazily. `on_sent` hears how many bytes each chunk carried (a progress bar).
pub fn file_upload_stream(
    model: String,
    path_in_model: String,
    local: PathBuf,
    size: u64,
    sha256: String,
    offset: u64,
    on_sent: impl Fn(u64) + Send + 'static,
) -> impl Stream<Item = UploadModelFilesRequest> + Send + 'static {
    let header = UploadModelFilesRequest {
        payload: Some(Payload::Header(ModelFileHeader {
            model,
            path: path_in_model,
            size_bytes: size as i64,
            sha256,
        })),
    };
    // A reader thread stays a few chunks ahead, so the disk and the network overlap.
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadModelFilesRequest>(4);
    std::thread::spawn(move || {
        use std::io::{Read, Seek};
        let Ok(mut file) = std::fs::File::open(&local) else {
            return;
        };
        if file.seek(std::io::SeekFrom::Start(offset)).is_err() {
            return;
        }
        let mut at = offset;
        while at < size {
            let want = UPLOAD_CHUNK.min((size - at) as usize);
            // Read into spare capacity: a zeroed buffer would cost a pass over every byte.
            let mut buf = Vec::with_capacity(want);
            match (&mut file).take(want as u64).read_to_end(&mut buf) {
                Ok(n) if n == want => {}
                _ => return,
            }
            let message = UploadModelFilesRequest {
                payload: Some(Payload::Chunk(FileChunk {
                    offset: at as i64,
                    data: buf.into(),
                })),
            };
            if tx.blocking_send(message).is_err() {
                return;
            }
            at += want as u64;
        }
    });
    let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
    let chunks = futures::StreamExt::inspect(chunks, move |m| {
        if let Some(Payload::Chunk(c)) = &m.payload {
            on_sent(c.data.len() as u64);
        }
    });
    futures::StreamExt::chain(futures::stream::iter([header]), chunks)
}
