//! The VM suite's scenarios. Each builds its own namespaces, does its
//! traffic, and returns Err with a one-line reason when anything disagrees.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context, Result};
use conntrack_trace::plan::Mode as Probe;

use crate::connection::{Flow, Seqs};
use crate::counters;
use crate::evidence;
use crate::inject::{ACK, PSH, Packet, RST, RawSender, SYN, Transport};
use crate::kernel::Kernel;
use crate::observe::{Observation, Observer};
use crate::tools;
use crate::topology::{API, CLIENT_IP, Nat, SERVER_IP, Service, Topology, WEB, WIRE_TO_CLIENT_IF};
use crate::{
    filters, icmp, insert_failed, kube, migrate, out_of_sync, owner, pods, reasons, seqadj,
    table_full,
};

/// The suite's usual topology: Service DNAT in the client namespace, with kube-proxy's
/// INVALID drop rule so that injected segments never reset the connection under test.
pub const DROP_INVALID: Nat = Nat::Client { drop_invalid: true };
use crate::verify::{self, Expected, Problems, Verdict};

pub struct Ctx {
    pub kernel: Kernel,
    /// False in oracle-only mode: injections and kernel oracles are still checked.
    pub with_tracer: bool,
    /// The tracer's verdict probe for this pass over the scenarios.
    pub mode: Mode,
}

/// The tracer's modes the suite runs every scenario in: the default (what a user gets with
/// no flag: fexit where it loads, else no per-packet probe), and every other verdict probe
/// the kernel supports, forced: cold and the kprobe pair where the default is fexit,
/// `--exact` (the kprobe pair) where it is cold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Default,
    Exact,
    Cold,
    KprobePair,
}

impl Mode {
    pub fn all(kernel: &Kernel) -> Vec<Mode> {
        if kernel.fexit_attaches() {
            vec![Mode::Default, Mode::Cold, Mode::KprobePair]
        } else {
            vec![Mode::Default, Mode::Exact]
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::Default => &[],
            Mode::Exact => &["--exact"],
            Mode::Cold => &["--verdict-probe", "none"],
            Mode::KprobePair => &["--verdict-probe", "kprobe-pair"],
        }
    }

    /// What the result names carry after the scenario's name.
    pub fn suffix(self) -> &'static str {
        match self {
            Mode::Default => "",
            Mode::Exact => "+exact",
            Mode::Cold => "+cold",
            Mode::KprobePair => "+kprobe-pair",
        }
    }
}

impl Ctx {
    /// The tracer's arguments in this pass's mode; None in oracle-only runs.
    pub fn tracer_args(&self, args: &[String]) -> Option<Vec<String>> {
        self.with_tracer.then(|| {
            let mut all: Vec<String> = self.mode.args().iter().map(|a| a.to_string()).collect();
            all.extend_from_slice(args);
            all
        })
    }

    /// Whether the tracer sees every verdict in this pass (a verdict probe runs).
    pub fn complete(&self) -> bool {
        self.expected_mode() != Probe::Cold
    }

    /// The summary's `mode` this pass must produce: fexit by default wherever the kernel
    /// has nf_conntrack's BTF, the kprobe pair for `--exact` where it has not.
    pub fn expected_mode(&self) -> Probe {
        match self.mode {
            Mode::Default if self.kernel.fexit_attaches() => Probe::Fexit,
            Mode::Default | Mode::Cold => Probe::Cold,
            Mode::Exact | Mode::KprobePair => Probe::KprobePair,
        }
    }
}

pub type Scenario = fn(&Ctx) -> Result<()>;

/// Scenarios run in the default mode only. What they test does not depend on how verdicts
/// are observed: the kernel-side filter, which every mode's programs apply alike before
/// an event goes out, owner and pod attribution, done in userspace for every event, and
/// the NAT helper's sequence adjustment, read with the entry by the reason hooks of every
/// mode. Most are the suite's slowest (many tracer starts, containerd); one pass keeps the
/// whole CI run well inside its budget.
pub const DEFAULT_MODE_ONLY: &[&str] = &[
    "netns-owner",
    "cri-pod",
    "ipv4-filters",
    "ipv6-filters",
    seqadj::NAME,
];

