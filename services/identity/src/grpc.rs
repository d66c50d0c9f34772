//! The gRPC face of identity: thin handlers that read the principal, call [`Identity`] and
//! map errors once (through `crate::error`).

use kiln_core::auth::principal;
use kiln_proto::identity::v1::{
    Account, ApiKey, AuthenticateRequest, AuthenticateResponse, CreateAccountRequest,
    CreateApiKeyRequest, CreateUserRequest, DeleteAccountRequest, DeleteAccountResponse,
    DeleteApiKeyRequest, DeleteApiKeyResponse, DeleteUserRequest, DeleteUserResponse,
    GetAccountRequest, GetUserRequest, ListAccountsRequest, ListAccountsResponse,
    ListApiKeysRequest, ListApiKeysResponse, ListUsersRequest, ListUsersResponse,
    UpdateAccountRequest, UpdateUserRequest, User, account_service_server, api_key_service_server,
    auth_service_server, user_service_server,
};
use tonic::{Request, Response, Status};

use crate::service::Identity;

type Reply<T> = Result<Response<T>, Status>;

fn caller<T>(request: &Request<T>) -> Result<kiln_core::auth::Principal, Status> {
    Ok(principal(request)?.clone())
}

#[tonic::async_trait]
impl account_service_server::AccountService for Identity {
    async fn create_account(&self, request: Request<CreateAccountRequest>) -> Reply<Account> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_account(&p, r.account_id, r.account.unwrap_or_default())
                .await?,
        ))
    }

    async fn get_account(&self, request: Request<GetAccountRequest>) -> Reply<Account> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_account(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_accounts(
        &self,
        request: Request<ListAccountsRequest>,
    ) -> Reply<ListAccountsResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_accounts(&p, r.page_size, &r.page_token, &r.filter, &r.order_by)
            .await?;
        Ok(Response::new(ListAccountsResponse {
            accounts: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_account(&self, request: Request<UpdateAccountRequest>) -> Reply<Account> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let account = r
            .account
            .ok_or_else(|| Status::from(kiln_core::Error::invalid("account", "is required")))?;
        Ok(Response::new(
            self.update_account(&p, account, r.update_mask).await?,
        ))
    }

    async fn delete_account(
        &self,
        request: Request<DeleteAccountRequest>,
    ) -> Reply<DeleteAccountResponse> {
        let p = caller(&request)?;
        self.delete_account(&p, &request.into_inner().name).await?;
        Ok(Response::new(DeleteAccountResponse {}))
    }
}

#[tonic::async_trait]
impl user_service_server::UserService for Identity {
    async fn create_user(&self, request: Request<CreateUserRequest>) -> Reply<User> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_user(&p, &r.parent, r.user_id, r.user.unwrap_or_default())
                .await?,
        ))
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Reply<User> {
        let p = caller(&request)?;
        Ok(Response::new(
            self.get_user(&p, &request.into_inner().name).await?,
        ))
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Reply<ListUsersResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_users(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListUsersResponse {
            users: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Reply<User> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let user = r
            .user
            .ok_or_else(|| Status::from(kiln_core::Error::invalid("user", "is required")))?;
        Ok(Response::new(
            self.update_user(&p, user, r.update_mask).await?,
        ))
    }

    async fn delete_user(&self, request: Request<DeleteUserRequest>) -> Reply<DeleteUserResponse> {
        let p = caller(&request)?;
        self.delete_user(&p, &request.into_inner().name).await?;
        Ok(Response::new(DeleteUserResponse {}))
    }
}

#[tonic::async_trait]
impl api_key_service_server::ApiKeyService for Identity {
    async fn create_api_key(&self, request: Request<CreateApiKeyRequest>) -> Reply<ApiKey> {
        let p = caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(
            self.create_api_key(&p, &r.parent, r.api_key.unwrap_or_default())
                .await?,
        ))
    }

    async fn list_api_keys(
        &self,
        request: Request<ListApiKeysRequest>,
    ) -> Reply<ListApiKeysResponse> {
        let p = caller(&request)?;
        let r = request.into_inner();
        let page = self
            .list_api_keys(
                &p,
                &r.parent,
                r.page_size,
                &r.page_token,
                &r.filter,
                &r.order_by,
            )
            .await?;
        Ok(Response::new(ListApiKeysResponse {
            api_keys: page.items,
            next_page_token: page.next_page_token,
            total_size: page.total_size,
        }))
    }

    async fn delete_api_key(
        &self,
        request: Request<DeleteApiKeyRequest>,
    ) -> Reply<DeleteApiKeyResponse> {
        let p = caller(&request)?;
        self.delete_api_key(&p, &request.into_inner().name).await?;
        Ok(Response::new(DeleteApiKeyResponse {}))
    }
}

#[tonic::async_trait]
impl auth_service_server::AuthService for Identity {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Reply<AuthenticateResponse> {
        let p = caller(&request)?;
        if !p.is_privileged() {
            return Err(kiln_core::Error::PermissionDenied(
                "Authenticate is for Kiln services".into(),
            )
            .into());
        }
        let auth = self.authenticate_key(&request.into_inner().api_key).await?;
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
