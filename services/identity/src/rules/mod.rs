//! Identity's decisions as pure functions (no database, no async): what a request may do and
//! what it writes. The resource modules fetch, call these, and store what they return.

pub(crate) mod accounts;
pub(crate) mod api_keys;
pub(crate) mod users;

use kiln_core::Error;
use rand::Rng;

/// Email addresses are at most this long (RFC 5321's path limit less the brackets).
const MAX_EMAIL_LEN: usize = 254;

/// Checks an email address enough to catch mistakes: one '@', text on both sides, a dot in
/// the domain, no spaces, at most 254 characters.
pub(crate) fn validate_email(field: &str, email: &str) -> Result<(), Error> {
    let ok = email.len() <= MAX_EMAIL_LEN
        && !email.chars().any(char::is_whitespace)
        && match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if ok {
        Ok(())
    } else if email.is_empty() {
        Err(Error::invalid(field, "is required"))
    } else {
        Err(Error::invalid(
            field,
            format!("{email:?} is not an email address"),
        ))
    }
}

/// The characters of generated IDs: a valid resource ID needs nothing else.
const ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A random ID of `len` characters from [`ID_ALPHABET`].
pub(crate) fn random_id(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())] as char)
        .collect()
}

/// `Ok` when `allowed`, else PERMISSION_DENIED saying `rule`.
fn permit(allowed: bool, rule: &str) -> Result<(), Error> {
    if allowed {
        Ok(())
    } else {
        Err(Error::PermissionDenied(rule.to_owned()))
    }
}

/// `email` when it is a valid email address for `field`.
fn valid_email(field: &str, email: &str) -> Result<String, Error> {
    validate_email(field, email)?;
    Ok(email.to_owned())
}

/// `name` when it is a valid display name for `field`.
fn valid_display_name(field: &str, name: &str) -> Result<String, Error> {
    kiln_core::names::validate_display_name(field, name)?;
    Ok(name.to_owned())
}

/// What an update writes: the changed row and the fields it changed (the event's mask).
#[derive(Debug, PartialEq)]
pub(crate) struct Change<M> {
    pub model: M,
    pub paths: Vec<String>,
}

/// Applies an update to a copy of `existing`: `set` sets each of `paths`, and `stamp` marks
/// the copy changed. `None` when nothing changes, so that nothing is written.
fn apply_update<M: Clone + PartialEq>(
    existing: &M,
    paths: Vec<String>,
    mut set: impl FnMut(&mut M, &str) -> Result<(), Error>,
    stamp: impl FnOnce(&mut M),
) -> Result<Option<Change<M>>, Error> {
    let mut model = existing.clone();
    for path in &paths {
        set(&mut model, path)?;
    }
    if model == *existing {
        return Ok(None);
    }
    stamp(&mut model);
    Ok(Some(Change { model, paths }))
}

/// The error for a mask path that is not one of `fields`.
fn not_updatable(path: &str, fields: &str) -> Error {
    Error::invalid(
        "update_mask",
        format!("{path:?} is not an updatable field; fields: {fields}"),
    )
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Principals and rows for the rules' tests.

    use kiln_core::auth::{Principal, Role};
    use kiln_proto::identity::v1::{account, user};

    use crate::db::{account as accounts, user as users};

    pub fn principal(account: &str, user: &str, roles: &[Role]) -> Principal {
        Principal {
            account: account.to_owned(),
            user: user.to_owned(),
            api_key: format!("accounts/{account}/users/{user}/apiKeys/k"),
            roles: roles.to_vec(),
            suspend_state: 0,
        }
    }

    /// A plain user of `account`.
    pub fn member(account: &str, user: &str) -> Principal {
        principal(account, user, &[Role::User])
    }

    /// An account admin of `account`.
    pub fn admin(account: &str, user: &str) -> Principal {
        principal(account, user, &[Role::AccountAdmin])
    }

    /// An admin of the system account.
    pub fn platform_admin() -> Principal {
        principal("kiln", "admin", &[Role::AccountAdmin, Role::PlatformAdmin])
    }

    pub fn account_row(id: &str) -> accounts::Model {
        accounts::Model {
            id: id.to_owned(),
            display_name: "Acme".to_owned(),
            account_type: account::AccountType::Enterprise as i32,
            email: "owner@acme.example".to_owned(),
            state: account::State::Ready as i32,
            status_code: 0,
            status_message: String::new(),
            suspend_state: account::SuspendState::Unsuspended as i32,
            create_time: 10,
            update_time: 10,
        }
    }

    pub fn user_row(account: &str, user: &str, role: &str) -> users::Model {
        users::Model {
            account_id: account.to_owned(),
            user_id: user.to_owned(),
            email: format!("{user}@{account}.example"),
            display_name: user.to_owned(),
            role: role.to_owned(),
            service_account: false,
            state: user::State::Ready as i32,
            create_time: 10,
            update_time: 10,
        }
    }

    pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        })
    }

    /// The field an INVALID_ARGUMENT names, or a panic naming what came instead.
    pub fn invalid_field<T: std::fmt::Debug>(result: Result<T, kiln_core::Error>) -> String {
        match result {
            Err(kiln_core::Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plausible_emails_pass() {
        for email in [
            "a@b.co",
            "jane.doe+kiln@mail.example.com",
            "x@sub.domain.io",
        ] {
            assert_eq!(validate_email("f", email), Ok(()), "{email}");
        }
        let longest = format!("{}@example.com", "a".repeat(MAX_EMAIL_LEN - 12));
        assert_eq!(longest.len(), MAX_EMAIL_LEN);
        assert_eq!(validate_email("f", &longest), Ok(()));
    }

    #[test]
    fn an_empty_email_is_required_and_a_malformed_one_is_named() {
        assert_eq!(
            validate_email("user.email", ""),
            Err(Error::invalid("user.email", "is required"))
        );
        for email in [
            "plain",
            "@example.com",
            "jane@",
            "jane@example",
            "jane@.example.com",
            "jane@example.com.",
            "jane@a@example.com",
            "jane doe@example.com",
            "jane@example.com\t",
        ] {
            assert_eq!(
                validate_email("account.email", email),
                Err(Error::invalid(
                    "account.email",
                    format!("{email:?} is not an email address")
                )),
                "{email}"
            );
        }
        let too_long = format!("{}@example.com", "a".repeat(MAX_EMAIL_LEN - 11));
        assert!(validate_email("f", &too_long).is_err());
    }

    #[test]
    fn random_ids_are_valid_ids_of_the_asked_length() {
        for len in [1, 6, 16, 63] {
            let id = random_id(len);
            assert_eq!(id.len(), len);
            assert!(id.bytes().all(|b| ID_ALPHABET.contains(&b)), "{id}");
        }
        assert_ne!(random_id(16), random_id(16));
    }
}
