//! Helpers the unit tests share: a billing on SQLite in a temporary directory.

use kiln_core::auth::{Principal, Role};
use kiln_proto::common::v1::Money;

use crate::config::BillingConfig;
use crate::prices::NANOS_PER_UNIT;
use crate::service::Billing;

/// Billing with the default settings, its database in `dir`.
pub(crate) async fn billing(dir: &tempfile::TempDir) -> Billing {
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("billing.db").display()
    );
    let db = kiln_store::connect(&url).await.unwrap();
    kiln_store::migrate(&db, crate::service::SERVICE, crate::db::MIGRATIONS)
        .await
        .unwrap();
    Billing::new(
        db,
        kiln_core::page::PageTokens::new(b"test"),
        BillingConfig::default(),
    )
    .unwrap()
}

pub(crate) fn admin() -> Principal {
    Principal {
        roles: vec![Role::PlatformAdmin],
        ..Principal::service()
    }
}

/// An amount as nano-units.
pub(crate) fn nanos(money: Option<&Money>) -> i64 {
    let money = money.expect("an amount");
    money.units * NANOS_PER_UNIT + i64::from(money.nanos)
}
