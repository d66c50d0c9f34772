//! Dynamic batching: one thread per loaded copy of a model (an instance) owns its backend
//! session and runs the requests queued for the model, gathering those that arrive close
//! together into one forward pass. Instances share one queue: while one runs a pass, the
//! next gathers the requests behind it, so the cores stay busy between passes.
//!
//! A batch starts with the oldest waiting job and takes the jobs behind it, in order, while
//! they fit (same inputs, at most `max_batch_size` rows) and the first has waited less than
//! `max_queue_delay`. Jobs are stacked along the first axis. Jobs that allow padding (token
//! sequences with an attention mask) share a batch with jobs of other sequence lengths:
//! shorter ones are padded with zeros, which the mask ignores. A job that does not allow it
//! (an Open Inference Protocol tensor) only joins jobs of exactly its shapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use kiln_core::metrics::{
    self, Family, Histogram, HistogramFamily, Labels, count_histogram, seconds_histogram,
    short_seconds_histogram,
};
use tokio::sync::oneshot;

use crate::backend::{BackendError, Interface, Session, TensorInfo};
use crate::config::Batching;
use crate::tensor::Tensor;

/// The answer to one job: every output of the graph, in the session's output order, holding
/// only this job's rows. Padded jobs get their rows at the batch's padded length.
pub type JobResult = Result<Vec<Tensor>, BackendError>;

struct Job {
    /// When it was queued: its wait until a pass takes it is the batcher's hand-off.
    queued: Instant,
    inputs: Vec<(String, Tensor)>,
    pad: bool,
    reply: oneshot::Sender<JobResult>,
}

/// Counters of a runner: forward passes and the jobs they answered.
#[derive(Debug, Default)]
pub struct Stats {
    passes: AtomicU64,
    jobs: AtomicU64,
}

impl Stats {
    /// (forward passes, jobs answered) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.passes.load(Ordering::Relaxed),
            self.jobs.load(Ordering::Relaxed),
        )
    }
}

struct Families {
    queue_wait: HistogramFamily<Labels<1>>,
    pass: HistogramFamily<Labels<1>>,
    rows: HistogramFamily<Labels<1>>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    queue_wait: metrics::register(
        "kiln_model_queue_wait",
        "From a job's submission (an embedding input, an OIP inference) to the start of the \
         forward pass that runs it: the batcher's hand-off plus the wait behind other passes",
        true,
        Family::new_with_constructor(short_seconds_histogram),
    ),
    pass: metrics::register(
        "kiln_model_pass_duration",
        "One forward pass of a batched model (embeddings, OIP tensor models); after a batch \
         fails, each of its jobs runs again alone, a pass of its own",
        true,
        Family::new_with_constructor(seconds_histogram),
    ),
    rows: metrics::register(
        "kiln_model_batch_rows",
        "Rows in a forward pass of a batched model",
        false,
        Family::new_with_constructor(count_histogram),
    ),
});

/// One runner's histograms, resolved once.
#[derive(Clone)]
struct PassMetrics {
    queue_wait: Histogram,
    pass: Histogram,
    rows: Histogram,
}

impl PassMetrics {
    fn of(model: &str) -> Self {
        let f = &*FAMILIES;
        let labels = [("model", model.to_owned())];
        Self {
            queue_wait: f.queue_wait.get_or_create(&labels).clone(),
            pass: f.pass.get_or_create(&labels).clone(),
            rows: f.rows.get_or_create(&labels).clone(),
        }
    }
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: the caller should retry later.
    Full,
    /// The model's thread has stopped.
    Stopped,
}

/// A loaded model's queue and thread. Dropping it lets the thread finish what is queued and
/// stop.
pub struct Runner {
    queue: SyncSender<Job>,
    stats: Arc<Stats>,
    interface: Interface,
}

