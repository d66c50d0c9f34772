//! Placement: which node each waiting replica goes to. Pure (no I/O, no clock), so one pass
//! over thousands of replicas and nodes can be measured on its own (`cargo bench -p
//! kiln-tests --bench scheduling`).
//!
//! A replica needs `count` devices of one accelerator type on one node, and the memory to hold
//! its model: on a GPU the devices' memory together; on CPU nodes (where "devices" are core
//! slots) a share of the node's RAM pool. Among the nodes where it fits, the one with the
//! fewest free devices left wins (best fit), so large replicas still find whole nodes later.
//! Replicas needing more devices go first within a pass (first-fit decreasing).

use kiln_proto::common::v1::AcceleratorType;

/// One accelerator type on one node: which devices are free, and their memory.
#[derive(Debug, Clone)]
pub struct DeviceGroup {
    kind: i32,
    /// Per device index: whether it is free.
    free: Vec<bool>,
    /// Memory per device (GPUs); for CPU, the RAM pool left for replicas.
    memory_bytes: i64,
}

impl DeviceGroup {
    pub fn new(kind: i32, count: usize, memory_bytes: i64) -> Self {
        Self {
            kind,
            free: vec![true; count],
            memory_bytes,
        }
    }

    fn free_count(&self) -> usize {
        self.free.iter().filter(|f| **f).count()
    }

    fn is_cpu(&self) -> bool {
        self.kind == AcceleratorType::Cpu as i32
    }

    /// Whether a replica needing `count` devices and `model_bytes` of memory fits now.
    fn fits(&self, count: usize, model_bytes: i64) -> bool {
        if self.free_count() < count {
            return false;
        }
        if self.is_cpu() {
            self.memory_bytes >= model_bytes
        } else {
            self.memory_bytes.saturating_mul(count as i64) >= model_bytes
        }
    }

    /// Takes `count` devices (the lowest free indices) and the memory, if they fit.
    fn take(&mut self, count: usize, model_bytes: i64) -> Option<Vec<i32>> {
        if !self.fits(count, model_bytes) {
            return None;
        }
        let mut taken = Vec::with_capacity(count);
        for (index, free) in self.free.iter_mut().enumerate() {
            if taken.len() == count {
                break;
            }
            if *free {
                *free = false;
                taken.push(index as i32);
            }
        }
        if self.is_cpu() {
            self.memory_bytes -= model_bytes;
        }
        Some(taken)
    }

    /// Marks devices as used by a replica that already runs (adopted, or placed earlier).
    pub(crate) fn occupy(&mut self, indices: &[i32], model_bytes: i64) {
        for index in indices {
            if let Some(free) = self.free.get_mut(*index as usize) {
                *free = false;
            }
        }
        if self.is_cpu() {
            self.memory_bytes -= model_bytes;
        }
    }
}

/// A node that takes new replicas, with what is free on it.
#[derive(Debug, Clone)]
pub struct NodeCapacity {
    /// nodes/{node}
    pub name: String,
    pub groups: Vec<DeviceGroup>,
}

impl NodeCapacity {
    pub(crate) fn group_mut(&mut self, kind: i32) -> Option<&mut DeviceGroup> {
        self.groups.iter_mut().find(|g| g.kind == kind)
    }

    fn group(&self, kind: i32) -> Option<&DeviceGroup> {
        self.groups.iter().find(|g| g.kind == kind)
    }
}

/// What one replica needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub kind: i32,
    pub count: usize,
    pub model_bytes: i64,
}

/// Where a replica went: the node's index in the slice, and the device indices it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub node: usize,
    pub indices: Vec<i32>,
}

/// Places each need on `nodes` (taking their capacity as it goes). `None`: nothing fits now;
/// [`why_unplaced`] tells what is missing.
pub fn place(nodes: &mut [NodeCapacity], needs: &[Need]) -> Vec<Option<Placed>> {
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by(|a, b| needs[*b].count.cmp(&needs[*a].count));
    // Nodes by accelerator type, so a need looks only at nodes that have its kind.
    let mut by_kind: std::collections::HashMap<i32, Vec<usize>> = Default::default();
    for (index, node) in nodes.iter().enumerate() {
        for group in &node.groups {
            by_kind.entry(group.kind).or_default().push(index);
        }
    }
    let mut placed = vec![None; needs.len()];
    for index in order {
        let need = needs[index];
        let Some(candidates) = by_kind.get(&need.kind) else {
            continue;
        };
        let mut best: Option<(usize, usize)> = None;
        for &node in candidates {
            let Some(group) = nodes[node].group(need.kind) else {
                continue;
            };
            if !group.fits(need.count, need.model_bytes) {
                continue;
            }
            let left = group.free_count() - need.count;
            if best.is_none_or(|(_, best_left)| left < best_left) {
                best = Some((node, left));
                if left == 0 {
                    break;
                }
            }
        }
        if let Some((node, _)) = best {
            let indices = nodes[node]
                .group_mut(need.kind)
                .and_then(|g| g.take(need.count, need.model_bytes))
                .expect("checked to fit");
            placed[index] = Some(Placed { node, indices });
        }
    }
    placed
}

