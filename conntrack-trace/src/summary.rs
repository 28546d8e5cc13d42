//! What a tracing session saw, printed when it ends: per reason, top flows, losses, and the
//! kernel's own counter deltas over the same period so the user can check nothing was missed.

use std::{
    collections::{BTreeMap, hash_map::Entry},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use foldhash::HashMap;

use crate::{
    counters::{self, Stats},
    owner::{Owner, ScanStats},
    plan::Mode,
    reason::ReasonCode,
    verdict::{Record, Verdict},
};

/// (protocol, source, source port, destination, destination port).
type FlowKey = (u8, IpAddr, u16, IpAddr, u16);

/// Flows counted one by one: a flood of forged tuples must not grow the tracer without
/// bound (about 80 bytes each).
const FLOWS_MAX: usize = 16_384;

/// Namespaces counted one by one; a node has a few thousand at most, and the events of any
/// past these still count in every other total.
const NETNS_MAX: usize = 4096;

#[derive(Debug, Default)]
pub struct Summary {
    pub by_code: BTreeMap<ReasonCode, u64>,
    pub invalid: u64,
    pub ignored: u64,
    pub drops: u64,
    pub lost: u64,
    /// Runs of our programs the kernel skipped (`recursion_misses` of each program).
    pub recursion_misses: u64,
    /// Hits of our kprobes and kretprobes the kernel could not run them for (their links'
    /// `missed`); None where the kernel does not report them (before 6.7) or in a replay.
    pub kprobe_misses: Option<u64>,
    /// `nf_conntrack_in` calls the kprobe pair could not pair (their verdicts were not
    /// seen): an upper bound.
    pub untracked: u64,
    /// Reasons the kernel logged for a packet whose `nf_conntrack_in` call was not being
    /// tracked (`--exact`; e.g. a call already running when the probes attached): not reported.
    pub orphan_reasons: u64,
    /// Socketless RSTs seen, and how many of them answered an INVALID packet.
    pub resets: u64,
    pub incidents: u64,
    /// (protocol, source, source port, destination, destination port): formatted only for
    /// the summary, not per event. At most FLOWS_MAX of them.
    flows: HashMap<Option<FlowKey>, u64>,
    /// Events of flows first seen once `flows` was full.
    other_flows: u64,
    /// Events per network namespace, with its owner as of its latest event that had one.
    netns: HashMap<u32, (u64, Option<Arc<Owner>>)>,
    /// The /proc scans that found namespace owners (a live run).
    pub owner_scans: Option<ScanStats>,
    /// Kernel counter deltas summed over the namespaces present at start and end.
    pub kernel: Option<Stats>,
    pub namespaces: usize,
    pub fill_start: Option<(u64, u64)>,
    pub fill_end: Option<(u64, u64)>,
    pub seconds: f64,
    /// Start-up: (reading kallsyms + BTF into the plan, launch to attached), in ms.
    pub startup_ms: Option<(f64, f64)>,
    pub peak_rss_kib: Option<u64>,
    /// Whether a filter was set (then fewer events than the kernel counted is expected).
    pub filtered: bool,
    /// How verdicts were observed (a live run; a replay does not know).
    pub mode: Option<Mode>,
}

/// What a live session measured besides its events, read when it ends.
pub struct Ending<'a> {
    pub lost: u64,
    pub recursion_misses: u64,
    pub kprobe_misses: Option<u64>,
    pub untracked: u64,
    pub orphan_reasons: u64,
    pub seconds: f64,
    /// Reading kallsyms and BTF into the plan; launch to attached.
    pub startup: (Duration, Duration),
    /// The kernel's counters per namespace once attached, and before detaching.
    pub before: &'a BTreeMap<u64, Stats>,
    pub after: &'a BTreeMap<u64, Stats>,
    pub filtered: bool,
    pub mode: Mode,
    pub owner_scans: ScanStats,
}

impl Summary {
    /// Completes a live session's summary: losses, times, memory, the kernel's counter
    /// deltas summed over the namespaces present at both ends, and the fullest table.
    pub fn finish(&mut self, e: Ending) {
        self.lost = e.lost;
        self.recursion_misses = e.recursion_misses;
        self.kprobe_misses = e.kprobe_misses;
        self.untracked = e.untracked;
        self.orphan_reasons = e.orphan_reasons;
        self.seconds = e.seconds;
        self.startup_ms = Some((
            e.startup.0.as_secs_f64() * 1e3,
            e.startup.1.as_secs_f64() * 1e3,
        ));
        self.peak_rss_kib = peak_rss_kib();
        self.namespaces = e.after.keys().filter(|k| e.before.contains_key(k)).count();
        self.kernel = Some(counters::delta_common(e.before, e.after));
        self.fill_start = counters::fullest_table(e.before);
        self.fill_end = counters::fullest_table(e.after);
        self.filtered = e.filtered;
        self.mode = Some(e.mode);
        self.owner_scans = Some(e.owner_scans);
    }

