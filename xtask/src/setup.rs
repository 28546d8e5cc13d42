//! `cargo xtask setup`: every set-up step, idempotent, each printed with whether it ran.

use std::{
    ffi::OsString,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run_cmd;

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The nightly toolchain's LLVM major version, which bpf-linker's cargo feature must name.
const LLVM_MAJOR: &str = "22";

/// Debian packages the VM tests use on the host (qemu) or copy into the guest, and the
/// release tests' tools (the last three).
const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    // `vm-test --arch arm64`.
    "qemu-system-arm",
    // `dist` cross-builds the static aarch64 binary with Debian's cross toolchain and glibc.
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "busybox-static",
    "iproute2",
    "iptables",
    "conntrack",
    "nftables",
    "xz-utils",
    "zstd",
    "kmod",
    "ca-certificates",
    // A second reader of the OCI image `cargo xtask image` writes (its test).
    "skopeo",
    // `python3 -m venv` for the manifest validator (Debian's python3 ships without it).
    "python3-venv",
    // The metrics test's scraper, and promtool for the exposition and the alert rules.
    "prometheus",
    // The cri-pod VM scenario's container runtime (xtask/src/pods.rs copies them to the guest).
    "containerd",
    "runc",
    "containernetworking-plugins",
];

/// Validates deploy/kubernetes against the Kubernetes OpenAPI schemas it ships (one per
/// release), from PyPI into a private virtualenv.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `$XDG_CACHE_HOME/conntrack-trace` (or `~/.cache/...`): outside `target/` so `cargo clean`
/// keeps bpf-linker (whose RUNPATH points here) and the kernel downloads.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("conntrack-trace")
}

fn bin_dir() -> PathBuf {
    cache_dir().join("bin")
}

/// A `cargo` whose PATH starts with our bin dir: conntrack-trace's build.rs runs aya-build,
/// whose nightly rustc links the kernel programs with `bpf-linker`.
pub fn cargo() -> Command {
    let mut path = OsString::from(bin_dir());
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    let mut cmd = Command::new("cargo");
    cmd.env("PATH", path);
    cmd
}

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

pub fn run() -> Result<()> {
    rust_src()?;
    cross_target()?;
    bpf_linker()?;
    apt_packages()?;
    cargo_fuzz()?;
    // Only the manifest tests need it, and they install it themselves and fail without it:
    // `run` and `demo` do not depend on PyPI being reachable.
    if let Err(e) = kubernetes_validate() {
        println!(
            "setup: {KUBERNETES_VALIDATE}: not installed ({e:#}); the manifest tests will fail"
        );
    }
    Ok(())
}

/// The virtualenv holding kubernetes-validate (and PyYAML, which it depends on); installs it
/// when missing or at another version. Returns the venv's directory.
pub fn kubernetes_validate() -> Result<PathBuf> {
    let venv = cache_dir().join("venv");
    let (name, version) = KUBERNETES_VALIDATE.split_once("==").expect("pinned");
    let have = Command::new(venv.join("bin/kubernetes-validate"))
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref().is_some_and(|v| v.ends_with(version)) {
        println!(
            "setup: {name} {version}: already in {}, skipped",
            venv.display()
        );
        return Ok(venv);
    }
    println!(
        "setup: {name} {version}: installing into {} (PyPI)",
        venv.display()
    );
    if !venv.join("bin/pip").exists() {
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
            "cannot create a Python virtualenv (on Debian: apt-get install python3-venv)",
        )?;
    }
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )?;
    Ok(venv)
}

