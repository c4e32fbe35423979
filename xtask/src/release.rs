//! `cargo xtask release [--out DIR] [--allow-missing]`: what krew installs.
//!
//! Builds `kubectl-migrate` for every platform of `krew-manifest.yaml` that this machine can
//! build, packs each as `kubectl-migrate_vVERSION_OS_ARCH.tar.gz` (the binary and LICENSE, at
//! the archive's root, where the manifest's `bin` points), and writes the manifest into DIR
//! with each archive's sha256 (DIR/migrate.yaml, the file krew-index takes).
//!
//! Linux archives are static musl binaries, built here (arm64 with Debian's
//! gcc-aarch64-linux-gnu). macOS archives link against Apple's SDK (the Security framework,
//! for the system's trust store), so they are built on macOS by the same command and copied
//! into DIR before the manifest is written; `--allow-missing` writes a manifest of the
//! platforms present instead, and says which are left out. Here, they are still compiled
//! (`cargo check`, with zig from PyPI's `ziglang` as the C compiler for ring, which has the
//! macOS headers), so a Linux-only dependency cannot creep into the plugin unnoticed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};

use migrate_tests::apiserver::which;

use crate::{cargo, run, target_dir, workspace_root};

/// A platform of the manifest and the Rust target that builds it.
#[derive(Debug, Clone, Copy)]
pub struct Platform {
    pub os: &'static str,
    pub arch: &'static str,
    pub target: &'static str,
}

pub const PLATFORMS: [Platform; 4] = [
    Platform {
        os: "linux",
        arch: "amd64",
        target: "x86_64-unknown-linux-musl",
    },
    Platform {
        os: "linux",
        arch: "arm64",
        target: "aarch64-unknown-linux-musl",
    },
    Platform {
        os: "darwin",
        arch: "amd64",
        target: "x86_64-apple-darwin",
    },
    Platform {
        os: "darwin",
        arch: "arm64",
        target: "aarch64-apple-darwin",
    },
];

/// The crate's version as krew spells it (`v0.1.0`).
pub fn version() -> String {
    format!("v{}", env!("CARGO_PKG_VERSION"))
}

impl Platform {
    pub fn archive_name(&self) -> String {
        format!(
            "kubectl-migrate_{}_{}_{}.tar.gz",
            version(),
            self.os,
            self.arch
        )
    }

    /// Why this machine cannot build the platform, if it cannot.
    fn cannot_build_here(&self) -> Option<String> {
        let host = std::env::consts::OS;
        let host = if host == "macos" { "darwin" } else { host };
        if self.os != host {
            return Some(format!(
                "{}/{} is built on {}: run `cargo xtask release --out DIR` there and copy {} into DIR",
                self.os,
                self.arch,
                self.os,
                self.archive_name()
            ));
        }
        if !rustup_has(self.target) {
            return Some(format!("`rustup target add {}` first", self.target));
        }
        if let Some(cc) = self.cross_compiler()
            && which(cc).is_none()
        {
            return Some(format!(
                "{cc} is missing (Debian: apt-get install gcc-aarch64-linux-gnu)"
            ));
        }
        None
    }

    /// The C compiler and linker for a cross build from Linux (ring has C and assembly).
    fn cross_compiler(&self) -> Option<&'static str> {
        (self.os == "linux" && self.arch == "arm64" && std::env::consts::ARCH != "aarch64")
            .then_some("aarch64-linux-gnu-gcc")
    }

    /// Builds the plugin for this platform; returns the binary.
    fn build(&self) -> Result<PathBuf> {
        let mut build = cargo();
        build.args([
            "build",
            "--release",
            "--locked",
            "--package",
            "kubectl-migrate",
            "--target",
            self.target,
        ]);
        if let Some(cc) = self.cross_compiler() {
            let env_target = self.target.replace('-', "_");
            build.env(format!("CC_{env_target}"), cc).env(
                format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()),
                cc,
            );
        }
        run(&mut build).with_context(|| format!("building kubectl-migrate for {}", self.target))?;
        Ok(target_dir()
            .join(self.target)
            .join("release")
            .join("kubectl-migrate"))
    }
}

/// Whether rustup has the standard library for `target`.
fn rustup_has(target: &str) -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == target)
        })
}

