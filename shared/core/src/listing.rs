//! One listing layer for every List RPC. A collection declares its fields once (which can be
//! filtered, which ordered, how a filter value reads, and what its primary key is); a request
//! becomes a checked [`Query`] of terms, sort keys and a page; the query runs against the
//! database (kiln-store) or over items held in memory ([`Query::page_of`]).
//!
//! A field's `key` is what reaches the data: a database column, or a function that reads the
//! value from an item in memory.

use std::cmp::Ordering;

use crate::Error;
use crate::page::{Page, PageTokens, enum_filter_value, parse_filter, parse_order_by};

/// What a List request asks, whatever its message type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListRequest {
    pub parent: String,
    pub page_size: i32,
    pub page_token: String,
    pub filter: String,
    pub order_by: String,
}

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

/// How a field's value is written in a filter.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Compared as written.
    Text,
    /// A resource name: a filter value without '/' matches its last ID.
    Name,
    /// An enum, by name (`READY`) or number.
    Enum(fn(&str) -> Option<i32>),
    /// `true` or `false`.
    Bool,
    /// A number; ordering only for times (micros) and counts.
    Int,
}

/// A value a filter compares with, or an item's sort key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Text(String),
    Int(i64),
    Bool(bool),
}

/// A field of a collection, reached through `key`.
#[derive(Debug)]
pub struct Field<K> {
    pub name: &'static str,
    pub key: K,
    pub kind: Kind,
    /// Whether `filter` may name it.
    pub filter: bool,
    /// Whether `order_by` may name it.
    pub order: bool,
}

impl<K> Field<K> {
    /// A field that can be filtered on and ordered by.
    pub const fn both(name: &'static str, key: K, kind: Kind) -> Self {
        Self {
            name,
            key,
            kind,
            filter: true,
            order: true,
        }
    }

    pub const fn filter(name: &'static str, key: K, kind: Kind) -> Self {
        Self {
            name,
            key,
            kind,
            filter: true,
            order: false,
        }
    }

    pub const fn order(name: &'static str, key: K) -> Self {
        Self {
            name,
            key,
            kind: Kind::Int,
            filter: false,
            order: true,
        }
    }
}

/// The listable fields of one collection.
#[derive(Debug)]
pub struct Fields<K: 'static> {
    /// The collection's name in page-token scopes (`models`).
    pub collection: &'static str,
    pub fields: &'static [Field<K>],
    /// The primary key: the last sort key of every query, so pages are stable.
    pub tie_break: K,
}

/// One `field = value` (or `!=`) term.
#[derive(Debug)]
pub struct Term<K: 'static> {
    pub field: &'static Field<K>,
    pub negated: bool,
    pub value: Value,
}

/// A checked List request.
#[derive(Debug)]
pub struct Query<K: 'static> {
    pub terms: Vec<Term<K>>,
    /// Sort keys, the tie-break last; `true` is descending.
    pub order: Vec<(K, bool)>,
    pub page: Page,
    /// What the page token is bound to: collection, parent, filter, order, and what the
    /// caller adds (its account, flags that change the result).
    pub scope: String,
}

