//! The live tracer: attach per the plan, drain the ring buffer on a tokio loop, print, and
//! summarize against the kernel's own counters when stopped.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FExit, KProbe, TracePoint},
};
use conntrack_trace_common::{filter::Filter, stat, verdict::LostKey};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    btf::KernelBtf,
    check, counters, ebpf,
    events::{Events, Stop},
    hints::{Hints, Node},
    metrics::Metrics,
    misses::{self, Misses},
    output::{Loss, Output},
    owner::OwnerCache,
    plan::{Flavor, Plan, Program, Want},
    privs,
    record::Recorder,
    summary::Ending,
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
    /// Which verdict probe to use (`--exact`, `--verdict-probe`, or the default).
    pub want: Want,
    /// Also append every raw record to this file (`replay` reads it back).
    pub record: Option<std::path::PathBuf>,
    /// `--metrics`: counted into as events arrive; also what is served when attaching fails.
    pub metrics: Option<Arc<Metrics>>,
    /// The namespaces `--pod`/`--k8s-namespace` selected, for the kernel's `NETNS_FILTER`.
    pub netns_set: Vec<u32>,
    /// Where the container runtime's CRI API is (pod names in owners).
    pub cri_socket: std::path::PathBuf,
}

/// Loads and attaches every program in the plan. The return probe goes on right before the
/// entry probe, last: no entry is ever pushed without its return being watched, and few
/// returns come without their entry in between (those the session's start leaves out).
fn attach(bpf: &mut Ebpf, plan: &Plan) -> Result<()> {
    let mut order: Vec<_> = plan.attach.iter().collect();
    order.sort_by_key(|a| match a.program {
        Program::NfConntrackInRet => 1,
        Program::NfConntrackIn => 2,
        _ => 0,
    });
    for a in order {
        let prog = bpf
            .program_mut(a.program.as_str())
            .with_context(|| format!("program {} missing from the eBPF object", a.program))?;
        let what = || {
            format!(
                "attaching {} {} to {}",
                a.flavor.kind(),
                a.program,
                a.target
            )
        };
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
            Flavor::FExit(func) => {
                let p: &mut FExit = prog.try_into()?;
                ebpf::load_fexit(p, func).with_context(what)?;
                p.attach().with_context(what)?;
            }
        }
    }
    Ok(())
}

/// Writes out a batch: the outputs and the recording.
fn flush(
    out: &mut dyn Output,
    recorder: Option<&mut Recorder<std::io::BufWriter<std::fs::File>>>,
) -> io::Result<()> {
    if let Some(r) = recorder {
        r.flush()?;
    }
    out.flush()
}

/// Writes a `lost` line for each cause (ring full, skipped runs) that grew since `reported`,
/// which it updates, and counts it in the metrics; true when it wrote any.
fn report_losses(
    out: &mut dyn Output,
    metrics: Option<&Metrics>,
    reported: &mut [u64; 4],
    now: [u64; 4],
) -> io::Result<bool> {
    let mut wrote = false;
    let causes = [
        Loss::RingFull,
        Loss::Recursion,
        Loss::Unpaired,
        Loss::KprobeMissed,
    ];
    for ((told, now), cause) in reported.iter_mut().zip(now).zip(causes) {
        if now > *told {
            if let Some(m) = metrics {
                m.lost(cause, now - *told);
            }
            out.lost(now - *told, cause)?;
            *told = now;
            wrote = true;
        }
    }
    Ok(wrote)
}

/// Packet events the ring buffer could not take, as the kernel side counted them by kind
/// (`LOST_BY`), and how many of each the metrics have been given.
struct LostBy {
    map: PerCpuHashMap<MapData, LostKey, u64>,
    told: HashMap<Vec<u8>, u64>,
}

