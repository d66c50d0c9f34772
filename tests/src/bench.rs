//! What the benchmarks share: their arguments, the runtime, closed-loop throughput, timed
//! blocks of calls, clients in a process of their own, medians and percentiles.

use std::future::Future;
use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The positional arguments of `cargo bench --bench NAME -- ARGS` (cargo's own flags, which
/// begin with `-`, left out).
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Self {
        Self(
            std::env::args()
                .skip(1)
                .filter(|a| !a.starts_with('-'))
                .collect(),
        )
    }

    /// The `i`-th argument, or `default` when it is missing or does not parse.
    pub fn get<T: FromStr>(&self, i: usize, default: T) -> T {
        self.0
            .get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(default)
    }
}

/// Runs `main` to completion on a multi-threaded runtime (`worker_threads`: the runtime's
/// default when None), as a task on its workers like any client of a tokio program: the
/// thread that calls `block_on` is not one of them, so each answer would otherwise cost a
/// wake-up across threads that no real client pays (~60 µs of a 0.26 ms empty gRPC call on a
/// 2-core VM).
pub fn block_on<F>(worker_threads: Option<usize>, main: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send,
{
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads);
    }
    builder.enable_all();
    builder.on_thread_start(|| {
        if let Some(tid) = this_thread_id() {
            lock(&RUNTIME_THREADS).push(tid);
        }
    });
    let runtime = builder.build().expect("runtime");
    runtime
        .block_on(runtime.spawn(main))
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

/// The cores this machine offers (0 when unknown), for the header of a report.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Runs `call` from `concurrency` tasks for `seconds` (after a one-second warm-up) and
/// returns completed calls per second.
pub async fn measure<F, Fut>(seconds: u64, concurrency: usize, call: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let warmup = Instant::now() + Duration::from_secs(1);
    let end = warmup + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let call = call.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                call().await;
                if now >= warmup {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / seconds as f64
}

/// Times `warm + count` calls of `call` one after another, and adds the last `count`
/// durations to `samples` (the first calls of a block warm it up).
pub async fn timed_block<F, Fut>(
    samples: &mut Vec<Duration>,
    warm: usize,
    count: usize,
    mut call: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for i in 0..warm + count {
        let started = Instant::now();
        call().await;
        if i >= warm {
            samples.push(started.elapsed());
        }
    }
}

/// The value at fraction `p` (0 to 1) of the sorted samples, to the nearest rank.
pub fn percentile<T: PartialOrd + Copy>(samples: &mut [T], p: f64) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("comparable samples"));
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// The upper median: the middle sample, or the higher of the two middle ones.
pub fn median<T: PartialOrd + Copy>(samples: &mut [T]) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("comparable samples"));
    samples[samples.len() / 2]
}

/// A duration in milliseconds.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Set in a benchmark's own binary, run again as a [`ClientProcess`]: the mesh's URL, then a
/// space, then the key to send.
const CLIENT_ENV: &str = "KILN_BENCH_CLIENT";

/// A gRPC client in a process of its own, as the platform's users' clients are (a client task
/// on the server's own runtime shares its workers, wakes and cores, which no deployment does):
/// the benchmark's binary run again with [`CLIENT_ENV`] set, taking one command a line on its
/// stdin and answering each with one line (see [`serve_client_commands`]).
pub struct ClientProcess {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    answers: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl ClientProcess {
    /// Starts the client of the mesh at `url`, sending `key`.
    pub fn spawn(url: &str, key: &str) -> Self {
        let mut child = tokio::process::Command::new(std::env::current_exe().expect("own binary"))
            .env(CLIENT_ENV, format!("{url} {key}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the client process");
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let answers = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        Self {
            child,
            stdin,
            answers,
        }
    }

    /// Sends `command` and waits for its answer (off the runtime's workers: the process
    /// answers when its calls are done).
    pub async fn ask(&mut self, command: &str) -> String {
        use tokio::io::AsyncWriteExt;
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .expect("write to the client process");
        match self
            .answers
            .next_line()
            .await
            .expect("read the client process")
        {
            Some(answer) => answer,
            None => panic!(
                "the client process ended without answering {command:?}: {:?}",
                self.child.try_wait()
            ),
        }
    }

    /// Durations in nanoseconds, as a command's answer lists them, added to `samples`.
    pub async fn ask_durations(&mut self, command: &str, samples: &mut Vec<Duration>) {
        let answer = self.ask(command).await;
        samples.extend(
            answer.split_whitespace().map(|ns| {
                Duration::from_nanos(ns.parse().unwrap_or_else(|_| panic!("{answer:?}")))
            }),
        );
    }
}

/// Durations as [`ClientProcess::ask_durations`] reads them.
pub fn durations_line(samples: &[Duration]) -> String {
    let ns: Vec<String> = samples.iter().map(|d| d.as_nanos().to_string()).collect();
    ns.join(" ")
}

/// In a benchmark's binary run as a [`ClientProcess`]: connects to the mesh, then answers each
/// line of stdin with `answer(channel, line)` on a runtime of one thread (a plain client's),
/// until stdin closes, and returns true. In any other process: returns false at once.
pub fn serve_client_commands<F, Fut>(mut answer: F) -> bool
where
    F: FnMut(crate::AuthedChannel, String) -> Fut,
    Fut: Future<Output = String>,
{
    let Ok(target) = std::env::var(CLIENT_ENV) else {
        return false;
    };
    let (url, key) = target.split_once(' ').expect("URL and key");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let channel = crate::channel_to(url, Some(key)).await;
        let mut out = std::io::stdout().lock();
        for line in std::io::stdin().lines() {
            let line = line.expect("read a command");
            let reply = answer(channel.clone(), line).await;
            writeln!(out, "{reply}")
                .and_then(|()| out.flush())
                .expect("answer");
        }
    });
    true
}

