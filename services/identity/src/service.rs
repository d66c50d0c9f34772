//! The identity state and its operations; the gRPC handlers in [`crate::grpc`] call these.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use futures::future::BoxFuture;
use kiln_core::Error as ApiError;
use kiln_core::auth::{AuthCache, Authenticated, Authenticator, Principal, Role, hash_secret, hex};
use kiln_core::names::validate_display_name;
use kiln_core::names::{self, SYSTEM_ACCOUNT};
use kiln_core::page::{FilterTerm, OrderKey, PageTokens, enum_filter_value, mask_paths};
use kiln_core::time::{micros_to_timestamp, now_micros};
use kiln_events::Body;
use kiln_events::outbox::Outbox;
use kiln_proto::identity::v1::{Account, ApiKey, User, account};
pub use kiln_store::listing::Listing;
use rand::Rng;
use sea_orm::sea_query::SimpleExpr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, DatabaseConnection, EntityTrait, FromQueryResult,
    Order, QueryFilter, Select,
};

use crate::account_cache::AccountCache;
use crate::db::{account as accounts, api_key as api_keys, user as users};
use crate::error::Result;

/// The name events carry in `source`.
pub const SOURCE: &str = "kiln-identity";
/// The service's name in the outbox and migrations.
pub const SERVICE: &str = "identity";
/// The user that the bootstrap creates in the system account.
pub const BOOTSTRAP_USER: &str = "admin";

/// Identity's state, shared by its handlers.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    db: DatabaseConnection,
    outbox: Outbox,
    pages: PageTokens,
    cache: Arc<AuthCache>,
    accounts: AccountCache,
}

/// Checks an email address enough to catch mistakes: one '@', text on both sides, a dot in
/// the domain, no spaces, at most 254 characters.
pub fn validate_email(field: &str, email: &str) -> Result<(), ApiError> {
    let ok = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
            }
            None => false,
        };
    if ok {
        Ok(())
    } else if email.is_empty() {
        Err(ApiError::invalid(field, "is required"))
    } else {
        Err(ApiError::invalid(
            field,
            format!("{email:?} is not an email address"),
        ))
    }
}

fn validate_role(field: &str, role: &str) -> Result<(), ApiError> {
    match role {
        "admin" | "user" => Ok(()),
        other => Err(ApiError::invalid(
            field,
            format!("must be \"admin\" or \"user\", got {other:?}"),
        )),
    }
}

fn term_expr(term: &FilterTerm, column: impl ColumnTrait, value: sea_orm::Value) -> SimpleExpr {
    if term.negated {
        column.ne(value)
    } else {
        column.eq(value)
    }
}

fn to_order(key: &OrderKey) -> Order {
    if key.descending {
        Order::Desc
    } else {
        Order::Asc
    }
}

fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A new API key secret: `kiln_` and 32 random bytes, base64url (256 bits).
fn new_secret() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    format!(
        "kiln_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn account_proto(m: &accounts::Model) -> Account {
    Account {
        name: format!("accounts/{}", m.id),
        display_name: m.display_name.clone(),
        account_type: m.account_type,
        email: m.email.clone(),
        state: m.state,
        status: Some(kiln_proto::common::v1::Status {
            code: m.status_code,
            message: m.status_message.clone(),
        }),
        suspend_state: m.suspend_state,
        create_time: Some(micros_to_timestamp(m.create_time)),
        update_time: Some(micros_to_timestamp(m.update_time)),
    }
}

pub fn user_proto(m: &users::Model) -> User {
    User {
        name: format!("accounts/{}/users/{}", m.account_id, m.user_id),
        display_name: m.display_name.clone(),
        email: m.email.clone(),
        role: m.role.clone(),
        service_account: m.service_account,
        state: m.state,
        status: Some(kiln_proto::common::v1::Status::default()),
        create_time: Some(micros_to_timestamp(m.create_time)),
        update_time: Some(micros_to_timestamp(m.update_time)),
    }
}

pub fn api_key_proto(m: &api_keys::Model) -> ApiKey {
    ApiKey {
        name: format!(
            "accounts/{}/users/{}/apiKeys/{}",
            m.account_id, m.user_id, m.key_id
        ),
        key_id: m.key_id.clone(),
        display_name: m.display_name.clone(),
        key: String::new(),
        prefix: m.prefix.clone(),
        create_time: Some(micros_to_timestamp(m.create_time)),
        expire_time: m.expire_time.map(micros_to_timestamp),
    }
}

