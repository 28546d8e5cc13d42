//! Builds the kernel programs (conntrack-trace-ebpf) for bpfel-unknown-none with the nightly
//! toolchain, so `cargo build` of the CLI always embeds programs that match its ABI, and
//! records what `--version` reports: the git commit and the embedded object's SHA-256.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use sha2::{Digest as _, Sha256};

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed=../conntrack-trace-common/src");
    // One line saying what to run, instead of aya-build's page of warnings and a backtrace.
    // (cargo::error fails the build; exiting 0 keeps cargo from adding the script's output.)
    if let Err(line) = find_bpf_linker().and_then(|()| nightly_with_rust_src()) {
        println!("cargo::error={line}");
        return ExitCode::SUCCESS;
    }
    let ebpf = aya_build::Package {
        name: "conntrack-trace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../conntrack-trace-ebpf"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()) {
        println!("cargo::error=building the eBPF programs failed: {e:#}");
        return ExitCode::FAILURE;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("conntrack-trace");
    let hash = match std::fs::read(&object) {
        Ok(bytes) => hex(&Sha256::digest(&bytes)),
        // AYA_BUILD_SKIP (e.g. clippy without nightly) builds no object.
        Err(_) => "none".into(),
    };
    println!("cargo:rustc-env=CONNTRACK_TRACE_EBPF_SHA256={hash}");
    println!("cargo:rustc-env=CONNTRACK_TRACE_COMMIT={}", git_commit());
    ExitCode::SUCCESS
}

/// `cargo xtask setup` builds bpf-linker into `~/.cache/conntrack-trace/bin` (the same
/// directory xtask computes); put it first on PATH so a plain `cargo build` finds it.
fn find_bpf_linker() -> Result<(), String> {
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=XDG_CACHE_HOME");
    let cache = env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(cache) = cache {
        dirs.push(cache.join("conntrack-trace/bin"));
    }
    let old = env::var_os("PATH").unwrap_or_default();
    dirs.extend(env::split_paths(&old));
    if !dirs.iter().any(|d| is_executable(&d.join("bpf-linker"))) {
        return Err(
            "bpf-linker not found (looked in ~/.cache/conntrack-trace/bin and PATH): \
             run `cargo xtask setup` once, then build again"
                .into(),
        );
    }
    let path: OsString = env::join_paths(dirs).map_err(|e| format!("PATH: {e}"))?;
    // SAFETY: the build script is single-threaded at this point.
    unsafe { env::set_var("PATH", path) };
    Ok(())
}

/// aya-build compiles the kernel programs with `rustup run nightly` and `-Z build-std=core`.
fn nightly_with_rust_src() -> Result<(), String> {
    let setup = "run `cargo xtask setup` once, then build again";
    let Ok(out) = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
    else {
        // No rustup: aya-build then uses the current toolchain and says so itself.
        return Ok(());
    };
    if !out.status.success() {
        return Err(format!(
            "the nightly toolchain is missing (`rustup toolchain install nightly`), then {setup}"
        ));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Err(format!("nightly has no rust-src: {setup}"));
    }
    Ok(())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// HEAD's commit, or "unknown" outside a git checkout (a source tarball).
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Rebuild when HEAD moves: HEAD itself, the branch it names, and packed refs.
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(p) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name])
            && Path::new(&p).exists()
        {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
