//! The scheduler's shared state: deployments and deployed models (stored, and mirrored in
//! memory for the reconcile pass), the connected nodes and the replicas on them (in memory
//! only: nodes tell them again when they reconnect).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use kiln_core::names::ChildName;
use kiln_core::page::PageTokens;
use kiln_core::time::{micros_to_timestamp, now_micros, timestamp_to_micros};
use kiln_events::Body;
use kiln_events::outbox::Outbox;
use kiln_proto::scheduler::v1::{
    DeployedModel, Deployment, Node, Replica, ReplicaLoad, RoutingTable, SchedulerMessage,
};
use prost::Message;
use sea_orm::{ActiveModelTrait, DatabaseConnection, EntityTrait, TransactionTrait};
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tonic::Status;

use crate::catalog::ModelCatalog;
use crate::config::SchedulerConfig;
use crate::db::{deployed_model as dm_rows, deployment as deployment_rows};
use crate::error::Result;
use crate::quota::QuotaGate;

/// The name events carry in `source`.
pub const SOURCE: &str = "kiln-scheduler";
/// The service's name in the outbox and migrations.
pub const SERVICE: &str = "scheduler";

/// The scheduler, shared by its handlers and its reconcile loop.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    outbox: Outbox,
    pages: PageTokens,
    config: SchedulerConfig,
    catalog: Arc<dyn ModelCatalog>,
    /// Billing's quota checks; None: no quotas (a scheduler without billing).
    quotas: Option<Arc<dyn QuotaGate>>,
    state: Mutex<State>,
    wake: Notify,
    routes: watch::Sender<Arc<RoutingTable>>,
    /// Node streams end when it changes, so a server stops without waiting on them.
    shutdown: watch::Receiver<bool>,
}

/// Everything the reconcile pass decides from. One lock: passes and API changes take turns.
#[derive(Default)]
pub(crate) struct State {
    pub deployments: BTreeMap<String, DeploymentEntry>,
    pub deployed_models: BTreeMap<String, DeployedModel>,
    pub nodes: BTreeMap<String, NodeEntry>,
    pub replicas: BTreeMap<String, ReplicaEntry>,
    pub next_session: u64,
}

/// A deployment and what the autoscaler remembers about it.
pub(crate) struct DeploymentEntry {
    pub deployment: Deployment,
    pub model_bytes: i64,
    /// Since when load has been above target (for the scale-up window).
    pub above_since: Option<Instant>,
    /// Since when load has been below target (for the scale-down window).
    pub below_since: Option<Instant>,
    /// The last time a request was in flight or waiting for it.
    pub last_activity: Instant,
    /// A node holds requests for it while it has no ready replica.
    pub demand: bool,
    /// Replica failures since it last had a ready replica.
    pub failures: u32,
    /// Why its waiting replicas cannot be placed (empty when they can).
    pub unplaced: String,
}

impl DeploymentEntry {
    pub fn new(deployment: Deployment, model_bytes: i64) -> Self {
        Self {
            deployment,
            model_bytes,
            above_since: None,
            below_since: None,
            last_activity: Instant::now(),
            demand: false,
            failures: 0,
            unplaced: String::new(),
        }
    }
}

/// A connected (or lost) worker node.
pub(crate) struct NodeEntry {
    pub node: Node,
    /// Which stream is the node's current one (a reconnect replaces the older).
    pub session: u64,
    /// Where assignments go; None once the stream closed.
    pub sender: Option<mpsc::Sender<Result<SchedulerMessage, Status>>>,
    pub last_heartbeat: Instant,
}

impl NodeEntry {
    pub fn is_ready(&self) -> bool {
        self.node.state == kiln_proto::scheduler::v1::node::State::Ready as i32
            && self.sender.is_some()
    }
}

/// A replica and its last reported load.
pub(crate) struct ReplicaEntry {
    pub replica: Replica,
    pub deployment_type: i32,
    pub model_bytes: i64,
    pub load: ReplicaLoad,
    /// Addons its node was told to load and has not reported loaded yet.
    pub addons_requested: std::collections::BTreeSet<String>,
}

impl ReplicaEntry {
    pub fn state(&self) -> kiln_proto::scheduler::v1::replica::State {
        kiln_proto::scheduler::v1::replica::State::try_from(self.replica.state)
            .unwrap_or(kiln_proto::scheduler::v1::replica::State::Unspecified)
    }
}

