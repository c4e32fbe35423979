//! The krew release: `cargo xtask release` builds the archives and writes the manifest; these
//! tests check the manifest against the archives it names, install an archive the way krew
//! lays plugins out and run it through kubectl, and check that the macOS targets compile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use migrate_tests::{ready_or_skip, workspace};
use sha2::{Digest as _, Sha256};

const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

struct Release {
    dir: PathBuf,
    /// What `cargo xtask release` printed.
    log: String,
}

/// Runs `cargo xtask release --allow-missing` once for this file's tests, whether it succeeds
/// or not: the outcome is kept, so a failing release is reported by every test that needs it
/// without being built again (a `OnceLock` whose initialiser panics runs it again for the
/// next caller: three tests, three release builds on two cores).
fn release() -> &'static Release {
    static RELEASE: OnceLock<Result<Release, String>> = OnceLock::new();
    let outcome = RELEASE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("krew-release-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace())
            .args(["xtask", "release", "--allow-missing", "--out"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cargo xtask release: {e}"))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            return Err(format!("cargo xtask release failed:\n{log}"));
        }
        Ok(Release { dir, log })
    });
    match outcome {
        Ok(release) => release,
        Err(message) => panic!("{message}"),
    }
}

fn yaml(path: &Path) -> serde_yaml::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(Sha256::digest(&bytes))
}

fn platforms(manifest: &serde_yaml::Value) -> Vec<serde_yaml::Value> {
    manifest["spec"]["platforms"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
}

fn os_arch(platform: &serde_yaml::Value) -> (String, String) {
    let labels = &platform["selector"]["matchLabels"];
    (
        labels["os"].as_str().unwrap_or_default().to_string(),
        labels["arch"].as_str().unwrap_or_default().to_string(),
    )
}

/// `tar tvzf` of an archive: (mode string, path) per entry.
fn archive_entries(archive: &Path) -> Vec<(String, String)> {
    let output = Command::new("tar")
        .arg("tvzf")
        .arg(archive)
        .output()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(
        output.status.success(),
        "tar cannot list {}",
        archive.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((fields.first()?.to_string(), fields.last()?.to_string()))
        })
        .collect()
}

