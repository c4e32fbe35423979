//! `kubectl migrate completion bash|zsh|fish`: the bash script is sourced into a real bash and
//! asked what it completes, as a user's <TAB> would.

use std::process::Command;

const PLUGIN: &str = env!("CARGO_BIN_EXE_kubectl-migrate");

/// What bash completes for `line` (the part of the command line before the cursor) after
/// `source <(kubectl-migrate completion bash)`, via the function `complete -p` names.
fn bash_completes(line: &str) -> Vec<String> {
    let script = format!(
        r#"source <("{PLUGIN}" completion bash) || exit 3
spec=$(complete -p kubectl-migrate) || exit 4
fn=$(sed -E 's/.*-F ([^ ]+) .*/\1/' <<< "$spec")
line='{line}'
read -ra COMP_WORDS <<< "$line"
[[ "$line" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="$line"; COMP_POINT=${{#line}}
prev=""; (( COMP_CWORD > 0 )) && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
"$fn" kubectl-migrate "${{COMP_WORDS[COMP_CWORD]}}" "$prev"
printf '%s\n' "${{COMPREPLY[@]}}"
"#
    );
    let output = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    assert!(
        output.status.success(),
        "bash failed on {line:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn assert_offers(line: &str, wanted: &[&str]) {
    let offered = bash_completes(line);
    for word in wanted {
        assert!(
            offered.iter().any(|o| o == word),
            "{line:?}<TAB> does not offer {word:?}: {offered:?}"
        );
    }
}

#[test]
fn bash_registers_the_plugin_command() {
    let script = format!(r#"source <("{PLUGIN}" completion bash) && complete -p kubectl-migrate"#);
    let output = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("bash: {e}"));
    let spec = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && spec.contains("-F ")
            && spec.trim_end().ends_with(" kubectl-migrate"),
        "complete -p kubectl-migrate: {spec:?} {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn bash_completes_sub_commands_and_flags() {
    assert_offers(
        "kubectl-migrate ",
        &["check", "completion", "--to", "--namespace"],
    );
    assert_offers(
        "kubectl-migrate --",
        &[
            "--to",
            "--dry-run",
            "--timeout",
            "--keep-source",
            "--context",
            "--kubeconfig",
        ],
    );
    assert_offers(
        "kubectl-migrate check --",
        &["--to", "--namespace", "--context"],
    );
    assert_offers("kubectl-migrate completion ", &["bash", "zsh", "fish"]);
    assert_offers("kubectl-migrate counter -o ", &["yaml", "json"]);
    let after_check = bash_completes("kubectl-migrate check --");
    assert!(
        !after_check.iter().any(|o| o == "--dry-run"),
        "check has no --dry-run, yet it was offered: {after_check:?}"
    );
}

#[test]
fn zsh_and_fish_scripts_are_for_the_plugin_command() {
    for (shell, marker) in [
        ("zsh", "#compdef kubectl-migrate"),
        ("fish", "complete -c kubectl-migrate"),
    ] {
        let output = Command::new(PLUGIN)
            .args(["completion", shell])
            .output()
            .unwrap_or_else(|e| panic!("{PLUGIN}: {e}"));
        let script = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "completion {shell} failed");
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        assert!(
            script.contains("keep-source"),
            "{shell} script lacks the flags"
        );
    }
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let output = Command::new(PLUGIN)
        .args(["completion", "tcsh"])
        .output()
        .unwrap_or_else(|e| panic!("{PLUGIN}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("bash") && stderr.contains("zsh") && stderr.contains("fish"),
        "{stderr}"
    );
}