impl Scheduler {
    /// Loads stored deployments and deployed models into memory.
    pub async fn new(
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
        let (routes, _) = watch::channel(Arc::new(RoutingTable::default()));
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                outbox: Outbox::new(SERVICE),
                pages,
                config,
                catalog,
                quotas,
                state: Mutex::new(state),
                wake: Notify::new(),
                routes,
                shutdown,
            }),
        })
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.inner.db
    }

    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    pub(crate) fn pages(&self) -> &PageTokens {
        &self.inner.pages
    }

    pub fn config(&self) -> &SchedulerConfig {
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
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await
    }

    pub(crate) fn shutdown(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// The routing table every node follows.
    pub fn routes(&self) -> watch::Receiver<Arc<RoutingTable>> {
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
        self.inner
            .outbox
            .commit_event(txn, SOURCE, event_type, account, resource, body)
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
            create_time: d.create_time.as_ref().map(timestamp_to_micros).unwrap_or(0),
            update_time: d.update_time.as_ref().map(timestamp_to_micros).unwrap_or(0),
            model_bytes: entry.model_bytes,
            resource: d.encode_to_vec(),
        };
        let txn = self.db().begin().await?;
        let active = deployment_rows::ActiveModel::from(row);
        if insert {
            match deployment_rows::Entity::insert(active)
                .exec_without_returning(&txn)
                .await
            {
                Ok(_) => {}
                Err(err) if kiln_store::is_unique_violation(&err) => {
                    txn.rollback().await?;
                    return Err(kiln_core::Error::already_exists(&name).into());
                }
                Err(err) => return Err(err.into()),
            }
        } else {
            active.reset_all().update(&txn).await?;
        }
        if let Some((dm, event_type, body)) = extra {
            self.write_deployed_model(&txn, dm, true).await?;
            self.queue_event(&txn, event_type, &name.account, &dm.name, body)
                .await?;
        }
        match event {
            Some((event_type, body)) => {
                self.inner
                    .outbox
                    .commit_event(txn, SOURCE, event_type, &name.account, &d.name, body)
                    .await?
            }
            None => self.inner.outbox.commit(txn).await?,
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
            create_time: dm
                .create_time
                .as_ref()
                .map(timestamp_to_micros)
                .unwrap_or(0),
            update_time: dm
                .update_time
                .as_ref()
                .map(timestamp_to_micros)
                .unwrap_or(0),
            resource: dm.encode_to_vec(),
        };
        let active = dm_rows::ActiveModel::from(row);
        if insert {
            match dm_rows::Entity::insert(active)
                .exec_without_returning(conn)
                .await
            {
                Ok(_) => Ok(()),
                Err(err) if kiln_store::is_unique_violation(&err) => {
                    Err(kiln_core::Error::already_exists(&name).into())
                }
                Err(err) => Err(err.into()),
            }
        } else {
            active.reset_all().update(conn).await?;
            Ok(())
        }
    }

    /// Writes a deployed model and its event in one transaction.
    pub(crate) async fn save_deployed_model(
        &self,
        dm: &DeployedModel,
        insert: bool,
        event_type: &str,
        body: Body,
    ) -> Result<()> {
        let account = ChildName::parse("name", "deployedModels", &dm.name, None)?.account;
        let txn = self.db().begin().await?;
        if let Err(err) = self.write_deployed_model(&txn, dm, insert).await {
            txn.rollback().await?;
            return Err(err);
        }
        self.inner
            .outbox
            .commit_event(txn, SOURCE, event_type, &account, &dm.name, body)
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
        self.inner
            .outbox
            .commit_event(
                txn,
                SOURCE,
                "scheduler.deployed_model.deleted",
                &name.account,
                &dm.name,
                Body::DeployedModelDeleted(kiln_proto::events::v1::DeployedModelDeleted {
                    name: dm.name.clone(),
                    model: dm.model.clone(),
                    deployment: dm.deployment.clone(),
                }),
            )
            .await?;
        Ok(())
    }

    async fn queue_event<C: sea_orm::ConnectionTrait>(
        &self,
        conn: &C,
        event_type: &str,
        account: &str,
        resource: &str,
        body: Body,
    ) -> Result<()> {
        let event = kiln_events::new_event(
            SOURCE,
            event_type,
            &format!("accounts/{account}"),
            resource,
            body,
        );
        self.inner.outbox.enqueue(conn, &event).await?;
        Ok(())
    }
}

pub(crate) fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M> {
    M::decode(bytes).map_err(|e| {
        kiln_core::Error::Internal(format!("stored resource does not decode: {e}")).into()
    })
}

pub(crate) fn now() -> prost_types::Timestamp {
    micros_to_timestamp(now_micros())
}
