//! The RPCs resources share, called one way: a resource declares its Create, Get, List,
//! Update and Delete RPCs once (`resource!`), and one helper per verb serves every command
//! that creates, gets, lists, updates or deletes one.

use anyhow::bail;
use tonic::Status;

use super::connect::Client;
use super::output::{Format, Printable, print_deleted, print_list, print_one};
use super::paging::{ListArgs, PageRequest, list_all};

/// A resource with a Create RPC.
pub(crate) trait CreateRpc: Printable {
    type Request;
    /// Sends `request`; answers the resource made.
    async fn create(client: &Client, request: Self::Request) -> Result<Self, Status>;
}

/// A resource with a Get RPC.
pub(crate) trait GetRpc: Printable {
    /// Its collection in an account: the resource's names are
    /// `accounts/{account}/{COLLECTION}/{id}`.
    const COLLECTION: &'static str;
    async fn get(client: &Client, name: String) -> Result<Self, Status>;
}

/// A resource with a List RPC.
pub(crate) trait ListRpc: Printable {
    type Request: PageRequest;
    /// One page: its resources and the next page's token.
    async fn list(client: &Client, request: Self::Request) -> Result<(Vec<Self>, String), Status>;
}

/// A List request under a parent (an account, a user).
pub(crate) trait InParent {
    /// The request for everything under `parent`.
    fn in_parent(parent: String) -> Self;
}

/// A resource with an Update RPC.
pub(crate) trait UpdateRpc: Printable {
    /// Sends `resource` (named) with the fields of `mask` to change; answers the result.
    async fn update(
        client: &Client,
        resource: Self,
        mask: prost_types::FieldMask,
    ) -> Result<Self, Status>;
}

/// A resource with a Delete RPC.
pub(crate) trait DeleteRpc: GetRpc {
    async fn delete(client: &Client, name: String) -> Result<(), Status>;
}

/// `kiln create`: sends `request`, shows the resource made.
pub(crate) async fn create_and_print<R: CreateRpc>(
    client: &Client,
    format: Format,
    request: R::Request,
) -> anyhow::Result<()> {
    print_one(format, &R::create(client, request).await?);
    Ok(())
}

/// `kiln get`: shows the resource with this ID in the account (or this full name).
pub(crate) async fn get_and_print<R: GetRpc>(
    client: &Client,
    format: Format,
    id: &str,
) -> anyhow::Result<()> {
    let name = client.full_name(R::COLLECTION, id).await?;
    print_one(format, &R::get(client, name).await?);
    Ok(())
}

/// `kiln list`: shows what `request` selects, following the pages up to `--limit`.
pub(crate) async fn list_and_print<R: ListRpc>(
    client: &Client,
    format: Format,
    list: &ListArgs,
    request: R::Request,
) -> anyhow::Result<()> {
    let items = list_all(list, request, |r| R::list(client, r)).await?;
    print_list(format, &items);
    Ok(())
}

/// `kiln update`: changes the fields of `mask` in `resource` (named), shows the result.
pub(crate) async fn update_and_print<R: UpdateRpc>(
    client: &Client,
    format: Format,
    resource: R,
    mask: prost_types::FieldMask,
) -> anyhow::Result<()> {
    print_one(format, &R::update(client, resource, mask).await?);
    Ok(())
}

/// `kiln delete`: deletes the resource with this ID in the account (or this full name).
pub(crate) async fn delete_and_print<R: DeleteRpc>(
    client: &Client,
    format: Format,
    id: &str,
) -> anyhow::Result<()> {
    let name = client.full_name(R::COLLECTION, id).await?;
    R::delete(client, name.clone()).await?;
    print_deleted(format, &name);
    Ok(())
}