/// Why `need` fits on none of `nodes`, in words an operator can act on.
pub(crate) fn why_unplaced(nodes: &[NodeCapacity], need: &Need) -> String {
    let kind = kind_name(need.kind);
    let wanted = format!(
        "needs {} × {kind}{} on one node",
        need.count,
        if need.model_bytes > 0 {
            format!(" and {} for the model", gib(need.model_bytes))
        } else {
            String::new()
        }
    );
    if nodes.is_empty() {
        return format!("waiting for capacity: {wanted}; no node is connected");
    }
    let mut seen = Vec::new();
    for node in nodes.iter().take(6) {
        let line = match node.group(need.kind) {
            None => format!("{} has no {kind}", node.name),
            Some(group) if group.free.len() < need.count => {
                format!("{} has only {} {kind}", node.name, group.free.len())
            }
            Some(group) if group.free_count() < need.count => format!(
                "{} has {} of {} {kind} free",
                node.name,
                group.free_count(),
                group.free.len()
            ),
            Some(group) if group.is_cpu() => format!(
                "{} has {} of memory free",
                node.name,
                gib(group.memory_bytes)
            ),
            Some(group) => format!("{} has {} per device", node.name, gib(group.memory_bytes)),
        };
        seen.push(line);
    }
    if nodes.len() > 6 {
        seen.push(format!("{} more nodes", nodes.len() - 6));
    }
    format!("waiting for capacity: {wanted}; {}", seen.join("; "))
}

fn kind_name(kind: i32) -> &'static str {
    AcceleratorType::try_from(kind)
        .map(|k| k.as_str_name())
        .unwrap_or("ACCELERATOR_TYPE_UNSPECIFIED")
}

