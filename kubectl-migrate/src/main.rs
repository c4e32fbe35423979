//! `kubectl-migrate` binary: parse, connect, run the requested step, map errors to exit codes.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kubectl_migrate::cli::{Cli, Command, OutputFormat};
use kubectl_migrate::{client, rewrite};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(Command::Check { .. }) = &cli.command {
        bail!("`kubectl migrate check` is not built yet in this version");
    }
    let (Some(pod), Some(node)) = (cli.migrate.pod.as_deref(), cli.migrate.to.as_deref()) else {
        bail!("usage: kubectl migrate POD --to NODE");
    };
    let connection = client::connect(&cli.global).await?;
    let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
    let source = pods.get(pod).await.with_context(|| {
        format!(
            "cannot read pod {}/{pod} from {}",
            connection.namespace, connection.server
        )
    })?;
    if !cli.migrate.dry_run {
        bail!("only --dry-run is built yet in this version: the migration pipeline is not");
    }
    let target = rewrite::target_pod(&source, node, "dry-run");
    match cli.migrate.output.unwrap_or(OutputFormat::Yaml) {
        OutputFormat::Yaml => print!("{}", serde_yaml::to_string(&target)?),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&target)?),
    }
    Ok(ExitCode::SUCCESS)
}