pub const ALL: &[(&str, Scenario)] = &[
    ("tcp-window", tcp_window),
    ("tcp-bad-packets", tcp_bad_packets),
    ("tcp-reasons", reasons::tcp_reasons),
    (seqadj::NAME, seqadj::nat_helper_seqadj),
    ("udp-bad-packets", udp_bad_packets),
    ("real-retransmits", real_retransmits),
    ("port-filter", port_filter),
    ("ipv4-filters", filters::ipv4_filters),
    ("ipv6-filters", filters::ipv6_filters),
    ("icmp-errors", icmp::icmp_errors),
    ("kube-proxy-incident", kube::kube_proxy_incident),
    ("out-of-sync-rst", out_of_sync::out_of_sync_rst),
    ("migrating-calls", migrate::migrating_calls),
    ("insert-failed", insert_failed::insert_failed),
    ("netns-owner", owner::netns_owner),
    (pods::NAME, pods::cri_pod),
    // Last: it lowers the global nf_conntrack_max (restored when it ends).
    ("table-full", table_full::table_full),
];

/// Far beyond any window this connection can have (max is 1 GiB with scale 14, ours is
/// ~16 KiB), and below 2^31 so the kernel's modular before()/after() still call it "ahead".
pub const FAR: u32 = 1 << 28;
/// Traffic after which the bulk's first bytes lie more than a client window behind.
pub const BULK: usize = 256 * 1024;

/// A data segment from the backend far above the client's receive window.
pub fn seq_over(flow: &Flow, now: Seqs) -> Packet {
    Packet::tcp(
        flow.service.backend,
        flow.client_addr,
        now.server_next.wrapping_add(FAR),
        now.client_next,
        ACK | PSH,
        vec![b'o'; 100],
    )
}

/// A pure ACK from the backend acknowledging data the client never sent.
pub fn ack_over(flow: &Flow, now: Seqs) -> Packet {
    Packet::tcp(
        flow.service.backend,
        flow.client_addr,
        now.server_next,
        now.client_next.wrapping_add(FAR),
        ACK,
        Vec::new(),
    )
}

/// A pure ACK from the backend whose header ACK is right but whose SACK block reaches far
/// past anything the client sent: conntrack checks the ACK bounds on the highest SACK edge
/// (the client's SYN permitted SACK, as Linux's does by default). Returns the packet and
/// that edge. The option goes in as the first 12 bytes after a header whose data offset
/// says 8 words: NOP, NOP, SACK with one block.
pub fn sack_over(flow: &Flow, now: Seqs) -> (Packet, u32) {
    let edge = now.client_next.wrapping_add(FAR);
    let mut options = vec![1, 1, 5, 10];
    options.extend_from_slice(&now.client_next.wrapping_add(FAR - 100).to_be_bytes());
    options.extend_from_slice(&edge.to_be_bytes());
    let mut p = Packet::tcp(
        flow.service.backend,
        flow.client_addr,
        now.server_next,
        now.client_next,
        ACK,
        options,
    );
    p.transport = Transport::Tcp {
        seq: now.server_next,
        ack: now.client_next,
        flags: ACK,
        data_offset: 8,
    };
    (p, edge)
}

/// A retransmit of bytes the client received and acknowledged long ago (`old` was taken
/// before a bulk transfer of several windows).
pub fn old_retransmit(flow: &Flow, old: Seqs, now: Seqs) -> Packet {
    Packet::tcp(
        flow.service.backend,
        flow.client_addr,
        old.server_next,
        now.client_next,
        ACK | PSH,
        vec![b'r'; 100],
    )
}

