use kiln_core::Error;
use kiln_core::auth::Role;
use kiln_core::time::micros_to_timestamp;

use super::*;
use crate::rules::test_support::{
    account_row, admin, invalid_field, member, platform_admin, user_row,
};

fn named(display_name: &str) -> ApiKey {
    ApiKey {
        display_name: display_name.to_owned(),
        ..Default::default()
    }
}

fn expiring_at(micros: i64) -> ApiKey {
    ApiKey {
        expire_time: Some(micros_to_timestamp(micros)),
        ..Default::default()
    }
}

#[test]
fn a_user_and_the_admins_of_its_account_manage_its_keys() {
    let carol = user_row("acme", "carol", "user");
    for caller in [
        member("acme", "carol"),
        admin("acme", "alice"),
        platform_admin(),
        Principal::service(),
    ] {
        assert_eq!(new_key_expiry(&caller, &carol, &named("ci"), 0), Ok(None));
        assert_eq!(check_delete(&caller, &carol), Ok(()));
    }
    for caller in [
        member("acme", "bob"),
        admin("beta", "eve"),
        member("beta", "carol"),
    ] {
        assert!(
            matches!(
                new_key_expiry(&caller, &carol, &named("ci"), 0),
                Err(Error::PermissionDenied(_))
            ),
            "{caller:?}"
        );
        assert!(matches!(
            check_delete(&caller, &carol),
            Err(Error::PermissionDenied(_))
        ));
    }
}

#[test]
fn a_new_key_expires_in_the_future_or_never() {
    let carol = user_row("acme", "carol", "user");
    let me = member("acme", "carol");
    let now = 1_700_000_000_000_000;
    assert_eq!(
        new_key_expiry(&me, &carol, &expiring_at(now + 1), now),
        Ok(Some(now + 1))
    );
    for past in [now, now - 1, 0, -5] {
        assert_eq!(
            invalid_field(new_key_expiry(&me, &carol, &expiring_at(past), now)),
            "api_key.expire_time",
            "{past}"
        );
    }
}

#[test]
fn a_key_name_is_at_most_256_characters() {
    let carol = user_row("acme", "carol", "user");
    let me = member("acme", "carol");
    assert!(new_key_expiry(&me, &carol, &named(&"k".repeat(256)), 0).is_ok());
    assert_eq!(
        invalid_field(new_key_expiry(&me, &carol, &named(&"k".repeat(257)), 0)),
        "api_key.display_name"
    );
}

#[test]
fn a_secret_is_kiln_and_256_random_bits_in_base64url() {
    let secret = new_secret();
    let encoded = secret.strip_prefix("kiln_").unwrap();
    assert_eq!(encoded.len(), 43, "32 bytes, unpadded");
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .unwrap();
    assert_eq!(decoded.len(), SECRET_BYTES);
    assert_ne!(new_secret(), secret);
}

#[test]
fn a_new_key_stores_the_digest_and_the_first_characters_only() {
    let carol = user_row("acme", "carol", "user");
    let (key, secret) = new_key(&carol, "ci", Some(500), 7);
    assert_eq!(key.prefix.len(), 12, "\"kiln_\" and 7 characters");
    assert!(secret.starts_with(&key.prefix));
    assert!(key.prefix.starts_with("kiln_"));
    assert_eq!(key.secret_sha256, secret_digest(&secret));
    assert_eq!(key.secret_sha256.len(), 64);
    assert!(!key.secret_sha256.contains(&secret[STORED_PREFIX_CHARS..]));
    assert_eq!(key.key_id.len(), KEY_ID_LEN);
    assert_eq!(
        (
            key.account_id.as_str(),
            key.user_id.as_str(),
            key.display_name.as_str()
        ),
        ("acme", "carol", "ci")
    );
    assert_eq!((key.create_time, key.expire_time), (7, Some(500)));
    assert_eq!(
        key_name(&key),
        format!("accounts/acme/users/carol/apiKeys/{}", key.key_id)
    );
}

#[test]
fn a_digest_is_the_hex_sha256_of_the_secret() {
    assert_eq!(
        secret_digest("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn a_key_is_expired_from_its_expiry_on() {
    assert!(!is_expired(None, i64::MAX));
    assert!(!is_expired(Some(101), 100));
    assert!(is_expired(Some(100), 100), "at the instant itself");
    assert!(is_expired(Some(99), 100));
}

#[test]
fn a_key_authenticates_as_its_user_with_the_account_state() {
    let carol = user_row("acme", "carol", "user");
    let (key, _) = new_key(&carol, "ci", None, 0);
    let mut account = account_row("acme");
    account.suspend_state = 4;
    let auth = authenticated(&key, &carol, &account);
    assert_eq!(auth.principal.account, "acme");
    assert_eq!(auth.principal.user, "carol");
    assert_eq!(auth.principal.api_key, key_name(&key));
    assert_eq!(auth.principal.roles, [Role::User]);
    assert_eq!(auth.principal.suspend_state, 4);
    assert_eq!(auth.expire_time, None);
}

#[test]
fn a_system_admin_key_authenticates_as_a_platform_admin() {
    let root = user_row("kiln", "admin", "admin");
    let (key, _) = new_key(&root, "bootstrap", None, 0);
    let auth = authenticated(&key, &root, &account_row("kiln"));
    assert_eq!(
        auth.principal.roles,
        [Role::AccountAdmin, Role::PlatformAdmin]
    );
    assert!(auth.principal.is_privileged());
}

#[test]
fn an_authentication_holds_until_the_key_expires() {
    let carol = user_row("acme", "carol", "user");
    let (key, _) = new_key(&carol, "ci", Some(1_500_000), 0);
    let auth = authenticated(&key, &carol, &account_row("acme"));
    assert_eq!(
        auth.expire_time,
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1500))
    );
    let (before_epoch, _) = new_key(&carol, "ci", Some(-3), 0);
    assert_eq!(
        authenticated(&before_epoch, &carol, &account_row("acme")).expire_time,
        Some(SystemTime::UNIX_EPOCH)
    );
}
