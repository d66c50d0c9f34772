//! Fine-tuning jobs on the node, one at a time: the base's checkpoint and the datasets
//! fetched, the trainer run off the async runtime with a report to the scheduler after every
//! step, stopped within a step when the scheduler cancels, the adapter published to the
//! registry as the job's LoRA addon, and the tokens trained on recorded as usage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kiln_core::names::ChildName;
use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::events::v1::TrainingUsageRecorded;
use kiln_proto::registry::v1::{Model, PeftDetails, model};
use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;
use kiln_proto::scheduler::v1::{
    FineTuningJobReport, JobProgress, StartFineTuningJob, SupervisedFineTuningJob, node_message,
};
use kiln_trainer::{Adapter, DType, Device, LoraConfig, Module};

use super::Node;
use crate::engine::CHECKPOINT;
use crate::training::run::{Report, Settings, Trained, train};
use kiln_core::{Error, Result};

/// The jobs this node runs, with the flag that stops each; and whether the node is stopping
/// (its jobs then keep their checkpoints, to resume when given back to it).
#[derive(Default)]
pub(super) struct Jobs {
    running: Mutex<HashMap<String, Arc<AtomicBool>>>,
    stopping: AtomicBool,
}

/// How a job's run ended.
enum Ended {
    Completed { output_model: String },
    Cancelled,
}

