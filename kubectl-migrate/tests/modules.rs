//! The plugin's modules, and the launcher's, form no import cycle: each responsibility can be read, tested and
//! changed from its dependencies up. Checked over the source's `crate::` and `super::` paths
//! (comments and `#[cfg(test)]` modules left out) at two levels:
//! - the crate's top-level modules (`check`, `migrate`, `record`, `exec`, …), every file of a
//!   directory module counted as that module;
//! - the files of each directory module among themselves (`migrate/commit.rs`,
//!   `migrate/transfer.rs`, …); a file may use its parent's `mod.rs`, which orchestrates them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of the library under `src/` (the binary's `main.rs` is another crate), with
/// its source.
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).expect("under src");
            let mut parts: Module = relative
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue,
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            let text = std::fs::read_to_string(&path).expect("read module");
            found.insert(parts, text);
        }
    }
    found
}

/// The source without comments and without its unit tests (by convention at the end).
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `module`'s code refers to through `crate::` and `super::` paths.
fn references(module: &Module, text: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let code = code(text);
    let mut found = BTreeSet::new();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        // Skip a match inside a longer path (`self::super::`, `foo_crate::`).
        if code[..at]
            .chars()
            .last()
            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
        {
            continue;
        }
        let path: String = code[at..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        // `use super::{a, b::C}`: each entry of the group is a path of its own.
        let paths: Vec<String> = match code[at + path.len()..].strip_prefix('{') {
            Some(rest) => group_entries(rest)
                .into_iter()
                .map(|entry| match entry.as_str() {
                    "self" => path.clone(),
                    _ => format!("{path}{entry}"),
                })
                .collect(),
            None => vec![path],
        };
        for path in paths {
            if let Some(target) = resolve(module, &path, known) {
                found.insert(target);
            }
        }
    }
    found
}

/// The entries of a `{…}` group (`rest` starts after its `{`), each up to its first `{` or
/// separator: `a, b::{c, d}, e::F` gives `a`, `b::`, `e::F`.
fn group_entries(rest: &str) -> Vec<String> {
    let mut entries = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in rest.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => entries.push(std::mem::take(&mut current)),
            _ if depth == 0 => current.push(c),
            _ => {}
        }
    }
    entries.push(current);
    entries
        .iter()
        .map(|e| {
            e.trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect::<String>()
        })
        .filter(|e| !e.is_empty())
        .collect()
}

/// The module a `crate::`/`super::` `path` used in `module` names: the longest prefix that is
/// a module (the rest are items in it).
fn resolve(module: &Module, path: &str, known: &BTreeSet<Module>) -> Option<Module> {
    let mut parts = path.split("::").filter(|p| !p.is_empty());
    let mut base: Module = match parts.next() {
        Some("crate") => Vec::new(),
        Some("super") => module[..module.len().saturating_sub(1)].to_vec(),
        _ => return None,
    };
    let mut rest: Vec<&str> = Vec::new();
    for part in parts {
        if part == "super" && rest.is_empty() {
            base.pop();
        } else {
            rest.push(part);
        }
    }
    (0..=rest.len())
        .rev()
        .map(|n| {
            let mut m = base.clone();
            m.extend(rest[..n].iter().map(|s| s.to_string()));
            m
        })
        .find(|m| known.contains(m))
        .filter(|target| target != module)
}

/// A cycle in `edges`, if there is one, as the path around it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied() {
                Some(1) => {
                    let from = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut path = stack[from..].to_vec();
                    path.push(next.clone());
                    return Some(path);
                }
                Some(_) => {}
                None => {
                    if let Some(path) = visit(next, edges, state, stack) {
                        return Some(path);
                    }
                }
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if !state.contains_key(node)
            && let Some(path) = visit(node, edges, &mut state, &mut Vec::new())
        {
            return Some(path);
        }
    }
    None
}

/// The cycles of the module graph at both levels (see the module's comment).
fn cycles(src: &Path) -> Vec<String> {
    let modules = modules(src);
    let known: BTreeSet<Module> = modules.keys().cloned().collect();
    let edges: Vec<(Module, Module)> = modules
        .iter()
        .flat_map(|(m, text)| {
            references(m, text, &known)
                .into_iter()
                .map(move |t| (m.clone(), t))
        })
        .collect();
    let mut found = Vec::new();
    // The top level: each module counted as its first component.
    let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in &edges {
        if let (Some(a), Some(b)) = (from.first(), to.first())
            && a != b
        {
            top.entry(a.clone()).or_default().insert(b.clone());
        }
    }
    if let Some(path) = cycle(&top) {
        found.push(format!("top-level modules: {}", path.join(" → ")));
    }
    // The files of each directory module among themselves.
    let parents: BTreeSet<Module> = known
        .iter()
        .filter(|m| !m.is_empty())
        .map(|m| m[..m.len() - 1].to_vec())
        .collect();
    for parent in parents {
        let depth = parent.len();
        let child =
            |m: &Module| (m.len() > depth && m.starts_with(&parent)).then(|| m[depth].clone());
        let mut siblings: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, to) in &edges {
            if let (Some(a), Some(b)) = (child(from), child(to))
                && a != b
            {
                siblings.entry(a).or_default().insert(b);
            }
        }
        if let Some(path) = cycle(&siblings) {
            found.push(format!(
                "the files of {}: {}",
                if parent.is_empty() {
                    "the crate".to_string()
                } else {
                    parent.join("::")
                },
                path.join(" → ")
            ));
        }
    }
    found
}

#[test]
fn the_plugin_has_no_import_cycle() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = cycles(&src);
    assert!(
        found.is_empty(),
        "import cycles (break them by moving what both sides need into a leaf module):\n{}",
        found.join("\n")
    );
}

/// The same for the launcher: its capability, credential and criu code, and its /proc
/// reading (a leaf), depend one way.
#[test]
fn the_launcher_has_no_import_cycle() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../restore-launcher/src");
    let found = cycles(&src);
    assert!(
        found.is_empty(),
        "import cycles in restore-launcher (break them by moving what both sides need into a leaf module):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_finds_a_cycle_when_there_is_one() {
    let dir = std::env::temp_dir().join(format!("modules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("pipeline")).expect("dir");
    let write = |path: &str, text: &str| std::fs::write(dir.join(path), text).expect("write");
    write("lib.rs", "pub mod a;\npub mod b;\npub mod pipeline;\n");
    write(
        "a.rs",
        "use crate::b::Thing;\n// crate::pipeline::ignored in a comment\n",
    );
    write("b.rs", "pub struct Thing;\n");
    write("pipeline/mod.rs", "mod one;\nmod two;\nuse crate::a;\n");
    write(
        "pipeline/one.rs",
        "use super::two::x;\nuse super::Shared;\n",
    );
    write("pipeline/two.rs", "use super::{Shared, one::y};\n");
    let found = cycles(&dir);
    assert_eq!(
        found,
        vec!["the files of pipeline: one → two → one".to_string()],
        "a file using its parent is no cycle; two siblings using each other are"
    );
    write("b.rs", "use crate::pipeline::Step;\n");
    write("pipeline/mod.rs", "mod one;\nmod two;\nuse crate::a::f;\n");
    let found = cycles(&dir);
    assert!(
        found.contains(&"top-level modules: a → b → pipeline → a".to_string()),
        "{found:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
