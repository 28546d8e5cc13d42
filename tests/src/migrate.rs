//! Calls that change CPU halfway, and more calls in flight than the kernel can catch the
//! return of: the kprobe pair on `nf_conntrack_in` keeps a per-CPU stack of calls in flight,
//! so a call whose entry runs on one CPU and whose return runs on another leaves a frame
//! behind on the first and finds none (or someone else's) on the second; and a kretprobe has
//! a fixed number of instances (10 on two CPUs), one held by each call stopped inside the
//! function, so with more such calls the kernel misses returns (its `missed` count, 6.7+).
//! Many threads send a connection's segments from the client namespace (conntrack runs at
//! LOCAL_OUT, in process context, where a fully preemptible kernel can stop the thread or
//! move it to another CPU inside the call) while another keeps moving them between CPUs.
//! Most segments are in the window; one in 800 is far ahead of it, each with its own
//! sequence number (they also draw ICMP errors from the router, which quote no flow and are
//! not counted as INVALID: only TCP events are compared). The kernel's `invalid` counter is
//! the oracle: the tracer must report only packets that were INVALID (never one of the
//! in-window segments, whose verdict a mispaired return would give to the wrong packet), and
//! every INVALID it did not report must be counted as a verdict it could not see.

use std::collections::BTreeSet;
use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::connection::Flow;
use crate::inject::{ACK, Packet, RawSender};
use crate::observe::Observer;
use crate::scenarios::{Ctx, DROP_INVALID, FAR};
use crate::topology::{Topology, WEB};
use crate::verify::{self, Problems};

/// How long the senders run.
const SENDING: Duration = Duration::from_secs(3);
/// Sending threads: more than the kernel's free kretprobe instances (10 on two CPUs) can be
/// held at once by threads stopped inside the call, so some returns cannot be caught.
const SENDERS: u32 = 64;
/// One segment in this many is INVALID (few enough for the tracer to print under TCG: the
/// threads send some 150k segments a second).
const INVALID_EVERY: u32 = 800;
/// The dynamic preemption switch (Linux 5.12+ built with PREEMPT_DYNAMIC, as Debian's are).
const PREEMPT: &str = "/sys/kernel/debug/sched/preempt";

/// The preemption model, switched to `full` for the scenario and back when dropped.
struct FullPreemption {
    before: String,
}

impl FullPreemption {
    /// None where the kernel has no dynamic preemption: it never preempts kernel code, so a
    /// call cannot change CPU between its entry and its return.
    fn enable() -> Result<Option<FullPreemption>> {
        let Ok(now) = fs::read_to_string(PREEMPT) else {
            return Ok(None);
        };
        // "none (voluntary) full": the active model is in parentheses.
        let before = now
            .split_whitespace()
            .find_map(|w| w.strip_prefix('(')?.strip_suffix(')'))
            .context("no active model in sched/preempt")?
            .to_string();
        fs::write(PREEMPT, "full").context("switching to full preemption")?;
        println!("migrate: preemption {before} -> full");
        Ok(Some(FullPreemption { before }))
    }
}

impl Drop for FullPreemption {
    fn drop(&mut self) {
        let _ = fs::write(PREEMPT, &self.before);
    }
}

