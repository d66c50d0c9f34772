//! The tenancy matrix, generated from the contract: every RPC of every service, called with
//! account alpha's key on account bravo's resources, is refused exactly as the same call on an
//! account that does not exist (so nothing of bravo leaks, not even existence), or answered
//! only as it is for any account (a health check, a page of public resources) with nothing of
//! bravo in it; PERMISSION_DENIED only where alpha is refused on its own account too; and no
//! List RPC shows alpha anything of bravo. A new RPC joins the matrix by
//! being in the contract: its request is filled from its descriptor.

use std::collections::BTreeMap;

use kiln_gateway::dynamic::{self, Caller, Mesh, pool};
use kiln_proto::registry::v1 as regv1;
use prost_reflect::{DynamicMessage, Kind, MessageDescriptor, MethodDescriptor, Value};
use tonic::Code;

/// The resource kinds, longest first, as the methods name them.
const NOUNS: [&str; 10] = [
    "SupervisedFineTuningJob",
    "DeployedModel",
    "Deployment",
    "Dataset",
    "ApiKey",
    "Account",
    "Model",
    "User",
    "Quota",
    "Usage",
];

/// The resources of one account a request may name.
struct Names {
    account: String,
    key: String,
    /// The deployed model its deployment made (named by the scheduler).
    deployed_model: String,
}

impl Names {
    fn account(&self) -> String {
        format!("accounts/{}", self.account)
    }

    /// The account's resource of kind `noun` (its own where one exists, else one of that name).
    fn of(&self, noun: &str) -> String {
        let a = self.account();
        match noun {
            "Account" | "Usage" => a,
            "User" => format!("{a}/users/owner"),
            "ApiKey" => format!("{a}/users/owner/apiKeys/{}", self.key),
            "Model" => format!("{a}/models/m"),
            "Dataset" => format!("{a}/datasets/d"),
            "Deployment" => format!("{a}/deployments/dep"),
            "DeployedModel" => format!("{a}/deployedModels/{}", self.deployed_model),
            "SupervisedFineTuningJob" => format!("{a}/supervisedFineTuningJobs/j"),
            "Quota" => format!("{a}/quotas/deployments"),
            _ => a,
        }
    }

    /// The parent a Create or List of `noun` takes.
    fn parent(&self, noun: &str) -> String {
        match noun {
            "ApiKey" => self.of("User"),
            _ => self.account(),
        }
    }
}

/// The kind of resource a method acts on: the longest noun in its name (the model, for
/// inference).
fn noun_of(method: &MethodDescriptor) -> &'static str {
    NOUNS
        .into_iter()
        .find(|n| method.name().contains(n))
        .unwrap_or("Model")
}

