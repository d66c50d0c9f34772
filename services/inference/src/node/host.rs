//! What the node tells the scheduler about its host: its accelerators and its name.

use kiln_proto::common::v1::AcceleratorType;
use kiln_proto::scheduler::v1::Accelerator;

use crate::config::InferenceConfig;

/// What a node offers: its configured accelerators, else its CPU.
pub(super) fn accelerators(config: &InferenceConfig) -> Vec<Accelerator> {
    if !config.accelerators.is_empty() {
        return config
            .accelerators
            .iter()
            .filter_map(|a| {
                let kind = a.parsed_kind()?;
                Some(Accelerator {
                    r#type: kind as i32,
                    count: a.count,
                    memory_bytes: if a.memory_bytes > 0 {
                        a.memory_bytes
                    } else {
                        default_memory(kind)
                    },
                })
            })
            .collect();
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    vec![Accelerator {
        r#type: AcceleratorType::Cpu as i32,
        count: cores * config.cpu_slots_per_core as i32,
        memory_bytes: default_memory(AcceleratorType::Cpu),
    }]
}

fn default_memory(kind: AcceleratorType) -> i64 {
    const GIB: i64 = 1 << 30;
    match kind {
        AcceleratorType::NvidiaA10080gb | AcceleratorType::NvidiaH10080gb => 80 * GIB,
        AcceleratorType::NvidiaH200141gb => 141 * GIB,
        AcceleratorType::AmdMi300x192gb => 192 * GIB,
        _ => host_memory().unwrap_or(16 * GIB),
    }
}

/// The host's RAM, from /proc/meminfo.
fn host_memory() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The host name as a node ID (lowercased, other characters as '-').
pub(super) fn host_node_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".into());
    let id = kiln_core::names::slugify(raw.trim(), 63);
    if id.is_empty() { "node".into() } else { id }
}