impl<K: Copy> Fields<K> {
    /// Checks `request` against the fields (unknown fields and bad values name `filter` or
    /// `order_by`) and its page token against `scope_extra` (the caller's account and
    /// whatever else changes the result).
    pub fn query(
        &'static self,
        tokens: &PageTokens,
        request: &ListRequest,
        scope_extra: &str,
    ) -> Result<Query<K>, Error> {
        let filterable: Vec<&str> = self.names(|f| f.filter);
        let orderable: Vec<&str> = self.names(|f| f.order);
        let terms = parse_filter(&request.filter, &filterable)?
            .into_iter()
            .map(|term| {
                let field = self.field(&term.field);
                Ok(Term {
                    field,
                    negated: term.negated,
                    value: filter_value(field, &term.value)?,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let mut order: Vec<(K, bool)> = parse_order_by(&request.order_by, &orderable)?
            .into_iter()
            .map(|key| (self.field(&key.field).key, key.descending))
            .collect();
        order.push((self.tie_break, false));
        let scope = format!(
            "{}|{}|{}|{}|{scope_extra}",
            self.collection, request.parent, request.filter, request.order_by
        );
        let page = Page::from_request(tokens, &scope, request.page_size, &request.page_token)?;
        Ok(Query {
            terms,
            order,
            page,
            scope,
        })
    }

    fn names(&self, keep: impl Fn(&Field<K>) -> bool) -> Vec<&'static str> {
        self.fields
            .iter()
            .filter(|f| keep(f))
            .map(|f| f.name)
            .collect()
    }

    fn field(&'static self, name: &str) -> &'static Field<K> {
        self.fields
            .iter()
            .find(|f| f.name == name)
            .expect("parse_filter and parse_order_by accept declared names only")
    }
}

fn filter_value<K>(field: &Field<K>, text: &str) -> Result<Value, Error> {
    Ok(match field.kind {
        Kind::Text | Kind::Name => Value::Text(text.to_owned()),
        Kind::Enum(from_name) => Value::Int(enum_filter_value(field.name, text, from_name)?.into()),
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            other => {
                return Err(Error::invalid(
                    "filter",
                    format!("{} is true or false, got {other:?}", field.name),
                ));
            }
        },
        Kind::Int => Value::Int(text.parse().map_err(|_| {
            Error::invalid(
                "filter",
                format!("{} is a whole number, got {text:?}", field.name),
            )
        })?),
    })
}

impl<K> Term<K> {
    /// Whether an item whose field holds `actual` passes this term.
    pub fn admits(&self, actual: &Value) -> bool {
        let equal = match (&self.field.kind, actual, &self.value) {
            (Kind::Name, Value::Text(name), Value::Text(wanted)) if !wanted.contains('/') => {
                name.rsplit('/').next() == Some(wanted.as_str())
            }
            _ => actual == &self.value,
        };
        equal != self.negated
    }
}

/// Reads a field's value from an item held in memory.
pub type Getter<T> = fn(&T) -> Value;

impl<T> Query<Getter<T>> {
    /// Filters, orders and pages items held in memory.
    pub fn page_of(&self, tokens: &PageTokens, items: Vec<T>) -> Listing<T> {
        let mut items: Vec<T> = items
            .into_iter()
            .filter(|item| {
                self.terms
                    .iter()
                    .all(|term| term.admits(&(term.field.key)(item)))
            })
            .collect();
        items.sort_by(|a, b| {
            self.order
                .iter()
                .map(|(get, descending)| {
                    let ordering = get(a).cmp(&get(b));
                    if *descending {
                        ordering.reverse()
                    } else {
                        ordering
                    }
                })
                .find(|o| *o != Ordering::Equal)
                .unwrap_or(Ordering::Equal)
        });
        let total = items.len() as u64;
        let items = items
            .into_iter()
            .skip(self.page.offset as usize)
            .take(self.page.limit as usize)
            .collect();
        Listing {
            items,
            next_page_token: self.page.next_token(tokens, &self.scope, total),
            total_size: i32::try_from(total).unwrap_or(i32::MAX),
        }
    }
}

/// A timestamp as a sort key (micros; unset sorts first).
pub fn time_value(time: &Option<prost_types::Timestamp>) -> Value {
    Value::Int(crate::time::micros_of(time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone)]
    struct Node {
        name: String,
        state: i32,
        ready: bool,
        created: i64,
    }

    fn state_from_name(name: &str) -> Option<i32> {
        match name {
            "READY" => Some(1),
            "LOST" => Some(2),
            _ => None,
        }
    }

    static NODES: Fields<Getter<Node>> = Fields {
        collection: "nodes",
        fields: &[
            Field::both("name", |n| Value::Text(n.name.clone()), Kind::Name),
            Field::filter(
                "state",
                |n| Value::Int(n.state.into()),
                Kind::Enum(state_from_name),
            ),
            Field::filter("ready", |n| Value::Bool(n.ready), Kind::Bool),
            Field::order("create_time", |n| Value::Int(n.created)),
        ],
        tie_break: |n| Value::Text(n.name.clone()),
    };

    fn nodes() -> Vec<Node> {
        (0..5)
            .map(|i| Node {
                name: format!("nodes/n{i}"),
                state: if i % 2 == 0 { 1 } else { 2 },
                ready: i < 2,
                created: 100 - i,
            })
            .collect()
    }

    fn list(request: ListRequest) -> Result<Listing<Node>, Error> {
        let tokens = PageTokens::new(b"k");
        Ok(NODES
            .query(&tokens, &request, "")?
            .page_of(&tokens, nodes()))
    }

    fn names(listing: &Listing<Node>) -> Vec<&str> {
        listing.items.iter().map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn filters_read_each_kind_and_negate() {
        let ready = list(ListRequest {
            filter: "state = READY AND ready = false".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&ready), ["nodes/n2", "nodes/n4"]);
        let not_lost = list(ListRequest {
            filter: "state != 2".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(not_lost.total_size, 3);
        let by_id = list(ListRequest {
            filter: "name = n3".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&by_id), ["nodes/n3"]);
    }

    #[test]
    fn bad_filters_and_orders_name_the_field() {
        for (filter, order_by, field) in [
            ("state = SLEEPY", "", "filter"),
            ("ready = maybe", "", "filter"),
            ("create_time = 3", "", "filter"),
            ("", "state", "order_by"),
        ] {
            let err = list(ListRequest {
                filter: filter.into(),
                order_by: order_by.into(),
                ..Default::default()
            })
            .unwrap_err();
            assert!(
                err.to_string().starts_with(field),
                "{filter}/{order_by}: {err}"
            );
        }
    }

    #[test]
    fn order_then_tie_break_then_pages_that_chain() {
        let first = list(ListRequest {
            order_by: "create_time".into(),
            page_size: 2,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&first), ["nodes/n4", "nodes/n3"]);
        assert_eq!(first.total_size, 5);
        let second = list(ListRequest {
            order_by: "create_time".into(),
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&second), ["nodes/n2", "nodes/n1"]);
        // A token is bound to its request: another order refuses it.
        let err = list(ListRequest {
            order_by: "name desc".into(),
            page_token: first.next_page_token,
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with("page_token"), "{err}");
        let by_name = list(ListRequest {
            order_by: "name desc".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(names(&by_name)[0], "nodes/n4");
        assert!(by_name.next_page_token.is_empty());
    }
}
