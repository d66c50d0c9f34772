//! The ledger's copy of the registry's models, from its events: what prices are tiered by
//! (a model's parameter count; a LoRA addon's base model).

use kiln_store::{execute, query};
use std::collections::HashMap;

use kiln_proto::registry::v1::Model;
use sea_orm::DatabaseTransaction;

use crate::db::int;
use kiln_core::Result;

/// How many parameters `model` declares (0 when it says nothing) and the base model it is an
/// addon of ("" for a base model).
fn tiering(model: &Model) -> (i64, String) {
    let parameters = model
        .base_model_details
        .as_ref()
        .map(|d| d.parameter_count)
        .unwrap_or(0);
    let base = model
        .peft_details
        .as_ref()
        .map(|p| p.base_model.clone())
        .unwrap_or_default();
    (parameters, base)
}

/// Saves (or replaces) the copy of `model`; what `known` remembered of it goes.
pub(crate) async fn save_model(
    txn: &DatabaseTransaction,
    model: &Model,
    known: &mut HashMap<String, i64>,
) -> Result<()> {
    let (parameters, base) = tiering(model);
    execute(
        txn,
        "INSERT INTO billing_models (name, parameter_count, base_model) VALUES (?, ?, ?) \
         ON CONFLICT (name) DO UPDATE SET parameter_count = excluded.parameter_count, base_model = excluded.base_model",
        vec![model.name.clone().into(), parameters.into(), base.into()],
    )
    .await?;
    known.remove(&model.name);
    Ok(())
}

/// The parameter count prices are tiered by: a LoRA addon's is its base model's; a model
/// this ledger has not seen counts as 0 (the smallest tier). `known` keeps what a batch
/// looked up already.
pub(crate) async fn model_parameters(
    txn: &DatabaseTransaction,
    model: &str,
    known: &mut HashMap<String, i64>,
) -> Result<i64> {
    if let Some(p) = known.get(model) {
        return Ok(*p);
    }
    let mut name = model.to_owned();
    let mut parameters = 0;
    // An addon names its base; one more step finds the base's count.
    for _ in 0..2 {
        let rows = query(
            txn,
            "SELECT parameter_count, base_model FROM billing_models WHERE name = ?",
            vec![name.clone().into()],
        )
        .await?;
        let Some(row) = rows.first() else { break };
        parameters = int(row, "parameter_count")?;
        let base: String = row.try_get("", "base_model")?;
        if base.is_empty() {
            break;
        }
        name = base;
    }
    known.insert(model.to_owned(), parameters);
    Ok(parameters)
}

#[cfg(test)]
mod tests {
    use kiln_proto::registry::v1::{BaseModelDetails, PeftDetails};

    use super::*;

    #[test]
    fn a_base_model_tiers_by_its_count_and_an_addon_names_its_base() {
        let base = Model {
            name: "accounts/kiln/models/big".into(),
            base_model_details: Some(BaseModelDetails {
                parameter_count: 70_000_000_000,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(tiering(&base), (70_000_000_000, String::new()));
        let addon = Model {
            name: "accounts/acme/models/lora".into(),
            peft_details: Some(PeftDetails {
                base_model: "accounts/kiln/models/big".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(tiering(&addon), (0, "accounts/kiln/models/big".into()));
    }
}
