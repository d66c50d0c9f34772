//! Identity's state, shared by its handlers, and what the resource modules share: reads of
//! accounts and users, the list query, and committing a change with its event.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::auth::AuthCache;
use kiln_core::page::{FilterTerm, OrderKey, PageTokens};
use kiln_events::Body;
use kiln_events::outbox::Outbox;
use kiln_store::listing::Listing;
use sea_orm::sea_query::SimpleExpr;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, FromQueryResult, Order, Select};

use crate::account_cache::AccountCache;
use crate::db::{account as accounts, user as users};
use crate::error::Result;

/// The name events carry in `source`.
pub(crate) const SOURCE: &str = "kiln-identity";
/// The service's name in the outbox and migrations.
pub(crate) const SERVICE: &str = "identity";

/// Identity's state, shared by its handlers. Its operations live in the resource modules.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    outbox: Outbox,
    pages: PageTokens,
    cache: Arc<AuthCache>,
    accounts: AccountCache,
}

pub(crate) fn term_expr(
    term: &FilterTerm,
    column: impl ColumnTrait,
    value: sea_orm::Value,
) -> SimpleExpr {
    if term.negated {
        column.ne(value)
    } else {
        column.eq(value)
    }
}

pub(crate) fn to_order(key: &OrderKey) -> Order {
    if key.descending {
        Order::Desc
    } else {
        Order::Asc
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
                db,
                outbox: Outbox::new(SERVICE),
                pages,
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

    /// Drops the principals cached for `resource` (a changed account, user or key), so that
    /// the change applies to the next call.
    pub(crate) fn forget_principals(&self, resource: &str) {
        self.inner.cache.invalidate(resource);
    }

    pub(crate) fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    pub(crate) fn db(&self) -> &DatabaseConnection {
        &self.inner.db
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
        self.inner
            .outbox
            .commit_event(txn, SOURCE, event_type, account, resource, body)
            .await?;
        self.inner.accounts.invalidate_resource(resource);
        Ok(())
    }

    /// An account straight from the database (for writes).
    pub(crate) async fn account(&self, id: &str) -> Result<Option<accounts::Model>> {
        Ok(accounts::Entity::find_by_id(id.to_owned())
            .one(&self.inner.db)
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
                .one(&self.inner.db)
                .await?,
        )
    }

    /// Runs a list query for one page (see [`kiln_store::listing::list_page`]).
    pub(crate) async fn list<E>(
        &self,
        select: Select<E>,
        scope: &str,
        page_size: i32,
        page_token: &str,
        order: Vec<(E::Column, Order)>,
        tie_break: Vec<E::Column>,
    ) -> Result<Listing<E::Model>>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        Ok(kiln_store::listing::list_page(
            &self.inner.db,
            &self.inner.pages,
            select,
            scope,
            page_size,
            page_token,
            order,
            tie_break,
        )
        .await?)
    }
}
