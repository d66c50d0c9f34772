//! The scheduler's shared handle: its database and outbox, the in-memory [`State`] behind one
//! lock, the routing table it publishes, and the writes that store a change with its event.

use std::sync::Arc;

use kiln_core::names::ChildName;
use kiln_core::page::PageTokens;
use kiln_events::Body;
use kiln_events::records::{HasRecords, Records};
use kiln_proto::events::v1 as ev;
use kiln_proto::scheduler::v1::{
    DeployedModel, Deployment, RoutingTable, SupervisedFineTuningJob, deployed_model,
};
use prost::Message;
use sea_orm::{DatabaseConnection, EntityTrait, TransactionTrait};
use tokio::sync::{Mutex, Notify, watch};

use crate::catalog::ModelCatalog;
use crate::config::SchedulerConfig;
use crate::db::{
    deployed_model as dm_rows, deployment as deployment_rows, fine_tuning_job as job_rows,
};
use crate::quota::QuotaGate;
use crate::resource::decode;
use crate::state::{DeploymentEntry, State};
use crate::time::now;
use kiln_core::Result;

/// The service's name in the outbox and migrations.
pub(crate) const SERVICE: &str = "scheduler";

/// The scheduler, shared by its handlers and its reconcile loop.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    records: Records,
    config: SchedulerConfig,
    catalog: Arc<dyn ModelCatalog>,
    /// Billing's quota checks; None: no quotas (a scheduler without billing).
    quotas: Option<Arc<dyn QuotaGate>>,
    state: Mutex<State>,
    wake: Notify,
    /// Changes after each heartbeat is applied: a caller that needs a fresh load waits on it.
    load_reports: watch::Sender<u64>,
    /// Node streams' tasks still running: a stop waits for them before the outbox's last
    /// pass, so what they record as they end (a node lost) is published, not left behind.
    node_tasks: watch::Sender<usize>,
    routes: watch::Sender<Arc<RoutingTable>>,
    /// Node streams end when it changes, so a server stops without waiting on them.
    shutdown: watch::Receiver<bool>,
}

impl HasRecords for Scheduler {
    fn records(&self) -> &Records {
        &self.inner.records
    }
}

impl Scheduler {
    /// Loads stored deployments and deployed models into memory.
    pub(crate) async fn new(
        db: DatabaseConnection,
        pages: PageTokens,
        config: SchedulerConfig,
        catalog: Arc<dyn ModelCatalog>,
        quotas: Option<Arc<dyn QuotaGate>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self> {
        let mut state = State::default();
        for row in deployment_rows::Entity::find().all(&db).await? {
            let deployment = decode::<Deployment>(&row.resource)?;
            state.deployments.insert(
                deployment.name.clone(),
                DeploymentEntry::new(deployment, row.model_bytes),
            );
        }
        for row in dm_rows::Entity::find().all(&db).await? {
            let dm = decode::<DeployedModel>(&row.resource)?;
            state.deployed_models.insert(dm.name.clone(), dm);
        }
        for row in job_rows::Entity::find().all(&db).await? {
            let job = decode::<SupervisedFineTuningJob>(&row.resource)?;
            state.jobs.insert(job.name.clone(), job);
        }
        // The stored deployed models routed from the start, their replicas not yet known: a
        // node that connects to a restarted scheduler must not be told that they are gone
        // (its callers got NOT_FOUND until the first pass); their requests wait for the
        // replicas its nodes report as they reconnect.
        let first = crate::routes::routing_table(&state, 0);
        let (routes, _) = watch::channel(Arc::new(first));
        Ok(Self {
            inner: Arc::new(Inner {
                records: Records::new(SERVICE, db, pages),
                config,
                catalog,
                quotas,
                state: Mutex::new(state),
                wake: Notify::new(),
                load_reports: watch::channel(0).0,
                node_tasks: watch::channel(0).0,
                routes,
                shutdown,
            }),
        })
    }

    pub(crate) fn config(&self) -> &SchedulerConfig {
        &self.inner.config
    }

    pub(crate) fn catalog(&self) -> &dyn ModelCatalog {
        self.inner.catalog.as_ref()
    }

    pub(crate) fn quotas(&self) -> Option<&Arc<dyn QuotaGate>> {
        self.inner.quotas.as_ref()
    }

    pub(crate) async fn lock(&self) -> tokio::sync::MutexGuard<'_, State> {
        self.inner.state.lock().await
    }

