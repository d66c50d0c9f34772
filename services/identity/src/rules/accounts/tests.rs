use kiln_core::Error;
use kiln_core::auth::Principal;

use super::*;
use crate::rules::test_support::{account_row, admin, invalid_field, mask, member, platform_admin};

fn developer(email: &str) -> Account {
    Account {
        email: email.to_owned(),
        ..Default::default()
    }
}

fn enterprise() -> Account {
    Account {
        account_type: AccountType::Enterprise as i32,
        ..Default::default()
    }
}

fn is_valid_id(id: &str) -> bool {
    names::id_problem(id).is_none()
}

#[test]
fn only_platform_admins_and_services_create_accounts() {
    for caller in [member("acme", "bob"), admin("acme", "alice")] {
        assert!(
            matches!(
                new_account(&caller, "beta", &enterprise()),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
    }
    for caller in [platform_admin(), Principal::service()] {
        assert!(new_account(&caller, "beta", &enterprise()).is_ok());
    }
}

#[test]
fn an_unspecified_type_is_developer_without_an_id_and_enterprise_with_one() {
    let caller = platform_admin();
    let derived = new_account(&caller, "", &developer("jane@example.com")).unwrap();
    assert_eq!(derived.account_type, AccountType::Developer);
    let chosen = new_account(&caller, "acme", &Account::default()).unwrap();
    assert_eq!(chosen.account_type, AccountType::Enterprise);
    assert_eq!(chosen.candidate_ids, ["acme"]);
    let unknown = Account {
        account_type: 99,
        ..Default::default()
    };
    assert_eq!(create_error("acme", &unknown), "account.account_type");
}

#[test]
fn a_developer_account_needs_an_email_and_an_enterprise_one_checks_a_given_one() {
    let caller = platform_admin();
    assert_eq!(
        new_account(&caller, "", &developer("")).map(|_| ()),
        Err(Error::invalid("account.email", "is required"))
    );
    assert_eq!(
        create_error("", &developer("not-an-email")),
        "account.email"
    );
    let no_email = new_account(&caller, "acme", &enterprise()).unwrap();
    assert_eq!(no_email.email, "");
    let bad_email = Account {
        email: "owner at acme".to_owned(),
        ..enterprise()
    };
    assert_eq!(create_error("acme", &bad_email), "account.email");
}

#[test]
fn a_display_name_is_at_most_256_characters() {
    let caller = platform_admin();
    let named = |n: usize| Account {
        display_name: "é".repeat(n),
        ..enterprise()
    };
    assert!(new_account(&caller, "acme", &named(256)).is_ok());
    assert_eq!(create_error("acme", &named(257)), "account.display_name");
}

#[test]
fn a_new_account_is_unsuspended_unless_asked_otherwise() {
    let caller = platform_admin();
    let plain = new_account(&caller, "acme", &enterprise()).unwrap();
    assert_eq!(plain.suspend_state, SuspendState::Unsuspended);
    let blocked = Account {
        suspend_state: SuspendState::BlockedByAbuseRule as i32,
        ..enterprise()
    };
    assert_eq!(
        new_account(&caller, "acme", &blocked)
            .unwrap()
            .suspend_state,
        SuspendState::BlockedByAbuseRule
    );
    let unknown = Account {
        suspend_state: 42,
        ..enterprise()
    };
    assert_eq!(create_error("acme", &unknown), "account.suspend_state");
}

#[test]
fn an_enterprise_account_id_must_be_a_valid_id() {
    let caller = platform_admin();
    for id in ["", "Acme", "acme_corp", "-acme", &"a".repeat(64)] {
        assert_eq!(create_error(id, &enterprise()), "account_id", "{id:?}");
    }
    let longest = "a".repeat(63);
    assert_eq!(
        new_account(&caller, &longest, &enterprise())
            .unwrap()
            .candidate_ids,
        [longest]
    );
}

#[test]
fn a_developer_account_takes_no_id() {
    let explicit = Account {
        account_type: AccountType::Developer as i32,
        email: "jane@example.com".to_owned(),
        ..Default::default()
    };
    assert_eq!(create_error("jane", &explicit), "account_id");
}

#[test]
fn developer_ids_are_the_email_slug_then_numbered_then_random() {
    let new = new_account(&platform_admin(), "", &developer("Jane.Doe@Example.com")).unwrap();
    let ids = &new.candidate_ids;
    assert_eq!(ids.len(), 1 + 48 + RANDOM_SUFFIXES);
    assert_eq!(ids[0], "jane-doe-example-com");
    assert_eq!(ids[1], "jane-doe-example-com-2");
    assert_eq!(ids[48], "jane-doe-example-com-49");
    for id in &ids[49..] {
        let suffix = id.strip_prefix("jane-doe-example-com-").unwrap();
        assert_eq!(suffix.len(), RANDOM_SUFFIX_LEN, "{id}");
    }
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no ID is tried twice");
    assert!(ids.iter().all(|id| is_valid_id(id)));
}

#[test]
fn developer_ids_from_a_long_email_still_fit_an_id() {
    let email = format!("{}@example.com", "x".repeat(200));
    let new = new_account(&platform_admin(), "", &developer(&email)).unwrap();
    assert_eq!(new.candidate_ids[0].len(), DEVELOPER_STEM_LEN);
    for id in &new.candidate_ids {
        assert!(is_valid_id(id), "{id} ({} characters)", id.len());
    }
}

#[test]
fn an_email_without_letters_or_digits_gives_the_fallback_stem() {
    let new = new_account(&platform_admin(), "", &developer("é@ü.ö")).unwrap();
    assert_eq!(new.candidate_ids[0], FALLBACK_STEM);
    assert_eq!(new.candidate_ids[1], "account-2");
}

#[test]
fn a_new_row_is_ready_and_named_after_its_id_unless_given_a_name() {
    let new = new_account(&platform_admin(), "acme", &enterprise()).unwrap();
    let row = new.row("acme", 77);
    assert_eq!(row.id, "acme");
    assert_eq!(row.display_name, "acme");
    assert_eq!(row.state, State::Ready as i32);
    assert_eq!(row.account_type, AccountType::Enterprise as i32);
    assert_eq!(row.suspend_state, SuspendState::Unsuspended as i32);
    assert_eq!((row.create_time, row.update_time), (77, 77));
    let named = NewAccount {
        display_name: "ACME Corp".to_owned(),
        ..new
    };
    assert_eq!(named.row("acme", 77).display_name, "ACME Corp");
}

/// The field a platform admin's create request is refused for.
fn create_error(account_id: &str, account: &Account) -> String {
    invalid_field(new_account(&platform_admin(), account_id, account))
}

fn update(
    caller: &Principal,
    account: Account,
    paths: Option<&[&str]>,
) -> Result<Option<Change<accounts::Model>>, Error> {
    let update = Update::new("account", Some(account), paths.and_then(mask)).unwrap();
    account_update(caller, &account_row("acme"), &update, 99)
}

/// The field an update of acme is refused for.
fn update_error(caller: &Principal, account: Account, paths: &[&str]) -> String {
    invalid_field(update(caller, account, Some(paths)))
}

#[test]
fn only_an_admin_of_the_account_updates_it() {
    let rename = || Account {
        display_name: "New".to_owned(),
        ..Default::default()
    };
    for caller in [member("acme", "bob"), admin("beta", "eve")] {
        assert!(
            matches!(
                update(&caller, rename(), None),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
    }
    for caller in [
        admin("acme", "alice"),
        platform_admin(),
        Principal::service(),
    ] {
        assert!(update(&caller, rename(), None).unwrap().is_some());
    }
}

#[test]
fn an_update_follows_the_mask_and_keeps_the_rest() {
    let account = Account {
        display_name: "ACME Corp".to_owned(),
        email: "ignored@x.io".to_owned(),
        ..Default::default()
    };
    let change = update(&admin("acme", "alice"), account, Some(&["display_name"]))
        .unwrap()
        .unwrap();
    assert_eq!(change.paths, ["display_name"]);
    assert_eq!(change.model.display_name, "ACME Corp");
    assert_eq!(change.model.email, "owner@acme.example");
    assert_eq!(change.model.update_time, 99);
    assert_eq!(change.model.create_time, 10);
}

#[test]
fn without_a_mask_an_update_changes_the_fields_given() {
    let account = Account {
        email: "new@acme.example".to_owned(),
        ..Default::default()
    };
    let change = update(&admin("acme", "alice"), account, None)
        .unwrap()
        .unwrap();
    assert_eq!(change.paths, ["email"]);
    assert_eq!(change.model.email, "new@acme.example");
    assert_eq!(change.model.display_name, "Acme");
}

#[test]
fn an_update_that_changes_nothing_writes_nothing() {
    let same = Account {
        display_name: "Acme".to_owned(),
        ..Default::default()
    };
    assert_eq!(update(&admin("acme", "alice"), same, None), Ok(None));
    assert_eq!(
        update(&admin("acme", "alice"), Account::default(), None),
        Ok(None)
    );
}

#[test]
fn an_update_checks_its_fields() {
    let alice = admin("acme", "alice");
    let empty = Account::default;
    let long_name = Account {
        display_name: "x".repeat(257),
        ..Default::default()
    };
    assert_eq!(
        update_error(&alice, empty(), &["create_time"]),
        "update_mask"
    );
    assert_eq!(update_error(&alice, empty(), &["email"]), "account.email");
    assert_eq!(update_error(&alice, long_name, &[]), "account.display_name");
}

#[test]
fn only_a_platform_admin_changes_the_suspend_state() {
    let suspend = |state: i32| Account {
        suspend_state: state,
        ..Default::default()
    };
    let limit = SuspendState::MonthlySpendLimitExceeded as i32;
    assert!(matches!(
        update(
            &admin("acme", "alice"),
            suspend(limit),
            Some(&["suspend_state"])
        ),
        Err(Error::PermissionDenied(_))
    ));
    let change = update(&platform_admin(), suspend(limit), None)
        .unwrap()
        .unwrap();
    assert_eq!(change.paths, ["suspend_state"]);
    assert_eq!(change.model.suspend_state, limit);
    for bad in [0, 42] {
        assert_eq!(
            update_error(&platform_admin(), suspend(bad), &["suspend_state"]),
            "account.suspend_state",
            "{bad}"
        );
    }
}

#[test]
fn only_a_platform_admin_deletes_an_account_and_never_the_system_one() {
    let acme = AccountName::new("acme");
    assert!(matches!(
        check_delete(&admin("acme", "alice"), &acme),
        Err(Error::PermissionDenied(_))
    ));
    assert_eq!(check_delete(&platform_admin(), &acme), Ok(()));
    assert_eq!(check_delete(&Principal::service(), &acme), Ok(()));
    assert!(matches!(
        check_delete(&platform_admin(), &AccountName::new(names::SYSTEM_ACCOUNT)),
        Err(Error::FailedPrecondition(_))
    ));
}
