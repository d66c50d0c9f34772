//! Where a pending fine-tuning job trains (pure): a ready node that runs no other job and
//! whose trainer takes the job's accelerator type; for a GPU job, one with `accelerator_count`
//! devices of that type left free by replicas and other jobs (best fit, as replicas are
//! placed), for a CPU job any such node.

use std::collections::HashSet;

use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::scheduler::v1::SupervisedFineTuningJob;

use crate::placement::{Need, place};
use crate::replicas::capacities;
use crate::state::{NodeEntry, State};

/// The node and the device indices `job` goes to, if one can take it now.
pub(super) fn place_job(
    job: &SupervisedFineTuningJob,
    state: &State,
) -> Option<(String, Vec<i32>)> {
    let kind = job.accelerator_type;
    let busy: HashSet<&str> = state
        .jobs
        .values()
        .filter(|j| super::on_a_node(j.state) && j.name != job.name)
        .map(|j| j.node.as_str())
        .collect();
    let takes = |n: &NodeEntry| {
        n.is_ready()
            && n.node.training_enabled
            && !busy.contains(n.node.name.as_str())
            && n.node.training_accelerators.contains(&kind)
    };
    if kind == AcceleratorType::Cpu as i32 {
        return state
            .nodes
            .values()
            .find(|n| takes(n))
            .map(|n| (n.node.name.clone(), Vec::new()));
    }
    let mut nodes: Vec<_> = capacities(state)
        .into_iter()
        .filter(|c| state.nodes.get(&c.name).is_some_and(takes))
        .collect();
    let need = Need {
        kind,
        count: job.accelerator_count.max(1) as usize,
        model_bytes: 0,
    };
    let placed = place(&mut nodes, &[need]).pop().flatten()?;
    Some((nodes[placed.node].name.clone(), placed.indices))
}

/// Why `job` is still PENDING when [`place_job`] finds no node.
pub(super) fn why_waiting(job: &SupervisedFineTuningJob) -> String {
    match AcceleratorType::try_from(job.accelerator_type) {
        Ok(kind) if kind != AcceleratorType::Cpu => format!(
            "waiting for a node whose trainer takes {} with {} of them free",
            kind.as_str_name(),
            job.accelerator_count.max(1)
        ),
        _ => "waiting for a node that trains and runs no other job".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{CPU, H100, node, replica, state};
    use kiln_proto::scheduler::v1::node::State as NodeState;
    use kiln_proto::scheduler::v1::replica::State as ReplicaState;
    use kiln_proto::scheduler::v1::supervised_fine_tuning_job::JobState;

    fn trainer(id: &str, gpus: i32, kinds: &[i32]) -> NodeEntry {
        let mut n = node(id, NodeState::Ready, gpus);
        n.node.training_enabled = true;
        n.node.training_accelerators = kinds.to_vec();
        n
    }

    fn job(name: &str, kind: i32, count: i32) -> SupervisedFineTuningJob {
        SupervisedFineTuningJob {
            name: format!("accounts/acme/supervisedFineTuningJobs/{name}"),
            state: JobState::Pending as i32,
            accelerator_type: kind,
            accelerator_count: count,
            ..Default::default()
        }
    }

    #[test]
    fn a_gpu_job_goes_where_its_devices_are_free_and_its_trainer_takes_them() {
        // cpu-only trains on CPU only; gpu has 4 H100s, two taken by replicas.
        let mut s = state(
            vec![],
            vec![
                trainer("cpu-only", 4, &[CPU]),
                trainer("gpu", 4, &[CPU, H100]),
            ],
            vec![
                replica("d", "r0", "gpu", ReplicaState::Ready, 0),
                replica("d", "r1", "gpu", ReplicaState::Ready, 2),
            ],
        );
        let two = job("two", H100, 2);
        assert_eq!(place_job(&two, &s), Some(("nodes/gpu".into(), vec![1, 3])));
        assert_eq!(place_job(&job("three", H100, 3), &s), None);
        // A CPU job takes any node that trains.
        let cpu = job("cpu", CPU, 0);
        assert!(place_job(&cpu, &s).is_some());

        // Running, the job's devices are taken: from replicas too.
        let mut running = two.clone();
        running.state = JobState::Running as i32;
        running.node = "nodes/gpu".into();
        running.accelerator_indices = vec![1, 3];
        s.jobs.insert(running.name.clone(), running);
        let mut gpu: Vec<_> = capacities(&s)
            .into_iter()
            .filter(|c| c.name == "nodes/gpu")
            .collect();
        let one = Need {
            kind: H100,
            count: 1,
            model_bytes: 0,
        };
        assert_eq!(place(&mut gpu, &[one]), vec![None], "all four are taken");
        // And the node runs one job at a time: a CPU job goes elsewhere.
        assert_eq!(place_job(&cpu, &s), Some(("nodes/cpu-only".into(), vec![])));
        assert_eq!(place_job(&job("one", H100, 1), &s), None);
    }
}