/// Declares a resource's RPCs, each optional, for the helpers above:
///
/// ```ignore
/// resource!(regv1::Model, models {
///     create: create_model(regv1::CreateModelRequest),
///     get: get_model(regv1::GetModelRequest) in "models",
///     list: list_models(regv1::ListModelsRequest, parent) => models,
///     update: update_model(regv1::UpdateModelRequest) model,
///     delete: delete_model(regv1::DeleteModelRequest),
/// });
/// ```
///
/// `models` is the function that makes the service's client from a `&Client`; `create`
/// requests are made by the command, `get` and `delete` requests hold just the name,
/// `update` requests the resource (in the field named) and the mask; `, parent` marks a List request with a parent ([`InParent`]), and
/// `=> models` names the List response's field of resources.
macro_rules! resource {
    ($resource:ty, $service:ident {
        $(create: $create:ident($create_request:ty),)?
        $(get: $get:ident($get_request:ty) in $collection:literal,)?
        $(list: $list:ident($list_request:ty $(, $parent:ident)?) => $items:ident,)?
        $(update: $update:ident($update_request:ty) $field:ident,)?
        $(delete: $delete:ident($delete_request:ty),)?
    }) => {
        $(
            impl $crate::client::CreateRpc for $resource {
                type Request = $create_request;
                async fn create(
                    client: &$crate::client::Client,
                    request: $create_request,
                ) -> Result<Self, ::tonic::Status> {
                    Ok($service(client).$create(request).await?.into_inner())
                }
            }
        )?
        $(
            impl $crate::client::GetRpc for $resource {
                const COLLECTION: &'static str = $collection;
                async fn get(
                    client: &$crate::client::Client,
                    name: String,
                ) -> Result<Self, ::tonic::Status> {
                    // A struct expression takes a path, not a type: an alias makes one.
                    type Request = $get_request;
                    let request = Request { name };
                    Ok($service(client).$get(request).await?.into_inner())
                }
            }
        )?
        $(
            impl $crate::client::PageRequest for $list_request {
                fn set_page(&mut self, page: $crate::client::Page) {
                    self.page_size = page.size;
                    self.page_token = page.token;
                    self.filter = page.filter;
                    self.order_by = page.order_by;
                }
            }
            $(
                impl $crate::client::InParent for $list_request {
                    fn in_parent($parent: String) -> Self {
                        Self {
                            $parent,
                            ..Default::default()
                        }
                    }
                }
            )?
            impl $crate::client::ListRpc for $resource {
                type Request = $list_request;
                async fn list(
                    client: &$crate::client::Client,
                    request: $list_request,
                ) -> Result<(Vec<Self>, String), ::tonic::Status> {
                    let page = $service(client).$list(request).await?.into_inner();
                    Ok((page.$items, page.next_page_token))
                }
            }
        )?
        $(
            impl $crate::client::UpdateRpc for $resource {
                async fn update(
                    client: &$crate::client::Client,
                    resource: Self,
                    mask: ::prost_types::FieldMask,
                ) -> Result<Self, ::tonic::Status> {
                    type Request = $update_request;
                    let request = Request {
                        $field: Some(resource),
                        update_mask: Some(mask),
                    };
                    Ok($service(client).$update(request).await?.into_inner())
                }
            }
        )?
        $(
            impl $crate::client::DeleteRpc for $resource {
                async fn delete(
                    client: &$crate::client::Client,
                    name: String,
                ) -> Result<(), ::tonic::Status> {
                    type Request = $delete_request;
                    let request = Request { name };
                    $service(client).$delete(request).await?;
                    Ok(())
                }
            }
        )?
    };
}
pub(crate) use resource;

/// The fields an update changes: exactly those given on the command line.
#[derive(Debug, Default)]
pub(crate) struct UpdateMask(Vec<String>);

impl UpdateMask {
    /// Sets `field` and adds `path` to the mask when `value` is given.
    pub(crate) fn set<T>(&mut self, path: &str, value: Option<T>, field: &mut T) {
        if let Some(value) = value {
            *field = value;
            self.0.push(path.to_owned());
        }
    }

    /// The mask; when it is empty, an error naming the flags of `fields` (the fields that
    /// could have been given, each set by the flag of its name).
    pub(crate) fn finish(self, fields: &[&str]) -> anyhow::Result<prost_types::FieldMask> {
        if self.0.is_empty() {
            let flags: Vec<String> = fields
                .iter()
                .map(|f| format!("--{}", f.replace('_', "-")))
                .collect();
            let text = match flags.split_last() {
                Some((last, [])) => last.clone(),
                Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
                None => String::new(),
            };
            bail!("nothing to update: pass {text}");
        }
        Ok(prost_types::FieldMask { paths: self.0 })
    }
}

/// An update from flags: `changes!(idv1::User { display_name, email })` is the resource
/// with the fields given (each an `Option` named as its field and its flag) and the mask of
/// exactly those, or an error naming the flags when none is given.
macro_rules! changes {
    ($resource:ty { $($field:ident),+ $(,)? }) => {{
        let mut resource = <$resource>::default();
        let mut mask = $crate::client::UpdateMask::default();
        $(mask.set(stringify!($field), $field, &mut resource.$field);)+
        mask.finish(&[$(stringify!($field)),+])
            .map(|mask| (resource, mask))
    }};
}
pub(crate) use changes;

#[cfg(test)]
mod tests {
    use kiln_proto::identity::v1 as idv1;

    use super::*;

    #[test]
    fn changes_hold_exactly_the_given_fields_in_order() {
        let (email, role, display_name) =
            (Some("a@b.example".to_owned()), None, Some(String::new()));
        let (user, mask) = changes!(idv1::User {
            email,
            role,
            display_name
        })
        .unwrap();
        assert_eq!(user.email, "a@b.example");
        assert_eq!(mask.paths, ["email", "display_name"]);
        let (email, role): (Option<String>, Option<String>) = (None, None);
        let e = changes!(idv1::User { email, role }).unwrap_err();
        assert_eq!(e.to_string(), "nothing to update: pass --email or --role");
        let e = UpdateMask::default()
            .finish(&["display_name", "email", "suspend_state"])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "nothing to update: pass --display-name, --email or --suspend-state"
        );
        let e = UpdateMask::default().finish(&["value"]).unwrap_err();
        assert_eq!(e.to_string(), "nothing to update: pass --value");
    }
}
