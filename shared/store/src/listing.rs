//! List queries against the database: a checked [`Query`] (kiln-core's listing layer) becomes
//! a count, a WHERE of its terms, its order (primary key last, so pages are stable), offset
//! and limit, and the signed token of the next page.

use kiln_core::listing::{Kind, Query, Value};
use kiln_core::page::{Page, PageTokens};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, Order,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Select,
};

pub use kiln_core::listing::Listing;

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

/// Runs `select` narrowed by `query`'s terms, for the page it asks, in its order.
pub async fn list<E, C>(
    db: &C,
    tokens: &PageTokens,
    query: &Query<E::Column>,
    select: Select<E>,
) -> Result<Listing<E::Model>, kiln_core::Error>
where
    E: EntityTrait,
    E::Model: FromQueryResult + Send + Sync,
    C: ConnectionTrait,
{
    let mut condition = Condition::all();
    for term in &query.terms {
        let value = column_value(term.field.kind, &term.value);
        let column = term.field.key;
        condition = condition.add(if term.negated {
            column.ne(value)
        } else {
            column.eq(value)
        });
    }
    let select = select.filter(condition);
    let total = select.clone().count(db).await?;
    let mut ordered = select;
    for (column, descending) in &query.order {
        ordered = ordered.order_by(*column, if *descending { Order::Desc } else { Order::Asc });
    }
    let items = ordered
        .offset(query.page.offset)
        .limit(query.page.limit)
        .all(db)
        .await?;
    Ok(Listing {
        items,
        next_page_token: query.page.next_token(tokens, &query.scope, total),
        total_size: i32::try_from(total).unwrap_or(i32::MAX),
    })
}

/// A filter value as its column stores it: enums as INTEGER, names by their last ID.
fn column_value(kind: Kind, value: &Value) -> sea_orm::Value {
    match (kind, value) {
        (Kind::Enum(_), Value::Int(v)) => i32::try_from(*v).unwrap_or(i32::MAX).into(),
        (Kind::Name, Value::Text(name)) => name.rsplit('/').next().unwrap_or(name).into(),
        (_, Value::Text(text)) => text.clone().into(),
        (_, Value::Int(v)) => (*v).into(),
        (_, Value::Bool(b)) => (*b).into(),
    }
}