impl Node {
    /// Starts training `start`'s job in the background, unless it runs here already (a
    /// repeated delivery) or another job does.
    pub(super) fn start_job(
        self: &Arc<Self>,
        start: StartFineTuningJob,
    ) -> std::result::Result<(), String> {
        let job = start.job.ok_or("the assignment carries no job")?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let mut jobs = self.jobs.running.lock().expect("jobs");
            if jobs.contains_key(&job.name) {
                return Ok(());
            }
            if let Some(other) = jobs.keys().next() {
                return Err(format!("this node is training {other}"));
            }
            jobs.insert(job.name.clone(), stop.clone());
        }
        let node = self.clone();
        tokio::spawn(async move {
            let name = job.name.clone();
            tracing::info!(job = %name, "fine-tuning job started");
            let ended = node.run_job(&job, &stop).await;
            node.jobs.running.lock().expect("jobs").remove(&name);
            let over = !(matches!(ended, Ok(Ended::Cancelled))
                && node.jobs.stopping.load(Ordering::Relaxed));
            if over && let Some(file) = node.checkpoint_file(&job) {
                let _ = std::fs::remove_file(file);
            }
            if over && !matches!(ended, Ok(Ended::Completed { .. })) {
                let dropped = node
                    .engine
                    .drop_unfinished_output(&job.name, &job.output_model);
                if let Err(err) = dropped.await {
                    tracing::warn!(job = %name, %err, "cannot remove the job's unfinished output model");
                }
            }
            let (state, status, output_model) = match ended {
                Ok(Ended::Completed { output_model }) => (JobState::Completed, None, output_model),
                Ok(Ended::Cancelled) => (JobState::Cancelled, None, String::new()),
                Err(err) => {
                    let status = tonic::Status::from(err);
                    tracing::warn!(job = %name, error = %status.message(), "fine-tuning job failed");
                    let status = ResourceStatus {
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    };
                    (JobState::Failed, Some(status), String::new())
                }
            };
            tracing::info!(job = %name, state = state.as_str_name(), "fine-tuning job ended");
            node.report_job(FineTuningJobReport {
                job: name,
                state: state as i32,
                status,
                output_model,
                ..Default::default()
            });
        });
        Ok(())
    }

    /// Asks job `name` to stop after its current step.
    pub(super) fn cancel_job(&self, name: &str) {
        if let Some(stop) = self.jobs.running.lock().expect("jobs").get(name) {
            stop.store(true, Ordering::Relaxed);
        }
    }

    /// Stops every job after its current step (the node is stopping).
    pub(super) fn stop_jobs(&self) {
        self.jobs.stopping.store(true, Ordering::Relaxed);
        for stop in self.jobs.running.lock().expect("jobs").values() {
            stop.store(true, Ordering::Relaxed);
        }
    }

    fn report_job(&self, mut report: FineTuningJobReport) {
        report.time = Some(kiln_core::time::micros_to_timestamp(
            kiln_core::time::now_micros(),
        ));
        self.send(node_message::Payload::FineTuningJob(report));
    }

    async fn run_job(
        self: &Arc<Self>,
        job: &SupervisedFineTuningJob,
        stop: &Arc<AtomicBool>,
    ) -> Result<Ended> {
        let account =
            ChildName::parse("name", "supervisedFineTuningJobs", &job.name, None)?.account;
        let output = ChildName::parse("output_model", "models", &job.output_model, None)?;
        let base = self.engine.fetch_training_base(&job.base_model).await?;
        let inputs = async {
            let dataset = self.engine.source().read_dataset(&job.dataset).await?;
            let evaluation = match job.evaluation_dataset.as_str() {
                "" => None,
                name => Some(self.engine.source().read_dataset(name).await?),
            };
            let warm_start = match job.warm_start_from.as_str() {
                "" => None,
                addon => Some(self.warm_start(addon, &job.base_model).await?),
            };
            let tokenizer =
                crate::engine::load_tokenizer(&base.bundle.tokenizer().ok_or_else(|| {
                    Error::FailedPrecondition(format!("{} has no tokenizer", job.base_model))
                })?)?;
            Ok::<_, Error>((dataset, evaluation, warm_start, tokenizer))
        }
        .await;
        let (dataset, evaluation, warm_start, tokenizer) = match inputs {
            Ok(inputs) => inputs,
            Err(err) => {
                self.engine.release_training(&base);
                return Err(err);
            }
        };
        let settings = self.settings(job, &base.bundle.manifest, warm_start.as_ref());
        let checkpoint_file = self.checkpoint_file(job);
        // Whether the output model holds a checkpoint (to empty when the adapter is written).
        let shared = Arc::new(AtomicBool::new(false));
        if let Some(file) = checkpoint_file.as_ref().filter(|f| !f.is_file()) {
            // An earlier run elsewhere: its last checkpoint, from the output model.
            match self
                .engine
                .fetch_job_checkpoint(&job.name, &job.output_model)
                .await
            {
                Ok(Some(bytes)) => {
                    tracing::info!(job = %job.name, "resuming from the job's last checkpoint");
                    std::fs::write(file, bytes)?;
                    shared.store(true, Ordering::Relaxed);
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(job = %job.name, %err, "cannot read the job's checkpoint; starting over")
                }
            }
        }
        let gguf = base.gguf.clone();
        let manifest = base.bundle.manifest.clone();
        let training = settings.clone();
        let addon = self.addon_model(job, &settings);
        let output_model = job.output_model.clone();
        let node = self.clone();
        let (name, stop, sharing) = (job.name.clone(), stop.clone(), shared.clone());
        let trained = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&gguf)?;
            let checkpoint = kiln_formats::read_llama_checkpoint(std::io::BufReader::new(file))
                .map_err(|e| Error::FailedPrecondition(format!("the base checkpoint: {e}")))?;
            let observe = |report: &Report<'_>| {
                node.report_progress(&name, report);
                if let Some(path) = report.checkpoint {
                    sharing.store(true, Ordering::Relaxed);
                    node.share_checkpoint(&name, &output_model, path, &addon);
                }
                !stop.load(Ordering::Relaxed)
            };
            train(
                checkpoint,
                &tokenizer,
                &manifest,
                &dataset,
                evaluation.as_deref(),
                warm_start,
                &training,
                checkpoint_file.as_deref(),
                observe,
            )
            .map_err(Error::FailedPrecondition)
        })
        .await
        .map_err(|e| Error::internal("the training task", e));
        self.engine.release_training(&base);
        let Some(trained) = trained?? else {
            return Ok(Ended::Cancelled);
        };
        self.report_job(FineTuningJobReport {
            job: job.name.clone(),
            state: JobState::WritingResults as i32,
            ..Default::default()
        });
        let usage = TrainingUsageRecorded {
            job: job.name.clone(),
            base_model: job.base_model.clone(),
            output_model: job.output_model.clone(),
            training_tokens: trained.tokens as i64,
            ..Default::default()
        };
        if let Some(usage_recorder) = self.usage.get() {
            usage_recorder.record_training(&account, usage).await?;
        }
        let holds_checkpoint = shared.load(Ordering::Relaxed);
        let published = self
            .publish(job, &output, &settings, trained, holds_checkpoint)
            .await?;
        Ok(Ended::Completed {
            output_model: published.name,
        })
    }

    /// Where job's checkpoint goes (None when the folder cannot be made: no checkpoints).
    fn checkpoint_file(&self, job: &SupervisedFineTuningJob) -> Option<std::path::PathBuf> {
        if let Err(err) = std::fs::create_dir_all(&self.checkpoints) {
            tracing::warn!(%err, "cannot keep training checkpoints");
            return None;
        }
        let file = job.name.replace('/', "_");
        Some(self.checkpoints.join(format!("{file}.safetensors")))
    }

    /// The trainer's settings from the job's hyper-parameters (defaults applied by the
    /// scheduler) and this node's configuration.
    fn settings(
        &self,
        job: &SupervisedFineTuningJob,
        manifest: &kiln_formats::Manifest,
        warm_start: Option<&Adapter>,
    ) -> Settings {
        let modules: Vec<Module> = job
            .target_modules
            .iter()
            .filter_map(|m| Module::from_peft_name(m))
            .collect();
        let lora = match warm_start {
            Some(adapter) => adapter.config().clone(),
            None => LoraConfig {
                rank: job.lora_rank.max(1) as usize,
                alpha: f64::from(job.lora_alpha),
                modules: if modules.is_empty() {
                    Module::ALL.to_vec()
                } else {
                    modules
                },
            },
        };
        let context = usize::try_from(manifest.context_length).unwrap_or(0);
        let max_tokens = match usize::try_from(job.max_context_length) {
            Ok(n) if n > 0 => n,
            _ if context > 0 => context,
            _ => 2048,
        };
        let training = self.engine.config().training;
        Settings {
            epochs: job.epochs.max(1) as usize,
            learning_rate: f64::from(job.learning_rate),
            lora,
            max_tokens,
            batch_size: job.batch_size.max(1) as usize,
            pass_tokens: training.pass_tokens,
            threads: training.threads,
            early_stop: job.early_stop,
            seed: 0,
            base_model: job.base_model.clone(),
        }
    }

    /// The adapter a warm start continues, from its files.
    async fn warm_start(&self, addon: &str, base: &str) -> Result<Adapter> {
        let dir = self.engine.fetch_addon(addon, base).await?;
        let read = || -> std::result::Result<Adapter, String> {
            let config =
                std::fs::read(dir.join("adapter_config.json")).map_err(|e| e.to_string())?;
            let weights =
                std::fs::read(dir.join("adapter_model.safetensors")).map_err(|e| e.to_string())?;
            let config = kiln_formats::read_adapter_config("adapter_config.json", &config)
                .map_err(|e| e.to_string())?;
            let lora =
                kiln_formats::read_lora_weights(&config, &weights, "adapter_model.safetensors")
                    .map_err(|e| e.to_string())?;
            Adapter::from_weights(&lora, config.lora_alpha, DType::F32, &Device::Cpu)
                .map_err(|e| e.to_string())
        };
        let adapter = read();
        self.engine.release_addon(&dir);
        adapter.map_err(|e| Error::FailedPrecondition(format!("warm_start_from {addon}: {e}")))
    }

    /// The LoRA addon a job produces, as the registry creates it.
    fn addon_model(&self, job: &SupervisedFineTuningJob, settings: &Settings) -> Model {
        Model {
            kind: model::Kind::LoraAddon as i32,
            display_name: job.display_name.clone(),
            description: format!("Trained by {}", job.name),
            peft_details: Some(PeftDetails {
                base_model: job.base_model.clone(),
                r: settings.lora.rank as i32,
                target_modules: settings
                    .lora
                    .modules
                    .iter()
                    .map(|m| m.peft_name().to_owned())
                    .collect(),
                lora_alpha: settings.lora.alpha as f32,
            }),
            fine_tuning_job: job.name.clone(),
            created_by: job.created_by.clone(),
            ..Default::default()
        }
    }

    /// Puts an epoch's checkpoint into the job's output model, so that any node can resume
    /// the job from it. Runs on the training thread; a failure costs only the resumption.
    fn share_checkpoint(&self, job: &str, output: &str, path: &std::path::Path, addon: &Model) {
        let uploaded = std::fs::read(path).map_err(Error::from).and_then(|bytes| {
            let output = ChildName::parse("output_model", "models", output, None)?;
            let parent = format!("accounts/{}", output.account);
            let files = vec![(CHECKPOINT.to_owned(), bytes)];
            tokio::runtime::Handle::current().block_on(self.engine.source().upload_model(
                &parent,
                &output.id,
                addon.clone(),
                files,
                false,
            ))
        });
        if let Err(err) = uploaded {
            tracing::warn!(job, %err, "cannot share the job's checkpoint");
        }
    }

    /// The trained adapter as the job's output model: uploaded (a checkpoint it holds emptied,
    /// so the addon does not carry it) and validated.
    async fn publish(
        &self,
        job: &SupervisedFineTuningJob,
        output: &ChildName,
        settings: &Settings,
        trained: Trained,
        holds_checkpoint: bool,
    ) -> Result<Model> {
        let mut files = vec![
            ("adapter_config.json".to_owned(), trained.adapter_config),
            (
                "adapter_model.safetensors".to_owned(),
                trained.adapter_model,
            ),
        ];
        if holds_checkpoint {
            files.push((CHECKPOINT.to_owned(), Vec::new()));
        }
        let parent = format!("accounts/{}", output.account);
        let addon = self.addon_model(job, settings);
        self.engine
            .source()
            .upload_model(&parent, &output.id, addon, files, true)
            .await
    }

    /// A step's report to the scheduler.
    fn report_progress(&self, job: &str, report: &Report<'_>) {
        let p = &report.progress;
        let percent = (100 * p.step / p.total_steps.max(1)) as i32;
        let progress = JobProgress {
            percent,
            epoch: p.epoch as i32,
            tokens_processed: p.tokens as i64,
            loss: p.loss as f32,
            step: p.step as i64,
            total_steps: p.total_steps as i64,
            eval_loss: report.eval_loss.unwrap_or_default() as f32,
            truncated_examples: report.truncated as i32,
            examples: report.examples as i32,
        };
        self.report_job(FineTuningJobReport {
            job: job.to_owned(),
            state: JobState::Running as i32,
            job_progress: Some(progress),
            training_losses: report.losses.iter().map(|&l| l as f32).collect(),
            evaluation_losses: report.eval_losses.iter().map(|&l| l as f32).collect(),
            ..Default::default()
        });
    }
}
