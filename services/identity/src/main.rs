//! `kiln-identity`: the identity service alone (the same code as `kiln serve identity`).
//! Usage: `kiln-identity [config.toml]`; `KILN_*` variables override the file.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let file = std::env::args_os().nth(1).map(PathBuf::from);
    let config = <kiln_identity::config::Config as kiln_core::config::Load>::load(file.as_deref())?;
    let _telemetry = kiln_core::telemetry::init(
        "kiln-identity",
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen).await?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let (served, admin_key) = kiln_identity::run(&config, listener, shutdown).await?;
    tracing::info!(addr = %served.local_addr, "kiln-identity listening");
    if let Some(key) = admin_key {
        let path = kiln_core::config::write_admin_key(&config.server.data_dir, &key)?;
        println!("bootstrap admin API key (shown once, also in {}): {key}", path.display());
    }
    tokio::signal::ctrl_c().await?;
    let _ = stop.send(true);
    served.done.await?.map_err(anyhow::Error::msg)?;
    Ok(())
}
