//! After a crash, where each unfinished upload stands. Uploads record their progress in the
//! database now and then (and at the end of a stream), but the staging file holds every
//! byte received: a registry killed mid-upload comes back with records that lag behind it.
//! At start each unfinished upload's record is set to what is staged, so the offset callers
//! read (ModelFile.uploaded_bytes, Dataset.uploaded_bytes) is the one an upload resumes at.

use kiln_events::records::HasRecords as _;
use kiln_proto::registry::v1::{Dataset, dataset};
use prost::Message;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};

use crate::datasets::dataset_key;
use crate::db::dataset as datasets;
use crate::db::model_file as files;
use crate::service::Registry;
use crate::stored::file_key;
use kiln_core::Result;

impl Registry {
    /// Sets each unfinished upload's recorded offset to its staged bytes; how many moved.
    pub(crate) async fn recover_uploads(&self) -> Result<usize> {
        let mut moved = 0;
        let unfinished = files::Entity::find()
            .filter(files::Column::Complete.eq(false))
            .filter(files::Column::Bundle.eq(""))
            .all(self.db())
            .await?;
        for row in unfinished {
            let key = file_key(&row.account_id, &row.model_id, "", &row.path);
            let staged = self
                .artifacts()
                .staged_len(&key)
                .await
                .min(row.size_bytes as u64) as i64;
            if staged != row.uploaded_bytes {
                let mut active: files::ActiveModel = row.into();
                active.uploaded_bytes = Set(staged);
                active.update(self.db()).await?;
                moved += 1;
            }
        }
        let uploading = datasets::Entity::find()
            .filter(datasets::Column::State.eq(dataset::State::Uploading as i32))
            .all(self.db())
            .await?;
        for row in uploading {
            let mut resource = Dataset::decode(row.resource.as_slice())
                .map_err(|e| kiln_core::Error::internal("decoding a stored dataset", e))?;
            let key = dataset_key(&row.account_id, &row.dataset_id);
            let size = resource.size_bytes.max(0) as u64;
            let staged = self.artifacts().staged_len(&key).await.min(size) as i64;
            if staged != resource.uploaded_bytes {
                resource.uploaded_bytes = staged;
                let mut active: datasets::ActiveModel = row.into();
                active.resource = Set(resource.encode_to_vec());
                active.update(self.db()).await?;
                moved += 1;
            }
        }
        Ok(moved)
    }
}