impl Runner {
    /// Starts one thread per session (copies of one model, see [`Batching::instances`]):
    /// they share the queue, so while one runs a pass the next gathers the jobs behind it.
    pub fn start(
        name: &str,
        sessions: Vec<Box<dyn Session>>,
        batching: Batching,
        queue_capacity: usize,
    ) -> std::io::Result<Self> {
        let first = sessions
            .first()
            .ok_or_else(|| std::io::Error::other("a runner needs at least one session"))?;
        let interface = first.interface().clone();
        // Batching needs a free first axis on every input and output.
        let batchable = interface
            .inputs
            .iter()
            .chain(&interface.outputs)
            .all(|t| t.shape.first() == Some(&-1));
        let max_rows = if batchable {
            batching.max_batch_size.max(1)
        } else {
            1
        };
        let (queue, jobs) = sync_channel(queue_capacity);
        let shared = Arc::new(Mutex::new(Queue { jobs, next: None }));
        let delay = batching.max_queue_delay;
        let stats = Arc::new(Stats::default());
        let pass_metrics = PassMetrics::of(name);
        let short = name.rsplit('/').next().unwrap_or(name);
        let count = sessions.len();
        for (i, session) in sessions.into_iter().enumerate() {
            let shared = shared.clone();
            let counters = stats.clone();
            let pass_metrics = pass_metrics.clone();
            let thread = if count == 1 {
                format!("kiln-model-{short}")
            } else {
                format!("kiln-model-{short}-{i}")
            };
            std::thread::Builder::new()
                .name(thread)
                .spawn(move || run(session, &shared, max_rows, delay, &counters, &pass_metrics))?;
        }
        Ok(Self {
            queue,
            stats,
            interface,
        })
    }

    pub fn inputs(&self) -> &[TensorInfo] {
        &self.interface.inputs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn outputs(&self) -> &[TensorInfo] {
        &self.interface.outputs
    }

    /// Queues a job (inputs with their batch rows first) and waits for its outputs. `pad`:
    /// it may be padded to share a batch with longer sequences (its output rows then have
    /// the batch's length).
    pub async fn submit(
        &self,
        inputs: Vec<(String, Tensor)>,
        pad: bool,
    ) -> Result<JobResult, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            queued: Instant::now(),
            inputs,
            pad,
            reply,
        };
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(SubmitError::Full),
            Err(TrySendError::Disconnected(_)) => return Err(SubmitError::Stopped),
        }
        answer.await.map_err(|_| SubmitError::Stopped)
    }
}

/// The jobs waiting for a model, and the one that did not fit the last batch (it starts
/// the next).
struct Queue {
    jobs: Receiver<Job>,
    next: Option<Job>,
}

fn run(
    mut session: Box<dyn Session>,
    queue: &Mutex<Queue>,
    max_rows: usize,
    delay: Duration,
    stats: &Stats,
    metrics: &PassMetrics,
) {
    loop {
        // Only the gathering holds the lock: another instance runs its pass meanwhile.
        let batch = {
            let mut queue = queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match gather(&mut queue, max_rows, delay) {
                Some(batch) => batch,
                None => return,
            }
        };
        stats.passes.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let mut rows = 0;
        for job in &batch {
            metrics
                .queue_wait
                .observe(started.duration_since(job.queued).as_secs_f64());
            rows += rows_of(job);
        }
        metrics.rows.observe(rows as f64);
        run_batch(session.as_mut(), batch, &metrics.pass);
    }
}

