//! The kube-proxy incident, end to end on a node that routes and DNATs:
//!
//! ```text
//!  client 10.0.0.1 --> node (wire netns: nat PREROUTING DNAT 10.96.0.10:80 -> 10.0.1.2:8080) --> backend 10.0.1.2
//! ```
//!
//! The backend sends a segment the node's conntrack finds INVALID (an old retransmit up to
//! 6.0, a segment beyond the client's window since 6.1, where an old retransmit is only
//! IGNOREd). INVALID means no entry, so no reverse NAT: the segment reaches the client from
//! 10.0.1.2:8080 instead of 10.96.0.10:80. The client has no socket for that tuple and
//! answers RST; the RST carries exactly the sequence number the backend expects (the
//! segment's ACK), so the backend's connection is reset. The RST itself matches no entry at
//! the node either and is INVALID there too, which conntrack logs only since 6.8: a tracer
//! with a verdict probe (fexit by default where it loads, or the kprobe pair) sees it on
//! every kernel; the cold mode sees it only where it is logged, and says what it missed.

use std::io::{ErrorKind, Read};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::connection::Flow;
use crate::counters;
use crate::evidence;
use crate::inject::{Packet, RST, RawSender, flag_letters};
use crate::observe::{Observation, Observer};
use crate::scenarios::{BULK, Ctx, old_retransmit, seq_over, window};
use crate::topology::{Nat, Topology, WEB};
use crate::verify::{self, Expected, Problems, Verdict, brief, event_is_packet, log_is_packet};

const NAME: &str = "kube-proxy-incident";

/// How long the RST may take to reach the backend after the INVALID segment was sent.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

pub fn kube_proxy_incident(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("kube", Nat::Node)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let old = flow.seqs()?;
    flow.bulk_to_client(BULK)?;
    let now = flow.seqs()?;
    let sender = RawSender::open(&topo.server)?;
    let rsts_before = counters::tcp_mib(&topo.client)?;
    let record = evidence::record_path(NAME);
    let args = ["--record".to_string(), record.clone()];
    let mut observer = Observer::start(&topo, ctx, &args)?;
    let mut problems = Problems::default();

    let mut injected = Vec::new();
    if ctx.kernel.window_under_is_ignored() {
        let survivor = window(
            "old retransmit",
            old_retransmit(&flow, old, now),
            "seq_under",
            "SEQ is under",
            Verdict::Ignored,
        );
        println!("inject: {}: {}", survivor.what, survivor.packet.describe());
        sender.send(&survivor.packet)?;
        observer.wait_logs(1)?;
        injected.push(survivor);
        if let Err(e) = flow.exchange(100) {
            problems.add(format!(
                "connection did not survive the IGNOREd old retransmit: {e:#}"
            ));
            return problems.into_result();
        }
    }
    let killer = if ctx.kernel.window_under_is_ignored() {
        window(
            "SEQ over window",
            seq_over(&flow, flow.seqs()?),
            "seq_over",
            "SEQ is over",
            Verdict::Invalid,
        )
    } else {
        window(
            "old retransmit",
            old_retransmit(&flow, old, now),
            "seq_under",
            "SEQ is under",
            Verdict::Invalid,
        )
    };
    println!("inject: {}: {}", killer.what, killer.packet.describe());
    sender.send(&killer.packet)?;
    let reset = backend_reset(&flow);
    // The client's answer: the segment carried an ACK, so the RST's sequence number is that
    // ACK and the RST itself carries none (RFC 793).
    let (_, ack) = killer.packet.seq_ack().expect("a TCP segment");
    let rst = Packet::tcp(flow.client_addr, WEB.backend, ack, 0, RST, Vec::new());
    injected.push(killer);
    observer.wait_logs(injected.len())?;
    let node = topo.ct().inode();
    let under_ignored = ctx.kernel.window_under_is_ignored();
    let obs = observer.finish(|o| {
        o.invalid_delta(node) as usize
            + o.logs
                .iter()
                .filter(|l| under_ignored && l.is_window_ignore())
                .count()
    })?;
    let rsts = counters::tcp_mib(&topo.client)?;

    // The kernel side: what was injected happened, whether or not a tracer ran.
    match reset {
        Ok(()) => println!("kube: the backend's connection was reset (ECONNRESET)"),
        Err(e) => problems.add(format!("backend connection: {e}")),
    }
    let sent_rsts = rsts["OutRsts"].saturating_sub(rsts_before["OutRsts"]);
    if sent_rsts != 1 {
        problems.add(format!(
            "the client stack sent {sent_rsts} RSTs (Tcp OutRsts), expected exactly one"
        ));
    }
    for e in &injected {
        let logs: Vec<_> = obs
            .logs
            .iter()
            .filter(|l| log_is_packet(l, &e.packet))
            .collect();
        if !matches!(logs.as_slice(), [l] if l.reason.contains(e.kernel_text)) {
            problems.add(format!(
                "{}: kernel should have logged it once with \"{}\": {:?}",
                e.what, e.kernel_text, logs
            ));
        }
    }
    let rst_logs = obs.logs.iter().filter(|l| log_is_packet(l, &rst)).count();
    println!(
        "kube: the kernel logged {rst_logs} line(s) for the client's RST {}",
        rst.describe()
    );
    // At the node: the INVALID segment and the RST that answered it; nowhere else.
    for ns in topo.namespaces() {
        let want = if ns.inode() == node { 2 } else { 0 };
        let got = obs.invalid_delta(ns.inode());
        if got != want {
            problems.add(format!(
                "kernel invalid counter in {} moved by {got}, expected {want} (the INVALID segment and the client's RST at the node)",
                ns.name()
            ));
        }
    }

    // The tracer side.
    verify::tracer_matches_kernel(&ctx.kernel, &topo, &obs, None, &mut problems);
    if obs.trace.is_some() {
        verify::tracer_reported_injections(&ctx.kernel, &topo, &obs, &injected, &mut problems);
        check_rst_reported(&topo, &obs, &rst, &mut problems);
        let killer = &injected[injected.len() - 1];
        check_incident(ctx, &topo, &obs, &flow, killer, &mut problems);
        evidence::check_replay(&record, &obs, &mut problems);
        if let Err(e) = evidence::print_fixture(&ctx.kernel, NAME, &record) {
            problems.add(format!("fixture: {e:#}"));
        }
    }
    problems.into_result()
}

