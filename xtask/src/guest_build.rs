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
    println!("build: conntrack-trace and ct-scenarios for {target}, static (not PIE), release");
    // An explicit --target keeps these flags away from build scripts and proc macros, and the
    // eBPF build inside build.rs sets its own rustflags (aya-build compiles the programs for
    // the target's architecture). crt-static alone makes a static-pie on x86_64, which `ldd`
    // reports as "statically linked" and runs its own relocation at start; the static
    // relocation model makes a plain static executable, which `ldd` calls "not a dynamic
    // executable".
    let mut cargo = setup::cargo();
    cargo
        .current_dir(workspace_root())
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static",
        )
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
/// obscurely; a cross build for the wrong machine would fail to even start. Static means a
/// fixed-address executable (ET_EXEC) here, not a static-pie (ET_DYN without an interpreter).
pub fn ensure_static(bin: &Path, arch: Arch) -> Result<()> {
    const ET_EXEC: u16 = 2;
    crate::dist::ensure_no_interpreter(bin)?;
    let elf = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let kind = elf
        .get(16..18)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .unwrap_or(0);
    if kind != ET_EXEC {
        bail!(
            "{} is ELF type {kind}, not a fixed-address executable ({ET_EXEC}): built as a \
             static-pie instead of with -C relocation-model=static",
            bin.display()
        );
    }
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