/// The next batch: the oldest job and those behind it that fit. None: the runner is dropped
/// and nothing is left.
fn gather(queue: &mut Queue, max_rows: usize, delay: Duration) -> Option<Vec<Job>> {
    let first = match queue.next.take() {
        Some(job) => job,
        None => queue.jobs.recv().ok()?,
    };
    let started = Instant::now();
    let mut rows = rows_of(&first);
    // Whether every job so far may be padded, and whether all have the first's shapes.
    let mut padding_ok = first.pad;
    let mut uniform = true;
    let mut batch = vec![first];
    while rows < max_rows {
        let job = match queue.jobs.try_recv() {
            Ok(job) => job,
            Err(_) => {
                let left = delay.saturating_sub(started.elapsed());
                if left.is_zero() {
                    break;
                }
                match queue.jobs.recv_timeout(left) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        let same = same_shapes(&batch[0], &job);
        let fits = compatible(&batch[0], &job)
            && if padding_ok && job.pad {
                true
            } else {
                uniform && same
            };
        if rows + rows_of(&job) <= max_rows && fits {
            rows += rows_of(&job);
            padding_ok &= job.pad;
            uniform &= same;
            batch.push(job);
        } else {
            queue.next = Some(job);
            break;
        }
    }
    Some(batch)
}

fn rows_of(job: &Job) -> usize {
    job.inputs.first().map(|(_, t)| t.rows()).unwrap_or(1)
}

/// Whether `job` has the inputs of `first`: names, types and ranks.
fn compatible(first: &Job, job: &Job) -> bool {
    first.inputs.len() == job.inputs.len()
        && first
            .inputs
            .iter()
            .zip(&job.inputs)
            .all(|((na, a), (nb, b))| {
                na == nb
                    && a.dtype() == b.dtype()
                    && a.shape.len() == b.shape.len()
                    && !a.shape.is_empty()
            })
}

/// Whether `job`'s inputs have `first`'s shapes beyond the batch axis.
fn same_shapes(first: &Job, job: &Job) -> bool {
    first
        .inputs
        .iter()
        .zip(&job.inputs)
        .all(|((_, a), (_, b))| a.shape.get(1..) == b.shape.get(1..))
}

/// Runs the session, turning a panic inside the backend into its error: a bad request must
/// not stop the model for everyone.
fn guarded_run(session: &mut dyn Session, inputs: Vec<(String, Tensor)>) -> JobResult {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.run(inputs))).unwrap_or_else(
        |panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(BackendError::new(
                "engine",
                format!("the backend panicked: {message}"),
            ))
        },
    )
}

/// [`guarded_run`], timed into `pass` before anyone gets its answer.
fn timed_run(
    session: &mut dyn Session,
    inputs: Vec<(String, Tensor)>,
    pass: &Histogram,
) -> JobResult {
    let started = Instant::now();
    let result = guarded_run(session, inputs);
    pass.observe(started.elapsed().as_secs_f64());
    result
}

