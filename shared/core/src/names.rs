//! Resource names and IDs, as the seed defines them.
//!
//! An ID is 1–63 characters of `a-z`, `0-9` and `-`, not beginning or ending with `-`.
//! Names are `accounts/{a}`, `accounts/{a}/users/{u}`, `accounts/{a}/users/{u}/apiKeys/{k}`,
//! and `accounts/{a}/<collection>/{id}` for the other resources.

use crate::Error;

/// The system account that holds the public model library and the shared serverless deployments.
pub const SYSTEM_ACCOUNT: &str = "kiln";

/// Why `id` is not a valid resource ID, or `None` when it is.
pub fn id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        return Some("must not be empty");
    }
    if id.len() > 63 {
        return Some("must be at most 63 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Some("may contain only lowercase letters a-z, digits 0-9 and '-'");
    }
    if id.starts_with('-') || id.ends_with('-') {
        return Some("must not begin or end with '-'");
    }
    None
}

/// The account ID in a resource name (`accounts/acme/deployments/d` → `acme`); a bare ID is
/// itself.
pub fn account_of(name: &str) -> &str {
    let rest = name.strip_prefix("accounts/").unwrap_or(name);
    rest.split('/').next().unwrap_or_default()
}

/// The name of the account of `name` (an account ID, or any name under an account).
pub fn account_name(name: &str) -> String {
    format!("accounts/{}", account_of(name))
}

/// Checks a resource ID, naming `field` in the error.
pub fn validate_id(field: &str, id: &str) -> Result<(), Error> {
    match id_problem(id) {
        None => Ok(()),
        Some(problem) => Err(Error::invalid(
            field,
            format!("{problem} (got {id:?}); an ID is 1-63 characters of a-z, 0-9 and '-'"),
        )),
    }
}

/// Checks a display name: at most 256 characters, none of them a control character.
pub fn validate_display_name(field: &str, name: &str) -> Result<(), Error> {
    if name.chars().count() > 256 {
        return Err(Error::invalid(field, "must be at most 256 characters"));
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(
            field,
            format!(
                "must not contain control characters, found U+{:04X}",
                c as u32
            ),
        ));
    }
    Ok(())
}

/// Checks free text (a description): no NUL, which no database's text column holds.
pub fn validate_text(field: &str, text: &str) -> Result<(), Error> {
    if text.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL (U+0000)"));
    }
    Ok(())
}

/// The display name a new resource gets: the one given, else `default` (its ID, say).
pub fn display_name_or(given: &str, default: &str) -> String {
    if given.is_empty() { default } else { given }.to_owned()
}

/// Turns free text (an email's local part, a display name) into a valid ID stem:
/// lowercase, runs of other characters collapsed to one '-', trimmed, at most `max` long.
pub fn slugify(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(max).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// `accounts/{account}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AccountName {
    pub account: String,
}

impl AccountName {
    pub fn new(account: impl Into<String>) -> Self {
        Self {
            account: account.into(),
        }
    }

    /// Parses `accounts/{a}` or, where the API allows it, a bare account ID.
    pub fn parse(field: &str, name: &str) -> Result<Self, Error> {
        let id = match name.strip_prefix("accounts/") {
            Some(rest) => rest,
            None if !name.contains('/') => name,
            None => return Err(shape_error(field, name, "accounts/{account}")),
        };
        if id.contains('/') {
            return Err(shape_error(field, name, "accounts/{account}"));
        }
        validate_id(field, id)?;
        Ok(Self::new(id))
    }

    pub fn is_system(&self) -> bool {
        self.account == SYSTEM_ACCOUNT
    }
}

impl std::fmt::Display for AccountName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "accounts/{}", self.account)
    }
}

/// `accounts/{account}/<collection>/{id}`: a resource directly under an account.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChildName {
    pub account: String,
    pub collection: &'static str,
    pub id: String,
}

impl ChildName {
    /// Parses `accounts/{a}/{collection}/{id}`; when `default_account` is given, the bare ID
    /// is accepted too and taken to be in that account.
    pub fn parse(
        field: &str,
        collection: &'static str,
        name: &str,
        default_account: Option<&str>,
    ) -> Result<Self, Error> {
        let expected = format!("accounts/{{account}}/{collection}/{{id}}");
        let parts: Vec<&str> = name.split('/').collect();
        let (account, id) = match parts.as_slice() {
            ["accounts", account, c, id] if *c == collection => (*account, *id),
            [id] if default_account.is_some() && !id.is_empty() => {
                (default_account.unwrap_or_default(), *id)
            }
            _ => return Err(shape_error(field, name, &expected)),
        };
        validate_id(field, account)?;
        validate_id(field, id)?;
        Ok(Self {
            account: account.to_owned(),
            collection,
            id: id.to_owned(),
        })
    }

