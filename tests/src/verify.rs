//! The assertions. Expectations come only from what a scenario injected and from the
//! kernel's own counters and log lines; the tracer's output is checked against them, never
//! the other way round.

use std::net::{IpAddr, Ipv4Addr};

use serde_json::Value;

use crate::inject::{Packet, Transport, flag_letters};
use crate::kernel::Kernel;
use crate::kmsg::CtLog;
use crate::observe::Observation;
use crate::topology::{Service, Topology};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Invalid,
    Ignored,
}

impl Verdict {
    fn event(self) -> &'static str {
        match self {
            Verdict::Invalid => "invalid",
            Verdict::Ignored => "ignored",
        }
    }
}

/// A forged packet and what the kernel is documented to do with it.
pub struct Expected {
    pub what: &'static str,
    pub packet: Packet,
    /// Tracer `reason_code`; a trailing `*` accepts any code with that prefix (the UDP
    /// codes are only specified as `udp_*`).
    pub reason_code: &'static str,
    /// A part of the kernel's log text common to all kernel versions.
    pub kernel_text: &'static str,
    pub verdict: Verdict,
    /// For segments of a connection through a Service: the tracer must show its conntrack
    /// entry (client -> VIP original, backend -> client reply).
    pub service: Option<Service>,
}

/// Problems found so far; a scenario fails when this is not empty.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn add(&mut self, p: String) {
        self.0.push(p);
    }

    pub fn into_result(self) -> anyhow::Result<()> {
        for p in &self.0 {
            println!("problem: {p}");
        }
        match self.0.as_slice() {
            [] => Ok(()),
            [one] => Err(anyhow::anyhow!("{one}")),
            [first, rest @ ..] => Err(anyhow::anyhow!("{first} (+{} more problems)", rest.len())),
        }
    }
}

/// The injection did what it was meant to: the kernel logged each packet once with the
/// expected reason, and its INVALID counter moved by the number of INVALID packets, in the
/// conntrack namespace only.
pub fn kernel_saw_injections(
    topo: &Topology,
    obs: &Observation,
    expected: &[Expected],
    problems: &mut Problems,
) {
    for e in expected {
        let logs: Vec<&CtLog> = obs
            .logs
            .iter()
            .filter(|l| log_is_packet(l, &e.packet))
            .collect();
        match logs.as_slice() {
            [log] if log.reason.contains(e.kernel_text) => {}
            [log] => problems.add(format!(
                "{}: kernel logged \"{}\", expected \"{}\"",
                e.what, log.reason, e.kernel_text
            )),
            other => problems.add(format!(
                "{}: kernel logged {} lines for {}",
                e.what,
                other.len(),
                e.packet.describe()
            )),
        }
    }
    let invalid = expected
        .iter()
        .filter(|e| e.verdict == Verdict::Invalid)
        .count() as u64;
    for ns in topo.namespaces() {
        let want = if ns.inode() == topo.ct().inode() {
            invalid
        } else {
            0
        };
        let got = obs.invalid_delta(ns.inode());
        if got != want {
            problems.add(format!(
                "kernel invalid counter in {} moved by {got}, injected {want} INVALID packets",
                ns.name()
            ));
        }
    }
}

