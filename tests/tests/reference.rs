//! `docs/reference.md` against the code: every help block is what the binary prints now, and
//! every JSON table lists exactly the keys the report types serialize.

use std::collections::BTreeSet;

use migrate_format::{CheckpointReport, RestoreReport, StatusReport};
use migrate_tests::reference;

fn doc() -> String {
    std::fs::read_to_string(reference::path()).unwrap_or_else(|e| panic!("docs/reference.md: {e}"))
}

#[test]
fn the_reference_shows_what_help_prints() {
    let doc = doc();
    let fresh = reference::refresh(&doc).unwrap_or_else(|e| panic!("{e:#}"));
    if fresh != doc {
        let (old, new) = doc
            .lines()
            .zip(fresh.lines())
            .find(|(a, b)| a != b)
            .unwrap_or(("(end of file)", "(more lines)"));
        panic!(
            "docs/reference.md is out of date with --help; run `cargo xtask docs`.\nfirst difference:\n  doc:  {old}\n  help: {new}"
        );
    }
    for command in [
        "kubectl-migrate",
        "kubectl-migrate check",
        "kubectl-migrate completion",
        "kubectl-migrate status",
        "kubectl-migrate abort",
        "kubectl-migrate resume",
        "kubectl-migrate controller",
        "restore-launcher",
        "restore-launcher checkpoint",
        "restore-launcher receive",
        "restore-launcher rollback",
        "restore-launcher freeze",
        "restore-launcher renew",
        "restore-launcher commit",
        "restore-launcher thaw",
        "restore-launcher status",
    ] {
        assert!(
            doc.contains(&format!("<!-- help: {command} -->")),
            "the reference has no help block for `{command}`"
        );
    }
}

/// The keys a report serializes to.
fn keys(value: impl serde::Serialize) -> BTreeSet<String> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        other => panic!("not a JSON object: {other:?}"),
    }
}

#[test]
fn the_json_tables_list_every_key_of_the_reports() {
    let doc = doc();
    // Every optional key set, so that the keys left out when empty are listed too.
    let post_copy = serde_json::json!({"state": "complete", "ended_at_ms": 1, "error": null});
    let status: StatusReport = serde_json::from_value(serde_json::json!({
        "state": "running", "app_pid": 1000, "launcher_version": "0.1.0", "criu_version": null,
        "kernel": "6.18", "arch": "x86_64", "last_checkpoint": null, "last_restore": null,
        "error": null, "post_copy": post_copy, "post_copy_source": "why not",
        "checkpoint_blocked": "why not", "ended_freeze": "mig-1"
    }))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut checkpoint = CheckpointReport::new("id".into(), false);
    checkpoint.failure = Some(migrate_format::CheckpointFailure::LeftTree);
    checkpoint.post_copy =
        Some(serde_json::from_value(post_copy).unwrap_or_else(|e| panic!("{e}")));
    let mut receive = RestoreReport::new();
    receive.lazy_pages_pid = Some(1);
    for (name, serialized) in [
        ("status", keys(status)),
        ("checkpoint", keys(checkpoint)),
        ("receive", keys(receive)),
    ] {
        let documented = reference::documented_keys(&doc, name).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            documented, serialized,
            "the `{name}` JSON table of docs/reference.md does not list the report's keys"
        );
    }
}
