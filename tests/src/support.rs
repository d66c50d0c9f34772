//! Small helpers every suite uses: channels with a key, the asset cache and the reference
//! data, waiting for a condition, free ports, and checking a call's error code.

use std::fmt::{Debug, Display};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use kiln_core::telemetry::OutgoingInterceptor;
use tonic::service::interceptor::InterceptedService;

use crate::AuthedChannel;

/// A channel to `url` that sends `key` as a bearer token (None: no authorization header).
pub async fn channel_to(url: &str, key: Option<&str>) -> AuthedChannel {
    let channel = kiln_core::server::endpoint(url)
        .expect("url")
        .connect()
        .await
        .expect("connect to mesh");
    with_key(channel, key)
}

/// `service` (a channel, or services in process) sending `key` as a bearer token (None: no
/// authorization header) and the trace context.
pub fn with_key<S>(service: S, key: Option<&str>) -> InterceptedService<S, OutgoingInterceptor> {
    InterceptedService::new(
        service,
        OutgoingInterceptor::new(key).expect("key is a header value"),
    )
}

/// A file of the asset cache (`deploy/fetch-assets.sh` fills it; `.ci/run` runs it). Panics
/// with what to do when it is missing: tests on real models never skip silently.
pub fn asset(relative: &str) -> PathBuf {
    let dir = kiln_registry::asset_dir(&Default::default());
    let path = dir.join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `bash deploy/fetch-assets.sh` (or set KILN_ASSET_DIR)",
        path.display()
    );
    path
}

/// A file of `tests/data`, read as JSON (the reference data of the suites).
pub fn data_json<T: serde::de::DeserializeOwned>(relative: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(relative);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls `check` every 10 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_ok(timeout, what, || {
        let checked = check();
        async move { checked.await.ok_or("the condition never held") }
    })
    .await
}

/// Polls `check` every 10 ms until it returns `Ok`, or panics after `timeout` with `what`
/// and the last `Err` (what was seen instead).
pub async fn wait_for_ok<T, E, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP port free on 127.0.0.1 (the OS's choice) for a server to bind next.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_listener(addr: &str, timeout: Duration, what: &str) {
    wait_for(timeout, what, || async move {
        tokio::net::TcpStream::connect(addr).await.ok().map(drop)
    })
    .await;
}

/// The status of a call that must fail with `code`; panics with the answer when it succeeded
/// and with the status when it failed otherwise.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<T, tonic::Status>, code: tonic::Code) -> tonic::Status {
    match result {
        Ok(answer) => panic!("expected {code:?}, the call succeeded: {answer:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            status
        }
    }
}

/// An update mask of `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// What a run of a command did: whether it succeeded, its stdout and its stderr.
#[derive(Debug)]
pub struct Ran {
    pub ok: bool,
    pub out: String,
    pub err: String,
}

impl From<std::process::Output> for Ran {
    fn from(output: std::process::Output) -> Self {
        Self {
            ok: output.status.success(),
            out: String::from_utf8_lossy(&output.stdout).into_owned(),
            err: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}