/// `python3 -m ziglang` (PyPI's `ziglang`) when installed.
fn zig_available() -> bool {
    Command::new("python3")
        .args(["-m", "ziglang", "version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A C compiler for `platform` made of zig: cc-rs passes clang's `--target=` spelling, which
/// zig replaces with its own `-target`.
fn zig_cc(platform: &Platform) -> Result<PathBuf> {
    let zig_target = match (platform.os, platform.arch) {
        ("darwin", "arm64") => "aarch64-macos",
        ("darwin", "amd64") => "x86_64-macos",
        (os, arch) => bail!("no zig target for {os}/{arch}"),
    };
    let dir = target_dir().join("zig-cc");
    fs::create_dir_all(&dir)?;
    let path = dir.join(platform.target);
    fs::write(
        &path,
        format!(
            "#!/bin/sh\n# cargo xtask release: zig as the C compiler for {target}\n\
             for a in \"$@\"; do shift; case \"$a\" in --target=*|-mmacosx-version-min=*) ;; \
             *) set -- \"$@\" \"$a\";; esac; done\n\
             exec python3 -m ziglang cc -target {zig_target} \"$@\"\n",
            target = platform.target
        ),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Compiles the plugin for a platform whose archive cannot be linked here.
fn check_compiles(platform: &Platform) -> Result<String> {
    if !rustup_has(platform.target) {
        return Ok(format!(
            "not compiled: `rustup target add {}` first",
            platform.target
        ));
    }
    if !zig_available() {
        return Ok("not compiled: needs zig (`python3 -m pip install ziglang`)".into());
    }
    let cc = zig_cc(platform)?;
    run(cargo()
        .args([
            "check",
            "--locked",
            "--package",
            "kubectl-migrate",
            "--target",
        ])
        .arg(platform.target)
        .env(format!("CC_{}", platform.target.replace('-', "_")), &cc))
    .with_context(|| {
        format!(
            "kubectl-migrate does not compile for {}: a dependency that only builds on Linux?",
            platform.target
        )
    })?;
    Ok("compiles (cargo check)".into())
}

/// Packs `binary` and LICENSE into `archive`, reproducibly (sorted, owner 0, mtime 0).
fn pack(binary: &Path, archive: &Path) -> Result<()> {
    let staging = archive.with_extension("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    fs::copy(binary, staging.join("kubectl-migrate"))?;
    fs::copy(workspace_root().join("LICENSE"), staging.join("LICENSE"))?;
    run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-I",
            "gzip -n -9",
            "-cf",
        ])
        .arg(archive)
        .arg("-C")
        .arg(&staging)
        .args(["kubectl-migrate", "LICENSE"]))?;
    fs::remove_dir_all(&staging)?;
    Ok(())
}

pub fn sha256_of(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The manifest template with each platform's placeholder filled from the archives in `dir`;
/// platforms without an archive are removed when `allow_missing`, else an error.
pub fn render_manifest(dir: &Path, allow_missing: bool) -> Result<(String, Vec<String>)> {
    let mut text = fs::read_to_string(workspace_root().join("krew-manifest.yaml"))?;
    let mut missing = Vec::new();
    for platform in PLATFORMS {
        let placeholder = format!("{{{{sha256 {}/{}}}}}", platform.os, platform.arch);
        let archive = dir.join(platform.archive_name());
        if archive.is_file() {
            text = text.replace(&placeholder, &sha256_of(&archive)?);
        } else {
            missing.push(format!("{}/{}", platform.os, platform.arch));
        }
    }
    if !missing.is_empty() {
        if !allow_missing {
            bail!(
                "no archive for {} in {}: build them on their OS (`cargo xtask release --out DIR`) \
                 and copy them in, or pass --allow-missing to leave them out",
                missing.join(", "),
                dir.display()
            );
        }
        // Drop the platform entries still holding a placeholder.
        let mut manifest: serde_yaml::Value = serde_yaml::from_str(&text)?;
        if let Some(platforms) = manifest["spec"]["platforms"].as_sequence_mut() {
            platforms.retain(|p| {
                !p["sha256"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("{{sha256"))
            });
        }
        text = format!(
            "# Left out (no archive built): {}\n{}",
            missing.join(", "),
            serde_yaml::to_string(&manifest)?
        );
    }
    Ok((text, missing))
}

pub fn run_task(args: &[String]) -> Result<()> {
    let mut out = target_dir().join("release-dist");
    let mut allow_missing = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "--allow-missing" => allow_missing = true,
            other => bail!("usage: cargo xtask release [--out DIR] [--allow-missing] ({other}?)"),
        }
    }
    fs::create_dir_all(&out)?;
    for platform in PLATFORMS {
        let archive = out.join(platform.archive_name());
        match platform.cannot_build_here() {
            None => {
                let binary = platform.build()?;
                pack(&binary, &archive)?;
                println!("release: built {}", archive.display());
            }
            Some(why) if archive.is_file() => {
                println!("release: using {} ({why})", archive.display());
            }
            Some(why) if platform.os == "darwin" => println!(
                "release: {}/{} {}; not building its archive: {why}",
                platform.os,
                platform.arch,
                check_compiles(&platform)?
            ),
            Some(why) => println!(
                "release: not building {}/{}: {why}",
                platform.os, platform.arch
            ),
        }
    }
    let (manifest, missing) = render_manifest(&out, allow_missing)?;
    let path = out.join("migrate.yaml");
    fs::write(&path, manifest)?;
    if missing.is_empty() {
        println!("release: manifest {} (all platforms)", path.display());
    } else {
        eprintln!(
            "release: WARNING: manifest {} leaves out {} (no archive); not for krew-index as is",
            path.display(),
            missing.join(", ")
        );
    }
    Ok(())
}
