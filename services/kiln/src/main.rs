//! `kiln`: run the platform (`kiln dev`, `kiln serve <service>...`) or talk to it.

use clap::Parser;
use kiln::cli::{Cli, Command, DevArgs, ServeArgs};
use kiln_server::{KilnConfig, Role, Roles};

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
            Command::Health { service } => {
                cli.client.trust()?;
                health(&cli.client.server, service).await
            }
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
    let mut config = KilnConfig::load(args.config.as_deref(), Roles::all())?;
    config.server.listen = args.listen;
    config.gateway.listen = args.http_listen;
    config.server.data_dir = args.data_dir.clone();
    config.import_library = true;
    if config.server.page_token_secret.is_none() {
        config.server.page_token_secret = Some(kiln_server::dev_page_secret(&args.data_dir)?);
    }
    let _telemetry = kiln_core::telemetry::init(
        "kiln",
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = bind(config.server.listen).await?;
    let running = kiln_server::serve(Roles::all(), &config, listener, None).await?;
    let data_dir = args.data_dir.display();
    let bus = if config.server.nats_url.is_some() {
        "NATS JetStream"
    } else {
        "in-process"
    };
    println!(
        "Kiln dev is running on {} (state in {data_dir}, events: {bus})",
        running.addr
    );
    if let Some(http) = running.gateway_addr {
        println!(
            "HTTP edge on http://{http}: the REST API under /v1/accounts, OpenAI-style \
             inference under /inference/v1 (OpenAPI at /openapi.json)"
        );
    }
    let key_file = args.data_dir.join("admin.key");
    match &running.new_admin_key {
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
        format!(" --server http://{}", running.addr)
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
    kiln_server::shutdown_signal().await;
    println!("stopping");
    running.shutdown().await
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let roles = args
        .services
        .iter()
        .map(|name| name.parse::<Role>())
        .collect::<Result<Roles, String>>()
        .map_err(anyhow::Error::msg)?;
    let config = KilnConfig::load(args.config.as_deref(), roles)?;
    if args.check {
        println!("the configuration of kiln {roles} is valid");
        return Ok(());
    }
    let _telemetry = kiln_core::telemetry::init(
        &format!("kiln-{}", args.services.join("-")),
        config.server.log_format,
        config.server.otlp_endpoint.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = bind(config.server.listen).await?;
    let running = kiln_server::serve(roles, &config, listener, None).await?;
    if let Some(key) = &running.new_admin_key {
        let path = kiln_core::config::write_admin_key(&config.server.data_dir, key)?;
        println!(
            "bootstrap admin API key (shown once, also in {}): {key}",
            path.display()
        );
    }
    println!("kiln {roles} listening on {}", running.addr);
    kiln_server::shutdown_signal().await;
    running.shutdown().await
}

/// Exits 0 when the server at `server` reports `service` (all: "") serving.
async fn health(server: &str, service: String) -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = kiln_core::server::endpoint(server)
        .map_err(|e| anyhow::anyhow!("--server {server:?}: {e}"))?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {server}: {e}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest { service })
        .await?
        .into_inner()
        .status();
    println!("{}", status.as_str_name());
    if status != ServingStatus::Serving {
        anyhow::bail!("{server} is not serving");
    }
    Ok(())
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}