/// The threads the benchmark's runtime started (its async workers and blocking threads), by
/// Linux thread id: [`CpuTicks`] counts every other thread of the process as the models'
/// (the runners' threads and the pools ONNX Runtime makes, which no runtime hook sees).
static RUNTIME_THREADS: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The calling thread's id (`/proc/thread-self` names `PID/task/TID`).
fn this_thread_id() -> Option<u64> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Clock ticks of the machine and of this process (Linux's /proc; zeros elsewhere): sampled
/// before and after a stretch of a benchmark, their difference says where the cores went.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTicks {
    /// All cores, every state.
    total: u64,
    idle: u64,
    /// Time the host gave this guest's cores to others (a VM's steal).
    steal: u64,
    /// This process's threads, live and ended.
    process: u64,
    /// The threads outside the async runtime: the models' runners and ONNX Runtime's pools.
    model: u64,
}

impl CpuTicks {
    pub fn now() -> Self {
        Self::read().unwrap_or_default()
    }

    /// The host's steal, in percent of all cores' time.
    pub fn stolen(&self) -> f64 {
        self.share(self.steal)
    }

    /// `ticks` in percent of all cores' time.
    fn share(&self, ticks: u64) -> f64 {
        100.0 * ticks as f64 / self.total.max(1) as f64
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        // cpu user nice system idle iowait irq softirq steal (guest time is within user).
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().ok())
            .collect::<Option<_>>()?;
        let mut ticks = Self {
            total: cpu.iter().sum(),
            idle: cpu.get(3)? + cpu.get(4)?,
            steal: *cpu.get(7)?,
            process: thread_ticks(std::path::Path::new("/proc/self"))?,
            model: 0,
        };
        let runtime = lock(&RUNTIME_THREADS).clone();
        let main = std::process::id() as u64;
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let tid: Option<u64> = task.file_name().to_str().and_then(|t| t.parse().ok());
            if tid.is_some_and(|tid| tid != main && !runtime.contains(&tid))
                && let Some(used) = thread_ticks(&task.path())
            {
                ticks.model += used;
            }
        }
        Some(ticks)
    }
}

/// Time on a core of each live thread of this process that it took in (Linux's schedstat, by
/// thread id; none off Linux).
#[derive(Debug, Clone, Default)]
pub struct ThreadsCpu(std::collections::HashMap<u64, Duration>);

impl ThreadsCpu {
    /// The async runtime's threads ([`block_on`]'s workers and blocking threads).
    pub fn runtime() -> Self {
        let runtime = lock(&RUNTIME_THREADS).clone();
        Self::of(|tid| runtime.contains(&tid))
    }

    /// Every thread of this process.
    pub fn process() -> Self {
        Self::of(|_| true)
    }

    fn of(counted: impl Fn(u64) -> bool) -> Self {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return Self::default();
        };
        let used = tasks.flatten().filter_map(|task| {
            let tid: u64 = task.file_name().to_str()?.parse().ok()?;
            if !counted(tid) {
                return None;
            }
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let nanos: u64 = stat.split_whitespace().next()?.parse().ok()?;
            Some((tid, Duration::from_nanos(nanos)))
        });
        Self(used.collect())
    }

    /// All the threads' time.
    pub fn total(&self) -> Duration {
        self.0.values().sum()
    }

    /// The time these threads took since `earlier`: a thread that ended meanwhile (a blocking
    /// thread left idle) is not counted, one that started is counted from its start.
    pub fn since(&self, earlier: &Self) -> Duration {
        let used = |(tid, now): (&u64, &Duration)| {
            now.saturating_sub(earlier.0.get(tid).copied().unwrap_or_default())
        };
        self.0.iter().map(used).sum()
    }
}

/// The user + system ticks in `dir`/stat (of a process or a thread).
fn thread_ticks(dir: &std::path::Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // After the name (in parentheses): state, ppid, ... utime is the 12th field, stime the 13th.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

impl std::ops::Sub for CpuTicks {
    type Output = Self;
    fn sub(self, earlier: Self) -> Self {
        Self {
            total: self.total.saturating_sub(earlier.total),
            idle: self.idle.saturating_sub(earlier.idle),
            steal: self.steal.saturating_sub(earlier.steal),
            process: self.process.saturating_sub(earlier.process),
            model: self.model.saturating_sub(earlier.model),
        }
    }
}

impl std::ops::AddAssign for CpuTicks {
    fn add_assign(&mut self, more: Self) {
        self.total += more.total;
        self.idle += more.idle;
        self.steal += more.steal;
        self.process += more.process;
        self.model += more.model;
    }
}

impl std::fmt::Display for CpuTicks {
    /// Shares of all cores: the models' threads, the async runtime's (server, clients, usage
    /// recording, billing), other processes (databases, the bus), the host's steal (a noisy
    /// neighbour of a VM: figures from a run with much of it are not worth comparing) and idle.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.total == 0 {
            return write!(f, "(no /proc here)");
        }
        let others = self
            .total
            .saturating_sub(self.idle + self.steal + self.process);
        write!(
            f,
            "model threads {:.1}%, async runtime {:.1}%, other processes {:.1}%, \
             stolen by the host {:.1}%, idle {:.1}%",
            self.share(self.model),
            self.share(self.process.saturating_sub(self.model)),
            self.share(others),
            self.share(self.steal),
            self.share(self.idle)
        )
    }
}
