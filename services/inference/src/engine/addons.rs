//! LoRA addons in the engine: an addon's files fetched for a replica, its weights parsed once
//! (a bounded LRU), a graph given LoRA slots, and live merge (an addon served as a model of its
//! own on its base's bundle).

use std::path::PathBuf;
use std::sync::Arc;

use kiln_proto::registry::v1::{Model, model};

use super::{Bundle, Engine, check_servable};
use crate::generation::llm::Adapter;
use kiln_core::{Error, Result};

impl Engine {
    /// Stops serving `name` (its thread ends once its queue drains).
    /// The files of LoRA addon `addon` for a replica of `base`, fetched into the cache
    /// (verified) and pinned until [`Engine::release_addon`]: what a node holds when it
    /// has an addon loaded. The addon must be a READY LoRA addon of `base`.
    pub(crate) async fn fetch_addon(&self, addon: &str, base: &str) -> Result<PathBuf> {
        let model = self.source.get_model(addon).await?;
        if model.kind != model::Kind::LoraAddon as i32 {
            return Err(Error::FailedPrecondition(format!(
                "{addon} is not a LoRA addon"
            )));
        }
        if model.state != model::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "addon {addon} is not READY"
            )));
        }
        let of = model
            .peft_details
            .as_ref()
            .map(|p| p.base_model.as_str())
            .unwrap_or_default();
        if of != base {
            return Err(Error::FailedPrecondition(format!(
                "{addon} is an addon of {of}, not of {base}"
            )));
        }
        self.cache
            .fetch_files(self.source.as_ref(), &model, None, &model.files)
            .await
    }

    /// Unpins an addon's files fetched by [`Engine::fetch_addon`].
    pub(crate) fn release_addon(&self, dir: &std::path::Path) {
        self.cache.unpin(dir);
    }

    /// What a live-merged addon is served from: its base's bundle (pinned, like any loaded
    /// bundle) and its weights.
    pub(super) async fn merge_sources(
        &self,
        addon: &Model,
        blocks_ok: bool,
    ) -> Result<(Bundle, Arc<Adapter>)> {
        if addon.state != model::State::Ready as i32 {
            return Err(Error::FailedPrecondition(format!(
                "addon {} is not READY",
                addon.name
            )));
        }
        let base_name = addon
            .peft_details
            .as_ref()
            .map(|p| p.base_model.clone())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("addon {} names no base model", addon.name))
            })?;
        let base = self.source.get_model(&base_name).await?;
        check_servable(&base)?;
        let files = self
            .cache
            .fetch_files(self.source.as_ref(), addon, None, &addon.files)
            .await?;
        // Its weights are read into memory at once: its files need not stay pinned.
        let adapter = self.adapter(&addon.name, &files).await;
        self.cache.unpin(&files);
        let adapter = adapter?;
        let bundle = self
            .cache
            .fetch(self.source.as_ref(), &base, blocks_ok)
            .await?;
        Ok((bundle, adapter))
    }

    /// The weights of LoRA addon `name` whose files are in `dir` (fetched by
    /// [`Engine::fetch_addon`]), parsed once and kept in a bounded LRU
    /// (`inference.max_cpu_loras`).
    pub(crate) async fn adapter(&self, name: &str, dir: &std::path::Path) -> Result<Arc<Adapter>> {
        let key = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(adapter) = self.adapters.lock().expect("adapters").get(&key) {
            return Ok(adapter);
        }
        let (dir, owned_name, owned_key) = (dir.to_owned(), name.to_owned(), key.clone());
        let adapter =
            tokio::task::spawn_blocking(move || read_adapter(&dir, owned_name, owned_key))
                .await
                .map_err(|e| Error::Internal(format!("reading {name}: {e}")))??;
        let adapter = Arc::new(adapter);
        self.adapters
            .lock()
            .expect("adapters")
            .insert(key, adapter.clone());
        Ok(adapter)
    }
}

