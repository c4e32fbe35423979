//! `kubectl-migrate` binary: parse, connect, run the requested step, map errors to exit codes.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kubectl_migrate::check::{self, Problem};
use kubectl_migrate::cli::{Cli, Command, OutputFormat};
use kubectl_migrate::exec::ExecLaunchers;
use kubectl_migrate::{client, controller, drain, migrate, recover, rewrite, submit};

fn main() -> ExitCode {
    let cli = kubectl_migrate::cli::parse();
    if let Some(Command::Completion { shell }) = cli.command {
        kubectl_migrate::cli::write_completion(shell, &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
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

/// Prints the preflight's problems; says whether there were none.
fn report(problems: &[Problem], notes: &[String], pod: &str, node: &str) -> bool {
    for note in notes {
        eprintln!("note: {note}");
    }
    if problems.is_empty() {
        eprintln!("pod {pod} can be migrated to {node}");
        return true;
    }
    eprintln!("pod {pod} cannot be migrated to {node}:");
    for problem in problems {
        eprintln!("  ✗ {}\n      fix: {}", problem.what, problem.fix);
    }
    false
}

async fn preflight(
    connection: &client::Connection,
    pod: &str,
    node: &str,
    force: bool,
    max_downtime: Option<std::time::Duration>,
) -> Result<(Vec<Problem>, Vec<String>)> {
    let launchers = ExecLaunchers {
        client: connection.client.clone(),
        lazy: false,
        post_copies: Default::default(),
    };
    let facts = check::gather(
        &connection.client,
        &connection.namespace,
        pod,
        node,
        &launchers,
        force,
    )
    .await
    .with_context(|| format!("cannot read the cluster at {}", connection.server))?;
    Ok(match facts {
        Ok(mut facts) => {
            facts.max_downtime = max_downtime;
            (check::problems(&facts), check::notes(&facts))
        }
        Err(problem) => (vec![problem], Vec::new()),
    })
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let connection = client::connect(&cli.global).await?;
    if let Some(Command::Controller {
        max_concurrent,
        leader_lease,
        identity,
    }) = &cli.command
    {
        return run_controller(
            &connection,
            *max_concurrent,
            leader_lease.as_deref(),
            identity.clone(),
        )
        .await;
    }
    if let Some(Command::Check {
        pod,
        to,
        force,
        max_downtime,
    }) = &cli.command
    {
        let (problems, mut notes) = preflight(&connection, pod, to, *force, *max_downtime).await?;
        notes.push(
            match submit::mode(&connection.client, &connection.namespace).await {
                Ok(mode) => mode.describe(),
                Err(error) => format!(
                    "mode: this plugin runs the migration; whether an in-cluster controller is installed cannot be told ({error})"
                ),
            },
        );
        return Ok(if report(&problems, &notes, pod, to) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let launchers = ExecLaunchers {
        client: connection.client.clone(),
        lazy: cli.migrate.lazy,
        post_copies: Default::default(),
    };
    match &cli.command {
        Some(Command::Status { pod }) => {
            let found = recover::list(
                &connection.client,
                &connection.namespace,
                pod.as_deref(),
                &launchers,
            )
            .await
            .with_context(|| format!("cannot read the cluster at {}", connection.server))?;
            print_unfinished(&found);
            if let Some(migrations) = submit::list(&connection.client, &connection.namespace).await
            {
                print_pod_migrations(&migrations, pod.as_deref());
            }
            return Ok(ExitCode::SUCCESS);
        }
        Some(Command::Abort { pod }) => {
            return Ok(outcome(
                recover::abort(&connection, &launchers, pod)
                    .await
                    .map(|aftermath| aftermath.text().to_string()),
            ));
        }
        Some(Command::Resume { pod, from_source }) => {
            let done = if *from_source {
                recover::resume_from_source(&connection, &launchers, pod).await
            } else {
                recover::resume(&connection, &launchers, pod).await
            };
            return Ok(outcome(done));
        }
        Some(Command::Drain {
            node,
            to,
            parallel,
            dry_run,
            migrate_only,
            force,
            delete_emptydir_data,
            eviction_timeout,
            timeout,
            transfer,
        }) => {
            let options = drain::Options {
                node: node.clone(),
                to: to.clone(),
                parallel: usize::from(*parallel),
                dry_run: *dry_run,
                migrate_only: *migrate_only,
                force: *force,
                delete_emptydir_data: *delete_emptydir_data,
                eviction_timeout: *eviction_timeout,
                timeout: *timeout,
                lease: cli.migrate.lease,
                transfer: *transfer,
            };
            let evictions = client::connect_with(&cli.global, false).await?;
            return run_drain(&connection, &evictions.client, &options).await;
        }
        _ => {}
    }
    if matches!(cli.command, Some(Command::Completion { .. })) {
        return Ok(ExitCode::SUCCESS); // answered in main, before connecting
    }
    let (Some(pod), Some(node)) = (cli.migrate.pod.as_deref(), cli.migrate.to.as_deref()) else {
        bail!("usage: kubectl migrate POD --to NODE");
    };
    if cli.migrate.submit && cli.migrate.dry_run {
        bail!(
            "--dry-run and --async do not go together: --dry-run prints the pods a move would make, --async hands the move over"
        );
    }
    if cli.migrate.dry_run {
        let pods: Api<Pod> = Api::namespaced(connection.client.clone(), &connection.namespace);
        let source = pods.get(pod).await.with_context(|| {
            format!(
                "cannot read pod {}/{pod} from {}",
                connection.namespace, connection.server
            )
        })?;
        // A StatefulSet's pod makes two pods: the holder of its checkpoint, then the pod that
        // takes its name (see `migrate::identity`).
        let made = if kubectl_migrate::check::pod::controller(&source)
            .is_some_and(|o| o.kind == "StatefulSet")
        {
            let holder = rewrite::holder_pod(&source, node, "dry-run");
            let holder_name = holder.metadata.name.clone().unwrap_or_default();
            let successor = rewrite::successor_pod(&source, node, "dry-run", &holder_name);
            vec![holder, successor]
        } else {
            vec![rewrite::target_pod(&source, node, "dry-run")]
        };
        for (i, pod) in made.iter().enumerate() {
            match cli.migrate.output.unwrap_or(OutputFormat::Yaml) {
                OutputFormat::Yaml => {
                    if i > 0 {
                        println!("---");
                    }
                    print!("{}", serde_yaml::to_string(pod)?);
                }
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(pod)?),
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if cli.migrate.submit {
        let request = submit::Request {
            pod: pod.into(),
            node: node.into(),
            timeout: cli.migrate.timeout,
            keep_source: cli.migrate.keep_source,
            transfer: cli.migrate.transfer,
            lazy: cli.migrate.lazy,
            force: cli.migrate.force,
            max_downtime: cli.migrate.max_downtime,
        };
        let created = submit::submit(
            &connection.client,
            &connection.namespace,
            &connection.server,
            &request,
        )
        .await?;
        match cli.migrate.output {
            Some(OutputFormat::Yaml) => print!("{}", serde_yaml::to_string(&created)?),
            Some(OutputFormat::Json) => println!("{}", serde_json::to_string_pretty(&created)?),
            None => {
                let name = created.metadata.name.unwrap_or_default();
                println!("podmigration.migrate.kubectl.io/{name} created");
                eprintln!(
                    "the in-cluster controller moves pod {pod} to {node}; follow it with `kubectl get podmigration {name} -w` or `kubectl migrate status`"
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let options = migrate::Options {
        id: None,
        pod: pod.into(),
        target_node: node.into(),
        timeout: cli.migrate.timeout,
        keep_source: cli.migrate.keep_source,
        force: cli.migrate.force,
        lease: cli.migrate.lease,
        max_downtime: cli.migrate.max_downtime,
        moved: Default::default(),
        transfer: cli.migrate.transfer,
        lazy: cli.migrate.lazy,
    };
    let progress = show_progress(options.moved.clone());
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("interrupted: undoing the migration (or, past its commit point, finishing it)…");
    };
    let outcome = migrate::migrate(&connection, &launchers, &options, interrupted).await;
    if let Some(progress) = progress {
        progress.abort();
    }
    match outcome {
        Ok(done) => {
            print_report(&done, cli.migrate.output)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(failed) => {
            eprintln!("error: migration of {pod} to {node} failed: {failed}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `drain`: a line per pod as it is dealt with (stderr), then the table (stdout); exit 0 when
/// every pod that was to leave the node left it.
async fn run_drain(
    connection: &client::Connection,
    evictions: &kube::Client,
    options: &drain::Options,
) -> Result<ExitCode> {
    eprintln!(
        "{} node {}",
        if options.dry_run {
            "dry run: would drain"
        } else {
            "draining (cordoned)"
        },
        options.node
    );
    let rows = drain::drain(
        &connection.client,
        evictions,
        &connection.server,
        options,
        |row| {
            let detail = match &row.action {
                drain::Action::Migrated { target, node, .. } => format!(" as {target} to {node}"),
                drain::Action::WouldMigrate { node } => format!(" to {node}"),
                drain::Action::Skipped(why)
                | drain::Action::Failed(why)
                | drain::Action::WouldEvict(why) => format!(": {why}"),
                drain::Action::Evicted => String::new(),
            };
            eprintln!(
                "pod {}/{} {}{detail}",
                row.namespace,
                row.pod,
                row.action.word()
            );
        },
    )
    .await?;
    println!(
        "{:<40} {:<32} {:<14} {:<12} {:>10}",
        "POD", "OWNER", "ACTION", "TARGET NODE", "DOWNTIME"
    );
    for row in &rows {
        let downtime = match &row.action {
            drain::Action::Migrated { downtime_ms, .. } => {
                downtime_ms.map_or("?".into(), |ms| format!("{ms} ms"))
            }
            _ => "-".into(),
        };
        println!(
            "{:<40} {:<32} {:<14} {:<12} {:>10}",
            format!("{}/{}", row.namespace, row.pod),
            row.owner,
            row.action.word(),
            row.target_node().unwrap_or("-"),
            downtime
        );
    }
    if drain::succeeded(&rows) {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: not every pod left node {} (see the failed rows above); the migrated pods run on their new nodes",
            options.node
        );
        Ok(ExitCode::FAILURE)
    }
}

/// Prints the outcome of `abort` or `resume`; exit 0 when it did (or had nothing to do).
fn outcome(result: Result<String, recover::RecoverError>) -> ExitCode {
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The `status` table: one line per unfinished migration, or a line saying there is none;
/// then what migrations that can never finish left behind.
fn print_unfinished(found: &[recover::InFlight]) {
    let (ended, in_flight): (Vec<_>, Vec<_>) = found.iter().partition(|m| m.freeze_ended);
    if in_flight.is_empty() {
        println!("no unfinished migrations");
    } else {
        println!(
            "{:<20} {:<20} {:<24} {:<16} {:<9} {:>6}  NEXT",
            "SOURCE", "TARGET", "MIGRATION", "PHASE", "COMMITTED", "AGE"
        );
        for m in in_flight {
            println!(
                "{:<20} {:<20} {:<24} {:<16} {:<9} {:>6}  {}",
                m.source,
                m.target.as_deref().unwrap_or("(gone)"),
                m.id,
                m.phase,
                if m.committed { "yes" } else { "no" },
                m.age_seconds.map_or("?".into(), |s| format!("{s}s")),
                m.next_step()
            );
        }
    }
    for m in ended {
        println!(
            "\nmigration {} of pod {} can never finish: its freeze ended without a commit, and the app runs on in {} with its state. It left {} and still holds the pod; `{}` removes that (the source is not touched).",
            m.id,
            m.source,
            m.source,
            m.target
                .as_deref()
                .map_or_else(|| "its claim".to_string(), |t| format!("its target {t}")),
            m.next_step()
        );
    }
}

/// `controller`: the in-cluster controller, until SIGTERM.
async fn run_controller(
    connection: &client::Connection,
    max_concurrent: u16,
    leader_lease: Option<&str>,
    identity: Option<String>,
) -> Result<ExitCode> {
    let leader_lease = match leader_lease {
        Some(lease) => match lease.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => {
                Some((namespace.to_string(), name.to_string()))
            }
            _ => bail!("--leader-lease takes NAMESPACE/NAME, not `{lease}`"),
        },
        None => None,
    };
    let identity = identity
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "kubectl-migrate-controller".into());
    let settings = controller::Settings {
        max_concurrent: usize::from(max_concurrent),
        leader_lease,
        identity,
        server: connection.server.clone(),
    };
    eprintln!(
        "kubectl-migrate controller: PodMigrations of every namespace at {}, at most {max_concurrent} at once",
        connection.server
    );
    controller::run(connection.client.clone(), settings).await?;
    Ok(ExitCode::SUCCESS)
}

/// The `status` table of PodMigrations (the controller's), all or `pod`'s.
fn print_pod_migrations(migrations: &[kubectl_migrate::crd::PodMigration], pod: Option<&str>) {
    let shown: Vec<_> = migrations
        .iter()
        .filter(|m| pod.is_none_or(|p| m.spec.pod == p))
        .collect();
    if shown.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<32} {:<20} {:<12} {:<11} {:>9}  MESSAGE",
        "PODMIGRATION", "POD", "TARGET", "PHASE", "DOWNTIME"
    );
    for m in shown {
        let status = m.status.clone().unwrap_or_default();
        let mut message = status.message.unwrap_or_default().replace('\n', " ");
        if message.chars().count() > 100 {
            message = message
                .chars()
                .take(99)
                .chain(std::iter::once('…'))
                .collect();
        }
        println!(
            "{:<32} {:<20} {:<12} {:<11} {:>9}  {}",
            m.metadata.name.as_deref().unwrap_or_default(),
            m.spec.pod,
            status
                .target_node
                .or(m.spec.target_node.clone())
                .unwrap_or_else(|| "-".into()),
            status.phase.map_or("-".into(), |p| format!("{p:?}")),
            status.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            message
        );
    }
}

/// A progress bar of the archive bytes moved and their rate, on stderr when it is a terminal.
fn show_progress(
    moved: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Option<tokio::task::JoinHandle<()>> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {msg} {bytes} moved ({bytes_per_sec}, {elapsed})",
    ) {
        bar.set_style(style);
    }
    bar.set_message("migrating:");
    Some(tokio::spawn(async move {
        loop {
            bar.set_position(moved.load(std::sync::atomic::Ordering::Relaxed));
            bar.tick();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }))
}

/// The per-phase timing table on stderr, or the whole report as JSON/YAML on stdout.
fn print_report(done: &migrate::Report, format: Option<OutputFormat>) -> Result<()> {
    for warning in &done.warnings {
        eprintln!("warning: {warning}");
    }
    match format {
        Some(OutputFormat::Json) => println!("{}", serde_json::to_string_pretty(done)?),
        Some(OutputFormat::Yaml) => print!("{}", serde_yaml::to_string(done)?),
        None => {
            println!(
                "pod {} moved to node {} as {} (migration {})",
                done.source, done.node, done.target, done.id
            );
            println!("{:<30} {:>10}", "PHASE", "MS");
            for (phase, ms) in &done.phases {
                println!("{phase:<30} {ms:>10}");
            }
            let ms = |d: Option<u64>| d.map_or("?".into(), |d| d.to_string());
            println!(
                "{:<30} {:>10}  (freeze → thaw, the nodes' realtime clocks)",
                "downtime",
                ms(done.downtime_ms)
            );
            if done.containers.len() > 1 {
                for (container, d) in &done.container_downtime_ms {
                    println!("{:<30} {d:>10}", format!("  container {container}"));
                }
            }
            println!(
                "{:<30} {:>10}  (freeze asked → thaw answered, this plugin's monotonic clock)",
                "downtime, upper bound",
                ms(done.downtime_bound_ms)
            );
            for (container, moved) in &done.containers {
                let t = |map: &std::collections::BTreeMap<String, u64>, key: &str| {
                    ms(map.get(key).copied())
                };
                println!(
                    "container {container}: {} transfer, {} archive bytes; dump {} ms, archive written {} ms; verify {} ms, restore {} ms",
                    match moved.route {
                        kubectl_migrate::launchers::Route::Direct => "direct",
                        kubectl_migrate::launchers::Route::Relay => "relayed",
                    },
                    moved.checkpoint.archive_bytes,
                    t(&moved.checkpoint.timings_ms, "dump"),
                    t(&moved.checkpoint.timings_ms, "write"),
                    t(&moved.restore.timings_ms, "verify"),
                    t(&moved.restore.timings_ms, "restore"),
                );
            }
            for done in &done.post_copy {
                let served = done
                    .served
                    .as_ref()
                    .and_then(|r| r.timings_ms.get("serve pages").copied());
                println!(
                    "container {}: post-copy {:?}: every page arrived at {} (target node's CLOCK_REALTIME, ms since the epoch); the source served pages for {} ms",
                    done.container,
                    done.arrived.state,
                    ms(done.arrived.ended_at_ms),
                    ms(served)
                );
            }
            println!("{:<30} {:>10}", "bytes moved", done.bytes_moved);
            if !done.source_deleted {
                println!(
                    "the source pod {} was kept (frozen) as asked: delete it when done",
                    done.source
                );
            }
        }
    }
    Ok(())
}
