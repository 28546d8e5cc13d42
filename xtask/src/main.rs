//! `cargo xtask`: set-up, the VM test suite on real Debian kernels, the demo, and the one
//! test command the README gives.

mod apt;
mod arch;
mod bench;
mod cpio;
#[cfg(test)]
mod deploy;
mod dist;
mod fuzz;
mod guest_build;
mod image;
mod initramfs;
mod kernels;
mod licenses;
mod modules;
mod pods;
mod prometheus;
mod qemu;
mod setup;
mod summary;
mod userland;

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, builder::PossibleValuesParser};

use crate::{arch::Arch, qemu::Mode, summary::Tally, userland::Userland};

#[derive(Parser)]
#[command(about = "Developer tasks for conntrack-trace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the VM tests need (idempotent).
    Setup,
    /// Boot Debian kernels under QEMU and run the scenario suite against the real tracer.
    VmTest {
        /// The guests' architecture: x86_64 under qemu-system-x86_64, or arm64 under
        /// qemu-system-aarch64 (its kernels, the tracer cross-built as `dist` builds it, the
        /// same tools from Debian's arm64 packages).
        #[arg(long, value_enum, default_value_t = Arch::X86_64)]
        arch: Arch,
        /// Kernels of that architecture to test (repeatable); default: all of them.
        #[arg(long = "kernel", value_parser = PossibleValuesParser::new(kernels::names(None)))]
        kernels: Vec<String>,
        /// Scenarios to run (repeatable; `ct-scenarios --help` in the guest lists them);
        /// default: all.
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Seconds a guest may run before it counts as hung and is killed.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Boot a kernel and reproduce a kube-proxy-style incident with the tracer's live output.
    Demo {
        #[arg(long, value_parser = PossibleValuesParser::new(kernels::names(Some(Arch::X86_64))), default_value = kernels::DEFAULT)]
        kernel: String,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Boot kernels in bench mode and write the measurements into BENCHMARKS.md (never part
    /// of `test`: these are benchmarks, not timed tests).
    Bench {
        /// Kernels to benchmark (repeatable).
        #[arg(long = "kernel", value_parser = PossibleValuesParser::new(kernels::names(Some(Arch::X86_64))), default_value = kernels::DEFAULT)]
        kernels: Vec<String>,
        /// Seconds a guest may run; the flood may try several ring sizes, each slow under TCG.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Build the release: static binary, man pages, completions, licenses, SHA256SUMS, and
    /// its tarball in target/dist.
    Dist,
    /// Build the release and an OCI image of it (FROM scratch) in target/dist.
    Image,
    /// Build the release and the image, and test them as `test` does (root: the image test
    /// runs the image's root filesystem in a private mount namespace).
    ReleaseTest,
    /// Set up, run the host tests and the release test, then the VM suite on every x86_64
    /// kernel (the arm64 suite, `vm-test --arch arm64`, does not fit the CI budget).
    Test {
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Build the tracer and run it live here (as root), or the demo where this kernel cannot.
    Run {
        /// Arguments for conntrack-trace.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether everything passed.
fn run(task: Task) -> Result<bool> {
    match task {
        Task::Setup => setup::run().map(|()| true),
        Task::VmTest {
            arch,
            kernels,
            scenarios,
            timeout,
        } => {
            setup::run()?;
            vm_test(arch, &kernels, &scenarios, timeout)
        }
        Task::Demo { kernel, timeout } => {
            setup::run()?;
            demo(&kernel, timeout, &[])
        }
        Task::Bench { kernels, timeout } => {
            setup::run()?;
            bench(&kernels, timeout)
        }
        Task::Dist => {
            setup::run()?;
            dist::build().map(|_| true)
        }
        Task::Image => {
            setup::run()?;
            image::build(&dist::build()?).map(|_| true)
        }
        Task::ReleaseTest => {
            setup::run()?;
            Ok(release_test())
        }
        Task::Test { timeout } => {
            setup::run()?;
            let host_ok = host_tests()? & release_test();
            if !host_ok {
                println!("xtask test: host tests FAILED; running the VM tests anyway");
            }
            // Not arm64: with it the CI run would pass 45 minutes (README, "Supported
            // kernels"); `vm-test --arch arm64` runs it.
            let vm_ok = vm_test(Arch::X86_64, &[], &[], timeout)?;
            if !host_ok {
                println!(
                    "xtask test: FAILED because the host tests failed (see their output above)"
                );
            }
            Ok(host_ok && vm_ok)
        }
        Task::Run { args } => run_live(&args),
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

/// Runs a command, inheriting stdio; fails with the command line when it does not succeed.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The release as a user gets it: the tarball unpacked elsewhere runs `check` and `stats`; the
/// image unpacked runs its entrypoint's `check`; the binary as an agent is scraped by
/// Prometheus. Prints a cargo-style result line.
fn release_test() -> bool {
    let started = Instant::now();
    let mut results: Vec<(&str, Result<()>)> = Vec::new();
    match dist::build() {
        Ok(release) => {
            results.push(("release::tarball", dist::test(&release)));
            results.push(("release::tarball-aarch64", dist::test_aarch64(&release)));
            let image = image::build(&release).and_then(|i| image::test(&release, &i));
            results.push(("release::image", image));
            let tracer = release.dir.join("conntrack-trace");
            results.push(("release::prometheus", prometheus::test(&tracer)));
        }
        Err(e) => results.push(("release::build", Err(e))),
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    for (name, result) in &results {
        match result {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => println!("test {name} ... FAILED\n{e:#}"),
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed; finished in {:.1}s (release tarball, image, Prometheus scrape)",
        if failed == 0 { "ok" } else { "FAILED" },
        results.len() - failed,
        started.elapsed().as_secs_f64()
    );
    failed == 0
}

/// Unit tests of the host crates, of xtask itself and of the guest crate (which run on any
/// host); the render benchmark once per benchmark, so it cannot rot; a bounded fuzzing run.
/// The eBPF crate is never built for the host.
fn host_tests() -> Result<bool> {
    println!("xtask: cargo test (host crates and the guest crate's unit tests)");
    let status = setup::cargo()
        .current_dir(workspace_root())
        .args([
            "test",
            "-p",
            "conntrack-trace",
            "-p",
            "conntrack-trace-common",
            "-p",
            "conntrack-trace-tests",
            "-p",
            "xtask",
        ])
        .status()
        .context("cannot run cargo test")?;
    println!("xtask: the render benchmark, each benchmark once (criterion's test mode)");
    let bench = setup::cargo()
        .current_dir(workspace_root())
        .args(["test", "-p", "conntrack-trace", "--bench", "render"])
        .status()
        .context("cannot run cargo test --bench")?;
    let fuzz = fuzz::run()?;
    Ok(status.success() && bench.success() && fuzz)
}

fn vm_test(arch: Arch, names: &[String], scenarios: &[String], timeout: u64) -> Result<bool> {
    let selected = kernels::select(arch, names)?;
    kernels::prune_cache();
    let started = Instant::now();
    let bins = guest_build::build_for(arch)?;
    // The host files whose packages an arm64 guest gets: the tools, and cri-pod's.
    let host_files: Vec<String> = initramfs::TOOLS
        .iter()
        .map(|t| t.to_string())
        .chain(pods::files(Arch::X86_64))
        .collect();
    let userland = Userland::for_arch(arch, &host_files)?;
    let mut total = Tally::default();
    let mut rows = Vec::new();
    for kernel in selected {
        // A kernel that cannot be fetched or packed is that kernel's failure, not the run's.
        let tally = boot(
            kernel,
            &bins,
            &userland,
            Mode::Test,
            timeout,
            &[],
            scenarios,
        )
        .map(|o| o.tally)
        .unwrap_or_else(|e| {
            let mut t = Tally::default();
            t.fail(&format!("vm::{}::boot", kernel.name), &format!("{e:#}"));
            t
        });
        rows.push(format!(
            "  {:<18} {:<8} {:<20} {:<28} {:>3} passed {:>2} failed  boot {:>6}  total {:>6.1}s",
            kernel.name,
            kernel.arch.name(),
            kernel.version,
            tally.release.as_deref().unwrap_or("(never booted)"),
            tally.passed,
            tally.failures.len(),
            tally
                .boot
                .map(|b| format!("{:.1}s", b.as_secs_f64()))
                .unwrap_or_else(|| "-".into()),
            tally.wall.as_secs_f64()
        ));
        total.add(&tally);
    }
    // The README's table of tested kernels is written from these lines.
    println!(
        "\nvm-test per kernel (architecture, Debian version, guest uname -r, scenario results, \
         boot to /init, whole guest run):"
    );
    for row in &rows {
        println!("{row}");
    }
    total.wall = started.elapsed();
    println!("\nvm-test total ({} {} kernels):", rows.len(), arch.name());
    total.print_result();
    Ok(total.ok())
}

/// The incident in a guest, traced by the tracer with `tracer_args`.
fn demo(name: &str, timeout: u64, tracer_args: &[String]) -> Result<bool> {
    let kernel = kernels::select(Arch::X86_64, &[name.to_string()])?[0];
    let bins = guest_build::build()?;
    let outcome = boot(
        kernel,
        &bins,
        &Userland::Host,
        Mode::Demo,
        timeout,
        tracer_args,
        &[],
    )?;
    Ok(outcome.tally.ok())
}

/// Boots each kernel in bench mode and rewrites its section of BENCHMARKS.md from what the
/// guest measured (also when a phase failed: its numbers are real and the failure is shown).
fn bench(names: &[String], timeout: u64) -> Result<bool> {
    let selected = kernels::select(Arch::X86_64, names)?;
    let bins = guest_build::build()?;
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let date = run_output(Command::new("date").args(["-u", "+%Y-%m-%d"]))?;
    let host = host_cpus();
    let tree = source_tree();
    let file = workspace_root().join(bench::FILE);
    let mut ok = true;
    for kernel in selected {
        let outcome = boot(
            kernel,
            &bins,
            &Userland::Host,
            Mode::Bench,
            timeout,
            &[],
            &[],
        )?;
        ok &= outcome.tally.ok();
        if outcome.bench.is_empty() {
            println!(
                "xtask bench: {}: the guest measured nothing; {} left as it was",
                kernel.name,
                file.display()
            );
            continue;
        }
        let ctx = bench::Run {
            kernel,
            command: &command,
            date: date.trim(),
            tree: &tree,
            host: &host,
        };
        let section = bench::render(&ctx, &outcome.bench)?;
        println!("\n{section}");
        bench::update_file(&file, kernel.name, &section)?;
        println!(
            "xtask bench: {}: wrote its section of {}",
            kernel.name,
            file.display()
        );
    }
    Ok(ok)
}

/// Which sources the numbers belong to: the commit, and whether the tree had changes.
fn source_tree() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        // BENCHMARKS.md itself is the output: an earlier run's section is not a source change.
        Some(commit) => match git(&[
            "status",
            "--porcelain",
            "--untracked-files=no",
            "--",
            ".",
            &format!(":!{}", bench::FILE),
        ]) {
            Some(changes) if changes.is_empty() => format!("commit {commit}"),
            _ => format!("commit {commit} + uncommitted changes"),
        },
        None => "a source tree without git metadata".into(),
    }
}

/// "2 x <model name>" from /proc/cpuinfo, for saying what the TCG numbers ran on.
fn host_cpus() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let count = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{count} x {model}")
}

fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fetches the kernel, builds its initramfs (`bins` and `userland` are of the kernel's
/// architecture) and runs one guest; `tracer_args` are for the demo's tracer, `scenarios`
/// limit the test run.
fn boot(
    kernel: &kernels::Kernel,
    bins: &guest_build::GuestBins,
    userland: &Userland,
    mode: Mode,
    timeout: u64,
    tracer_args: &[String],
    scenarios: &[String],
) -> Result<qemu::Outcome> {
    let unpacked = kernels::fetch(kernel)?;
    let initrd = initramfs::build(kernel, &unpacked, bins, userland, tracer_args)?;
    if matches!(mode, Mode::Test) && pods::wanted(scenarios) {
        pods::append(&initrd, &unpacked.work, userland)?;
    }
    qemu::run(
        kernel,
        &unpacked.vmlinuz,
        &initrd,
        mode,
        std::time::Duration::from_secs(timeout),
        scenarios,
    )
}

fn run_live(args: &[String]) -> Result<bool> {
    setup::run()?;
    if !kprobes_available() {
        println!(
            "xtask run: this kernel has no kprobes, so the tracer cannot attach here; \
             running `cargo xtask demo` (kernel {}) instead, the tracer with [{}]",
            kernels::DEFAULT,
            args.join(" ")
        );
        return demo(kernels::DEFAULT, 600, args);
    }
    run_cmd(setup::cargo().current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "conntrack-trace",
    ]))?;
    let tracer = workspace_root().join("target/release/conntrack-trace");
    // exec, so Ctrl-C reaches the tracer alone and it can print its summary.
    let mut cmd = if setup::is_root() {
        Command::new(&tracer)
    } else {
        println!("xtask run: the tracer needs root; running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(&tracer);
        c
    };
    let err = cmd.args(args).exec();
    Err(err).with_context(|| format!("cannot start {cmd:?}"))
}

fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || [
            "/sys/kernel/tracing/kprobe_events",
            "/sys/kernel/debug/tracing/kprobe_events",
        ]
        .iter()
        .any(|p| Path::new(p).exists())
}
