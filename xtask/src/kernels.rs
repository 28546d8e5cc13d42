//! The kernel matrix: exact Debian packages (pinned by version and SHA256), their download
//! into the cache, verification on every run, and unpacking.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{apt::PrivateApt, run_cmd, setup};

pub struct Kernel {
    /// Test name: `vm::<name>::<scenario>`.
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// From `apt-cache show` when the version was pinned.
    pub sha256: &'static str,
    /// Why this build is in the matrix.
    pub why: &'static str,
}

/// Which build has which `nf_tcp_log_invalid` was read from `conntrack-trace check` in the
/// guest (2026-11): variadic in 6.1.0-47 (6.1.170-3) and 6.1.0-50 (6.1.176-1); the struct form
/// in 6.1.0-53 (6.1.187-1) and later 6.1 builds, and in every 6.12 build seen (6.12.107 on).
/// Each pick is the newest build of its kind, which stays in the archive longest.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1-variadic",
        package: "linux-image-6.1.0-50-cloud-amd64-unsigned",
        version: "6.1.176-1",
        sha256: "4f217f710203cdfedde21f836bc66a0a4d773752d7fe8e5e13f701f891788945",
        why: "bookworm 6.1.176: nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, ...)",
    },
    Kernel {
        name: "6.1-struct",
        package: "linux-image-6.1.0-56-cloud-amd64-unsigned",
        version: "6.1.192-2",
        sha256: "7ff7fc8da85d313242c20698c6b34542aea447673c7c1975b0d38bd6005100b5",
        why: "bookworm-security 6.1.192: nf_tcp_log_invalid(skb, ct, state, log)",
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        version: "6.12.117-1~deb12u1",
        sha256: "670b2688bcf94c24693f7c7e1fc9776ff2e202ff15553a2614f79415d48a6607",
        why: "bookworm-security 6.12.117: nf_tcp_log_invalid(skb, ct, state, log), tcp_send_reset with reason",
    },
    Kernel {
        name: "5.10",
        package: "linux-image-5.10.0-32-cloud-amd64-unsigned",
        version: "5.10.223-1",
        sha256: "b1fb8d34c26105a2ba1271a3df868a9eea460657df98c77fd08822ef4908c9db",
        why: "bullseye 5.10.223: variadic nf_ct_l4proto_log_invalid, no module BTF",
    },
];

/// The kernel `demo` and `run` boot by default.
pub const DEFAULT: &str = "6.12";

/// Possible values of `--kernel`, for clap.
pub fn names() -> impl Iterator<Item = &'static str> {
    KERNELS.iter().map(|k| k.name)
}

/// The named kernels in matrix order; all of them when `names` is empty.
pub fn select(names: &[String]) -> Result<Vec<&'static Kernel>> {
    if let Some(bad) = names
        .iter()
        .find(|n| !KERNELS.iter().any(|k| k.name == n.as_str()))
    {
        bail!(
            "unknown kernel '{bad}'; known: {}",
            self::names().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(KERNELS
        .iter()
        .filter(|k| names.is_empty() || names.iter().any(|n| n == k.name))
        .collect())
}

pub struct Unpacked {
    /// Where `dpkg -x` put the package.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
    /// `uname -r` of the kernel, the directory name under lib/modules.
    pub release: String,
    /// Per-kernel scratch space (decompressed modules, the initramfs).
    pub work: PathBuf,
}

impl Unpacked {
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

fn cache_dir(kernel: &Kernel) -> PathBuf {
    setup::cache_dir()
        .join("kernels")
        .join(format!("{}_{}", kernel.package, kernel.version))
}

/// Deletes cached kernels the table no longer names (each takes 100-160 MB).
pub fn prune_cache() {
    let keep: Vec<PathBuf> = KERNELS.iter().map(cache_dir).collect();
    let Ok(entries) = fs::read_dir(setup::cache_dir().join("kernels")) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_dir() && !keep.contains(&path) {
            println!(
                "kernels: removing {}, which the kernel table no longer names",
                path.display()
            );
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Downloads (once) and verifies (every time) the kernel package, and unpacks it (once).
pub fn fetch(kernel: &Kernel) -> Result<Unpacked> {
    let dir = cache_dir(kernel);
    let deb = dir.join("kernel.deb");
    if deb.exists() && sha256(&deb)? == kernel.sha256 {
        println!(
            "kernels: {}: {} {} cached, sha256 ok",
            kernel.name, kernel.package, kernel.version
        );
    } else {
        println!(
            "kernels: {}: downloading {} {}",
            kernel.name, kernel.package, kernel.version
        );
        let downloaded =
            PrivateApt::new()?.download(kernel.package, kernel.version, &dir.join("download"))?;
        let got = sha256(&downloaded)?;
        if got != kernel.sha256 {
            bail!(
                "{} has sha256 {got}, expected {}: refusing to use it",
                downloaded.display(),
                kernel.sha256
            );
        }
        fs::rename(&downloaded, &deb)
            .with_context(|| format!("cannot move the .deb to {}", deb.display()))?;
        let _ = fs::remove_dir_all(dir.join("download"));
    }

    let root = dir.join("root");
    let marker = root.join(".unpacked-sha256");
    if fs::read_to_string(&marker).ok().as_deref() != Some(kernel.sha256) {
        let _ = fs::remove_dir_all(&root);
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        fs::write(&marker, kernel.sha256)?;
    }
    let vmlinuz = fs::read_dir(root.join("boot"))
        .with_context(|| format!("{} has no boot/ directory", kernel.package))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{} has no boot/vmlinuz-*", kernel.package))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .expect("checked above")["vmlinuz-".len()..]
        .to_string();
    // One work dir (decompressed modules, initrd) per xtask process: two runs of the same
    // kernel at once must not boot each other's half-written initramfs. Dirs of processes
    // that are gone are removed.
    for e in fs::read_dir(&dir)?.flatten() {
        let name = e.file_name();
        if let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("work-"))
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let _ = fs::remove_dir_all(dir.join("work"));
    let work = dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    Ok(Unpacked {
        root,
        vmlinuz,
        release,
        work,
    })
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("cannot run sha256sum")?;
    if !out.status.success() {
        bail!(
            "sha256sum {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}
