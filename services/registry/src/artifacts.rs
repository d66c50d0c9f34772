//! Where file bytes live. Uploads land in a local staging file that grows by appending (its
//! length is always a correct resume offset, even after a crash); a complete, verified file
//! moves into the object store: a rename on the local file system, a multipart upload to an
//! S3-compatible store.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::config::RegistryConfig;
use kiln_core::{Error, Result};

/// The bytes behind models and datasets.
#[derive(Clone)]
pub struct Artifacts {
    store: Arc<dyn ObjectStore>,
    /// Set when the store is the local file system rooted here (finishing is a rename).
    local_root: Option<PathBuf>,
    staging: PathBuf,
}

impl Artifacts {
    pub fn open(data_dir: &Path, config: &RegistryConfig) -> Result<Self> {
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&staging)?;
        if config.object_store_url.is_empty() {
            let root = data_dir.join("objects");
            std::fs::create_dir_all(&root)?;
            let store =
                object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(objects)?;
            Ok(Self {
                store: Arc::new(store),
                local_root: Some(root),
                staging,
            })
        } else {
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_url(config.object_store_url.clone())
                .with_allow_http(config.s3_allow_http);
            if !config.s3_endpoint.is_empty() {
                builder = builder.with_endpoint(config.s3_endpoint.clone());
            }
            if !config.s3_region.is_empty() {
                builder = builder.with_region(config.s3_region.clone());
            }
            if !config.s3_access_key_id.is_empty() {
                builder = builder
                    .with_access_key_id(config.s3_access_key_id.clone())
                    .with_secret_access_key(config.s3_secret_access_key.clone());
            }
            let store = builder.build().map_err(objects)?;
            Ok(Self {
                store: Arc::new(store),
                local_root: None,
                staging,
            })
        }
    }

    /// The staging file of an object key.
    pub fn staging_path(&self, key: &str) -> PathBuf {
        self.staging.join(format!("{key}.part"))
    }

    /// Bytes staged so far for `key`.
    pub async fn staged_len(&self, key: &str) -> u64 {
        tokio::fs::metadata(self.staging_path(key))
            .await
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Opens the staging file for writing, creating it (and emptying it when `reset`). A std
    /// file: uploads write it at explicit offsets from a thread of their own, without
    /// tokio::fs's extra copy.
    pub async fn open_staging(&self, key: &str, reset: bool) -> Result<std::fs::File> {
        let path = self.staging_path(key);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        if reset {
            let _ = tokio::fs::remove_file(&path).await;
        }
        Ok(std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?)
    }

    pub async fn discard_staging(&self, key: &str) {
        let _ = tokio::fs::remove_file(self.staging_path(key)).await;
    }

    /// SHA-256 of the staged bytes (when the upload was resumed, so no running hash covers
    /// them all).
    pub async fn hash_staged(&self, key: &str) -> Result<String> {
        Ok(crate::local_files::hash_file(&self.staging_path(key))
            .await?
            .0)
    }

    /// Moves a complete staged file into the store under `key`.
    pub async fn finish(&self, key: &str) -> Result<()> {
        let staged = self.staging_path(key);
        match &self.local_root {
            Some(root) => {
                let target = root.join(key);
                if let Some(parent) = target.parent() {
                    tokio::fs::create_dir_all(parent).await?;
                }
                tokio::fs::rename(&staged, &target).await?;
            }
            None => {
                let upload = self
                    .store
                    .put_multipart(&ObjectPath::from(key))
                    .await
                    .map_err(objects)?;
                let mut writer = WriteMultipart::new(upload);
                let mut file = tokio::fs::File::open(&staged).await?;
                let mut buf = vec![0u8; 8 << 20];
                loop {
                    let n = file.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    writer.wait_for_capacity(4).await.map_err(objects)?;
                    writer.write(&buf[..n]);
                }
                writer.finish().await.map_err(objects)?;
                tokio::fs::remove_file(&staged).await?;
            }
        }
        Ok(())
    }

    /// Stores small bytes directly (manifests, copies).
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&ObjectPath::from(key), bytes.into())
            .await
            .map_err(objects)?;
        Ok(())
    }

    pub async fn copy(&self, from: &str, to: &str) -> Result<()> {
        self.store
            .copy(&ObjectPath::from(from), &ObjectPath::from(to))
            .await
            .map_err(objects)?;
        Ok(())
    }

    pub async fn read_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        self.store
            .get_range(&ObjectPath::from(key), range)
            .await
            .map_err(objects)
    }

    pub async fn read_all(&self, key: &str) -> Result<Bytes> {
        self.store
            .get(&ObjectPath::from(key))
            .await
            .map_err(objects)?
            .bytes()
            .await
            .map_err(objects)
    }

    /// Streams `range` of an object in pieces of at most `chunk` bytes.
    pub async fn stream(
        &self,
        key: &str,
        range: Range<u64>,
        chunk: usize,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(range)),
            ..Default::default()
        };
        let result = self
            .store
            .get_opts(&ObjectPath::from(key), options)
            .await
            .map_err(objects)?;
        Ok(result
            .into_stream()
            .flat_map(move |piece| {
                let pieces: Vec<Result<Bytes, Error>> = match piece {
                    Ok(bytes) => (0..bytes.len())
                        .step_by(chunk)
                        .map(|start| Ok(bytes.slice(start..(start + chunk).min(bytes.len()))))
                        .collect(),
                    Err(e) => vec![Err(objects(e))],
                };
                futures::stream::iter(pieces)
            })
            .boxed())
    }

    /// Deletes every object under `prefix` and its staging files.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        let path = ObjectPath::from(prefix);
        let mut listing = self.store.list(Some(&path));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(objects)?;
            self.store.delete(&meta.location).await.map_err(objects)?;
        }
        let _ = tokio::fs::remove_dir_all(self.staging.join(prefix)).await;
        Ok(())
    }
}

/// An object store failure: internal (its text names buckets and paths).
fn objects(err: object_store::Error) -> Error {
    Error::internal("object store", err)
}
