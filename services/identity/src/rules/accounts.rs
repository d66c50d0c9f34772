//! Accounts' rules: who creates, updates and deletes them, the type and suspend state a new
//! account gets, the IDs a developer account tries, and what an update changes.

use kiln_core::Error;
use kiln_core::auth::Principal;
use kiln_core::grpc::Update;
use kiln_core::names::{self, AccountName, validate_display_name};
use kiln_proto::identity::v1::Account;
use kiln_proto::identity::v1::account::{AccountType, State, SuspendState};

use super::{
    Change, apply_update, not_updatable, permit, random_id, valid_display_name, valid_email,
    validate_email,
};
use crate::db::account as accounts;

/// A developer account's ID stem is at most this long, so that a `-` and a six-character
/// suffix still fit the 63 characters of an ID.
const DEVELOPER_STEM_LEN: usize = 56;
/// After its stem, a developer account tries `{stem}-2` up to `{stem}-49`...
const NUMBERED_SUFFIXES: std::ops::Range<u32> = 2..50;
/// ...then this many `{stem}-{random}`...
const RANDOM_SUFFIXES: usize = 5;
/// ...each of this many characters.
const RANDOM_SUFFIX_LEN: usize = 6;
/// The stem of an email that has no letters or digits to make one of.
const FALLBACK_STEM: &str = "account";

/// A create request, checked, before any row is written.
#[derive(Debug, PartialEq)]
pub(crate) struct NewAccount {
    pub account_type: AccountType,
    pub suspend_state: SuspendState,
    pub display_name: String,
    pub email: String,
    /// The IDs to try in order; the first free one is taken. An enterprise account has only
    /// the ID it asked for.
    pub candidate_ids: Vec<String>,
}

impl NewAccount {
    /// The row of the account created as `id` at `now`: READY, and named after its ID unless
    /// the request gave a display name.
    pub(crate) fn row(&self, id: &str, now: i64) -> accounts::Model {
        accounts::Model {
            id: id.to_owned(),
            display_name: names::display_name_or(&self.display_name, id),
            account_type: self.account_type as i32,
            email: self.email.clone(),
            state: State::Ready as i32,
            status_code: 0,
            status_message: String::new(),
            suspend_state: self.suspend_state as i32,
            create_time: now,
            update_time: now,
        }
    }
}

/// Checks a CreateAccount request. Only platform admins (and services) create accounts; a
/// developer account needs an email and no ID, an enterprise account an ID.
pub(crate) fn new_account(
    caller: &Principal,
    account_id: &str,
    account: &Account,
) -> Result<NewAccount, Error> {
    permit(
        caller.is_privileged(),
        "only a platform admin creates accounts",
    )?;
    let account_type = account_type_on_create(account.account_type, account_id)?;
    if !account.email.is_empty() || account_type == AccountType::Developer {
        validate_email("account.email", &account.email)?;
    }
    validate_display_name("account.display_name", &account.display_name)?;
    let suspend_state = suspend_state_on_create(account.suspend_state)?;
    let candidate_ids = candidate_ids(account_type, account_id, &account.email)?;
    Ok(NewAccount {
        account_type,
        suspend_state,
        display_name: account.display_name.clone(),
        email: account.email.clone(),
        candidate_ids,
    })
}

/// The type of a new account: as asked, or when unspecified a developer account if no ID was
/// given (it is derived from the email) and an enterprise account if one was.
fn account_type_on_create(account_type: i32, account_id: &str) -> Result<AccountType, Error> {
    match AccountType::try_from(account_type) {
        Ok(AccountType::Unspecified) if account_id.is_empty() => Ok(AccountType::Developer),
        Ok(AccountType::Unspecified) => Ok(AccountType::Enterprise),
        Ok(t) => Ok(t),
        Err(_) => Err(Error::invalid(
            "account.account_type",
            "unknown account type",
        )),
    }
}

/// The suspend state of a new account: as asked, unsuspended when unspecified.
fn suspend_state_on_create(suspend_state: i32) -> Result<SuspendState, Error> {
    match SuspendState::try_from(suspend_state) {
        Ok(SuspendState::Unspecified) => Ok(SuspendState::Unsuspended),
        Ok(s) => Ok(s),
        Err(_) => Err(Error::invalid(
            "account.suspend_state",
            "unknown suspend state",
        )),
    }
}

/// The IDs a new account tries, in order. A developer account's come from its email: the
/// slug, then numbered, then random suffixes. Any other account has the one ID it asked for.
fn candidate_ids(
    account_type: AccountType,
    account_id: &str,
    email: &str,
) -> Result<Vec<String>, Error> {
    if account_type != AccountType::Developer {
        names::validate_id("account_id", account_id)?;
        return Ok(vec![account_id.to_owned()]);
    }
    if !account_id.is_empty() {
        return Err(Error::invalid(
            "account_id",
            "developer account IDs are derived from account.email; leave it empty, or create an ENTERPRISE account",
        ));
    }
    let mut stem = names::slugify(email, DEVELOPER_STEM_LEN);
    if stem.is_empty() {
        stem = FALLBACK_STEM.to_owned();
    }
    Ok(std::iter::once(stem.clone())
        .chain(NUMBERED_SUFFIXES.map(|n| format!("{stem}-{n}")))
        .chain(
            std::iter::repeat_with(|| format!("{stem}-{}", random_id(RANDOM_SUFFIX_LEN)))
                .take(RANDOM_SUFFIXES),
        )
        .collect())
}

/// What an UpdateAccount request changes in `existing`, or `None` when nothing. Only an admin
/// of the account updates it, and only a platform admin its suspend state.
pub(crate) fn account_update(
    caller: &Principal,
    existing: &accounts::Model,
    update: &Update<Account>,
    now: i64,
) -> Result<Option<Change<accounts::Model>>, Error> {
    permit(
        caller.administers(&existing.id),
        "only an admin of the account updates it",
    )?;
    let account = &update.resource;
    let given = [
        ("display_name", !account.display_name.is_empty()),
        ("email", !account.email.is_empty()),
        ("suspend_state", account.suspend_state != 0),
    ];
    let set = |model: &mut accounts::Model, path: &str| {
        match path {
            "display_name" => {
                model.display_name =
                    valid_display_name("account.display_name", &account.display_name)?;
            }
            "email" => model.email = valid_email("account.email", &account.email)?,
            "suspend_state" => {
                permit(
                    caller.is_privileged(),
                    "only a platform admin changes suspend_state",
                )?;
                model.suspend_state = match SuspendState::try_from(account.suspend_state) {
                    Ok(SuspendState::Unspecified) | Err(_) => {
                        return Err(Error::invalid(
                            "account.suspend_state",
                            "must be a suspend state",
                        ));
                    }
                    Ok(s) => s as i32,
                };
            }
            other => return Err(not_updatable(other, "display_name, email, suspend_state")),
        }
        Ok(())
    };
    apply_update(existing, update.paths(&given), set, |model| {
        model.update_time = now
    })
}

/// Only a platform admin deletes an account, and never the system account.
pub(crate) fn check_delete(caller: &Principal, name: &AccountName) -> Result<(), Error> {
    permit(
        caller.is_privileged(),
        "only a platform admin deletes accounts",
    )?;
    if name.is_system() {
        return Err(Error::FailedPrecondition(format!(
            "{name} is the system account and cannot be deleted"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
