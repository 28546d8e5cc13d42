//! Human output: one aligned line per event, coloured when stdout is a terminal.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{self, Write},
};

use super::{Loss, Output, Stamp, Stamps};
use crate::{
    ct::TcpState,
    plan::Mode,
    reason::ReasonCode,
    reset::{Incident, Reset},
    summary::Summary,
    verdict::{Record, Verdict},
};

pub struct Text<W: Write> {
    out: W,
    colour: bool,
    /// Reason codes whose hint was already printed: once per code keeps the stream readable.
    hinted: HashSet<ReasonCode>,
    stamps: Stamps,
}

const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

impl<W: Write> Text<W> {
    pub fn new(out: W, colour: bool) -> Self {
        Self {
            out,
            colour,
            hinted: HashSet::new(),
            stamps: Stamps::default(),
        }
    }

    fn paint(&self, code: &'static str) -> &'static str {
        if self.colour { code } else { "" }
    }
}

fn endpoint(addr: Option<std::net::IpAddr>, port: Option<u16>) -> String {
    match (addr, port) {
        (Some(std::net::IpAddr::V6(a)), Some(p)) => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        _ => "?".into(),
    }
}

/// "HH:MM:SS.micros" of an RFC 3339 timestamp.
fn clock(stamp: &Stamp) -> &str {
    &stamp.as_str()[11..26]
}

impl<W: Write> Output for Text<W> {
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn event(&mut self, r: &Record) -> io::Result<()> {
        let (label, colour) = match r.verdict {
            Verdict::Invalid => ("INVALID", self.paint(RED)),
            Verdict::Ignored => ("IGNORED", self.paint(YELLOW)),
            Verdict::Drop => ("DROP", self.paint(RED)),
        };
        let (dim, reset) = (self.paint(DIM), self.paint(RESET));
        let flow = format!(
            "{} > {}",
            endpoint(r.pkt.saddr, r.pkt.sport),
            endpoint(r.pkt.daddr, r.pkt.dport)
        );
        let mut line = format!(
            "{} {colour}{label:<7}{reset} {:<13} {:<4} {flow:<45}",
            clock(&self.stamps.format(r.time)),
            r.reason_code(),
            r.pkt.proto_name()
        );
        // Writing to a String cannot fail.
        if let Some(t) = &r.pkt.tcp {
            let _ = write!(
                line,
                " [{}] seq {} ack {} win {} len {}",
                t.flags, t.seq, t.ack, t.win, t.len
            );
        }
        if let Some((t, c)) = r.pkt.icmp {
            let _ = write!(line, " type {t} code {c}");
        }
        let _ = write!(line, " | {}", r.reason_text());
        if let Some(w) = &r.window {
            let _ = write!(line, ": {w}");
        }
        if let Some(ct) = &r.ct {
            let o = &ct.original;
            let _ = write!(
                line,
                " {dim}| ct {} {} > {}",
                ct.state.map_or("-", TcpState::as_str),
                endpoint(Some(o.saddr), Some(o.sport)),
                endpoint(Some(o.daddr), Some(o.dport))
            );
            if ct.dnat() {
                let _ = write!(
                    line,
                    " DNAT to {}",
                    endpoint(Some(ct.reply.saddr), Some(ct.reply.sport))
                );
            }
            line.push_str(reset);
        }
        if r.hook.is_some() || r.netns.is_some() || r.ifindex.is_some() {
            let _ = write!(line, " {dim}|");
            if let Some(h) = r.hook {
                let _ = write!(line, " {h}");
            }
            if let Some(n) = r.netns {
                let owner = r.owner.as_ref().map_or("", |o| o.text());
                let _ = write!(line, " netns {n}{owner}");
            }
            if let Some(i) = r.ifindex {
                let _ = write!(line, " if {i}");
            }
            line.push_str(reset);
        }
        writeln!(self.out, "{line}")?;
        if let Some(h) = r.hint.as_ref().map(|c| &c.hint)
            && self.hinted.insert(r.reason_code())
        {
            writeln!(
                self.out,
                "  {dim}hint [{}]: {}{reset}",
                r.reason_code(),
                h.what
            )?;
            for f in &h.fixes {
                let state = match f.active {
                    Some(true) => " [ACTIVE on this node]",
                    Some(false) => " [not active]",
                    None => "",
                };
                writeln!(
                    self.out,
                    "  {dim}  - {}{state}; cost: {}{reset}",
                    f.action, f.cost
                )?;
            }
        }
        Ok(())
    }

    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        let t = &r.trigger;
        let (c, reset) = (self.paint(YELLOW), self.paint(RESET));
        writeln!(
            self.out,
            "{} {c}RST{reset}     no socket     tcp  {:<45} answering [{}] | netns {} if {}",
            clock(&self.stamps.format(r.time)),
            format!(
                "{} > {}",
                endpoint(t.daddr, t.dport),
                endpoint(t.saddr, t.sport)
            ),
            t.tcp.as_ref().map_or(String::new(), |t| format!(
                "{} seq {} ack {}",
                t.flags, t.seq, t.ack
            )),
            super::Netns(r.netns, r.owner.as_deref()),
            r.ifindex.map_or("?".into(), |n| n.to_string()),
        )?;
        Ok(())
    }

    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        let (c, reset) = (self.paint(RED), self.paint(RESET));
        writeln!(
            self.out,
            "{c}=== INCIDENT: connection reset caused by an INVALID packet ==={reset}"
        )?;
        writeln!(self.out, "  {}", super::incident_story(i))?;
        if let Some(ct) = &i.ct {
            let (o, r) = (&ct.original, &ct.reply);
            writeln!(
                self.out,
                "  conntrack entry: {} {} > {} (reply {} > {})",
                ct.state.map_or("-", TcpState::as_str),
                endpoint(Some(o.saddr), Some(o.sport)),
                endpoint(Some(o.daddr), Some(o.dport)),
                endpoint(Some(r.saddr), Some(r.sport)),
                endpoint(Some(r.daddr), Some(r.dport)),
            )?;
        }
        if let Some(w) = &i.invalid.window {
            writeln!(
                self.out,
                "  why INVALID: {}: {}",
                i.invalid.reason_text(),
                w
            )?;
        } else {
            writeln!(self.out, "  why INVALID: {}", i.invalid.reason_text())?;
        }
        Ok(())
    }

    fn lost(&mut self, n: u64, cause: Loss) -> io::Result<()> {
        let (c, reset) = (self.paint(RED), self.paint(RESET));
        match cause {
            Loss::RingFull => writeln!(
                self.out,
                "{c}WARNING: {n} events lost (ring buffer full); raise --ring-size{reset}"
            ),
            Loss::Recursion => writeln!(
                self.out,
                "{c}WARNING: the kernel skipped {n} runs of the tracer's programs (another BPF \
                 program was running on that CPU): those packets may be missing{reset}"
            ),
            Loss::Unpaired => writeln!(
                self.out,
                "{c}WARNING: {n} nf_conntrack_in verdicts not seen (the kernel ran the entry \
                 probe without the return probe or the reverse): those packets may be missing{reset}"
            ),
            Loss::KprobeMissed => writeln!(
                self.out,
                "{c}WARNING: the kernel could not run the tracer's kprobes for {n} hits (one \
                 already running on that CPU, or no free kretprobe instance): those packets may \
                 be missing{reset}"
            ),
        }
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let o = &mut self.out;
        writeln!(o, "\n--- conntrack-trace summary ({:.1} s) ---", s.seconds)?;
        if let Some(m) = s.mode {
            writeln!(
                o,
                "verdicts: {}",
                match m {
                    Mode::Fexit => "fexit on nf_conntrack_in (every packet's verdict)",
                    Mode::KprobePair => "kprobe pair on nf_conntrack_in (every packet's verdict)",
                    Mode::Cold =>
                        "cold (no per-packet probe: only what the kernel logs as invalid)",
                }
            )?;
        }
        // A replay does not know (no mode); a live run on a kernel before 6.7 cannot tell.
        let kprobe = match (s.kprobe_misses, s.mode) {
            (Some(n), _) => format!(", {n} kprobe hits missed"),
            (None, Some(_)) => ", kprobe misses not reported by this kernel".to_string(),
            (None, None) => String::new(),
        };
        writeln!(
            o,
            "events: {} invalid, {} ignored, {} dropped; {} lost, {} program runs skipped{kprobe}",
            s.invalid, s.ignored, s.drops, s.lost, s.recursion_misses
        )?;
        writeln!(
            o,
            "resets for packets with no socket: {}, linked to an INVALID packet: {}",
            s.resets, s.incidents
        )?;
        if s.recursion_misses > 0 {
            writeln!(
                o,
                "WARNING: {} runs of the tracer's programs skipped by the kernel (recursion)",
                s.recursion_misses
            )?;
        }
        if let Some(n) = s.kprobe_misses.filter(|&n| n > 0) {
            writeln!(
                o,
                "WARNING: {n} hits of the tracer's kprobes the kernel could not run them for (one already running on that CPU, or no free kretprobe instance): those calls' verdicts, reasons or drops may be missing"
            )?;
        }
        if s.untracked > 0 {
            writeln!(
                o,
                "WARNING: at most {} nf_conntrack_in verdicts not seen (an entry probe without its return probe or the reverse; a bound: a call that moved CPU and back counts twice)",
                s.untracked
            )?;
        }
        if s.orphan_reasons > 0 {
            writeln!(
                o,
                "WARNING: {} reasons logged for packets whose nf_conntrack_in call was not tracked (not reported)",
                s.orphan_reasons
            )?;
        }
        for (code, n) in &s.by_code {
            writeln!(o, "  {code:<16} {n}")?;
        }
        let top = s.top_flows(10);
        if !top.is_empty() {
            writeln!(o, "top flows:")?;
            for (flow, n) in top {
                writeln!(o, "  {n:>6}  {flow}")?;
            }
        }
        let top = s.top_netns(10);
        if !top.is_empty() {
            writeln!(o, "top namespaces:")?;
            for (ns, n, owner) in top {
                writeln!(o, "  {n:>6}  netns {}", super::Netns(Some(ns), owner))?;
            }
        }
        if let Some(k) = &s.kernel {
            let g = |n: &str| k.get(n).map_or("n/a".to_string(), |v| v.to_string());
            writeln!(
                o,
                "kernel counters over the same period ({} namespaces): invalid +{}, ignore +{}, icmp_error +{}, drop +{}, early_drop +{}, insert_failed +{}, clash resolved +{}",
                s.namespaces,
                g("invalid"),
                g("ignore"),
                g("icmp_error"),
                g("drop"),
                g("early_drop"),
                g("insert_failed"),
                g("clashres")
            )?;
        }
        if let Some(m) = s.missed() {
            writeln!(o, "NOTE: {m}")?;
        }
        if let (Some((btf, attached)), Some(rss)) = (s.startup_ms, s.peak_rss_kib) {
            writeln!(
                o,
                "start-up {attached:.0} ms ({btf:.0} ms reading BTF), peak memory {} KiB",
                rss
            )?;
        }
        if let Some(scans) = s.owner_scans {
            writeln!(
                o,
                "namespace owners: {} /proc scans, the longest {:.1} ms",
                scans.scans,
                scans.longest.as_secs_f64() * 1e3
            )?;
        }
        if let (Some((c0, m0)), Some((c1, m1))) = (s.fill_start, s.fill_end) {
            writeln!(
                o,
                "conntrack table (fullest namespace): {c0}/{m0} at start, {c1}/{m1} at end"
            )?;
        }
        o.flush()
    }
}
