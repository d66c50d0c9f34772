//! API keys' rules: who creates and deletes them, what a new key's secret looks like and
//! what is stored of it, and what an authentication with a key yields.

use kiln_core::Error;
use std::time::{Duration, SystemTime};

use base64::Engine;
use kiln_core::auth::{Authenticated, Principal, hash_secret, hex};
use kiln_core::names::validate_display_name;
use kiln_proto::identity::v1::ApiKey;
use rand::Rng;

use super::users::{may_manage, roles_of};
use super::{permit, random_id};
use crate::db::{account as accounts, api_key as api_keys, user as users};

/// What every secret begins with, so that a leaked one is recognisable.
const SECRET_PREFIX: &str = "kiln_";
/// A secret's random part: 256 bits.
const SECRET_BYTES: usize = 32;
/// How much of the secret is stored in clear, to tell keys apart in a listing.
const STORED_PREFIX_CHARS: usize = 12;
const KEY_ID_LEN: usize = 16;

/// An API key's resource name.
pub(crate) fn key_name(key: &api_keys::Model) -> String {
    format!(
        "accounts/{}/users/{}/apiKeys/{}",
        key.account_id, key.user_id, key.key_id
    )
}

/// Checks a CreateApiKey request for `owner`'s key at `now`: the user and the account's
/// admins create its keys, and an expiry must be in the future. Returns the expiry.
pub(crate) fn new_key_expiry(
    caller: &Principal,
    owner: &users::Model,
    api_key: &ApiKey,
    now: i64,
) -> Result<Option<i64>, Error> {
    permit(
        may_manage(caller, owner),
        "only the user or an admin of the account creates its keys",
    )?;
    validate_display_name("api_key.display_name", &api_key.display_name)?;
    match &api_key.expire_time {
        Some(ts) => {
            let micros = kiln_core::time::timestamp_to_micros(ts);
            if micros <= now {
                return Err(Error::invalid(
                    "api_key.expire_time",
                    "must be in the future",
                ));
            }
            Ok(Some(micros))
        }
        None => Ok(None),
    }
}

/// The user and the account's admins delete its keys.
pub(crate) fn check_delete(caller: &Principal, owner: &users::Model) -> Result<(), Error> {
    permit(
        may_manage(caller, owner),
        "only the user or an admin of the account deletes its keys",
    )
}

/// A new secret: `kiln_` and 32 random bytes, base64url.
fn new_secret() -> String {
    let bytes: [u8; SECRET_BYTES] = rand::rng().random();
    format!(
        "{SECRET_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What identifies a secret in the database: its SHA-256, hex. The secret itself is not kept.
pub(crate) fn secret_digest(secret: &str) -> String {
    hex(hash_secret(secret))
}

/// A new key of `owner`'s and its secret, which is shown once and stored only as its digest
/// and first characters.
pub(crate) fn new_key(
    owner: &users::Model,
    display_name: &str,
    expire_time: Option<i64>,
    now: i64,
) -> (api_keys::Model, String) {
    let secret = new_secret();
    let model = api_keys::Model {
        account_id: owner.account_id.clone(),
        user_id: owner.user_id.clone(),
        key_id: random_id(KEY_ID_LEN),
        display_name: display_name.to_owned(),
        prefix: secret.chars().take(STORED_PREFIX_CHARS).collect(),
        secret_sha256: secret_digest(&secret),
        create_time: now,
        expire_time,
    };
    (model, secret)
}

/// Whether a key that expires at `expire_time` (never when `None`) is expired at `now`.
pub(crate) fn is_expired(expire_time: Option<i64>, now: i64) -> bool {
    expire_time.is_some_and(|t| t <= now)
}

/// Who a valid key authenticates as, and until when.
pub(crate) fn authenticated(
    key: &api_keys::Model,
    user: &users::Model,
    account: &accounts::Model,
) -> Authenticated {
    Authenticated {
        principal: Principal {
            account: account.id.clone(),
            user: user.user_id.clone(),
            api_key: key_name(key),
            roles: roles_of(&account.id, &user.role),
            suspend_state: account.suspend_state,
        },
        expire_time: key
            .expire_time
            .map(|t| SystemTime::UNIX_EPOCH + Duration::from_micros(t.max(0) as u64)),
    }
}

#[cfg(test)]
mod tests;
