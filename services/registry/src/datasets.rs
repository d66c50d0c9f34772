//! Datasets: an immutable JSONL file of training examples, validated line by line.

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use kiln_core::auth::Principal;
use kiln_core::listing::{Field, Fields, Kind, ListRequest, Listing};
use kiln_core::names::{self, ChildName};
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_events::records::HasRecords as _;
use kiln_formats::{DatasetFormat, validate_jsonl};
use kiln_proto::events::v1 as ev;
use kiln_proto::registry::v1::{
    Dataset, DownloadDatasetRequest, DownloadDatasetResponse, UploadDatasetRequest, dataset,
    upload_dataset_request,
};
use prost::Message;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

use crate::db::dataset as datasets;
use crate::download::{byte_range, stream_object};
use crate::service::{Registry, validate_sha256};
use crate::uploads::FileUpload;
use kiln_core::grpc::Update;
use kiln_core::names::validate_display_name;
use kiln_core::{Error, Result};

pub(crate) fn dataset_key(account: &str, id: &str) -> String {
    format!("datasets/{account}/{id}/data.jsonl")
}

impl Registry {
    async fn stored_dataset(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<(ChildName, Dataset)> {
        let name = ChildName::parse(field, "datasets", name, Some(&caller.account))?;
        caller.check_access(&name.account_name(), &name)?;
        let row = datasets::Entity::find_by_id((name.account.clone(), name.id.clone()))
            .one(self.db())
            .await?
            .ok_or_else(|| Error::not_found(&name))?;
        let dataset = Dataset::decode(row.resource.as_slice())
            .map_err(|e| Error::Internal(format!("stored dataset does not decode: {e}")))?;
        Ok((name, dataset))
    }

    /// Stores `dataset` as `change` left it (its update time now, unless it is new) with the
    /// event that says so, in one transaction.
    async fn save_dataset(&self, dataset: &mut Dataset, change: DatasetChange) -> Result<()> {
        let insert = matches!(change, DatasetChange::Created);
        if !insert {
            dataset.update_time = Some(micros_to_timestamp(now_micros()));
        }
        let (event_type, body) = change.event(dataset);
        let name = ChildName::parse("dataset.name", "datasets", &dataset.name, None)?;
        let row = datasets::Model {
            account_id: name.account.clone(),
            dataset_id: name.id.clone(),
            state: dataset.state,
            format: dataset.format,
            display_name: dataset.display_name.clone(),
            example_count: dataset.example_count,
            create_time: kiln_core::time::micros_of(&dataset.create_time),
            update_time: kiln_core::time::micros_of(&dataset.update_time),
            resource: dataset.encode_to_vec(),
        };
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        kiln_store::save(&txn, datasets::ActiveModel::from(row), insert, &name).await?;
        let outbox = self.outbox();
        Ok(outbox
            .commit_event(txn, event_type, &name.account, &dataset.name, body)
            .await?)
    }

    pub async fn create_dataset(
        &self,
        caller: &Principal,
        parent: &str,
        dataset_id: String,
        dataset: Dataset,
    ) -> Result<Dataset> {
        let parent = caller.own_parent(parent)?;
        names::validate_id("dataset_id", &dataset_id)?;
        validate_display_name("dataset.display_name", &dataset.display_name)?;
        if dataset::Format::try_from(dataset.format).unwrap_or(dataset::Format::Unspecified)
            == dataset::Format::Unspecified
        {
            return Err(Error::invalid(
                "dataset.format",
                "is required: CHAT or COMPLETION",
            ));
        }
        let now = micros_to_timestamp(now_micros());
        let created = Dataset {
            name: format!("{parent}/datasets/{dataset_id}"),
            display_name: names::display_name_or(&dataset.display_name, &dataset_id),
            create_time: Some(now),
            update_time: Some(now),
            state: dataset::State::Uploading as i32,
            status: Some(Default::default()),
            format: dataset.format,
            source: Some(dataset::Source::UserUploaded(dataset::UserUploaded {})),
            created_by: caller.creator(),
            ..Default::default()
        };
        let mut created = created;
        self.save_dataset(&mut created, DatasetChange::Created)
            .await?;
        Ok(created)
    }

    pub async fn get_dataset(&self, caller: &Principal, name: &str) -> Result<Dataset> {
        Ok(self.stored_dataset(caller, "name", name).await?.1)
    }

    pub async fn list_datasets(
        &self,
        caller: &Principal,
        request: &ListRequest,
    ) -> Result<Listing<Dataset>> {
        let parent = caller.own_parent(&request.parent)?;
        let query = DATASET_FIELDS.query(self.pages(), request, &caller.account)?;
        let select =
            datasets::Entity::find().filter(datasets::Column::AccountId.eq(parent.account.clone()));
        let page = kiln_store::listing::list(self.db(), self.pages(), &query, select).await?;
        let mut out = Vec::with_capacity(page.items.len());
        for row in page.items {
            out.push(
                Dataset::decode(row.resource.as_slice())
                    .map_err(|e| Error::Internal(format!("stored dataset does not decode: {e}")))?,
            );
        }
        Ok(Listing {
            items: out,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        })
    }

    pub async fn update_dataset(
        &self,
        caller: &Principal,
        request: Update<Dataset>,
    ) -> Result<Dataset> {
        let paths = request.paths(&[("display_name", !request.resource.display_name.is_empty())]);
        let update = request.resource;
        let (_, mut dataset) = self
            .stored_dataset(caller, "dataset.name", &update.name)
            .await?;
        let before = dataset.clone();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("dataset.display_name", &update.display_name)?;
                    dataset.display_name = update.display_name.clone();
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!(
                            "{other:?} is not updatable: a dataset's content is immutable; only display_name changes"
                        ),
                    ));
                }
            }
        }
        if dataset == before {
            return Ok(dataset);
        }
        self.save_dataset(&mut dataset, DatasetChange::Updated(Some(paths)))
            .await?;
        Ok(dataset)
    }

    pub async fn delete_dataset(&self, caller: &Principal, name: &str) -> Result<()> {
        let (name, dataset) = self.stored_dataset(caller, "name", name).await?;
        let txn = sea_orm::TransactionTrait::begin(self.db()).await?;
        datasets::Entity::delete_by_id((name.account.clone(), name.id.clone()))
            .exec(&txn)
            .await?;
        self.outbox()
            .commit_event(
                txn,
                "registry.dataset.deleted",
                &name.account,
                &dataset.name,
                Body::DatasetDeleted(ev::DatasetDeleted {
                    name: dataset.name.clone(),
                }),
            )
            .await?;
        self.artifacts()
            .delete_prefix(&format!("datasets/{}/{}", name.account, name.id))
            .await?;
        Ok(())
    }

    /// Receives the dataset's file. When the last byte arrives the file is checked (SHA-256,
    /// every line) and the dataset becomes READY, or FAILED with the first bad line named.
    pub async fn upload_dataset<S>(&self, caller: &Principal, mut stream: S) -> Result<Dataset>
    where
        S: Stream<Item = Result<UploadDatasetRequest, tonic::Status>> + Unpin,
    {
        let first = stream
            .next()
            .await
            .ok_or_else(|| Error::invalid("header", "the stream is empty"))?
            .map_err(|s| Error::Unavailable(format!("upload stream broke: {}", s.message())))?;
        let Some(upload_dataset_request::Payload::Header(header)) = first.payload else {
            return Err(Error::invalid(
                "header",
                "the first message must be a header",
            ));
        };
        let (name, mut dataset) = self
            .stored_dataset(caller, "header.dataset", &header.dataset)
            .await?;
        if dataset.state == dataset::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{} is READY and immutable; create a new dataset",
                dataset.name
            )));
        }
        validate_sha256("header.sha256", &header.sha256)?;
        let max = self.config().max_dataset_bytes;
        if header.size_bytes <= 0 || header.size_bytes as u64 > max {
            return Err(Error::invalid(
                "header.size_bytes",
                format!(
                    "{} is outside 1..={max} (registry.max_dataset_bytes)",
                    header.size_bytes
                ),
            ));
        }
        let size = header.size_bytes as u64;
        let same = dataset.size_bytes as u64 == size
            && dataset.sha256 == header.sha256
            && dataset.state == dataset::State::Uploading as i32;
        let key = dataset_key(&name.account, &name.id);
        let mut upload = FileUpload::open(
            self.artifacts(),
            key.clone(),
            size,
            header.sha256.clone(),
            same,
        )
        .await?;
        let previous = dataset.state;
        dataset.size_bytes = size as i64;
        dataset.sha256 = header.sha256.clone();
        dataset.state = dataset::State::Uploading as i32;
        dataset.uploaded_bytes = upload.offset as i64;
        let mut failure: Option<Error> = None;
        while !upload.complete() {
            match stream.next().await {
                Some(Ok(UploadDatasetRequest {
                    payload: Some(upload_dataset_request::Payload::Chunk(chunk)),
                })) => {
                    if let Err(e) = upload.write("data.jsonl", chunk).await {
                        failure = Some(e);
                        break;
                    }
                }
                Some(Ok(_)) => {
                    failure = Some(Error::invalid(
                        "chunk",
                        "after the header only chunks may follow",
                    ));
                    break;
                }
                Some(Err(status)) => {
                    failure = Some(Error::Unavailable(format!(
                        "upload stream broke: {}",
                        status.message()
                    )));
                    break;
                }
                None => break,
            }
        }
        if !upload.complete() || failure.is_some() {
            upload.settle()?;
        }
        dataset.uploaded_bytes = upload.offset as i64;
        if !upload.complete() || failure.is_some() {
            self.save_dataset(&mut dataset, DatasetChange::Updated(None))
                .await?;
            return match failure {
                Some(e) => Err(e),
                None => Ok(dataset),
            };
        }
        let expected = match dataset::Format::try_from(dataset.format) {
            Ok(dataset::Format::Completion) => DatasetFormat::Completion,
            _ => DatasetFormat::Chat,
        };
        let mut summary = None;
        let finished = upload
            .finish(self.artifacts(), "data.jsonl", |staged| {
                let file = std::fs::File::open(staged)?;
                match validate_jsonl("data.jsonl", std::io::BufReader::new(file), Some(expected)) {
                    Ok(s) => {
                        summary = Some(s);
                        Ok(())
                    }
                    Err(e) => Err(Error::invalid("data.jsonl", e.to_string())),
                }
            })
            .await;
        let result = match finished {
            Ok(()) => {
                let summary = summary.expect("validated");
                dataset.state = dataset::State::Ready as i32;
                dataset.status = Some(Default::default());
                dataset.example_count = summary.example_count as i64;
                dataset.estimated_token_count = (summary.size_bytes / 4) as i64;
                Ok(())
            }
            Err(Error::InvalidArgument { field, reason }) if field == "data.jsonl" => {
                // The content is wrong: the dataset is FAILED, and the caller told why.
                dataset.state = dataset::State::Failed as i32;
                dataset.status = Some(kiln_proto::common::v1::Status {
                    code: tonic::Code::InvalidArgument as i32,
                    message: reason.clone(),
                });
                dataset.uploaded_bytes = 0;
                self.artifacts().discard_staging(&key).await;
                Err(Error::invalid("data.jsonl", reason))
            }
            Err(other) => {
                dataset.uploaded_bytes = 0;
                Err(other)
            }
        };
        self.save_dataset(&mut dataset, DatasetChange::StateChanged { previous })
            .await?;
        result.map(|()| dataset)
    }

    pub async fn download_dataset(
        &self,
        caller: &Principal,
        request: DownloadDatasetRequest,
    ) -> Result<BoxStream<'static, Result<DownloadDatasetResponse, Error>>> {
        crate::download::check_range_fields(request.offset, request.length)?;
        let (name, dataset) = self.stored_dataset(caller, "name", &request.name).await?;
        if dataset.state != dataset::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{} is not READY",
                dataset.name
            )));
        }
        let range = byte_range(dataset.size_bytes as u64, request.offset, request.length)?;
        let (size, sha) = (dataset.size_bytes, dataset.sha256.clone());
        stream_object(
            self,
            dataset_key(&name.account, &name.id),
            range,
            move |offset, data, first| DownloadDatasetResponse {
                offset: offset as i64,
                data,
                size_bytes: if first { size } else { 0 },
                sha256: if first { sha.clone() } else { String::new() },
            },
        )
        .await
    }
}

