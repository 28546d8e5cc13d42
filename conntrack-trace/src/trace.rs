//! The live tracer: attach per the plan, drain the ring buffer on a tokio loop, print, and
//! summarize against the kernel's own counters when stopped.

use std::{
    io,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Btf, Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FExit, KProbe, TracePoint},
};
use conntrack_trace_common::{filter::Filter, kind, stat};
use tokio::{io::unix::AsyncFd, signal::unix::{SignalKind, signal}};

use crate::{
    check, counters, ebpf,
    output::Output,
    plan::{Flavor, Plan},
    hints::{Hints, Node},
    privs,
    reset::{self, Correlator},
    summary::Summary,
    verdict::{self, Clock},
};

pub struct Options {
    pub count: Option<u64>,
    pub duration: Option<Duration>,
    pub filter: Filter,
    pub ring_bytes: u32,
    pub verbose: bool,
    /// Print RSTs that no INVALID packet explains (linked ones always print as incidents).
    pub resets: bool,
}

/// Loads and attaches every program in the plan. The return probe goes on before the entry
/// probe so that no entry is ever pushed without its return being watched.
fn attach(bpf: &mut Ebpf, plan: &Plan) -> Result<()> {
    let mut order: Vec<_> = plan.attach.iter().collect();
    order.sort_by_key(|a| a.program == "nf_conntrack_in");
    for a in order {
        let prog = bpf
            .program_mut(a.program)
            .with_context(|| format!("program {} missing from the eBPF object", a.program))?;
        let what = || format!("attaching {} {} to {}", a.flavor, a.program, a.target);
        match a.flavor {
            Flavor::KProbe | Flavor::KRetProbe => {
                let p: &mut KProbe = prog.try_into()?;
                // One program may attach to several functions (tcp_v4/v6_send_reset).
                if p.fd().is_err() {
                    p.load().with_context(what)?;
                }
                p.attach(&a.target, 0).with_context(|| {
                    format!("{}: the symbol may have moved or been inlined in this kernel build; run `conntrack-trace check`", what())
                })?;
            }
            Flavor::TracePoint => {
                let p: &mut TracePoint = prog.try_into()?;
                let (category, name) = a.target.split_once('/').unwrap_or(("", &a.target));
                if p.fd().is_err() {
                    p.load().with_context(what)?;
                }
                p.attach(category, name).with_context(what)?;
            }
            Flavor::FExit => {
                let p: &mut FExit = prog.try_into()?;
                let btf = Btf::from_sys_fs().context("reading vmlinux BTF")?;
                p.load(&a.target, &btf).with_context(what)?;
                p.attach().with_context(what)?;
            }
        }
    }
    Ok(())
}

