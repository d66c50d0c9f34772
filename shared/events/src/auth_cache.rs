//! Keeps a service's API-key cache honest: identity events about a key, user or account drop
//! the cached principals they cover, on every instance.

use std::sync::Arc;

use futures::StreamExt;
use kiln_core::auth::AuthCache;
use tokio::sync::watch;

use crate::bus::EventBus;

/// Watches `kiln.identity.>` and invalidates `cache` on every change but a creation.
pub async fn spawn_invalidation(
    bus: Arc<dyn EventBus>,
    cache: Arc<AuthCache>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, crate::Error> {
    let mut events = bus.subscribe("kiln.identity.>").await?;
    Ok(tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = shutdown.changed() => return,
            };
            let Some(event) = event else {
                // The subscription ended (bus gone): trust nothing cached.
                cache.clear();
                return;
            };
            if !event.r#type.ends_with(".created") {
                cache.invalidate(&event.resource);
            }
        }
    }))
}
