//! `ct-scenarios`: runs inside the QEMU guest as root and proves conntrack-trace against the
//! kernel's own counters and log.
//!
//! ```text
//! ct-scenarios [--no-tracer] [SCENARIO...]   run the suite (all scenarios by default), in
//!                                            every mode the kernel supports
//! ct-scenarios demo                          the kube-proxy incident, live, human output
//! ```
//!
//! Guest protocol (parsed by xtask): `CT-PLAN <n>` (results to come), then one
//! `CT-RESULT <name> ok` or
//! `CT-RESULT <name> FAILED <reason>` line per scenario, then `CT-DONE`. Everything else is
//! log. `--no-tracer` checks only the injections and the kernel oracles, for developing
//! scenarios on a machine that cannot attach probes.

mod bench;
mod connection;
mod counters;
mod demo;
mod evidence;
mod filters;
mod icmp;
mod inject;
mod insert_failed;
mod kernel;
mod kmsg;
mod kube;
mod migrate;
mod netns;
mod observe;
mod out_of_sync;
mod owner;
mod pods;
mod probe;
mod reasons;
mod scenarios;
mod seqadj;
mod table_full;
mod tools;
mod topology;
mod tracer;
mod verify;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use kernel::Kernel;
use scenarios::Ctx;

/// Longest a scenario may take under TCG before the watchdog gives up on it.
const SCENARIO_LIMIT: Duration = Duration::from_secs(240);

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: ct-scenarios [--no-tracer] [SCENARIO...] | ct-scenarios demo");
        println!(
            "scenarios: {}",
            scenarios::ALL
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(" ")
        );
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("bench") {
        let ok = bench::run();
        println!("CT-DONE");
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if args.first().map(String::as_str) == Some("demo") {
        let result = demo::run();
        if let Err(e) = &result {
            println!("demo: failed: {e:#}");
        }
        println!("CT-DONE");
        return if result.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let with_tracer = !args.iter().any(|a| a == "--no-tracer");
    args.retain(|a| a != "--no-tracer");

    let kernel = match Kernel::detect() {
        Ok(k) => k,
        Err(e) => {
            println!("cannot identify the kernel: {e:#}");
            println!("CT-DONE");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "ct-scenarios: {}{}",
        kernel.describe(),
        if with_tracer {
            ""
        } else {
            ", oracle only (no tracer)"
        }
    );
    let mut selected = match scenarios::select(&args) {
        Ok(s) => s,
        Err(e) => {
            println!("{e:#}");
            println!("CT-DONE");
            return ExitCode::FAILURE;
        }
    };
    // The whole suite leaves out what this kernel cannot run, saying why; named on the
    // command line it runs, and fails with its evidence.
    if args.is_empty()
        && let Some(why) = pods::cannot_run(&kernel)
    {
        println!("ct-scenarios: {} left out here: {why}", pods::NAME);
        selected.retain(|(name, _)| *name != pods::NAME);
    }

    let modes = scenarios::Mode::all(&kernel);
    let mut ctx = Ctx {
        kernel,
        with_tracer,
        mode: scenarios::Mode::Default,
    };
    let watchdog = start_watchdog();
    let mut failed = 0;
    // Every scenario in every mode the kernel supports; oracle-only runs need one pass.
    let modes = if with_tracer { modes } else { vec![ctx.mode] };
    let runs = |mode: scenarios::Mode, name: &str| {
        mode == scenarios::Mode::Default || !scenarios::DEFAULT_MODE_ONLY.contains(&name)
    };
    let planned: usize = modes
        .iter()
        .map(|&m| selected.iter().filter(|(n, _)| runs(m, n)).count())
        .sum();
    println!("CT-PLAN {planned}");
    for mode in modes {
        ctx.mode = mode;
        for &(scenario_name, scenario) in selected.iter().filter(|(n, _)| runs(mode, n)) {
            // Leaked once per result: the watchdog keeps the name for the life of the run.
            let name: &'static str =
                Box::leak(format!("{scenario_name}{}", mode.suffix()).into_boxed_str());
            println!("scenario {name}: start");
            let _ = watchdog.send(Some((name, Instant::now() + SCENARIO_LIMIT)));
            let started = Instant::now();
            let outcome = match catch_unwind(AssertUnwindSafe(|| scenario(&ctx))) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(panic) => Some(format!(
                    "panic: {}",
                    panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
            };
            let _ = watchdog.send(None);
            println!("scenario {name}: {:.1} s", started.elapsed().as_secs_f64());
            match outcome {
                None => println!("CT-RESULT {name} ok"),
                Some(reason) => {
                    failed += 1;
                    println!("CT-RESULT {name} FAILED {}", one_line(&reason));
                }
            }
        }
    }
    println!("CT-DONE");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A scenario stuck past its limit (a wait without a timeout we missed, a kernel hang in a
/// syscall) still produces a result line and CT-DONE, so the host never waits for nothing.
fn start_watchdog() -> mpsc::Sender<Option<(&'static str, Instant)>> {
    let (tx, rx) = mpsc::channel::<Option<(&'static str, Instant)>>();
    std::thread::spawn(move || {
        let mut current: Option<(&'static str, Instant)> = None;
        loop {
            let wait = current.map_or(Duration::from_secs(3600), |(_, d)| {
                d.saturating_duration_since(Instant::now())
            });
            match rx.recv_timeout(wait) {
                Ok(next) => current = next,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some((name, _)) = current {
                        let pid = tracer::RUNNING_PID.load(Ordering::SeqCst);
                        if pid > 0 {
                            // SAFETY: our own child.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                        println!(
                            "CT-RESULT {name} FAILED watchdog: no result after {} s",
                            SCENARIO_LIMIT.as_secs()
                        );
                        println!("CT-DONE");
                        std::process::exit(1);
                    }
                }
            }
        }
    });
    tx
}