/// Every injected packet appears exactly once in the tracer's output, with the packet's own
/// numbers and the kernel's reason, bound and conntrack entry.
pub fn tracer_reported_injections(
    kernel: &Kernel,
    topo: &Topology,
    obs: &Observation,
    expected: &[Expected],
    problems: &mut Problems,
) {
    let Some(trace) = &obs.trace else { return };
    for e in expected {
        let events: Vec<&Value> = trace
            .events
            .iter()
            .filter(|ev| event_is_packet(ev, &e.packet))
            .collect();
        let [ev] = events.as_slice() else {
            problems.add(format!(
                "{}: tracer printed {} events for {}",
                e.what,
                events.len(),
                e.packet.describe()
            ));
            continue;
        };
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.add(format!("{}: {what}; event {}", e.what, brief(ev)));
            }
        };
        check(
            ev["event"] == e.verdict.event(),
            format!("event should be \"{}\"", e.verdict.event()),
        );
        let code = ev["reason_code"].as_str().unwrap_or("");
        check(
            code_matches(code, e.reason_code),
            format!("reason_code should be {}", e.reason_code),
        );
        check(
            ev["netns"].as_u64() == Some(topo.ct().inode()),
            format!("netns should be {}", topo.ct().inode()),
        );
        check(
            optional_eq(&ev["hook"], &Value::from("PRE_ROUTING")),
            "hook should be PRE_ROUTING".into(),
        );
        check(
            optional_eq(&ev["ifindex"], &Value::from(topo.from_server_ifindex)),
            format!("ifindex should be {}", topo.from_server_ifindex),
        );
        if let Transport::Tcp {
            flags, data_offset, ..
        } = e.packet.transport
        {
            let got: std::collections::BTreeSet<char> =
                ev["tcp"]["flags"].as_str().unwrap_or("").chars().collect();
            check(
                got == flag_letters(flags),
                format!("tcp.flags should be {:?}", flag_letters(flags)),
            );
            // A header claiming more than it has has no meaningful payload length.
            if data_offset == 5 {
                check(
                    ev["tcp"]["len"].as_u64() == Some(e.packet.payload.len() as u64),
                    format!("tcp.len should be {}", e.packet.payload.len()),
                );
            }
        }
        match obs.logs.iter().find(|l| log_is_packet(l, &e.packet)) {
            Some(log) => agrees_with_log(ev, log, &mut check),
            None => check(
                ev["reason_code"] == "unknown",
                "the kernel logged no reason, so reason_code should be unknown".into(),
            ),
        }
        if let Some(svc) = e.service {
            // Without nf_conntrack BTF the entry may be missing, but never wrong.
            if kernel.conntrack_btf || !ev["ct"].is_null() {
                let client = e.packet.dst;
                check(
                    ev["ct"]["state"] == "ESTABLISHED",
                    "ct.state should be ESTABLISHED".into(),
                );
                check(
                    endpoint(&ev["ct"]["original"], "s") == Some((*client.ip(), client.port())),
                    format!("ct.original source should be the client {client}"),
                );
                check(
                    endpoint(&ev["ct"]["original"], "d") == Some((*svc.vip.ip(), svc.vip.port())),
                    format!("ct.original destination should be the Service {}", svc.vip),
                );
                check(
                    endpoint(&ev["ct"]["reply"], "s")
                        == Some((*svc.backend.ip(), svc.backend.port())),
                    format!("ct.reply source should be the backend {}", svc.backend),
                );
            }
            if kernel.conntrack_btf {
                check(
                    ev["window"]["sender"].is_object() && ev["window"]["receiver"].is_object(),
                    "window.sender/receiver should be present".into(),
                );
            }
        }
    }
}

/// Whether `code` is the expected reason_code: exactly, or by prefix when `expected` ends
/// in `*`.
pub fn code_matches(code: &str, expected: &str) -> bool {
    match expected.strip_suffix('*') {
        Some(prefix) => code.starts_with(prefix),
        None => code == expected,
    }
}

/// The event's reason and window bound against the kernel's log line for its packet.
pub fn agrees_with_log(ev: &Value, log: &CtLog, check: &mut impl FnMut(bool, String)) {
    check(
        ev["reason"].as_str() == Some(log.reason.as_str()),
        format!("reason should be the kernel's \"{}\"", log.reason),
    );
    if let Some(bound) = log.bound() {
        check(
            ev["window"]["bound"].as_u64() == Some(bound),
            format!("window.bound should be the kernel's {bound}"),
        );
    }
}