fn gib(bytes: i64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: i32 = AcceleratorType::NvidiaH10080gb as i32;
    const A100: i32 = AcceleratorType::NvidiaA10080gb as i32;
    const CPU: i32 = AcceleratorType::Cpu as i32;
    const GB80: i64 = 80 << 30;

    fn node(name: &str, groups: &[(i32, usize, i64)]) -> NodeCapacity {
        NodeCapacity {
            name: format!("nodes/{name}"),
            groups: groups
                .iter()
                .map(|(k, c, m)| DeviceGroup::new(*k, *c, *m))
                .collect(),
        }
    }

    fn need(kind: i32, count: usize) -> Need {
        Need {
            kind,
            count,
            model_bytes: 1 << 30,
        }
    }

    #[test]
    fn a_replica_lands_only_where_its_devices_fit() {
        let mut nodes = vec![
            node("a", &[(H100, 1, GB80)]),
            node("b", &[(A100, 4, GB80)]),
            node("c", &[(H100, 4, GB80)]),
        ];
        let placed = place(&mut nodes, &[need(H100, 2), need(H100, 2), need(H100, 2)]);
        assert_eq!(
            placed[0],
            Some(Placed {
                node: 2,
                indices: vec![0, 1]
            })
        );
        assert_eq!(
            placed[1],
            Some(Placed {
                node: 2,
                indices: vec![2, 3]
            })
        );
        assert_eq!(placed[2], None);
        let why = why_unplaced(&nodes, &need(H100, 2));
        assert!(why.contains("needs 2 × NVIDIA_H100_80GB"), "{why}");
        assert!(why.contains("nodes/a has only 1 NVIDIA_H100_80GB"), "{why}");
        assert!(why.contains("nodes/b has no NVIDIA_H100_80GB"), "{why}");
        assert!(
            why.contains("nodes/c has 0 of 4 NVIDIA_H100_80GB free"),
            "{why}"
        );
    }

    #[test]
    fn best_fit_keeps_whole_nodes_for_large_replicas() {
        let mut nodes = vec![
            node("big", &[(H100, 8, GB80)]),
            node("small", &[(H100, 2, GB80)]),
        ];
        // One device goes to the node it fills most; the 8-device replica then still fits.
        let placed = place(&mut nodes, &[need(H100, 1), need(H100, 8)]);
        assert_eq!(placed[0].as_ref().map(|p| p.node), Some(1));
        assert_eq!(placed[1].as_ref().map(|p| p.node), Some(0));
    }

    #[test]
    fn memory_limits_placement() {
        let mut nodes = vec![
            node("gpu", &[(H100, 4, GB80)]),
            node("cpu", &[(CPU, 8, 4 << 30)]),
        ];
        let huge = Need {
            kind: H100,
            count: 1,
            model_bytes: 100 << 30,
        };
        assert_eq!(place(&mut nodes, &[huge])[0], None);
        assert!(why_unplaced(&nodes, &huge).contains("80.0 GiB per device"));
        let two = Need { count: 2, ..huge };
        assert!(place(&mut nodes, &[two])[0].is_some());
        // CPU replicas share the node's RAM pool: the third 1.5 GiB replica does not fit in 4.
        let cpu = Need {
            kind: CPU,
            count: 1,
            model_bytes: 3 << 29,
        };
        let placed = place(&mut nodes, &[cpu, cpu, cpu]);
        assert!(placed[0].is_some() && placed[1].is_some());
        assert_eq!(placed[2], None);
    }

    #[test]
    fn without_nodes_nothing_is_placed_and_the_reason_says_so() {
        let placed = place(&mut [], &[need(H100, 1), need(CPU, 1)]);
        assert_eq!(placed, vec![None, None]);
        assert_eq!(
            why_unplaced(&[], &need(H100, 2)),
            "waiting for capacity: needs 2 × NVIDIA_H100_80GB and 1.0 GiB for the model on one node; \
             no node is connected"
        );
    }

    #[test]
    fn memory_that_fits_exactly_is_enough() {
        // On a GPU the devices' memory together: two 80 GiB devices hold 160 GiB, not a byte more.
        let exact = Need {
            kind: H100,
            count: 2,
            model_bytes: 2 * GB80,
        };
        let over = Need {
            model_bytes: 2 * GB80 + 1,
            ..exact
        };
        let gpu = || vec![node("gpu", &[(H100, 2, GB80)])];
        assert!(place(&mut gpu(), &[exact])[0].is_some());
        assert_eq!(place(&mut gpu(), &[over])[0], None);
        // On CPU one pool, used up exactly by two replicas.
        let half = Need {
            kind: CPU,
            count: 1,
            model_bytes: 2 << 30,
        };
        let mut cpu = vec![node("cpu", &[(CPU, 4, 4 << 30)])];
        let placed = place(&mut cpu, &[half, half, half]);
        assert!(placed[0].is_some() && placed[1].is_some());
        assert_eq!(placed[2], None);
        assert!(why_unplaced(&cpu, &half).contains("nodes/cpu has 0.0 GiB of memory free"));
    }

    #[test]
    fn a_replica_goes_only_to_devices_of_its_kind() {
        let mut nodes = vec![
            node("gpu", &[(H100, 2, GB80)]),
            node("cpu", &[(CPU, 2, 16 << 30)]),
            node("both", &[(A100, 1, GB80), (CPU, 1, 8 << 30)]),
        ];
        let placed = place(&mut nodes, &[need(CPU, 2), need(A100, 1), need(CPU, 1)]);
        let at = |i: usize| placed[i].as_ref().map(|p| nodes[p.node].name.as_str());
        assert_eq!(at(0), Some("nodes/cpu"));
        assert_eq!(at(1), Some("nodes/both"));
        assert_eq!(at(2), Some("nodes/both"));
        // No node has H200s, and no device is of an unspecified kind.
        let h200 = AcceleratorType::NvidiaH200141gb as i32;
        assert_eq!(
            place(&mut nodes, &[need(h200, 1), need(0, 1)]),
            vec![None, None]
        );
        let why = why_unplaced(&nodes, &need(h200, 1));
        assert!(why.contains("nodes/gpu has no NVIDIA_H200_141GB"), "{why}");
        assert!(
            why_unplaced(&nodes, &need(0, 1)).contains("needs 1 × ACCELERATOR_TYPE_UNSPECIFIED"),
        );
    }

    #[test]
    fn larger_replicas_are_placed_first_and_answers_keep_the_asked_order() {
        // Asked small first, in asking order the two 1-device replicas would fill a, each
        // 2-device one would split b, and the last would not fit: largest first, all fit.
        let mut nodes = vec![node("a", &[(H100, 3, GB80)]), node("b", &[(H100, 3, GB80)])];
        let placed = place(
            &mut nodes,
            &[need(H100, 1), need(H100, 1), need(H100, 2), need(H100, 2)],
        );
        let at = |i: usize| placed[i].as_ref().map(|p| (p.node, p.indices.clone()));
        assert_eq!(at(2), Some((0, vec![0, 1])));
        assert_eq!(at(3), Some((1, vec![0, 1])));
        assert_eq!(at(0), Some((0, vec![2])));
        assert_eq!(at(1), Some((1, vec![2])));
    }

    #[test]
    fn devices_in_use_are_not_placed_on_again() {
        let mut nodes = vec![node("a", &[(H100, 4, GB80)])];
        nodes[0]
            .group_mut(H100)
            .expect("H100s")
            .occupy(&[0, 2, 9], 0);
        let placed = place(&mut nodes, &[need(H100, 2)]);
        assert_eq!(
            placed[0].as_ref().map(|p| p.indices.clone()),
            Some(vec![1, 3])
        );
    }

    #[test]
    fn the_reason_lists_six_nodes_and_counts_the_rest() {
        let nodes: Vec<NodeCapacity> = (0..9)
            .map(|i| node(&format!("n{i}"), &[(H100, 1, GB80)]))
            .collect();
        let unplaced = Need {
            kind: H100,
            count: 2,
            model_bytes: 0,
        };
        let why = why_unplaced(&nodes, &unplaced);
        assert!(
            why.starts_with("waiting for capacity: needs 2 × NVIDIA_H100_80GB on one node; "),
            "{why}"
        );
        assert!(why.contains("nodes/n5 has only 1"), "{why}");
        assert!(!why.contains("nodes/n6"), "{why}");
        assert!(why.ends_with("; 3 more nodes"), "{why}");
    }
}
