//! The client side of the CLI, shared by every command: connecting with the caller's key and
//! resolving names (`connect`), printing (`output`), following pages (`paging`), and the
//! Create, Get, List, Update and Delete RPCs every resource calls the same way (`resources`).

mod connect;
mod output;
mod paging;
mod resources;

pub use connect::ClientArgs;
pub(crate) use connect::{Authed, Client};
pub(crate) use kiln_core::names::account_name;
pub use output::Format;
#[cfg(test)]
pub(crate) use output::to_json;
pub(crate) use output::{
    Column, Printable, ProgressLine, enum_name, print_deleted, print_json, print_list, print_one,
    printable, say, table, time, yes_no,
};
pub use paging::ListArgs;
pub(crate) use paging::{Page, PageRequest};
pub(crate) use resources::{
    CreateRpc, DeleteRpc, GetRpc, InParent, ListRpc, UpdateMask, UpdateRpc, changes,
    create_and_print, delete_and_print, get_and_print, list_and_print, resource, update_and_print,
};