    /// INVALIDs the kernel counted that were not reported, and why, when that is a surprise.
    pub fn missed(&self) -> Option<String> {
        let counted = self.kernel.as_ref()?.get("invalid")?;
        // ICMP errors quoting no flow are INVALID to the ruleset but counted in icmp_error.
        let icmp = self
            .by_code
            .get(&ReasonCode::IcmpErrorNoFlow)
            .copied()
            .unwrap_or(0);
        let missed = counted
            .checked_sub(self.invalid - icmp + self.lost)
            .filter(|&m| m > 0)?;
        Some(if self.filtered {
            format!(
                "the kernel counted {missed} more INVALID packets than were reported; a filter is set"
            )
        } else if self.mode == Some(Mode::Cold) {
            format!(
                "the kernel counted {missed} more INVALID packets than it logged a reason for; \
                 run with --exact to see those too"
            )
        } else if self.unseen() > 0 {
            format!(
                "the kernel counted {missed} more INVALID packets than were reported; the tracer \
                 counted {} probe runs it could not see or pair (the warnings above), which can \
                 account for them",
                self.unseen()
            )
        } else {
            format!(
                "the kernel counted {missed} more INVALID packets than were reported (namespaces that came or went during the trace are not compared)"
            )
        })
    }

    /// Runs of the tracer's programs the kernel skipped or missed, and calls it could not
    /// pair: each a verdict, reason or drop that may be missing.
    fn unseen(&self) -> u64 {
        self.recursion_misses + self.kprobe_misses.unwrap_or(0) + self.untracked
    }

    pub fn record(&mut self, r: &Record) {
        match r.verdict {
            Verdict::Invalid => self.invalid += 1,
            Verdict::Ignored => self.ignored += 1,
            Verdict::Drop => self.drops += 1,
        }
        *self.by_code.entry(r.reason_code()).or_insert(0) += 1;
        let p = &r.pkt;
        let flow = match (p.proto, p.saddr, p.daddr) {
            (Some(proto), Some(s), Some(d)) => {
                Some((proto, s, p.sport.unwrap_or(0), d, p.dport.unwrap_or(0)))
            }
            _ => None,
        };
        let full = self.flows.len() >= FLOWS_MAX;
        match self.flows.entry(flow) {
            Entry::Occupied(mut n) => *n.get_mut() += 1,
            Entry::Vacant(_) if full => self.other_flows += 1,
            Entry::Vacant(v) => {
                v.insert(1);
            }
        }
        if let Some(ns) = r.netns {
            let full = self.netns.len() >= NETNS_MAX;
            match self.netns.entry(ns) {
                Entry::Occupied(mut n) => {
                    let (count, owner) = n.get_mut();
                    *count += 1;
                    if let Some(o) = &r.owner
                        && !owner.as_ref().is_some_and(|had| Arc::ptr_eq(had, o))
                    {
                        *owner = Some(o.clone());
                    }
                }
                Entry::Vacant(_) if full => {}
                Entry::Vacant(v) => {
                    v.insert((1, r.owner.clone()));
                }
            }
        }
    }

    /// Up to `n` network namespaces with the most events, most first: (inode, events, owner).
    pub fn top_netns(&self, n: usize) -> Vec<(u32, u64, Option<&Owner>)> {
        let mut v: Vec<_> = self
            .netns
            .iter()
            .map(|(&ns, (c, o))| (ns, *c, o.as_deref()))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }

    pub fn events(&self) -> u64 {
        self.invalid + self.ignored + self.drops
    }

    /// Up to `n` flows with the most events, most first; the flows past FLOWS_MAX count as
    /// one row.
    pub fn top_flows(&self, n: usize) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self.flows.iter().map(|(k, &c)| (Some(k), c)).collect();
        if self.other_flows > 0 {
            v.push((None, self.other_flows));
        }
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v.into_iter()
            .map(|(k, c)| {
                let Some(k) = k else {
                    return (format!("(flows after the first {FLOWS_MAX})"), c);
                };
                let name = match k {
                    Some((proto, s, sp, d, dp)) => {
                        let pkt = crate::verdict::Packet {
                            proto: Some(*proto),
                            ..Default::default()
                        };
                        format!("{} {s}:{sp} > {d}:{dp}", pkt.proto_name())
                    }
                    // No addresses: headers that did not parse, or no packet at all (a
                    // table-full drop seen without a verdict probe).
                    None => "(no addresses)".into(),
                };
                (name, c)
            })
            .collect()
    }
}

