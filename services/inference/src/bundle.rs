//! Model bundles on disk: an ONNX graph, `tokenizer.json` and `manifest.json` (a [`Manifest`]),
//! from a local folder or downloaded from the registry into a cache keyed by the files' digests,
//! verified against their SHA-256, and evicted least-recently-used beyond a size cap.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use futures::StreamExt;
use kiln_core::auth::hex;
use kiln_formats::{HF_FILES, HfFiles, Manifest, read_hf};
use kiln_proto::common::v1::Precision;
use kiln_proto::registry::v1::{
    Model, ModelFile, base_model_details::CheckpointFormat, prepared_bundle,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::source::ModelSource;
use kiln_core::{Error, Result};

/// A bundle on local disk.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Bundle {
    /// Opens a bundle folder; `fallback` stands in for a missing `manifest.json`, completed
    /// by the folder's Hugging Face files when it has them (an optimum export).
    pub fn open(dir: &Path, fallback: Manifest) -> Result<Self> {
        let manifest = match std::fs::read(dir.join(Manifest::FILE)) {
            Ok(bytes) => Manifest::from_json(&bytes)
                .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", dir.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => with_hf_files(dir, fallback)?,
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    /// The graph: `model.onnx`, else the only `.onnx` file.
    pub fn graph(&self) -> Result<PathBuf> {
        let default = self.dir.join("model.onnx");
        if default.is_file() {
            return Ok(default);
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "onnx") {
                found.push(path);
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::FailedPrecondition(format!(
                "bundle {} has no .onnx graph",
                self.dir.display()
            ))),
            _ => Err(Error::FailedPrecondition(format!(
                "bundle {} has several .onnx graphs and no model.onnx",
                self.dir.display()
            ))),
        }
    }

    pub fn tokenizer(&self) -> Option<PathBuf> {
        let path = self.dir.join("tokenizer.json");
        path.is_file().then_some(path)
    }
}

/// `manifest` completed by what the Hugging Face files in `dir` say; the model's own fields
/// (a chat template set on the model, say) win over the files'.
fn with_hf_files(dir: &Path, mut manifest: Manifest) -> Result<Manifest> {
    let mut pairs = Vec::new();
    for name in HF_FILES {
        match std::fs::read(dir.join(name)) {
            Ok(bytes) => pairs.push((name.to_owned(), bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let files = HfFiles::from_pairs(&pairs);
    if files.is_empty() {
        return Ok(manifest);
    }
    let info =
        read_hf(files).map_err(|e| Error::FailedPrecondition(format!("{}: {e}", dir.display())))?;
    manifest.complete_from(info);
    Ok(manifest)
}

/// Which files of a model the engine loads: a READY prepared bundle (INT4 when `blocks_ok`,
/// the backend running ONNX Runtime's MatMulNBits; then the default precision's; then any
/// other), else the uploaded files of an ONNX checkpoint, which serve as they are.
pub fn servable_files(model: &Model, blocks_ok: bool) -> Result<(Option<i32>, Vec<ModelFile>)> {
    let int4 = Precision::Int4 as i32;
    let ready: Vec<_> = model
        .prepared_bundles
        .iter()
        .filter(|b| b.state == prepared_bundle::State::Ready as i32)
        .filter(|b| blocks_ok || b.precision != int4)
        .collect();
    let details = model.base_model_details.clone().unwrap_or_default();
    let chosen = ready
        .iter()
        .find(|b| blocks_ok && b.precision == int4)
        .or_else(|| {
            ready
                .iter()
                .find(|b| b.precision == details.default_precision)
        })
        .or_else(|| ready.first());
    if let Some(bundle) = chosen {
        return Ok((Some(bundle.precision), bundle.files.clone()));
    }
    if details.checkpoint_format == CheckpointFormat::Onnx as i32 {
        return Ok((None, model.files.clone()));
    }
    Err(Error::FailedPrecondition(format!(
        "model {} has no prepared bundle yet (PrepareModel makes one)",
        model.name
    )))
}

/// The download cache.
pub struct BundleCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Digests of bundles in use (loaded): never evicted.
    pinned: Mutex<HashSet<String>>,
}

const COMPLETE: &str = ".complete";

impl BundleCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        Self {
            dir,
            max_bytes,
            pinned: Mutex::default(),
        }
    }

    /// The cache key of a set of files: SHA-256 over their paths and digests.
    pub fn digest(files: &[ModelFile]) -> String {
        let mut lines: Vec<String> = files
            .iter()
            .map(|f| format!("{}\t{}\n", f.path, f.sha256))
            .collect();
        lines.sort();
        hex(Sha256::digest(lines.concat()))
    }

    /// The bundle of `model` on local disk, downloading it when not cached. The bundle stays
    /// pinned (not evicted) until [`BundleCache::unpin`].
    pub async fn fetch(
        &self,
        source: &dyn ModelSource,
        model: &Model,
        blocks_ok: bool,
    ) -> Result<Bundle> {
        let (precision, files) = servable_files(model, blocks_ok)?;
        let dir = self.fetch_files(source, model, precision, &files).await?;
        let opened = Bundle::open(&dir, Manifest::of_model(model));
        if opened.is_err() {
            self.unpin(&dir);
        }
        opened
    }

    /// `files` of `model` (its prepared bundle of `precision`, or its own files with None)
    /// in a folder of the cache, downloaded and verified when not cached; pinned like
    /// [`BundleCache::fetch`]'s bundles.
    pub async fn fetch_files(
        &self,
        source: &dyn ModelSource,
        model: &Model,
        precision: Option<i32>,
        files: &[ModelFile],
    ) -> Result<PathBuf> {
        let digest = Self::digest(files);
        let dir = self.dir.join(&digest);
        self.pinned.lock().expect("pins").insert(digest.clone());
        let fetched = async {
            if !dir.join(COMPLETE).is_file() {
                self.download(source, model, precision, files, &dir).await?;
            }
            // The marker's mtime is the entry's last use (LRU order survives restarts).
            std::fs::File::options()
                .write(true)
                .open(dir.join(COMPLETE))?
                .set_modified(SystemTime::now())?;
            self.evict()?;
            Ok(dir.clone())
        }
        .await;
        if fetched.is_err() {
            self.unpin(&dir);
        }
        fetched
    }

    pub fn unpin(&self, bundle_dir: &Path) {
        if let Some(digest) = bundle_dir.file_name().and_then(|n| n.to_str()) {
            self.pinned.lock().expect("pins").remove(digest);
        }
    }

    async fn download(
        &self,
        source: &dyn ModelSource,
        model: &Model,
        precision: Option<i32>,
        files: &[ModelFile],
        dir: &Path,
    ) -> Result<()> {
        let staging = self.dir.join(format!(".partial-{}", uuid::Uuid::new_v4()));
        tokio::fs::create_dir_all(&staging).await?;
        let result = async {
            let mut pieces = source.download(&model.name, precision).await?;
            let mut current: Option<(String, tokio::fs::File, Sha256, u64)> = None;
            let mut done: Vec<(String, String, u64)> = Vec::new();
            while let Some(piece) = pieces.next().await {
                let piece = piece?;
                if current.as_ref().is_none_or(|(p, ..)| *p != piece.path) {
                    if let Some(file) = current.take() {
                        done.push(finish(file).await?);
                    }
                    let local = safe_join(&staging, &piece.path)?;
                    if let Some(parent) = local.parent() {
                        tokio::fs::create_dir_all(parent).await?;
                    }
                    let file = tokio::fs::File::create(&local).await?;
                    current = Some((piece.path.clone(), file, Sha256::new(), 0));
                }
                let (_, file, hasher, size) = current.as_mut().expect("a file");
                hasher.update(&piece.data);
                *size += piece.data.len() as u64;
                file.write_all(&piece.data).await?;
            }
            if let Some(file) = current.take() {
                done.push(finish(file).await?);
            }
            for want in files {
                let got = done.iter().find(|(p, ..)| *p == want.path);
                match got {
                    Some((_, sha, size)) if *sha == want.sha256 && *size == want.size_bytes as u64 => {}
                    Some((_, sha, size)) => {
                        return Err(Error::Internal(format!(
                            "downloading {} of {}: got {size} bytes with SHA-256 {sha}, expected {} bytes with {}",
                            want.path, model.name, want.size_bytes, want.sha256
                        )));
                    }
                    None => {
                        return Err(Error::Internal(format!(
                            "downloading {}: the registry did not send {}",
                            model.name, want.path
                        )));
                    }
                }
            }
            tokio::fs::write(staging.join(COMPLETE), model.name.as_bytes()).await?;
            match tokio::fs::rename(&staging, dir).await {
                Ok(()) => Ok(()),
                // Another load of the same bundle finished first: keep that one.
                Err(_) if dir.join(COMPLETE).is_file() => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        if staging.exists() {
            let _ = tokio::fs::remove_dir_all(&staging).await;
        }
        result
    }

    /// Removes least recently used, unpinned bundles until the cache fits its cap.
    fn evict(&self) -> Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let marker = entry.path().join(COMPLETE);
            let Ok(meta) = marker.metadata() else {
                continue;
            };
            let size = dir_size(&entry.path())?;
            total += size;
            entries.push((meta.modified()?, name, entry.path(), size));
        }
        if total <= self.max_bytes {
            return Ok(());
        }
        entries.sort_by_key(|e| e.0);
        let pinned = self.pinned.lock().expect("pins").clone();
        for (_, name, path, size) in entries {
            if total <= self.max_bytes {
                break;
            }
            if pinned.contains(&name) {
                continue;
            }
            tracing::info!(bundle = %path.display(), size, "evicting a cached model bundle");
            std::fs::remove_dir_all(&path)?;
            total -= size;
        }
        Ok(())
    }
}

async fn finish(
    (path, mut file, hasher, size): (String, tokio::fs::File, Sha256, u64),
) -> Result<(String, String, u64)> {
    file.flush().await?;
    file.sync_all().await?;
    Ok((path, hex(hasher.finalize()), size))
}

/// `root/relative`, refusing paths that would leave `root`.
fn safe_join(root: &Path, relative: &str) -> Result<PathBuf> {
    let bad = relative.is_empty()
        || relative.starts_with('/')
        || relative
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..");
    if bad {
        return Err(Error::Internal(format!(
            "the registry sent a bad file path {relative:?}"
        )));
    }
    Ok(root.join(relative))
}

fn dir_size(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::FileStream;
    use kiln_proto::registry::v1::{BaseModelDetails, DownloadModelFilesResponse};

    struct Files(Vec<(&'static str, Vec<u8>)>);

    #[async_trait::async_trait]
    impl ModelSource for Files {
        async fn get_model(&self, name: &str) -> Result<Model> {
            Err(Error::not_found(name))
        }
        async fn download(&self, _: &str, _: Option<i32>) -> Result<FileStream> {
            let pieces: Vec<Result<DownloadModelFilesResponse>> = self
                .0
                .iter()
                .map(|(path, data)| {
                    Ok(DownloadModelFilesResponse {
                        path: (*path).into(),
                        data: data.clone().into(),
                        ..Default::default()
                    })
                })
                .collect();
            Ok(futures::stream::iter(pieces).boxed())
        }
        async fn read_dataset(&self, name: &str) -> Result<Vec<u8>> {
            Err(Error::not_found(name))
        }
        async fn upload_model(
            &self,
            _: &str,
            _: &str,
            model: Model,
            _: Vec<(String, Vec<u8>)>,
            _: bool,
        ) -> Result<Model> {
            Err(Error::FailedPrecondition(format!(
                "{} cannot be uploaded here",
                model.name
            )))
        }
        async fn delete_model(&self, name: &str) -> Result<()> {
            Err(Error::not_found(name))
        }
    }

    fn model(name: &str, files: &[(&str, &[u8])]) -> Model {
        Model {
            name: name.into(),
            base_model_details: Some(BaseModelDetails {
                checkpoint_format: CheckpointFormat::Onnx as i32,
                ..Default::default()
            }),
            files: files
                .iter()
                .map(|(path, data)| ModelFile {
                    path: (*path).into(),
                    size_bytes: data.len() as i64,
                    sha256: hex(Sha256::digest(data)),
                    uploaded_bytes: data.len() as i64,
                    complete: true,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn downloads_verify_and_least_recently_used_bundles_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BundleCache::new(tmp.path().to_path_buf(), 250);
        let a = model("accounts/x/models/a", &[("model.onnx", &[1u8; 100])]);
        let b = model("accounts/x/models/b", &[("model.onnx", &[2u8; 100])]);
        let c = model("accounts/x/models/c", &[("model.onnx", &[3u8; 100])]);
        let bundle_a = cache
            .fetch(&Files(vec![("model.onnx", vec![1u8; 100])]), &a, false)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(bundle_a.dir.join("model.onnx")).unwrap(),
            vec![1u8; 100]
        );
        cache.unpin(&bundle_a.dir);
        let bundle_b = cache
            .fetch(&Files(vec![("model.onnx", vec![2u8; 100])]), &b, false)
            .await
            .unwrap();
        cache.unpin(&bundle_b.dir);
        // a is used again, so b is now the least recently used.
        let again = cache.fetch(&Files(vec![]), &a, false).await.unwrap();
        assert_eq!(again.dir, bundle_a.dir);
        cache.unpin(&again.dir);
        let bundle_c = cache
            .fetch(&Files(vec![("model.onnx", vec![3u8; 100])]), &c, false)
            .await
            .unwrap();
        assert!(bundle_a.dir.exists(), "recently used a must stay");
        assert!(!bundle_b.dir.exists(), "least recently used b must go");
        assert!(bundle_c.dir.exists());
    }

    #[test]
    fn int4_bundles_are_chosen_only_for_onnx_runtime() {
        use kiln_proto::registry::v1::PreparedBundle;
        let mut m = model("accounts/x/models/llm", &[]);
        m.base_model_details.as_mut().unwrap().checkpoint_format = CheckpointFormat::Gguf as i32;
        for (precision, path) in [
            (Precision::Fp32, "fp32.onnx"),
            (Precision::Int4, "int4.onnx"),
        ] {
            m.prepared_bundles.push(PreparedBundle {
                state: prepared_bundle::State::Ready as i32,
                precision: precision as i32,
                files: vec![ModelFile {
                    path: path.into(),
                    ..Default::default()
                }],
                ..Default::default()
            });
        }
        assert_eq!(
            servable_files(&m, true).unwrap().0,
            Some(Precision::Int4 as i32)
        );
        assert_eq!(
            servable_files(&m, false).unwrap().0,
            Some(Precision::Fp32 as i32)
        );
        m.prepared_bundles.clear();
        let err = servable_files(&m, true).unwrap_err();
        assert!(err.to_string().contains("no prepared bundle"), "{err}");
    }

    #[tokio::test]
    async fn a_corrupt_download_is_refused_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BundleCache::new(tmp.path().to_path_buf(), 1 << 20);
        let m = model("accounts/x/models/a", &[("model.onnx", &[1u8; 10])]);
        let err = cache
            .fetch(&Files(vec![("model.onnx", vec![9u8; 10])]), &m, false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}