/// Out-of-window segments on a live DNAT'd connection: SEQ over (INVALID), ACK over
/// (INVALID), an in-window ACK whose SACK block is over (INVALID: the kernel checks the SACK
/// edge), old retransmit below the window (IGNORE on 6.1+, INVALID before). With
/// kube-proxy's INVALID drop rule the connection must survive all three. The tracer also
/// writes `--pcap` and `--record` files, checked against the same expectations, and the
/// recording goes to the host as a fixture.
fn tcp_window(ctx: &Ctx) -> Result<()> {
    let name = &format!("tcp-window{}", ctx.mode.suffix());
    let topo = Topology::build("win", DROP_INVALID)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let old = flow.seqs()?;
    flow.bulk_to_client(BULK)?;
    let now = flow.seqs()?;
    let (sacked, sack_edge) = sack_over(&flow, now);
    let under = if ctx.kernel.window_under_is_ignored() {
        Verdict::Ignored
    } else {
        Verdict::Invalid
    };
    let expected = [
        window(
            "SEQ over window",
            seq_over(&flow, now),
            "seq_over",
            "SEQ is over",
            Verdict::Invalid,
        ),
        window(
            "ACK over sent data",
            ack_over(&flow, now),
            "ack_over",
            "ACK is over",
            Verdict::Invalid,
        ),
        window(
            "SACK over sent data",
            sacked,
            "ack_over",
            "ACK is over",
            Verdict::Invalid,
        ),
        window(
            "old retransmit",
            old_retransmit(&flow, old, now),
            "seq_under",
            "SEQ is under",
            under,
        ),
    ];
    let (pcap, record) = (evidence::pcap_path(name), evidence::record_path(name));
    let args = [
        "--pcap".into(),
        pcap.clone(),
        "--record".into(),
        record.clone(),
    ];
    let obs = inject(ctx, &topo, &args, None, &expected)?;
    let alive = flow.exchange(100);
    let mut problems = Problems::default();
    if let Err(e) = alive {
        problems.add(format!("connection did not survive the injections: {e:#}"));
    }
    check_injections(ctx, &topo, &obs, &expected, &mut problems);
    // The kernel called an ACK that is in the window "over": only the SACK edge can have
    // been compared, and the explanation must say it was.
    if let Some(trace) = &obs.trace
        && ctx.kernel.conntrack_btf
    {
        let sack = trace
            .events
            .iter()
            .find(|ev| verify::event_is_packet(ev, &expected[2].packet));
        let explain = sack.and_then(|ev| ev["window"]["explain"].as_str());
        let want = format!(
            "SACK right edge {sack_edge} (extending ack {})",
            now.client_next
        );
        if !explain.is_some_and(|x| x.starts_with(&want)) {
            problems.add(format!(
                "SACK over: explain should start with \"{want}\": {explain:?}"
            ));
        }
    }
    if obs.trace.is_some() {
        evidence::check_pcap(&pcap, &obs, &expected, &mut problems);
        evidence::check_replay(&record, &obs, &mut problems);
        if let Err(e) = evidence::print_fixture(&ctx.kernel, name, &record) {
            problems.add(format!("fixture: {e:#}"));
        }
    }
    problems.into_result()
}

/// Malformed TCP on the live connection: SYN+RST, a bad checksum (PRE_ROUTING with
/// nf_conntrack_checksum=1), a header that claims more bytes than the packet has.
fn tcp_bad_packets(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("badtcp", DROP_INVALID)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let now = flow.seqs()?;
    let (from, to) = (flow.service.backend, flow.client_addr);
    // Distinct in-window sequence numbers tell the three packets apart in log and events;
    // none of them gets as far as the window check anyway.
    let seq = |i: u32| now.server_next.wrapping_add(i * 100);
    let syn_rst = Packet::tcp(from, to, seq(0), now.client_next, SYN | RST, Vec::new());
    let mut bad_csum = Packet::tcp(from, to, seq(1), now.client_next, ACK | PSH, vec![b'c'; 50]);
    bad_csum.bad_checksum = true;
    let mut truncated = Packet::tcp(from, to, seq(2), now.client_next, ACK, Vec::new());
    truncated.transport = Transport::Tcp {
        seq: seq(2),
        ack: now.client_next,
        flags: ACK,
        data_offset: 15,
    };
    let expected = [
        plain(
            "SYN+RST",
            syn_rst,
            "bad_flags",
            "invalid tcp flag combination",
        ),
        plain("bad TCP checksum", bad_csum, "bad_checksum", "bad checksum"),
        plain(
            "truncated TCP header",
            truncated,
            "truncated",
            "truncated packet",
        ),
    ];
    let obs = inject(ctx, &topo, &[], None, &expected)?;
    let mut problems = Problems::default();
    if let Err(e) = flow.exchange(100) {
        problems.add(format!("connection did not survive the injections: {e:#}"));
    }
    check_injections(ctx, &topo, &obs, &expected, &mut problems);
    problems.into_result()
}

/// Malformed UDP: a length field longer than the datagram, and a bad checksum.
fn udp_bad_packets(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("badudp", DROP_INVALID)?;
    let mut truncated = Packet::udp(
        SocketAddrV4::new(SERVER_IP, 5353),
        SocketAddrV4::new(CLIENT_IP, 5353),
        vec![b'u'; 40],
    );
    truncated.transport = Transport::Udp {
        claimed_len: Some(8 + 40 + 64),
    };
    let mut bad_csum = Packet::udp(
        SocketAddrV4::new(SERVER_IP, 5354),
        SocketAddrV4::new(CLIENT_IP, 5354),
        vec![b'u'; 40],
    );
    bad_csum.bad_checksum = true;
    let expected = [
        plain(
            "truncated UDP",
            truncated,
            "udp_*",
            "truncated/malformed packet",
        ),
        plain("bad UDP checksum", bad_csum, "udp_*", "bad checksum"),
    ];
    let obs = inject(ctx, &topo, &[], None, &expected)?;
    let mut problems = Problems::default();
    check_injections(ctx, &topo, &obs, &expected, &mut problems);
    problems.into_result()
}