/// The tracer started, lost and missed nothing, and its summary adds up: its counts are those of the
/// stream, and its kernel counter deltas are those of our namespaces over the same window
/// (the tracer's window encloses ours, and nothing else on the guest uses conntrack).
pub fn stream_is_complete(topo: &Topology, obs: &Observation, problems: &mut Problems) {
    if let Some(e) = &obs.tracer_error {
        problems.add(format!("tracer: {e}"));
    }
    let Some(trace) = &obs.trace else { return };
    // A kprobe pair call already running when the tracer attached returns without its
    // entry and is counted as unpaired (`untracked`): a verdict not seen, that matters only
    // if it was an INVALID the kernel counted, which the scenarios' comparisons of events
    // with the kernel's log and per-namespace counters catch. Every other loss is a failure.
    for ev in obs
        .events("lost")
        .into_iter()
        .filter(|ev| ev["cause"] != "unpaired")
    {
        problems.add(format!("tracer lost events: {ev}"));
    }
    let Some(s) = &trace.summary else {
        return problems.add("tracer printed no summary line on SIGINT".into());
    };
    if s["mode"] != obs.expected_mode.as_str() {
        problems.add(format!(
            "summary.mode is {}, this run's mode is {}",
            s["mode"], obs.expected_mode
        ));
    }
    // Nothing lost, and every reason the kernel logged belonged to a call being followed.
    for key in ["lost", "recursion_misses", "orphan_reasons"] {
        if s[key].as_u64() != Some(0) {
            problems.add(format!("summary.{key} should be 0: {s}"));
        }
    }
    for (key, kind) in [
        ("invalid", "invalid"),
        ("ignored", "ignored"),
        ("drop", "drop"),
        ("incidents", "incident"),
    ] {
        let streamed = obs.events(kind).len() as u64;
        if s[key].as_u64() != Some(streamed) {
            problems.add(format!(
                "summary.{key} is {}, the stream had {streamed} {kind} events",
                s[key]
            ));
        }
    }
    for column in ["invalid", "drop"] {
        let ours: u64 = topo
            .namespaces()
            .iter()
            .map(|ns| obs.delta(ns.inode(), column))
            .sum();
        if s["kernel"][column].as_u64() != Some(ours) {
            problems.add(format!(
                "summary.kernel.{column} is {}, the kernel counters of our namespaces moved by {ours}",
                s["kernel"][column]
            ));
        }
    }
}

/// The tracer's stream agrees with the kernel: one event per conntrack log line (same
/// packet, same reason, same kind), INVALID events per namespace equal to that namespace's
/// counter delta, a summary that adds up, and nothing lost.
/// With `port` (a `--port` filter), only lines and counts for that port are compared.
pub fn tracer_matches_kernel(
    kernel: &Kernel,
    topo: &Topology,
    obs: &Observation,
    port: Option<u16>,
    problems: &mut Problems,
) {
    stream_is_complete(topo, obs, problems);
    let Some(trace) = &obs.trace else { return };
    let verdicts: Vec<&Value> = trace
        .events
        .iter()
        .filter(|e| e["event"] == "invalid" || e["event"] == "ignored")
        .collect();
    for ev in obs.events("drop") {
        problems.add(format!("unexpected drop event: {}", brief(ev)));
    }

    if let Some(port) = port {
        for ev in &verdicts {
            if ev["sport"].as_u64() != Some(port.into())
                && ev["dport"].as_u64() != Some(port.into())
            {
                problems.add(format!("--port {port} let through {}", brief(ev)));
            }
        }
    } else {
        let ours: Vec<u64> = topo.namespaces().iter().map(|ns| ns.inode()).collect();
        for ns in topo.namespaces() {
            let events = verdicts
                .iter()
                .filter(|e| e["event"] == "invalid" && e["netns"].as_u64() == Some(ns.inode()))
                .count() as u64;
            let delta = obs.invalid_delta(ns.inode());
            // Without a verdict probe only logged INVALIDs are seen: the log lines are matched
            // one by one below; the rest of the counter is what the summary calls missed.
            if events != delta && (obs.complete || events > delta) {
                problems.add(format!(
                    "{}: tracer printed {events} invalid events, kernel counter moved by {delta}",
                    ns.name()
                ));
            }
        }
        for ev in verdicts
            .iter()
            .filter(|e| !e["netns"].as_u64().is_some_and(|n| ours.contains(&n)))
        {
            problems.add(format!(
                "event from a namespace the test does not own: {}",
                brief(ev)
            ));
        }
    }

    let mut unmatched: Vec<&Value> = verdicts.clone();
    for log in obs
        .logs
        .iter()
        .filter(|l| port.is_none_or(|p| l.involves_port(p)))
    {
        let kind = if kernel.window_under_is_ignored() && log.is_window_ignore() {
            "ignored"
        } else {
            "invalid"
        };
        match unmatched.iter().position(|ev| event_is_log(ev, log)) {
            Some(i) => {
                let ev = unmatched.swap_remove(i);
                if ev["event"] != kind {
                    problems.add(format!(
                        "kernel line \"{}\" means {kind}, tracer said {}",
                        log.summary(),
                        ev["event"]
                    ));
                }
            }
            None => problems.add(format!("no tracer event for kernel line {}", log.summary())),
        }
    }
    // With a verdict probe the tracer also sees INVALIDs the kernel counts but never logs;
    // those carry no reason. The per-namespace totals above already tie them to the counter.
    for ev in unmatched {
        if !(obs.complete && ev["event"] == "invalid" && ev["reason_code"] == "unknown") {
            problems.add(format!(
                "tracer event with no kernel log line: {}",
                brief(ev)
            ));
        }
    }
}

