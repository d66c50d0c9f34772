//! Accounts, users and API keys through the gRPC API: tenancy, validation, pagination.

use std::collections::HashSet;

use kiln_proto::identity::v1 as idv1;
use kiln_tests::TestMesh;
use kiln_tests::{
    accounts, create_account, create_key, create_user, delete_account, delete_user, expect_code,
    get_account, get_user, list_keys, list_users, try_create_account, try_create_user,
    update_account, update_user, user_with_key,
};
use tonic::Code;
use tonic_types::StatusExt;

/// The names of what a listing returned.
fn names<'a>(listed: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    listed.into_iter().map(String::as_str).collect()
}

/// A ListUsers request for a page of `parent`'s users.
fn page(parent: &str, page_size: i32, page_token: &str) -> idv1::ListUsersRequest {
    idv1::ListUsersRequest {
        parent: parent.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
        ..Default::default()
    }
}

/// A user's fields for CreateUser.
fn user(email: &str, role: &str) -> idv1::User {
    idv1::User {
        email: email.to_owned(),
        role: role.to_owned(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_key_sees_its_own_account_and_nothing_of_another() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    create_account(&admin, "acme").await;
    let alice = create_user(&admin, "acme", "alice", "user").await;
    assert_eq!(alice.name, "accounts/acme/users/alice");
    let key = create_key(&admin, "acme", "alice", None).await;
    assert!(
        key.key.starts_with("kiln_"),
        "the secret is returned once at creation"
    );
    assert!(key.key.starts_with(&key.prefix));
    create_account(&admin, "globex").await;
    create_user(&admin, "globex", "bob", "admin").await;

    let ch = mesh.channel(Some(&key.key)).await;
    let own = get_account(&ch, "accounts/acme").await.unwrap();
    assert_eq!(own.name, "accounts/acme");
    // The bare ID works too.
    get_account(&ch, "acme").await.unwrap();
    let listed = list_users(&ch, page("accounts/acme", 0, "")).await.unwrap();
    let listed = listed.users.iter().map(|u| &u.name);
    assert_eq!(names(listed), ["accounts/acme/users/alice"]);
    let mine = get_user(&ch, "accounts/acme/users/alice").await.unwrap();
    assert_eq!(mine.email, "alice@acme.example");

    // Another account's resources do not exist for this key, whatever the call.
    let bob = "accounts/globex/users/bob";
    let not_found = Code::NotFound;
    expect_code(get_account(&ch, "accounts/globex").await, not_found);
    expect_code(get_user(&ch, bob).await, not_found);
    expect_code(
        list_users(&ch, page("accounts/globex", 0, "")).await,
        not_found,
    );
    expect_code(list_keys(&ch, bob).await, not_found);
    expect_code(delete_user(&ch, bob).await, not_found);
    // Same answer for an account that does not exist at all: existence never leaks.
    expect_code(get_account(&ch, "accounts/nope").await, not_found);

    // Listing accounts shows only its own.
    let all = accounts(&ch)
        .list_accounts(idv1::ListAccountsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let all = all.accounts.iter().map(|a| &a.name);
    assert_eq!(names(all), ["accounts/acme"]);

    // A plain user may not add users or create accounts.
    let eve = try_create_user(&ch, "acme", "eve", user("eve@acme.example", "")).await;
    expect_code(eve, Code::PermissionDenied);
    let mine = try_create_account(&ch, "mine", None).await;
    expect_code(mine, Code::PermissionDenied);
    mesh.shutdown().await;
}

/// The call failed with INVALID_ARGUMENT naming `field`, in its message and its details.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = expect_code(result, Code::InvalidArgument);
    assert!(
        status.message().starts_with(&format!("{field}:")),
        "message names {field}: {}",
        status.message()
    );
    let details = status.get_error_details();
    let violations = details
        .bad_request()
        .expect("BadRequest details")
        .field_violations
        .clone();
    assert_eq!(violations[0].field, field);
}

#[tokio::test]
async fn bad_ids_are_invalid_argument_naming_the_field_and_duplicates_already_exist() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let long = "a".repeat(64);
    let enterprise = idv1::Account {
        account_type: idv1::account::AccountType::Enterprise as i32,
        ..Default::default()
    };
    for bad in [
        "Acme",
        "-acme",
        "acme-",
        long.as_str(),
        "ümlaut",
        "a_b",
        "a.b",
        "",
    ] {
        let created = try_create_account(&admin, bad, Some(enterprise.clone())).await;
        assert_invalid(created, "account_id");
    }
    // 63 characters is the longest valid ID.
    create_account(&admin, &"a".repeat(63)).await;

    create_account(&admin, "acme").await;
    let dup = try_create_account(&admin, "acme", None).await;
    expect_code(dup, Code::AlreadyExists);

    for bad in ["Bob", "-bob", "bob-", long.as_str(), "", "bób"] {
        let created = try_create_user(&admin, "acme", bad, user("bob@acme.example", "")).await;
        assert_invalid(created, "user_id");
    }
    let not_an_email = user("not-an-email", "");
    let created = try_create_user(&admin, "acme", "bob", not_an_email).await;
    assert_invalid(created, "user.email");
    let owner = user("bob@acme.example", "owner");
    let created = try_create_user(&admin, "acme", "bob", owner).await;
    assert_invalid(created, "user.role");
    assert_invalid(get_user(&admin, "accounts/acme/people/bob").await, "name");

    create_user(&admin, "acme", "bob", "user").await;
    let other_email = user("other@acme.example", "");
    let dup = try_create_user(&admin, "acme", "bob", other_email).await;
    expect_code(dup, Code::AlreadyExists);
    let same_email = user("bob@acme.example", "");
    let dup_email = try_create_user(&admin, "acme", "bobby", same_email).await;
    expect_code(dup_email, Code::AlreadyExists);
    mesh.shutdown().await;
}

#[tokio::test]
async fn developer_accounts_get_unique_ids_from_the_email() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let create = |email: &'static str| {
        let admin = admin.clone();
        async move {
            let email = email.into();
            let account = idv1::Account {
                email,
                ..Default::default()
            };
            try_create_account(&admin, "", Some(account)).await.unwrap()
        }
    };
    let first = create("Jane.Doe@Example.com").await;
    assert_eq!(first.name, "accounts/jane-doe-example-com");
    assert_eq!(
        first.account_type,
        idv1::account::AccountType::Developer as i32
    );
    let second = create("jane.doe@example.com").await;
    assert_eq!(second.name, "accounts/jane-doe-example-com-2");
    let missing = try_create_account(&admin, "", None).await;
    assert_invalid(missing, "account.email");
    mesh.shutdown().await;
}

