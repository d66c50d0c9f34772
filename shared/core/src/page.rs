//! List requests: page sizes, signed page tokens, and the AIP-160 filter and order_by subset.
//!
//! A page token is `offset || HMAC(scope || offset)`, base64url. The scope binds it to the
//! collection, parent, filter, order and caller's account, so a client can neither forge an
//! offset nor carry a token over into another account's listing.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::Error;

pub const DEFAULT_PAGE_SIZE: u64 = 50;
pub const MAX_PAGE_SIZE: u64 = 200;

/// Signs and checks page tokens.
#[derive(Clone)]
pub struct PageTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens(..)")
    }
}

impl PageTokens {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, scope: &str, offset: u64) -> [u8; 16] {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("hmac accepts any key length");
        mac.update(scope.as_bytes());
        mac.update(&offset.to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    pub fn encode(&self, scope: &str, offset: u64) -> String {
        let mut bytes = offset.to_be_bytes().to_vec();
        bytes.extend_from_slice(&self.mac(scope, offset));
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The offset a token stands for; INVALID_ARGUMENT naming `page_token` when it was not
    /// issued for this same `scope`.
    pub fn decode(&self, scope: &str, token: &str) -> Result<u64, Error> {
        let invalid = || {
            Error::invalid(
                "page_token",
                "is not a token this listing issued (tampered, or from a different request)",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        if bytes.len() != 24 {
            return Err(invalid());
        }
        let offset = u64::from_be_bytes(bytes[..8].try_into().map_err(|_| invalid())?);
        let expected = self.mac(scope, offset);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&expected[..], &bytes[8..])) {
            return Err(invalid());
        }
        Ok(offset)
    }
}

/// A validated page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub offset: u64,
    pub limit: u64,
}

impl Page {
    /// Applies the AIP defaults: 0 means 50, more than 200 is capped at 200, negative is invalid.
    pub fn from_request(
        tokens: &PageTokens,
        scope: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<Self, Error> {
        if page_size < 0 {
            return Err(Error::invalid("page_size", "must not be negative"));
        }
        let limit = match page_size as u64 {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let offset = if page_token.is_empty() {
            0
        } else {
            tokens.decode(scope, page_token)?
        };
        Ok(Self { offset, limit })
    }

    /// The token for the page after this one, given how many rows match in all.
    pub fn next_token(&self, tokens: &PageTokens, scope: &str, total: u64) -> String {
        let next = self.offset + self.limit;
        if next < total {
            tokens.encode(scope, next)
        } else {
            String::new()
        }
    }
}

/// One `field = value` (or `!=`) term of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterTerm {
    pub field: String,
    pub negated: bool,
    pub value: String,
}

/// Parses the AIP-160 subset Kiln supports: `field = "value"` or `field != value` terms
/// joined by `AND`, each field from `allowed`.
pub fn parse_filter(filter: &str, allowed: &[&str]) -> Result<Vec<FilterTerm>, Error> {
    let mut terms = Vec::new();
    let mut rest = filter.trim();
    while !rest.is_empty() {
        let (term, tail) = match find_and(rest) {
            Some(i) => (&rest[..i], &rest[i + 3..]),
            None => (rest, ""),
        };
        terms.push(parse_term(term.trim(), allowed)?);
        rest = tail.trim();
        if rest.is_empty() && !tail.is_empty() {
            return Err(Error::invalid("filter", "ends with AND"));
        }
    }
    Ok(terms)
}

/// Byte index of the next ` AND ` outside quotes.
fn find_and(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_quotes = !in_quotes,
            b' ' if !in_quotes && s[i..].starts_with(" AND ") => return Some(i + 1),
            _ => {}
        }
        i += 1;
    }
    None
}

