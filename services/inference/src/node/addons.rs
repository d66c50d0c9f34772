//! Addons on the node's replicas: their files fetched into the model cache, listed among the
//! replica's loaded addons, released when no replica here holds them.

use std::sync::Arc;

use kiln_proto::scheduler::v1::{LoadAddon, replica};
use tonic::Status;

use super::Node;

impl Node {
    /// Fetches an addon's files for a replica (verified, into the model cache) and lists it
    /// among the replica's loaded addons; the ack says whether it could. Serving requests
    /// through the addon's weights is the LoRA serving work's; until then a request naming
    /// the addon is refused by the router, never answered by the bare base.
    pub(super) fn load_addon(self: &Arc<Self>, id: String, load: LoadAddon) {
        let base = {
            let replicas = self.replicas.lock();
            match replicas.get(&load.replica) {
                Some(held) if held.replica.loaded_addons.contains(&load.addon) => {
                    drop(replicas);
                    self.ack(id, Ok(()));
                    return;
                }
                Some(held) => held.replica.model.clone(),
                None => {
                    drop(replicas);
                    self.ack(
                        id,
                        Err(format!("{} is not held by this node", load.replica)),
                    );
                    return;
                }
            }
        };
        let node = self.clone();
        tokio::spawn(async move {
            let fetched = node.engine.fetch_addon(&load.addon, &base).await;
            let outcome = match fetched {
                Ok(dir) => {
                    let mut replicas = node.replicas.lock();
                    match replicas.get_mut(&load.replica) {
                        Some(held) => {
                            if !held.replica.loaded_addons.contains(&load.addon) {
                                held.replica.loaded_addons.push(load.addon.clone());
                            }
                            held.addon_dirs.insert(load.addon.clone(), dir);
                            Ok(())
                        }
                        None => {
                            // Unloaded meanwhile.
                            drop(replicas);
                            node.release_addon_files(&dir);
                            Err(format!("{} was unloaded", load.replica))
                        }
                    }
                }
                Err(err) => Err(Status::from(err).message().to_owned()),
            };
            match &outcome {
                Ok(()) => {
                    tracing::info!(replica = %load.replica, addon = %load.addon, "addon loaded");
                    let state = node
                        .replicas
                        .lock()
                        .get(&load.replica)
                        .and_then(|h| replica::State::try_from(h.replica.state).ok());
                    if let Some(state) = state {
                        node.report(&load.replica, state, None);
                    }
                }
                Err(why) => {
                    tracing::warn!(replica = %load.replica, addon = %load.addon, %why, "addon not loaded")
                }
            }
            node.ack(id, outcome);
        });
    }

    pub(super) fn unload_addon(&self, replica: &str, addon: &str) {
        let (dir, state) = {
            let mut replicas = self.replicas.lock();
            let Some(held) = replicas.get_mut(replica) else {
                return;
            };
            held.replica.loaded_addons.retain(|a| a != addon);
            (
                held.addon_dirs.remove(addon),
                replica::State::try_from(held.replica.state).ok(),
            )
        };
        if let Some(dir) = dir {
            self.release_addon_files(&dir);
        }
        tracing::info!(replica, addon, "addon unloaded");
        if let Some(state) = state {
            self.report(replica, state, None);
        }
    }

    /// Unpins an addon's files unless another replica here still holds them.
    pub(super) fn release_addon_files(&self, dir: &std::path::Path) {
        let still_used = self
            .replicas
            .lock()
            .values()
            .any(|h| h.addon_dirs.values().any(|d| d == dir));
        if !still_used {
            self.engine.release_addon(dir);
        }
    }
}
