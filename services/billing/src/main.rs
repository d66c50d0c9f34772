//! `kiln-billing`: the billing service alone (the same code as `kiln serve billing`).
//! Usage: `kiln-billing [config.toml]`; `KILN_*` variables override the file.

use std::path::PathBuf;

use kiln_core::config::Load;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = std::env::args_os().nth(1).map(PathBuf::from);
    let config = kiln_billing::config::Config::load(file.as_deref())?;
    let _telemetry = kiln_core::telemetry::init(
        "kiln-billing",
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    kiln_billing::serve_until(&config, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
