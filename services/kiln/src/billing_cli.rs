//! Client commands for billing: `kiln get usage`, `kiln list quotas`, `kiln update quota`.

use anyhow::Context;
use clap::Args;
use kiln_proto::billing::v1 as billv1;
use kiln_proto::billing::v1::get_usage_request::GroupBy;

use crate::cli::{Authed, Client, ListArgs, collect_pages, print};
use crate::output::Format;
use crate::say;

fn usage_client(client: &Client) -> billv1::usage_service_client::UsageServiceClient<Authed> {
    billv1::usage_service_client::UsageServiceClient::new(client.authed())
}

fn quota_client(client: &Client) -> billv1::quota_service_client::QuotaServiceClient<Authed> {
    billv1::quota_service_client::QuotaServiceClient::new(client.authed())
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

fn time_arg(flag: &str, text: &str) -> anyhow::Result<prost_types::Timestamp> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    full.parse::<prost_types::Timestamp>()
        .map_err(|e| anyhow::anyhow!("--{flag} {text:?}: not YYYY-MM-DD or an RFC 3339 time ({e})"))
}

fn group_arg(text: &str) -> anyhow::Result<i32> {
    let name = text.trim().to_ascii_uppercase().replace('-', "_");
    GroupBy::from_str_name(&name)
        .filter(|g| *g != GroupBy::Unspecified)
        .map(|g| g as i32)
        .with_context(|| {
            format!("--group-by: unknown {text:?}; use model, deployment, deployed-model, day, accelerator-type")
        })
}

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

fn usage_row(r: &billv1::UsageRow) -> Vec<String> {
    let accelerator = if r.accelerator_type == 0 {
        String::new()
    } else {
        kiln_proto::common::v1::AcceleratorType::try_from(r.accelerator_type)
            .map(|a| a.as_str_name().to_owned())
            .unwrap_or_default()
    };
    vec![
        r.day.clone(),
        r.model.clone(),
        r.deployment.clone(),
        r.deployed_model.clone(),
        accelerator,
        r.request_count.to_string(),
        r.prompt_tokens.to_string(),
        r.completion_tokens.to_string(),
        r.embedding_tokens.to_string(),
        format!("{:.1}", r.gpu_seconds),
        r.training_tokens.to_string(),
        money(&r.cost),
    ]
}
const USAGE_HEADERS: &[&str] = &[
    "DAY",
    "MODEL",
    "DEPLOYMENT",
    "DEPLOYED MODEL",
    "ACCELERATOR",
    "REQUESTS",
    "PROMPT TOKENS",
    "COMPLETION TOKENS",
    "EMBEDDING TOKENS",
    "GPU SECONDS",
    "TRAINING TOKENS",
    "COST",
];

pub async fn get_usage(client: &Client, format: Format, args: UsageArgs) -> anyhow::Result<()> {
    // The flags are checked before anything is asked of the server.
    let start_time = args
        .from
        .as_deref()
        .map(|t| time_arg("from", t))
        .transpose()?;
    let end_time = args.to.as_deref().map(|t| time_arg("to", t)).transpose()?;
    let group_by = args
        .group_by
        .iter()
        .filter(|g| !g.trim().is_empty())
        .map(|g| group_arg(g))
        .collect::<anyhow::Result<_>>()?;
    let parent = if args.all_accounts {
        "accounts/-".to_owned()
    } else {
        client.account().await?
    };
    let request = billv1::GetUsageRequest {
        parent,
        start_time,
        end_time,
        group_by,
        filter: args.filter,
    };
    let report = usage_client(client).get_usage(request).await?.into_inner();
    match format {
        Format::Json => print(
            format,
            "kiln.billing.v1.GetUsageResponse",
            &[report],
            &[],
            |_| vec![],
            true,
        ),
        Format::Table => {
            let mut rows: Vec<Vec<String>> = report.rows.iter().map(usage_row).collect();
            if report.rows.len() > 1
                && let Some(totals) = &report.totals
            {
                let mut total = usage_row(totals);
                total[0] = "TOTAL".into();
                rows.push(total);
            }
            say!(
                "usage from {} to {}",
                crate::output::time(&report.start_time),
                crate::output::time(&report.end_time)
            );
            say!("{}", crate::output::table(USAGE_HEADERS, &rows).trim_end());
        }
    }
    Ok(())
}

fn quota_row(q: &billv1::Quota) -> Vec<String> {
    vec![
        q.name.clone(),
        q.value.to_string(),
        q.max_value.to_string(),
        format!("{}", (q.usage * 1000.0).round() / 1000.0),
        q.unit.clone(),
    ]
}
const QUOTA_HEADERS: &[&str] = &["NAME", "VALUE", "MAX VALUE", "USAGE", "UNIT"];

pub async fn list_quotas(client: &Client, format: Format, list: ListArgs) -> anyhow::Result<()> {
    let parent = client.account().await?;
    let items = collect_pages(list.limit, |page_token| {
        let mut c = quota_client(client);
        let request = billv1::ListQuotasRequest {
            parent: parent.clone(),
            page_size: 200,
            page_token,
            filter: list.filter.clone(),
            order_by: list.order_by.clone(),
        };
        async move {
            let page = c.list_quotas(request).await?.into_inner();
            Ok((page.quotas, page.next_page_token))
        }
    })
    .await?;
    print(
        format,
        "kiln.billing.v1.Quota",
        &items,
        QUOTA_HEADERS,
        quota_row,
        false,
    );
    Ok(())
}

pub async fn update_quota(
    client: &Client,
    format: Format,
    quota: String,
    value: Option<i64>,
    max_value: Option<i64>,
) -> anyhow::Result<()> {
    let name = if quota.starts_with("accounts/") {
        quota
    } else {
        format!("{}/quotas/{quota}", client.account().await?)
    };
    let mut paths = Vec::new();
    if value.is_some() {
        paths.push("value".to_owned());
    }
    if max_value.is_some() {
        paths.push("max_value".to_owned());
    }
    if paths.is_empty() {
        anyhow::bail!("nothing to change: pass --value and/or --max-value");
    }
    let updated = quota_client(client)
        .update_quota(billv1::UpdateQuotaRequest {
            quota: Some(billv1::Quota {
                name,
                value: value.unwrap_or_default(),
                max_value: max_value.unwrap_or_default(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await?
        .into_inner();
    print(
        format,
        "kiln.billing.v1.Quota",
        &[updated],
        QUOTA_HEADERS,
        quota_row,
        true,
    );
    Ok(())
}
