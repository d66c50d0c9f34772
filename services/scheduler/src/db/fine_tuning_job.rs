use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "fine_tuning_jobs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub job_id: String,
    pub state: i32,
    pub dataset: String,
    pub base_model: String,
    pub output_model: String,
    pub create_time: i64,
    pub update_time: i64,
    /// The `kiln.scheduler.v1.SupervisedFineTuningJob`, encoded.
    pub resource: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
