//! The scheduler's client commands: `kiln create|get|list|update|delete deployment`,
//! `kiln undelete deployment`, `kiln scale deployment`, `kiln create|get|list|delete
//! deployed-model` and `kiln list nodes`.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use kiln_proto::common::v1 as commonv1;
use kiln_proto::scheduler::v1 as schv1;
use schv1::deployment::State as DeploymentState;

use crate::cli::{Authed, Client, ListArgs, collect_pages, print};
use crate::output::{self, Format};
use crate::registry_cli::full_name;

/// How often `--wait` asks for the deployment.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
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
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
    /// NVIDIA_H100_80GB, NVIDIA_A100_80GB, NVIDIA_H200_141GB, AMD_MI300X_192GB or CPU.
    #[arg(long)]
    pub accelerator_type: Option<String>,
    /// Accelerators per replica (CPU cores for CPU; default 1).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub accelerator_count: Option<i32>,
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub min_replica_count: Option<i32>,
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub max_replica_count: Option<i32>,
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
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub min_replica_count: Option<i32>,
    #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
    pub max_replica_count: Option<i32>,
    #[arg(long)]
    pub display_name: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
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

#[derive(Debug, Subcommand)]
pub enum UndeleteCommand {
    /// Restore a soft-deleted deployment (before its purge time).
    Deployment {
        /// The deployment: an ID in the account, or a full name.
        deployment: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ScaleCommand {
    /// Set a deployment's replica count by hand (clamped to its min..max replica count).
    Deployment {
        /// The deployment: an ID in the account, or a full name.
        deployment: String,
        /// The replicas wanted.
        #[arg(value_parser = clap::value_parser!(i32).range(0..))]
        replica_count: i32,
        #[command(flatten)]
        wait: WaitArgs,
    },
}

fn deployments(
    client: &Client,
) -> schv1::deployment_service_client::DeploymentServiceClient<Authed> {
    schv1::deployment_service_client::DeploymentServiceClient::new(client.authed())
}

fn deployed_models(
    client: &Client,
) -> schv1::deployed_model_service_client::DeployedModelServiceClient<Authed> {
    schv1::deployed_model_service_client::DeployedModelServiceClient::new(client.authed())
}

fn nodes(client: &Client) -> schv1::node_service_client::NodeServiceClient<Authed> {
    schv1::node_service_client::NodeServiceClient::new(client.authed())
}

// ---------------------------------------------------------------------------------------------
// Parsing flags
// ---------------------------------------------------------------------------------------------

/// Parses a duration flag: `500ms`, `30s`, `10m`, `1h`, `2d`, or a sum like `1h30m`. Errors
/// name the flag (`flag` without its dashes).
pub fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    const HINT: &str = "use a number with a unit ms, s, m, h or d, e.g. 500ms, 30s, 10m, 1h";
    let trimmed = text.trim();
    if trimmed.is_empty() {
        bail!("--{flag} {text:?}: empty duration; {HINT}");
    }
    let mut total = Duration::ZERO;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            bail!("--{flag} {text:?}: not a duration; {HINT}");
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| anyhow!("--{flag} {text:?}: the number is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (unit, tail) = rest.split_at(unit_len);
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => bail!("--{flag} {text:?}: missing unit; {HINT}"),
            other => bail!("--{flag} {text:?}: unknown unit {other:?}; {HINT}"),
        };
        let millis = number
            .checked_mul(millis_per_unit)
            .ok_or_else(|| anyhow!("--{flag} {text:?}: the duration is too long"))?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(|| anyhow!("--{flag} {text:?}: the duration is too long"))?;
        rest = tail;
    }
    Ok(total)
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// The valid names of an enum, from 1 (skipping the UNSPECIFIED value) to its last value.
fn enum_names<E: TryFrom<i32>>(name: fn(E) -> &'static str) -> Vec<&'static str> {
    (1..).map_while(|v| E::try_from(v).ok()).map(name).collect()
}

/// Parses an enum flag by its proto name, case-insensitively (`-` read as `_`); the
/// UNSPECIFIED value is refused. Errors name the flag and list the valid values.
fn parse_enum<E: TryFrom<i32> + Copy>(
    flag: &str,
    text: &str,
    from_name: fn(&str) -> Option<E>,
    name: fn(E) -> &'static str,
) -> anyhow::Result<E> {
    let wanted = text.trim().to_ascii_uppercase().replace('-', "_");
    let valid = enum_names(name);
    match from_name(&wanted) {
        Some(value) if valid.contains(&name(value)) => Ok(value),
        _ => bail!(
            "--{flag} {text:?}: unknown value; valid values: {}",
            valid.join(", ")
        ),
    }
}

/// Parses `--accelerator-type`: a `kiln.common.v1.AcceleratorType` name, case-insensitive.
pub fn parse_accelerator_type(text: &str) -> anyhow::Result<commonv1::AcceleratorType> {
    parse_enum(
        "accelerator-type",
        text,
        commonv1::AcceleratorType::from_str_name,
        |t: commonv1::AcceleratorType| t.as_str_name(),
    )
}

/// Parses `--precision`: a `kiln.common.v1.Precision` name, case-insensitive.
pub fn parse_precision(text: &str) -> anyhow::Result<commonv1::Precision> {
    parse_enum(
        "precision",
        text,
        commonv1::Precision::from_str_name,
        |p: commonv1::Precision| p.as_str_name(),
    )
}

/// Parses one `--load-target KEY=VALUE` (a positive number).
pub fn parse_load_target(text: &str) -> anyhow::Result<(String, f32)> {
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

/// The deployment a `create deployment` asks for (`base_model` already a full name).
fn new_deployment(
    args: &CreateDeploymentArgs,
    base_model: String,
) -> anyhow::Result<schv1::Deployment> {
    if let (Some(min), Some(max)) = (args.min_replica_count, args.max_replica_count)
        && min > max
    {
        bail!("--min-replica-count {min} is above --max-replica-count {max}");
    }
    let accelerator_type = match &args.accelerator_type {
        Some(t) => parse_accelerator_type(t)? as i32,
        None => 0,
    };
    let precision = match &args.precision {
        Some(p) => parse_precision(p)? as i32,
        None => 0,
    };
    let window = |flag: &str, value: &Option<String>| -> anyhow::Result<_> {
        value
            .as_deref()
            .map(|v| parse_duration(flag, v).map(proto_duration))
            .transpose()
    };
    let scale_up_window = window("scale-up-window", &args.scale_up_window)?;
    let scale_down_window = window("scale-down-window", &args.scale_down_window)?;
    let scale_to_zero_window = window("scale-to-zero-window", &args.scale_to_zero_window)?;
    let load_targets = args
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
        display_name: args.display_name.clone().unwrap_or_default(),
        description: args.description.clone().unwrap_or_default(),
        base_model,
        accelerator_type,
        accelerator_count: args.accelerator_count.unwrap_or_default(),
        precision,
        min_replica_count: args.min_replica_count.unwrap_or_default(),
        max_replica_count: args.max_replica_count.unwrap_or_default(),
        autoscaling_policy,
        enable_addons: args.enable_addons,
        backend: args.backend.clone().unwrap_or_default(),
        max_context_length: args.max_context_length.unwrap_or_default(),
        ..Default::default()
    })
}

/// The deployment and update mask of an `update deployment` (`name` a full name): the mask
/// holds exactly the fields given.
fn deployment_update(
    args: &UpdateDeploymentArgs,
    name: String,
) -> anyhow::Result<(schv1::Deployment, Vec<String>)> {
    let mut deployment = schv1::Deployment {
        name,
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(v) = args.display_name.clone() {
        deployment.display_name = v;
        paths.push("display_name".to_owned());
    }
    if let Some(v) = args.description.clone() {
        deployment.description = v;
        paths.push("description".to_owned());
    }
    if let Some(v) = args.min_replica_count {
        deployment.min_replica_count = v;
        paths.push("min_replica_count".to_owned());
    }
    if let Some(v) = args.max_replica_count {
        deployment.max_replica_count = v;
        paths.push("max_replica_count".to_owned());
    }
    if let Some(v) = args.enable_addons {
        deployment.enable_addons = v;
        paths.push("enable_addons".to_owned());
    }
    if paths.is_empty() {
        bail!(
            "nothing to update: pass --min-replica-count, --max-replica-count, --display-name, \
             --description or --enable-addons"
        );
    }
    Ok((deployment, paths))
}

// ---------------------------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------------------------

fn enum_name<E: TryFrom<i32>>(value: i32, name: fn(E) -> &'static str) -> String {
    E::try_from(value).map(name).unwrap_or("?").to_owned()
}

fn status_message(status: &Option<commonv1::Status>) -> &str {
    status.as_ref().map(|s| s.message.as_str()).unwrap_or("")
}

/// `2×NVIDIA_H100_80GB` (just the type when the count is unset).
fn accelerator_text(accelerator_type: i32, count: i32) -> String {
    let name = enum_name(accelerator_type, |t: commonv1::AcceleratorType| {
        t.as_str_name()
    });
    if count > 0 {
        format!("{count}×{name}")
    } else {
        name
    }
}

fn deployment_row(d: &schv1::Deployment) -> Vec<String> {
    let ready = d
        .replica_stats
        .as_ref()
        .map(|s| s.ready_replica_count)
        .unwrap_or(0);
    vec![
        d.name.clone(),
        enum_name(d.state, |s: DeploymentState| s.as_str_name()),
        d.base_model.clone(),
        enum_name(d.deployment_type, |t: schv1::deployment::DeploymentType| {
            t.as_str_name()
        }),
        accelerator_text(d.accelerator_type, d.accelerator_count),
        format!("{ready}/{}", d.desired_replica_count),
        status_message(&d.status).to_owned(),
    ]
}
const DEPLOYMENT_HEADERS: &[&str] = &[
    "NAME",
    "STATE",
    "MODEL",
    "TYPE",
    "ACCELERATOR",
    "READY",
    "STATUS",
];

fn deployed_model_row(m: &schv1::DeployedModel) -> Vec<String> {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    vec![
        m.name.clone(),
        enum_name(m.state, |s: schv1::deployed_model::State| s.as_str_name()),
        m.model.clone(),
        m.deployment.clone(),
        yes_no(m.default),
        yes_no(m.public),
        status_message(&m.status).to_owned(),
    ]
}
const DEPLOYED_MODEL_HEADERS: &[&str] = &[
    "NAME",
    "STATE",
    "MODEL",
    "DEPLOYMENT",
    "DEFAULT",
    "PUBLIC",
    "STATUS",
];

fn node_row(n: &schv1::Node) -> Vec<String> {
    let accelerators: Vec<String> = n
        .accelerators
        .iter()
        .map(|a| accelerator_text(a.r#type, a.count))
        .collect();
    vec![
        n.name.clone(),
        enum_name(n.state, |s: schv1::node::State| s.as_str_name()),
        n.address.clone(),
        if accelerators.is_empty() {
            "-".to_owned()
        } else {
            accelerators.join(", ")
        },
        n.replicas.len().to_string(),
        output::time(&n.last_heartbeat_time),
    ]
}
const NODE_HEADERS: &[&str] = &[
    "NAME",
    "STATE",
    "ADDRESS",
    "ACCELERATORS",
    "REPLICAS",
    "LAST HEARTBEAT",
];

fn print_deployments(format: Format, items: &[schv1::Deployment], single: bool) {
    print(
        format,
        "kiln.scheduler.v1.Deployment",
        items,
        DEPLOYMENT_HEADERS,
        deployment_row,
        single,
    );
}

fn print_deployed_models(format: Format, items: &[schv1::DeployedModel], single: bool) {
    print(
        format,
        "kiln.scheduler.v1.DeployedModel",
        items,
        DEPLOYED_MODEL_HEADERS,
        deployed_model_row,
        single,
    );
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// One line of a deployment's progress: `CREATING  replicas 0/1 ready (1 pending scheduling,
/// 0 downloading, 0 initializing)  <status message>`.
pub fn progress_text(d: &schv1::Deployment) -> String {
    let none = schv1::ReplicaStats::default();
    let stats = d.replica_stats.as_ref().unwrap_or(&none);
    let mut text = format!(
        "{}  replicas {}/{} ready ({} pending scheduling, {} downloading, {} initializing)",
        enum_name(d.state, |s: DeploymentState| s.as_str_name()),
        stats.ready_replica_count,
        d.desired_replica_count,
        stats.pending_scheduling_replica_count,
        stats.downloading_model_replica_count,
        stats.initializing_replica_count,
    );
    let message = status_message(&d.status);
    if !message.is_empty() {
        text.push_str("  ");
        text.push_str(message);
    }
    text
}

/// A progress line: rewritten in place on a terminal, one line per change otherwise.
pub struct ProgressLine {
    tty: bool,
    last: Option<String>,
    width: usize,
}

impl ProgressLine {
    pub fn new(tty: bool) -> Self {
        Self {
            tty,
            last: None,
            width: 0,
        }
    }

    /// Shows `text` when it differs from the last one shown.
    pub fn show(&mut self, out: &mut impl Write, text: &str) -> std::io::Result<()> {
        if self.last.as_deref() == Some(text) {
            return Ok(());
        }
        if self.tty {
            // Blank out what is left of a longer previous line.
            let width = text.chars().count();
            let pad = self.width.saturating_sub(width);
            write!(out, "\r{text}{:pad$}", "")?;
            self.width = width;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        self.last = Some(text.to_owned());
        Ok(())
    }

    /// Ends the line on a terminal, so what follows starts on a line of its own.
    pub fn finish(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if self.tty && self.last.is_some() {
            writeln!(out)?;
            out.flush()?;
        }
        self.last = None;
        self.width = 0;
        Ok(())
    }
}

/// What `--wait` waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    /// State READY.
    Ready,
    /// State READY with as many ready replicas as desired.
    Scaled,
}

/// Whether waiting is over: `Some(Ok)` when done, `Some(Err)` when it never will be, `None`
/// to keep waiting.
fn wait_outcome(d: &schv1::Deployment, wait_for: WaitFor) -> Option<anyhow::Result<()>> {
    let ready = d
        .replica_stats
        .as_ref()
        .map(|s| s.ready_replica_count)
        .unwrap_or(0);
    match DeploymentState::try_from(d.state) {
        Ok(DeploymentState::Ready) => match wait_for {
            WaitFor::Ready => Some(Ok(())),
            WaitFor::Scaled => (ready == d.desired_replica_count).then_some(Ok(())),
        },
        Ok(DeploymentState::Failed) => {
            let message = match status_message(&d.status) {
                "" => "no status message",
                m => m,
            };
            Some(Err(anyhow!("{} failed: {message}", d.name)))
        }
        Ok(state @ (DeploymentState::Deleting | DeploymentState::Deleted)) => Some(Err(anyhow!(
            "{} is {} and will not become READY",
            d.name,
            state.as_str_name()
        ))),
        _ => None,
    }
}

/// Polls the deployment every 500 ms, showing its progress on stderr, until `wait_for`
/// holds, it fails, or `timeout` passes.
async fn wait(
    client: &Client,
    name: &str,
    wait_args: &WaitArgs,
    wait_for: WaitFor,
) -> anyhow::Result<schv1::Deployment> {
    let timeout_text = wait_args.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT);
    let timeout = parse_duration("timeout", timeout_text)?;
    let deadline = Instant::now() + timeout;
    let mut err = std::io::stderr();
    let mut line = ProgressLine::new(err.is_terminal());
    loop {
        let polled = deployments(client)
            .get_deployment(schv1::GetDeploymentRequest {
                name: name.to_owned(),
            })
            .await;
        let d = match polled {
            Ok(d) => d.into_inner(),
            Err(status) => {
                let _ = line.finish(&mut err);
                return Err(status.into());
            }
        };
        let _ = line.show(&mut err, &progress_text(&d));
        if let Some(outcome) = wait_outcome(&d, wait_for) {
            let _ = line.finish(&mut err);
            return outcome.map(|()| d);
        }
        if Instant::now() >= deadline {
            let _ = line.finish(&mut err);
            bail!(
                "timed out after {timeout_text} waiting for {name} (state {})",
                enum_name(d.state, |s: DeploymentState| s.as_str_name())
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

pub async fn create_deployment(
    client: &Client,
    format: Format,
    args: CreateDeploymentArgs,
) -> anyhow::Result<()> {
    // Check the flags before talking to the server.
    new_deployment(&args, String::new())?;
    if args.wait.wait {
        parse_duration(
            "timeout",
            args.wait.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT),
        )?;
    }
    let base_model = full_name(client, "models", &args.model).await?;
    let deployment = new_deployment(&args, base_model)?;
    let parent = client.account().await?;
    let created = deployments(client)
        .create_deployment(schv1::CreateDeploymentRequest {
            parent,
            deployment_id: args.deployment_id.clone().unwrap_or_default(),
            deployment: Some(deployment),
            disable_auto_deploy: args.disable_auto_deploy,
            validate_only: args.validate_only,
        })
        .await?
        .into_inner();
    if args.validate_only {
        eprintln!("the request is valid (nothing was created)");
    }
    let shown = if args.wait.wait && !args.validate_only {
        wait(client, &created.name, &args.wait, WaitFor::Ready).await?
    } else {
        created
    };
    print_deployments(format, &[shown], true);
    Ok(())
}

pub async fn get_deployment(
    client: &Client,
    format: Format,
    deployment: &str,
) -> anyhow::Result<()> {
    let name = full_name(client, "deployments", deployment).await?;
    let d = deployments(client)
        .get_deployment(schv1::GetDeploymentRequest { name })
        .await?
        .into_inner();
    print_deployments(format, &[d], true);
    Ok(())
}

pub async fn list_deployments(
    client: &Client,
    format: Format,
    args: ListDeploymentsArgs,
) -> anyhow::Result<()> {
    let parent = client.account().await?;
    let list = &args.list;
    let items = collect_pages(list.limit, |page_token| {
        let mut c = deployments(client);
        let request = schv1::ListDeploymentsRequest {
            parent: parent.clone(),
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
            show_deleted: args.show_deleted,
        };
        async move {
            let page = c.list_deployments(request).await?.into_inner();
            Ok((page.deployments, page.next_page_token))
        }
    })
    .await?;
    print_deployments(format, &items, false);
    Ok(())
}

pub async fn update_deployment(
    client: &Client,
    format: Format,
    args: UpdateDeploymentArgs,
) -> anyhow::Result<()> {
    // Check the flags before talking to the server.
    deployment_update(&args, String::new())?;
    let name = full_name(client, "deployments", &args.deployment).await?;
    let (deployment, paths) = deployment_update(&args, name)?;
    let d = deployments(client)
        .update_deployment(schv1::UpdateDeploymentRequest {
            deployment: Some(deployment),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner();
    print_deployments(format, &[d], true);
    Ok(())
}

pub async fn delete_deployment(client: &Client, args: DeleteDeploymentArgs) -> anyhow::Result<()> {
    let name = full_name(client, "deployments", &args.deployment).await?;
    deployments(client)
        .delete_deployment(schv1::DeleteDeploymentRequest {
            name: name.clone(),
            hard: args.hard,
            ignore_checks: args.ignore_checks,
        })
        .await?;
    crate::say!("deleted {name}");
    if !args.hard {
        eprintln!("(until it is purged, `kiln undelete deployment {name}` restores it)");
    }
    Ok(())
}

pub async fn undelete(
    client: &Client,
    format: Format,
    command: UndeleteCommand,
) -> anyhow::Result<()> {
    match command {
        UndeleteCommand::Deployment { deployment } => {
            let name = full_name(client, "deployments", &deployment).await?;
            let d = deployments(client)
                .undelete_deployment(schv1::UndeleteDeploymentRequest { name })
                .await?
                .into_inner();
            print_deployments(format, &[d], true);
        }
    }
    Ok(())
}

pub async fn scale(client: &Client, format: Format, command: ScaleCommand) -> anyhow::Result<()> {
    match command {
        ScaleCommand::Deployment {
            deployment,
            replica_count,
            wait: wait_args,
        } => {
            if wait_args.wait {
                parse_duration(
                    "timeout",
                    wait_args.timeout.as_deref().unwrap_or(DEFAULT_TIMEOUT),
                )?;
            }
            let name = full_name(client, "deployments", &deployment).await?;
            let scaled = deployments(client)
                .scale_deployment(schv1::ScaleDeploymentRequest {
                    name,
                    replica_count,
                })
                .await?
                .into_inner();
            if scaled.desired_replica_count != replica_count {
                eprintln!(
                    "{} replicas asked for; {} desired (clamped to the replica count bounds)",
                    replica_count, scaled.desired_replica_count
                );
            }
            let shown = if wait_args.wait {
                wait(client, &scaled.name, &wait_args, WaitFor::Scaled).await?
            } else {
                scaled
            };
            print_deployments(format, &[shown], true);
        }
    }
    Ok(())
}

pub async fn create_deployed_model(
    client: &Client,
    format: Format,
    args: CreateDeployedModelArgs,
) -> anyhow::Result<()> {
    let model = full_name(client, "models", &args.model).await?;
    let deployment = full_name(client, "deployments", &args.deployment).await?;
    let parent = client.account().await?;
    let m = deployed_models(client)
        .create_deployed_model(schv1::CreateDeployedModelRequest {
            parent,
            deployed_model_id: args.deployed_model_id.unwrap_or_default(),
            deployed_model: Some(schv1::DeployedModel {
                model,
                deployment,
                default: args.default,
                public: args.public,
                display_name: args.display_name.unwrap_or_default(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    print_deployed_models(format, &[m], true);
    Ok(())
}

pub async fn get_deployed_model(
    client: &Client,
    format: Format,
    deployed_model: &str,
) -> anyhow::Result<()> {
    let name = full_name(client, "deployedModels", deployed_model).await?;
    let m = deployed_models(client)
        .get_deployed_model(schv1::GetDeployedModelRequest { name })
        .await?
        .into_inner();
    print_deployed_models(format, &[m], true);
    Ok(())
}

pub async fn list_deployed_models(
    client: &Client,
    format: Format,
    list: ListArgs,
) -> anyhow::Result<()> {
    let parent = client.account().await?;
    let items = collect_pages(list.limit, |page_token| {
        let mut c = deployed_models(client);
        let request = schv1::ListDeployedModelsRequest {
            parent: parent.clone(),
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        };
        async move {
            let page = c.list_deployed_models(request).await?.into_inner();
            Ok((page.deployed_models, page.next_page_token))
        }
    })
    .await?;
    print_deployed_models(format, &items, false);
    Ok(())
}

pub async fn delete_deployed_model(client: &Client, deployed_model: &str) -> anyhow::Result<()> {
    let name = full_name(client, "deployedModels", deployed_model).await?;
    deployed_models(client)
        .delete_deployed_model(schv1::DeleteDeployedModelRequest { name: name.clone() })
        .await?;
    crate::say!("deleted {name}");
    Ok(())
}

pub async fn list_nodes(client: &Client, format: Format, list: ListArgs) -> anyhow::Result<()> {
    let items = collect_pages(list.limit, |page_token| {
        let mut c = nodes(client);
        let request = schv1::ListNodesRequest {
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        };
        async move {
            let page = c.list_nodes(request).await?.into_inner();
            Ok((page.nodes, page.next_page_token))
        }
    })
    .await?;
    print(
        format,
        "kiln.scheduler.v1.Node",
        &items,
        NODE_HEADERS,
        node_row,
        false,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn error(result: anyhow::Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn durations_parse() {
        let ok = |t| parse_duration("scale-up-window", t).unwrap();
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("10m"), Duration::from_secs(600));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2d"), Duration::from_secs(2 * 86_400));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("1m500ms"), Duration::from_millis(60_500));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(
            proto_duration(ok("1m500ms")),
            prost_types::Duration {
                seconds: 60,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn bad_durations_name_the_flag() {
        let e = error(parse_duration("scale-down-window", "10"));
        assert!(
            e.starts_with("--scale-down-window \"10\": missing unit"),
            "{e}"
        );
        let e = error(parse_duration("scale-down-window", "10x"));
        assert!(
            e.starts_with("--scale-down-window \"10x\": unknown unit \"x\""),
            "{e}"
        );
        assert!(e.contains("500ms, 30s, 10m, 1h"), "{e}");
        let e = error(parse_duration("timeout", "soon"));
        assert!(e.starts_with("--timeout \"soon\": not a duration"), "{e}");
        let e = error(parse_duration("timeout", ""));
        assert!(e.starts_with("--timeout \"\": empty duration"), "{e}");
        let e = error(parse_duration("timeout", "-5s"));
        assert!(e.starts_with("--timeout \"-5s\": not a duration"), "{e}");
        let e = error(parse_duration("timeout", "1.5h"));
        assert!(e.contains("unknown unit \".\""), "{e}");
        let e = error(parse_duration("timeout", "99999999999999999999s"));
        assert!(e.contains("too large"), "{e}");
        let e = error(parse_duration("timeout", "999999999999999999d"));
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn accelerator_types_parse_case_insensitively() {
        use commonv1::AcceleratorType as T;
        assert_eq!(
            parse_accelerator_type("NVIDIA_H100_80GB").unwrap(),
            T::NvidiaH10080gb
        );
        assert_eq!(
            parse_accelerator_type("nvidia_a100_80gb").unwrap(),
            T::NvidiaA10080gb
        );
        assert_eq!(
            parse_accelerator_type("nvidia-h200-141gb").unwrap(),
            T::NvidiaH200141gb
        );
        assert_eq!(
            parse_accelerator_type("amd_mi300x_192gb").unwrap(),
            T::AmdMi300x192gb
        );
        assert_eq!(parse_accelerator_type("cpu").unwrap(), T::Cpu);
    }

    #[test]
    fn unknown_accelerator_types_list_the_valid_ones() {
        let expected = "valid values: NVIDIA_A100_80GB, NVIDIA_H100_80GB, NVIDIA_H200_141GB, \
                        AMD_MI300X_192GB, CPU";
        let e = error(parse_accelerator_type("tpu"));
        assert_eq!(
            e,
            format!("--accelerator-type \"tpu\": unknown value; {expected}")
        );
        // The unspecified value is not a choice.
        let e = error(parse_accelerator_type("accelerator_type_unspecified"));
        assert!(e.ends_with(expected), "{e}");
    }

    #[test]
    fn precisions_parse() {
        assert_eq!(parse_precision("bf16").unwrap(), commonv1::Precision::Bf16);
        let e = error(parse_precision("fp64"));
        assert_eq!(
            e,
            "--precision \"fp64\": unknown value; valid values: FP32, FP16, BF16, FP8, INT8, INT4"
        );
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

    /// Parses a command line with the real `kiln` parser.
    fn parse(args: &[&str]) -> crate::cli::Command {
        crate::cli::Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
    }

    fn create_args(args: &[&str]) -> CreateDeploymentArgs {
        let mut line = vec!["create", "deployment"];
        line.extend_from_slice(args);
        match parse(&line) {
            crate::cli::Command::Create(crate::cli::CreateCommand::Deployment(a)) => *a,
            other => panic!("parsed as {other:?}"),
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
        let d = new_deployment(&args, "accounts/a/models/smollm".into()).unwrap();
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
        let d = new_deployment(&args, "accounts/kiln/models/m".into()).unwrap();
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
            error(new_deployment(&args, String::new())),
            "--min-replica-count 3 is above --max-replica-count 1"
        );
        let args = create_args(&["m", "--scale-down-window", "10 minutes"]);
        let e = error(new_deployment(&args, String::new()));
        assert!(e.starts_with("--scale-down-window \"10 minutes\""), "{e}");
        let args = create_args(&["m", "--accelerator-type", "gpu"]);
        let e = error(new_deployment(&args, String::new()));
        assert!(
            e.starts_with("--accelerator-type \"gpu\": unknown value"),
            "{e}"
        );
        // clap refuses other backends, and --timeout without --wait.
        let cli = |a: &[&str]| crate::cli::Cli::try_parse_from(a.iter().copied());
        assert!(cli(&["kiln", "create", "deployment", "m", "--backend", "vllm"]).is_err());
        assert!(cli(&["kiln", "create", "deployment", "m", "--timeout", "1m"]).is_err());
        assert!(
            cli(&[
                "kiln",
                "create",
                "deployment",
                "m",
                "--wait",
                "--timeout",
                "1m"
            ])
            .is_ok()
        );
    }

    #[test]
    fn update_mask_holds_exactly_the_given_fields() {
        let update = |a: &[&str]| {
            let mut line = vec!["update", "deployment", "d"];
            line.extend_from_slice(a);
            match parse(&line) {
                crate::cli::Command::Update(crate::cli::UpdateCommand::Deployment(a)) => {
                    deployment_update(&a, "accounts/a/deployments/d".into())
                }
                other => panic!("parsed as {other:?}"),
            }
        };
        let (d, paths) = update(&["--max-replica-count", "4", "--enable-addons", "false"]).unwrap();
        assert_eq!(paths, ["max_replica_count", "enable_addons"]);
        assert_eq!(d.name, "accounts/a/deployments/d");
        assert_eq!(d.max_replica_count, 4);
        assert!(!d.enable_addons);
        let (d, paths) = update(&["--min-replica-count", "0", "--description", ""]).unwrap();
        assert_eq!(paths, ["description", "min_replica_count"]);
        assert_eq!(d.min_replica_count, 0);
        let e = error(update(&[]));
        assert!(e.starts_with("nothing to update"), "{e}");
    }

    #[test]
    fn new_verbs_parse() {
        match parse(&["scale", "deployment", "d", "3", "--wait", "--timeout", "2m"]) {
            crate::cli::Command::Scale(ScaleCommand::Deployment {
                deployment,
                replica_count,
                wait,
            }) => {
                assert_eq!((deployment.as_str(), replica_count), ("d", 3));
                assert!(wait.wait);
                assert_eq!(wait.timeout.as_deref(), Some("2m"));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["undelete", "deployment", "d"]),
            crate::cli::Command::Undelete(UndeleteCommand::Deployment { .. })
        ));
        match parse(&[
            "create",
            "deployed-model",
            "m",
            "--deployment",
            "d",
            "--default",
        ]) {
            crate::cli::Command::Create(crate::cli::CreateCommand::DeployedModel(a)) => {
                assert_eq!((a.model.as_str(), a.deployment.as_str()), ("m", "d"));
                assert!(a.default && !a.public);
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(matches!(
            parse(&["list", "deployments", "--show-deleted"]),
            crate::cli::Command::List(crate::cli::ListCommand::Deployments(ListDeploymentsArgs {
                show_deleted: true,
                ..
            }))
        ));
        assert!(matches!(
            parse(&["list", "nodes"]),
            crate::cli::Command::List(crate::cli::ListCommand::Nodes(_))
        ));
    }

    fn deployment(state: DeploymentState, ready: i32, desired: i32) -> schv1::Deployment {
        schv1::Deployment {
            name: "accounts/a/deployments/d".into(),
            state: state as i32,
            desired_replica_count: desired,
            replica_stats: Some(schv1::ReplicaStats {
                pending_scheduling_replica_count: 1,
                downloading_model_replica_count: 2,
                initializing_replica_count: 3,
                ready_replica_count: ready,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn progress_text_shows_replica_phases_and_status() {
        let mut d = deployment(DeploymentState::Creating, 0, 1);
        assert_eq!(
            progress_text(&d),
            "CREATING  replicas 0/1 ready (1 pending scheduling, 2 downloading, 3 initializing)"
        );
        d.status = Some(commonv1::Status {
            code: 0,
            message: "waiting for a node with 1×CPU".into(),
        });
        assert_eq!(
            progress_text(&d),
            "CREATING  replicas 0/1 ready (1 pending scheduling, 2 downloading, 3 initializing)  \
             waiting for a node with 1×CPU"
        );
        assert_eq!(
            progress_text(&schv1::Deployment::default()),
            "STATE_UNSPECIFIED  replicas 0/0 ready (0 pending scheduling, 0 downloading, 0 \
             initializing)"
        );
    }

    #[test]
    fn progress_line_rewrites_in_place_on_a_terminal() {
        let mut out = Vec::new();
        let mut line = ProgressLine::new(true);
        line.show(&mut out, "CREATING long").unwrap();
        line.show(&mut out, "CREATING long").unwrap();
        line.show(&mut out, "READY").unwrap();
        line.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\rCREATING long\rREADY        \n"
        );
    }

    #[test]
    fn progress_line_prints_one_line_per_change_otherwise() {
        let mut out = Vec::new();
        let mut line = ProgressLine::new(false);
        for text in ["CREATING a", "CREATING a", "CREATING b", "READY"] {
            line.show(&mut out, text).unwrap();
        }
        line.finish(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "CREATING a\nCREATING b\nREADY\n"
        );
        // Nothing shown: finishing writes nothing either.
        let mut out = Vec::new();
        ProgressLine::new(true).finish(&mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn waiting_ends_on_ready_failed_or_deleted() {
        use DeploymentState as S;
        assert!(wait_outcome(&deployment(S::Creating, 0, 1), WaitFor::Ready).is_none());
        assert!(wait_outcome(&deployment(S::Updating, 1, 1), WaitFor::Ready).is_none());
        assert!(matches!(
            wait_outcome(&deployment(S::Ready, 1, 1), WaitFor::Ready),
            Some(Ok(()))
        ));
        // A scale waits for the ready replicas to match the desired count.
        assert!(wait_outcome(&deployment(S::Ready, 1, 3), WaitFor::Scaled).is_none());
        assert!(wait_outcome(&deployment(S::Ready, 3, 1), WaitFor::Scaled).is_none());
        assert!(matches!(
            wait_outcome(&deployment(S::Ready, 3, 3), WaitFor::Scaled),
            Some(Ok(()))
        ));
        let mut failed = deployment(S::Failed, 0, 1);
        failed.status = Some(commonv1::Status {
            code: 9,
            message: "no node has 8×NVIDIA_H100_80GB".into(),
        });
        let e = error(wait_outcome(&failed, WaitFor::Ready).unwrap());
        assert_eq!(
            e,
            "accounts/a/deployments/d failed: no node has 8×NVIDIA_H100_80GB"
        );
        let e = error(wait_outcome(&deployment(S::Deleted, 0, 0), WaitFor::Ready).unwrap());
        assert_eq!(
            e,
            "accounts/a/deployments/d is DELETED and will not become READY"
        );
    }

    #[test]
    fn tables_show_what_matters() {
        let mut d = deployment(DeploymentState::Ready, 1, 2);
        d.base_model = "accounts/kiln/models/m".into();
        d.deployment_type = schv1::deployment::DeploymentType::Dedicated as i32;
        d.accelerator_type = commonv1::AcceleratorType::NvidiaH10080gb as i32;
        d.accelerator_count = 2;
        assert_eq!(
            deployment_row(&d),
            [
                "accounts/a/deployments/d",
                "READY",
                "accounts/kiln/models/m",
                "DEDICATED",
                "2×NVIDIA_H100_80GB",
                "1/2",
                ""
            ]
        );
        let node = schv1::Node {
            name: "nodes/n1".into(),
            state: schv1::node::State::Ready as i32,
            address: "http://10.0.0.5:7443".into(),
            accelerators: vec![
                schv1::Accelerator {
                    r#type: commonv1::AcceleratorType::NvidiaH10080gb as i32,
                    count: 2,
                    memory_bytes: 80 << 30,
                },
                schv1::Accelerator {
                    r#type: commonv1::AcceleratorType::Cpu as i32,
                    count: 16,
                    memory_bytes: 64 << 30,
                },
            ],
            replicas: vec![schv1::Replica::default()],
            last_heartbeat_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            ..Default::default()
        };
        assert_eq!(
            node_row(&node),
            [
                "nodes/n1",
                "READY",
                "http://10.0.0.5:7443",
                "2×NVIDIA_H100_80GB, 16×CPU",
                "1",
                "2023-11-14T22:13:20Z"
            ]
        );
    }

    #[test]
    fn json_covers_scheduler_messages() {
        let d = deployment(DeploymentState::Ready, 1, 1);
        let json = output::to_json("kiln.scheduler.v1.Deployment", &d);
        assert_eq!(json["name"], "accounts/a/deployments/d");
        assert_eq!(json["state"], "READY");
        assert_eq!(json["replica_stats"]["ready_replica_count"], 1);
        let m = schv1::DeployedModel {
            default: true,
            ..Default::default()
        };
        assert_eq!(
            output::to_json("kiln.scheduler.v1.DeployedModel", &m)["default"],
            true
        );
        let n = output::to_json("kiln.scheduler.v1.Node", &schv1::Node::default());
        assert!(n["accelerators"].as_array().is_some_and(|a| a.is_empty()));
    }
}