/// An event in one line, for problem messages (the full JSON is in the log already).
pub fn brief(ev: &Value) -> String {
    let mut s = format!(
        "{} {} {} {}:{} -> {}:{}",
        ev["event"].as_str().unwrap_or("?"),
        ev["reason_code"].as_str().unwrap_or("-"),
        ev["proto"].as_str().unwrap_or("?"),
        ev["saddr"].as_str().unwrap_or("?"),
        ev["sport"],
        ev["daddr"].as_str().unwrap_or("?"),
        ev["dport"]
    );
    if ev["tcp"].is_object() {
        s += &format!(" seq {} ack {}", ev["tcp"]["seq"], ev["tcp"]["ack"]);
    }
    s + &format!(" netns {}", ev["netns"])
}

/// A JSON value that, when present, must equal `want` (keys unknown on a kernel are omitted).
fn optional_eq(v: &Value, want: &Value) -> bool {
    v.is_null() || v == want
}

pub fn endpoint(v: &Value, side: &str) -> Option<(Ipv4Addr, u16)> {
    let addr = v[format!("{side}addr")].as_str()?.parse().ok()?;
    let port = v[format!("{side}port")].as_u64()?.try_into().ok()?;
    Some((addr, port))
}

pub fn event_is_packet(ev: &Value, p: &Packet) -> bool {
    let proto = match p.transport {
        Transport::Tcp { .. } => "tcp",
        Transport::Udp { .. } => "udp",
    };
    let same_numbers = match p.seq_ack() {
        Some((seq, ack)) => {
            ev["tcp"]["seq"].as_u64() == Some(seq.into())
                && ev["tcp"]["ack"].as_u64() == Some(ack.into())
        }
        None => true,
    };
    ev["proto"] == proto
        && endpoint(ev, "s") == Some((*p.src.ip(), p.src.port()))
        && endpoint(ev, "d") == Some((*p.dst.ip(), p.dst.port()))
        && same_numbers
}

pub fn log_is_packet(log: &CtLog, p: &Packet) -> bool {
    log.protonum == p.protonum()
        && log.src == IpAddr::V4(*p.src.ip())
        && log.dst == IpAddr::V4(*p.dst.ip())
        && log.sport == Some(p.src.port())
        && log.dport == Some(p.dst.port())
        && p.seq_ack()
            .is_none_or(|(seq, ack)| log.seq == Some(seq) && log.ack == Some(ack))
}

fn event_is_log(ev: &Value, log: &CtLog) -> bool {
    let proto_ok = match log.protonum {
        6 => ev["proto"] == "tcp",
        17 => ev["proto"] == "udp",
        1 => ev["proto"] == "icmp",
        58 => ev["proto"] == "icmpv6",
        _ => false,
    };
    proto_ok
        && ev["saddr"].as_str().and_then(|a| a.parse().ok()) == Some(log.src)
        && ev["daddr"].as_str().and_then(|a| a.parse().ok()) == Some(log.dst)
        && log
            .sport
            .is_none_or(|p| ev["sport"].as_u64() == Some(p.into()))
        && log
            .dport
            .is_none_or(|p| ev["dport"].as_u64() == Some(p.into()))
        && log
            .seq
            .is_none_or(|s| ev["tcp"]["seq"].as_u64() == Some(s.into()))
        && log
            .ack
            .is_none_or(|a| ev["tcp"]["ack"].as_u64() == Some(a.into()))
        && ev["reason"].as_str() == Some(log.reason.as_str())
}
