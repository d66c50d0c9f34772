//! Each fuzz target for a bounded time (`KILN_FUZZ_SECONDS`, 2 by default; the seed of the
//! mutations from `KILN_FUZZ_SEED`, else the clock, printed so a failure can be replayed).
//! A crash names its input and writes it under the target dir; kept in the corpus it becomes
//! a regression input every run replays.

use std::path::PathBuf;
use std::time::Duration;

use kiln_fuzz::{Rng, TARGETS, fuzz};

fn run(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).expect("a target");
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    assert!(
        corpus.is_dir(),
        "{} holds the target's seeds",
        corpus.display()
    );
    let seconds: f64 = std::env::var("KILN_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let seed = std::env::var("KILN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.expect("after 1970").as_nanos() as u64
        });
    let budget = Duration::from_secs_f64(seconds);
    // A single input may take this long at most: past it, a hostile input stalls a service.
    let slow = Duration::from_secs(2);
    match fuzz(target, &corpus, budget, slow, &mut Rng::new(seed)) {
        Ok(report) => println!(
            "fuzz {name}: {} executions in {seconds} s ({} seeds, seed {seed}), slowest input {:?}",
            report.executions, report.seeds, report.slowest
        ),
        Err(crash) => {
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-crashes");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{name}-{seed}"));
            std::fs::write(&file, &crash.input).unwrap();
            let shown: String = crash
                .input
                .iter()
                .take(256)
                .map(|b| format!("{b:02x}"))
                .collect();
            panic!(
                "fuzz {name} (seed {seed}): {} on an input of {} bytes, written to {} \
                 (copy it into {} to keep it as a regression input): {shown}",
                crash.reason,
                crash.input.len(),
                file.display(),
                corpus.display()
            );
        }
    }
}

macro_rules! targets {
    ($($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                run(stringify!($name));
            }
        )+

        #[test]
        fn every_target_has_a_test() {
            let tested = [$(stringify!($name)),+];
            for target in TARGETS {
                assert!(tested.contains(&target.name), "{} has no test", target.name);
            }
        }
    };
}

targets!(
    resource_names,
    filters,
    page_tokens,
    dataset_lines,
    gguf_header,
    onnx_header,
    safetensors_header,
    peft_config,
    chat_template,
    oip_tensors,
);