/// A request of `descriptor` for `method` that names `names`' resources wherever it names one.
fn fill(descriptor: &MessageDescriptor, noun: &str, names: &Names) -> DynamicMessage {
    let mut message = DynamicMessage::new(descriptor.clone());
    for field in descriptor.fields() {
        if field.containing_oneof().is_some() && message.fields().count() > 0 {
            continue;
        }
        let text = |v: String| Some(Value::String(v));
        let value = match (field.name(), field.kind()) {
            ("name", Kind::String) => text(names.of(noun)),
            ("parent", Kind::String) => text(names.parent(noun)),
            ("model" | "model_name" | "base_model", Kind::String) => text(names.of("Model")),
            ("dataset", Kind::String) => text(names.of("Dataset")),
            ("deployment", Kind::String) => text(names.of("Deployment")),
            ("account", Kind::String) => text(names.account()),
            ("quota", Kind::String) => text(names.of("Quota")),
            ("path", Kind::String) => text("config.json".into()),
            ("sha256", Kind::String) => text("0".repeat(64)),
            (id, Kind::String) if id.ends_with("_id") => text("probe".into()),
            ("size_bytes" | "replica_count", Kind::Int64) => Some(Value::I64(1)),
            ("replica_count", Kind::Int32) => Some(Value::I32(1)),
            ("input" | "prompts" | "messages", _) if field.is_list() => None,
            ("update_mask", Kind::Message(_)) => {
                let mut mask = DynamicMessage::new(field.kind().as_message().unwrap().clone());
                let path = if noun == "Quota" {
                    "value"
                } else {
                    "display_name"
                };
                mask.set_field_by_name("paths", Value::List(vec![Value::String(path.into())]));
                Some(Value::Message(mask))
            }
            (_, Kind::Message(inner))
                if inner.name() == noun || inner.name().ends_with("Header") =>
            {
                // The resource itself (Create, Update) or an upload's header.
                let mut nested = fill(&inner, noun, names);
                if inner.name() == noun && !descriptor.name().starts_with("Update") {
                    nested.clear_field_by_name("name");
                }
                Some(Value::Message(nested))
            }
            _ => None,
        };
        if let Some(value) = value {
            message.set_field(&field, value);
        }
    }
    if descriptor.name() == "CreateEmbeddingsRequest"
        || descriptor.name() == "CreateCompletionRequest"
    {
        let field = if descriptor.name() == "CreateEmbeddingsRequest" {
            "input"
        } else {
            "prompts"
        };
        message.set_field_by_name(field, Value::List(vec![Value::String("hi".into())]));
    }
    if descriptor.name() == "CreateChatCompletionRequest" {
        let chat = descriptor.get_field_by_name("messages").unwrap();
        let mut turn = DynamicMessage::new(chat.kind().as_message().unwrap().clone());
        turn.set_field_by_name("role", Value::String("user".into()));
        turn.set_field_by_name("content", Value::String("hi".into()));
        message.set_field(&chat, Value::List(vec![Value::Message(turn)]));
    }
    message
}

