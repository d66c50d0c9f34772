//! Small helpers every suite uses: channels with a key, the asset cache, waiting for a
//! condition.

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
    InterceptedService::new(
        channel,
        OutgoingInterceptor::new(key).expect("key is a header value"),
    )
}

/// A file of the asset cache (`deploy/fetch-assets.sh` fills it; `.ci/run` runs it). Panics
/// with what to do when it is missing: tests on real models never skip silently.
pub fn asset(relative: &str) -> PathBuf {
    let dir = kiln_registry::library::asset_dir(&Default::default());
    let path = dir.join(relative);
    assert!(
        path.is_file(),
        "{} is missing: run `bash deploy/fetch-assets.sh` (or set KILN_ASSET_DIR)",
        path.display()
    );
    path
}

/// Polls `check` every 10 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
