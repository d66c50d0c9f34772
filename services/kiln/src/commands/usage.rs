//! Usage and quotas: `kiln get usage`, `kiln list quotas`, `kiln update quota`.

use clap::{Args, Subcommand};
use kiln_proto::billing::v1 as billv1;
use kiln_proto::billing::v1::get_usage_request::GroupBy;

use super::flags::{parse_enum, parse_time};
use crate::client::{
    Authed, Client, Format, InParent, ListArgs, Printable, changes, enum_name, list_and_print,
    print_json, printable, resource, say, table, time, update_and_print,
};

#[derive(Debug, Subcommand)]
pub enum Get {
    /// The account's usage and its cost over a time range.
    Usage(UsageArgs),
}

#[derive(Debug, Subcommand)]
pub enum List {
    /// List the account's quotas, their limits and current use.
    Quotas(ListArgs),
}

#[derive(Debug, Subcommand)]
pub enum Update {
    /// Change a quota (an ID such as monthly-spend-usd, or a full name).
    Quota {
        quota: String,
        /// The limit (up to max_value; platform admins go beyond it).
        #[arg(long)]
        value: Option<i64>,
        /// The most the account may set itself (platform admin).
        #[arg(long)]
        max_value: Option<i64>,
    },
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Start (inclusive): YYYY-MM-DD or an RFC 3339 time; default: the start of this month.
    #[arg(long)]
    pub from: Option<String>,
    /// End (exclusive): YYYY-MM-DD or an RFC 3339 time; default: now.
    #[arg(long)]
    pub to: Option<String>,
    /// Comma-separated: model, deployment, deployed-model, day, accelerator-type.
    #[arg(long, value_delimiter = ',')]
    pub group_by: Vec<String>,
    /// AIP-160 filter over the row keys, e.g. 'model = "accounts/kiln/models/x"'.
    #[arg(long, default_value = "")]
    pub filter: String,
    /// Every account (platform admin).
    #[arg(long)]
    pub all_accounts: bool,
}

fn usage_client(client: &Client) -> billv1::usage_service_client::UsageServiceClient<Authed> {
    billv1::usage_service_client::UsageServiceClient::new(client.authed())
}

fn quota_client(client: &Client) -> billv1::quota_service_client::QuotaServiceClient<Authed> {
    billv1::quota_service_client::QuotaServiceClient::new(client.authed())
}

resource!(billv1::Quota, quota_client {
    list: list_quotas(billv1::ListQuotasRequest, parent) => quotas,
    update: update_quota(billv1::UpdateQuotaRequest) quota,
});

fn money(m: &Option<kiln_proto::common::v1::Money>) -> String {
    match m {
        Some(m) => {
            let nanos = m.units.saturating_mul(1_000_000_000) + i64::from(m.nanos);
            format!(
                "{} {}",
                kiln_billing::prices::format_nanos(nanos),
                m.currency_code
            )
        }
        None => String::new(),
    }
}

// One group of a usage report (its keys and sums); the report's totals print this way too.
printable!(billv1::UsageRow, "kiln.billing.v1.UsageRow" {
    "DAY" => |r| r.day.clone(),
    "MODEL" => |r| r.model.clone(),
    "DEPLOYMENT" => |r| r.deployment.clone(),
    "DEPLOYED MODEL" => |r| r.deployed_model.clone(),
    "ACCELERATOR" => accelerator_text,
    "REQUESTS" => |r| r.request_count.to_string(),
    "PROMPT TOKENS" => |r| r.prompt_tokens.to_string(),
    "COMPLETION TOKENS" => |r| r.completion_tokens.to_string(),
    "EMBEDDING TOKENS" => |r| r.embedding_tokens.to_string(),
    "GPU SECONDS" => |r| format!("{:.1}", r.gpu_seconds),
    "TRAINING TOKENS" => |r| r.training_tokens.to_string(),
    "COST" => |r| money(&r.cost),
});

/// A row's accelerator type (empty when the row is not grouped by it).
fn accelerator_text(r: &billv1::UsageRow) -> String {
    if r.accelerator_type == 0 {
        String::new()
    } else {
        enum_name(
            r.accelerator_type,
            kiln_proto::common::v1::AcceleratorType::as_str_name,
        )
    }
}

