//! The flags of the deployment commands, and the requests they make: the deployment a
//! `create deployment` asks for, the update of an `update deployment`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kiln_proto::common::v1 as commonv1;
use kiln_proto::scheduler::v1 as schv1;

use crate::client::{ListArgs, changes};
use crate::commands::flags::{DescribeArgs, parse_duration, parse_optional_enum, proto_duration};

/// How long `--wait` waits when `--timeout` is not given.
const DEFAULT_TIMEOUT: &str = "15m";

#[derive(Debug, Args)]
pub struct CreateDeploymentArgs {
    /// The base model: an ID in the account, or a full name like
    /// accounts/kiln/models/smollm2-135m-instruct.
    pub model: String,
    /// The deployment ID (default: generated).
    #[arg(long)]
    pub deployment_id: Option<String>,
    #[command(flatten)]
    pub describe: DescribeArgs,
    /// NVIDIA_H100_80GB, NVIDIA_A100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB or CPU.
    #[arg(long)]
    pub accelerator_type: Option<String>,
    /// Accelerators per replica (CPU cores for CPU; default 1).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub accelerator_count: Option<i32>,
    #[command(flatten)]
    pub replicas: ReplicaCountArgs,
    /// FP32, FP16, BF16, FP8, INT8 or INT4 (default: the model's).
    #[arg(long)]
    pub precision: Option<String>,
    /// How long load stays above target before replicas are added, e.g. 30s.
    #[arg(long)]
    pub scale_up_window: Option<String>,
    /// How long load stays below target before replicas are removed, e.g. 10m.
    #[arg(long)]
    pub scale_down_window: Option<String>,
    /// How long without requests before scaling to zero (min replica count 0), e.g. 1h.
    #[arg(long)]
    pub scale_to_zero_window: Option<String>,
    /// A per-replica load target KEY=VALUE (repeatable), e.g. concurrent_requests=8;
    /// keys: concurrent_requests, requests_per_second, tokens_generated_per_second,
    /// kv_cache_utilization.
    #[arg(long = "load-target", value_name = "KEY=VALUE")]
    pub load_targets: Vec<String>,
    /// Allow LoRA addons of the base model on this deployment.
    #[arg(long)]
    pub enable_addons: bool,
    /// The backend (default: chosen from the accelerator and precision).
    #[arg(long, value_parser = ["tract", "onnxruntime"])]
    pub backend: Option<String>,
    /// Upper bound on the context per request (default: the model's context length).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_context_length: Option<i32>,
    /// Do not deploy the base model as the deployment's default deployed model.
    #[arg(long)]
    pub disable_auto_deploy: bool,
    /// Only check the request (names, quota, placement); create nothing.
    #[arg(long)]
    pub validate_only: bool,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// The range of replicas a deployment scales in.
#[derive(Debug, Args)]
pub struct ReplicaCountArgs {
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub min_replica_count: Option<i32>,
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub max_replica_count: Option<i32>,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the deployment is READY (after a scale: with as many ready replicas as
    /// desired), showing its progress.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits at most (default 15m).
    #[arg(long, requires = "wait")]
    pub timeout: Option<String>,
}

impl WaitArgs {
    /// How long to wait, when `--wait` is given (its text, for messages, and its length).
    pub(super) fn timeout(&self) -> anyhow::Result<Option<(&str, Duration)>> {
        if !self.wait {
            return Ok(None);
        }
        let text = self.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT);
        Ok(Some((text, parse_duration("timeout", text)?)))
    }
}

#[derive(Debug, Args)]
pub struct ListDeploymentsArgs {
    /// Include soft-deleted deployments.
    #[arg(long)]
    pub show_deleted: bool,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, Args)]
pub struct UpdateDeploymentArgs {
    /// The deployment: an ID in the account, or a full name.
    pub deployment: String,
    #[command(flatten)]
    pub replicas: ReplicaCountArgs,
    #[command(flatten)]
    pub describe: DescribeArgs,
    /// Allow LoRA addons of the base model (true or false).
    #[arg(long)]
    pub enable_addons: Option<bool>,
}

#[derive(Debug, Args)]
pub struct DeleteDeploymentArgs {
    /// The deployment: an ID in the account, or a full name.
    pub deployment: String,
    /// Delete for good at once (no undelete).
    #[arg(long)]
    pub hard: bool,
    /// Delete even while it serves traffic or has deployed models.
    #[arg(long)]
    pub ignore_checks: bool,
}

#[derive(Debug, Args)]
pub struct CreateDeployedModelArgs {
    /// The model: the deployment's base model or a LoRA addon of it (an ID in the account,
    /// or a full name).
    pub model: String,
    /// The deployment to load it into (an ID in the account, or a full name).
    #[arg(long)]
    pub deployment: String,
    /// The deployed model ID (default: generated from the model ID).
    #[arg(long)]
    pub deployed_model_id: Option<String>,
    /// Make it the model's default deployed model: requests naming just the model go here.
    #[arg(long)]
    pub default: bool,
    /// Callable by every account (platform admin).
    #[arg(long)]
    pub public: bool,
    #[arg(long)]
    pub display_name: Option<String>,
}