/// Waits until a read on the backend's socket fails with ECONNRESET.
fn backend_reset(flow: &Flow) -> Result<(), String> {
    let deadline = Instant::now() + RESET_TIMEOUT;
    flow.server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    loop {
        match (&flow.server).read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if Instant::now() > deadline {
                    return Err(format!("not reset within {RESET_TIMEOUT:?}"));
                }
            }
            Ok(0) => return Err("closed without a reset (EOF)".into()),
            Ok(n) => return Err(format!("received {n} unexpected bytes instead of a reset")),
            Err(e) => return Err(format!("read failed with {e}, expected ECONNRESET")),
        }
    }
}

/// The client's RST is reported as INVALID where the node judged it: its own packet, in the
/// node's namespace, arriving from the client's side, with the kernel's reason when the
/// kernel logged one and without any when it did not.
fn check_rst_reported(topo: &Topology, obs: &Observation, rst: &Packet, problems: &mut Problems) {
    let events: Vec<&Value> = ["invalid", "ignored"]
        .iter()
        .flat_map(|k| obs.events(k))
        .filter(|ev| event_is_packet(ev, rst))
        .collect();
    let logged = obs.logs.iter().find(|l| log_is_packet(l, rst));
    if !obs.complete && logged.is_none() {
        if !events.is_empty() {
            problems.add(format!(
                "client's RST: not logged and no verdict probe ran, yet {} events: {}",
                events.len(),
                brief(events[0])
            ));
        }
        let summary = obs.trace.as_ref().and_then(|t| t.summary.as_ref());
        if summary.is_none_or(|s| s["missed"].is_null()) {
            problems.add(
                "client's RST: the kernel counted it but did not log it; the cold summary \
                 should say an INVALID was missed"
                    .into(),
            );
        }
        return;
    }
    let [ev] = events.as_slice() else {
        return problems.add(format!(
            "client's RST: tracer printed {} verdict events for {}",
            events.len(),
            rst.describe()
        ));
    };
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.add(format!("client's RST: {what}; event {}", brief(ev)));
        }
    };
    check(
        ev["event"] == "invalid",
        "event should be \"invalid\"".into(),
    );
    check(
        ev["netns"].as_u64() == Some(topo.ct().inode()),
        format!("netns should be the node's {}", topo.ct().inode()),
    );
    check(
        ev["hook"].is_null() || ev["hook"] == "PRE_ROUTING",
        "hook should be PRE_ROUTING".into(),
    );
    check(
        ev["ifindex"].is_null() || ev["ifindex"].as_u64() == Some(topo.from_client_ifindex),
        format!("ifindex should be {}", topo.from_client_ifindex),
    );
    let flags: std::collections::BTreeSet<char> =
        ev["tcp"]["flags"].as_str().unwrap_or("").chars().collect();
    check(flags == flag_letters(RST), "tcp.flags should be R".into());
    match logged {
        Some(log) => check(
            ev["reason"].as_str() == Some(log.reason.as_str()),
            format!("reason should be the kernel's \"{}\"", log.reason),
        ),
        None => check(
            ev["reason_code"] == "unknown",
            "the kernel logged no reason, so reason_code should be unknown".into(),
        ),
    }
}

