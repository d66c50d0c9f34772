//! The public REST API's routes and the RPC each one transcodes to. One table: the router
//! matches against it and the OpenAPI document is generated from it.

use http::Method;

/// What a route does with the request before its RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{name}` from the path; the query's known fields.
    Get,
    /// `{parent}` from the path (none for the top level); paging from the query.
    List,
    /// `{parent}`; the body is the request (`{"modelId", "model": {…}}`, the wrapped style).
    CreateWrapped,
    /// `{parent}`; the body is the resource `field`, its ID in the query under `id` (the flat
    /// style; no ID: the service names it).
    CreateFlat {
        field: &'static str,
        id: Option<&'static str>,
    },
    /// The body is the resource `field` with the path's name; the mask is `updateMask` or
    /// else the body's top-level fields.
    Update { field: &'static str },
    /// `{name}`; the query's known fields (`hard`, `ignoreChecks`).
    Delete,
    /// A custom method (`…/{id}:verb`): `{name}` plus the body's fields.
    Custom,
    /// `POST …/apiKeys:delete {"keyId"}`: DeleteApiKey of that key under the path's user.
    DeleteApiKey,
    /// Served by the edge itself (uploads and signed URLs), not by one RPC.
    Edge(EdgeRoute),
    /// In the public API, not in Kiln: 501.
    Unimplemented,
}

/// The routes the edge answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeRoute {
    DatasetUpload,
    DatasetUploadEndpoint,
    DatasetValidateUpload,
    DatasetDownloadEndpoint,
    ModelUploadEndpoint,
    ModelDownloadEndpoint,
}

/// One route: the method, the path under `/v1/` (`{}` one ID segment, `:verb` a custom
/// method), the RPC (`package.Service/Method`) and the shape of its request.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub rpc: &'static str,
    pub shape: Shape,
}

const fn route(method: &'static str, path: &'static str, rpc: &'static str, shape: Shape) -> Route {
    Route {
        method,
        path,
        rpc,
        shape,
    }
}

/// The route table as written (brace-delimited, so formatting leaves it one route a line).
macro_rules! table {
    ($($route:expr),* $(,)?) => {
        &[$($route),*]
    };
}

macro_rules! rpc {
    ($package:literal, $service_method:literal) => {
        concat!("kiln.", $package, ".v1.", $service_method)
    };
}

use Shape::*;

