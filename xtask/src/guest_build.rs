//! Static-pie builds of the binaries that run in the guest: the tracer and the scenario runner.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{run_cmd, setup, workspace_root};

const TARGET: &str = "x86_64-unknown-linux-gnu";

pub struct GuestBins {
    pub tracer: PathBuf,
    pub scenarios: PathBuf,
}

pub fn build() -> Result<GuestBins> {
    println!("build: conntrack-trace and ct-scenarios, static-pie, release");
    // An explicit --target keeps crt-static away from build scripts and proc macros, and the
    // eBPF build inside build.rs sets its own rustflags.
    run_cmd(
        setup::cargo()
            .current_dir(workspace_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args(["build", "--release", "--target", TARGET])
            .args(["-p", "conntrack-trace", "-p", "conntrack-trace-tests"]),
    )?;
    let dir = workspace_root().join("target").join(TARGET).join("release");
    let bins = GuestBins {
        tracer: dir.join("conntrack-trace"),
        scenarios: dir.join("ct-scenarios"),
    };
    for bin in [&bins.tracer, &bins.scenarios] {
        ensure_static(bin)?;
    }
    Ok(bins)
}

/// The guest has no libc for our binaries, so a dynamic one would fail there obscurely.
fn ensure_static(bin: &PathBuf) -> Result<()> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if text.contains("statically linked") || text.contains("not a dynamic executable") {
        return Ok(());
    }
    bail!(
        "{} is not statically linked (ldd says: {})",
        bin.display(),
        text.trim()
    )
}
