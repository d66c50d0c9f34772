//! What every gRPC handler does around its service call: take the caller and the message, turn
//! a required field's absence into INVALID_ARGUMENT naming it, map the result to a reply. List
//! RPCs share one request shape ([`ListRequest`]) and one reply shape (a page of items).

use tonic::{Request, Response, Status};

use crate::Error;
use crate::auth::{Principal, principal};
use crate::listing::{ListRequest, Listing};

/// What a handler returns.
pub type Reply<T> = Result<Response<T>, Status>;

/// The authenticated caller and the message of a request.
pub fn split<T>(request: Request<T>) -> Result<(Principal, T), Status> {
    let caller = principal(&request)?.clone();
    Ok((caller, request.into_inner()))
}

/// The reply for a service call's result.
pub fn reply<T, E: Into<Status>>(result: Result<T, E>) -> Reply<T> {
    result.map(Response::new).map_err(Into::into)
}

/// A message field the request must set.
pub fn required<T>(value: Option<T>, field: &str) -> Result<T, Error> {
    value.ok_or_else(|| Error::invalid(field, "is required"))
}

/// An Update RPC's request: the resource as the caller sent it, and its update mask.
#[derive(Debug, Clone)]
pub struct Update<T> {
    pub resource: T,
    mask: Vec<String>,
}