// One route a line: a table, as rustfmt would spread each over five.
pub const ROUTES: &[Route] = table! {
    // Accounts
    route("GET", "accounts", rpc!("identity", "AccountService/ListAccounts"), List),
    route("GET", "accounts/{}", rpc!("identity", "AccountService/GetAccount"), Get),
    // Users
    route("GET", "accounts/{}/users", rpc!("identity", "UserService/ListUsers"), List),
    route("POST", "accounts/{}/users", rpc!("identity", "UserService/CreateUser"), CreateFlat { field: "user", id: Some("user_id") }),
    route("GET", "accounts/{}/users/{}", rpc!("identity", "UserService/GetUser"), Get),
    route("PATCH", "accounts/{}/users/{}", rpc!("identity", "UserService/UpdateUser"), Update { field: "user" }),
    route("DELETE", "accounts/{}/users/{}", rpc!("identity", "UserService/DeleteUser"), Delete),
    // API keys
    route("GET", "accounts/{}/users/{}/apiKeys", rpc!("identity", "ApiKeyService/ListApiKeys"), List),
    route("POST", "accounts/{}/users/{}/apiKeys", rpc!("identity", "ApiKeyService/CreateApiKey"), CreateWrapped),
    route("POST", "accounts/{}/users/{}/apiKeys:delete", rpc!("identity", "ApiKeyService/DeleteApiKey"), DeleteApiKey),
    // Models
    route("GET", "accounts/{}/models", rpc!("registry", "ModelService/ListModels"), List),
    route("POST", "accounts/{}/models", rpc!("registry", "ModelService/CreateModel"), CreateWrapped),
    route("GET", "accounts/{}/models/{}", rpc!("registry", "ModelService/GetModel"), Get),
    route("PATCH", "accounts/{}/models/{}", rpc!("registry", "ModelService/UpdateModel"), Update { field: "model" }),
    route("DELETE", "accounts/{}/models/{}", rpc!("registry", "ModelService/DeleteModel"), Delete),
    route("POST", "accounts/{}/models/{}:prepare", rpc!("registry", "ModelService/PrepareModel"), Custom),
    route("GET", "accounts/{}/models/{}:validateUpload", rpc!("registry", "ModelService/ValidateModelUpload"), Custom),
    route("POST", "accounts/{}/models/{}:getUploadEndpoint", rpc!("registry", "ModelService/UploadModelFiles"), Edge(EdgeRoute::ModelUploadEndpoint)),
    route("GET", "accounts/{}/models/{}:getDownloadEndpoint", rpc!("registry", "ModelService/DownloadModelFiles"), Edge(EdgeRoute::ModelDownloadEndpoint)),
    // Datasets
    route("GET", "accounts/{}/datasets", rpc!("registry", "DatasetService/ListDatasets"), List),
    route("POST", "accounts/{}/datasets", rpc!("registry", "DatasetService/CreateDataset"), CreateWrapped),
    route("GET", "accounts/{}/datasets/{}", rpc!("registry", "DatasetService/GetDataset"), Get),
    route("PATCH", "accounts/{}/datasets/{}", rpc!("registry", "DatasetService/UpdateDataset"), Update { field: "dataset" }),
    route("DELETE", "accounts/{}/datasets/{}", rpc!("registry", "DatasetService/DeleteDataset"), Delete),
    route("POST", "accounts/{}/datasets/{}:upload", rpc!("registry", "DatasetService/UploadDataset"), Edge(EdgeRoute::DatasetUpload)),
    route("POST", "accounts/{}/datasets/{}:getUploadEndpoint", rpc!("registry", "DatasetService/UploadDataset"), Edge(EdgeRoute::DatasetUploadEndpoint)),
    route("POST", "accounts/{}/datasets/{}:validateUpload", rpc!("registry", "DatasetService/GetDataset"), Edge(EdgeRoute::DatasetValidateUpload)),
    route("GET", "accounts/{}/datasets/{}:getDownloadEndpoint", rpc!("registry", "DatasetService/DownloadDataset"), Edge(EdgeRoute::DatasetDownloadEndpoint)),
    // Deployments
    route("GET", "accounts/{}/deployments", rpc!("scheduler", "DeploymentService/ListDeployments"), List),
    route("POST", "accounts/{}/deployments", rpc!("scheduler", "DeploymentService/CreateDeployment"), CreateFlat { field: "deployment", id: Some("deployment_id") }),
    route("GET", "accounts/{}/deployments/{}", rpc!("scheduler", "DeploymentService/GetDeployment"), Get),
    route("PATCH", "accounts/{}/deployments/{}", rpc!("scheduler", "DeploymentService/UpdateDeployment"), Update { field: "deployment" }),
    route("DELETE", "accounts/{}/deployments/{}", rpc!("scheduler", "DeploymentService/DeleteDeployment"), Delete),
    route("PATCH", "accounts/{}/deployments/{}:scale", rpc!("scheduler", "DeploymentService/ScaleDeployment"), Custom),
    route("POST", "accounts/{}/deployments/{}:undelete", rpc!("scheduler", "DeploymentService/UndeleteDeployment"), Custom),
    // Deployed models (LoRA addons loaded on deployments)
    route("GET", "accounts/{}/deployedModels", rpc!("scheduler", "DeployedModelService/ListDeployedModels"), List),
    route("POST", "accounts/{}/deployedModels", rpc!("scheduler", "DeployedModelService/CreateDeployedModel"), CreateFlat { field: "deployed_model", id: None }),
    route("GET", "accounts/{}/deployedModels/{}", rpc!("scheduler", "DeployedModelService/GetDeployedModel"), Get),
    route("PATCH", "accounts/{}/deployedModels/{}", rpc!("scheduler", "DeployedModelService/UpdateDeployedModel"), Update { field: "deployed_model" }),
    route("DELETE", "accounts/{}/deployedModels/{}", rpc!("scheduler", "DeployedModelService/DeleteDeployedModel"), Delete),
    // Supervised fine-tuning jobs
    route("GET", "accounts/{}/supervisedFineTuningJobs", rpc!("scheduler", "FineTuningService/ListSupervisedFineTuningJobs"), List),
    route("POST", "accounts/{}/supervisedFineTuningJobs", rpc!("scheduler", "FineTuningService/CreateSupervisedFineTuningJob"), CreateFlat { field: "supervised_fine_tuning_job", id: Some("supervised_fine_tuning_job_id") }),
    route("GET", "accounts/{}/supervisedFineTuningJobs/{}", rpc!("scheduler", "FineTuningService/GetSupervisedFineTuningJob"), Get),
    route("DELETE", "accounts/{}/supervisedFineTuningJobs/{}", rpc!("scheduler", "FineTuningService/DeleteSupervisedFineTuningJob"), Delete),
    route("POST", "accounts/{}/supervisedFineTuningJobs/{}:cancel", rpc!("scheduler", "FineTuningService/CancelSupervisedFineTuningJob"), Custom),
    route("POST", "accounts/{}/supervisedFineTuningJobs/{}:resume", "", Unimplemented),
    // Quotas
    route("GET", "accounts/{}/quotas", rpc!("billing", "QuotaService/ListQuotas"), List),
    route("GET", "accounts/{}/quotas/{}", rpc!("billing", "QuotaService/GetQuota"), Get),
    route("PATCH", "accounts/{}/quotas/{}", rpc!("billing", "QuotaService/UpdateQuota"), Update { field: "quota" }),
};

