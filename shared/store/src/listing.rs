//! One page of an AIP list: count, order (primary key last, so pages are stable), offset and
//! limit, and the signed token of the next page.

use kiln_core::page::{Page, PageTokens};
use sea_orm::{
    ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Order, PaginatorTrait, QueryOrder,
    QuerySelect, Select,
};

/// One page of results.
#[derive(Debug)]
pub struct Listing<M> {
    pub items: Vec<M>,
    pub next_page_token: String,
    pub total_size: i32,
}

impl<M> Listing<M> {
    pub fn map<N>(self, f: impl FnMut(M) -> N) -> Listing<N> {
        Listing {
            items: self.items.into_iter().map(f).collect(),
            next_page_token: self.next_page_token,
            total_size: self.total_size,
        }
    }
}

/// A list failure: a bad page request or the database.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Request(#[from] kiln_core::Error),
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// Runs `select` for the page `page_size`/`page_token` asks, in `order` then `tie_break`.
/// `scope` binds the page token to this listing (collection, parent, filter, order, caller).
#[allow(clippy::too_many_arguments)]
pub async fn list_page<E, C>(
    db: &C,
    tokens: &PageTokens,
    select: Select<E>,
    scope: &str,
    page_size: i32,
    page_token: &str,
    order: Vec<(E::Column, Order)>,
    tie_break: Vec<E::Column>,
) -> Result<Listing<E::Model>, ListError>
where
    E: EntityTrait,
    E::Model: FromQueryResult + Send + Sync,
    C: ConnectionTrait,
{
    let page = Page::from_request(tokens, scope, page_size, page_token)?;
    let total = select.clone().count(db).await?;
    let mut query = select;
    for (column, dir) in order {
        query = query.order_by(column, dir);
    }
    for column in tie_break {
        query = query.order_by(column, Order::Asc);
    }
    let items = query.offset(page.offset).limit(page.limit).all(db).await?;
    Ok(Listing {
        items,
        next_page_token: page.next_token(tokens, scope, total),
        total_size: i32::try_from(total).unwrap_or(i32::MAX),
    })
}
