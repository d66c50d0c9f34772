//! Accounts, users and API keys through the gRPC API: tenancy, validation, pagination.

use std::collections::HashSet;

use kiln_proto::identity::v1 as idv1;
use kiln_tests::TestMesh;
use kiln_tests::{accounts, create_account, create_key, create_user, tenant, users};
use tonic::Code;
use tonic_types::StatusExt;

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
    let own = accounts(&ch)
        .get_account(idv1::GetAccountRequest {
            name: "accounts/acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.name, "accounts/acme");
    // The bare ID works too.
    accounts(&ch)
        .get_account(idv1::GetAccountRequest {
            name: "acme".into(),
        })
        .await
        .unwrap();
    let listed = users(&ch)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .users
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["accounts/acme/users/alice"]
    );
    let mine = users(&ch)
        .get_user(idv1::GetUserRequest {
            name: "accounts/acme/users/alice".into(),
        })
        .await
        .unwrap();
    assert_eq!(mine.into_inner().email, "alice@acme.example");

    // Another account's resources do not exist for this key, whatever the call.
    let not_found = |r: Result<_, tonic::Status>| {
        let status = r.expect_err("must fail");
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    };
    not_found(
        accounts(&ch)
            .get_account(idv1::GetAccountRequest {
                name: "accounts/globex".into(),
            })
            .await
            .map(|_| ()),
    );
    not_found(
        users(&ch)
            .get_user(idv1::GetUserRequest {
                name: "accounts/globex/users/bob".into(),
            })
            .await
            .map(|_| ()),
    );
    not_found(
        users(&ch)
            .list_users(idv1::ListUsersRequest {
                parent: "accounts/globex".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    );
    not_found(
        kiln_tests::keys(&ch)
            .list_api_keys(idv1::ListApiKeysRequest {
                parent: "accounts/globex/users/bob".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
    );
    not_found(
        users(&ch)
            .delete_user(idv1::DeleteUserRequest {
                name: "accounts/globex/users/bob".into(),
            })
            .await
            .map(|_| ()),
    );
    // Same answer for an account that does not exist at all: existence never leaks.
    not_found(
        accounts(&ch)
            .get_account(idv1::GetAccountRequest {
                name: "accounts/nope".into(),
            })
            .await
            .map(|_| ()),
    );

    // Listing accounts shows only its own.
    let all = accounts(&ch)
        .list_accounts(idv1::ListAccountsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        all.accounts
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["accounts/acme"]
    );

    // A plain user may not add users or create accounts.
    let denied = users(&ch)
        .create_user(idv1::CreateUserRequest {
            parent: "accounts/acme".into(),
            user_id: "eve".into(),
            user: Some(idv1::User {
                email: "eve@acme.example".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = accounts(&ch)
        .create_account(idv1::CreateAccountRequest {
            account_id: "mine".into(),
            account: None,
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    mesh.shutdown().await;
}

fn assert_invalid(status: tonic::Status, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
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
    for bad in [
        "Acme",
        "-acme",
        "acme-",
        long.as_str(),
        "ümlaut",
        "a_b",
        "a.b",
    ] {
        let status = accounts(&admin)
            .create_account(idv1::CreateAccountRequest {
                account_id: bad.to_owned(),
                account: Some(idv1::Account {
                    account_type: idv1::account::AccountType::Enterprise as i32,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_invalid(status, "account_id");
    }
    let empty = accounts(&admin)
        .create_account(idv1::CreateAccountRequest {
            account_id: String::new(),
            account: Some(idv1::Account {
                account_type: idv1::account::AccountType::Enterprise as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_invalid(empty, "account_id");
    // 63 characters is the longest valid ID.
    create_account(&admin, &"a".repeat(63)).await;

    create_account(&admin, "acme").await;
    let dup = accounts(&admin)
        .create_account(idv1::CreateAccountRequest {
            account_id: "acme".into(),
            account: None,
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists, "{dup:?}");

    for bad in ["Bob", "-bob", "bob-", long.as_str(), "", "bób"] {
        let status = users(&admin)
            .create_user(idv1::CreateUserRequest {
                parent: "accounts/acme".into(),
                user_id: bad.to_owned(),
                user: Some(idv1::User {
                    email: "bob@acme.example".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_invalid(status, "user_id");
    }
    let status = users(&admin)
        .create_user(idv1::CreateUserRequest {
            parent: "accounts/acme".into(),
            user_id: "bob".into(),
            user: Some(idv1::User {
                email: "not-an-email".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_invalid(status, "user.email");
    let status = users(&admin)
        .create_user(idv1::CreateUserRequest {
            parent: "accounts/acme".into(),
            user_id: "bob".into(),
            user: Some(idv1::User {
                email: "bob@acme.example".into(),
                role: "owner".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_invalid(status, "user.role");
    let status = users(&admin)
        .get_user(idv1::GetUserRequest {
            name: "accounts/acme/people/bob".into(),
        })
        .await
        .unwrap_err();
    assert_invalid(status, "name");

    create_user(&admin, "acme", "bob", "user").await;
    let dup = users(&admin)
        .create_user(idv1::CreateUserRequest {
            parent: "accounts/acme".into(),
            user_id: "bob".into(),
            user: Some(idv1::User {
                email: "other@acme.example".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let dup_email = users(&admin)
        .create_user(idv1::CreateUserRequest {
            parent: "accounts/acme".into(),
            user_id: "bobby".into(),
            user: Some(idv1::User {
                email: "bob@acme.example".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(dup_email.code(), Code::AlreadyExists);
    mesh.shutdown().await;
}

#[tokio::test]
async fn developer_accounts_get_unique_ids_from_the_email() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let create = |email: &'static str| {
        let admin = admin.clone();
        async move {
            accounts(&admin)
                .create_account(idv1::CreateAccountRequest {
                    account_id: String::new(),
                    account: Some(idv1::Account {
                        email: email.into(),
                        ..Default::default()
                    }),
                })
                .await
                .unwrap()
                .into_inner()
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
    let missing = accounts(&admin)
        .create_account(idv1::CreateAccountRequest {
            account_id: String::new(),
            account: None,
        })
        .await
        .unwrap_err();
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
        let page = users(&admin)
            .list_users(idv1::ListUsersRequest {
                parent: "accounts/big".into(),
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
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
    let desc = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/big".into(),
            page_size: 1,
            order_by: "name desc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(desc.users[0].name, "accounts/big/users/user-249");
    let filtered = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/big".into(),
            filter: r#"email = "user-007@big.example""#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.users.len(), 1);
    let bad_filter = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/big".into(),
            filter: "password = x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(bad_filter, "filter");

    // A tampered token is refused, and so is a token carried to another listing.
    let first = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/big".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut tampered = first.next_page_token.clone().into_bytes();
    tampered[3] = if tampered[3] == b'A' { b'B' } else { b'A' };
    let status = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/big".into(),
            page_size: 100,
            page_token: String::from_utf8(tampered).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(status, "page_token");
    create_account(&admin, "small").await;
    let status = users(&admin)
        .list_users(idv1::ListUsersRequest {
            parent: "accounts/small".into(),
            page_size: 100,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_invalid(status, "page_token");
    mesh.shutdown().await;
}

#[tokio::test]
async fn updates_follow_the_mask_and_roles() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let owner_key = tenant(&admin, "acme").await;
    let owner = mesh.channel(Some(&owner_key)).await;
    // The account admin adds a plain user and gives them a key.
    create_user(&owner, "acme", "carol", "user").await;
    let carol_key = create_key(&owner, "acme", "carol", None).await.key;
    let carol = mesh.channel(Some(&carol_key)).await;

    let updated = accounts(&owner)
        .update_account(idv1::UpdateAccountRequest {
            account: Some(idv1::Account {
                name: "accounts/acme".into(),
                display_name: "ACME Corp".into(),
                email: "ignored@x.io".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "ACME Corp");
    assert_eq!(
        updated.email, "owner@acme.example",
        "fields outside the mask are kept"
    );

    let status = accounts(&owner)
        .update_account(idv1::UpdateAccountRequest {
            account: Some(idv1::Account {
                name: "accounts/acme".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["create_time".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_invalid(status, "update_mask");
    let status = accounts(&owner)
        .update_account(idv1::UpdateAccountRequest {
            account: Some(idv1::Account {
                name: "accounts/acme".into(),
                suspend_state: idv1::account::SuspendState::Unsuspended as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["suspend_state".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "only a platform admin suspends"
    );

    // Carol may rename herself but not promote herself.
    let renamed = users(&carol)
        .update_user(idv1::UpdateUserRequest {
            user: Some(idv1::User {
                name: "accounts/acme/users/carol".into(),
                display_name: "Carol".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["display_name".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renamed.display_name, "Carol");
    let status = users(&carol)
        .update_user(idv1::UpdateUserRequest {
            user: Some(idv1::User {
                name: "accounts/acme/users/carol".into(),
                role: "admin".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["role".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // The platform admin suspends the account; the owner's key then reports it.
    let suspended = accounts(&admin)
        .update_account(idv1::UpdateAccountRequest {
            account: Some(idv1::Account {
                name: "accounts/acme".into(),
                suspend_state: idv1::account::SuspendState::MonthlySpendLimitExceeded as i32,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["suspend_state".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        suspended.suspend_state,
        idv1::account::SuspendState::MonthlySpendLimitExceeded as i32
    );

    // Deleting the account removes its users and keys.
    accounts(&admin)
        .delete_account(idv1::DeleteAccountRequest {
            name: "accounts/acme".into(),
        })
        .await
        .unwrap();
    let status = accounts(&carol)
        .get_account(idv1::GetAccountRequest {
            name: "accounts/acme".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = accounts(&admin)
        .delete_account(idv1::DeleteAccountRequest {
            name: "accounts/kiln".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    mesh.shutdown().await;
}