fn parse_term(term: &str, allowed: &[&str]) -> Result<FilterTerm, Error> {
    let (field, negated, value) = if let Some((f, v)) = term.split_once("!=") {
        (f, true, v)
    } else if let Some((f, v)) = term.split_once('=') {
        (f, false, v)
    } else {
        return Err(Error::invalid(
            "filter",
            format!("expected field = \"value\", got {term:?}"),
        ));
    };
    let field = field.trim();
    if !allowed.contains(&field) {
        return Err(Error::invalid(
            "filter",
            format!("cannot filter on {field:?}; fields: {}", allowed.join(", ")),
        ));
    }
    let value = value.trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if value.is_empty() {
        return Err(Error::invalid("filter", format!("no value for {field}")));
    }
    Ok(FilterTerm {
        field: field.to_owned(),
        negated,
        value: value.to_owned(),
    })
}

/// Reads an enum filter value given by name (`READY`) or number.
pub fn enum_filter_value(
    field: &str,
    value: &str,
    from_name: fn(&str) -> Option<i32>,
) -> Result<i32, Error> {
    value
        .parse::<i32>()
        .ok()
        .or_else(|| from_name(value))
        .ok_or_else(|| Error::invalid("filter", format!("{value:?} is not a value of {field}")))
}

/// Paths of an update mask; empty means "every field the request sets".
pub fn mask_paths(mask: Option<prost_types::FieldMask>) -> Vec<String> {
    mask.map(|m| m.paths).unwrap_or_default()
}

/// One key of an `order_by`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderKey {
    pub field: String,
    pub descending: bool,
}

/// Parses `order_by`: comma-separated `field [asc|desc]`, each field from `allowed`.
pub fn parse_order_by(order_by: &str, allowed: &[&str]) -> Result<Vec<OrderKey>, Error> {
    let mut keys = Vec::new();
    for part in order_by.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let mut words = part.split_whitespace();
        let field = words.next().unwrap_or_default();
        if !allowed.contains(&field) {
            return Err(Error::invalid(
                "order_by",
                format!("cannot order by {field:?}; fields: {}", allowed.join(", ")),
            ));
        }
        let descending = match words.next() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => {
                return Err(Error::invalid(
                    "order_by",
                    format!("expected asc or desc after {field}, got {other:?}"),
                ));
            }
        };
        if words.next().is_some() {
            return Err(Error::invalid(
                "order_by",
                format!("malformed term {part:?}"),
            ));
        }
        keys.push(OrderKey {
            field: field.to_owned(),
            descending,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let tokens = PageTokens::new(b"secret");
        let t = tokens.encode("users|accounts/a", 100);
        assert_eq!(tokens.decode("users|accounts/a", &t).unwrap(), 100);
        // Another account's listing: refused.
        assert!(tokens.decode("users|accounts/b", &t).is_err());
        // A forged offset: refused.
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        raw[7] ^= 1;
        let forged = URL_SAFE_NO_PAD.encode(raw);
        let err = tokens.decode("users|accounts/a", &forged).unwrap_err();
        assert!(err.to_string().starts_with("page_token"));
        assert!(tokens.decode("users|accounts/a", "garbage!").is_err());
    }

    #[test]
    fn page_sizes_follow_aip() {
        let tokens = PageTokens::new(b"k");
        assert_eq!(Page::from_request(&tokens, "s", 0, "").unwrap().limit, 50);
        assert_eq!(
            Page::from_request(&tokens, "s", 1000, "").unwrap().limit,
            200
        );
        assert!(Page::from_request(&tokens, "s", -1, "").is_err());
    }

    #[test]
    fn filters_and_orders_parse() {
        let f = parse_filter(r#"role = "admin" AND state != READY"#, &["role", "state"]).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].value, "admin");
        assert!(f[1].negated);
        assert!(parse_filter("email = x", &["role"]).is_err());
        assert!(parse_filter("role", &["role"]).is_err());
        let o = parse_order_by("create_time desc, name", &["create_time", "name"]).unwrap();
        assert!(o[0].descending && !o[1].descending);
        assert!(parse_order_by("name sideways", &["name"]).is_err());
    }
}
