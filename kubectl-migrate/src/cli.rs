//! Command line of `kubectl migrate`, with kubectl's conventions (`-n`, `--context`,
//! `--kubeconfig`/`KUBECONFIG`, `--dry-run`, `-o yaml|json`, `--timeout`, `-v`). Parsing only.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use crate::launchers::TransferMode;

/// Live-migrate a running pod to another node: its memory, open files and counters continue
/// there as if nothing happened. The pod's containers must run restore-launcher (images built
/// FROM the restore-launcher base image).
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-migrate",
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub migrate: MigrateArgs,
}

/// Options every sub-command takes, as kubectl spells them.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Namespace of the pod (default: the context's namespace, else "default").
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// More logging: -v info, -vv debug, -vvv trace.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// `kubectl migrate POD --to NODE`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The pod to move.
    #[arg(required = true)]
    pub pod: Option<String>,
    /// The node to move it to.
    #[arg(long = "to", value_name = "NODE", required = true)]
    pub to: Option<String>,
    /// Print the target pod that would be created (for a StatefulSet's pod: its holder, then the pod
    /// that takes its name), and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Hand the move to the in-cluster controller and return: create a PodMigration (with
    /// --timeout, --keep-source, --transfer and --lazy) and print its name; `kubectl migrate
    /// status` and `kubectl get podmigrations` follow it. Needs the controller installed
    /// (`kubectl apply -k config/`); without --async this plugin migrates on its own.
    #[arg(long = "async")]
    pub submit: bool,
    /// Output format for --dry-run and the final report.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<OutputFormat>,
    /// Give up (and roll back) if the migration has not finished in this time.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Keep the source pod (frozen) after a successful migration instead of deleting it.
    #[arg(long)]
    pub keep_source: bool,
    /// Migrate although hostPath volumes' files stay on the source node (the target mounts
    /// the same path on its own node).
    #[arg(long)]
    pub force: bool,
    /// How long the frozen source waits for this plugin: renewed while it works, ended by the
    /// commit; if the plugin dies, the source resumes by itself after it.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub lease: Duration,
    /// Undo the migration (resuming the source) if the app would stay frozen longer than this.
    /// Default: a second less than its tightest HTTP, gRPC or exec liveness probe allows,
    /// else no limit.
    #[arg(long, value_parser = parse_duration)]
    pub max_downtime: Option<Duration>,
    /// How the checkpoint travels. direct: from the source pod to the target pod over TCP,
    /// encrypted and mutually authenticated (TLS 1.3 with a fresh secret per migration, handed
    /// to both launchers over exec stdin); relay: through this plugin and the API server's exec
    /// streams (slower: every byte crosses your connection twice); auto: direct, and the relay
    /// when the pods cannot reach each other (a NetworkPolicy, separate networks), saying so.
    #[arg(long, value_enum, default_value_t = TransferMode::Auto)]
    pub transfer: TransferMode,
    /// Post-copy: resume the app on the target before its memory has arrived. The source sends
    /// everything but the memory; the target's CRIU fetches each page the app touches from the
    /// source, over a second authenticated connection, and pushes the rest in the background.
    /// The source pod is kept, frozen, until every page arrived, and deleted only then. The
    /// risk: until the last page, the app on the target needs the source. If the source pod,
    /// its node or the connection fails before then, the app on the target cannot go on: its
    /// launcher kills it and this command says so and how to go back to the source, which
    /// still holds the app as of the freeze (the target's work since the thaw is lost). Needs
    /// the direct transfer, and gives the target pod's containers SYS_PTRACE, SYS_ADMIN,
    /// NET_ADMIN and SYS_CHROOT (CRIU's privileged mode and its userfaultfd need them; the app
    /// gets its own capabilities back).
    #[arg(long)]
    pub lazy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Explain every reason the move would fail, changing nothing.
    Check {
        /// The pod to move.
        pod: String,
        /// The node to move it to.
        #[arg(long = "to", value_name = "NODE")]
        to: String,
        /// Accept hostPath volumes, as `kubectl migrate --force` would.
        #[arg(long)]
        force: bool,
        /// Check the liveness probes against this freeze, as `kubectl migrate --max-downtime`.
        #[arg(long, value_parser = parse_duration)]
        max_downtime: Option<Duration>,
    },
    /// List migrations that started and did not finish (phase, age, committed or not), with
    /// the command that clears each.
    Status {
        /// Only this pod's (as source or target).
        pod: Option<String>,
    },
    /// Undo an unfinished migration that is not committed: delete its target, resume the
    /// source's app. Safe to run twice.
    Abort {
        /// The pod being migrated (the source).
        pod: String,
    },
    /// Finish an unfinished migration that is committed: thaw the target, delete the source.
    /// Safe to run twice.
    Resume {
        /// The pod being migrated (the source).
        pod: String,
        /// Go back to the source instead, when the target lost the app (its container
        /// restarted after the restore): refused unless the target provably holds no copy and
        /// the source still holds its frozen one. Deletes the target, resumes the source as
        /// it was frozen.
        #[arg(long)]
        from_source: bool,
    },
    /// Cordon a node and move every pod off it: migrate each pod that can be migrated (to
    /// --to, or else to the first node that fits it), evict the rest through the Eviction API
    /// (which honours PodDisruptionBudgets; pods no controller owns and pods with emptyDir
    /// volumes only with --force and --delete-emptydir-data, as kubectl drain), leave DaemonSet
    /// and static pods. Prints a line per pod and a final table; exits 1 if any pod could not
    /// leave the node.
    Drain {
        /// The node to empty.
        node: String,
        /// Move every pod to this node (default: for each pod the first node, by name, that
        /// the preflight finds fitting: Ready, schedulable, resources, taints, affinity,
        /// OS/arch, kernel).
        #[arg(long = "to", value_name = "NODE")]
        to: Option<String>,
        /// How many migrations run at once.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        parallel: u16,
        /// Say what would happen to each pod; change nothing (not even the cordon).
        #[arg(long)]
        dry_run: bool,
        /// Only migrate: pods that cannot be migrated stay on the node.
        #[arg(long)]
        migrate_only: bool,
        /// Evict pods that cannot be migrated even when no controller owns them (nothing
        /// recreates them), as `kubectl drain --force`.
        #[arg(long)]
        force: bool,
        /// Evict pods that cannot be migrated even when they have emptyDir volumes (their data
        /// is lost), as `kubectl drain --delete-emptydir-data`.
        #[arg(long)]
        delete_emptydir_data: bool,
        /// How long to keep retrying an eviction that a PodDisruptionBudget refuses.
        #[arg(long, default_value = "2m", value_parser = parse_duration)]
        eviction_timeout: Duration,
        /// Each migration's deadline, as for `kubectl migrate --timeout`.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        timeout: Duration,
        /// How each checkpoint travels, as for `kubectl migrate --transfer`.
        #[arg(long, value_enum, default_value_t = TransferMode::Auto)]
        transfer: TransferMode,
    },
    /// Run the in-cluster controller that carries out PodMigration objects with this plugin's
    /// pipeline (what `config/controller/` deploys; it also runs outside a cluster against a
    /// kubeconfig). Stops on SIGTERM, letting migrations under way end.
    Controller {
        /// How many migrations run at once; more wait, Pending.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
        max_concurrent: u16,
        /// Act only while holding this Lease, so that of several replicas one acts (leader
        /// election); without it, run only one replica.
        #[arg(long, value_name = "NAMESPACE/NAME")]
        leader_lease: Option<String>,
        /// This replica's name in the Lease and on its Events (default: the host name, which
        /// is the pod's name in a cluster).
        #[arg(long)]
        identity: Option<String>,
    },
    /// Print a shell completion script: `source <(kubectl migrate completion bash)`.
    ///
    /// The script completes the `kubectl-migrate` command (how krew puts it on PATH).
    Completion {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: Shell,
    },
}

