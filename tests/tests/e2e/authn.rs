//! Authentication: missing, wrong, expired and deleted keys; the internal Authenticate RPC;
//! a deleted key stops working on every replica within a second.

use std::time::{Duration, Instant, SystemTime};

use kiln_proto::identity::v1 as idv1;
use kiln_tests::{MeshOptions, SERVICE_TOKEN, TestMesh, wait_for};
use kiln_tests::{
    authenticate, create_key, delete_key, expect_code, get_account, tenant, try_create_key,
    user_with_key,
};
use tonic::Code;

async fn get_acme(ch: &kiln_tests::AuthedChannel) -> Result<idv1::Account, tonic::Status> {
    get_account(ch, "accounts/acme").await
}

#[tokio::test]
async fn missing_wrong_and_expired_keys_are_unauthenticated() {
    let mesh = TestMesh::start().await;
    let admin = mesh.admin().await;
    let key = tenant(&admin, "acme").await;
    get_acme(&mesh.channel(Some(&key)).await)
        .await
        .expect("a valid key works");

    let none = get_acme(&mesh.channel(None).await).await;
    expect_code(none, Code::Unauthenticated);
    let wrong = get_acme(&mesh.channel(Some("kiln_not-a-real-key")).await).await;
    expect_code(wrong, Code::Unauthenticated);
    // A key that differs from a real one in its last character.
    let mut near = key.clone();
    let last = near.pop().unwrap();
    near.push(if last == 'A' { 'B' } else { 'A' });
    let near = get_acme(&mesh.channel(Some(&near)).await).await;
    expect_code(near, Code::Unauthenticated);

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

    let expire_time = Some(prost_types::Timestamp::from(
        SystemTime::now() - Duration::from_secs(5),
    ));
    let expired = idv1::ApiKey {
        expire_time,
        ..Default::default()
    };
    let past = try_create_key(&admin, "accounts/acme/users/owner", expired).await;
    let past = expect_code(past, Code::InvalidArgument);
    assert!(past.message().starts_with("api_key.expire_time"));
    mesh.shutdown().await;
}

#[tokio::test]
async fn a_deleted_key_is_refused_everywhere_within_a_second() {
    let primary = TestMesh::start().await;
    let admin = primary.admin().await;
    let _ = tenant(&admin, "acme").await;
    let key = user_with_key(&admin, "acme", "alice", "user").await;

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

    delete_key(&admin, &key.name).await.unwrap();
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
    expect_code(delete_key(&admin, &key.name).await, Code::NotFound);
    replica.shutdown().await;
    primary.shutdown().await;
}

#[tokio::test]
async fn authenticate_is_for_services_only() {
    let mesh = TestMesh::start().await;
    let (key, as_user) = mesh.tenant("acme").await;
    expect_code(authenticate(&as_user, &key).await, Code::PermissionDenied);

    let as_service = mesh.channel(Some(SERVICE_TOKEN)).await;
    let principal = authenticate(&as_service, &key).await.unwrap();
    assert_eq!(principal.account, "accounts/acme");
    assert_eq!(principal.user, "accounts/acme/users/owner");
    assert_eq!(principal.roles, ["admin"]);
    let bogus = authenticate(&as_service, "kiln_bogus").await;
    expect_code(bogus, Code::Unauthenticated);

    // The bootstrap key is a platform admin.
    let admin_principal = authenticate(&as_service, &mesh.admin_key).await.unwrap();
    assert!(admin_principal.roles.contains(&"platform-admin".to_owned()));
    mesh.shutdown().await;
}
