use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "model_files")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub model_id: String,
    /// Empty for uploaded files; the precision name for a prepared bundle's files.
    #[sea_orm(primary_key, auto_increment = false)]
    pub bundle: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub path: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub uploaded_bytes: i64,
    pub complete: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
