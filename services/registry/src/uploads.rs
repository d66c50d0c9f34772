//! Resumable uploads: a file arrives as chunks whose offsets must continue what is stored;
//! its SHA-256 is checked when the last byte arrives; only then does it move into the store.

use futures::{Stream, StreamExt};
use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_events::records::HasRecords as _;
use kiln_proto::registry::v1::{
    FileChunk, ModelFile, ModelFileHeader, UploadModelFilesRequest, UploadModelFilesResponse,
    model, upload_model_files_request,
};
use sea_orm::{ActiveModelTrait, EntityTrait};

use crate::artifacts::Artifacts;
use crate::db::model_file as files;
use crate::models::ModelChange;
use crate::service::{Registry, validate_file_path, validate_sha256};
use crate::staging::{RunningHash, StagingAppender, StagingWriter, blocking};
use crate::stored::{StoredModel, file_key};
use kiln_core::Result;

/// How often (in bytes) an upload records its progress in the database.
const PROGRESS_EVERY: u64 = 64 << 20;
/// One file being received.
pub(crate) struct FileUpload {
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub offset: u64,
    /// Appends to the staging file on a thread of its own, so receiving the next chunk
    /// overlaps writing this one.
    writer: Option<StagingWriter>,
    /// A running hash on its own thread (it overlaps the disk writes), when this session
    /// sees every byte from 0.
    hasher: Option<RunningHash>,
    last_recorded: u64,
}

impl FileUpload {
    /// Opens the staging file of `key`: resumes at what is staged when `resume`, else from 0.
    pub async fn open(
        artifacts: &Artifacts,
        key: String,
        size: u64,
        sha256: String,
        resume: bool,
    ) -> Result<Self> {
        let offset = if resume {
            artifacts.staged_len(&key).await.min(size)
        } else {
            0
        };
        let file = artifacts.open_staging(&key, !resume || offset == 0).await?;
        let path = artifacts.staging_path(&key);
        let appender = blocking(|| StagingAppender::open(&path, file, offset))?;
        Ok(Self {
            key,
            size,
            sha256,
            offset,
            writer: Some(StagingWriter::start(appender)),
            hasher: (offset == 0).then(RunningHash::start),
            last_recorded: offset,
        })
    }

    pub async fn write(&mut self, path: &str, chunk: FileChunk) -> Result<()> {
        if chunk.offset < 0 || chunk.offset as u64 != self.offset {
            return Err(Error::FailedPrecondition(format!(
                "{path}: chunk offset {} does not continue the stored {} bytes; resume from {}",
                chunk.offset, self.offset, self.offset
            )));
        }
        let end = self.offset + chunk.data.len() as u64;
        if end > self.size {
            return Err(Error::invalid(
                "chunk.data",
                format!(
                    "{path}: {end} bytes exceed the declared size_bytes {}",
                    self.size
                ),
            ));
        }
        if let Some(h) = &self.hasher {
            h.update(chunk.data.clone());
        }
        let writer = self
            .writer
            .as_ref()
            .ok_or_else(|| std::io::Error::other("staging writer stopped"))?;
        if !writer.write(chunk.data) {
            // The writer stopped on an error: collect it.
            let stopped = self.writer.take().map(StagingWriter::finish);
            return Err(match stopped {
                Some(Err(e)) => e.into(),
                _ => std::io::Error::other("staging writer stopped").into(),
            });
        }
        self.offset = end;
        Ok(())
    }

    /// Waits until every accepted byte is in the staging file (before recording where an
    /// unfinished upload stopped, so a resume finds them all).
    pub fn settle(&mut self) -> Result<()> {
        if let Some(writer) = self.writer.take() {
            self.writer = Some(StagingWriter::start(writer.finish()?));
        }
        Ok(())
    }

    pub fn complete(&self) -> bool {
        self.offset == self.size
    }

    /// Whether enough arrived since the last record to record progress again.
    pub fn progress_due(&mut self) -> bool {
        if self.offset - self.last_recorded >= PROGRESS_EVERY {
            self.last_recorded = self.offset;
            true
        } else {
            false
        }
    }

