use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deployments")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub deployment_id: String,
    pub state: i32,
    pub base_model: String,
    pub accelerator_type: i32,
    pub deployment_type: i32,
    pub display_name: String,
    pub create_time: i64,
    pub update_time: i64,
    /// The largest bundle of the base model: what a replica must fit in memory.
    pub model_bytes: i64,
    /// The `kiln.scheduler.v1.Deployment`, encoded.
    pub resource: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