/// A request's path matched against the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    pub route: Route,
    /// The path without its verb, e.g. `accounts/a/models/m`, or `accounts/a/models` for a
    /// list or a create.
    pub resource: String,
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.method == other.method && self.path == other.path
    }
}
impl Eq for Route {}

/// What a path under `/v1/` is: a route, a path whose method is wrong (the methods it takes),
/// or nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    Route(Matched),
    WrongMethod(Vec<&'static str>),
    Nothing,
}

/// Finds the route of `method` and `path` (below `/v1/`, percent-decoded per segment).
pub fn find(method: &Method, path: &str) -> Found {
    let (resource, verb) = split_verb(path);
    let segments: Vec<&str> = resource.split('/').collect();
    let mut methods = Vec::new();
    for route in ROUTES {
        let (template, template_verb) = split_verb(route.path);
        if template_verb != verb || !matches(template, &segments) {
            continue;
        }
        if route.method == method.as_str() {
            return Found::Route(Matched {
                route: *route,
                resource: resource.to_owned(),
            });
        }
        methods.push(route.method);
    }
    match methods.is_empty() {
        true => Found::Nothing,
        false => Found::WrongMethod(methods),
    }
}

/// `accounts/a/models/m:prepare` -> (`accounts/a/models/m`, `prepare`); no verb -> "".
fn split_verb(path: &str) -> (&str, &str) {
    let last = path.rfind('/').map_or(0, |i| i + 1);
    match path[last..].find(':') {
        Some(colon) => (&path[..last + colon], &path[last + colon + 1..]),
        None => (path, ""),
    }
}

fn matches(template: &str, segments: &[&str]) -> bool {
    let parts: Vec<&str> = template.split('/').collect();
    parts.len() == segments.len()
        && parts
            .iter()
            .zip(segments)
            .all(|(part, segment)| match *part {
                "{}" => !segment.is_empty(),
                literal => literal == *segment,
            })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_names_an_rpc_of_the_contract() {
        for route in ROUTES {
            if route.shape != Unimplemented {
                crate::mesh::method(route.rpc);
            }
        }
    }

    #[test]
    fn paths_find_their_routes() {
        let Found::Route(m) = find(&Method::POST, "accounts/a/models/m:prepare") else {
            panic!("prepare");
        };
        assert_eq!(m.route.rpc, "kiln.registry.v1.ModelService/PrepareModel");
        assert_eq!(m.resource, "accounts/a/models/m");

        let Found::Route(m) = find(&Method::GET, "accounts/a/models") else {
            panic!("list");
        };
        assert_eq!(m.route.shape, List);
        assert_eq!(m.resource, "accounts/a/models");

        let Found::Route(m) = find(&Method::POST, "accounts/a/users/u/apiKeys:delete") else {
            panic!("key delete");
        };
        assert_eq!(m.route.shape, DeleteApiKey);
        assert_eq!(m.resource, "accounts/a/users/u/apiKeys");

        assert_eq!(
            find(&Method::PUT, "accounts/a/models/m"),
            Found::WrongMethod(vec!["GET", "PATCH", "DELETE"])
        );
        assert_eq!(find(&Method::GET, "accounts/a/widgets"), Found::Nothing);
        assert_eq!(
            find(&Method::POST, "accounts/a/models/m:explode"),
            Found::Nothing
        );
        assert_eq!(find(&Method::GET, "accounts//models"), Found::Nothing);
    }
}
