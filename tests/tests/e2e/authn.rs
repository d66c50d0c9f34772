//! Authentication: missing, wrong, expired and deleted keys; the internal Authenticate RPC;
//! a deleted key stops working on every replica within a second.

use std::time::{Duration, Instant, SystemTime};

use kiln_proto::identity::v1 as idv1;
use kiln_tests::{MeshOptions, SERVICE_TOKEN, TestMesh, wait_for};
use kiln_tests::{accounts, create_key, create_user, tenant};
use tonic::Code;

async fn get_acme(ch: &kiln_tests::AuthedChannel) -> Result<idv1::Account, tonic::Status> {
    accounts(ch)
        .get_account(idv1::GetAccountRequest {
            name: "accounts/acme".into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn missing_wrong_and_expired_keys_are_unauthenticated() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    get_acme(&mesh.channel(Some(&key)).await)
        .await
        .expect("a valid key works");

    let none = get_acme(&mesh.channel(None).await).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = get_acme(&mesh.channel(Some("kiln_not-a-real-key")).await)
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    // A key that differs from a real one in its last character.
    let mut near = key.clone();
    let last = near.pop().unwrap();
    near.push(if last == 'A' { 'B' } else { 'A' });
    let near = get_acme(&mesh.channel(Some(&near)).await)
        .await
        .unwrap_err();
    assert_eq!(near.code(), Code::Unauthenticated);

    let soon = SystemTime::now() + Duration::from_secs(2);
    let expiring = create_key(
        &admin,
        "acme",
        "owner",
        Some(prost_types::Timestamp::from(soon)),
    )
    .await;
    let ch = mesh.channel(Some(&expiring.key)).await;
    get_acme(&ch).await.expect("works before it expires");
    let status = wait_for(Duration::from_secs(10), "the key to expire", || {
        let ch = ch.clone();
        async move { get_acme(&ch).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        SystemTime::now() >= soon,
        "refused only after its expire_time"
    );
    assert!(status.message().contains("expired"), "{}", status.message());

    let past = create_key_status(
        &admin,
        Some(prost_types::Timestamp::from(
            SystemTime::now() - Duration::from_secs(5),
        )),
    )
    .await;
    assert_eq!(past.code(), Code::InvalidArgument);
    assert!(past.message().starts_with("api_key.expire_time"));
    mesh.shutdown().await;
}

async fn create_key_status(
    admin: &kiln_tests::AuthedChannel,
    expire_time: Option<prost_types::Timestamp>,
) -> tonic::Status {
    kiln_tests::keys(admin)
        .create_api_key(idv1::CreateApiKeyRequest {
            parent: "accounts/acme/users/owner".into(),
            api_key: Some(idv1::ApiKey {
                expire_time,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err()
}

#[tokio::test]
async fn a_deleted_key_is_refused_everywhere_within_a_second() {
    let primary = TestMesh::start().await;
    let admin = primary.admin().await;
    let _ = tenant(&admin, "acme").await;
    create_user(&admin, "acme", "alice", "user").await;
    let key = create_key(&admin, "acme", "alice", None).await;

    // A second replica on the same database and bus, with its own key cache, that resolves
    // keys through the first one's internal AuthService.
    let replica = TestMesh::start_with(MeshOptions {
        bus: Some(primary.bus.clone()),
        database: Some((
            primary.config.server.database_url.clone(),
            primary.config.server.data_dir.clone(),
        )),
        identity_url: Some(primary.url()),
        ..Default::default()
    })
    .await;
    let on_primary = primary.channel(Some(&key.key)).await;
    let on_replica = replica.channel(Some(&key.key)).await;
    // Both now hold the key in their caches.
    get_acme(&on_primary).await.unwrap();
    get_acme(&on_replica).await.unwrap();

    kiln_tests::keys(&admin)
        .delete_api_key(idv1::DeleteApiKeyRequest {
            name: key.name.clone(),
        })
        .await
        .unwrap();
    let deleted_at = Instant::now();
    for (where_, ch) in [("primary", &on_primary), ("replica", &on_replica)] {
        let status = wait_for(
            Duration::from_secs(1),
            &format!("the deleted key to be refused on the {where_}"),
            || {
                let ch = ch.clone();
                async move { get_acme(&ch).await.err() }
            },
        )
        .await;
        assert_eq!(status.code(), Code::Unauthenticated, "{where_}: {status:?}");
    }
    assert!(deleted_at.elapsed() < Duration::from_secs(1));
    let status = kiln_tests::keys(&admin)
        .delete_api_key(idv1::DeleteApiKeyRequest { name: key.name })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    replica.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test]
async fn authenticate_is_for_services_only() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    let mut as_user =
        idv1::auth_service_client::AuthServiceClient::new(mesh.channel(Some(&key)).await);
    let status = as_user
        .authenticate(idv1::AuthenticateRequest {
            api_key: key.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut as_service =
        idv1::auth_service_client::AuthServiceClient::new(mesh.channel(Some(SERVICE_TOKEN)).await);
    let principal = as_service
        .authenticate(idv1::AuthenticateRequest { api_key: key })
        .await
        .unwrap()
        .into_inner()
        .principal
        .unwrap();
    assert_eq!(principal.account, "accounts/acme");
    assert_eq!(principal.user, "accounts/acme/users/owner");
    assert_eq!(principal.roles, ["admin"]);
    let status = as_service
        .authenticate(idv1::AuthenticateRequest {
            api_key: "kiln_bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The bootstrap key is a platform admin.
    let admin_principal = as_service
        .authenticate(idv1::AuthenticateRequest {
            api_key: mesh.admin_key.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .principal
        .unwrap();
    assert!(admin_principal.roles.contains(&"platform-admin".to_owned()));
    mesh.shutdown().await;
}
