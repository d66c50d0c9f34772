//! The gRPC face of identity: thin handlers that read the principal, call [`Identity`] and
//! map errors once (through `kiln_core::grpc`), one line per RPC.

use kiln_core::grpc::{ListRpc, Reply, Update, deleted, split};
use kiln_proto::identity::v1::{
    Account, ApiKey, AuthenticateRequest, AuthenticateResponse, CreateAccountRequest,
    CreateApiKeyRequest, CreateUserRequest, DeleteAccountRequest, DeleteAccountResponse,
    DeleteApiKeyRequest, DeleteApiKeyResponse, DeleteUserRequest, DeleteUserResponse,
    GetAccountRequest, GetUserRequest, ListAccountsRequest, ListAccountsResponse,
    ListApiKeysRequest, ListApiKeysResponse, ListUsersRequest, ListUsersResponse,
    UpdateAccountRequest, UpdateUserRequest, User, account_service_server, api_key_service_server,
    auth_service_server, user_service_server,
};
use tonic::{Request, Response};

use crate::service::Identity;

kiln_core::grpc_service! {
    impl account_service_server::AccountService for Identity {
        fn create_account(CreateAccountRequest) -> Account = |svc, caller, r| {
            let account = r.account.unwrap_or_default();
            svc.create_account(&caller, r.account_id, account).await
        };
        fn get_account(GetAccountRequest) -> Account =
            |svc, caller, r| svc.get_account(&caller, &r.name).await;
        fn list_accounts(ListAccountsRequest) -> ListAccountsResponse =
            |svc, caller, r| svc.list_accounts(&caller, &r.list_request()).await.map(Into::into);
        fn update_account(UpdateAccountRequest) -> Account = |svc, caller, r| {
            svc.update_account(&caller, Update::new("account", r.account, r.update_mask)?).await
        };
        fn delete_account(DeleteAccountRequest) -> DeleteAccountResponse =
            |svc, caller, r| svc.delete_account(&caller, &r.name).await.map(deleted);
    }
}

kiln_core::grpc_service! {
    impl user_service_server::UserService for Identity {
        fn create_user(CreateUserRequest) -> User = |svc, caller, r| {
            let user = r.user.unwrap_or_default();
            svc.create_user(&caller, &r.parent, r.user_id, user).await
        };
        fn get_user(GetUserRequest) -> User =
            |svc, caller, r| svc.get_user(&caller, &r.name).await;
        fn list_users(ListUsersRequest) -> ListUsersResponse =
            |svc, caller, r| svc.list_users(&caller, &r.list_request()).await.map(Into::into);
        fn update_user(UpdateUserRequest) -> User = |svc, caller, r| {
            svc.update_user(&caller, Update::new("user", r.user, r.update_mask)?).await
        };
        fn delete_user(DeleteUserRequest) -> DeleteUserResponse =
            |svc, caller, r| svc.delete_user(&caller, &r.name).await.map(deleted);
    }
}

kiln_core::grpc_service! {
    impl api_key_service_server::ApiKeyService for Identity {
        fn create_api_key(CreateApiKeyRequest) -> ApiKey = |svc, caller, r| {
            let key = r.api_key.unwrap_or_default();
            svc.create_api_key(&caller, &r.parent, key).await
        };
        fn list_api_keys(ListApiKeysRequest) -> ListApiKeysResponse =
            |svc, caller, r| svc.list_api_keys(&caller, &r.list_request()).await.map(Into::into);
        fn delete_api_key(DeleteApiKeyRequest) -> DeleteApiKeyResponse =
            |svc, caller, r| svc.delete_api_key(&caller, &r.name).await.map(deleted);
    }
}

#[tonic::async_trait]
impl auth_service_server::AuthService for Identity {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Reply<AuthenticateResponse> {
        let (p, r) = split(request)?;
        if !p.is_privileged() {
            return Err(kiln_core::Error::PermissionDenied(
                "Authenticate is for Kiln services".into(),
            )
            .into());
        }
        let auth = self.authenticate_key(&r.api_key).await?;
        let pr = auth.principal;
        Ok(Response::new(AuthenticateResponse {
            principal: Some(kiln_proto::identity::v1::Principal {
                account: format!("accounts/{}", pr.account),
                user: pr.user_name(),
                api_key: pr.api_key.clone(),
                roles: pr.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                suspend_state: pr.suspend_state,
            }),
            expire_time: auth.expire_time.map(|t| {
                let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                prost_types::Timestamp {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                }
            }),
        }))
    }
}

/// Adds identity's four gRPC services to a server.
pub fn add_services(identity: &Identity, services: &mut kiln_core::server::ServiceSet) {
    services
        .add(account_service_server::AccountServiceServer::new(
            identity.clone(),
        ))
        .add(user_service_server::UserServiceServer::new(
            identity.clone(),
        ))
        .add(api_key_service_server::ApiKeyServiceServer::new(
            identity.clone(),
        ))
        .add(auth_service_server::AuthServiceServer::new(
            identity.clone(),
        ));
}