/// cargo-fuzz, for the fuzzing run in `cargo xtask test` (crates.io, into ~/.cargo/bin).
fn cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref() == Some(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}")) {
        println!("setup: cargo-fuzz {CARGO_FUZZ_VERSION}: already installed, skipped");
        return Ok(());
    }
    println!("setup: cargo-fuzz {CARGO_FUZZ_VERSION}: installing (crates.io)");
    run_cmd(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("cannot run rustup (is it installed and on PATH?)")?;
    if !out.status.success() {
        bail!(
            "`rustup component list --toolchain nightly` failed (is the nightly toolchain installed?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("setup: rust-src for nightly: already installed, skipped");
        return Ok(());
    }
    println!("setup: rust-src for nightly: installing");
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The aarch64 Rust target `dist` cross-builds the release for (the stable toolchain's).
pub const AARCH64_TARGET: &str = "aarch64-unknown-linux-gnu";

fn cross_target() -> Result<()> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("cannot run rustup (is it installed and on PATH?)")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l == AARCH64_TARGET)
    {
        println!("setup: Rust target {AARCH64_TARGET}: already installed, skipped");
        return Ok(());
    }
    println!("setup: Rust target {AARCH64_TARGET}: installing");
    run_cmd(Command::new("rustup").args(["target", "add", AARCH64_TARGET]))
}

fn bpf_linker() -> Result<()> {
    let linker = bin_dir().join("bpf-linker");
    let have = Command::new(&linker)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref() == Some(&format!("bpf-linker {BPF_LINKER_VERSION}")) {
        println!(
            "setup: bpf-linker {BPF_LINKER_VERSION}: already at {}, skipped",
            linker.display()
        );
        return Ok(());
    }
    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION}: building against the nightly toolchain's libLLVM \
         (found {}; takes a few minutes)",
        have.as_deref().unwrap_or("none")
    );
    let prefix = llvm_prefix()?;
    run_cmd(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .arg("--force")
            .arg("--root")
            .arg(cache_dir()),
    )
}

/// Makes `PREFIX/lib` hold `libLLVM.so` and the library's own name, both pointing at the
/// nightly sysroot's libLLVM, which is exactly rustc's LLVM.
fn llvm_prefix() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .output()
        .context("cannot run rustc +nightly")?;
    if !out.status.success() {
        bail!(
            "`rustc +nightly --print sysroot` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sysroot_lib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    let wanted = format!("libLLVM.so.{LLVM_MAJOR}");
    let lib = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot list {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&wanted))
        })
        .with_context(|| {
            format!(
                "no {wanted}* in {}: the nightly toolchain's LLVM is not {LLVM_MAJOR}",
                sysroot_lib.display()
            )
        })?;
    let prefix = cache_dir().join("llvm");
    let dir = prefix.join("lib");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for name in [
        Path::new("libLLVM.so"),
        Path::new(lib.file_name().expect("has a name")),
    ] {
        let link = dir.join(name);
        if fs::read_link(&link).ok().as_deref() == Some(lib.as_path()) {
            continue;
        }
        let _ = fs::remove_file(&link);
        symlink(&lib, &link).with_context(|| format!("cannot create {}", link.display()))?;
    }
    Ok(prefix)
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "setup: Debian packages ({}): all installed, skipped",
            APT_PACKAGES.join(" ")
        );
        return Ok(());
    }
    println!("setup: Debian packages: installing {}", missing.join(" "));
    if !is_root() {
        bail!(
            "installing Debian packages needs root: run `sudo apt-get install {}` or rerun as root",
            missing.join(" ")
        );
    }
    // The emulator comes from where the machine's qemu-utils came from, in a transaction of
    // its own so that nothing else is taken from there.
    let (qemu, rest): (Vec<&str>, Vec<&str>) =
        missing.iter().partition(|p| p.starts_with("qemu-system-"));
    let release = if qemu.is_empty() {
        None
    } else {
        qemu_release()?
    };
    for (packages, release) in [(qemu, release.as_deref()), (rest, None)] {
        if !packages.is_empty() {
            apt_install(&packages, release)?;
        }
    }
    Ok(())
}

/// `apt-get install` of `packages`, from `release` (`-t`) when given.
fn apt_install(packages: &[&str], release: Option<&str>) -> Result<()> {
    // Set-up never removes a package the machine has: --no-remove makes apt-get refuse, and
    // a dry run beforehand names what would have gone.
    let install = |dry_run: bool| {
        let mut cmd = apt_get_install(release);
        cmd.arg("--no-remove");
        if dry_run {
            cmd.arg("--simulate");
        }
        cmd.args(packages);
        cmd
    };
    // Only refresh the package lists when the install cannot proceed without it.
    if !install(true).output().is_ok_and(|o| o.status.success()) {
        println!("setup: apt-get cannot install them as the lists stand; running apt-get update");
        run_cmd(Command::new("apt-get").arg("update"))?;
    }
    refuse_removals(packages, release)?;
    run_cmd(&mut install(false))
}