fn pin(tid: libc::pid_t, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the set is live and its size is passed.
    let r = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        bail!(
            "sched_setaffinity({tid}, cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

pub fn migrating_calls(ctx: &Ctx) -> Result<()> {
    let cpus = std::thread::available_parallelism()?.get();
    if cpus < 2 {
        bail!("the guest has {cpus} CPU: nothing to migrate between");
    }
    let topo = Topology::build("migr", DROP_INVALID)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let now = flow.seqs()?;
    let preemption = FullPreemption::enable()?;
    let observer = Observer::start(&topo, ctx, &[])?;

    let stop = Arc::new(AtomicBool::new(false));
    let (tids_tx, tids_rx) = mpsc::channel();
    let mut senders = Vec::new();
    for thread in 0..SENDERS {
        let raw = RawSender::open(&topo.client)?;
        let (stop, tids_tx) = (Arc::clone(&stop), tids_tx.clone());
        let (from, to) = (flow.client_addr, flow.service.vip);
        senders.push(std::thread::spawn(move || -> (u32, Vec<u32>) {
            // SAFETY: gettid(2) has no preconditions.
            let _ = tids_tx.send(unsafe { libc::gettid() });
            let (mut sent, mut invalid) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                sent += 1;
                let seq = if sent % INVALID_EVERY == 0 {
                    // Distinct per packet and thread, all far ahead of the window.
                    let s = now
                        .client_next
                        .wrapping_add(FAR + thread * (1 << 24) + sent);
                    invalid.push(s);
                    s
                } else {
                    now.client_next
                };
                // A duplicate ACK when in the window: the backend ignores it.
                let p = Packet::tcp(from, to, seq, now.server_next, ACK, Vec::new());
                let _ = raw.send(&p);
            }
            (sent, invalid)
        }));
    }
    drop(tids_tx);
    let tids: Vec<libc::pid_t> = tids_rx.iter().take(SENDERS as usize).collect();
    let started = Instant::now();
    let mut moves = 0u64;
    while started.elapsed() < SENDING {
        for (i, &tid) in tids.iter().enumerate() {
            pin(tid, (moves as usize + i) % cpus)?;
        }
        moves += 1;
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    let mut sent_invalid = BTreeSet::new();
    let mut sent = 0u64;
    for s in senders {
        let (n, invalid) = s.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
        sent += u64::from(n);
        sent_invalid.extend(invalid);
    }
    let preemptible = preemption.is_some();
    drop(preemption);
    println!(
        "migrate: {sent} segments ({} INVALID) from {SENDERS} threads moved {moves} times",
        sent_invalid.len()
    );
    let client = topo.client.inode();
    let obs = observer.finish(|o| o.invalid_delta(client) as usize)?;

    let mut problems = Problems::default();
    let kernel_invalid = obs.invalid_delta(client);
    // The kernel's side: every far-ahead segment INVALID, nothing else.
    if kernel_invalid != sent_invalid.len() as u64 {
        problems.add(format!(
            "kernel invalid counter in the client namespace moved by {kernel_invalid}, sent {} INVALID segments",
            sent_invalid.len()
        ));
    }
    if let Some(e) = &obs.tracer_error {
        problems.add(format!("tracer: {e}"));
    }
    if let Some(trace) = &obs.trace {
        let Some(s) = &trace.summary else {
            problems.add("tracer printed no summary".into());
            return problems.into_result();
        };
        let mut reported = BTreeSet::new();
        for ev in obs.events("invalid") {
            if ev["netns"].as_u64() != Some(client) || ev["proto"] != "tcp" {
                continue;
            }
            let seq = ev["tcp"]["seq"].as_u64().unwrap_or(0) as u32;
            if !sent_invalid.contains(&seq) {
                problems.add(format!(
                    "an INVALID event for a segment the kernel accepted: {}",
                    verify::brief(ev)
                ));
            } else if !reported.insert(seq) {
                problems.add(format!("two events for one segment: {}", verify::brief(ev)));
            }
        }
        let unseen = ["lost", "recursion_misses", "untracked", "kprobe_misses"]
            .iter()
            .map(|k| s[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        let missing = kernel_invalid.saturating_sub(reported.len() as u64);
        println!(
            "migrate: kernel invalid {kernel_invalid}, reported {}, counted as unseen {unseen} (summary {s})",
            reported.len()
        );
        if missing > unseen {
            problems.add(format!(
                "{missing} INVALID segments were not reported but only {unseen} verdicts were counted as unseen"
            ));
        }
        // The pair is what this is about: where the kernel can move a thread inside a call,
        // moving threads this often must break some pairs, and the tracer must say so.
        let pair = obs.expected_mode == conntrack_trace::plan::Mode::KprobePair;
        if pair && preemptible && s["untracked"].as_u64() == Some(0) {
            problems.add(
                "the kprobe pair counted no unpaired call although threads moved CPU inside calls"
                    .into(),
            );
        }
        // More threads stopped inside the call than the kernel has return instances: where
        // it reports its misses (6.7+), it must have missed returns, and the tracer say so.
        let reported_by_kernel = ctx.kernel.reports_kprobe_misses();
        if pair && preemptible && reported_by_kernel && s["kprobe_misses"].as_u64() == Some(0) {
            problems.add(format!(
                "kprobe_misses is 0 with {SENDERS} threads stopped inside nf_conntrack_in: {s}"
            ));
        }
        if reported_by_kernel != s.get("kprobe_misses").is_some() {
            problems.add(format!(
                "summary.kprobe_misses should be there exactly on 6.7+ kernels: {s}"
            ));
        }
    }
    problems.into_result()
}
