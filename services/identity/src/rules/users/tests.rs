use super::*;
use crate::rules::test_support::{
    admin, invalid_field, mask, member, platform_admin, principal, user_row,
};
use kiln_core::Error;

#[test]
fn a_role_is_admin_or_user() {
    assert_eq!(validate_role("user.role", "admin"), Ok(()));
    assert_eq!(validate_role("user.role", "user"), Ok(()));
    for role in ["", "Admin", "owner", "platform-admin", "service", "admin "] {
        assert_eq!(
            invalid_field(validate_role("user.role", role)),
            "user.role",
            "{role:?}"
        );
    }
}

#[test]
fn an_admin_of_the_system_account_is_also_a_platform_admin() {
    assert_eq!(
        roles_of(SYSTEM_ACCOUNT, "admin"),
        [Role::AccountAdmin, Role::PlatformAdmin]
    );
    assert_eq!(roles_of("acme", "admin"), [Role::AccountAdmin]);
    assert_eq!(roles_of(SYSTEM_ACCOUNT, "user"), [Role::User]);
    assert_eq!(roles_of("acme", "user"), [Role::User]);
    assert_eq!(
        roles_of("acme", "unknown"),
        [Role::User],
        "a role of an older version grants least"
    );
}

#[test]
fn a_user_is_managed_by_themself_and_the_admins_of_their_account() {
    let carol = user_row("acme", "carol", "user");
    assert!(may_manage(&member("acme", "carol"), &carol));
    assert!(may_manage(&admin("acme", "alice"), &carol));
    assert!(may_manage(&platform_admin(), &carol));
    assert!(may_manage(&Principal::service(), &carol));
    assert!(!may_manage(&member("acme", "bob"), &carol), "a colleague");
    assert!(
        !may_manage(&admin("beta", "alice"), &carol),
        "an admin elsewhere"
    );
    assert!(
        !may_manage(&member("beta", "carol"), &carol),
        "a namesake elsewhere"
    );
}

