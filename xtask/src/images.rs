//! `cargo xtask images`: builds the images of `images/` without Docker or a registry, the same
//! steps as their Dockerfiles: a debootstrapped trixie root (the `debian:trixie-slim` stand-in)
//! with CRIU, turned into OCI image layers with umoci, one layer per Dockerfile step that adds
//! files. The result is one OCI image-layout archive that `ctr images import` takes, holding:
//!
//! - `localhost/restore-launcher:VERSION`: the base image (trixie, CRIU >= 4.2, the launcher as
//!   ENTRYPOINT);
//! - `localhost/migrate-counter:VERSION`, `…-web`, `…-sysv`, `…-postgres` and `…-redis`:
//!   the examples (images/examples), each the base's layers plus its own;
//! - `localhost/migrate-controller:VERSION`: the in-cluster controller (`config/controller/`),
//!   the base's layers plus the static `kubectl-migrate`, run as an unprivileged user;
//! - `localhost/pause:3.10`: the pod sandbox image, Debian's static catatonit in pause mode
//!   (`-P`), since the usual pause image comes from a registry.
//!
//! Needs root, debootstrap, umoci and catatonit. The base root filesystem is cached; the
//! images are rebuilt when the launcher or a file under `images/` changes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use migrate_tests::cluster::{IMAGE_VERSION, PAUSE_IMAGE, images_archive, images_dir};
use sha2::{Digest as _, Sha256};

use crate::{is_root, run, static_launcher, static_plugin, workspace_root};

/// Bump when the base root filesystem's recipe changes.
const BASE_ROOTFS: &str = "rootfs-trixie-criu42-v1";

/// The base image's PATH, as `debian:trixie-slim` sets it. A container's processes -- and
/// `kubectl exec POD -- restore-launcher …`, which runc resolves with the container's own
/// environment -- find their commands through it; without it the exec fails with
/// `executable file not found in $PATH`.
const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The controller image's user (nobody's usual number in distroless images): no root, no
/// capabilities.
const CONTROLLER_USER: &str = "65532:65532";