#[tokio::test]
async fn listing_250_users_in_pages_of_100_returns_each_once() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    create_account(&admin, "big").await;
    let mut expected = HashSet::new();
    for i in 0..250 {
        let u = create_user(&admin, "big", &format!("user-{i:03}"), "user").await;
        expected.insert(u.name);
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_users(&admin, page("accounts/big", 100, &token))
            .await
            .unwrap();
        pages += 1;
        assert_eq!(page.total_size, 250);
        assert!(page.users.len() <= 100);
        seen.extend(page.users.into_iter().map(|u| u.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250);
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), expected);

    // Ordering and filtering.
    let listing = |page_size: i32, order_by: &str, filter: &str| idv1::ListUsersRequest {
        order_by: order_by.to_owned(),
        filter: filter.to_owned(),
        ..page("accounts/big", page_size, "")
    };
    let desc = list_users(&admin, listing(1, "name desc", ""))
        .await
        .unwrap();
    assert_eq!(desc.users[0].name, "accounts/big/users/user-249");
    let by_email = listing(0, "", r#"email = "user-007@big.example""#);
    let filtered = list_users(&admin, by_email).await.unwrap();
    assert_eq!(filtered.users.len(), 1);
    let bad_filter = list_users(&admin, listing(0, "", "password = x")).await;
    assert_invalid(bad_filter, "filter");

    // A tampered token is refused, and so is a token carried to another listing.
    let first = list_users(&admin, page("accounts/big", 100, ""))
        .await
        .unwrap();
    let mut tampered = first.next_page_token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let refused = list_users(&admin, page("accounts/big", 100, &tampered)).await;
    assert_invalid(refused, "page_token");
    create_account(&admin, "small").await;
    let carried = page("accounts/small", 100, &first.next_page_token);
    assert_invalid(list_users(&admin, carried).await, "page_token");
    mesh.shutdown().await;
}

#[tokio::test]
async fn updates_follow_the_mask_and_roles() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let owner = mesh.tenant_channel("acme").await;
    // The account admin adds a plain user and gives them a key.
    let carol_key = user_with_key(&owner, "acme", "carol", "user").await.key;
    let carol = mesh.channel(Some(&carol_key)).await;
    let acme = |account: idv1::Account| idv1::Account {
        name: "accounts/acme".into(),
        ..account
    };
    let carol_as = |user: idv1::User| idv1::User {
        name: "accounts/acme/users/carol".into(),
        ..user
    };

    let renamed = acme(idv1::Account {
        display_name: "ACME Corp".into(),
        email: "ignored@x.io".into(),
        ..Default::default()
    });
    let updated = update_account(&owner, renamed, &["display_name"])
        .await
        .unwrap();
    assert_eq!(updated.display_name, "ACME Corp");
    assert_eq!(
        updated.email, "owner@acme.example",
        "fields outside the mask are kept"
    );

    let create_time = update_account(&owner, acme(Default::default()), &["create_time"]).await;
    assert_invalid(create_time, "update_mask");
    let unsuspended = acme(idv1::Account {
        suspend_state: idv1::account::SuspendState::Unsuspended as i32,
        ..Default::default()
    });
    let status = update_account(&owner, unsuspended, &["suspend_state"])
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "only a platform admin suspends"
    );

    // Carol may rename herself but not promote herself.
    let display_name = "Carol".into();
    let carol_renamed = carol_as(idv1::User {
        display_name,
        ..Default::default()
    });
    let renamed = update_user(&carol, carol_renamed, &["display_name"])
        .await
        .unwrap();
    assert_eq!(renamed.display_name, "Carol");
    let promoted = carol_as(user("", "admin"));
    let status = update_user(&carol, promoted, &["role"]).await;
    expect_code(status, Code::PermissionDenied);

    // The platform admin suspends the account; the owner's key then reports it.
    let over_limit = idv1::account::SuspendState::MonthlySpendLimitExceeded as i32;
    let suspend = acme(idv1::Account {
        suspend_state: over_limit,
        ..Default::default()
    });
    let suspended = update_account(&admin, suspend, &["suspend_state"])
        .await
        .unwrap();
    assert_eq!(suspended.suspend_state, over_limit);

    // Deleting the account removes its users and keys.
    delete_account(&admin, "accounts/acme").await.unwrap();
    let status = get_account(&carol, "accounts/acme").await;
    expect_code(status, Code::Unauthenticated);
    let status = delete_account(&admin, "accounts/kiln").await;
    expect_code(status, Code::FailedPrecondition);
    mesh.shutdown().await;
}
