//! `ct-scenarios bench`: measurements, not tests. `cargo xtask bench` boots a
//! kernel with `ct.mode=bench`, collects the `CT-BENCH <json>` records printed here and
//! renders them into BENCHMARKS.md; `CT-RESULT` lines say whether each phase ran (and, for
//! the flood, whether the tracer accounted for every packet), then `CT-DONE`.
//!
//! Phases, in this order, on one topology (`topology::Topology`, Service DNAT in the client
//! namespace):
//! * `startup`: launch to attached and peak RSS on an idle guest, from the tracer's summary
//!   (the flood's runs add theirs, with the peak RSS under load);
//! * `cost`: per-program BPF run time under a bulk transfer, tracer off, with each verdict
//!   probe (none, fexit, the kprobe pair) and with empty programs at those probes' hooks;
//! * `flood`: 100,000 out-of-window segments, events + losses against the kernel counter.

mod cost;
mod counting;
mod flood;
mod floor;
mod klog;
mod progs;

use std::path::Path;

use anyhow::Result;
use serde_json::{Value, json};

use crate::kernel::Kernel;
use crate::topology::{Nat, Topology};

/// Runs every phase; true when all of them passed.
pub fn run() -> bool {
    match setup() {
        Ok((topo, fexit)) => {
            println!("bench: start-up phase");
            let startup = match startup(fexit) {
                Ok(()) => {
                    println!("CT-RESULT bench-startup ok");
                    true
                }
                Err(e) => failed("bench-startup", &e),
            };
            println!("bench: cost phase");
            let cost = match cost::run(&topo, fexit) {
                Ok(()) => {
                    println!("CT-RESULT bench-cost ok");
                    true
                }
                Err(e) => failed("bench-cost", &e),
            };
            // The flood prints one result per ring size it tried.
            println!("bench: flood phase");
            let flood = flood::run(&topo).unwrap_or_else(|e| failed("bench-flood", &e));
            startup && cost && flood
        }
        Err(e) => failed("bench-setup", &e),
    }
}

fn failed(name: &str, e: &anyhow::Error) -> bool {
    println!(
        "CT-RESULT {name} FAILED {}",
        crate::one_line(&format!("{e:#}"))
    );
    false
}

/// The topology, and whether fexit can attach to nf_conntrack_in here.
fn setup() -> Result<(Topology, bool)> {
    let kernel = Kernel::detect()?;
    println!("bench: {}", kernel.describe());
    // A loadable module has an initstate; built-in code has at most a parameters directory.
    let module = Path::new("/sys/module/nf_conntrack/initstate").exists();
    record(json!({"kind": "env", "release": kernel.release,
                  "nf_conntrack": if module { "module" } else { "built-in" },
                  "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)}));
    progs::enable()?;
    let topo = Topology::build("bench", Nat::Client { drop_invalid: true })?;
    Ok((topo, kernel.fexit_attaches()))
}

/// Start-up on an otherwise idle guest, each mode a few times (the bulk phase's tracers
/// start while the transfer keeps both vCPUs busy).
fn startup(fexit: bool) -> Result<()> {
    for _ in 0..3 {
        for (mode, setup) in cost::modes(fexit) {
            let cost::Setup::Tracer(args) = setup else {
                continue;
            };
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            let summary = counting::CountingTracer::start(&args)?.stop()?;
            startup_record(mode, "idle", &summary);
        }
    }
    Ok(())
}

/// One measurement for xtask to render.
fn record(v: Value) {
    println!("CT-BENCH {v}");
}

/// Start-up time and peak memory of one tracer run, from its JSON summary.
fn startup_record(mode: &str, during: &str, summary: &Value) {
    record(json!({"kind": "startup", "mode": mode, "during": during,
                  "btf_ms": summary["startup_btf_ms"],
                  "attached_ms": summary["startup_attached_ms"],
                  "peak_rss_kib": summary["peak_rss_kib"]}));
}
