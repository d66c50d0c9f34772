//! Fuzz targets: each takes arbitrary bytes to a parser of what a caller or an uploaded file
//! controls, and must answer (an error is fine) without a panic, an abort or a hang. The
//! targets are libFuzzer-shaped (`fn(&[u8])`), so `cargo fuzz` can drive them as they are;
//! [`fuzz`] drives them on stable: the seeds of `tests/fuzz/corpus/<target>/` first (found
//! crashes are kept there as regression inputs), then mutations of them for a time budget.

mod mutate;

use std::io::Cursor;
use std::path::Path;
use std::time::{Duration, Instant};

use kiln_core::names;
use kiln_core::page::{PageTokens, parse_filter, parse_order_by};
use kiln_formats::DatasetFormat;

pub use mutate::Rng;

/// A fuzz target: its name (and corpus folder), the function, and tokens worth splicing in.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub dictionary: &'static [&'static [u8]],
}

const JSON: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"null",
    b"true",
    b"1e999",
    b"-0",
    b"\\u0000",
    b"\\ud800",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"[[[[[[[[[[",
];

pub const TARGETS: &[Target] = &[
    Target {
        name: "resource_names",
        run: resource_names,
        dictionary: &[
            b"accounts/",
            b"/models/",
            b"/users/",
            b"/apiKeys/",
            b"/",
            b"-",
            b"\0",
            b"\xe2\x80\xae",
        ],
    },
    Target {
        name: "filters",
        run: filters,
        dictionary: &[
            b" AND ", b" OR ", b"=", b"!=", b"<", b">=", b"\"", b"(", b")", b"desc", b",", b"\\",
        ],
    },
    Target {
        name: "page_tokens",
        run: page_tokens,
        dictionary: &[b"A", b"_", b"-", b"=", b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"],
    },
    Target {
        name: "dataset_lines",
        run: dataset_lines,
        dictionary: JSON,
    },
    Target {
        name: "gguf_header",
        run: gguf_header,
        dictionary: &[
            b"GGUF",
            b"\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x00\x00\x00\x00\x01\x00\x00\x00",
            b"\x09\x00\x00\x00",
        ],
    },
    Target {
        name: "onnx_header",
        run: onnx_header,
        dictionary: &[
            b"\x0a",
            b"\x3a",
            b"\xff\xff\xff\xff\x0f",
            b"input_ids",
            b"batch",
        ],
    },
    Target {
        name: "safetensors_header",
        run: safetensors_header,
        dictionary: JSON,
    },
    Target {
        name: "peft_config",
        run: peft_config,
        dictionary: JSON,
    },
    Target {
        name: "chat_template",
        run: kiln_inference::fuzzing::chat_template,
        dictionary: &[
            b"{{",
            b"}}",
            b"{%",
            b"%}",
            b" for x in ",
            b"range(",
            b"loop",
            b"messages",
            b"|join",
            b"raise_exception(",
            b"\0",
            b"\n",
        ],
    },
    Target {
        name: "oip_tensors",
        run: kiln_inference::fuzzing::oip_request,
        dictionary: &[
            b"INT64",
            b"FP32",
            b"BYTES",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
            b"\x80\x80\x80\x80\x10",
        ],
    },
];

fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

fn resource_names(data: &[u8]) {
    let name = text(data);
    let _ = names::AccountName::parse("name", &name);
    let _ = names::ChildName::parse("name", "models", &name, None);
    let _ = names::ChildName::parse("name", "deployments", &name, Some("acme"));
    let _ = names::parse_user_name("name", &name);
    let _ = names::ApiKeyName::parse("name", &name);
    let _ = names::validate_id("id", &name);
    let _ = names::validate_display_name("display_name", &name);
    let _ = names::validate_text("description", &name);
    let _ = names::slugify(&name, 63);
}

fn filters(data: &[u8]) {
    let text = text(data);
    let (filter, order_by) = text.split_once('\n').unwrap_or((&text, ""));
    let fields = ["state", "display_name", "create_time", "kind"];
    let _ = parse_filter(filter, &fields);
    let _ = parse_order_by(order_by, &fields);
}

fn page_tokens(data: &[u8]) {
    let tokens = PageTokens::new(b"fuzz-secret");
    let _ = tokens.decode("accounts/acme/models", &text(data));
}

fn dataset_lines(data: &[u8]) {
    for expected in [
        None,
        Some(DatasetFormat::Chat),
        Some(DatasetFormat::Completion),
    ] {
        let _ = kiln_formats::validate_jsonl("data.jsonl", Cursor::new(data), expected);
    }
}

fn gguf_header(data: &[u8]) {
    let _ = kiln_formats::read_gguf("model.gguf", Cursor::new(data));
}

fn onnx_header(data: &[u8]) {
    if let Ok(info) = kiln_formats::read_onnx("model.onnx", data) {
        use kiln_formats::Task;
        for task in [Task::Embedding, Task::TextGeneration, Task::Tensor] {
            let _ = kiln_formats::check_task("model.onnx", &info, task);
        }
    }
}

fn safetensors_header(data: &[u8]) {
    let _ = kiln_formats::read_safetensors_header("adapter_model.safetensors", data);
}

fn peft_config(data: &[u8]) {
    let _ = kiln_formats::read_adapter_config("adapter_config.json", data);
}

/// Runs `name`'s target on `data` (the entry `cargo fuzz` targets call).
pub fn run_target(name: &str, data: &[u8]) {
    let target = TARGETS.iter().find(|t| t.name == name);
    (target
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
        .run)(data)
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub seeds: usize,
    pub executions: u64,
    /// The slowest single input, and how long it took.
    pub slowest: Duration,
}

/// An input that made the target panic (or take longer than `slow` allows).
#[derive(Debug)]
pub struct Crash {
    pub input: Vec<u8>,
    pub reason: String,
}

/// Runs `target` on every seed of `corpus`, then on mutations of them until `budget` is
/// spent; stops at the first input that panics or takes longer than `slow`.
pub fn fuzz(
    target: &Target,
    corpus: &Path,
    budget: Duration,
    slow: Duration,
    rng: &mut Rng,
) -> Result<Report, Crash> {
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus)
        .map(|dir| {
            dir.filter_map(|e| std::fs::read(e.ok()?.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    seeds.sort();
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    let mut report = Report {
        seeds: seeds.len(),
        ..Default::default()
    };
    // A panic is caught and reported with its input; the default hook would print each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = (|| {
        for seed in &seeds {
            try_one(target, seed, slow, &mut report)?;
        }
        let start = Instant::now();
        while start.elapsed() < budget {
            let input = rng.mutate(&seeds, target.dictionary);
            try_one(target, &input, slow, &mut report)?;
        }
        Ok(())
    })();
    std::panic::set_hook(hook);
    outcome.map(|()| report)
}

fn try_one(
    target: &Target,
    input: &[u8],
    slow: Duration,
    report: &mut Report,
) -> Result<(), Crash> {
    let start = Instant::now();
    let ran = std::panic::catch_unwind(|| (target.run)(input));
    let took = start.elapsed();
    report.executions += 1;
    report.slowest = report.slowest.max(took);
    let reason = match ran {
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .map(|m| format!("panicked: {m}"))
            .unwrap_or_else(|| "panicked".to_owned()),
        Ok(()) if took > slow => format!("took {took:?} (more than {slow:?})"),
        Ok(()) => return Ok(()),
    };
    Err(Crash {
        input: input.to_vec(),
        reason,
    })
}