fn run_batch(session: &mut dyn Session, mut batch: Vec<Job>, pass: &Histogram) {
    if batch.len() == 1 {
        let job = batch.pop().expect("one job");
        let _ = job.reply.send(timed_run(session, job.inputs, pass));
        return;
    }
    let names: Vec<String> = batch[0].inputs.iter().map(|(n, _)| n.clone()).collect();
    let merged: Vec<(String, Tensor)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let parts: Vec<&Tensor> = batch.iter().map(|job| &job.inputs[i].1).collect();
            (name.clone(), Tensor::concat_padded(&parts))
        })
        .collect();
    match timed_run(session, merged, pass) {
        Ok(outputs) => {
            let mut at = 0;
            for job in batch {
                let rows = rows_of(&job);
                let mine = outputs
                    .iter()
                    .map(|out| out.slice_rows(at..at + rows, &out.shape[1..]))
                    .collect();
                at += rows;
                let _ = job.reply.send(Ok(mine));
            }
        }
        // One bad job (an out-of-range token id, say) must not fail the others: each runs
        // again alone and gets its own answer.
        Err(_) => {
            for job in batch {
                let _ = job.reply.send(timed_run(session, job.inputs, pass));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, TensorData};

    /// A graph whose one input and one output are an int64 tensor `x` of `shape`.
    fn x_in_and_out(shape: Vec<i64>) -> Interface {
        let x = TensorInfo {
            name: "x".into(),
            dtype: DataType::I64,
            shape,
        };
        Interface {
            inputs: vec![x.clone()],
            outputs: vec![x],
        }
    }

    /// A graph that returns, per row, the sum of its input row and the batch size it ran in.
    struct RowSum {
        interface: Interface,
        batches: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl Session for RowSum {
        fn interface(&self) -> &Interface {
            &self.interface
        }
        fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
            let x = &inputs[0].1;
            let TensorData::I64(v) = &x.data else {
                unreachable!()
            };
            let width = x.shape[1];
            self.batches.lock().unwrap().push(x.rows());
            let sums = v.chunks(width).map(|r| r.iter().sum()).collect();
            Ok(vec![
                Tensor::new(vec![x.rows(), 1], TensorData::I64(sums)).unwrap(),
            ])
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_jobs_share_a_pass_and_get_their_own_rows() {
        let batches = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let session = RowSum {
            interface: x_in_and_out(vec![-1, -1]),
            batches: batches.clone(),
        };
        let batching = Batching {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(50),
            ..Default::default()
        };
        let runner =
            std::sync::Arc::new(Runner::start("m", vec![Box::new(session)], batching, 64).unwrap());
        let mut tasks = Vec::new();
        for i in 0..8i64 {
            let runner = runner.clone();
            tasks.push(tokio::spawn(async move {
                let len = (i as usize % 3) + 1;
                let row: Vec<i64> = (0..len as i64).map(|k| i * 10 + k).collect();
                let want: i64 = row.iter().sum();
                let x = Tensor::new(vec![1, len], TensorData::I64(row)).unwrap();
                let out = runner
                    .submit(vec![("x".into(), x)], true)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(out[0].data, TensorData::I64(vec![want]));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.iter().sum::<usize>(), 8);
        assert!(
            batches.len() < 8,
            "some jobs must have shared a pass: {batches:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_pass_is_timed_with_its_rows_and_its_jobs_waits() {
        let session = RowSum {
            interface: x_in_and_out(vec![-1, -1]),
            batches: Default::default(),
        };
        let name = "accounts/test/models/runner-metrics";
        let runner = Runner::start(name, vec![Box::new(session)], Batching::default(), 8).unwrap();
        for rows in [1, 3] {
            let x = Tensor::new(vec![rows, 2], TensorData::I64(vec![1; rows * 2])).unwrap();
            runner
                .submit(vec![("x".into(), x)], false)
                .await
                .unwrap()
                .unwrap();
        }
        let text = kiln_core::metrics::render();
        let value = |series: &str| {
            let line = format!("{series}{{model=\"{name}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .unwrap_or_else(|| panic!("no {series} for the model in:\n{text}"))
                .parse::<f64>()
                .unwrap()
        };
        assert_eq!(value("kiln_model_pass_duration_seconds_count"), 2.0);
        assert!(value("kiln_model_pass_duration_seconds_sum") > 0.0);
        assert_eq!(value("kiln_model_queue_wait_seconds_count"), 2.0);
        assert_eq!(value("kiln_model_batch_rows_count"), 2.0);
        assert_eq!(value("kiln_model_batch_rows_sum"), 4.0);
    }

    /// A graph that takes a while and counts how many passes run at once.
    struct Slow {
        interface: Interface,
        running: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Session for Slow {
        fn interface(&self) -> &Interface {
            &self.interface
        }
        fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(inputs.into_iter().map(|(_, t)| t).collect())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_run_passes_side_by_side() {
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sessions: Vec<Box<dyn Session>> = (0..2)
            .map(|_| {
                Box::new(Slow {
                    interface: x_in_and_out(vec![-1, 1]),
                    running: running.clone(),
                    most: most.clone(),
                }) as Box<dyn Session>
            })
            .collect();
        let batching = Batching {
            max_batch_size: 1,
            instances: 2,
            ..Default::default()
        };
        let runner = Arc::new(Runner::start("m", sessions, batching, 64).unwrap());
        let tasks: Vec<_> = (0..4i64)
            .map(|i| {
                let runner = runner.clone();
                tokio::spawn(async move {
                    let x = Tensor::new(vec![1, 1], TensorData::I64(vec![i])).unwrap();
                    let out = runner
                        .submit(vec![("x".into(), x)], false)
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(
                        out[0].data,
                        TensorData::I64(vec![i]),
                        "job {i}'s own answer"
                    );
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(runner.stats().get(), (4, 4));
        assert_eq!(most.load(Ordering::SeqCst), 2, "two passes ran at once");
    }
}
