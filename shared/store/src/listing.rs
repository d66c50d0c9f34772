//! List queries against the database: a checked [`Query`] (kiln-core's listing layer) becomes
//! a count, a WHERE of its terms, its order (primary key last, so pages are stable), offset
//! and limit, and the signed token of the next page.

use kiln_core::listing::{Kind, Query, Value};
use kiln_core::page::PageTokens;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult, Order, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Select,
};

pub use kiln_core::listing::Listing;

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