/// A change to a dataset, and so its event.
enum DatasetChange {
    Created,
    /// The paths changed (None: its upload progressed).
    Updated(Option<Vec<String>>),
    StateChanged {
        previous: i32,
    },
}

impl DatasetChange {
    fn event(self, dataset: &Dataset) -> (&'static str, Body) {
        let dataset = Some(dataset.clone());
        match self {
            Self::Created => (
                "registry.dataset.created",
                Body::DatasetCreated(ev::DatasetCreated { dataset }),
            ),
            Self::Updated(paths) => (
                "registry.dataset.updated",
                Body::DatasetUpdated(ev::DatasetUpdated {
                    dataset,
                    update_mask: paths.map(|paths| prost_types::FieldMask { paths }),
                }),
            ),
            Self::StateChanged { previous } => (
                "registry.dataset.state_changed",
                Body::DatasetStateChanged(ev::DatasetStateChanged {
                    dataset,
                    previous_state: previous,
                }),
            ),
        }
    }
}

/// The fields a dataset list filters on and orders by.
static DATASET_FIELDS: Fields<datasets::Column> = Fields {
    collection: "datasets",
    fields: &[
        Field::order("name", datasets::Column::DatasetId),
        Field::order("create_time", datasets::Column::CreateTime),
        Field::order("update_time", datasets::Column::UpdateTime),
        Field::order("example_count", datasets::Column::ExampleCount),
        Field::both("display_name", datasets::Column::DisplayName, Kind::Text),
        Field::filter(
            "state",
            datasets::Column::State,
            Kind::Enum(|s| dataset::State::from_str_name(s).map(|v| v as i32)),
        ),
        Field::filter(
            "format",
            datasets::Column::Format,
            Kind::Enum(|s| dataset::Format::from_str_name(s).map(|v| v as i32)),
        ),
    ],
    tie_break: datasets::Column::DatasetId,
};