    /// Checks the SHA-256 of the complete file and, when it matches, moves it into the store.
    /// A mismatch discards the bytes (the upload starts again from 0).
    pub async fn finish(
        mut self,
        artifacts: &Artifacts,
        path: &str,
        validate: impl FnOnce(&std::path::Path) -> Result<()>,
    ) -> Result<()> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| std::io::Error::other("staging writer stopped"))?;
        blocking(|| writer.finish()?.sync())?;
        let actual = match self.hasher.take() {
            Some(h) => blocking(|| h.finish()),
            None => artifacts.hash_staged(&self.key).await?,
        };
        if actual != self.sha256 {
            artifacts.discard_staging(&self.key).await;
            return Err(Error::invalid(
                "header.sha256",
                format!(
                    "{path}: SHA-256 mismatch: declared {}, received {actual}; the bytes were discarded",
                    self.sha256
                ),
            ));
        }
        validate(&artifacts.staging_path(&self.key))?;
        artifacts.finish(&self.key).await
    }
}

/// The file currently being received in a model upload stream.
struct Current {
    path: String,
    upload: Option<FileUpload>,
}

impl Registry {
    async fn record_file(
        &self,
        stored: &StoredModel,
        path: &str,
        size: u64,
        sha: &str,
        uploaded: u64,
        complete: bool,
    ) -> Result<()> {
        let row = files::Model {
            account_id: stored.account().to_owned(),
            model_id: stored.id().to_owned(),
            bundle: String::new(),
            path: path.to_owned(),
            size_bytes: size as i64,
            sha256: sha.to_owned(),
            uploaded_bytes: uploaded as i64,
            complete,
        };
        let existing = files::Entity::find_by_id((
            row.account_id.clone(),
            row.model_id.clone(),
            String::new(),
            path.to_owned(),
        ))
        .one(self.db())
        .await?;
        match existing {
            Some(_) => {
                files::Entity::update(files::ActiveModel::from(row).reset_all())
                    .exec(self.db())
                    .await?;
            }
            None => {
                files::Entity::insert(files::ActiveModel::from(row))
                    .exec_without_returning(self.db())
                    .await?;
            }
        }
        Ok(())
    }

    async fn start_file(
        &self,
        caller: &Principal,
        model: &mut Option<StoredModel>,
        header: ModelFileHeader,
    ) -> Result<Current> {
        let stored = match model {
            Some(s) if s.model.name == header.model || header.model.is_empty() => s,
            Some(s) => {
                return Err(Error::invalid(
                    "header.model",
                    format!(
                        "one upload stream carries files of one model ({}), got {}",
                        s.model.name, header.model
                    ),
                ));
            }
            None => {
                let s = self
                    .writable_model(caller, "header.model", &header.model)
                    .await?;
                self.reopen_for_upload(s).await.map(|s| model.insert(s))?
            }
        };
        validate_file_path("header.path", &header.path)?;
        validate_sha256("header.sha256", &header.sha256)?;
        if header.size_bytes < 0 || header.size_bytes as u64 > self.config().max_file_bytes {
            return Err(Error::invalid(
                "header.size_bytes",
                format!(
                    "{} is outside 0..={} (registry.max_file_bytes)",
                    header.size_bytes,
                    self.config().max_file_bytes
                ),
            ));
        }
        let size = header.size_bytes as u64;
        let existing = stored
            .model
            .files
            .iter()
            .find(|f| f.path == header.path)
            .cloned();
        let same = existing
            .as_ref()
            .is_some_and(|f| f.sha256 == header.sha256 && f.size_bytes as u64 == size);
        if same && existing.as_ref().is_some_and(|f| f.complete) {
            // Already stored whole: nothing to do for this file.
            return Ok(Current {
                path: header.path,
                upload: None,
            });
        }
        let key = file_key(stored.account(), stored.id(), "", &header.path);
        let upload =
            FileUpload::open(self.artifacts(), key, size, header.sha256.clone(), same).await?;
        self.record_file(
            stored,
            &header.path,
            size,
            &header.sha256,
            upload.offset,
            false,
        )
        .await?;
        let mut current = Current {
            path: header.path,
            upload: Some(upload),
        };
        if size == 0 {
            self.complete_file(stored, &mut current).await?;
        }
        Ok(current)
    }

