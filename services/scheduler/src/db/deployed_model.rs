use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "deployed_models")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub deployed_model_id: String,
    pub state: i32,
    pub model: String,
    pub deployment: String,
    pub is_default: bool,
    pub serverless: bool,
    pub public: bool,
    pub display_name: String,
    pub create_time: i64,
    pub update_time: i64,
    /// The `kiln.scheduler.v1.DeployedModel`, encoded.
    pub resource: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
