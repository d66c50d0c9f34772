//! Files on the way up: which files a model folder holds and what kind of model they make,
//! the resumable upload of one file with its progress line, and a dataset's upload stream.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use kiln_proto::registry::v1 as regv1;
use kiln_proto::registry::v1::model::Kind;
use kiln_registry::{UPLOAD_CHUNK, file_upload_stream, hash_file};

use crate::client::{Authed, ProgressLine};

/// The files of a model folder (top level, hidden files left out), or the one file.
pub(super) fn local_files(path: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    if path.is_file() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("the file name is not UTF-8")?;
        return Ok(vec![(name.to_owned(), path.to_owned())]);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(path).with_context(|| format!("cannot read {}", path.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry
                .file_name()
                .into_string()
                .map_err(|_| anyhow::anyhow!("a file name is not UTF-8"))?;
            if !name.starts_with('.') {
                files.push((name, entry.path()));
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} has no files", path.display());
    }
    Ok(files)
}

/// The kind of model the files make (`base`: a base model was named, so a LoRA addon).
pub(super) fn infer_kind(files: &[(String, PathBuf)], base: bool) -> Kind {
    let has = |n: &str| files.iter().any(|(f, _)| f == n);
    if base || has("adapter_config.json") {
        Kind::LoraAddon
    } else if files.iter().any(|(f, _)| f.ends_with(".gguf")) || is_text_generation(files) {
        Kind::BaseModel
    } else if has("tokenizer.json") {
        Kind::EmbeddingModel
    } else {
        Kind::TensorModel
    }
}

/// Whether an ONNX folder holds a language model: its manifest's task says so, or its
/// Hugging Face config.json names a causal LM (an optimum export).
fn is_text_generation(files: &[(String, PathBuf)]) -> bool {
    let read = |name: &str| {
        files
            .iter()
            .find(|(f, _)| f == name)
            .and_then(|(_, path)| std::fs::read(path).ok())
    };
    let manifest_task = read("manifest.json")
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m.get("task").and_then(|t| t.as_str()).map(str::to_owned));
    if let Some(task) = manifest_task {
        return task == "text-generation";
    }
    read("config.json").is_some_and(|config| {
        kiln_formats::read_hf(kiln_formats::HfFiles {
            config: Some(&config),
            ..Default::default()
        })
        .is_ok_and(|info| info.is_causal_lm())
    })
}

/// Where the upload of a file starts: `None` when the model already holds it whole, else
/// the bytes the model holds of the same file (same content hash and size) from an
/// interrupted upload.
fn resume_offset(stored: &[regv1::ModelFile], path: &str, sha256: &str, size: u64) -> Option<u64> {
    let same = stored
        .iter()
        .find(|f| f.path == path && f.sha256 == sha256 && f.size_bytes as u64 == size);
    match same {
        Some(f) if f.complete => None,
        Some(f) => Some(f.uploaded_bytes as u64),
        None => Some(0),
    }
}

/// Uploads one file into `model` (resuming, or skipping it when it is there whole), with a
/// progress line on stderr.
pub(super) async fn upload_file(
    models: &mut regv1::model_service_client::ModelServiceClient<Authed>,
    model: &regv1::Model,
    path_in_model: String,
    local: PathBuf,
) -> anyhow::Result<()> {
    let (sha, size) = hash_file(&local)
        .await
        .with_context(|| format!("cannot read {}", local.display()))?;
    let Some(offset) = resume_offset(&model.files, &path_in_model, &sha, size) else {
        return Ok(());
    };
    let sent = Arc::new(AtomicU64::new(offset));
    let stream = file_upload_stream(
        model.name.clone(),
        path_in_model.clone(),
        local,
        size,
        sha,
        offset,
        {
            let sent = sent.clone();
            move |n| {
                sent.fetch_add(n, Ordering::Relaxed);
            }
        },
    );
    let started = Instant::now();
    let text = || {
        let now = sent.load(Ordering::Relaxed);
        upload_text(&path_in_model, now, size, now - offset, started.elapsed())
    };
    let mut err = std::io::stderr();
    let mut line = ProgressLine::new(err.is_terminal());
    let mut redraw = tokio::time::interval(redraw_interval(line.is_terminal()));
    let upload = models.upload_model_files(stream);
    tokio::pin!(upload);
    let result = loop {
        tokio::select! {
            result = &mut upload => break result,
            _ = redraw.tick() => {
                let _ = line.show(&mut err, &text());
            }
        }
    };
    let _ = line.show(&mut err, &text());
    let _ = line.finish(&mut err);
    result?;
    Ok(())
}

/// How often the progress line is redrawn: often on a terminal, where it is rewritten in
/// place; rarely elsewhere (a log or a pipe), where each redraw is a line of its own.
fn redraw_interval(terminal: bool) -> Duration {
    if terminal {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(10)
    }
}

/// `model.onnx:     12.3 / 90.4 MB   13.6%     45.1 MB/s` (`sent` of `total` bytes; the rate
/// counts `this_run` bytes, sent in `elapsed`).
fn upload_text(label: &str, sent: u64, total: u64, this_run: u64, elapsed: Duration) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        sent as f64 * 100.0 / total as f64
    };
    let rate = this_run as f64 / 1e6 / elapsed.as_secs_f64().max(1e-3);
    format!(
        "{label}: {:>8.1} / {:.1} MB  {pct:>5.1}%  {rate:>7.1} MB/s",
        sent as f64 / 1e6,
        total as f64 / 1e6
    )
}

