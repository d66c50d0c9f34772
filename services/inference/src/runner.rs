//! Dynamic batching: one thread per loaded copy of a model (an instance) runs the requests
//! queued for the model, gathering those that arrive close together into one forward pass.
//! Instances share one queue: while one runs a pass, the next gathers the requests behind it,
//! so the cores stay busy between passes.
//!
//! A small job that is its request's only one, and finds nothing queued and the model idle,
//! runs its pass on the calling thread instead: the two thread hand-offs it skips (to the
//! model's thread and back, each waking a sleeping thread) took 80 us on a 2-core VM, a sixth
//! of what gRPC added to a 16-token embedding. The pass holds that async worker for a few
//! milliseconds, as the model's thread would hold a core; a bigger job, whose pass dwarfs the
//! hand-offs, goes to the model's thread so that no worker stalls for long, and so does every
//! job on a runtime with a single worker, of a model with several instances (they are for
//! passes side by side on their threads), or with a `max_queue_delay` (which asks each job to
//! wait for company).
//!
//! A batch starts with the oldest waiting job and takes the jobs behind it, in order, while
//! they fit (same inputs, at most `max_batch_size` rows) and the first has waited less than
//! `max_queue_delay`. Jobs are stacked along the first axis. Jobs that allow padding (token
//! sequences with an attention mask) share a batch with jobs of other sequence lengths:
//! shorter ones are padded with zeros, which the mask ignores. A job that does not allow it
//! (an Open Inference Protocol tensor) only joins jobs of exactly its shapes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use kiln_core::metrics::{
    self, Family, Histogram, HistogramFamily, Labels, count_histogram, seconds_histogram,
    short_seconds_histogram,
};
use tokio::runtime::{Handle, RuntimeFlavor};
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
    /// None for a job its caller runs itself: its answer is returned, not sent.
    reply: Option<oneshot::Sender<JobResult>>,
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
         forward pass that runs it: the batcher's hand-off plus the wait behind other passes \
         (near zero for a small lone job run on its caller's thread)",
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

/// A loaded model's queue and threads. Dropping it lets the threads finish what is queued
/// and stop.
pub struct Runner {
    queue: SyncSender<Job>,
    shared: Arc<Shared>,
    interface: Interface,
}

/// What a runner's callers and its threads share.
struct Shared {
    queue: Mutex<Queue>,
    /// Jobs submitted and not yet taken into a batch: a caller runs its own job only when
    /// none wait, so it never overtakes them.
    waiting: AtomicUsize,
    /// One per instance; a thread or an inline caller holds one for the length of a pass.
    sessions: Vec<Mutex<Box<dyn Session>>>,
    max_rows: usize,
    delay: Duration,
    stats: Stats,
    metrics: PassMetrics,
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
        let count = sessions.len();
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs, next: None }),
            waiting: AtomicUsize::new(0),
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            max_rows,
            delay: batching.max_queue_delay,
            stats: Stats::default(),
            metrics: PassMetrics::of(name),
        });
        let short = name.rsplit('/').next().unwrap_or(name);
        for instance in 0..count {
            let shared = shared.clone();
            let thread = if count == 1 {
                format!("kiln-model-{short}")
            } else {
                format!("kiln-model-{short}-{instance}")
            };
            std::thread::Builder::new()
                .name(thread)
                .spawn(move || run(&shared, instance))?;
        }
        Ok(Self {
            queue,
            shared,
            interface,
        })
    }

    pub fn inputs(&self) -> &[TensorInfo] {
        &self.interface.inputs
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn outputs(&self) -> &[TensorInfo] {
        &self.interface.outputs
    }

    /// Runs a job (inputs with their batch rows first) and waits for its outputs: on this
    /// thread if `dispatch` and the model allow it (see the module's notes), else through the
    /// queue. `pad`: it may be padded to share a batch with longer sequences (its output rows
    /// then have the batch's length).
    pub async fn submit(
        &self,
        inputs: Vec<(String, Tensor)>,
        pad: bool,
        dispatch: Dispatch,
    ) -> Result<JobResult, SubmitError> {
        let job = Job {
            queued: Instant::now(),
            inputs,
            pad,
            reply: None,
        };
        let values = job.inputs.first().map_or(0, |(_, t)| t.data.len());
        let workers = Handle::try_current()
            .ok()
            .filter(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
            .map(|h| h.metrics().num_workers());
        let shared = &*self.shared;
        let instances = shared.sessions.len();
        let job = if runs_here(dispatch, values, shared.delay, instances, workers) {
            match self.run_here(job) {
                Ok(answer) => return Ok(answer),
                Err(job) => job,
            }
        } else {
            job
        };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            reply: Some(reply),
            ..job
        };
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        if let Err(e) = self.queue.try_send(job) {
            shared.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(match e {
                TrySendError::Full(_) => SubmitError::Full,
                TrySendError::Disconnected(_) => SubmitError::Stopped,
            });
        }
        answer.await.map_err(|_| SubmitError::Stopped)
    }

    /// Runs `job` on this thread if nothing waits and the instance is idle; gives it back
    /// otherwise.
    fn run_here(&self, job: Job) -> Result<JobResult, Job> {
        let shared = &*self.shared;
        if shared.waiting.load(Ordering::SeqCst) != 0 {
            return Err(job);
        }
        let mut session = match shared.sessions[0].try_lock() {
            Ok(session) => session,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(job),
        };
        // A job queued meanwhile goes first: its thread is about to take the instance.
        if shared.waiting.load(Ordering::SeqCst) != 0 {
            return Err(job);
        }
        let answer = shared.pass(session.as_mut(), vec![job]);
        Ok(answer.expect("a job without a reply channel gets its answer back"))
    }
}

