//! Load against `kiln dev` as a user runs it (the binary, its own process): 200 concurrent
//! streaming chats on SmolLM2 for 60 s while 32 uploads of 16 MiB run at once. Every call
//! must end with its answer or a refusal by design (RESOURCE_EXHAUSTED), none may wait past
//! its deadline, and the server's memory must stay bounded: its peak RSS is reported.
//!
//! `cargo build --release -p kiln && cargo run --release -p kiln-tests --example load --
//! [streams] [seconds] [uploads]` (the `kiln` binary is looked for beside the example, or at
//! `$KILN_BINARY`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln_proto::registry::v1::model::Kind;
use kiln_tests::bench::{Args, block_on, cores, ms, percentile};
use kiln_tests::inference::client;
use kiln_tests::llm::{chat_request, first_chat, smollm2_asset_dir};
use kiln_tests::registry::{create_model, file_messages, upload_messages};
use kiln_tests::{channel_to, free_port, wait_for};

/// A call past this is hung.
const DEADLINE: Duration = Duration::from_secs(120);

fn kiln_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KILN_BINARY") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("this example's path");
    let beside = exe
        .parent()
        .and_then(|examples| examples.parent())
        .map(|d| d.join("kiln"));
    beside
        .filter(|p| p.is_file())
        .expect("the kiln binary: `cargo build --release -p kiln` first, or set KILN_BINARY")
}

/// The server's resident memory now and at its peak (kB), from /proc.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Seen {
    streams: u64,
    tokens: u64,
    ttft: Vec<Duration>,
    refused: BTreeMap<String, u64>,
    failed: BTreeMap<String, u64>,
}

fn main() {
    let args = Args::from_env();
    let (streams, seconds, uploads): (usize, u64, usize) =
        (args.get(0, 200), args.get(1, 60), args.get(2, 32));
    block_on(None, run(streams, seconds, uploads));
}

async fn run(streams: usize, seconds: u64, uploads: usize) {
    let assets = smollm2_asset_dir();
    let data = tempfile::tempdir().expect("a data dir");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = tokio::process::Command::new(kiln_binary())
        .args([
            "dev",
            "--listen",
            &listen,
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .env("KILN_REGISTRY__ASSET_DIR", assets.path())
        .env_remove("KILN_DATABASE_URL")
        .env_remove("KILN_NATS_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kiln dev starts");
    let pid = server.id().expect("running");
    let key_file = data.path().join("admin.key");
    let key = wait_for(Duration::from_secs(60), "the admin key", || async {
        let key = std::fs::read_to_string(&key_file).ok()?;
        key.ends_with('\n').then(|| key.trim().to_owned())
    })
    .await;
    let url = format!("http://{listen}");
    let admin = channel_to(&url, Some(&key)).await;
    first_chat(&admin, "Hi", 4, Duration::from_secs(600)).await;
    let acme_key = kiln_tests::tenant(&admin, "acme").await;
    let acme = channel_to(&url, Some(&acme_key)).await;
    let (rss_idle, _) = memory_kb(pid);
    println!(
        "load: {streams} streaming chats for {seconds} s and {uploads} uploads of 16 MiB, \
         against kiln dev ({} cores); its RSS when idle {} MiB",
        cores(),
        rss_idle / 1024
    );

    let seen = Arc::new(Mutex::new(Seen::default()));
    let until = Instant::now() + Duration::from_secs(seconds);
    let chats: Vec<_> = (0..streams)
        .map(|i| {
            let (ch, seen) = (acme.clone(), seen.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let question = format!("Say something about the number {i}.");
                    let started = Instant::now();
                    let opened = tokio::time::timeout(
                        DEADLINE,
                        client(&ch).stream_chat_completion(chat_request(&question, 24)),
                    )
                    .await
                    .expect("a stream opened within its deadline");
                    let mut chunks = match opened {
                        Ok(s) => s.into_inner(),
                        Err(status) => {
                            note(&seen, status.code());
                            continue;
                        }
                    };
                    let mut first = None;
                    let mut tokens = 0;
                    loop {
                        let next = tokio::time::timeout(DEADLINE, chunks.next()).await;
                        match next.expect("a stream hung past its deadline") {
                            Some(Ok(chunk)) => {
                                if let Some(usage) = chunk.usage {
                                    tokens = usage.completion_tokens;
                                }
                                first.get_or_insert_with(|| started.elapsed());
                            }
                            Some(Err(status)) => {
                                note(&seen, status.code());
                                break;
                            }
                            None => {
                                let mut s = seen.lock().unwrap();
                                s.streams += 1;
                                s.tokens += tokens.max(0) as u64;
                                s.ttft.extend(first);
                                break;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    let upload_start = Instant::now();
    let sent: Vec<_> = (0..uploads)
        .map(|i| {
            let ch = acme.clone();
            tokio::spawn(async move {
                let model =
                    create_model(&ch, "acme", &format!("blob-{i}"), Kind::TensorModel, None).await;
                let bytes: Vec<u8> = (0..16u32 << 20)
                    .map(|j| (j.wrapping_mul(2_654_435_761) >> (13 + i % 7)) as u8)
                    .collect();
                let messages = file_messages(&model.name, &[("model.onnx", &bytes)], 0, None);
                let done = tokio::time::timeout(DEADLINE, upload_messages(&ch, messages))
                    .await
                    .expect("an upload hung past its deadline")
                    .expect("an upload");
                assert!(done.files[0].complete, "upload {i} complete");
            })
        })
        .collect();
    let mut peak_sampled = 0;
    let sampler = async {
        while Instant::now() < until {
            peak_sampled = peak_sampled.max(memory_kb(pid).0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let uploaded = async {
        for upload in sent {
            upload.await.expect("an upload task");
        }
        upload_start.elapsed()
    };
    let (_, upload_time) = tokio::join!(sampler, uploaded);
    for chat in chats {
        chat.await.expect("a chat task (a hung call panics it)");
    }
    let (rss_end, rss_peak) = memory_kb(pid);
    let mut s = std::mem::take(&mut *seen.lock().unwrap());
    let ttft = &mut s.ttft;
    let (p50, p99) = if ttft.is_empty() {
        (0.0, 0.0)
    } else {
        (ms(percentile(ttft, 0.5)), ms(percentile(ttft, 0.99)))
    };
    println!(
        "chats: {} streams answered, {} tokens ({:.1} tok/s), TTFT p50 {p50:.0} ms p99 {p99:.0} ms; refused {:?}; failed {:?}",
        s.streams,
        s.tokens,
        s.tokens as f64 / seconds as f64,
        s.refused,
        s.failed
    );
    println!(
        "uploads: {uploads} × 16 MiB in {:.1} s ({:.0} MiB/s)",
        upload_time.as_secs_f64(),
        (uploads * 16) as f64 / upload_time.as_secs_f64()
    );
    println!(
        "kiln dev memory: RSS idle {} MiB, peak {} MiB (sampled peak {} MiB), after {} MiB",
        rss_idle / 1024,
        rss_peak / 1024,
        peak_sampled / 1024,
        rss_end / 1024
    );
    assert!(
        s.failed.is_empty(),
        "calls failed other than by design: {:?}",
        s.failed
    );
    drop(s);
    let _ = server.kill().await;
}

/// A refusal by design (RESOURCE_EXHAUSTED) or a failure.
fn note(seen: &Mutex<Seen>, code: tonic::Code) {
    let mut s = seen.lock().unwrap();
    let bucket = if code == tonic::Code::ResourceExhausted {
        &mut s.refused
    } else {
        &mut s.failed
    };
    *bucket.entry(format!("{code:?}")).or_default() += 1;
}