fn roles_of(account_id: &str, role: &str) -> Vec<Role> {
    match role {
        "admin" if account_id == SYSTEM_ACCOUNT => vec![Role::AccountAdmin, Role::PlatformAdmin],
        "admin" => vec![Role::AccountAdmin],
        _ => vec![Role::User],
    }
}

impl Identity {
    pub fn new(
        db: DatabaseConnection,
        pages: PageTokens,
        cache: Arc<AuthCache>,
        cache_ttl: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                db,
                outbox: Outbox::new(SERVICE),
                pages,
                cache,
                accounts: AccountCache::new(cache_ttl),
            }),
        }
    }

    /// Drops what this process caches about `resource` after a change elsewhere.
    pub fn invalidate(&self, resource: &str) {
        if let Some(id) = resource
            .strip_prefix("accounts/")
            .filter(|id| !id.contains('/'))
        {
            self.inner.accounts.invalidate(id);
        }
        self.inner.cache.invalidate(resource);
    }

    pub fn outbox(&self) -> &Outbox {
        &self.inner.outbox
    }

    pub fn db(&self) -> &sea_orm::DatabaseConnection {
        &self.inner.db
    }

    /// Writes the change's event into the outbox inside `txn` and commits both together.
    async fn commit_with_event(
        &self,
        txn: sea_orm::DatabaseTransaction,
        event_type: &str,
        account: &str,
        resource: &str,
        body: Body,
    ) -> Result<()> {
        self.inner
            .outbox
            .commit_event(txn, SOURCE, event_type, account, resource, body)
            .await?;
        if resource.starts_with("accounts/") && !resource[9..].contains('/') {
            self.inner.accounts.invalidate(&resource[9..]);
        }
        Ok(())
    }

    /// An account straight from the database (for writes).
    async fn account(&self, id: &str) -> Result<Option<accounts::Model>> {
        Ok(accounts::Entity::find_by_id(id.to_owned())
            .one(&self.inner.db)
            .await?)
    }

    /// An account for reading: from the cache when fresh.
    async fn cached_account(&self, id: &str) -> Result<Option<accounts::Model>> {
        if let Some(hit) = self.inner.accounts.get(id) {
            return Ok(Some(hit));
        }
        let generation = self.inner.accounts.generation();
        let found = self.account(id).await?;
        if let Some(model) = &found {
            self.inner.accounts.insert(generation, model.clone());
        }
        Ok(found)
    }

    async fn user(&self, account: &str, user: &str) -> Result<Option<users::Model>> {
        Ok(
            users::Entity::find_by_id((account.to_owned(), user.to_owned()))
                .one(&self.inner.db)
                .await?,
        )
    }

    /// Runs a list query for one page (see [`kiln_store::listing::list_page`]).
    async fn list<E>(
        &self,
        select: Select<E>,
        scope: &str,
        page_size: i32,
        page_token: &str,
        order: Vec<(E::Column, Order)>,
        tie_break: Vec<E::Column>,
    ) -> Result<Listing<E::Model>>
    where
        E: EntityTrait,
        E::Model: FromQueryResult + Send + Sync,
    {
        Ok(kiln_store::listing::list_page(
            &self.inner.db,
            &self.inner.pages,
            select,
            scope,
            page_size,
            page_token,
            order,
            tie_break,
        )
        .await?)
    }

    // ---- accounts -------------------------------------------------------------------------

    pub async fn create_account(
        &self,
        caller: &Principal,
        account_id: String,
        account: Account,
    ) -> Result<Account> {
        if !caller.is_privileged() {
            return Err(ApiError::PermissionDenied(
                "only a platform admin creates accounts".into(),
            )
            .into());
        }
        let account_type = match account::AccountType::try_from(account.account_type) {
            Ok(account::AccountType::Unspecified) if account_id.is_empty() => {
                account::AccountType::Developer
            }
            Ok(account::AccountType::Unspecified) => account::AccountType::Enterprise,
            Ok(t) => t,
            Err(_) => {
                return Err(
                    ApiError::invalid("account.account_type", "unknown account type").into(),
                );
            }
        };
        if !account.email.is_empty() || account_type == account::AccountType::Developer {
            validate_email("account.email", &account.email)?;
        }
        validate_display_name("account.display_name", &account.display_name)?;
        let suspend_state = match account::SuspendState::try_from(account.suspend_state) {
            Ok(account::SuspendState::Unspecified) => account::SuspendState::Unsuspended,
            Ok(s) => s,
            Err(_) => {
                return Err(
                    ApiError::invalid("account.suspend_state", "unknown suspend state").into(),
                );
            }
        };

        let candidates: Vec<String> = match account_type {
            account::AccountType::Developer => {
                if !account_id.is_empty() {
                    return Err(ApiError::invalid(
                        "account_id",
                        "developer account IDs are derived from account.email; leave it empty, or create an ENTERPRISE account",
                    )
                    .into());
                }
                let mut base = names::slugify(&account.email, 56);
                if base.is_empty() {
                    base = "account".to_owned();
                }
                std::iter::once(base.clone())
                    .chain((2..50).map(|n| format!("{base}-{n}")))
                    .chain(std::iter::repeat_with(|| format!("{base}-{}", random_id(6))).take(5))
                    .collect()
            }
            _ => {
                names::validate_id("account_id", &account_id)?;
                vec![account_id]
            }
        };

        let now = now_micros();
        for (attempt, id) in candidates.iter().enumerate() {
            let model = accounts::Model {
                id: id.clone(),
                display_name: if account.display_name.is_empty() {
                    id.clone()
                } else {
                    account.display_name.clone()
                },
                account_type: account_type as i32,
                email: account.email.clone(),
                state: account::State::Ready as i32,
                status_code: 0,
                status_message: String::new(),
                suspend_state: suspend_state as i32,
                create_time: now,
                update_time: now,
            };
            let proto = account_proto(&model);
            let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
            match accounts::Entity::insert(accounts::ActiveModel::from(model))
                .exec_without_returning(&txn)
                .await
            {
                Ok(_) => {}
                Err(err) if kiln_store::is_unique_violation(&err) => {
                    txn.rollback().await?;
                    let last = attempt + 1 == candidates.len();
                    if account_type != account::AccountType::Developer || last {
                        return Err(ApiError::already_exists(format!("accounts/{id}")).into());
                    }
                    continue;
                }
                Err(err) => return Err(err.into()),
            }
            self.commit_with_event(
                txn,
                "identity.account.created",
                id,
                &proto.name,
                Body::AccountCreated(kiln_proto::events::v1::AccountCreated {
                    account: Some(proto.clone()),
                }),
            )
            .await?;
            return Ok(proto);
        }
        Err(ApiError::Internal("no free account ID".into()).into())
    }

    pub async fn get_account(&self, caller: &Principal, name: &str) -> Result<Account> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        let model = self
            .cached_account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        Ok(account_proto(&model))
    }

    pub async fn list_accounts(
        &self,
        caller: &Principal,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<Account>> {
        let mut cond = Condition::all();
        if !caller.is_privileged() {
            cond = cond.add(accounts::Column::Id.eq(caller.account.clone()));
        }
        for term in kiln_core::page::parse_filter(
            filter,
            &["state", "account_type", "suspend_state", "email"],
        )? {
            let expr = match term.field.as_str() {
                "state" => term_expr(
                    &term,
                    accounts::Column::State,
                    enum_filter_value("state", &term.value, |s| {
                        account::State::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                "account_type" => term_expr(
                    &term,
                    accounts::Column::AccountType,
                    enum_filter_value("account_type", &term.value, |s| {
                        account::AccountType::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                "suspend_state" => term_expr(
                    &term,
                    accounts::Column::SuspendState,
                    enum_filter_value("suspend_state", &term.value, |s| {
                        account::SuspendState::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                _ => term_expr(&term, accounts::Column::Email, term.value.clone().into()),
            };
            cond = cond.add(expr);
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "update_time", "display_name"],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => accounts::Column::CreateTime,
                "update_time" => accounts::Column::UpdateTime,
                "display_name" => accounts::Column::DisplayName,
                _ => accounts::Column::Id,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("accounts||{filter}|{order_by}|{}", caller.account);
        let listing = self
            .list(
                accounts::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![accounts::Column::Id],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(account_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub async fn update_account(
        &self,
        caller: &Principal,
        account: Account,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<Account> {
        let name = names::AccountName::parse("account.name", &account.name)?;
        caller.check_access(&name, &name)?;
        let existing = self
            .account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        if !caller.administers(&name.account) {
            return Err(ApiError::PermissionDenied(
                "only an admin of the account updates it".into(),
            )
            .into());
        }
        let mut paths = mask_paths(mask);
        if paths.is_empty() {
            if !account.display_name.is_empty() {
                paths.push("display_name".into());
            }
            if !account.email.is_empty() {
                paths.push("email".into());
            }
            if account.suspend_state != 0 {
                paths.push("suspend_state".into());
            }
        }
        let mut model = existing.clone();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("account.display_name", &account.display_name)?;
                    model.display_name = account.display_name.clone();
                }
                "email" => {
                    validate_email("account.email", &account.email)?;
                    model.email = account.email.clone();
                }
                "suspend_state" => {
                    if !caller.is_privileged() {
                        return Err(ApiError::PermissionDenied(
                            "only a platform admin changes suspend_state".into(),
                        )
                        .into());
                    }
                    match account::SuspendState::try_from(account.suspend_state) {
                        Ok(account::SuspendState::Unspecified) | Err(_) => {
                            return Err(ApiError::invalid(
                                "account.suspend_state",
                                "must be a suspend state",
                            )
                            .into());
                        }
                        Ok(s) => model.suspend_state = s as i32,
                    }
                }
                other => {
                    return Err(ApiError::invalid(
                        "update_mask",
                        format!("{other:?} is not an updatable field; fields: display_name, email, suspend_state"),
                    )
                    .into());
                }
            }
        }
        if model == existing {
            return Ok(account_proto(&existing));
        }
        model.update_time = now_micros();
        let proto = account_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        accounts::Entity::update(accounts::ActiveModel::from(model).reset_all())
            .exec(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.account.updated",
            &name.account,
            &proto.name,
            Body::AccountUpdated(kiln_proto::events::v1::AccountUpdated {
                account: Some(proto.clone()),
                update_mask: Some(prost_types::FieldMask { paths }),
            }),
        )
        .await?;
        self.inner.cache.invalidate(&proto.name);
        Ok(proto)
    }

    pub async fn delete_account(&self, caller: &Principal, name: &str) -> Result<()> {
        let name = names::AccountName::parse("name", name)?;
        caller.check_access(&name, &name)?;
        if !caller.is_privileged() {
            return Err(ApiError::PermissionDenied(
                "only a platform admin deletes accounts".into(),
            )
            .into());
        }
        if name.is_system() {
            return Err(ApiError::FailedPrecondition(format!(
                "{name} is the system account and cannot be deleted"
            ))
            .into());
        }
        self.account(&name.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&name))?;
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        api_keys::Entity::delete_many()
            .filter(api_keys::Column::AccountId.eq(name.account.clone()))
            .exec(&txn)
            .await?;
        users::Entity::delete_many()
            .filter(users::Column::AccountId.eq(name.account.clone()))
            .exec(&txn)
            .await?;
        accounts::Entity::delete_by_id(name.account.clone())
            .exec(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.account.deleted",
            &name.account,
            &name.to_string(),
            Body::AccountDeleted(kiln_proto::events::v1::AccountDeleted {
                name: name.to_string(),
            }),
        )
        .await?;
        self.inner.cache.invalidate(&name.to_string());
        Ok(())
    }

    // ---- users ----------------------------------------------------------------------------

    /// Resolves `parent` to an existing account the caller can see.
    async fn parent_account(
        &self,
        caller: &Principal,
        field: &str,
        parent: &str,
    ) -> Result<names::AccountName> {
        let parent = names::AccountName::parse(field, parent)?;
        caller.check_access(&parent, &parent)?;
        self.cached_account(&parent.account)
            .await?
            .ok_or_else(|| ApiError::not_found(&parent))?;
        Ok(parent)
    }

    pub async fn create_user(
        &self,
        caller: &Principal,
        parent: &str,
        user_id: String,
        user: User,
    ) -> Result<User> {
        let parent = self.parent_account(caller, "parent", parent).await?;
        if !caller.administers(&parent.account) {
            return Err(ApiError::PermissionDenied(format!(
                "only an admin of {parent} adds users"
            ))
            .into());
        }
        names::validate_id("user_id", &user_id)?;
        validate_email("user.email", &user.email)?;
        validate_display_name("user.display_name", &user.display_name)?;
        let role = if user.role.is_empty() {
            "user".to_owned()
        } else {
            user.role.clone()
        };
        validate_role("user.role", &role)?;
        self.insert_user(
            &parent.account,
            &user_id,
            &user.email,
            &user.display_name,
            &role,
            user.service_account,
        )
        .await
    }

    async fn insert_user(
        &self,
        account: &str,
        user_id: &str,
        email: &str,
        display_name: &str,
        role: &str,
        service_account: bool,
    ) -> Result<User> {
        let name = format!("accounts/{account}/users/{user_id}");
        if self.user(account, user_id).await?.is_some() {
            return Err(ApiError::already_exists(&name).into());
        }
        self.ensure_email_free(account, email).await?;
        let now = now_micros();
        let model = users::Model {
            account_id: account.to_owned(),
            user_id: user_id.to_owned(),
            email: email.to_owned(),
            display_name: if display_name.is_empty() {
                email.to_owned()
            } else {
                display_name.to_owned()
            },
            role: role.to_owned(),
            service_account,
            state: kiln_proto::identity::v1::user::State::Ready as i32,
            create_time: now,
            update_time: now,
        };
        let proto = user_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        match users::Entity::insert(users::ActiveModel::from(model))
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {}
            Err(err) if kiln_store::is_unique_violation(&err) => {
                txn.rollback().await?;
                return Err(ApiError::already_exists(&name).into());
            }
            Err(err) => return Err(err.into()),
        }
        self.commit_with_event(
            txn,
            "identity.user.created",
            account,
            &name,
            Body::UserCreated(kiln_proto::events::v1::UserCreated {
                user: Some(proto.clone()),
            }),
        )
        .await?;
        Ok(proto)
    }

    async fn ensure_email_free(&self, account: &str, email: &str) -> Result<()> {
        let taken = users::Entity::find()
            .filter(users::Column::AccountId.eq(account))
            .filter(users::Column::Email.eq(email))
            .one(&self.inner.db)
            .await?;
        match taken {
            Some(u) => Err(ApiError::already_exists(format!(
                "a user with email {email} (accounts/{account}/users/{})",
                u.user_id
            ))
            .into()),
            None => Ok(()),
        }
    }

    /// Resolves a user name to an existing user the caller can see.
    async fn existing_user(
        &self,
        caller: &Principal,
        field: &str,
        name: &str,
    ) -> Result<users::Model> {
        let name = names::parse_user_name(field, name)?;
        caller.check_access(&name.account_name(), &name)?;
        self.user(&name.account, &name.id)
            .await?
            .ok_or_else(|| ApiError::not_found(&name).into())
    }

    pub async fn get_user(&self, caller: &Principal, name: &str) -> Result<User> {
        Ok(user_proto(&self.existing_user(caller, "name", name).await?))
    }

    pub async fn list_users(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<User>> {
        let parent = self.parent_account(caller, "parent", parent).await?;
        let mut cond = Condition::all().add(users::Column::AccountId.eq(parent.account.clone()));
        for term in
            kiln_core::page::parse_filter(filter, &["role", "state", "email", "service_account"])?
        {
            let expr = match term.field.as_str() {
                "role" => term_expr(&term, users::Column::Role, term.value.clone().into()),
                "email" => term_expr(&term, users::Column::Email, term.value.clone().into()),
                "state" => term_expr(
                    &term,
                    users::Column::State,
                    enum_filter_value("state", &term.value, |s| {
                        kiln_proto::identity::v1::user::State::from_str_name(s).map(|v| v as i32)
                    })?
                    .into(),
                ),
                _ => {
                    let flag = match term.value.as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(ApiError::invalid(
                                "filter",
                                format!("service_account is true or false, got {other:?}"),
                            )
                            .into());
                        }
                    };
                    term_expr(&term, users::Column::ServiceAccount, flag.into())
                }
            };
            cond = cond.add(expr);
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &[
                "name",
                "create_time",
                "update_time",
                "email",
                "display_name",
            ],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => users::Column::CreateTime,
                "update_time" => users::Column::UpdateTime,
                "email" => users::Column::Email,
                "display_name" => users::Column::DisplayName,
                _ => users::Column::UserId,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("users|{parent}|{filter}|{order_by}|{}", caller.account);
        let listing = self
            .list(
                users::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![users::Column::UserId],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(user_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub async fn update_user(
        &self,
        caller: &Principal,
        user: User,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<User> {
        let existing = self.existing_user(caller, "user.name", &user.name).await?;
        let is_self = caller.account == existing.account_id && caller.user == existing.user_id;
        let is_admin = caller.administers(&existing.account_id);
        if !is_self && !is_admin {
            return Err(ApiError::PermissionDenied(
                "only the user or an admin of the account updates a user".into(),
            )
            .into());
        }
        let mut paths = mask_paths(mask);
        if paths.is_empty() {
            if !user.display_name.is_empty() {
                paths.push("display_name".into());
            }
            if !user.email.is_empty() {
                paths.push("email".into());
            }
            if !user.role.is_empty() {
                paths.push("role".into());
            }
        }
        let mut model = existing.clone();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    validate_display_name("user.display_name", &user.display_name)?;
                    model.display_name = user.display_name.clone();
                }
                "email" => {
                    validate_email("user.email", &user.email)?;
                    if user.email != existing.email {
                        self.ensure_email_free(&existing.account_id, &user.email)
                            .await?;
                    }
                    model.email = user.email.clone();
                }
                "role" => {
                    validate_role("user.role", &user.role)?;
                    if !is_admin {
                        return Err(ApiError::PermissionDenied(
                            "only an admin of the account changes roles".into(),
                        )
                        .into());
                    }
                    model.role = user.role.clone();
                }
                other => {
                    return Err(ApiError::invalid(
                        "update_mask",
                        format!(
                            "{other:?} is not an updatable field; fields: display_name, email, role"
                        ),
                    )
                    .into());
                }
            }
        }
        if model == existing {
            return Ok(user_proto(&existing));
        }
        model.update_time = now_micros();
        let proto = user_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        users::Entity::update(users::ActiveModel::from(model).reset_all())
            .exec(&txn)
            .await
            .map_err(|err| {
                if kiln_store::is_unique_violation(&err) {
                    crate::error::Error::from(ApiError::already_exists(format!(
                        "a user with email {}",
                        user.email
                    )))
                } else {
                    err.into()
                }
            })?;
        self.commit_with_event(
            txn,
            "identity.user.updated",
            &existing.account_id,
            &proto.name,
            Body::UserUpdated(kiln_proto::events::v1::UserUpdated {
                user: Some(proto.clone()),
                update_mask: Some(prost_types::FieldMask { paths }),
            }),
        )
        .await?;
        self.inner.cache.invalidate(&proto.name);
        Ok(proto)
    }

    pub async fn delete_user(&self, caller: &Principal, name: &str) -> Result<()> {
        let existing = self.existing_user(caller, "name", name).await?;
        if !caller.administers(&existing.account_id) {
            return Err(ApiError::PermissionDenied(
                "only an admin of the account deletes users".into(),
            )
            .into());
        }
        let name = format!(
            "accounts/{}/users/{}",
            existing.account_id, existing.user_id
        );
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        api_keys::Entity::delete_many()
            .filter(api_keys::Column::AccountId.eq(existing.account_id.clone()))
            .filter(api_keys::Column::UserId.eq(existing.user_id.clone()))
            .exec(&txn)
            .await?;
        users::Entity::delete_by_id((existing.account_id.clone(), existing.user_id.clone()))
            .exec(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.user.deleted",
            &existing.account_id,
            &name,
            Body::UserDeleted(kiln_proto::events::v1::UserDeleted { name: name.clone() }),
        )
        .await?;
        self.inner.cache.invalidate(&name);
        Ok(())
    }

    // ---- API keys -------------------------------------------------------------------------

    fn may_manage_keys_of(caller: &Principal, user: &users::Model) -> bool {
        (caller.account == user.account_id && caller.user == user.user_id)
            || caller.administers(&user.account_id)
    }

    pub async fn create_api_key(
        &self,
        caller: &Principal,
        parent: &str,
        api_key: ApiKey,
    ) -> Result<ApiKey> {
        let user = self.existing_user(caller, "parent", parent).await?;
        if !Self::may_manage_keys_of(caller, &user) {
            return Err(ApiError::PermissionDenied(
                "only the user or an admin of the account creates its keys".into(),
            )
            .into());
        }
        validate_display_name("api_key.display_name", &api_key.display_name)?;
        let now = now_micros();
        let expire_time = match &api_key.expire_time {
            Some(ts) => {
                let micros = kiln_core::time::timestamp_to_micros(ts);
                if micros <= now {
                    return Err(
                        ApiError::invalid("api_key.expire_time", "must be in the future").into(),
                    );
                }
                Some(micros)
            }
            None => None,
        };
        let (model, secret) = Self::new_key_model(&user, &api_key.display_name, expire_time, now);
        let mut proto = api_key_proto(&model);
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        api_keys::Entity::insert(api_keys::ActiveModel::from(model))
            .exec_without_returning(&txn)
            .await?;
        self.commit_with_event(
            txn,
            "identity.api_key.created",
            &user.account_id,
            &proto.name,
            Body::ApiKeyCreated(kiln_proto::events::v1::ApiKeyCreated {
                api_key: Some(proto.clone()),
            }),
        )
        .await?;
        proto.key = secret;
        Ok(proto)
    }

    fn new_key_model(
        user: &users::Model,
        display_name: &str,
        expire_time: Option<i64>,
        now: i64,
    ) -> (api_keys::Model, String) {
        let secret = new_secret();
        let model = api_keys::Model {
            account_id: user.account_id.clone(),
            user_id: user.user_id.clone(),
            key_id: random_id(16),
            display_name: display_name.to_owned(),
            prefix: secret.chars().take(12).collect(),
            secret_sha256: hex(hash_secret(&secret)),
            create_time: now,
            expire_time,
        };
        (model, secret)
    }

    pub async fn list_api_keys(
        &self,
        caller: &Principal,
        parent: &str,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<Listing<ApiKey>> {
        let user = self.existing_user(caller, "parent", parent).await?;
        let mut cond = Condition::all()
            .add(api_keys::Column::AccountId.eq(user.account_id.clone()))
            .add(api_keys::Column::UserId.eq(user.user_id.clone()));
        for term in kiln_core::page::parse_filter(filter, &["display_name", "prefix"])? {
            let col = if term.field == "prefix" {
                api_keys::Column::Prefix
            } else {
                api_keys::Column::DisplayName
            };
            cond = cond.add(term_expr(&term, col, term.value.clone().into()));
        }
        let order = kiln_core::page::parse_order_by(
            order_by,
            &["name", "create_time", "expire_time", "display_name"],
        )?
        .iter()
        .map(|k| {
            let col = match k.field.as_str() {
                "create_time" => api_keys::Column::CreateTime,
                "expire_time" => api_keys::Column::ExpireTime,
                "display_name" => api_keys::Column::DisplayName,
                _ => api_keys::Column::KeyId,
            };
            (col, to_order(k))
        })
        .collect();
        let scope = format!("apiKeys|{}|{filter}|{order_by}|{}", parent, caller.account);
        let listing = self
            .list(
                api_keys::Entity::find().filter(cond),
                &scope,
                page_size,
                page_token,
                order,
                vec![api_keys::Column::KeyId],
            )
            .await?;
        Ok(Listing {
            items: listing.items.iter().map(api_key_proto).collect(),
            next_page_token: listing.next_page_token,
            total_size: listing.total_size,
        })
    }

    pub async fn delete_api_key(&self, caller: &Principal, name: &str) -> Result<()> {
        let key_name = names::ApiKeyName::parse("name", name)?;
        caller.check_access(&key_name.user_name().account_name(), &key_name)?;
        let model = api_keys::Entity::find_by_id((
            key_name.account.clone(),
            key_name.user.clone(),
            key_name.key.clone(),
        ))
        .one(&self.inner.db)
        .await?
        .ok_or_else(|| ApiError::not_found(&key_name))?;
        let owner = self
            .user(&model.account_id, &model.user_id)
            .await?
            .ok_or_else(|| ApiError::not_found(&key_name))?;
        if !Self::may_manage_keys_of(caller, &owner) {
            return Err(ApiError::PermissionDenied(
                "only the user or an admin of the account deletes its keys".into(),
            )
            .into());
        }
        let name = key_name.to_string();
        let txn = sea_orm::TransactionTrait::begin(&self.inner.db).await?;
        api_keys::Entity::delete_by_id((
            model.account_id.clone(),
            model.user_id.clone(),
            model.key_id.clone(),
        ))
        .exec(&txn)
        .await?;
        self.commit_with_event(
            txn,
            "identity.api_key.deleted",
            &model.account_id,
            &name,
            Body::ApiKeyDeleted(kiln_proto::events::v1::ApiKeyDeleted { name: name.clone() }),
        )
        .await?;
        self.inner.cache.invalidate(&name);
        Ok(())
    }

    // ---- authentication -------------------------------------------------------------------

    /// Resolves an API key secret into its principal.
    pub async fn authenticate_key(&self, secret: &str) -> Result<Authenticated, ApiError> {
        let invalid = || ApiError::Unauthenticated("invalid API key".into());
        let digest = hex(hash_secret(secret));
        let internal = |e: sea_orm::DbErr| ApiError::Unavailable(format!("identity database: {e}"));
        let key = api_keys::Entity::find()
            .filter(api_keys::Column::SecretSha256.eq(digest))
            .one(&self.inner.db)
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        if key.expire_time.is_some_and(|t| t <= now_micros()) {
            return Err(ApiError::Unauthenticated("API key expired".into()));
        }
        let user = users::Entity::find_by_id((key.account_id.clone(), key.user_id.clone()))
            .one(&self.inner.db)
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        let account = accounts::Entity::find_by_id(key.account_id.clone())
            .one(&self.inner.db)
            .await
            .map_err(internal)?
            .ok_or_else(invalid)?;
        Ok(Authenticated {
            principal: Principal {
                account: account.id.clone(),
                user: user.user_id.clone(),
                api_key: format!(
                    "accounts/{}/users/{}/apiKeys/{}",
                    key.account_id, key.user_id, key.key_id
                ),
                roles: roles_of(&account.id, &user.role),
                suspend_state: account.suspend_state,
            },
            expire_time: key
                .expire_time
                .map(|t| SystemTime::UNIX_EPOCH + Duration::from_micros(t.max(0) as u64)),
        })
    }

    // ---- bootstrap ------------------------------------------------------------------------

    /// Makes sure the system account and its admin user exist; on the first start (no key for
    /// that user yet) creates an admin API key and returns its secret, which is shown once.
    pub async fn bootstrap(&self, admin_email: &str) -> Result<Option<String>> {
        let system = Principal::service();
        if self.account(SYSTEM_ACCOUNT).await?.is_none() {
            let created = self
                .create_account(
                    &system,
                    SYSTEM_ACCOUNT.to_owned(),
                    Account {
                        display_name: "Kiln".to_owned(),
                        account_type: account::AccountType::Enterprise as i32,
                        email: admin_email.to_owned(),
                        ..Default::default()
                    },
                )
                .await;
            match created {
                Ok(_) => {}
                // Another instance won the race.
                Err(crate::error::Error::Api(ApiError::AlreadyExists { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        let admin = match self.user(SYSTEM_ACCOUNT, BOOTSTRAP_USER).await? {
            Some(u) => u,
            None => {
                match self
                    .insert_user(
                        SYSTEM_ACCOUNT,
                        BOOTSTRAP_USER,
                        admin_email,
                        "Platform admin",
                        "admin",
                        false,
                    )
                    .await
                {
                    Ok(_) | Err(crate::error::Error::Api(ApiError::AlreadyExists { .. })) => {}
                    Err(e) => return Err(e),
                }
                self.user(SYSTEM_ACCOUNT, BOOTSTRAP_USER)
                    .await?
                    .ok_or_else(|| crate::error::Error::Bootstrap("admin user vanished".into()))?
            }
        };
        let has_key = api_keys::Entity::find()
            .filter(api_keys::Column::AccountId.eq(SYSTEM_ACCOUNT))
            .filter(api_keys::Column::UserId.eq(BOOTSTRAP_USER))
            .one(&self.inner.db)
            .await?
            .is_some();
        if has_key {
            return Ok(None);
        }
        let key = self
            .create_api_key(
                &system,
                &format!("accounts/{SYSTEM_ACCOUNT}/users/{}", admin.user_id),
                ApiKey {
                    display_name: "bootstrap admin key".to_owned(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(Some(key.key))
    }
}

/// Identity authenticates its own callers straight from its tables.
impl Authenticator for Identity {
    fn authenticate<'a>(
        &'a self,
        api_key: &'a str,
    ) -> BoxFuture<'a, Result<Authenticated, ApiError>> {
        Box::pin(self.authenticate_key(api_key))
    }
}