    /// A FAILED model accepts new files again: it goes back to UPLOADING.
    async fn reopen_for_upload(&self, mut stored: StoredModel) -> Result<StoredModel> {
        match model::State::try_from(stored.model.state) {
            Ok(model::State::Uploading) => Ok(stored),
            Ok(model::State::Failed) => {
                let previous = stored.model.state;
                stored.model.state = model::State::Uploading as i32;
                stored.model.status = Some(Default::default());
                let change = ModelChange::StateChanged { previous };
                self.save_model(&mut stored.model, change).await?;
                Ok(stored)
            }
            _ => Err(Error::FailedPrecondition(format!(
                "{} is READY: its files are immutable; create a new model",
                stored.model.name
            ))),
        }
    }

    async fn complete_file(&self, stored: &StoredModel, current: &mut Current) -> Result<()> {
        let Some(upload) = current.upload.take() else {
            return Ok(());
        };
        let (size, sha) = (upload.size, upload.sha256.clone());
        match upload
            .finish(self.artifacts(), &current.path, |_| Ok(()))
            .await
        {
            Ok(()) => {
                self.record_file(stored, &current.path, size, &sha, size, true)
                    .await
            }
            Err(err) => {
                // The bytes are gone: the file starts again from 0.
                self.record_file(stored, &current.path, size, &sha, 0, false)
                    .await?;
                Err(err)
            }
        }
    }

    /// Receives an upload stream. Whatever arrived before an error or a disconnect stays
    /// stored, so the client can resume from the offsets GetModel reports.
    pub async fn upload_model_files<S>(
        &self,
        caller: &Principal,
        mut stream: S,
    ) -> Result<UploadModelFilesResponse>
    where
        S: Stream<Item = Result<UploadModelFilesRequest, tonic::Status>> + Unpin,
    {
        let mut model: Option<StoredModel> = None;
        let mut current: Option<Current> = None;
        let mut touched: Vec<String> = Vec::new();
        let mut received = 0u64;
        let result: Result<()> = async {
            while let Some(message) = stream.next().await {
                let message = message.map_err(|s| {
                    Error::Unavailable(format!("upload stream broke: {}", s.message()))
                })?;
                match message.payload {
                    Some(upload_model_files_request::Payload::Header(header)) => {
                        if let (Some(stored), Some(cur)) = (model.as_ref(), current.as_mut())
                            && let Some(up) = cur.upload.as_mut()
                        {
                            up.settle()?;
                            self.record_file(
                                stored, &cur.path, up.size, &up.sha256, up.offset, false,
                            )
                            .await?;
                        }
                        let cur = self.start_file(caller, &mut model, header).await?;
                        touched.push(cur.path.clone());
                        current = Some(cur);
                    }
                    Some(upload_model_files_request::Payload::Chunk(chunk)) => {
                        let (Some(stored), Some(cur)) = (model.as_ref(), current.as_mut()) else {
                            return Err(Error::invalid("chunk", "a chunk must follow a header"));
                        };
                        let Some(upload) = cur.upload.as_mut() else {
                            return Err(Error::FailedPrecondition(format!(
                                "{} is already complete",
                                cur.path
                            )));
                        };
                        received += chunk.data.len() as u64;
                        upload.write(&cur.path, chunk).await?;
                        if upload.complete() {
                            self.complete_file(stored, cur).await?;
                        } else if upload.progress_due() {
                            let (size, sha, offset) =
                                (upload.size, upload.sha256.clone(), upload.offset);
                            self.record_file(stored, &cur.path, size, &sha, offset, false)
                                .await?;
                        }
                    }
                    None => {
                        return Err(Error::invalid("payload", "is required: header or chunk"));
                    }
                }
            }
            Ok(())
        }
        .await;
        // Record where an unfinished file stopped, whatever ended the stream.
        if let (Some(stored), Some(cur)) = (model.as_ref(), current.as_mut())
            && let Some(up) = cur.upload.as_mut()
        {
            up.settle()?;
            self.record_file(stored, &cur.path, up.size, &up.sha256, up.offset, false)
                .await?;
        }
        result?;
        let Some(stored) = model else {
            return Err(Error::invalid("header", "the stream carried no file"));
        };
        let fresh = self
            .stored_model(stored.account(), stored.id())
            .await?
            .ok_or_else(|| Error::not_found(&stored.model.name))?;
        let files: Vec<ModelFile> = fresh
            .model
            .files
            .iter()
            .filter(|f| touched.contains(&f.path))
            .cloned()
            .collect();
        Ok(UploadModelFilesResponse {
            model: fresh.model.name,
            files,
            received_bytes: received as i64,
        })
    }
}
