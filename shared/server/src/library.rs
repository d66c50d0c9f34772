//! The public library in `kiln dev`: its models imported from the asset cache and put on the
//! shared serverless deployments that the process's own node serves.

use kiln_core::auth::Principal;
use kiln_proto::scheduler::v1::Deployment;

/// Imports the library in the background (the server answers while the files copy in), then
/// deploys each public model it holds.
pub(crate) fn import_in_background(
    registry: kiln_registry::Registry,
    scheduler: kiln_scheduler::Scheduler,
) {
    tokio::spawn(async move {
        if let Err(err) = registry.import_library().await {
            tracing::warn!(%err, "importing the public library failed");
            return;
        }
        for name in [kiln_registry::EMBEDDING_MODEL, kiln_registry::CHAT_MODEL] {
            if registry
                .get_model(&Principal::service(), name)
                .await
                .is_ok()
            {
                deploy_serverless(&scheduler, name).await;
            }
        }
    });
}

/// Puts a public model on a shared serverless deployment of the system account, once: later
/// starts find it there.
async fn deploy_serverless(scheduler: &kiln_scheduler::Scheduler, model: &str) {
    let id = model.rsplit('/').next().unwrap_or_default().to_owned();
    let deployment = Deployment {
        base_model: model.to_owned(),
        min_replica_count: 1,
        ..Default::default()
    };
    let parent = format!("accounts/{}", kiln_core::names::SYSTEM_ACCOUNT);
    match scheduler
        .create_deployment(&Principal::service(), &parent, id, deployment, false, false)
        .await
    {
        Ok(d) => tracing::info!(deployment = %d.name, "serverless deployment created"),
        Err(kiln_core::Error::AlreadyExists { .. }) => {}
        Err(err) => tracing::warn!(model, %err, "cannot deploy the library model"),
    }
}