/// How a job may reach a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatch {
    /// Through the queue: one of several jobs of a request, which share a pass there.
    Queue,
    /// On the caller's thread when the runner allows it: a request's only job.
    Alone,
}

/// The most values (of a job's first input) a job run on the caller's thread may hold: a
/// 32-token embedding input. The passes of bigger jobs dwarf the hand-offs to the model's
/// thread and would hold an async worker for longer.
const MAX_VALUES_HERE: usize = 32;

/// Whether a job of `values` may run on its caller's thread, for a runner of `instances`
/// on a runtime of `workers` async workers (None: not a multi-threaded runtime). One
/// instance: its session's lock then lets one pass at a time hold a worker, never all of
/// them (several instances are for passes side by side on the model's threads). The runner
/// still checks that nothing waits and the instance is idle.
fn runs_here(
    dispatch: Dispatch,
    values: usize,
    delay: Duration,
    instances: usize,
    workers: Option<usize>,
) -> bool {
    dispatch == Dispatch::Alone
        && values <= MAX_VALUES_HERE
        && delay.is_zero()
        && instances == 1
        && workers.is_some_and(|w| w >= 2)
}

/// The jobs waiting for a model, and the one that did not fit the last batch (it starts
/// the next).
struct Queue {
    jobs: Receiver<Job>,
    next: Option<Job>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An instance's thread: waits for a job, takes its session (after an inline pass holding
/// it, if any), gathers the batch and runs it.
fn run(shared: &Shared, instance: usize) {
    loop {
        // Waiting holds only the queue: a caller may run its own job on the idle session.
        {
            let mut queue = lock(&shared.queue);
            if queue.next.is_none() {
                match queue.jobs.recv() {
                    Ok(job) => queue.next = Some(job),
                    Err(_) => return,
                }
            }
        }
        let mut session = lock(&shared.sessions[instance]);
        // Only the gathering holds the queue: another instance runs its pass meanwhile.
        let batch = gather(&mut lock(&shared.queue), shared.max_rows, shared.delay);
        if let Some(batch) = batch {
            shared.waiting.fetch_sub(batch.len(), Ordering::SeqCst);
            shared.pass(session.as_mut(), batch);
        }
    }
}

impl Shared {
    /// Runs a batch with its counts and timings. Returns the answer of a lone job that has
    /// no reply channel (an inline caller's).
    fn pass(&self, session: &mut dyn Session, batch: Vec<Job>) -> Option<JobResult> {
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .jobs
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let started = Instant::now();
        let mut rows = 0;
        for job in &batch {
            self.metrics
                .queue_wait
                .observe(started.duration_since(job.queued).as_secs_f64());
            rows += rows_of(job);
        }
        self.metrics.rows.observe(rows as f64);
        run_batch(session, batch, &self.metrics.pass)
    }
}

/// The next batch: the oldest job and those behind it that fit. None: another instance took
/// the jobs.
fn gather(queue: &mut Queue, max_rows: usize, delay: Duration) -> Option<Vec<Job>> {
    let first = match queue.next.take() {
        Some(job) => job,
        None => queue.jobs.try_recv().ok()?,
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

/// Gives `result` to the job's caller: through its reply channel, or back to an inline caller.
fn answer(reply: Option<oneshot::Sender<JobResult>>, result: JobResult) -> Option<JobResult> {
    match reply {
        Some(reply) => {
            let _ = reply.send(result);
            None
        }
        None => Some(result),
    }
}

/// Runs a batch and answers its jobs; returns the answer of a job without a reply channel.
fn run_batch(
    session: &mut dyn Session,
    mut batch: Vec<Job>,
    pass: &Histogram,
) -> Option<JobResult> {
    if batch.len() == 1 {
        let job = batch.pop().expect("one job");
        return answer(job.reply, timed_run(session, job.inputs, pass));
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
    let mut kept = None;
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
                kept = kept.or(answer(job.reply, Ok(mine)));
            }
        }
        // One bad job (an out-of-range token id, say) must not fail the others: each runs
        // again alone and gets its own answer.
        Err(_) => {
            for job in batch {
                kept = kept.or(answer(job.reply, timed_run(session, job.inputs, pass)));
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests;