/// What `caller` gets from `method` on `names`' resources: OK (with the answer) or the code.
async fn call(
    mesh: &Mesh,
    caller: &Caller,
    method: &MethodDescriptor,
    names: &Names,
) -> Result<String, Code> {
    let noun = noun_of(method);
    let request = fill(&method.input(), noun, names);
    let answer = match (method.is_client_streaming(), method.is_server_streaming()) {
        (false, false) => mesh.unary(caller, method, request).await,
        (true, false) => mesh.client_streaming(caller, method, vec![request]).await,
        (false, true) => match mesh.server_streaming(caller, method, request).await {
            Ok(mut stream) => match stream.message().await {
                Ok(Some(first)) => Ok(first),
                Ok(None) => return Ok(String::new()),
                Err(status) => Err(status),
            },
            Err(status) => Err(status),
        },
        (true, true) => unreachable!("bidirectional streams are left out"),
    };
    match answer {
        Ok(message) => Ok(format!("{message:?}")),
        Err(status) => Err(status.code()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_another_accounts_resources_as_if_they_did_not_exist() {
    let assets = kiln_tests::inference::minilm_asset_dir();
    let mesh = kiln_tests::library_mesh(assets.path(), None).await;
    let (alpha_key, alpha) = mesh.tenant("alpha").await;
    let (_, bravo) = mesh.tenant("bravo").await;
    // Each account's resources: a model, a dataset, a deployment (of the public MiniLM) and
    // its deployed model, the owner and the owner's key, the quotas.
    let mut deployed_models = Vec::new();
    for (ch, account) in [(&alpha, "alpha"), (&bravo, "bravo")] {
        let model = regv1::model::Kind::BaseModel;
        kiln_tests::registry::create_model(ch, account, "m", model, None).await;
        kiln_tests::registry::create_dataset(ch, account, "d").await;
        let parent = format!("accounts/{account}");
        let deployment = kiln_proto::scheduler::v1::Deployment {
            base_model: kiln_tests::inference::MINILM.into(),
            ..kiln_tests::deployments::on("CPU", 1)
        };
        let what = "the library's MiniLM to be deployable";
        kiln_tests::wait_for_ok(std::time::Duration::from_secs(60), what, || {
            kiln_tests::deployments::create(ch, &parent, "dep", deployment.clone())
        })
        .await;
        let listed = kiln_tests::deployments::list_deployed_models(ch, &parent).await;
        let name = listed
            .first()
            .expect("the deployment's deployed model")
            .name
            .clone();
        deployed_models.push(name.rsplit('/').next().unwrap().to_owned());
    }
    let key_of = |account: &'static str, ch: kiln_tests::AuthedChannel| async move {
        let owner = format!("accounts/{account}/users/owner");
        let keys = kiln_tests::list_keys(&ch, &owner).await.unwrap().api_keys;
        let name = keys.first().expect("the owner's key").name.clone();
        name.rsplit('/').next().unwrap().to_owned()
    };
    let bravo_names = Names {
        account: "bravo".into(),
        key: key_of("bravo", bravo.clone()).await,
        deployed_model: deployed_models[1].clone(),
    };
    let ghost_names = Names {
        account: "ghost-account".into(),
        key: bravo_names.key.clone(),
        deployed_model: bravo_names.deployed_model.clone(),
    };
    let alpha_names = Names {
        account: "alpha".into(),
        key: key_of("alpha", alpha.clone()).await,
        deployed_model: deployed_models[0].clone(),
    };
    let upstream = kiln_gateway::Upstream::remote(&mesh.url()).unwrap();
    let rpc = dynamic::mesh(upstream);
    let caller = Caller::bearer(&alpha_key).unwrap();

    let mut matrix = BTreeMap::new();
    let mut problems = Vec::new();
    for service in pool().services() {
        let package = service.package_name();
        if !(package.starts_with("kiln.") || package == "inference") {
            continue;
        }
        for method in service.methods() {
            if method.is_client_streaming() && method.is_server_streaming() {
                continue; // NodeService/Connect: nodes only, a stream of its own protocol.
            }
            let full = format!("{}/{}", service.name(), method.name());
            let on_bravo = call(&rpc, &caller, &method, &bravo_names).await;
            let on_ghost = call(&rpc, &caller, &method, &ghost_names).await;
            match (&on_bravo, &on_ghost) {
                // What anyone gets whatever the account (a health check, an empty page of
                // public resources): nothing of bravo in it.
                (Ok(b), Ok(g)) if b == g && !b.contains("bravo") => {}
                (Ok(answer), _) => problems.push(format!("{full}: answered on bravo: {answer}")),
                (Err(b), Err(g)) if b == g => {}
                (Err(b), g) => problems.push(format!(
                    "{full}: {b:?} on bravo but {g:?} on an account that does not exist"
                )),
            }
            if on_bravo == Err(Code::PermissionDenied) {
                // Only where the RPC is refused to alpha on its own account too (admin or
                // service only), never as a sign that bravo's resource exists.
                let own = call(&rpc, &caller, &method, &alpha_names).await;
                if own != Err(Code::PermissionDenied) {
                    problems.push(format!(
                        "{full}: PERMISSION_DENIED on bravo, {own:?} on its own"
                    ));
                }
            }
            matrix.insert(full, on_bravo.err());
        }
    }
    let refused: Vec<_> = matrix.values().flatten().collect();
    let answered = matrix.len() - refused.len();
    let not_found = refused.iter().filter(|c| ***c == Code::NotFound).count();
    eprintln!(
        "tenancy matrix: {} RPCs, {not_found} NOT_FOUND, {answered} answered as for any account; \
         every answer: {matrix:#?}",
        matrix.len()
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(matrix.len() >= 50, "{} RPCs in the contract?", matrix.len());
    assert!(
        not_found * 2 > matrix.len(),
        "most RPCs name a resource and must say NOT_FOUND: {matrix:#?}"
    );

    // Lists alpha may make show nothing of bravo.
    for service in pool().services() {
        for method in service.methods().filter(|m| m.name().starts_with("List")) {
            if let Ok(answer) = call(&rpc, &caller, &method, &alpha_names).await {
                assert!(!answer.contains("bravo"), "{}: {answer}", method.name());
            }
        }
    }
    mesh.shutdown().await;
}