impl<T> Update<T> {
    /// The request's resource (INVALID_ARGUMENT naming `field` when missing) and mask.
    pub fn new(
        field: &str,
        resource: Option<T>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Self, Error> {
        Ok(Self {
            resource: required(resource, field)?,
            mask: mask.map(|m| m.paths).unwrap_or_default(),
        })
    }

    /// The fields to change: the mask's paths, or without a mask (AIP: every field the
    /// request sets) each of `given` marked as set.
    pub fn paths(&self, given: &[(&str, bool)]) -> Vec<String> {
        if !self.mask.is_empty() {
            return self.mask.clone();
        }
        given
            .iter()
            .filter(|(_, set)| *set)
            .map(|(field, _)| (*field).to_owned())
            .collect()
    }
}

/// A List RPC's request.
pub trait ListRpc {
    fn list_request(&self) -> ListRequest;
}

/// A List RPC's reply: a page of `T`.
pub trait ListReply<T>: Sized {
    fn from_listing(listing: Listing<T>) -> Self;
}

/// The reply for a listing.
pub fn reply_list<T, R: ListReply<T>, E: Into<Status>>(result: Result<Listing<T>, E>) -> Reply<R> {
    reply(result.map(R::from_listing))
}

/// Implements a gRPC service with one line per unary RPC: its request and reply types, and the
/// call on the service (`svc`) with the caller (`caller`) and the message (`request`), whose
/// result becomes the reply (a listing `.map(Into::into)`, a deletion `.map(deleted)`). Streaming methods and
/// their associated types follow in a `streams { ... }` block, as ordinary items.
///
/// ```ignore
/// kiln_core::grpc_service! {
///     impl model_service_server::ModelService for Registry {
///         fn get_model(GetModelRequest) -> Model = |svc, caller, r| svc.get_model(&caller, &r.name).await;
///     }
/// }
/// ```
#[macro_export]
macro_rules! grpc_service {
    (
        impl $($service:ident)::+ for $ty:ident {
            $( fn $method:ident($request:ty) -> $reply:ty = |$svc:ident, $caller:ident, $message:ident| $call:expr; )*
            $( streams { $( $item:item )* } )?
        }
    ) => {
        #[tonic::async_trait]
        impl $($service)::+ for $ty {
            $(
                async fn $method(
                    &self,
                    request: tonic::Request<$request>,
                ) -> $crate::grpc::Reply<$reply> {
                    let ($caller, $message) = $crate::grpc::split(request)?;
                    let $svc = self;
                    $crate::grpc::reply($call)
                }
            )*
            $( $( $item )* )?
        }
    };
}

/// What a Delete RPC answers: its empty response (`.map(deleted)`).
pub fn deleted<T: Default>((): ()) -> T {
    T::default()
}

macro_rules! list_rpcs {
    ($($request:ty, $response:ty, $item:ty, $items:ident, $parent:ident;)*) => {$(
        impl ListRpc for $request {
            fn list_request(&self) -> ListRequest {
                ListRequest {
                    parent: list_rpcs!(@parent self, $parent),
                    page_size: self.page_size,
                    page_token: self.page_token.clone(),
                    filter: self.filter.clone(),
                    order_by: self.order_by.clone(),
                }
            }
        }

        impl ListReply<$item> for $response {
            fn from_listing(listing: Listing<$item>) -> Self {
                Self {
                    $items: listing.items,
                    next_page_token: listing.next_page_token,
                    total_size: listing.total_size,
                }
            }
        }

        impl From<Listing<$item>> for $response {
            fn from(listing: Listing<$item>) -> Self {
                Self::from_listing(listing)
            }
        }
    )*};
    (@parent $self:ident, parent) => { $self.parent.clone() };
    (@parent $self:ident, none) => { String::new() };
}

use kiln_proto::billing::v1 as billing;
use kiln_proto::identity::v1 as identity;
use kiln_proto::registry::v1 as registry;
use kiln_proto::scheduler::v1 as scheduler;

list_rpcs! {
    identity::ListAccountsRequest, identity::ListAccountsResponse, identity::Account, accounts, none;
    identity::ListUsersRequest, identity::ListUsersResponse, identity::User, users, parent;
    identity::ListApiKeysRequest, identity::ListApiKeysResponse, identity::ApiKey, api_keys, parent;
    registry::ListModelsRequest, registry::ListModelsResponse, registry::Model, models, parent;
    registry::ListDatasetsRequest, registry::ListDatasetsResponse, registry::Dataset, datasets, parent;
    scheduler::ListDeploymentsRequest, scheduler::ListDeploymentsResponse, scheduler::Deployment, deployments, parent;
    scheduler::ListDeployedModelsRequest, scheduler::ListDeployedModelsResponse, scheduler::DeployedModel, deployed_models, parent;
    scheduler::ListNodesRequest, scheduler::ListNodesResponse, scheduler::Node, nodes, none;
    scheduler::ListSupervisedFineTuningJobsRequest, scheduler::ListSupervisedFineTuningJobsResponse, scheduler::SupervisedFineTuningJob, supervised_fine_tuning_jobs, parent;
    billing::ListQuotasRequest, billing::ListQuotasResponse, billing::Quota, quotas, parent;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_messages_map_both_ways() {
        let request = registry::ListModelsRequest {
            parent: "accounts/a".into(),
            page_size: 7,
            page_token: "t".into(),
            filter: "state = READY".into(),
            order_by: "name".into(),
        };
        let asked = request.list_request();
        assert_eq!(asked.parent, "accounts/a");
        assert_eq!(
            (asked.page_size, asked.filter.as_str()),
            (7, "state = READY")
        );
        let reply = registry::ListModelsResponse::from_listing(Listing {
            items: vec![registry::Model::default()],
            next_page_token: "next".into(),
            total_size: 9,
        });
        assert_eq!(
            (
                reply.models.len(),
                reply.next_page_token.as_str(),
                reply.total_size
            ),
            (1, "next", 9)
        );
        assert!(
            identity::ListAccountsRequest::default()
                .list_request()
                .parent
                .is_empty()
        );
    }

    #[test]
    fn an_update_changes_the_masks_fields_or_else_those_it_sets() {
        let mask = prost_types::FieldMask {
            paths: vec!["description".into()],
        };
        let masked = Update::new("model", Some(registry::Model::default()), Some(mask)).unwrap();
        assert_eq!(masked.paths(&[("display_name", true)]), ["description"]);
        let unmasked = Update::new("model", Some(registry::Model::default()), None).unwrap();
        let given = [("display_name", true), ("description", false)];
        assert_eq!(unmasked.paths(&given), ["display_name"]);
        let empty = Some(prost_types::FieldMask { paths: vec![] });
        let empty_mask = Update::new("model", Some(registry::Model::default()), empty).unwrap();
        assert_eq!(
            empty_mask.paths(&given),
            ["display_name"],
            "an empty mask is no mask"
        );
        let err = Update::<registry::Model>::new("model", None, None).unwrap_err();
        assert_eq!(err.to_string(), "model: is required");
    }

    #[test]
    fn a_missing_field_is_named() {
        let err = required(None::<u8>, "model").unwrap_err();
        assert_eq!(Status::from(err).message(), "model: is required");
    }
}