impl LostBy {
    /// Adds to the metrics' events what was lost since the last call, by event and reason.
    fn count(&mut self, metrics: &Metrics) {
        for (key, per_cpu) in self.map.iter().flatten() {
            let total: u64 = per_cpu.iter().sum();
            // SAFETY: LostKey is repr(C) plain data with every padding byte spelled out.
            let bytes = unsafe {
                std::slice::from_raw_parts((&raw const key).cast::<u8>(), size_of::<LostKey>())
            };
            let told = self.told.insert(bytes.to_vec(), total).unwrap_or(0);
            if total > told {
                let (v, code) = verdict::lost_kind(&key);
                metrics.event(v, code, total - told);
            }
        }
    }
}

fn stat_total(stats: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    stats.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// Everything up to attached programs: what fails on a kernel the tracer cannot run on.
/// Also returns how long reading kallsyms and BTF into the plan took.
fn start(opts: &Options, launched: Instant) -> Result<(Plan, KernelBtf, Ebpf, Duration)> {
    privs::check()?;
    if !check::kprobes_available() {
        bail!(
            "this kernel cannot attach kprobes ({}). `conntrack-trace check` verifies the \
             programs here; `cargo xtask demo` shows the tracer working in a VM",
            check::KPROBES_MISSING
        );
    }
    let (plan, btf) = Plan::for_running_kernel(opts.want)?;
    let planned = launched.elapsed();
    let mut bpf = ebpf::open(&plan, opts.ring_bytes, &opts.filter)?;
    if !opts.netns_set.is_empty() {
        let map = bpf.map_mut("NETNS_FILTER").context("NETNS_FILTER map")?;
        let mut set: aya::maps::HashMap<_, u32, u8> = aya::maps::HashMap::try_from(map)?;
        for ino in &opts.netns_set {
            set.insert(ino, 1, 0).context("filling NETNS_FILTER")?;
        }
    }
    attach(&mut bpf, &plan)?;
    Ok((plan, btf, bpf, planned))
}

/// With `--metrics`, a node the tracer cannot attach on still serves the kernel's counters,
/// and `conntrack_trace_attached 0` says why, until stopped: an agent that exited would
/// only show as a crash loop.
async fn serve_detached(
    metrics: &Metrics,
    why: &anyhow::Error,
    duration: Option<Duration>,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) {
    eprintln!(
        "conntrack-trace: not tracing: {why:#}; serving the kernel's counters on --metrics until stopped"
    );
    metrics.not_attached(&format!("{why:#}"));
    let sleep = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
        _ = sleep => {}
    }
}

/// Traces until stopped: plan, open and attach (`start`), then the loop, then the summary.
pub async fn run(opts: Options, out: &mut dyn Output) -> Result<()> {
    let launched = Instant::now();
    // Installed first and kept for the whole run: a Ctrl-C during start-up or between two
    // loop turns is then delivered to the loop (a fresh ctrl_c() future per turn misses
    // signals that arrive between turns, and before any, SIGINT would kill the process
    // with probes attached and no summary).
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // Started before BTF is read, so the first /proc scan is done by the first event.
    let owners = OwnerCache::start(Some(opts.cri_socket.clone()));
    if let Some(m) = &opts.metrics {
        m.set_owners(owners.clone());
    }
    let (plan, _btf, mut bpf, planned) = match (start(&opts, launched), &opts.metrics) {
        (Ok(started), _) => started,
        (Err(e), Some(m)) => {
            serve_detached(m, &e, opts.duration, &mut sigint, &mut sigterm).await;
            return Ok(());
        }
        (Err(e), None) => return Err(e),
    };
    let mut session = Session::open(&opts, &plan, &mut bpf, owners, (planned, launched))?;
    let stop = session
        .run(&opts, &bpf, out, &mut sigint, &mut sigterm)
        .await?;
    session.finish(stop, &opts, &plan, bpf, out)
}

