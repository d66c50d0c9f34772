//! Identity's state, shared by its handlers, and what the resource modules share: reads of
//! accounts and users, the list query, and committing a change with its event.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::AuthCache;
use kiln_core::listing::{Listing, Query};
use kiln_core::page::PageTokens;
use kiln_events::Body;
use kiln_events::records::{HasRecords, Records};
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
    pub(crate) async fn commit_with_event(
        &self,
        txn: sea_orm::DatabaseTransaction,
        event_type: &str,
        account: &str,
        resource: &str,
        body: Body,
    ) -> Result<()> {
        self.outbox()
            .commit_event(txn, event_type, account, resource, body)
            .await?;
        // The change applies to this replica's next call at once (others hear the event).
        self.invalidate(resource);
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