fn stat_total(stats: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    stats.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

pub async fn run(opts: Options, out: &mut dyn Output) -> Result<()> {
    privs::check()?;
    if !check::kprobes_available() {
        bail!(
            "this kernel cannot attach kprobes ({}). `conntrack-trace check` verifies the \
             programs here; `cargo xtask demo` shows the tracer working in a VM",
            check::KPROBES_MISSING
        );
    }
    let (mut plan, _btf) = Plan::for_running_kernel()?;
    let mut bpf = ebpf::open(&plan, opts.ring_bytes, &opts.filter)?;
    if plan.uses_fexit() && attach(&mut bpf, &plan).is_err() {
        // fexit refused (no trampoline support): the same verdict from the kprobe pair.
        plan = plan.without_fexit();
        bpf = ebpf::open(&plan, opts.ring_bytes, &opts.filter)?;
        attach(&mut bpf, &plan)?;
    } else if !plan.uses_fexit() {
        attach(&mut bpf, &plan)?;
    }
    if opts.verbose {
        for a in &plan.attach {
            eprintln!("conntrack-trace: plan: {:<9} {:<30} -> {}", a.flavor.to_string(), a.program, a.target);
        }
    }
    for n in &plan.notes {
        eprintln!("conntrack-trace: note: {n}");
    }
    let ring = RingBuf::try_from(bpf.take_map("EVENTS").context("EVENTS map")?)?;
    let stats: PerCpuArray<MapData, u64> = PerCpuArray::try_from(bpf.take_map("STATS").context("STATS map")?)?;
    // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd lives.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;

    let mut summary = Summary::default();
    summary.fill_start = counters::table_fill();
    let ns_before = counters::all_namespaces();
    let started = Instant::now();
    eprintln!(
        "conntrack-trace: attached {} programs on {} (window reasons from {:?}); Ctrl-C to stop",
        plan.attach.len(),
        plan.release,
        plan.window
    );

    let clock = Clock::now();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let mut reported_lost = 0u64;
    let mut closed = false;

    let mut corr = Correlator::default();
    let mut hints = Hints::new(Node::read());
    // Handles one record; Err(closed) means stop (count reached, or stdout closed).
    let mut handle = |bytes: &[u8], summary: &mut Summary, out: &mut dyn Output| -> std::result::Result<(), bool> {
        let written = match bytes.get(..4).map(|k| u32::from_ne_bytes(k.try_into().unwrap())) {
            Some(kind::PACKET) => match verdict::parse(bytes) {
                Ok(ev) => {
                    let mut r = verdict::decode(&ev, &clock);
                    r.hint = hints.get(r.reason_code());
                    summary.record(&r);
                    corr.invalid(&r);
                    out.event(&r)
                }
                Err(e) => {
                    log::warn!("{e}");
                    return Ok(());
                }
            },
            Some(kind::RESET) => match reset::parse(bytes) {
                Ok(ev) => {
                    let rst = reset::decode(&ev, &clock);
                    summary.resets += 1;
                    match corr.reset(&rst) {
                        Some(incident) => {
                            summary.incidents += 1;
                            out.incident(&incident)
                        }
                        None if opts.resets => out.reset(&rst),
                        None => Ok(()),
                    }
                }
                Err(e) => {
                    log::warn!("{e}");
                    return Ok(());
                }
            },
            other => {
                log::warn!("unknown event kind {other:?}");
                return Ok(());
            }
        };
        if let Err(e) = written {
            return Err(e.kind() == io::ErrorKind::BrokenPipe);
        }
        match opts.count {
            Some(n) if summary.events() >= n => Err(false),
            _ => Ok(()),
        }
    };

    'run: loop {
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    if let Err(broken) = handle(&item, &mut summary, out) {
                        closed = broken;
                        break 'run;
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let lost = stat_total(&stats, stat::LOST);
                if lost > reported_lost {
                    if out.lost(lost - reported_lost).is_err() { closed = true; break 'run; }
                    reported_lost = lost;
                }
            }
            _ = tokio::signal::ctrl_c() => break 'run,
            _ = sigterm.recv() => break 'run,
            _ = sleep => break 'run,
        }
    }
    // Detach first (dropping the programs), then take what is still in the ring.
    drop(bpf);
    if closed {
        return Ok(());
    }
    let ring = ring.get_mut();
    while let Some(item) = ring.next() {
        if handle(&item, &mut summary, out).is_err() {
            break;
        }
    }
    let lost = stat_total(&stats, stat::LOST);
    if lost > reported_lost {
        let _ = out.lost(lost - reported_lost);
    }
    summary.lost = lost;
    summary.untracked = stat_total(&stats, stat::NEST_OVERFLOW);
    summary.seconds = started.elapsed().as_secs_f64();
    let ns_after = counters::all_namespaces();
    summary.namespaces = ns_after.keys().filter(|k| ns_before.contains_key(k)).count();
    summary.kernel = Some(counters::delta_common(&ns_before, &ns_after));
    summary.fill_end = counters::table_fill();
    match out.summary(&summary) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing the summary"),
    }
}