/// A session once attached: what it reads from the kernel side, what it has told the
/// stream, and what the summary will compare against.
struct Session {
    ring: AsyncFd<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    /// With --metrics: lost packet events by kind.
    lost_by: Option<LostBy>,
    recorder: Option<Recorder<std::io::BufWriter<std::fs::File>>>,
    events: Events,
    owners: OwnerCache,
    /// What the stream has been told so far: ring-full losses, skipped program runs,
    /// verdicts the kprobe pair could not pair, kprobe hits the kernel missed.
    reported: [u64; 4],
    /// Unpaired returns counted before the session began: calls already running when the
    /// pair attached, whose entry came before it. Not part of the traced window, as the
    /// kernel's counters read at the same moment are not.
    unpaired_before: u64,
    /// The kprobe links, to read what the kernel missed; and what it had missed before the
    /// session began, left out as `unpaired_before` is.
    misses: Misses,
    kprobe_before: u64,
    /// The kernel's counters per namespace once attached.
    ns_before: BTreeMap<u64, counters::Stats>,
    started: Instant,
    /// Reading kallsyms and BTF into the plan; launch to attached.
    startup: (Duration, Duration),
}

impl Session {
    fn unpaired(&self) -> u64 {
        stat_total(&self.stats, stat::UNPAIRED).saturating_sub(self.unpaired_before)
    }

    /// None where the kernel does not report kprobe misses.
    fn kprobe_missed(&self) -> Option<u64> {
        let now = self.misses.kprobe()?;
        Some(now.saturating_sub(self.kprobe_before))
    }

    /// Takes the maps the loop reads, reads the kernel's counters and says it is attached.
    fn open(
        opts: &Options,
        plan: &Plan,
        bpf: &mut Ebpf,
        owners: OwnerCache,
        (planned, launched): (Duration, Instant),
    ) -> Result<Self> {
        if let Some(m) = &opts.metrics {
            m.attached(plan.mode);
        }
        if opts.verbose {
            for a in &plan.attach {
                eprintln!(
                    "conntrack-trace: plan: {:<9} {:<30} -> {}",
                    a.flavor.kind(),
                    a.program,
                    a.target
                );
            }
        }
        for n in &plan.notes {
            eprintln!("conntrack-trace: note: {n}");
        }
        let ring = RingBuf::try_from(bpf.take_map("EVENTS").context("EVENTS map")?)?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(bpf.take_map("STATS").context("STATS map")?)?;
        let lost_by = match &opts.metrics {
            Some(_) => Some(LostBy {
                map: PerCpuHashMap::try_from(bpf.take_map("LOST_BY").context("LOST_BY map")?)?,
                told: HashMap::new(),
            }),
            None => None,
        };
        // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd
        // lives.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("polling the ring buffer: {e}"))?;

        let ns_before = counters::all_namespaces();
        let unpaired_before = stat_total(&stats, stat::UNPAIRED);
        let misses = Misses::find(bpf, plan.kprobe_missed);
        let kprobe_before = misses.kprobe().unwrap_or(0);
        let started = Instant::now();
        let startup = (planned, launched.elapsed());
        eprintln!(
            "conntrack-trace: attached {} programs on {} in {} ms (verdicts: {}; window reasons from {:?}); Ctrl-C to stop",
            plan.attach.len(),
            plan.release,
            startup.1.as_millis(),
            plan.mode.as_str(),
            plan.window
        );

        let clock = Clock::now();
        let recorder = opts
            .record
            .as_deref()
            .map(|p| Recorder::create(p, &clock))
            .transpose()?;
        let mut events = Events::new(clock, Hints::new(Node::read()), opts.resets, opts.count);
        events.metrics = opts.metrics.clone();
        events.owners = Some(owners.clone());
        Ok(Self {
            ring,
            stats,
            lost_by,
            recorder,
            events,
            owners,
            reported: [0; 4],
            unpaired_before,
            misses,
            kprobe_before,
            ns_before,
            started,
            startup,
        })
    }