/// VmHWM: the most resident memory this process has used.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::SystemTime};

    use super::*;
    use crate::verdict::Packet;

    #[test]
    fn flows_past_the_cap_count_as_one_row() {
        let mut s = Summary::default();
        let flow = |port: u16| {
            let pkt = Packet {
                proto: Some(6),
                saddr: Some(Ipv4Addr::new(10, 0, 0, 1).into()),
                sport: Some(port),
                daddr: Some(Ipv4Addr::new(10, 0, 0, 2).into()),
                dport: Some(80),
                ..Default::default()
            };
            Record::bare(Verdict::Invalid, 0, SystemTime::UNIX_EPOCH, pkt)
        };
        for port in 0..FLOWS_MAX as u16 + 100 {
            s.record(&flow(port));
        }
        // A flow seen before the cap still counts on its own.
        s.record(&flow(7));
        assert_eq!(s.flows.len(), FLOWS_MAX);
        let top = s.top_flows(2);
        assert_eq!(
            top[0],
            (format!("(flows after the first {FLOWS_MAX})"), 100)
        );
        assert_eq!(top[1], ("tcp 10.0.0.1:7 > 10.0.0.2:80".to_string(), 2));
        assert_eq!(s.invalid, FLOWS_MAX as u64 + 101);
    }

    fn with_kernel(invalid: u64) -> Summary {
        Summary {
            kernel: Some(Stats(
                [("invalid".to_string(), invalid)].into_iter().collect(),
            )),
            ..Default::default()
        }
    }

    #[test]
    fn missed_invalids_are_explained() {
        let mut s = with_kernel(5);
        s.invalid = 3;
        s.lost = 2;
        assert_eq!(s.missed(), None, "reported + lost covers the counter");
        s.lost = 0;
        s.mode = Some(Mode::Cold);
        assert!(s.missed().unwrap().contains("--exact"));
        s.filtered = true;
        assert!(s.missed().unwrap().contains("filter"));
        s.filtered = false;
        s.mode = Some(Mode::KprobePair);
        s.kprobe_misses = Some(4);
        assert!(s.missed().unwrap().contains("counted 4 probe runs"));
        assert_eq!(
            Summary::default().missed(),
            None,
            "no counters, nothing to compare"
        );
    }

    /// Two INVALIDs counted, three reported of which one ICMP error quoting no flow (the
    /// kernel counts that one in icmp_error): nothing missed. One fewer reported: one missed.
    #[test]
    fn icmp_errors_without_a_flow_are_not_held_against_invalid() {
        let mut s = with_kernel(2);
        s.mode = Some(Mode::Fexit);
        s.invalid = 3;
        s.by_code.insert(ReasonCode::IcmpErrorNoFlow, 1);
        assert_eq!(s.missed(), None);
        s.invalid = 2;
        assert!(s.missed().unwrap().contains("counted 1 more"));
    }

    #[test]
    fn namespaces_keep_their_latest_known_owner() {
        let mut s = Summary::default();
        let ev = |ns: u32, owner: Option<&Arc<Owner>>| Record {
            netns: Some(ns),
            owner: owner.cloned(),
            ..Record::bare(
                Verdict::Invalid,
                0,
                SystemTime::UNIX_EPOCH,
                Packet::default(),
            )
        };
        let a = Arc::new(Owner::new(Vec::new(), 0, Some("a".into()), None));
        s.record(&ev(7, None));
        s.record(&ev(7, Some(&a)));
        // An event whose owner was not known does not forget it.
        s.record(&ev(7, None));
        s.record(&ev(9, None));
        let top = s.top_netns(10);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[0].1), (7, 3));
        assert_eq!(top[0].2.and_then(|o| o.ip_netns_name.as_deref()), Some("a"));
        assert_eq!((top[1].0, top[1].1), (9, 1));
        assert!(top[1].2.is_none());
        for ns in 0..NETNS_MAX as u32 {
            s.record(&ev(1000 + ns, None));
        }
        assert_eq!(s.netns.len(), NETNS_MAX);
        assert_eq!(s.invalid, NETNS_MAX as u64 + 4);
    }
}
