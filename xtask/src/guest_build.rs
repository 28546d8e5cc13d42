//! Static builds of the binaries that run in the guest and the release: the tracer and the
//! scenario runner, for the host's architecture or cross-built for another.

use std::{fs, path::Path, path::PathBuf};

use anyhow::{Context, Result, bail};

use crate::{arch::Arch, run_cmd, setup, workspace_root};

pub struct GuestBins {
    pub tracer: PathBuf,
    pub scenarios: PathBuf,
}

/// The host's (x86_64) build.
pub fn build() -> Result<GuestBins> {
    build_for(Arch::X86_64)
}

pub fn build_for(arch: Arch) -> Result<GuestBins> {
    let target = arch.rust_target();
    println!("build: conntrack-trace and ct-scenarios for {target}, static, release");
    // An explicit --target keeps crt-static away from build scripts and proc macros, and the
    // eBPF build inside build.rs sets its own rustflags (aya-build compiles the programs for
    // the target's architecture).
    let mut cargo = setup::cargo();
    cargo
        .current_dir(workspace_root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--target", target])
        .args(["-p", "conntrack-trace", "-p", "conntrack-trace-tests"]);
    arch.cross_toolchain(&mut cargo);
    run_cmd(&mut cargo)?;
    let dir = workspace_root().join("target").join(target).join("release");
    let bins = GuestBins {
        tracer: dir.join("conntrack-trace"),
        scenarios: dir.join("ct-scenarios"),
    };
    for bin in [&bins.tracer, &bins.scenarios] {
        ensure_static(bin, arch)?;
    }
    Ok(bins)
}

/// The guest (and a node) has no libc for our binaries, so a dynamic one would fail there
/// obscurely; a cross build for the wrong machine would fail to even start.
pub fn ensure_static(bin: &Path, arch: Arch) -> Result<()> {
    crate::dist::ensure_no_interpreter(bin)?;
    let elf = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let machine = elf
        .get(18..20)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if machine != arch.elf_machine() {
        bail!(
            "{} is built for ELF machine {machine}, not {} ({})",
            bin.display(),
            arch.elf_machine(),
            arch.name()
        );
    }
    Ok(())
}