    /// Reads and prints events until a signal, `--duration`, `--count` or a closed output;
    /// reports losses as they grow. Returns why it stopped (None: a signal or the duration).
    async fn run(
        &mut self,
        opts: &Options,
        bpf: &Ebpf,
        out: &mut dyn Output,
        sigint: &mut tokio::signal::unix::Signal,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> Result<Option<Stop>> {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
        loop {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        if let Some(r) = self.recorder.as_mut() {
                            r.write(&item).context("writing the recording")?;
                        }
                        if let Err(s) = self.events.handle(&item, out) {
                            return Ok(Some(s));
                        }
                    }
                    if let Err(e) = flush(out, self.recorder.as_mut()) {
                        return Ok(Some(Stop::from(e)));
                    }
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    let now = [
                        stat_total(&self.stats, stat::LOST),
                        misses::recursion(bpf),
                        self.unpaired(),
                        self.kprobe_missed().unwrap_or(0),
                    ];
                    if let (Some(l), Some(m)) = (self.lost_by.as_mut(), &opts.metrics) {
                        l.count(m);
                    }
                    let told =
                        report_losses(out, opts.metrics.as_deref(), &mut self.reported, now);
                    if told.and_then(|wrote| if wrote { out.flush() } else { Ok(()) }).is_err() {
                        return Ok(Some(Stop::Closed));
                    }
                }
                _ = sigint.recv() => return Ok(None),
                _ = sigterm.recv() => return Ok(None),
                _ = sleep => return Ok(None),
            }
        }
    }

    /// Detaches, prints what is still in the ring and the last losses, then the summary.
    fn finish(
        mut self,
        stop: Option<Stop>,
        opts: &Options,
        plan: &Plan,
        bpf: Ebpf,
        out: &mut dyn Output,
    ) -> Result<()> {
        // The kernel's counters are read while the probes are still attached (as they were
        // at the start): every packet they count was traced, so a busy node cannot show a
        // gap that is only the moment between detaching and reading. Then detach (dropping
        // the programs) and take what is still in the ring.
        let ns_after = counters::all_namespaces();
        let skipped = misses::recursion(&bpf);
        let kprobe_missed = self.kprobe_missed();
        drop(bpf);
        match stop {
            Some(Stop::Closed) => return Ok(()),
            Some(Stop::Io(kind)) => bail!("writing output: {}", io::Error::from(kind)),
            // Past --count, the rest of the ring is not printed, but still counted as seen.
            Some(Stop::Count) => {}
            None => {
                let ring = self.ring.get_mut();
                while let Some(item) = ring.next() {
                    if let Some(r) = self.recorder.as_mut() {
                        r.write(&item).context("writing the recording")?;
                    }
                    if self.events.handle(&item, out).is_err() {
                        break;
                    }
                }
            }
        }
        let lost = stat_total(&self.stats, stat::LOST);
        if let (Some(l), Some(m)) = (self.lost_by.as_mut(), &opts.metrics) {
            l.count(m);
        }
        let unpaired = self.unpaired();
        let metrics = opts.metrics.as_deref();
        let now = [lost, skipped, unpaired, kprobe_missed.unwrap_or(0)];
        let _ = report_losses(out, metrics, &mut self.reported, now);
        let _ = flush(out, self.recorder.as_mut());
        let mut summary = self.events.summary;
        summary.finish(Ending {
            lost,
            recursion_misses: skipped,
            kprobe_misses: kprobe_missed,
            untracked: unpaired,
            orphan_reasons: stat_total(&self.stats, stat::ORPHAN_REASON),
            seconds: self.started.elapsed().as_secs_f64(),
            startup: self.startup,
            before: &self.ns_before,
            after: &ns_after,
            filtered: opts.filter != Filter::any(),
            mode: plan.mode,
            owner_scans: self.owners.scan_stats(),
        });
        match out.summary(&summary).and_then(|()| out.flush()) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
            r => r.context("writing the summary"),
        }
    }
}
