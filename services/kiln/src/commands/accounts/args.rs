//! The flags of `kiln create account|user|api-key`, and the requests they make.

use std::time::SystemTime;

use clap::Args;
use kiln_proto::identity::v1 as idv1;

use crate::commands::flags::{parse_duration, parse_optional_enum, parse_time};

#[derive(Debug, Args)]
pub struct CreateAccountArgs {
    pub account_id: Option<String>,
    #[arg(long)]
    pub email: Option<String>,
    #[arg(long)]
    pub display_name: Option<String>,
    /// developer or enterprise (default: enterprise when an ID is given).
    #[arg(long = "type")]
    pub account_type: Option<String>,
}

#[derive(Debug, Args)]
pub struct CreateUserArgs {
    pub user_id: String,
    #[arg(long)]
    pub email: String,
    #[arg(long)]
    pub display_name: Option<String>,
    /// admin or user.
    #[arg(long, default_value = "user")]
    pub role: String,
    #[arg(long)]
    pub service_account: bool,
}

#[derive(Debug, Args)]
pub struct CreateApiKeyArgs {
    /// The user ID the key belongs to.
    #[arg(long)]
    pub user: String,
    #[arg(long)]
    pub display_name: Option<String>,
    /// Expiry as RFC 3339, e.g. 2027-01-01T00:00:00Z.
    #[arg(long, conflicts_with = "expires_in")]
    pub expire_time: Option<String>,
    /// Expiry from now, e.g. 30d, 12h, 45m, 90s.
    #[arg(long)]
    pub expires_in: Option<String>,
}

impl CreateAccountArgs {
    /// The request the flags ask for.
    pub(super) fn request(self) -> anyhow::Result<idv1::CreateAccountRequest> {
        use idv1::account::AccountType;
        let account_type =
            parse_optional_enum::<AccountType>("type", self.account_type.as_deref())?;
        Ok(idv1::CreateAccountRequest {
            account_id: self.account_id.unwrap_or_default(),
            account: Some(idv1::Account {
                email: self.email.unwrap_or_default(),
                display_name: self.display_name.unwrap_or_default(),
                account_type,
                ..Default::default()
            }),
        })
    }
}

impl CreateUserArgs {
    /// The request the flags ask for, for a user in `parent` (an account's name).
    pub(super) fn request(self, parent: String) -> idv1::CreateUserRequest {
        idv1::CreateUserRequest {
            parent,
            user_id: self.user_id,
            user: Some(idv1::User {
                email: self.email,
                display_name: self.display_name.unwrap_or_default(),
                role: self.role,
                service_account: self.service_account,
                ..Default::default()
            }),
        }
    }
}

impl CreateApiKeyArgs {
    /// The key the flags ask for, its expiry counted from `now`.
    pub(super) fn api_key(&self, now: SystemTime) -> anyhow::Result<idv1::ApiKey> {
        Ok(idv1::ApiKey {
            display_name: self.display_name.clone().unwrap_or_default(),
            expire_time: expiry(self.expire_time.as_deref(), self.expires_in.as_deref(), now)?,
            ..Default::default()
        })
    }
}

/// A key's expiry from `--expire-time` or `--expires-in` (from now).
fn expiry(
    expire_time: Option<&str>,
    expires_in: Option<&str>,
    now: SystemTime,
) -> anyhow::Result<Option<prost_types::Timestamp>> {
    Ok(match (expire_time, expires_in) {
        (Some(t), _) => Some(parse_time("expire-time", t)?),
        (None, Some(d)) => Some((now + parse_duration("expires-in", d)?).into()),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::commands::flags::parse_flags;

    fn parse<A: Args>(args: &[&str]) -> A {
        parse_flags(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn expiry_is_a_time_or_a_duration_from_now() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(expiry(None, None, now).unwrap(), None);
        let in_a_day = expiry(None, Some("1d"), now).unwrap().unwrap();
        assert_eq!(in_a_day.seconds, 1_000 + 86_400);
        let at = expiry(Some("2027-01-01T00:00:00Z"), None, now).unwrap();
        assert_eq!(at.unwrap().seconds, 1_798_761_600);
        // One grammar with the other duration flags: a bare number is refused.
        let e = expiry(None, Some("90"), now).unwrap_err().to_string();
        assert!(e.starts_with("--expires-in: \"90\": missing unit"), "{e}");
    }

    #[test]
    fn account_flags_make_the_request() {
        use idv1::account::AccountType;
        let request = parse::<CreateAccountArgs>(&["acme", "--type", "developer"])
            .request()
            .unwrap();
        assert_eq!(request.account_id, "acme");
        let account = request.account.unwrap();
        assert_eq!(account.account_type, AccountType::Developer as i32);
        assert_eq!(account.email, "");
        // Without --type the server decides (UNSPECIFIED); an unknown type names the flag.
        let request = parse::<CreateAccountArgs>(&["--email", "o@acme.example"])
            .request()
            .unwrap();
        assert_eq!(request.account_id, "");
        assert_eq!(request.account.unwrap().account_type, 0);
        let e = parse::<CreateAccountArgs>(&["acme", "--type", "corporate"])
            .request()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--type \"corporate\": unknown value"), "{e}");
    }

    #[test]
    fn user_flags_make_the_request() {
        let request = parse::<CreateUserArgs>(&["alice", "--email", "a@acme.example"])
            .request("accounts/acme".into());
        assert_eq!(
            (request.parent.as_str(), request.user_id.as_str()),
            ("accounts/acme", "alice")
        );
        let user = request.user.unwrap();
        assert_eq!(
            (user.email.as_str(), user.role.as_str()),
            ("a@acme.example", "user")
        );
        assert!(!user.service_account);
        let args = ["bot", "--email", "b@acme.example", "--role", "admin"];
        let mut line = args.to_vec();
        line.push("--service-account");
        let user = parse::<CreateUserArgs>(&line)
            .request(String::new())
            .user
            .unwrap();
        assert_eq!(user.role, "admin");
        assert!(user.service_account);
    }

    #[test]
    fn api_key_flags_make_the_key() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let args = parse::<CreateApiKeyArgs>(&["--user", "alice", "--expires-in", "1h"]);
        let key = args.api_key(now).unwrap();
        assert_eq!(key.expire_time.unwrap().seconds, 1_000 + 3_600);
        let args = parse::<CreateApiKeyArgs>(&["--user", "alice", "--display-name", "ci"]);
        let key = args.api_key(now).unwrap();
        assert_eq!((key.display_name.as_str(), key.expire_time), ("ci", None));
    }
}