/// A dataset's format from its first line (chat lines hold `messages`).
pub(super) fn dataset_format(first_line: &str) -> regv1::dataset::Format {
    if first_line.contains("\"messages\"") {
        regv1::dataset::Format::Chat
    } else {
        regv1::dataset::Format::Completion
    }
}

/// The upload stream of a dataset's file: its header, then the bytes in chunks.
pub(super) fn dataset_upload(
    dataset: String,
    sha256: String,
    bytes: bytes::Bytes,
) -> Vec<regv1::UploadDatasetRequest> {
    use regv1::upload_dataset_request::Payload;
    let header = Payload::Header(regv1::DatasetFileHeader {
        dataset,
        size_bytes: bytes.len() as i64,
        sha256,
    });
    let chunks = (0..bytes.len()).step_by(UPLOAD_CHUNK).map(|start| {
        let end = (start + UPLOAD_CHUNK).min(bytes.len());
        Payload::Chunk(regv1::FileChunk {
            offset: start as i64,
            data: bytes.slice(start..end),
        })
    });
    std::iter::once(header)
        .chain(chunks)
        .map(|payload| regv1::UploadDatasetRequest {
            payload: Some(payload),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The files of `folder` under tests/data as `local_files` lists them.
    fn fixture(folder: &str) -> Vec<(String, PathBuf)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(folder);
        local_files(&dir).unwrap()
    }

    #[test]
    fn an_optimum_export_is_a_base_model_and_a_bert_folder_an_embedder() {
        let export = fixture("llm/hf-optimum/tiny-llama");
        assert_eq!(infer_kind(&export, false), Kind::BaseModel);
        let tmp = tempfile::tempdir().unwrap();
        for name in ["model.onnx", "tokenizer.json", ".hidden"] {
            std::fs::write(tmp.path().join(name), b"x").unwrap();
        }
        std::fs::write(
            tmp.path().join("config.json"),
            br#"{"architectures": ["BertModel"]}"#,
        )
        .unwrap();
        let embedder = local_files(tmp.path()).unwrap();
        let names: Vec<&str> = embedder.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["config.json", "model.onnx", "tokenizer.json"]);
        assert_eq!(infer_kind(&embedder, false), Kind::EmbeddingModel);
        assert_eq!(infer_kind(&embedder, true), Kind::LoraAddon);
    }

    #[test]
    fn uploads_resume_where_the_same_file_stopped() {
        let file = |path: &str, sha: &str, uploaded: i64, complete| regv1::ModelFile {
            path: path.into(),
            sha256: sha.into(),
            size_bytes: 100,
            uploaded_bytes: uploaded,
            complete,
        };
        let stored = [
            file("a.onnx", "aa", 100, true),
            file("b.json", "bb", 40, false),
        ];
        assert_eq!(resume_offset(&stored, "a.onnx", "aa", 100), None);
        assert_eq!(resume_offset(&stored, "b.json", "bb", 100), Some(40));
        // Other content, or a file the model does not hold: from the start.
        assert_eq!(resume_offset(&stored, "b.json", "cc", 100), Some(0));
        assert_eq!(resume_offset(&stored, "b.json", "bb", 101), Some(0));
        assert_eq!(resume_offset(&stored, "c.txt", "aa", 100), Some(0));
    }

    #[test]
    fn progress_is_redrawn_in_place_only_on_a_terminal() {
        assert!(redraw_interval(true) < Duration::from_secs(1));
        assert!(redraw_interval(false) >= Duration::from_secs(10));
        let text = upload_text(
            "model.onnx",
            45_000_000,
            90_000_000,
            20_000_000,
            Duration::from_secs(2),
        );
        assert_eq!(text, "model.onnx:     45.0 / 90.0 MB   50.0%     10.0 MB/s");
        // Off a terminal, each redraw is a plain line: no carriage return.
        let mut out = Vec::new();
        let mut line = ProgressLine::new(false);
        line.show(&mut out, &text).unwrap();
        line.show(&mut out, "model.onnx: done").unwrap();
        line.finish(&mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains('\r'), "{out:?}");
        assert_eq!(out.lines().count(), 2);
        assert_eq!(
            upload_text("empty", 0, 0, 0, Duration::ZERO),
            "empty:      0.0 / 0.0 MB  100.0%      0.0 MB/s"
        );
    }

    #[test]
    fn a_dataset_goes_up_as_a_header_and_chunks() {
        let bytes = bytes::Bytes::from(vec![7u8; UPLOAD_CHUNK + 5]);
        let messages = dataset_upload("accounts/a/datasets/d".into(), "ab".into(), bytes);
        use regv1::upload_dataset_request::Payload;
        let payloads: Vec<_> = messages.into_iter().map(|m| m.payload.unwrap()).collect();
        match &payloads[..] {
            [Payload::Header(h), Payload::Chunk(c0), Payload::Chunk(c1)] => {
                assert_eq!(h.dataset, "accounts/a/datasets/d");
                assert_eq!(h.size_bytes as usize, UPLOAD_CHUNK + 5);
                assert_eq!((c0.offset, c0.data.len()), (0, UPLOAD_CHUNK));
                assert_eq!((c1.offset as usize, c1.data.len()), (UPLOAD_CHUNK, 5));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            dataset_format(r#"{"messages": []}"#),
            regv1::dataset::Format::Chat
        );
        assert_eq!(
            dataset_format(r#"{"prompt": "q"}"#),
            regv1::dataset::Format::Completion
        );
    }
}
