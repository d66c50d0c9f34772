use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "datasets")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub dataset_id: String,
    pub state: i32,
    pub format: i32,
    pub display_name: String,
    pub example_count: i64,
    pub create_time: i64,
    pub update_time: i64,
    /// The `kiln.registry.v1.Dataset`, encoded.
    pub resource: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