#[test]
fn the_template_lists_every_platform_with_the_crates_version() {
    let template = yaml(&workspace().join("krew-manifest.yaml"));
    assert_eq!(
        template["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(template["kind"].as_str(), Some("Plugin"));
    assert_eq!(template["metadata"]["name"].as_str(), Some("migrate"));
    assert_eq!(template["spec"]["version"].as_str(), Some(VERSION));
    let mut listed: Vec<(String, String)> = platforms(&template).iter().map(os_arch).collect();
    listed.sort();
    let wanted = [
        ("darwin", "amd64"),
        ("darwin", "arm64"),
        ("linux", "amd64"),
        ("linux", "arm64"),
    ]
    .map(|(o, a)| (o.to_string(), a.to_string()));
    assert_eq!(listed, wanted);
}

#[test]
fn the_manifest_matches_the_archives_it_names() {
    let release = release();
    let manifest = yaml(&release.dir.join("migrate.yaml"));
    let spec = &manifest["spec"];
    assert_eq!(
        manifest["apiVersion"].as_str(),
        Some("krew.googlecontainertools.github.com/v1alpha2")
    );
    assert_eq!(manifest["kind"].as_str(), Some("Plugin"));
    assert_eq!(manifest["metadata"]["name"].as_str(), Some("migrate"));
    // v-prefixed semver, equal to the crate's version.
    let version = spec["version"].as_str().unwrap_or_default();
    assert_eq!(version, VERSION);
    let core = version.strip_prefix('v').unwrap_or_default();
    let numbers: Vec<&str> = core
        .split(['-', '+'])
        .next()
        .unwrap_or_default()
        .split('.')
        .collect();
    assert!(
        numbers.len() == 3
            && numbers
                .iter()
                .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        "{version} is not semver"
    );
    assert!(
        spec["homepage"]
            .as_str()
            .is_some_and(|h| h.starts_with("https://"))
    );
    let short = spec["shortDescription"].as_str().unwrap_or_default();
    assert!(
        !short.is_empty() && short.len() <= 50,
        "shortDescription: {short:?}"
    );
    assert!(spec["description"].as_str().is_some_and(|d| d.len() > 80));
    let caveats = spec["caveats"].as_str().unwrap_or_default();
    for needle in ["FROM", "restore-launcher", "CHECKPOINT_RESTORE", "SETPCAP"] {
        assert!(
            caveats.contains(needle),
            "the caveats do not mention {needle}"
        );
    }
    let entries = platforms(&manifest);
    let mut seen = Vec::new();
    for platform in &entries {
        let (os, arch) = os_arch(platform);
        assert!(
            ["linux", "darwin"].contains(&os.as_str()),
            "selector os {os:?}"
        );
        assert!(
            ["amd64", "arm64"].contains(&arch.as_str()),
            "selector arch {arch:?}"
        );
        assert!(
            !seen.contains(&(os.clone(), arch.clone())),
            "{os}/{arch} twice"
        );
        seen.push((os.clone(), arch.clone()));
        let uri = platform["uri"].as_str().unwrap_or_default();
        assert!(
            uri.starts_with("https://") && uri.contains(VERSION),
            "uri {uri}"
        );
        let name = uri.rsplit('/').next().unwrap_or_default();
        assert_eq!(
            name,
            format!("kubectl-migrate_{VERSION}_{os}_{arch}.tar.gz")
        );
        let archive = release.dir.join(name);
        assert_eq!(
            platform["sha256"].as_str().unwrap_or_default(),
            sha256(&archive),
            "sha256 of {name}"
        );
        let bin = platform["bin"].as_str().unwrap_or_default();
        assert_eq!(bin, "kubectl-migrate");
        let listing = archive_entries(&archive);
        let (mode, _) = listing
            .iter()
            .find(|(_, path)| path == bin)
            .unwrap_or_else(|| panic!("{name} has no {bin}: {listing:?}"));
        assert!(
            mode.starts_with("-rwx") && mode.ends_with('x'),
            "{bin} in {name} is not an executable file: {mode}"
        );
        assert!(
            listing.iter().any(|(_, path)| path == "LICENSE"),
            "{name} has no LICENSE"
        );
    }
    // What this machine must build: the linux/amd64 archive, and linux/arm64 when rustup has
    // (or can download) the aarch64 musl standard library.
    assert!(
        seen.contains(&("linux".to_string(), "amd64".to_string())),
        "no linux/amd64 archive:\n{}",
        release.log
    );
    if part_present(
        "the linux/arm64 archive",
        seen.contains(&("linux".to_string(), "arm64".to_string())),
        &release_line("linux/arm64"),
    ) {
        let arm = release
            .dir
            .join(format!("kubectl-migrate_{VERSION}_linux_arm64.tar.gz"));
        let unpacked = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let status = Command::new("tar")
            .arg("xzf")
            .arg(&arm)
            .arg("-C")
            .arg(unpacked.path())
            .status()
            .unwrap_or_else(|e| panic!("tar: {e}"));
        assert!(status.success());
        let file = Command::new("file")
            .arg(unpacked.path().join("kubectl-migrate"))
            .output()
            .unwrap_or_else(|e| panic!("file: {e}"));
        let kind = String::from_utf8_lossy(&file.stdout);
        assert!(
            kind.contains("aarch64") && kind.contains("statically linked"),
            "the linux/arm64 binary is {kind}"
        );
    }
}

/// The line `cargo xtask release` printed about `platform` ("linux/arm64").
fn release_line(platform: &str) -> String {
    release()
        .log
        .lines()
        .find(|l| l.contains(platform))
        .unwrap_or_default()
        .to_string()
}

/// Whether a release part is there to check. A Rust standard library rustup does not have
/// (CI machines reach no rustup server) is a loud skip; any other absence is a failure in CI
/// (what `.ci/run` installs) and a loud skip elsewhere.
fn part_present(what: &str, present: bool, line: &str) -> bool {
    if present {
        return true;
    }
    if line.contains("rustup target add") {
        eprintln!("SKIPPED {what}: this machine has no such Rust target ({line})");
        return false;
    }
    ready_or_skip(what, &[format!("{what} ({line})")])
}

#[test]
fn the_plugin_compiles_for_macos() {
    for arch in ["amd64", "arm64"] {
        let line = release_line(&format!("darwin/{arch}"));
        assert!(!line.contains("does not compile"), "darwin/{arch}: {line}");
        part_present(
            &format!("darwin/{arch} compiled"),
            line.contains("compiles (cargo check)"),
            &line,
        );
    }
}

#[test]
fn a_krew_style_install_runs_as_a_kubectl_plugin() {
    let kubectl = migrate_tests::apiserver::kubectl();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no release for {other}"),
    };
    if !ready_or_skip(
        "a_krew_style_install_runs_as_a_kubectl_plugin",
        &if kubectl.is_file() {
            vec![]
        } else {
            vec![format!(
                "kubectl at {} (cargo xtask k8s)",
                kubectl.display()
            )]
        },
    ) {
        return;
    }
    let release = release();
    let archive = release
        .dir
        .join(format!("kubectl-migrate_{VERSION}_linux_{arch}.tar.gz"));
    // krew: unpack into store/PLUGIN/VERSION, link the manifest's `bin` into bin/ as
    // kubectl-PLUGIN, and the user puts bin/ on PATH.
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let store = root.path().join("store/migrate").join(VERSION);
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&store).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(&bin).unwrap_or_else(|e| panic!("{e}"));
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&store)
        .status()
        .unwrap_or_else(|e| panic!("tar: {e}"));
    assert!(status.success(), "cannot unpack {}", archive.display());
    std::os::unix::fs::symlink(store.join("kubectl-migrate"), bin.join("kubectl-migrate"))
        .unwrap_or_else(|e| panic!("{e}"));
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let version = Command::new(&kubectl)
        .args(["migrate", "--version"])
        .env("PATH", &path)
        .env("HOME", root.path())
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    let printed = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.status.success() && printed.contains(env!("CARGO_PKG_VERSION")),
        "kubectl migrate --version printed {printed:?} {}",
        String::from_utf8_lossy(&version.stderr)
    );
    let list = Command::new(&kubectl)
        .args(["plugin", "list"])
        .env("PATH", &path)
        .env("HOME", root.path())
        .output()
        .unwrap_or_else(|e| panic!("kubectl: {e}"));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains(&bin.join("kubectl-migrate").display().to_string()),
        "kubectl plugin list: {listed}"
    );
}
