//! The gRPC face of identity: thin handlers that read the principal, call [`Identity`] and
//! map errors once (through `kiln_core::grpc`).

use kiln_core::grpc::{ListRpc, Reply, reply, reply_list, required, split};
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

#[tonic::async_trait]
impl account_service_server::AccountService for Identity {
    async fn create_account(&self, request: Request<CreateAccountRequest>) -> Reply<Account> {
        let (p, r) = split(request)?;
        let account = r.account.unwrap_or_default();
        reply(self.create_account(&p, r.account_id, account).await)
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Reply<Account> {
        let (p, r) = split(request)?;
        reply(self.get_account(&p, &r.name).await)
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Reply<ListAccountsResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_accounts(&p, &r.list_request()).await)
    }

    async fn update_account(&self, request: Request<UpdateAccountRequest>) -> Reply<Account> {
        let (p, r) = split(request)?;
        let account = required(r.account, "account")?;
        reply(self.update_account(&p, account, r.update_mask).await)
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Reply<DeleteAccountResponse> {
        let (p, r) = split(request)?;
        reply(
            self.delete_account(&p, &r.name)
                .await
                .map(|()| DeleteAccountResponse {}),
        )
    }
}

#[tonic::async_trait]
impl user_service_server::UserService for Identity {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Reply<User> {
        let (p, r) = split(request)?;
        let user = r.user.unwrap_or_default();
        reply(self.create_user(&p, &r.parent, r.user_id, user).await)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Reply<User> {
        let (p, r) = split(request)?;
        reply(self.get_user(&p, &r.name).await)
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Reply<ListUsersResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_users(&p, &r.list_request()).await)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Reply<User> {
        let (p, r) = split(request)?;
        let user = required(r.user, "user")?;
        reply(self.update_user(&p, user, r.update_mask).await)
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Reply<DeleteUserResponse> {
        let (p, r) = split(request)?;
        reply(
            self.delete_user(&p, &r.name)
                .await
                .map(|()| DeleteUserResponse {}),
        )
    }
}

#[tonic::async_trait]
impl api_key_service_server::ApiKeyService for Identity {
    async fn create_api_key(&self, request: Request<CreateApiKeyRequest>) -> Reply<ApiKey> {
        let (p, r) = split(request)?;
        let key = r.api_key.unwrap_or_default();
        reply(self.create_api_key(&p, &r.parent, key).await)
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Reply<ListApiKeysResponse> {
        let (p, r) = split(request)?;
        reply_list(self.list_api_keys(&p, &r.list_request()).await)
    }

    async fn delete_api_key(
        &self,
        request: Request<DeleteApiKeyRequest>,
    ) -> Reply<DeleteApiKeyResponse> {
        let (p, r) = split(request)?;
        reply(
            self.delete_api_key(&p, &r.name)
                .await
                .map(|()| DeleteApiKeyResponse {}),
        )
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