/// The graph of `graph` with LoRA slots: made once next to it (`<graph>.lora-slots-vN`), then
/// reused.
pub fn with_lora_slots(graph: &std::path::Path) -> Result<PathBuf> {
    let suffix = format!("lora-slots-v{}", kiln_formats::LORA_SLOTS_VERSION);
    let slotted = derived_graph(graph, &suffix, |bytes| {
        let (rewritten, linears) = kiln_formats::add_lora_slots(bytes).map_err(|why| {
            Error::FailedPrecondition(format!("{} cannot take LoRA slots: {why}", graph.display()))
        })?;
        tracing::info!(graph = %graph.display(), linears = linears.len(), "LoRA slots added");
        Ok(Some(rewritten))
    })?;
    Ok(slotted.expect("slots are always added"))
}

/// The graph of `graph` with `adapter` merged in (live merge): made once next to it
/// (`<graph>.merged-<adapter key>-vN`), then reused. `None`: the graph keeps 4-bit blocks,
/// which are not merged (the adapter is served pinned in a LoRA slot instead).
pub fn with_merged_adapter(graph: &std::path::Path, adapter: &Adapter) -> Result<Option<PathBuf>> {
    let suffix = format!(
        "merged-{}-v{}",
        adapter.key,
        kiln_formats::LORA_SLOTS_VERSION
    );
    derived_graph(graph, &suffix, |bytes| {
        let merged = kiln_formats::merge_lora(bytes, &adapter.weights).map_err(|why| {
            Error::FailedPrecondition(format!(
                "cannot merge {} into its base: {why}",
                adapter.name
            ))
        })?;
        if merged.is_some() {
            tracing::info!(adapter = %adapter.name, graph = %graph.display(), "LoRA adapter merged");
        }
        Ok(merged)
    })
}

/// `<graph>.<suffix>`: what `rewrite` makes of the graph's bytes, written once (through a
/// private file renamed into place) and reused after; `None` when `rewrite` declines.
fn derived_graph(
    graph: &std::path::Path,
    suffix: &str,
    rewrite: impl FnOnce(&[u8]) -> Result<Option<Vec<u8>>>,
) -> Result<Option<PathBuf>> {
    let mut name = graph.as_os_str().to_owned();
    name.push(format!(".{suffix}"));
    let derived = PathBuf::from(name);
    if derived.is_file() {
        return Ok(Some(derived));
    }
    let Some(rewritten) = rewrite(&std::fs::read(graph)?)? else {
        return Ok(None);
    };
    let partial = derived.with_extension(format!("partial-{}", uuid::Uuid::new_v4()));
    std::fs::write(&partial, rewritten)?;
    std::fs::rename(&partial, &derived)?;
    Ok(Some(derived))
}

/// Parses the adapter in `dir` (`adapter_config.json`, `adapter_model.safetensors`).
fn read_adapter(dir: &std::path::Path, name: String, key: String) -> Result<Adapter> {
    let read = |file: &str| {
        std::fs::read(dir.join(file))
            .map_err(|e| Error::FailedPrecondition(format!("{name}: reading {file}: {e}")))
    };
    let bad = |e: kiln_formats::FormatError| Error::FailedPrecondition(format!("{name}: {e}"));
    let config =
        kiln_formats::read_adapter_config("adapter_config.json", &read("adapter_config.json")?)
            .map_err(bad)?;
    let weights = kiln_formats::read_lora_weights(
        &config,
        &read("adapter_model.safetensors")?,
        "adapter_model.safetensors",
    )
    .map_err(bad)?;
    Ok(Adapter {
        key,
        name,
        weights: Arc::new(weights),
    })
}

/// Parsed adapters by key, the least recently used dropped beyond a count.
pub(super) struct AdapterCache {
    capacity: usize,
    entries: Vec<(String, Arc<Adapter>)>,
}

impl AdapterCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            entries: Vec::new(),
        }
    }

    pub(super) fn get(&mut self, key: &str) -> Option<Arc<Adapter>> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(at);
        let adapter = entry.1.clone();
        self.entries.push(entry);
        Some(adapter)
    }

    pub(super) fn insert(&mut self, key: String, adapter: Arc<Adapter>) {
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, adapter));
        while self.entries.len() > self.capacity {
            self.entries.remove(0);
        }
    }
}
