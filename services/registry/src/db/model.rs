use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "models")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub model_id: String,
    pub kind: i32,
    pub state: i32,
    pub public: bool,
    pub display_name: String,
    /// For LoRA addons, the base model's name; empty otherwise.
    pub base_model: String,
    pub create_time: i64,
    pub update_time: i64,
    /// The `kiln.registry.v1.Model`, encoded (files and refs are filled in on read).
    pub resource: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