/// Exactly one incident: the INVALID segment at the node linked to the RST the client's
/// stack sent, with the Service, the backend and the client of the DNAT'd connection.
fn check_incident(
    ctx: &Ctx,
    topo: &Topology,
    obs: &Observation,
    flow: &Flow,
    killer: &Expected,
    problems: &mut Problems,
) {
    let incidents = obs.events("incident");
    let [inc] = incidents.as_slice() else {
        return problems.add(format!(
            "tracer printed {} incidents, expected exactly one",
            incidents.len()
        ));
    };
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.add(format!("incident: {what}; incident {inc}"));
        }
    };
    let addr = |v: &Value| {
        v["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .zip(v["port"].as_u64())
    };
    let want = |a: std::net::SocketAddrV4| Some((*a.ip(), u64::from(a.port())));
    check(
        addr(&inc["service"]) == want(WEB.vip),
        format!("service should be {}", WEB.vip),
    );
    check(
        addr(&inc["backend"]) == want(WEB.backend),
        format!("backend should be {}", WEB.backend),
    );
    check(
        addr(&inc["client"]) == want(flow.client_addr),
        format!("client should be {}", flow.client_addr),
    );
    check(
        event_is_packet(&inc["invalid"], &killer.packet) && inc["invalid"]["event"] == "invalid",
        format!("invalid should be the INVALID {}", killer.packet.describe()),
    );
    check(
        inc["invalid"]["netns"].as_u64() == Some(topo.ct().inode()),
        format!("invalid.netns should be the node's {}", topo.ct().inode()),
    );
    let reset = &inc["reset"];
    check(
        reset["netns"].as_u64() == Some(topo.client.inode()),
        format!("reset.netns should be the client's {}", topo.client.inode()),
    );
    check(
        verify::endpoint(reset, "s") == Some((*flow.client_addr.ip(), flow.client_addr.port()))
            && verify::endpoint(reset, "d") == Some((*WEB.backend.ip(), WEB.backend.port())),
        format!("reset should go {} -> {}", flow.client_addr, WEB.backend),
    );
    // The RST did reset the backend (ECONNRESET, checked above), so "reset" is the truth.
    // Telling it from the RST's sequence number needs the window state: only a tracer that
    // has none (no nf_conntrack BTF) may say "unknown" instead.
    let degraded = !ctx.kernel.conntrack_btf && inc["invalid"]["window"].is_null();
    check(
        inc["effect"] == "reset" || (degraded && inc["effect"] == "unknown"),
        format!(
            "effect should be reset{}",
            if degraded { " (or unknown)" } else { "" }
        ),
    );
}
