//! The fault suite: Kiln as separate processes (`kiln serve <service>`), each fault a real
//! process-level event (SIGKILL, SIGTERM, the bus going away) under traffic. After each:
//! every client got an answer or a clean error within its deadline, the ledger holds exactly
//! what the clients were told they used, and every usage event is on the stream once.

use std::path::PathBuf;

#[path = "faults/cluster.rs"]
mod cluster;
#[path = "faults/nodes.rs"]
mod nodes;
#[path = "faults/postgres.rs"]
mod postgres;
#[path = "faults/registry.rs"]
mod registry;
#[path = "faults/rotation.rs"]
mod rotation;
#[path = "faults/stream.rs"]
mod stream;
#[path = "faults/tls.rs"]
mod tls;
#[path = "faults/traffic.rs"]
mod traffic;
#[path = "faults/usage.rs"]
mod usage;

fn kiln_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Runs `command`, which must succeed (its stderr in the failure).
fn run_ok(command: &mut std::process::Command) {
    let ran = kiln_tests::Ran::from(command.output().expect("the command runs"));
    assert!(ran.ok, "{command:?}: {}", ran.err);
}