/// The stack's own retransmits: netem holds back a few of the backend's segments for a
/// second during a bulk transfer into a small window. The backend's retransmission timer
/// (~200 ms) fires long before, so it retransmits them, and the late originals arrive after
/// the stream has moved on by more than a window. No expectation is made up for what
/// conntrack does with them: the tracer must agree with the kernel's log and counters.
fn real_retransmits(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("rtx", DROP_INVALID)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let retrans_before = flow.server_retransmits()?;
    let stacks_before = [
        counters::tcp_ext(&topo.server)?,
        counters::tcp_ext(&topo.client)?,
    ];
    let mut observer = Observer::start(&topo, ctx, &[])?;
    let passed = netem_transfer(&topo, &mut flow)?;
    flow.exchange(100).context("connection after netem")?;
    let retransmits = flow.server_retransmits()? - retrans_before;
    observer.wait_logs(0)?;
    let obs = observer.finish(|o| o.logs.len())?;

    let stacks_after = [
        counters::tcp_ext(&topo.server)?,
        counters::tcp_ext(&topo.client)?,
    ];
    let moved = |side: usize, name: &str| {
        stacks_after[side]
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(stacks_before[side].get(name).copied().unwrap_or(0))
    };
    let ignored = obs
        .logs
        .iter()
        .filter(|l| ctx.kernel.window_under_is_ignored() && l.is_window_ignore())
        .count();
    println!(
        "real-retransmits: netem passed {passed} skbs; backend retransmitted {retransmits} segments (RTO {}, fast {}, loss probes {}); \
         client saw {} old duplicates (D-SACK); conntrack logged {} lines ({ignored} IGNORE), invalid counter +{}",
        moved(0, "TCPTimeouts"),
        moved(0, "TCPFastRetrans"),
        moved(0, "TCPLossProbes"),
        moved(1, "TCPDSACKOldSent"),
        obs.logs.len(),
        obs.invalid_delta(topo.client.inode())
    );
    let mut problems = Problems::default();
    if retransmits == 0 {
        problems.add("netem caused no retransmits: the scenario proved nothing".into());
    }
    // The kernel agrees with itself: every INVALID it counted was logged, so the log lines
    // the tracer is matched against are complete.
    let logged_invalid = obs.logs.len() - ignored;
    let counted = obs.invalid_delta(topo.client.inode());
    if logged_invalid as u64 != counted {
        problems.add(format!(
            "kernel counted {counted} INVALID but logged {logged_invalid}: the log oracle is incomplete"
        ));
    }
    verify::tracer_matches_kernel(&ctx.kernel, &topo, &obs, None, &mut problems);
    problems.into_result()
}

/// How long netem holds back the segments it picks: far above the minimum RTO (200 ms), so
/// the backend always retransmits before the original arrives.
const NETEM_DELAY: Duration = Duration::from_millis(1000);

/// Share of the backend's segments netem holds back. A transfer is ~400 skbs; at 10% each
/// run sees dozens of real retransmits (35-49 in the VM), where 3% once saw none at all.
pub const NETEM_HELD_PERCENT: u32 = 10;

/// A bulk transfer while netem on the wire's client-facing side delays
/// `NETEM_HELD_PERCENT` of the backend's segments by `NETEM_DELAY` (the others pass at once:
/// netem's "reorder"). The qdisc is removed only after the delayed originals had time to
/// leave, since deleting it drops its queue. Returns how many packets (skbs) the qdisc passed.
pub fn netem_transfer(topo: &Topology, flow: &mut Flow) -> Result<u64> {
    let tc = tools::tc().context("no tc binary in this image: netem cannot be configured")?;
    let delay = format!("{}ms", NETEM_DELAY.as_millis());
    let passing = format!("{}%", 100 - NETEM_HELD_PERCENT);
    topo.wire.exec(
        tc,
        &[
            "qdisc",
            "add",
            "dev",
            WIRE_TO_CLIENT_IF,
            "root",
            "netem",
            "delay",
            &delay,
            "reorder",
            &passing,
        ],
    )?;
    let transfer = flow.bulk_to_client(2 * BULK);
    std::thread::sleep(NETEM_DELAY + Duration::from_millis(300));
    let stats = topo
        .wire
        .exec(tc, &["-s", "qdisc", "show", "dev", WIRE_TO_CLIENT_IF]);
    let removed = topo
        .wire
        .exec(tc, &["qdisc", "del", "dev", WIRE_TO_CLIENT_IF, "root"]);
    transfer.context("bulk transfer under netem")?;
    removed?;
    // " Sent 123456 bytes 89 pkt (dropped 0, ...)"
    let stats = stats?;
    stats
        .split_whitespace()
        .skip_while(|w| *w != "bytes")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("packet count in {stats:?}"))
}