/// Shells `completion` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Parses the process's arguments, naming the command "kubectl migrate" in help and errors.
pub fn parse() -> Cli {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let matches = Cli::command().bin_name("kubectl migrate").get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// Writes the completion script for `shell` to `out`.
pub fn write_completion(shell: Shell, out: &mut dyn std::io::Write) {
    use clap::CommandFactory as _;
    // For the binary's own name: shells complete a command word, and "kubectl migrate" is two.
    const NAME: &str = "kubectl-migrate";
    let mut command = Cli::command();
    match shell {
        Shell::Bash => {
            let mut script = Vec::new();
            clap_complete::generate(clap_complete::Shell::Bash, &mut command, NAME, &mut script);
            // clap_complete spells a hyphenated name's sub-command states two ways
            // (clap-rs/clap#6421), so `check --<TAB>` completed nothing: use the loop's spelling.
            let script = String::from_utf8_lossy(&script).replace(
                "kubectl__subcmd__migrate__subcmd__",
                "kubectl__migrate__subcmd__",
            );
            let _ = out.write_all(script.as_bytes());
        }
        Shell::Zsh => clap_complete::generate(clap_complete::Shell::Zsh, &mut command, NAME, out),
        Shell::Fish => clap_complete::generate(clap_complete::Shell::Fish, &mut command, NAME, out),
    }
}

/// Parses kubectl-style durations: `90s`, `5m`, `1h`, `1m30s`, or plain seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration; use forms like 90s, 5m, 1h or 1m30s");
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total += match c {
            'h' => value * 3600,
            'm' => value * 60,
            's' => value,
            _ => return Err(bad()),
        };
    }
    if !number.is_empty() || text.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_kubectl() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_command_line_follows_kubectl() {
        let cli = Cli::try_parse_from([
            "kubectl-migrate",
            "counter",
            "--to",
            "node-b",
            "-n",
            "apps",
            "--dry-run",
            "-o",
            "yaml",
        ])
        .unwrap();
        assert_eq!(cli.migrate.pod.as_deref(), Some("counter"));
        assert_eq!(cli.migrate.to.as_deref(), Some("node-b"));
        assert_eq!(cli.global.namespace.as_deref(), Some("apps"));
        assert!(cli.migrate.dry_run);
        let check = Cli::try_parse_from([
            "kubectl-migrate",
            "check",
            "counter",
            "--to",
            "node-b",
            "--context",
            "kind",
        ])
        .unwrap();
        assert!(matches!(check.command, Some(Command::Check { .. })));
        assert_eq!(check.global.context.as_deref(), Some("kind"));
        assert!(
            Cli::try_parse_from(["kubectl-migrate", "counter"]).is_err(),
            "--to is required"
        );
    }
}