/// Builds the images archive if the launcher or `images/` changed since the last build, and
/// returns its path.
pub(crate) fn build() -> Result<PathBuf> {
    let launcher = static_launcher()?;
    let plugin = static_plugin()?;
    let archive = images_archive();
    let stamp_path = archive.with_extension("stamp");
    let stamp = fingerprint(&[&launcher, &plugin])?;
    if archive.exists() && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
        return Ok(archive);
    }
    if !is_root() {
        bail!(
            "building the images needs root (debootstrap, chroot, file ownership): sudo -E cargo xtask images"
        );
    }
    for tool in ["debootstrap", "umoci", "catatonit"] {
        if which(tool).is_none() {
            bail!("{tool} is missing: apt-get install debootstrap umoci catatonit");
        }
    }
    let dir = images_dir();
    std::fs::create_dir_all(&dir)?;
    let rootfs = base_rootfs(&dir)?;
    let layout = dir.join("oci");
    let _ = std::fs::remove_dir_all(&layout);
    umoci(&["init", "--layout"], &[&layout])?;
    let image = |tag: &str| format!("{}:{tag}", layout.display());
    let bundle = dir.join("bundle");
    let examples = workspace_root().join("images/examples");

    eprintln!("xtask: images: pause (catatonit -P)");
    new_image(&image("pause"), &bundle, |root| {
        copy(
            Path::new("/usr/bin/catatonit"),
            &root.join("catatonit"),
            0o755,
        )
    })?;
    umoci_config(
        &image("pause"),
        &["--config.entrypoint=/catatonit", "--config.entrypoint=-P"],
    )?;

    eprintln!("xtask: images: base (trixie, CRIU, restore-launcher)");
    new_image(&image("base"), &bundle, |root| {
        run(Command::new("cp").arg("-a").arg(rootfs.join(".")).arg(root))?;
        let installed = root.join("usr/local/bin/restore-launcher");
        copy(&launcher, &installed, 0o755)?;
        set_launcher_file_capabilities(&installed)
    })?;
    umoci_config(
        &image("base"),
        &[
            "--config.entrypoint=/usr/local/bin/restore-launcher",
            "--config.entrypoint=--",
            &format!("--config.env={IMAGE_PATH}"),
        ],
    )?;

    eprintln!("xtask: images: counter (python3, counter.py)");
    derived_image(
        &image("base"),
        &image("counter"),
        &bundle,
        &["python3-minimal"],
        |root| {
            copy(
                &examples.join("counter/counter.py"),
                &root.join("app/counter.py"),
                0o644,
            )
        },
    )?;
    umoci_config(
        &image("counter"),
        &[
            "--config.cmd=python3",
            "--config.cmd=-u",
            "--config.cmd=/app/counter.py",
        ],
    )?;

    eprintln!("xtask: images: web (nginx, writer.sh)");
    derived_image(&image("base"), &image("web"), &bundle, &["nginx"], |root| {
        copy(
            &examples.join("web/nginx.conf"),
            &root.join("etc/nginx/nginx.conf"),
            0o644,
        )?;
        copy(
            &examples.join("web/writer.sh"),
            &root.join("app/writer.sh"),
            0o755,
        )
    })?;
    umoci_config(&image("web"), &["--config.cmd=nginx"])?;

    eprintln!("xtask: images: sysv (perl, sysv.pl)");
    derived_image(&image("base"), &image("sysv"), &bundle, &[], |root| {
        copy(
            &examples.join("sysv/sysv.pl"),
            &root.join("app/sysv.pl"),
            0o644,
        )
    })?;
    umoci_config(
        &image("sysv"),
        &["--config.cmd=perl", "--config.cmd=/app/sysv.pl"],
    )?;

    eprintln!("xtask: images: postgres (Debian's PostgreSQL 17, run as postgres, uid 999)");
    derived_image_with(
        &image("base"),
        &image("postgres"),
        &bundle,
        &[
            &["groupadd", "-r", "postgres", "--gid=999"],
            &[
                "useradd",
                "-r",
                "-g",
                "postgres",
                "--uid=999",
                "--home-dir=/var/lib/postgresql",
                "--shell=/bin/bash",
                "postgres",
            ],
            &[
                "install",
                "-d",
                "-o",
                "postgres",
                "-g",
                "postgres",
                "/var/lib/postgresql",
            ],
            // as the official image: no cluster made at package install (start.sh makes one)
            &["install", "-d", "/etc/postgresql-common"],
            &[
                "sh",
                "-c",
                "echo 'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf",
            ],
        ],
        &["postgresql-17", "postgresql-client-17"],
        &[&[
            "install",
            "-d",
            "-o",
            "postgres",
            "-g",
            "postgres",
            "-m",
            "2775",
            "/var/run/postgresql",
        ]],
        |root| {
            copy(
                &examples.join("postgres/start.sh"),
                &root.join("app/start.sh"),
                0o755,
            )
        },
    )?;
    umoci_config(
        &image("postgres"),
        &[
            "--config.cmd=/app/start.sh",
            "--config.env=RESTORE_LAUNCHER_USER=postgres",
            "--config.env=PGDATA=/var/lib/postgresql/data/pgdata",
            &format!("--config.env={IMAGE_PATH}:/usr/lib/postgresql/17/bin"),
        ],
    )?;

    eprintln!("xtask: images: redis (Debian's redis-server, run as redis)");
    derived_image(
        &image("base"),
        &image("redis"),
        &bundle,
        &["redis-server"],
        |root| {
            copy(
                &examples.join("redis/redis.conf"),
                &root.join("etc/redis/migrate.conf"),
                0o644,
            )
        },
    )?;
    umoci_config(
        &image("redis"),
        &[
            "--config.cmd=redis-server",
            "--config.cmd=/etc/redis/migrate.conf",
            "--config.env=RESTORE_LAUNCHER_USER=redis",
        ],
    )?;
    eprintln!("xtask: images: controller (the static kubectl-migrate, unprivileged)");
    derived_image(&image("base"), &image("controller"), &bundle, &[], |root| {
        copy(&plugin, &root.join("usr/local/bin/kubectl-migrate"), 0o755)
    })?;
    umoci_config(
        &image("controller"),
        &[
            "--config.cmd=kubectl-migrate",
            "--config.cmd=controller",
            &format!("--config.user={CONTROLLER_USER}"),
        ],
    )?;
    let _ = std::fs::remove_dir_all(&bundle);

    name_images(&layout)?;
    let partial = archive.with_extension("partial");
    run(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&partial)
        .arg("."))?;
    std::fs::rename(&partial, &archive)?;
    std::fs::write(&stamp_path, &stamp)?;
    eprintln!("xtask: images: {}", archive.display());
    Ok(archive)
}