/// Parses one `--load-target KEY=VALUE` (a positive number).
fn parse_load_target(text: &str) -> anyhow::Result<(String, f32)> {
    let (key, value) = text.split_once('=').with_context(|| {
        format!("--load-target {text:?}: expected KEY=VALUE, e.g. concurrent_requests=8")
    })?;
    let key = key.trim();
    if key.is_empty() {
        bail!(
            "--load-target {text:?}: the key is empty; expected KEY=VALUE, e.g. concurrent_requests=8"
        );
    }
    let value: f32 = value
        .trim()
        .parse()
        .ok()
        .filter(|v: &f32| v.is_finite() && *v > 0.0)
        .with_context(|| format!("--load-target {text:?}: the value must be a positive number"))?;
    Ok((key.to_owned(), value))
}

impl CreateDeploymentArgs {
    /// The deployment the flags ask for (`base_model` already a full name).
    pub(super) fn deployment(&self, base_model: String) -> anyhow::Result<schv1::Deployment> {
        use commonv1::{AcceleratorType, Precision};
        let ReplicaCountArgs {
            min_replica_count,
            max_replica_count,
        } = self.replicas;
        if let (Some(min), Some(max)) = (min_replica_count, max_replica_count)
            && min > max
        {
            bail!("--min-replica-count {min} is above --max-replica-count {max}");
        }
        let accelerator_type = parse_optional_enum::<AcceleratorType>(
            "accelerator-type",
            self.accelerator_type.as_deref(),
        )?;
        let precision = parse_optional_enum::<Precision>("precision", self.precision.as_deref())?;
        let window = |flag: &str, value: &Option<String>| -> anyhow::Result<_> {
            value
                .as_deref()
                .map(|v| parse_duration(flag, v).map(proto_duration))
                .transpose()
        };
        let scale_up_window = window("scale-up-window", &self.scale_up_window)?;
        let scale_down_window = window("scale-down-window", &self.scale_down_window)?;
        let scale_to_zero_window = window("scale-to-zero-window", &self.scale_to_zero_window)?;
        let load_targets = self
            .load_targets
            .iter()
            .map(|t| parse_load_target(t))
            .collect::<anyhow::Result<HashMap<_, _>>>()?;
        let autoscaling_policy = (scale_up_window.is_some()
            || scale_down_window.is_some()
            || scale_to_zero_window.is_some()
            || !load_targets.is_empty())
        .then_some(schv1::AutoscalingPolicy {
            scale_up_window,
            scale_down_window,
            scale_to_zero_window,
            load_targets,
        });
        Ok(schv1::Deployment {
            display_name: self.describe.display_name.clone().unwrap_or_default(),
            description: self.describe.description.clone().unwrap_or_default(),
            base_model,
            accelerator_type,
            accelerator_count: self.accelerator_count.unwrap_or_default(),
            precision,
            min_replica_count: min_replica_count.unwrap_or_default(),
            max_replica_count: max_replica_count.unwrap_or_default(),
            autoscaling_policy,
            enable_addons: self.enable_addons,
            backend: self.backend.clone().unwrap_or_default(),
            max_context_length: self.max_context_length.unwrap_or_default(),
            ..Default::default()
        })
    }
}

