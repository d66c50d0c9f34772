//! `kiln`: run the platform (`kiln dev`, `kiln serve <service>`) or talk to it.

use clap::Parser;
use kiln::cli::{Cli, Command, DevArgs, ServeArgs};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev(args).await,
            Command::Serve(args) => serve(args).await,
            command => kiln::cli::run_client(command, cli.client).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            match err.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {err:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let mut config = kiln::cli::load_config(args.config.as_deref())?;
    config.server.listen = args.listen;
    config.server.data_dir = args.data_dir.clone();
    config.import_library = true;
    if config.server.page_token_secret.is_none() {
        config.server.page_token_secret = Some(kiln::cli::dev_page_secret(&args.data_dir)?);
    }
    let _telemetry = kiln_core::telemetry::init(
        "kiln",
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
    let mesh = kiln::mesh::Mesh::start(&config, listener, None).await?;
    let data_dir = args.data_dir.display();
    let bus = if config.server.nats_url.is_some() {
        "NATS JetStream"
    } else {
        "in-process"
    };
    println!(
        "Kiln dev is running on {} (state in {data_dir}, events: {bus})",
        mesh.addr
    );
    let key_file = args.data_dir.join("admin.key");
    match &mesh.new_admin_key {
        Some(key) => {
            kiln_core::config::write_admin_key(&args.data_dir, key)?;
            println!(
                "Admin API key (shown once; saved to {}):\n  {key}",
                key_file.display()
            );
        }
        None => println!("Admin API key: in {}", key_file.display()),
    }
    let server = if args.listen.to_string() == "127.0.0.1:7400" {
        String::new()
    } else {
        format!(" --server http://{}", mesh.addr)
    };
    println!(
        "Try (the CLI reads the admin key from {data_dir}/admin.key):\n  \
         kiln{server} create account acme --email owner@acme.example\n  \
         kiln{server} create user alice --account acme --email alice@acme.example --role admin\n  \
         kiln{server} create api-key --account acme --user alice\n  \
         kiln{server} list users --account acme\n  \
         kiln{server} chat accounts/kiln/models/smollm2-135m-instruct \"What is the capital of Japan?\"\n  \
         kiln{server} embed accounts/kiln/models/all-minilm-l6-v2 \"hello world\"\n  \
         kiln{server} --account kiln list deployments\n  \
         kiln{server} get usage --all-accounts --group-by model,day\n  \
         kiln{server} list quotas --account acme\n\
         (the public models answer once their import and preparation finish, a minute or so on first start)\n\
         Press Ctrl-C to stop."
    );
    stop_signal().await;
    println!("stopping");
    mesh.shutdown().await
}

/// Ctrl-C, or SIGTERM from a service manager or container runtime.
async fn stop_signal() {
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate() => {}
    }
}

#[cfg(unix)]
async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut sig) => {
            sig.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn terminate() {
    std::future::pending::<()>().await
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = kiln::cli::load_config(args.config.as_deref())?;
    let _telemetry = kiln_core::telemetry::init(
        &format!("kiln-{}", args.service),
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    match args.service.as_str() {
        "identity" => kiln_identity::serve_until(&config.identity_config(), stop_signal()).await,
        "registry" => {
            let registry = <kiln_registry::config::Config as kiln_core::config::Load>::load(
                args.config.as_deref(),
            )?;
            kiln_registry::serve_until(&registry, stop_signal()).await
        }
        "inference" => {
            let inference = <kiln_inference::config::Config as kiln_core::config::Load>::load(
                args.config.as_deref(),
            )?;
            kiln_inference::serve_until(&inference, stop_signal()).await
        }
        "scheduler" => {
            let scheduler = <kiln_scheduler::config::Config as kiln_core::config::Load>::load(
                args.config.as_deref(),
            )?;
            kiln_scheduler::serve_until(&scheduler, stop_signal()).await
        }
        "billing" => {
            let billing = <kiln_billing::config::Config as kiln_core::config::Load>::load(
                args.config.as_deref(),
            )?;
            kiln_billing::serve_until(&billing, stop_signal()).await
        }
        other => {
            anyhow::bail!(
                "unknown service {other:?}; services: identity, registry, scheduler, billing, inference"
            )
        }
    }
}