    pub fn account_name(&self) -> AccountName {
        AccountName::new(self.account.clone())
    }
}

impl std::fmt::Display for ChildName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accounts/{}/{}/{}",
            self.account, self.collection, self.id
        )
    }
}

/// `accounts/{account}/users/{user}`.
pub type UserName = ChildName;

/// Parses a user name (`accounts/{a}/users/{u}`).
pub fn parse_user_name(field: &str, name: &str) -> Result<UserName, Error> {
    ChildName::parse(field, "users", name, None)
}

/// `accounts/{account}/users/{user}/apiKeys/{key}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApiKeyName {
    pub account: String,
    pub user: String,
    pub key: String,
}

impl ApiKeyName {
    pub fn parse(field: &str, name: &str) -> Result<Self, Error> {
        let parts: Vec<&str> = name.split('/').collect();
        match parts.as_slice() {
            ["accounts", account, "users", user, "apiKeys", key] => {
                validate_id(field, account)?;
                validate_id(field, user)?;
                validate_id(field, key)?;
                Ok(Self {
                    account: (*account).to_owned(),
                    user: (*user).to_owned(),
                    key: (*key).to_owned(),
                })
            }
            _ => Err(shape_error(
                field,
                name,
                "accounts/{account}/users/{user}/apiKeys/{key}",
            )),
        }
    }

    pub fn user_name(&self) -> UserName {
        ChildName {
            account: self.account.clone(),
            collection: "users",
            id: self.user.clone(),
        }
    }
}

impl std::fmt::Display for ApiKeyName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accounts/{}/users/{}/apiKeys/{}",
            self.account, self.user, self.key
        )
    }
}

fn shape_error(field: &str, name: &str, expected: &str) -> Error {
    if name.is_empty() {
        Error::invalid(field, format!("is required; expected {expected}"))
    } else {
        Error::invalid(field, format!("expected {expected}, got {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_account_is_read_from_any_name_under_it() {
        assert_eq!(account_of("accounts/acme/deployments/d"), "acme");
        assert_eq!(account_of("accounts/acme"), "acme");
        assert_eq!(account_of("acme"), "acme");
        assert_eq!(account_of(""), "");
        assert_eq!(account_name("acme"), "accounts/acme");
        assert_eq!(account_name("accounts/acme/models/m"), "accounts/acme");
    }

    #[test]
    fn ids_follow_the_seed_rule() {
        for ok in ["a", "acme", "my-model-2", &"a".repeat(63), "0x"] {
            assert!(id_problem(ok).is_none(), "{ok} should be valid");
        }
        for bad in [
            "",
            "Acme",
            "-a",
            "a-",
            &"a".repeat(64),
            "é",
            "a_b",
            "a.b",
            "a/b",
        ] {
            assert!(id_problem(bad).is_some(), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn names_parse_and_name_the_field() {
        let n = ChildName::parse("name", "users", "accounts/acme/users/bob", None).unwrap();
        assert_eq!(n.to_string(), "accounts/acme/users/bob");
        let bare = ChildName::parse("name", "models", "m1", Some("acme")).unwrap();
        assert_eq!(bare.to_string(), "accounts/acme/models/m1");
        let err =
            ChildName::parse("user.name", "users", "accounts/Acme/users/bob", None).unwrap_err();
        assert!(err.to_string().contains("user.name"), "{err}");
        assert!(AccountName::parse("name", "accounts/a/b").is_err());
        let k = ApiKeyName::parse("name", "accounts/a/users/u/apiKeys/k1").unwrap();
        assert_eq!(k.user_name().to_string(), "accounts/a/users/u");
    }

    #[test]
    fn slugify_makes_ids() {
        assert_eq!(
            slugify("John.Doe+test@Example.com", 40),
            "john-doe-test-example-com"
        );
        assert_eq!(slugify("--x--", 40), "x");
        assert_eq!(slugify("abc-def", 4), "abc");
    }
}
