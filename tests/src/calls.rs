//! The calls the suites make by a resource's name (Get…, Delete…) and the Update… calls with
//! a mask, for every service, declared in one table. The service modules re-export theirs.

use kiln_proto::billing::v1 as bilv1;
use kiln_proto::identity::v1 as idv1;
use kiln_proto::registry::v1 as regv1;
use kiln_proto::scheduler::v1 as schv1;

use crate::billing::quotas;
use crate::deployments::{deployed_models, deployments};
use crate::registry::{datasets, models};
use crate::{accounts, keys, users};

/// Declares calls that take only a resource's name (Get…, Delete…) as `fn(ch, name)`,
/// answering what the RPC answers.
macro_rules! by_name {
    ($($fn:ident = $client:ident.$method:ident($($request:ident)::+) -> $answer:ty;)*) => {$(
        pub async fn $fn(
            ch: &crate::AuthedChannel,
            name: &str,
        ) -> Result<$answer, tonic::Status> {
            #[allow(clippy::needless_update)]
            let request = $($request)::+ { name: name.to_owned(), ..Default::default() };
            Ok($client(ch).$method(request).await?.into_inner())
        }
    )*};
}

/// Declares Update… calls as `fn(ch, resource, paths)`: the resource's fields named by
/// `paths` (the update mask) change.
macro_rules! updates {
    ($($fn:ident = $client:ident.$method:ident($($request:ident)::+ { $field:ident: $resource:ty });)*) => {$(
        pub async fn $fn(
            ch: &crate::AuthedChannel,
            $field: $resource,
            paths: &[&str],
        ) -> Result<$resource, tonic::Status> {
            let request = $($request)::+ { $field: Some($field), update_mask: crate::mask(paths) };
            Ok($client(ch).$method(request).await?.into_inner())
        }
    )*};
}

by_name! {
    get_account = accounts.get_account(idv1::GetAccountRequest) -> idv1::Account;
    delete_account = accounts.delete_account(idv1::DeleteAccountRequest) -> idv1::DeleteAccountResponse;
    get_user = users.get_user(idv1::GetUserRequest) -> idv1::User;
    delete_user = users.delete_user(idv1::DeleteUserRequest) -> idv1::DeleteUserResponse;
    delete_key = keys.delete_api_key(idv1::DeleteApiKeyRequest) -> idv1::DeleteApiKeyResponse;
    get_model = models.get_model(regv1::GetModelRequest) -> regv1::Model;
    delete_model = models.delete_model(regv1::DeleteModelRequest) -> regv1::DeleteModelResponse;
    get_dataset = datasets.get_dataset(regv1::GetDatasetRequest) -> regv1::Dataset;
    get_deployment = deployments.get_deployment(schv1::GetDeploymentRequest) -> schv1::Deployment;
    get_deployed_model = deployed_models.get_deployed_model(schv1::GetDeployedModelRequest) -> schv1::DeployedModel;
}

updates! {
    update_account = accounts.update_account(idv1::UpdateAccountRequest { account: idv1::Account });
    update_user = users.update_user(idv1::UpdateUserRequest { user: idv1::User });
    update_model = models.update_model(regv1::UpdateModelRequest { model: regv1::Model });
    update_deployment = deployments.update_deployment(schv1::UpdateDeploymentRequest { deployment: schv1::Deployment });
    update_quota = quotas.update_quota(bilv1::UpdateQuotaRequest { quota: bilv1::Quota });
}
