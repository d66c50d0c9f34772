//! The batcher: passes shared by concurrent jobs, instances side by side, metrics, and which
//! jobs run on their caller's thread.

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
                .submit(vec![("x".into(), x)], true, Dispatch::Queue)
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
            .submit(vec![("x".into(), x)], false, Dispatch::Queue)
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
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
}

impl Slow {
    /// `count` copies of the graph, and the most passes they ran at once.
    fn copies(count: usize) -> (Vec<Box<dyn Session>>, Arc<AtomicUsize>) {
        let (running, most) = Default::default();
        let sessions = (0..count)
            .map(|_| {
                Box::new(Slow {
                    interface: x_in_and_out(vec![-1, 1]),
                    running: Arc::clone(&running),
                    most: Arc::clone(&most),
                }) as Box<dyn Session>
            })
            .collect();
        (sessions, most)
    }
}

/// Submits `jobs` one-value jobs at once, each from its own task, and checks that each gets
/// its own value back.
async fn echo_each(runner: &Arc<Runner>, jobs: i64, dispatch: Dispatch) {
    let tasks: Vec<_> = (0..jobs)
        .map(|i| {
            let runner = runner.clone();
            tokio::spawn(async move {
                let x = Tensor::new(vec![1, 1], TensorData::I64(vec![i])).unwrap();
                let out = runner.submit(vec![("x".into(), x)], false, dispatch).await;
                let out = out.unwrap().unwrap();
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
    let (sessions, most) = Slow::copies(2);
    let batching = Batching {
        max_batch_size: 1,
        instances: 2,
        ..Default::default()
    };
    let runner = Arc::new(Runner::start("m", sessions, batching, 64).unwrap());
    echo_each(&runner, 4, Dispatch::Queue).await;
    assert_eq!(runner.stats().get(), (4, 4));
    assert_eq!(most.load(Ordering::SeqCst), 2, "two passes ran at once");
}

/// A graph that echoes its input and notes the thread each pass ran on.
struct Threads {
    interface: Interface,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Session for Threads {
    fn interface(&self) -> &Interface {
        &self.interface
    }
    fn run(&mut self, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, BackendError> {
        let name = std::thread::current().name().unwrap_or("").to_owned();
        self.seen.lock().unwrap().push(name);
        Ok(inputs.into_iter().map(|(_, t)| t).collect())
    }
}

/// The threads that ran three jobs of `width` values submitted one after another.
async fn threads_of(batching: Batching, dispatch: Dispatch, width: usize) -> Vec<String> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sessions = (0..batching.instances)
        .map(|_| {
            Box::new(Threads {
                interface: x_in_and_out(vec![-1, -1]),
                seen: seen.clone(),
            }) as Box<dyn Session>
        })
        .collect();
    let runner = Runner::start("lone", sessions, batching, 8).unwrap();
    for i in 0..3 {
        let x = Tensor::new(vec![1, width], TensorData::I64(vec![i; width])).unwrap();
        let out = runner.submit(vec![("x".into(), x)], false, dispatch).await;
        assert_eq!(
            out.unwrap().unwrap()[0].data,
            TensorData::I64(vec![i; width])
        );
    }
    assert_eq!(runner.stats().get(), (3, 3));
    seen.lock().unwrap().clone()
}

const MODEL_THREAD: [&str; 3] = ["kiln-model-lone"; 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_lone_job_runs_on_its_callers_thread_and_others_on_the_models() {
    // The test's body runs on its own thread, the runtime's workers beside it.
    let here = std::thread::current().name().unwrap().to_owned();
    let small = threads_of(Batching::default(), Dispatch::Alone, MAX_VALUES_HERE).await;
    assert_eq!(small, vec![here; 3]);
    let big = threads_of(Batching::default(), Dispatch::Alone, MAX_VALUES_HERE + 1).await;
    assert_eq!(big, MODEL_THREAD);
    let queued = threads_of(Batching::default(), Dispatch::Queue, 1).await;
    assert_eq!(queued, MODEL_THREAD);
    let waiting = Batching {
        max_queue_delay: Duration::from_millis(1),
        ..Default::default()
    };
    assert_eq!(threads_of(waiting, Dispatch::Alone, 1).await, MODEL_THREAD);
    let instances = Batching {
        instances: 2,
        ..Default::default()
    };
    let seen = threads_of(instances, Dispatch::Alone, 1).await;
    assert!(
        seen.iter().all(|t| t.starts_with("kiln-model-lone-")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_runtime_of_one_worker_sends_every_job_to_the_models_thread() {
    let seen = threads_of(Batching::default(), Dispatch::Alone, 1).await;
    assert_eq!(seen, MODEL_THREAD);
}

#[tokio::test]
async fn a_single_threaded_runtime_sends_every_job_to_the_models_thread() {
    let seen = threads_of(Batching::default(), Dispatch::Alone, 1).await;
    assert_eq!(seen, MODEL_THREAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_behind_an_inline_pass_queue_and_share_the_next() {
    let (sessions, most) = Slow::copies(1);
    let runner = Arc::new(Runner::start("m", sessions, Batching::default(), 64).unwrap());
    echo_each(&runner, 8, Dispatch::Alone).await;
    let (passes, jobs) = runner.stats().get();
    assert_eq!(jobs, 8);
    assert!(passes < 8, "the queued jobs shared passes: {passes}");
    assert_eq!(most.load(Ordering::SeqCst), 1, "one pass at a time");
}
