//! Identity's state, shared by its handlers, and what the resource modules share: reads of
//! accounts and users, the list query, and committing a change with its event.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::AuthCache;
use kiln_core::listing::{Listing, Query};
use kiln_core::page::PageTokens;
use kiln_events::outbox::Outbox;
use kiln_events::records::{HasRecords, Records};
use kiln_events::{Body, Event};
use kiln_proto::events::v1 as ev;
use kiln_proto::identity::v1::{Account, ApiKey, User};
use sea_orm::{DatabaseConnection, EntityTrait, FromQueryResult, Select};

use crate::account_cache::AccountCache;
use crate::db::{account as accounts, user as users};
use kiln_core::Result;

/// The service's name in the outbox and migrations.
pub(crate) const SERVICE: &str = "identity";

/// Identity's state, shared by its handlers. Its operations live in the resource modules.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    records: Records,
    cache: Arc<AuthCache>,
    accounts: AccountCache,
}

impl HasRecords for Identity {
    fn records(&self) -> &Records {
        &self.inner.records
    }
}

impl Identity {
    pub(crate) fn new(
        db: DatabaseConnection,
        pages: PageTokens,
        cache: Arc<AuthCache>,
        cache_ttl: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                records: Records::new(SERVICE, db, pages),
                cache,
                accounts: AccountCache::new(cache_ttl),
            }),
        }
    }

    /// Drops what this process caches about `resource` after a change elsewhere.
    pub(crate) fn invalidate(&self, resource: &str) {
        self.inner.accounts.invalidate_resource(resource);
        self.inner.cache.invalidate(resource);
    }

    /// Writes the change's event into the outbox inside `txn` and commits both together.
    pub(crate) async fn commit_change(
        &self,
        txn: sea_orm::DatabaseTransaction,
        change: Change<'_>,
    ) -> Result<()> {
        let event = change.event(self.outbox());
        self.outbox().commit_with(txn, &event).await?;
        // The change applies to this replica's next call at once (others hear the event).
        self.invalidate(&event.resource);
        Ok(())
    }

    /// An account straight from the database (for writes).
    pub(crate) async fn account(&self, id: &str) -> Result<Option<accounts::Model>> {
        Ok(accounts::Entity::find_by_id(id.to_owned())
            .one(self.db())
            .await?)
    }

    /// An account for reading: from the cache when fresh.
    pub(crate) async fn cached_account(&self, id: &str) -> Result<Option<accounts::Model>> {
        if let Some(hit) = self.inner.accounts.get(id) {
            return Ok(Some(hit));
        }
        let generation = self.inner.accounts.generation();
        let found = self.account(id).await?;
        if let Some(model) = &found {
            self.inner.accounts.insert(generation, model.clone());
        }
        Ok(found)
    }

    pub(crate) async fn user(&self, account: &str, user: &str) -> Result<Option<users::Model>> {
        Ok(
            users::Entity::find_by_id((account.to_owned(), user.to_owned()))
                .one(self.db())
                .await?,
        )
    }

    /// Runs a list query for one page.
    pub(crate) async fn list<E>(
        &self,
        query: &Query<E::Column>,
        select: Select<E>,
    ) -> Result<Listing<E::Model>>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        kiln_store::listing::list(self.db(), self.pages(), query, select).await
    }
}

/// A change to an identity resource, as the event that announces it.
pub(crate) enum Change<'a> {
    AccountCreated(&'a Account),
    /// The account and the paths that changed.
    AccountUpdated(&'a Account, Vec<String>),
    AccountDeleted(&'a str),
    UserCreated(&'a User),
    UserUpdated(&'a User, Vec<String>),
    UserDeleted(&'a str),
    ApiKeyCreated(&'a ApiKey),
    ApiKeyDeleted(&'a str),
}

impl Change<'_> {
    /// The change's event, from `outbox`'s service, in the account that holds the resource.
    pub(crate) fn event(self, outbox: &Outbox) -> Event {
        let mask = |paths| Some(prost_types::FieldMask { paths });
        let (event_type, resource, body) = match self {
            Self::AccountCreated(a) => (
                "identity.account.created",
                a.name.as_str(),
                Body::AccountCreated(ev::AccountCreated {
                    account: Some(a.clone()),
                }),
            ),
            Self::AccountUpdated(a, paths) => (
                "identity.account.updated",
                a.name.as_str(),
                Body::AccountUpdated(ev::AccountUpdated {
                    account: Some(a.clone()),
                    update_mask: mask(paths),
                }),
            ),
            Self::AccountDeleted(name) => (
                "identity.account.deleted",
                name,
                Body::AccountDeleted(ev::AccountDeleted { name: name.into() }),
            ),
            Self::UserCreated(u) => (
                "identity.user.created",
                u.name.as_str(),
                Body::UserCreated(ev::UserCreated {
                    user: Some(u.clone()),
                }),
            ),
            Self::UserUpdated(u, paths) => (
                "identity.user.updated",
                u.name.as_str(),
                Body::UserUpdated(ev::UserUpdated {
                    user: Some(u.clone()),
                    update_mask: mask(paths),
                }),
            ),
            Self::UserDeleted(name) => (
                "identity.user.deleted",
                name,
                Body::UserDeleted(ev::UserDeleted { name: name.into() }),
            ),
            Self::ApiKeyCreated(k) => (
                "identity.api_key.created",
                k.name.as_str(),
                Body::ApiKeyCreated(ev::ApiKeyCreated {
                    api_key: Some(k.clone()),
                }),
            ),
            Self::ApiKeyDeleted(name) => (
                "identity.api_key.deleted",
                name,
                Body::ApiKeyDeleted(ev::ApiKeyDeleted { name: name.into() }),
            ),
        };
        let account = kiln_core::names::account_of(resource);
        outbox.event(event_type, account, resource, body)
    }
}
