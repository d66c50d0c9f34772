//! Users' rules: roles and what they grant, who manages a user, what a new user is and what
//! an update changes.

use kiln_core::Error;
use kiln_core::auth::{Principal, Role};
use kiln_core::grpc::Update;
use kiln_core::names::{self, AccountName, SYSTEM_ACCOUNT, validate_display_name};
use kiln_proto::identity::v1::User;
use kiln_proto::identity::v1::user::State;

use super::{
    Change, apply_update, not_updatable, permit, valid_display_name, valid_email, validate_email,
};
use crate::db::user as users;

/// The role of an account's admins.
pub(crate) const ADMIN_ROLE: &str = "admin";
/// The role of everyone else, and of a new user who asks for none.
const USER_ROLE: &str = "user";

/// A user's role is "admin" or "user".
pub(crate) fn validate_role(field: &str, role: &str) -> Result<(), Error> {
    match role {
        ADMIN_ROLE | USER_ROLE => Ok(()),
        other => Err(Error::invalid(
            field,
            format!("must be \"admin\" or \"user\", got {other:?}"),
        )),
    }
}

/// The roles a user of `account_id` holds: an admin administers the account, and an admin of
/// the system account the whole platform too.
pub(crate) fn roles_of(account_id: &str, role: &str) -> Vec<Role> {
    match role {
        ADMIN_ROLE if account_id == SYSTEM_ACCOUNT => vec![Role::AccountAdmin, Role::PlatformAdmin],
        ADMIN_ROLE => vec![Role::AccountAdmin],
        _ => vec![Role::User],
    }
}

/// Whether `caller` manages `user`: updates it (its role aside) and creates and deletes its
/// API keys. The user themself and the admins of their account do.
pub(crate) fn may_manage(caller: &Principal, user: &users::Model) -> bool {
    (caller.account == user.account_id && caller.user == user.user_id)
        || caller.administers(&user.account_id)
}

/// Only an admin of the account deletes a user (not the user themself).
pub(crate) fn check_delete(caller: &Principal, user: &users::Model) -> Result<(), Error> {
    permit(
        caller.administers(&user.account_id),
        "only an admin of the account deletes users",
    )
}

/// A user to create, checked.
#[derive(Debug, PartialEq)]
pub(crate) struct NewUser {
    pub account: String,
    pub user_id: String,
    pub email: String,
    pub display_name: String,
    pub role: String,
    pub service_account: bool,
}

impl NewUser {
    /// The bootstrap's platform admin: an admin of the system account.
    pub(crate) fn platform_admin(user_id: &str, email: &str) -> Self {
        Self {
            account: SYSTEM_ACCOUNT.to_owned(),
            user_id: user_id.to_owned(),
            email: email.to_owned(),
            display_name: "Platform admin".to_owned(),
            role: ADMIN_ROLE.to_owned(),
            service_account: false,
        }
    }

    pub(crate) fn name(&self) -> String {
        format!("accounts/{}/users/{}", self.account, self.user_id)
    }

    /// The user's row, created at `now`: READY, and named by its email unless given a name.
    pub(crate) fn row(&self, now: i64) -> users::Model {
        users::Model {
            account_id: self.account.clone(),
            user_id: self.user_id.clone(),
            email: self.email.clone(),
            display_name: names::display_name_or(&self.display_name, &self.email),
            role: self.role.clone(),
            service_account: self.service_account,
            state: State::Ready as i32,
            create_time: now,
            update_time: now,
        }
    }
}

/// Checks a CreateUser request under `parent`: only an admin of the account adds users; the
/// role defaults to "user".
pub(crate) fn new_user(
    caller: &Principal,
    parent: &AccountName,
    user_id: &str,
    user: &User,
) -> Result<NewUser, Error> {
    permit(
        caller.administers(&parent.account),
        &format!("only an admin of {parent} adds users"),
    )?;
    names::validate_id("user_id", user_id)?;
    validate_email("user.email", &user.email)?;
    validate_display_name("user.display_name", &user.display_name)?;
    let role = if user.role.is_empty() {
        USER_ROLE
    } else {
        &user.role
    };
    validate_role("user.role", role)?;
    Ok(NewUser {
        account: parent.account.clone(),
        user_id: user_id.to_owned(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        role: role.to_owned(),
        service_account: user.service_account,
    })
}

/// What an UpdateUser request changes in `existing`, or `None` when nothing. The user and
/// the account's admins update a user; only an admin changes its role. Whether a new email is
/// free in the account is for the caller to check.
pub(crate) fn user_update(
    caller: &Principal,
    existing: &users::Model,
    update: &Update<User>,
    now: i64,
) -> Result<Option<Change<users::Model>>, Error> {
    permit(
        may_manage(caller, existing),
        "only the user or an admin of the account updates a user",
    )?;
    let user = &update.resource;
    let given = [
        ("display_name", !user.display_name.is_empty()),
        ("email", !user.email.is_empty()),
        ("role", !user.role.is_empty()),
    ];
    let set = |model: &mut users::Model, path: &str| {
        match path {
            "display_name" => {
                model.display_name = valid_display_name("user.display_name", &user.display_name)?;
            }
            "email" => model.email = valid_email("user.email", &user.email)?,
            "role" => {
                validate_role("user.role", &user.role)?;
                permit(
                    caller.administers(&existing.account_id),
                    "only an admin of the account changes roles",
                )?;
                model.role = user.role.clone();
            }
            other => return Err(not_updatable(other, "display_name, email, role")),
        }
        Ok(())
    };
    apply_update(existing, update.paths(&given), set, |model| {
        model.update_time = now
    })
}

#[cfg(test)]
mod tests;
