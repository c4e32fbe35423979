//! The generated parts of `docs/reference.md`, so the reference cannot drift from the code.
//!
//! - Each `<!-- help: BIN [SUB] -->` marker is followed by a ```` ```text ```` block holding what
//!   `BIN [SUB] --help` prints (clap's own text, the flags and their environment twins).
//! - Each `<!-- json: NAME -->` marker is followed by a Markdown table whose first column lists
//!   the keys of one JSON report (`status`, `checkpoint`, `receive`); the keys come from the
//!   `migrate-format` types themselves, the descriptions are written by hand.
//!
//! `cargo xtask docs` rewrites the help blocks; the test `tests/tests/reference.rs` fails when
//! either part is out of date, and says to run it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, Result, bail, ensure};

use crate::apiserver::workspace_binary;
use crate::workspace;

/// Where the reference lives.
pub fn path() -> PathBuf {
    workspace().join("docs/reference.md")
}

/// Help is rendered at this width, whatever the terminal.
const COLUMNS: &str = "100";

/// What `BIN ARGS --help` prints, from the built binary in the target directory.
fn help(command: &str) -> Result<String> {
    let mut words = command.split_whitespace();
    let binary = words.next().context("an empty help marker")?;
    let output = Command::new(workspace_binary(binary))
        .args(words)
        .arg("--help")
        .env("COLUMNS", COLUMNS)
        .output()
        .with_context(|| format!("cannot run {binary} (build the workspace's binaries first)"))?;
    ensure!(output.status.success(), "`{command} --help` failed");
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim_end()
        .to_string())
}

/// `doc` with every help block replaced by what the binaries print now.
///
/// # Errors
/// A marker not followed by a text block, or a binary that cannot run.
pub fn refresh(doc: &str) -> Result<String> {
    let mut out = String::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let Some(command) = line
            .strip_prefix("<!-- help: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        if lines.next() != Some("```text") {
            bail!("`{line}` must be followed by a ```text block");
        }
        for old in lines.by_ref() {
            if old == "```" {
                break;
            }
        }
        out.push_str("```text\n");
        out.push_str(&help(command)?);
        out.push_str("\n```\n");
    }
    Ok(out)
}

/// The keys listed in the table after `<!-- json: NAME -->` (first column, in backticks).
pub fn documented_keys(doc: &str, name: &str) -> Result<BTreeSet<String>> {
    let marker = format!("<!-- json: {name} -->");
    let start = doc
        .find(&marker)
        .with_context(|| format!("no `{marker}` in the reference"))?;
    let keys: BTreeSet<String> = doc[start + marker.len()..]
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cell = l.split('|').nth(1)?.trim();
            Some(cell.strip_prefix('`')?.strip_suffix('`')?.to_string())
        })
        .collect();
    ensure!(!keys.is_empty(), "the table after `{marker}` lists no keys");
    Ok(keys)
}
