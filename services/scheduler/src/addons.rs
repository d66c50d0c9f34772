//! LoRA addons on deployments. Every ready replica of a deployment is to hold the addons of
//! the deployed models on it: the scheduler sends LoadAddon / UnloadAddon assignments and
//! the node's reports (state reports and heartbeats list each replica's loaded addons) say
//! when it does. An addon's deployed model is DEPLOYED once every ready replica holds it,
//! and a replica takes requests for an addon only while it holds it; an addon a node
//! refuses fails its deployed model with the node's reason.

use std::collections::{BTreeSet, HashMap};

use kiln_proto::common::v1::Status as ResourceStatus;
use kiln_proto::scheduler::v1::{
    Assignment, DeployedModel, LoadAddon, SchedulerMessage, UnloadAddon, assignment,
    deployed_model, replica, scheduler_message,
};

use crate::service::Scheduler;
use crate::state::State;
use kiln_core::Result;

/// Assignment ids of addon loads: `addon|{replica}|{addon}`.
const LOAD_PREFIX: &str = "addon|";

/// Whether a deployed model still wants its model served.
fn is_live(dm: &DeployedModel) -> bool {
    dm.state == deployed_model::State::Deploying as i32
        || dm.state == deployed_model::State::Deployed as i32
        || dm.state == deployed_model::State::Updating as i32
}

/// Whether `dm` is an addon on its deployment (not the deployment's base model).
pub(crate) fn is_addon_on(state: &State, dm: &DeployedModel) -> bool {
    state
        .deployments
        .get(&dm.deployment)
        .is_some_and(|e| e.deployment.base_model != dm.model)
}

/// The addons each deployment's replicas are to hold.
fn wanted(state: &State) -> HashMap<String, BTreeSet<String>> {
    let mut wanted: HashMap<String, BTreeSet<String>> = HashMap::new();
    for dm in state.deployed_models.values() {
        if is_live(dm) && is_addon_on(state, dm) {
            wanted
                .entry(dm.deployment.clone())
                .or_default()
                .insert(dm.model.clone());
        }
    }
    wanted
}

fn addon_assignment(replica: &str, addon: &str, load: bool) -> SchedulerMessage {
    let (id, action) = if load {
        (
            format!("{LOAD_PREFIX}{replica}|{addon}"),
            assignment::Action::LoadAddon(LoadAddon {
                replica: replica.to_owned(),
                addon: addon.to_owned(),
            }),
        )
    } else {
        (
            format!("addon-unload|{replica}|{addon}"),
            assignment::Action::UnloadAddon(UnloadAddon {
                replica: replica.to_owned(),
                addon: addon.to_owned(),
            }),
        )
    };
    SchedulerMessage {
        payload: Some(scheduler_message::Payload::Assignment(Assignment {
            assignment_id: id,
            action: Some(action),
        })),
    }
}

impl Scheduler {
    /// Sends each ready replica the addon loads and unloads that bring it to its
    /// deployment's addons (a load once until the node answers; an unload until the node
    /// reports the addon gone).
    pub(crate) fn sync_addons(&self, state: &mut State) {
        let wanted = wanted(state);
        let none = BTreeSet::new();
        let mut sends: Vec<(String, String, String, bool)> = Vec::new();
        for entry in state.replicas.values_mut() {
            if entry.state() != replica::State::Ready || entry.replica.node.is_empty() {
                continue;
            }
            let want = wanted.get(&entry.replica.deployment).unwrap_or(&none);
            let loaded: BTreeSet<&String> = entry.replica.loaded_addons.iter().collect();
            entry
                .addons_requested
                .retain(|a| want.contains(a) && !loaded.contains(a));
            for addon in want {
                if !loaded.contains(addon) && !entry.addons_requested.contains(addon) {
                    sends.push((
                        entry.replica.node.clone(),
                        entry.replica.name.clone(),
                        addon.clone(),
                        true,
                    ));
                }
            }
            for addon in loaded.iter().filter(|a| !want.contains(**a)) {
                sends.push((
                    entry.replica.node.clone(),
                    entry.replica.name.clone(),
                    (*addon).clone(),
                    false,
                ));
            }
        }
        for (node, replica, addon, load) in sends {
            let Some(sender) = state.nodes.get(&node).and_then(|n| n.sender.clone()) else {
                continue;
            };
            let sent = sender
                .try_send(Ok(addon_assignment(&replica, &addon, load)))
                .is_ok();
            if sent && load {
                tracing::info!(%replica, %addon, "addon assigned");
                if let Some(entry) = state.replicas.get_mut(&replica) {
                    entry.addons_requested.insert(addon);
                }
            }
        }
    }

    /// A node refused an addon load (`assignment_id` as [`addon_assignment`] makes it): the
    /// addon's deployed models on that deployment fail with the node's reason. False when
    /// the id is not an addon load's.
    pub(crate) async fn addon_refused(
        &self,
        state: &mut State,
        assignment_id: &str,
        status: Option<ResourceStatus>,
    ) -> Result<bool> {
        let Some((replica, addon)) = assignment_id
            .strip_prefix(LOAD_PREFIX)
            .and_then(|rest| rest.split_once('|'))
        else {
            return Ok(false);
        };
        let Some(entry) = state.replicas.get_mut(replica) else {
            return Ok(true);
        };
        entry.addons_requested.remove(addon);
        let deployment = entry.replica.deployment.clone();
        let node = entry.replica.node.clone();
        let why = status.map(|s| s.message).unwrap_or_default();
        tracing::warn!(replica, addon, %why, "addon refused by its node");
        let failing: Vec<String> = state
            .deployed_models
            .values()
            .filter(|dm| dm.deployment == deployment && dm.model == addon && is_live(dm))
            .map(|dm| dm.name.clone())
            .collect();
        for name in failing {
            let mut dm = state.deployed_models[&name].clone();
            dm.status = Some(ResourceStatus {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!("{node} cannot load {addon}: {why}"),
            });
            self.set_deployed_model_state(&mut dm, deployed_model::State::Failed)
                .await?;
            state.deployed_models.insert(name, dm);
        }
        Ok(true)
    }
}

/// Whether every ready replica of `deployment` (at least one) holds `addon`.
pub(crate) fn held_everywhere(state: &State, deployment: &str, addon: &str) -> bool {
    let mut ready = state
        .replicas
        .values()
        .filter(|r| r.replica.deployment == deployment && r.state() == replica::State::Ready)
        .peekable();
    ready.peek().is_some() && ready.all(|r| r.replica.loaded_addons.iter().any(|a| a == addon))
}