impl UpdateDeploymentArgs {
    /// The deployment's new fields (its name left empty) and the mask holding exactly the
    /// fields given.
    pub(super) fn update(self) -> anyhow::Result<(schv1::Deployment, prost_types::FieldMask)> {
        let Self {
            deployment: _,
            replicas:
                ReplicaCountArgs {
                    min_replica_count,
                    max_replica_count,
                },
            describe:
                DescribeArgs {
                    display_name,
                    description,
                },
            enable_addons,
        } = self;
        changes!(schv1::Deployment {
            display_name,
            description,
            min_replica_count,
            max_replica_count,
            enable_addons,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::flags::parse_flags as parse;

    fn error(result: anyhow::Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    fn create_args(args: &[&str]) -> CreateDeploymentArgs {
        parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn load_targets_parse() {
        assert_eq!(
            parse_load_target("concurrent_requests=8").unwrap(),
            ("concurrent_requests".to_owned(), 8.0)
        );
        assert_eq!(
            parse_load_target("kv_cache_utilization=0.8").unwrap(),
            ("kv_cache_utilization".to_owned(), 0.8)
        );
        let e = error(parse_load_target("concurrent_requests"));
        assert!(
            e.starts_with("--load-target \"concurrent_requests\": expected KEY=VALUE"),
            "{e}"
        );
        let e = error(parse_load_target("=8"));
        assert!(e.contains("the key is empty"), "{e}");
        for bad in ["x=many", "x=-1", "x=0", "x=NaN", "x=inf"] {
            let e = error(parse_load_target(bad));
            assert_eq!(
                e,
                format!("--load-target {bad:?}: the value must be a positive number")
            );
        }
    }

    #[test]
    fn create_deployment_flags_fill_the_deployment() {
        let args = create_args(&[
            "smollm",
            "--accelerator-type",
            "nvidia_h100_80gb",
            "--accelerator-count",
            "2",
            "--min-replica-count",
            "0",
            "--max-replica-count",
            "3",
            "--precision",
            "fp16",
            "--scale-up-window",
            "30s",
            "--scale-to-zero-window",
            "1h",
            "--load-target",
            "concurrent_requests=4",
            "--load-target",
            "requests_per_second=2.5",
            "--enable-addons",
            "--backend",
            "onnxruntime",
            "--max-context-length",
            "2048",
            "--display-name",
            "Small",
        ]);
        let d = args.deployment("accounts/a/models/smollm".into()).unwrap();
        assert_eq!(d.base_model, "accounts/a/models/smollm");
        assert_eq!(
            d.accelerator_type,
            commonv1::AcceleratorType::NvidiaH10080gb as i32
        );
        assert_eq!(d.accelerator_count, 2);
        assert_eq!((d.min_replica_count, d.max_replica_count), (0, 3));
        assert_eq!(d.precision, commonv1::Precision::Fp16 as i32);
        assert!(d.enable_addons);
        assert_eq!(d.backend, "onnxruntime");
        assert_eq!(d.max_context_length, 2048);
        assert_eq!(d.display_name, "Small");
        let policy = d.autoscaling_policy.unwrap();
        assert_eq!(
            policy.scale_up_window,
            Some(prost_types::Duration {
                seconds: 30,
                nanos: 0
            })
        );
        assert_eq!(policy.scale_down_window, None);
        assert_eq!(
            policy.scale_to_zero_window,
            Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0
            })
        );
        assert_eq!(policy.load_targets.len(), 2);
        assert_eq!(policy.load_targets["concurrent_requests"], 4.0);
        assert_eq!(policy.load_targets["requests_per_second"], 2.5);
    }

    #[test]
    fn create_deployment_defaults_leave_fields_unset() {
        let args = create_args(&["accounts/kiln/models/m"]);
        assert!(!args.wait.wait && !args.validate_only && !args.disable_auto_deploy);
        assert_eq!(args.wait.timeout().unwrap(), None);
        let d = args.deployment("accounts/kiln/models/m".into()).unwrap();
        assert_eq!(
            d,
            schv1::Deployment {
                base_model: "accounts/kiln/models/m".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn create_deployment_rejects_bad_flags() {
        let args = create_args(&["m", "--min-replica-count", "3", "--max-replica-count", "1"]);
        assert_eq!(
            error(args.deployment(String::new())),
            "--min-replica-count 3 is above --max-replica-count 1"
        );
        let args = create_args(&["m", "--scale-down-window", "10 minutes"]);
        let e = error(args.deployment(String::new()));
        assert!(e.starts_with("--scale-down-window: \"10 minutes\""), "{e}");
        let args = create_args(&["m", "--accelerator-type", "gpu"]);
        let e = error(args.deployment(String::new()));
        assert!(
            e.starts_with("--accelerator-type \"gpu\": unknown value"),
            "{e}"
        );
        let args = create_args(&["m", "--precision", "fp64"]);
        assert_eq!(
            error(args.deployment(String::new())),
            "--precision \"fp64\": unknown value; valid values: FP32, FP16, BF16, FP8, INT8, INT4"
        );
        // clap refuses other backends, and --timeout without --wait.
        assert!(parse::<CreateDeploymentArgs>(&["m", "--backend", "vllm"]).is_err());
        assert!(parse::<CreateDeploymentArgs>(&["m", "--timeout", "1m"]).is_err());
    }

    #[test]
    fn wait_timeouts_default_and_name_the_flag() {
        let args = create_args(&["m", "--wait", "--timeout", "1m"]);
        assert_eq!(
            args.wait.timeout().unwrap(),
            Some(("1m", Duration::from_secs(60)))
        );
        let args = create_args(&["m", "--wait"]);
        assert_eq!(
            args.wait.timeout().unwrap(),
            Some(("15m", Duration::from_secs(900)))
        );
        let args = create_args(&["m", "--wait", "--timeout", "soon"]);
        let e = error(args.wait.timeout());
        assert!(
            e.starts_with("--timeout: \"soon\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn update_mask_holds_exactly_the_given_fields() {
        let update = |a: &[&str]| {
            let mut line = vec!["d"];
            line.extend_from_slice(a);
            parse::<UpdateDeploymentArgs>(&line).unwrap().update()
        };
        let (d, mask) = update(&["--max-replica-count", "4", "--enable-addons", "false"]).unwrap();
        assert_eq!(mask.paths, ["max_replica_count", "enable_addons"]);
        assert_eq!(d.max_replica_count, 4);
        assert!(!d.enable_addons);
        let (d, mask) = update(&["--min-replica-count", "0", "--description", ""]).unwrap();
        assert_eq!(mask.paths, ["description", "min_replica_count"]);
        assert_eq!(d.min_replica_count, 0);
        let e = error(update(&[]));
        assert!(e.starts_with("nothing to update"), "{e}");
    }
}
