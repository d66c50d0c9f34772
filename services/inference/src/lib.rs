//! Kiln inference: the engine (pluggable ONNX backends, model bundles and their cache,
//! dynamic batching), embeddings and the Open Inference Protocol. A library plus a thin
//! `main.rs`; `kiln dev` hosts it beside the other services.

pub mod backend;
mod bundle;
mod chat;
mod completions;
pub mod config;
pub mod embeddings;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod generation;
pub mod limits;
pub mod node;
mod oip;
mod replicas;
mod router;
mod runner;
mod service;
pub mod source;
pub mod tensor;
pub mod training;
mod usage;

use std::sync::Arc;

use kiln_events::host::Host;
use kiln_proto::common::v1::AcceleratorType;

pub use kiln_core::{Error, Result};
pub use runner::Dispatch;
pub use service::Inference;

/// The service name: its database and its outbox rows.
pub const SERVICE: &str = "inference";

/// The node's database: the outbox of its usage events and the usage of requests being
/// answered.
const MIGRATIONS: &[kiln_store::Migration] = &[kiln_events::outbox::MIGRATION, usage::MIGRATION];

/// Usage events come one per request: the relay gathers them for a fifth of a second rather
/// than running a pass (and billing a batch) per few requests beside the model (measured:
/// gRPC embedding latency over the direct call 20.8% -> 17.4% against 20 ms). While the node
/// answers 4 or more calls (any model's) it gathers for a second: each pass sets
/// off a burst of work (JetStream, billing's booking and spend events, PostgreSQL) that
/// preempts the model's threads mid-operator, so under load the bursts cost more than their
/// CPU (measured, 32 embedding clients on 2 cores: the model's threads 86.4-88.3% of the
/// cores with 200 ms, 89.9-90.8% with 1 s, no better with 2 s). One request at a time keeps
/// the short wait: fewer, bigger bursts made its latency worse.
const USAGE_LINGER: kiln_events::outbox::Linger = kiln_events::outbox::Linger {
    quiet: std::time::Duration::from_millis(200),
    busy: std::time::Duration::from_secs(1),
    busy_from: 4,
};

/// How a node works with the scheduler: the address other nodes reach it at, and its link.
pub struct Scheduling {
    pub address: String,
    pub link: Arc<dyn node::SchedulerLink>,
}

/// Opens the node's database, engine and usage recorder, starts its outbox relay on the
/// host's bus and adds its gRPC services to the host. Models come from `source`. With
/// `scheduling`, the node registers with the scheduler and serves what it assigns; without,
/// requests name models and are served directly. With `limits` (billing), serverless
/// requests are rate limited per account.
pub async fn open(
    config: &config::InferenceConfig,
    host: &mut Host,
    source: Arc<dyn source::ModelSource>,
    scheduling: Option<Scheduling>,
    limits: Option<Arc<dyn limits::LimitSource>>,
) -> Result<Inference> {
    let data_dir = host.server().data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|e| Error::internal("creating the data dir", e))?;
    let db = host.open_database(SERVICE, MIGRATIONS).await?;
    let answering = kiln_core::in_flight::InFlight::default();
    let outbox =
        kiln_events::outbox::Outbox::new(SERVICE).with_linger(USAGE_LINGER, answering.clone());
    host.relay(&outbox, db.clone());
    let ort_path =
        (!config.ort_dylib_path.is_empty()).then(|| std::path::Path::new(&config.ort_dylib_path));
    let backends = backend::Backends::standard(ort_path);
    let device = config
        .parsed_device()
        .map_err(|e| Error::Internal(e.to_string()))?;
    for name in backends.names() {
        match backends.get(name).and_then(|b| b.unavailable(device)) {
            None => tracing::info!(backend = name, ?device, "backend available"),
            Some(why) => tracing::warn!(backend = name, ?device, "backend unavailable: {why}"),
        }
    }
    let accelerator = match device {
        backend::Device::Cpu => AcceleratorType::Cpu,
        // The node reports its exact GPU model to the scheduler; usage names the family.
        backend::Device::Cuda(_) => AcceleratorType::Unspecified,
    };
    let engine = Arc::new(engine::Engine::new(
        config.clone(),
        &data_dir,
        backends,
        source,
    )?);
    let node = scheduling.map(|s| {
        let checkpoints = data_dir.join("training");
        let node = node::Node::new(engine.clone(), config, s.address, checkpoints);
        host.track(node.spawn_agent(s.link, host.shutdown.clone()));
        node
    });
    let node_name = node
        .as_ref()
        .map(|n| n.name.trim_start_matches("nodes/").to_owned())
        .unwrap_or_else(|| "local".to_owned());
    let limiter = match limits {
        Some(source) => {
            let limiter = limits::RateLimiter::new(source);
            host.track(limiter.follow(&host.bus, host.stopped.clone()).await?);
            Some(limiter)
        }
        None => None,
    };
    let stopped = Some(host.stopped.clone());
    let recording = usage::Recording {
        node: &node_name,
        accelerator,
        limiter: limiter.clone(),
        journal_dir: &journals(&data_dir).join(&node_name),
    };
    let (usage, writer) = usage::UsageRecorder::start(db, outbox, recording, stopped)?;
    host.track(writer);
    if let Some(node) = &node {
        let _ = node.usage.set(usage.clone());
    }
    let inference = Inference {
        engine,
        usage,
        node,
        limiter,
        draining: host.shutdown.clone(),
        answering,
    };
    add_services(&inference, &mut host.services);
    Ok(inference)
}

/// How many requests' usage the journals of the nodes in `data_dir` hold unsettled (after a
/// clean stop: none).
pub fn unsettled_usage(data_dir: &std::path::Path) -> std::io::Result<usize> {
    let mut unsettled = 0;
    match std::fs::read_dir(journals(data_dir)) {
        Ok(nodes) => {
            for node in nodes {
                unsettled += usage::unsettled_in(&node?.path())?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(unsettled)
}

/// Where the nodes' usage journals are kept, one directory per node.
fn journals(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("usage-journal")
}

/// Loads the configured `preload` models in the background, as the service principal.
pub fn preload(inference: &Inference, names: Vec<String>) {
    let engine = inference.engine.clone();
    tokio::spawn(async move {
        let service = kiln_core::auth::Principal::service();
        for name in names {
            match engine.model(&service, "preload", &name).await {
                Ok(model) => {
                    tracing::info!(model = %model.name, backend = model.backend, "preloaded")
                }
                Err(err) => tracing::warn!(model = %name, %err, "preloading failed"),
            }
        }
    });
}

/// Adds the node's gRPC services (inference and the Open Inference Protocol) to a server.
pub fn add_services(inference: &Inference, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(
            kiln_proto::kiln_inference::v1::inference_service_server::InferenceServiceServer::new(
                inference.clone(),
            )
            .max_decoding_message_size(16 << 20),
        )
        .add(
            kiln_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
                inference.clone(),
            )
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        );
}