/// `--port 9090`: of two identical out-of-window segments, one on the 8080 backend's
/// connection and one on the 9090 backend's, only the latter may be reported.
fn port_filter(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("filter", DROP_INVALID)?;
    let mut web = Flow::open(&topo, WEB)?;
    let mut api = Flow::open(&topo, API)?;
    web.exchange(1000)?;
    api.exchange(1000)?;
    let port = API.backend.port();
    let hidden = window(
        "SEQ over on :8080",
        seq_over(&web, web.seqs()?),
        "seq_over",
        "SEQ is over",
        Verdict::Invalid,
    );
    let shown = window(
        "SEQ over on :9090",
        seq_over(&api, api.seqs()?),
        "seq_over",
        "SEQ is over",
        Verdict::Invalid,
    );
    let expected = [hidden, shown];
    let args = ["--port".to_string(), port.to_string()];
    let obs = inject(ctx, &topo, &args, Some(port), &expected)?;

    let mut problems = Problems::default();
    verify::kernel_saw_injections(&topo, &obs, &expected, &mut problems);
    verify::tracer_reported_injections(&ctx.kernel, &topo, &obs, &expected[1..], &mut problems);
    verify::tracer_matches_kernel(&ctx.kernel, &topo, &obs, Some(port), &mut problems);
    problems.into_result()
}

pub fn window(
    what: &'static str,
    packet: Packet,
    code: &'static str,
    text: &'static str,
    verdict: Verdict,
) -> Expected {
    let service = [WEB, API]
        .into_iter()
        .find(|s: &Service| s.backend == packet.src);
    Expected {
        what,
        packet,
        reason_code: code,
        kernel_text: text,
        verdict,
        service,
    }
}

pub fn plain(
    what: &'static str,
    packet: Packet,
    code: &'static str,
    text: &'static str,
) -> Expected {
    Expected {
        what,
        packet,
        reason_code: code,
        kernel_text: text,
        verdict: Verdict::Invalid,
        service: None,
    }
}

/// Sends the packets from the backend's namespace (they enter the conntrack namespace
/// through PRE_ROUTING) inside one observation window with the tracer running with `args`;
/// `port` is the `--port` filter among them, if any, to which the kernel's lines are held.
pub fn inject(
    ctx: &Ctx,
    topo: &Topology,
    args: &[String],
    port: Option<u16>,
    expected: &[Expected],
) -> Result<Observation> {
    let sender = RawSender::open(&topo.server)?;
    let mut observer = Observer::start(topo, ctx, args)?;
    for e in expected {
        println!("inject: {}: {}", e.what, e.packet.describe());
        sender.send(&e.packet)?;
        // Keep packets apart so log lines and events arrive in a readable order.
        std::thread::sleep(Duration::from_millis(20));
    }
    observer.wait_logs(expected.len())?;
    observer.finish(|o| {
        o.logs
            .iter()
            .filter(|l| port.is_none_or(|p| l.involves_port(p)))
            .count()
    })
}

pub fn check_injections(
    ctx: &Ctx,
    topo: &Topology,
    obs: &Observation,
    expected: &[Expected],
    problems: &mut Problems,
) {
    verify::kernel_saw_injections(topo, obs, expected, problems);
    verify::tracer_reported_injections(&ctx.kernel, topo, obs, expected, problems);
    verify::tracer_matches_kernel(&ctx.kernel, topo, obs, None, problems);
}

/// The scenarios the caller asked for, all of them by default.
pub fn select(names: &[String]) -> Result<Vec<(&'static str, Scenario)>> {
    if names.is_empty() {
        return Ok(ALL.to_vec());
    }
    names
        .iter()
        .map(|n| {
            ALL.iter()
                .find(|(name, _)| name == n)
                .copied()
                .with_context(|| {
                    format!(
                        "unknown scenario {n}; known: {}",
                        ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    )
                })
        })
        .collect()
}