fn apt_get_install(release: Option<&str>) -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"]);
    if let Some(r) = release {
        cmd.args(["-t", r]);
    }
    cmd
}

/// QEMU's system emulator must come at the version of the machine's `qemu-utils`, or apt
/// replaces one with the other. A machine that carries qemu-utils from backports gets the
/// emulator from there too: the backports source is added (at backports' default priority,
/// so nothing is taken from it unless asked) and its name returned. None when the
/// distribution's own version will do.
fn qemu_release() -> Result<Option<String>> {
    if !dpkg_installed("qemu-utils") {
        return Ok(None);
    }
    let version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "qemu-utils"])
        .output()
        .context("cannot run dpkg-query")?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    if !version.contains("~bpo") {
        return Ok(None);
    }
    let codename = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .context("no VERSION_CODENAME in /etc/os-release")?;
    let release = format!("{codename}-backports");
    let list = Path::new("/etc/apt/sources.list.d/conntrack-trace-backports.list");
    let line = format!(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian {release} main\n"
    );
    if fs::read_to_string(list).ok().as_deref() != Some(line.as_str()) {
        println!(
            "setup: qemu-utils {version} is from {release}: adding that source ({}) for \
             the emulators of the same version",
            list.display()
        );
        fs::write(list, &line).with_context(|| format!("cannot write {}", list.display()))?;
        run_cmd(Command::new("apt-get").arg("update"))?;
    }
    Ok(Some(release))
}

/// Fails naming the installed packages that installing `packages` would remove.
fn refuse_removals(packages: &[&str], release: Option<&str>) -> Result<()> {
    let out = apt_get_install(release)
        .arg("--simulate")
        .args(packages)
        .output()
        .context("cannot run apt-get")?;
    let removed = removals(&String::from_utf8_lossy(&out.stdout));
    if removed.is_empty() {
        return Ok(());
    }
    bail!(
        "installing {} would remove {} (a conflict): set-up removes nothing; remove or replace \
         {} yourself, or install the packages by hand",
        packages.join(" "),
        removed.join(" "),
        if removed.len() == 1 { "it" } else { "them" }
    )
}

/// The packages an `apt-get --simulate` transcript removes (its `Remv NAME [VERSION]` lines).
fn removals(simulation: &str) -> Vec<String> {
    simulation
        .lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout == b"installed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace_root;

    /// Without set-up's bpf-linker, a plain cargo build of the tracer stops with one line
    /// naming `cargo xtask setup`, not aya-build's warnings and a backtrace.
    #[test]
    fn build_without_bpf_linker_says_what_to_run() {
        let empty = std::env::temp_dir().join(format!("xtask-no-cache-{}", std::process::id()));
        fs::create_dir_all(&empty).unwrap();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::env::split_paths(&path).filter(|d| !d.join("bpf-linker").exists()),
        )
        .unwrap();
        // Its own target dir: the `cargo test` running this holds the workspace's.
        let out = Command::new("cargo")
            .current_dir(workspace_root())
            .env("PATH", path)
            .env("XDG_CACHE_HOME", &empty)
            .args(["check", "--quiet", "-p", "conntrack-trace", "--target-dir"])
            .arg(workspace_root().join("target/xtask-test-no-bpf-linker"))
            .output()
            .unwrap();
        fs::remove_dir_all(&empty).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(
            errors,
            [
                "error: conntrack-trace@0.1.0: bpf-linker not found (looked in \
                 ~/.cache/conntrack-trace/bin and PATH): run `cargo xtask setup` once, then \
                 build again",
                "error: build script logged errors"
            ],
            "{stderr}"
        );
        assert!(!stderr.contains("cargo:warning"), "{stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }

    #[test]
    fn removals_are_read_from_a_simulation() {
        let sim = "Reading package lists...\n\
                   Remv qemu-utils [1:7.2+dfsg-7+deb12u18]\n\
                   Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18 Debian:12 [amd64])\n\
                   Remv libfoo1 [1.0]\n\
                   Conf qemu-system-x86 (1:7.2+dfsg-7+deb12u18 Debian:12 [amd64])\n";
        assert_eq!(removals(sim), ["qemu-utils", "libfoo1"]);
        assert!(removals("Inst busybox-static (1:1.35.0-4+b3 Debian:12 [amd64])\n").is_empty());
    }
}