#[test]
fn only_an_admin_of_the_account_deletes_a_user() {
    let carol = user_row("acme", "carol", "user");
    for caller in [admin("acme", "alice"), platform_admin()] {
        assert_eq!(check_delete(&caller, &carol), Ok(()));
    }
    for caller in [member("acme", "carol"), admin("beta", "eve")] {
        assert!(
            matches!(
                check_delete(&caller, &carol),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
    }
}

fn request(email: &str, role: &str) -> User {
    User {
        email: email.to_owned(),
        role: role.to_owned(),
        ..Default::default()
    }
}

#[test]
fn only_an_admin_of_the_account_adds_users() {
    let acme = AccountName::new("acme");
    let carol = request("carol@acme.example", "");
    for caller in [member("acme", "bob"), admin("beta", "eve")] {
        assert!(
            matches!(
                new_user(&caller, &acme, "carol", &carol),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
    }
    for caller in [admin("acme", "alice"), platform_admin()] {
        assert!(new_user(&caller, &acme, "carol", &carol).is_ok());
    }
}

#[test]
fn a_new_user_is_a_plain_user_unless_asked_otherwise() {
    let acme = AccountName::new("acme");
    let alice = admin("acme", "alice");
    let plain = new_user(&alice, &acme, "carol", &request("carol@acme.example", "")).unwrap();
    assert_eq!(plain.role, "user");
    assert_eq!(plain.account, "acme");
    assert_eq!(plain.name(), "accounts/acme/users/carol");
    let promoted = new_user(
        &alice,
        &acme,
        "dave",
        &request("dave@acme.example", "admin"),
    );
    assert_eq!(promoted.unwrap().role, "admin");
}

#[test]
fn a_new_user_checks_its_id_email_name_and_role() {
    let acme = AccountName::new("acme");
    let alice = admin("acme", "alice");
    let good = request("carol@acme.example", "user");
    assert_eq!(
        invalid_field(new_user(&alice, &acme, "Carol", &good)),
        "user_id"
    );
    assert_eq!(invalid_field(new_user(&alice, &acme, "", &good)), "user_id");
    for email in ["", "carol"] {
        assert_eq!(
            invalid_field(new_user(&alice, &acme, "carol", &request(email, ""))),
            "user.email"
        );
    }
    let long = User {
        display_name: "x".repeat(257),
        ..good.clone()
    };
    assert_eq!(
        invalid_field(new_user(&alice, &acme, "carol", &long)),
        "user.display_name"
    );
    assert_eq!(
        invalid_field(new_user(
            &alice,
            &acme,
            "carol",
            &request("carol@acme.example", "owner")
        )),
        "user.role"
    );
}

#[test]
fn a_new_row_is_ready_and_named_by_its_email_unless_given_a_name() {
    let mut new = NewUser::platform_admin("admin", "root@kiln.example");
    assert_eq!(new.name(), "accounts/kiln/users/admin");
    assert_eq!(new.row(5).display_name, "Platform admin");
    new.display_name.clear();
    new.service_account = true;
    let row = new.row(5);
    assert_eq!(row.display_name, "root@kiln.example");
    assert_eq!(row.role, "admin");
    assert_eq!(row.account_id, SYSTEM_ACCOUNT);
    assert!(row.service_account);
    assert_eq!(row.state, State::Ready as i32);
    assert_eq!((row.create_time, row.update_time), (5, 5));
}

fn update(
    caller: &Principal,
    user: User,
    paths: Option<&[&str]>,
) -> Result<Option<Change<users::Model>>, Error> {
    let carol = user_row("acme", "carol", "user");
    let update = Update::new("user", Some(user), paths.and_then(mask)).unwrap();
    user_update(caller, &carol, &update, 99)
}

/// The field an update of carol is refused for.
fn update_error(caller: &Principal, user: User, paths: &[&str]) -> String {
    invalid_field(update(caller, user, Some(paths)))
}

fn renamed(name: &str) -> User {
    User {
        display_name: name.to_owned(),
        ..Default::default()
    }
}

#[test]
fn a_user_is_updated_by_themself_or_an_admin_of_the_account() {
    for caller in [member("acme", "bob"), admin("beta", "eve")] {
        assert!(
            matches!(
                update(&caller, renamed("C"), None),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
    }
    for caller in [
        member("acme", "carol"),
        admin("acme", "alice"),
        platform_admin(),
    ] {
        let change = update(&caller, renamed("C"), None).unwrap().unwrap();
        assert_eq!(change.model.display_name, "C");
        assert_eq!(change.model.update_time, 99);
    }
}

#[test]
fn a_user_may_not_change_their_own_role() {
    let promote = User {
        role: "admin".to_owned(),
        ..Default::default()
    };
    assert!(matches!(
        update(&member("acme", "carol"), promote.clone(), Some(&["role"])),
        Err(Error::PermissionDenied(_))
    ));
    let change = update(&admin("acme", "alice"), promote, Some(&["role"]))
        .unwrap()
        .unwrap();
    assert_eq!(change.model.role, "admin");
    assert_eq!(change.paths, ["role"]);
}

#[test]
fn a_role_is_checked_before_who_changes_it() {
    let bad = User {
        role: "owner".to_owned(),
        ..Default::default()
    };
    assert_eq!(
        update_error(&member("acme", "carol"), bad, &[]),
        "user.role"
    );
}

#[test]
fn a_user_update_follows_the_mask_or_the_fields_given() {
    let carol = member("acme", "carol");
    let both = User {
        display_name: "Carol".to_owned(),
        email: "c@acme.example".to_owned(),
        ..Default::default()
    };
    let masked = update(&carol, both.clone(), Some(&["email"]))
        .unwrap()
        .unwrap();
    assert_eq!(masked.paths, ["email"]);
    assert_eq!(masked.model.email, "c@acme.example");
    assert_eq!(masked.model.display_name, "carol", "outside the mask");
    let unmasked = update(&carol, both, None).unwrap().unwrap();
    assert_eq!(unmasked.paths, ["display_name", "email"]);
    assert_eq!(unmasked.model.display_name, "Carol");
}

#[test]
fn a_user_update_checks_its_fields() {
    let carol = member("acme", "carol");
    let empty = User::default;
    let long_name = renamed(&"x".repeat(257));
    assert_eq!(update_error(&carol, empty(), &["role_id"]), "update_mask");
    assert_eq!(update_error(&carol, empty(), &["email"]), "user.email");
    assert_eq!(update_error(&carol, long_name, &[]), "user.display_name");
}

#[test]
fn a_user_update_that_changes_nothing_writes_nothing() {
    let carol = member("acme", "carol");
    assert_eq!(update(&carol, renamed("carol"), None), Ok(None));
    assert_eq!(update(&carol, User::default(), None), Ok(None));
    let same_role = User {
        role: "user".to_owned(),
        ..Default::default()
    };
    assert_eq!(update(&admin("acme", "a"), same_role, None), Ok(None));
}

#[test]
fn a_service_principal_administers_every_account() {
    let service = principal("kiln", "", &[Role::Service]);
    let change = update(
        &service,
        User {
            role: "admin".to_owned(),
            ..Default::default()
        },
        None,
    )
    .unwrap()
    .unwrap();
    assert_eq!(change.model.role, "admin");
}