/// The report as a table: one row per group, and a TOTAL row under several.
fn usage_table(report: &billv1::GetUsageResponse) -> String {
    let mut rows: Vec<Vec<String>> = report.rows.iter().map(Printable::row).collect();
    if report.rows.len() > 1
        && let Some(totals) = &report.totals
    {
        let mut total = totals.row();
        total[0] = "TOTAL".into();
        rows.push(total);
    }
    format!(
        "usage from {} to {}\n{}",
        time(&report.start_time),
        time(&report.end_time),
        table(&billv1::UsageRow::headers(), &rows).trim_end()
    )
}

printable!(billv1::Quota, "kiln.billing.v1.Quota" {
    "NAME" => |q| q.name.clone(),
    "VALUE" => |q| q.value.to_string(),
    "MAX VALUE" => |q| q.max_value.to_string(),
    "USAGE" => |q| format!("{}", (q.usage * 1000.0).round() / 1000.0),
    "UNIT" => |q| q.unit.clone(),
});

/// The usage request the flags ask for (the account not set yet).
fn usage_request(args: UsageArgs) -> anyhow::Result<billv1::GetUsageRequest> {
    let time_flag =
        |flag: &str, text: Option<String>| text.map(|t| parse_time(flag, &t)).transpose();
    let group_by = args
        .group_by
        .iter()
        .filter(|g| !g.trim().is_empty())
        .map(|g| parse_enum::<GroupBy>("group-by", g).map(i32::from))
        .collect::<anyhow::Result<_>>()?;
    Ok(billv1::GetUsageRequest {
        parent: String::new(),
        start_time: time_flag("from", args.from)?,
        end_time: time_flag("to", args.to)?,
        group_by,
        filter: args.filter,
    })
}

pub(crate) async fn get(client: &Client, format: Format, command: Get) -> anyhow::Result<()> {
    let Get::Usage(args) = command;
    let all_accounts = args.all_accounts;
    // The flags are checked before anything is asked of the server.
    let mut request = usage_request(args)?;
    request.parent = if all_accounts {
        "accounts/-".to_owned()
    } else {
        client.account().await?
    };
    let report = usage_client(client).get_usage(request).await?.into_inner();
    match format {
        Format::Json => print_json("kiln.billing.v1.GetUsageResponse", &report),
        Format::Table => say!("{}", usage_table(&report)),
    }
    Ok(())
}

pub(crate) async fn list(client: &Client, format: Format, command: List) -> anyhow::Result<()> {
    let List::Quotas(list) = command;
    let request = InParent::in_parent(client.account().await?);
    list_and_print::<billv1::Quota>(client, format, &list, request).await
}

pub(crate) async fn update(client: &Client, format: Format, command: Update) -> anyhow::Result<()> {
    let Update::Quota {
        quota,
        value,
        max_value,
    } = command;
    let (mut update, mask) = changes!(billv1::Quota { value, max_value })?;
    update.name = client.full_name("quotas", &quota).await?;
    update_and_print(client, format, update, mask).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::to_json;
    use crate::commands::flags::parse_flags;

    fn request(args: &[&str]) -> anyhow::Result<billv1::GetUsageRequest> {
        usage_request(parse_flags(args)?)
    }

    #[test]
    fn usage_flags_make_the_request() {
        let r = request(&[
            "--from",
            "2026-01-01",
            "--group-by",
            "model,deployed-model,DAY",
        ])
        .unwrap();
        assert_eq!(r.start_time.unwrap().seconds, 1_767_225_600);
        assert_eq!(r.end_time, None);
        assert_eq!(
            r.group_by,
            [
                GroupBy::Model as i32,
                GroupBy::DeployedModel as i32,
                GroupBy::Day as i32
            ]
        );
        let e = request(&["--group-by", "colour"]).unwrap_err().to_string();
        assert!(e.starts_with("--group-by \"colour\": unknown value"), "{e}");
        let e = request(&["--to", "soon"]).unwrap_err().to_string();
        assert!(e.starts_with("--to \"soon\""), "{e}");
    }

    #[test]
    fn the_usage_table_ends_with_a_total_under_several_rows() {
        let row = |model: &str, requests| billv1::UsageRow {
            model: model.into(),
            request_count: requests,
            ..Default::default()
        };
        let mut report = billv1::GetUsageResponse {
            rows: vec![row("m1", 2), row("m2", 3)],
            totals: Some(row("", 5)),
            ..Default::default()
        };
        let text = usage_table(&report);
        assert!(text.starts_with("usage from - to -\nDAY"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("TOTAL") && last.contains(" 5 "), "{last}");
        report.rows.pop();
        assert!(!usage_table(&report).contains("TOTAL"));
        assert_eq!(
            to_json(billv1::Quota::PROTO_NAME, &billv1::Quota::default())["value"],
            "0"
        );
    }
}