    /// Asks for a reconcile pass now.
    pub(crate) fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await
    }

    /// Counts a node stream's task as running until the guard drops.
    pub(crate) fn node_task(&self) -> NodeTask {
        self.inner.node_tasks.send_modify(|n| *n += 1);
        NodeTask(self.inner.node_tasks.clone())
    }

    /// Once every node stream's task has ended (10 s at most).
    pub(crate) async fn node_tasks_ended(&self) {
        let mut running = self.inner.node_tasks.subscribe();
        let ended = running.wait_for(|n| *n == 0);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), ended).await;
    }

    pub(crate) fn load_reported(&self) {
        self.inner.load_reports.send_modify(|n| *n += 1);
    }

    /// Changes each time a node's heartbeat has been applied.
    pub(crate) fn load_reports(&self) -> watch::Receiver<u64> {
        self.inner.load_reports.subscribe()
    }

    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// The routing table every node follows.
    pub(crate) fn routes(&self) -> watch::Receiver<Arc<RoutingTable>> {
        self.inner.routes.subscribe()
    }

    pub(crate) fn publish_routes(&self, table: RoutingTable) {
        self.inner.routes.send_replace(Arc::new(table));
    }

    pub(crate) fn current_routes(&self) -> Arc<RoutingTable> {
        self.inner.routes.borrow().clone()
    }

    /// Commits an event on its own (a fact without a stored row: replicas, nodes).
    pub(crate) async fn emit(
        &self,
        event_type: &str,
        account: &str,
        resource: &str,
        body: Body,
    ) -> Result<()> {
        let txn = self.db().begin().await?;
        self.outbox()
            .commit_event(txn, event_type, account, resource, body)
            .await?;
        Ok(())
    }

    /// Writes a deployment (insert or full update), and its event when given, in one
    /// transaction.
    pub(crate) async fn save_deployment(
        &self,
        entry: &DeploymentEntry,
        insert: bool,
        event: Option<(&str, Body)>,
        extra: Option<(&DeployedModel, &str, Body)>,
    ) -> Result<()> {
        let d = &entry.deployment;
        let name = ChildName::parse("deployment.name", "deployments", &d.name, None)?;
        let row = deployment_rows::Model {
            account_id: name.account.clone(),
            deployment_id: name.id.clone(),
            state: d.state,
            base_model: d.base_model.clone(),
            accelerator_type: d.accelerator_type,
            deployment_type: d.deployment_type,
            display_name: d.display_name.clone(),
            create_time: kiln_core::time::micros_of(&d.create_time),
            update_time: kiln_core::time::micros_of(&d.update_time),
            model_bytes: entry.model_bytes,
            resource: d.encode_to_vec(),
        };
        let txn = self.db().begin().await?;
        kiln_store::save(&txn, deployment_rows::ActiveModel::from(row), insert, &name).await?;
        if let Some((dm, event_type, body)) = extra {
            self.write_deployed_model(&txn, dm, true).await?;
            self.queue_event(&txn, event_type, &name.account, &dm.name, body)
                .await?;
        }
        match event {
            Some((event_type, body)) => {
                self.outbox()
                    .commit_event(txn, event_type, &name.account, &d.name, body)
                    .await?
            }
            None => self.outbox().commit(txn).await?,
        }
        Ok(())
    }

    /// Removes a deployment row for good (hard delete, purge).
    pub(crate) async fn drop_deployment_row(&self, name: &str) -> Result<()> {
        let parsed = ChildName::parse("name", "deployments", name, None)?;
        deployment_rows::Entity::delete_by_id((parsed.account, parsed.id))
            .exec(self.db())
            .await?;
        Ok(())
    }

    pub(crate) async fn write_deployed_model<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        dm: &DeployedModel,
        insert: bool,
    ) -> Result<()> {
        let name = ChildName::parse("deployed_model.name", "deployedModels", &dm.name, None)?;
        let row = dm_rows::Model {
            account_id: name.account.clone(),
            deployed_model_id: name.id.clone(),
            state: dm.state,
            model: dm.model.clone(),
            deployment: dm.deployment.clone(),
            is_default: dm.default,
            serverless: dm.serverless,
            public: dm.public,
            display_name: dm.display_name.clone(),
            create_time: kiln_core::time::micros_of(&dm.create_time),
            update_time: kiln_core::time::micros_of(&dm.update_time),
            resource: dm.encode_to_vec(),
        };
        kiln_store::save(conn, dm_rows::ActiveModel::from(row), insert, &name).await
    }

    /// Stores a deployed model as `change` left it (its update time now, unless it is new)
    /// with the event that says so, in one transaction.
    pub(crate) async fn save_deployed_model(
        &self,
        dm: &mut DeployedModel,
        change: DeployedModelChange,
    ) -> Result<()> {
        let insert = matches!(change, DeployedModelChange::Created);
        if !insert {
            dm.update_time = Some(now());
        }
        let (event_type, body) = change.event(dm);
        let account = ChildName::parse("name", "deployedModels", &dm.name, None)?.account;
        let txn = self.db().begin().await?;
        self.write_deployed_model(&txn, dm, insert).await?;
        self.outbox()
            .commit_event(txn, event_type, &account, &dm.name, body)
            .await?;
        Ok(())
    }

    /// Deletes a deployed model's row with its event.
    pub(crate) async fn delete_deployed_model_row(&self, dm: &DeployedModel) -> Result<()> {
        let name = ChildName::parse("name", "deployedModels", &dm.name, None)?;
        let txn = self.db().begin().await?;
        dm_rows::Entity::delete_by_id((name.account.clone(), name.id.clone()))
            .exec(&txn)
            .await?;
        self.outbox()
            .commit_event(
                txn,
                "scheduler.deployed_model.deleted",
                &name.account,
                &dm.name,
                Body::DeployedModelDeleted(ev::DeployedModelDeleted {
                    name: dm.name.clone(),
                    model: dm.model.clone(),
                    deployment: dm.deployment.clone(),
                }),
            )
            .await?;
        Ok(())
    }

    /// Sets the desired replica count, stored with its `deployment.scaled` event; memory
    /// keeps the old count when the write fails.
    pub(crate) async fn set_desired(
        &self,
        entry: &mut DeploymentEntry,
        desired: i32,
        reason: &str,
    ) -> Result<()> {
        let previous = entry.deployment.desired_replica_count;
        entry.deployment.desired_replica_count = desired;
        entry.deployment.update_time = Some(now());
        let result = self
            .save_deployment(
                entry,
                false,
                Some((
                    "scheduler.deployment.scaled",
                    Body::DeploymentScaled(ev::DeploymentScaled {
                        name: entry.deployment.name.clone(),
                        previous_desired_replica_count: previous,
                        desired_replica_count: desired,
                        reason: reason.to_owned(),
                    }),
                )),
                None,
            )
            .await;
        if result.is_err() {
            entry.deployment.desired_replica_count = previous;
        } else {
            tracing::info!(deployment = %entry.deployment.name, previous, desired, reason, "scaled");
        }
        result
    }

    /// Moves a deployed model to state `to`, stored with its `state_changed` event.
    pub(crate) async fn set_deployed_model_state(
        &self,
        dm: &mut DeployedModel,
        to: deployed_model::State,
    ) -> Result<()> {
        let previous = dm.state;
        if previous == to as i32 {
            return Ok(());
        }
        dm.state = to as i32;
        let change = DeployedModelChange::StateChanged { previous };
        self.save_deployed_model(dm, change).await
    }

    async fn queue_event<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        event_type: &str,
        account: &str,
        resource: &str,
        body: Body,
    ) -> Result<()> {
        let event = self.outbox().event(event_type, account, resource, body);
        self.outbox().enqueue(conn, &event).await?;
        Ok(())
    }
}

/// A change to a deployed model, and so its event.
pub(crate) enum DeployedModelChange {
    Created,
    Updated(Vec<String>),
    StateChanged { previous: i32 },
}

impl DeployedModelChange {
    fn event(self, dm: &DeployedModel) -> (&'static str, Body) {
        let deployed_model = Some(dm.clone());
        match self {
            Self::Created => (
                "scheduler.deployed_model.created",
                Body::DeployedModelCreated(ev::DeployedModelCreated { deployed_model }),
            ),
            Self::Updated(paths) => (
                "scheduler.deployed_model.updated",
                Body::DeployedModelUpdated(ev::DeployedModelUpdated {
                    deployed_model,
                    update_mask: Some(prost_types::FieldMask { paths }),
                }),
            ),
            Self::StateChanged { previous } => (
                "scheduler.deployed_model.state_changed",
                Body::DeployedModelStateChanged(ev::DeployedModelStateChanged {
                    deployed_model,
                    previous_state: previous,
                }),
            ),
        }
    }
}

/// A node stream's task, counted while it runs.
pub(crate) struct NodeTask(watch::Sender<usize>);

impl Drop for NodeTask {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}
