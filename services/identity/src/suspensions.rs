//! Applies billing's suspensions to accounts: `kiln.billing.account.suspended` sets the
//! account's suspend_state, `...unsuspended` clears it (only the suspension billing set, so
//! an admin's own suspension stays). Each change is an `identity.account.updated` event,
//! which drops every service's cached principals of the account, so its keys stop (or
//! start) working everywhere within the relay's delay.

use kiln_events::records::HasRecords as _;
use std::sync::Arc;

use async_trait::async_trait;
use kiln_events::consumer::{EventHandler, OnceEach};
use kiln_events::{Body, Event};
use kiln_proto::identity::v1::account::SuspendState;
use sea_orm::{ActiveModelTrait, DatabaseTransaction, EntityTrait, IntoActiveModel};

use crate::accounts::account_proto;
use crate::db::account as accounts;
use crate::service::{Change, Identity};

const CONSUMER: &str = "identity-suspensions";
const SUBJECTS: &str = "kiln.billing.account.>";

struct Suspensions(Identity);

#[async_trait]
impl EventHandler for Suspensions {
    async fn handle(
        &self,
        txn: &DatabaseTransaction,
        event: &Event,
    ) -> Result<(), kiln_events::Error> {
        let (name, to) = match &event.body {
            Some(Body::AccountSuspended(s)) => (&s.account, s.suspend_state),
            Some(Body::AccountUnsuspended(u)) => (&u.account, SuspendState::Unsuspended as i32),
            _ => return Ok(()),
        };
        let id = kiln_core::names::account_of(name);
        let Some(row) = accounts::Entity::find_by_id(id.to_owned()).one(txn).await? else {
            return Ok(());
        };
        if let Some(Body::AccountUnsuspended(u)) = &event.body
            && row.suspend_state != u.previous_suspend_state
        {
            // Suspended since for another reason: not billing's to lift.
            return Ok(());
        }
        if row.suspend_state == to {
            return Ok(());
        }
        let mut model = row.into_active_model();
        model.suspend_state = sea_orm::ActiveValue::Set(to);
        model.update_time = sea_orm::ActiveValue::Set(kiln_core::time::now_micros());
        let updated = model.update(txn).await?;
        let proto = account_proto(&updated);
        let changed =
            Change::AccountUpdated(&proto, vec!["suspend_state".into()]).event(self.0.outbox());
        self.0.outbox().enqueue(txn, &changed).await
    }
}

/// Starts the consumer on the host.
pub fn spawn(identity: &Identity, host: &mut kiln_events::host::Host) {
    let handler = Arc::new(Suspensions(identity.clone()));
    let once_each = OnceEach::new(identity.db().clone(), CONSUMER, handler);
    host.consume(CONSUMER, SUBJECTS, 1, once_each);
}
