//! The authenticator of services other than identity: asks identity's internal AuthService.

use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use kiln_proto::identity::v1::AuthenticateRequest;
use kiln_proto::identity::v1::auth_service_client::AuthServiceClient;

use crate::Error;
use crate::auth::{Authenticated, Authenticator, Principal, Role};

/// Converts identity's principal message into the core type.
pub fn principal_from_proto(p: kiln_proto::identity::v1::Principal) -> Principal {
    Principal {
        account: crate::names::account_of(&p.account).to_owned(),
        user: p.user.rsplit('/').next().unwrap_or_default().to_owned(),
        api_key: p.api_key,
        roles: p.roles.iter().filter_map(|r| Role::parse(r)).collect(),
        suspend_state: p.suspend_state,
    }
}

/// Resolves API keys through identity's `kiln.identity.v1.AuthService/Authenticate`.
impl Authenticator for AuthServiceClient<crate::server::ServiceChannel> {
    fn authenticate<'a>(&'a self, api_key: &'a str) -> BoxFuture<'a, Result<Authenticated, Error>> {
        Box::pin(async move {
            let mut client = self.clone();
            let request = AuthenticateRequest {
                api_key: api_key.to_owned(),
            };
            let response = AuthServiceClient::authenticate(&mut client, request)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::Unauthenticated => {
                        Error::Unauthenticated(status.message().to_owned())
                    }
                    _ => Error::Unavailable(format!("identity: {}", status.message())),
                })?
                .into_inner();
            let principal = response
                .principal
                .ok_or_else(|| Error::Internal("identity returned no principal".into()))?;
            let expire_time = response.expire_time.and_then(|t| {
                SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                    t.seconds.max(0) as u64,
                    t.nanos.max(0) as u32,
                ))
            });
            Ok(Authenticated {
                principal: principal_from_proto(principal),
                expire_time,
            })
        })
    }
}
