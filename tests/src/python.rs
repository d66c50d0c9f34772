//! The Python programs beside the suites (`tests/python`): independent clients and the
//! reference runs the benchmarks compare with.

use std::fmt::Display;
use std::process::Command;

/// A run of one of the programs: `Script::new("x.py").arg("--threads", 2).run()`.
pub struct Script {
    name: String,
    command: Command,
}

impl Script {
    pub fn new(name: &str) -> Self {
        Self::at(name, &format!("python/{name}"))
    }

    /// A program under examples/ (`events/usage_meter.py`).
    pub fn example(path: &str) -> Self {
        Self::at(path, &format!("../examples/{path}"))
    }

    /// `path` from tests/.
    fn at(name: &str, path: &str) -> Self {
        let mut command = Command::new("python3");
        command.arg(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")));
        Self {
            name: name.to_owned(),
            command,
        }
    }

    /// `flag value`.
    pub fn arg(mut self, flag: &str, value: impl Display) -> Self {
        self.command.arg(flag).arg(value.to_string());
        self
    }

    /// `flag` alone, when `on`.
    pub fn switch(mut self, flag: &str, on: bool) -> Self {
        if on {
            self.command.arg(flag);
        }
        self
    }

    /// Runs it and reads the JSON object it prints; on failure, what it printed.
    pub fn run(mut self) -> Result<serde_json::Value, String> {
        let out = self
            .command
            .output()
            .expect("python3 runs (tests/python/requirements*.txt installed)");
        let name = self.name;
        if !out.status.success() {
            return Err(format!(
                "{name} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let json = serde_json::from_slice(&out.stdout);
        json.map_err(|e| format!("{name} printed no JSON object: {e}"))
    }
}