/// A hash over everything that goes into the images but the cached root filesystem.
fn fingerprint(binaries: &[&Path]) -> Result<String> {
    let mut hash = Sha256::new();
    hash.update(BASE_ROOTFS);
    hash.update(IMAGE_PATH);
    for binary in binaries {
        hash.update(std::fs::read(binary)?);
    }
    let root = workspace_root().join("images");
    let mut files = Vec::new();
    let mut pending = vec![root];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    for file in files {
        hash.update(file.to_string_lossy().as_bytes());
        hash.update(std::fs::read(&file)?);
    }
    Ok(format!("{:x}", hash.finalize()))
}

/// The trixie minbase root with CRIU >= 4.2 from forky (see images/base/Dockerfile for why),
/// built once and cached.
fn base_rootfs(dir: &Path) -> Result<PathBuf> {
    let path = dir.join(BASE_ROOTFS);
    if path.join("usr/sbin/criu").exists() {
        return Ok(path);
    }
    let partial = dir.join(format!(".partial-{BASE_ROOTFS}"));
    let _ = std::fs::remove_dir_all(&partial);
    eprintln!(
        "xtask: images: debootstrap trixie minbase into {} (about 30 s)",
        path.display()
    );
    run(Command::new("debootstrap")
        .args(["--variant=minbase", "trixie"])
        .arg(&partial))
    .context("debootstrap trixie")?;
    // The forky source is derived from the trixie one debootstrap wrote, as the Dockerfile
    // derives it from the image's; pinned low so only what `-t forky` asks for comes from it.
    let sources = std::fs::read_to_string(partial.join("etc/apt/sources.list"))?;
    let forky = sources.replace(" trixie ", " forky ");
    std::fs::write(partial.join("etc/apt/sources.list.d/forky.list"), forky)?;
    std::fs::write(
        partial.join("etc/apt/preferences.d/forky"),
        "Package: *\nPin: release n=forky\nPin-Priority: 100\n",
    )?;
    apt_install(&partial, &["-t", "forky", "criu"])?;
    std::fs::remove_file(partial.join("etc/apt/sources.list.d/forky.list"))?;
    std::fs::remove_file(partial.join("etc/apt/preferences.d/forky"))?;
    apt_clean(&partial)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// `apt-get update && apt-get install --no-install-recommends ARGS` inside `root` (a chroot
/// with the host's resolv.conf and services kept from starting, as in a Docker build).
fn apt_install(root: &Path, args: &[&str]) -> Result<()> {
    std::fs::copy("/etc/resolv.conf", root.join("etc/resolv.conf"))
        .context("copy /etc/resolv.conf into the image root")?;
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
    set_mode(&policy, 0o755)?;
    // The archive this machine reaches is a fixed snapshot: its testing suite's Release file
    // may be past its Valid-Until date, which is harmless for a build.
    let apt = ["-q", "-o", "Acquire::Check-Valid-Until=false"];
    let result = run(Command::new("chroot")
        .arg(root)
        .arg("apt-get")
        .args(apt)
        .arg("update"))
    .and_then(|()| {
        run(Command::new("chroot")
            .arg(root)
            .arg("apt-get")
            .args(apt)
            .args(["install", "-y", "--no-install-recommends"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    });
    std::fs::remove_file(&policy)?;
    result.with_context(|| format!("apt-get install {} in {}", args.join(" "), root.display()))
}

/// Drops what a Dockerfile's `rm -rf /var/lib/apt/lists/*` drops, and the build's resolv.conf.
fn apt_clean(root: &Path) -> Result<()> {
    run(Command::new("chroot").arg(root).args(["apt-get", "clean"]))?;
    let lists = root.join("var/lib/apt/lists");
    for entry in std::fs::read_dir(&lists)? {
        let path = entry?.path();
        if path.is_file() {
            std::fs::remove_file(path)?;
        }
    }
    let _ = std::fs::remove_file(root.join("etc/resolv.conf"));
    Ok(())
}

/// A new image with one layer: whatever `fill` puts into the empty root.
fn new_image(image: &str, bundle: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    umoci(&["new", "--image", image], &[])?;
    let _ = std::fs::remove_dir_all(bundle);
    umoci(&["unpack", "--image", image], &[bundle])?;
    fill(&bundle.join("rootfs"))?;
    umoci(&["repack", "--image", image], &[bundle])?;
    Ok(())
}

/// `FROM base` + `RUN apt-get install PACKAGES` + `COPY`s: one new layer on the base's.
fn derived_image(
    base: &str,
    image: &str,
    bundle: &Path,
    packages: &[&str],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    derived_image_with(base, image, bundle, &[], packages, &[], fill)
}

/// [`derived_image`] with commands run in the root before (`RUN groupadd …`) and after
/// (`RUN install -d …`) the packages, as a Dockerfile's `RUN` steps would.
fn derived_image_with(
    base: &str,
    image: &str,
    bundle: &Path,
    before: &[&[&str]],
    packages: &[&str],
    after: &[&[&str]],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let _ = std::fs::remove_dir_all(bundle);
    umoci(&["unpack", "--image", base], &[bundle])?;
    let root = bundle.join("rootfs");
    for command in before {
        run(Command::new("chroot").arg(&root).args(*command))?;
    }
    if !packages.is_empty() {
        apt_install(&root, packages)?;
        apt_clean(&root)?;
    }
    for command in after {
        run(Command::new("chroot").arg(&root).args(*command))?;
    }
    std::fs::create_dir_all(root.join("app"))?;
    fill(&root)?;
    umoci(&["repack", "--image", image], &[bundle])?;
    Ok(())
}

/// `setcap cap_setpcap,cap_sys_admin,cap_checkpoint_restore+p` without libcap's tools: the
/// `security.capability` xattr in its version 2 layout (linux/capability.h, `vfs_cap_data`:
/// magic and flags, then permitted/inheritable pairs for capabilities 0-31 and 32-63,
/// little-endian). Permitted only, no effective bit: the launcher raises them itself, and a
/// pod that grants fewer still starts (restore-launcher/src/caps.rs says why non-root
/// launchers need this). umoci records the xattr in the layer; containerd applies it.
fn set_launcher_file_capabilities(path: &Path) -> Result<()> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const CAP_SETPCAP: u32 = 8;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_CHECKPOINT_RESTORE: u32 = 40;
    let low = (1u32 << CAP_SETPCAP) | (1u32 << CAP_SYS_ADMIN);
    let high = 1u32 << (CAP_CHECKPOINT_RESTORE - 32);
    let mut value = Vec::with_capacity(20);
    for word in [VFS_CAP_REVISION_2, low, 0, high, 0] {
        value.extend_from_slice(&word.to_le_bytes());
    }
    xattr::set(path, "security.capability", &value)
        .with_context(|| format!("set file capabilities on {}", path.display()))
}

fn umoci_config(image: &str, args: &[&str]) -> Result<()> {
    let mut all = vec![
        "config",
        "--image",
        image,
        "--os=linux",
        "--architecture=amd64",
    ];
    all.extend_from_slice(args);
    umoci(&all, &[])
}

fn umoci(args: &[&str], paths: &[&Path]) -> Result<()> {
    run(Command::new("umoci").args(args).args(paths)).context("umoci")
}

/// Gives every manifest in the layout's index its full image name, which `ctr images import`
/// uses as is (umoci's tags are only the part after the colon).
fn name_images(layout: &Path) -> Result<()> {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path)?)?;
    for manifest in index["manifests"]
        .as_array_mut()
        .context("index.json has no manifests")?
    {
        let tag = manifest["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .context("a manifest without a tag")?
            .to_string();
        let name = match tag.as_str() {
            "pause" => PAUSE_IMAGE.to_string(),
            "base" => format!("localhost/restore-launcher:{IMAGE_VERSION}"),
            other => format!("localhost/migrate-{other}:{IMAGE_VERSION}"),
        };
        manifest["annotations"]["io.containerd.image.name"] = name.into();
    }
    std::fs::write(&index_path, serde_json::to_vec(&index)?)?;
    Ok(())
}

fn copy(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}
