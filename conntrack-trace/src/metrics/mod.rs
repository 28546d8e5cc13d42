//! `--metrics ADDR`: the tracer's counts and the kernel's own conntrack counters as Prometheus
//! metrics, for a node agent a Prometheus scrapes. The event loop only bumps atomic counters;
//! the kernel's files are read at scrape time on the HTTP thread ([`http`]).

pub mod http;
mod kernel;

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{output::Loss, owner::OwnerCache, plan::Mode, reason::ReasonCode, verdict::Verdict};

pub use kernel::NETNS_MAX;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
    reason_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    reason_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

/// `mode` when attached, `reason` when not: one series at a time.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    mode: &'static str,
    reason: String,
}

pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    drops: Family<CodeLabel, Counter>,
    incidents: Counter,
    lost: Family<CauseLabel, Counter>,
    attached: Family<AttachLabels, Gauge>,
    /// The namespace owners the kernel counters' pod labels come from.
    owners: Arc<std::sync::OnceLock<OwnerCache>>,
}

/// A label value stays readable in a dashboard: an error chain is cut at this many bytes.
const REASON_MAX: usize = 240;

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("conntrack_trace");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Packets the tracer reported (event: invalid, ignored, drop), by reason_code; \
             includes those the ring buffer could not take, counted by the kernel side",
            events.clone(),
        );
        let drops = Family::<CodeLabel, Counter>::default();
        registry.register(
            "drops",
            "Packets conntrack dropped (table_full, insert_failed, conntrack_drop), as reported",
            drops.clone(),
        );
        let incidents = Counter::default();
        registry.register(
            "incidents",
            "INVALID packets answered by an RST from a stack with no socket for them \
             (a connection a middlebox or NAT may have reset)",
            incidents.clone(),
        );
        let lost = Family::<CauseLabel, Counter>::default();
        registry.register(
            "lost_events",
            "Events missing from the stream: ring_full (the ring buffer had no room; still \
             counted in events_total by reason), recursion (program runs the kernel skipped), \
             unpaired (nf_conntrack_in calls the kprobe pair could not pair), kprobe_missed \
             (kprobe hits the kernel could not run a program for, 6.7+)",
            lost.clone(),
        );
        let attached = Family::<AttachLabels, Gauge>::default();
        registry.register(
            "attached",
            "1 while the tracer's programs are attached (mode: cold, fexit, kprobe_pair); \
             0 with the reason when they are not (kernel counters are served either way)",
            attached.clone(),
        );
        let kernel = kernel::Kernel::default();
        let owners = kernel.owners.clone();
        registry.register_collector(Box::new(kernel));
        let m = Arc::new(Self {
            registry,
            events,
            drops,
            incidents,
            lost,
            attached,
            owners,
        });
        m.not_attached("starting");
        m
    }

    /// `n` reported packets of this verdict and reason.
    pub fn event(&self, verdict: Verdict, reason_code: ReasonCode, n: u64) {
        let reason_code = reason_code.as_str();
        self.events
            .get_or_create(&EventLabels {
                event: verdict.as_str(),
                reason_code,
            })
            .inc_by(n);
        if verdict == Verdict::Drop {
            self.drops
                .get_or_create(&CodeLabel { reason_code })
                .inc_by(n);
        }
    }

    /// Where the per-namespace series find their pods, once the tracer runs.
    pub fn set_owners(&self, owners: OwnerCache) {
        let _ = self.owners.set(owners);
    }

    pub fn incident(&self) {
        self.incidents.inc();
    }

    pub fn lost(&self, cause: Loss, n: u64) {
        self.lost
            .get_or_create(&CauseLabel {
                cause: cause.as_str(),
            })
            .inc_by(n);
    }

    pub fn attached(&self, mode: Mode) {
        self.attached.clear();
        self.attached
            .get_or_create(&AttachLabels {
                mode: mode.as_str(),
                reason: String::new(),
            })
            .set(1);
    }

    pub fn not_attached(&self, reason: &str) {
        let mut reason = reason.replace('\n', " ");
        if reason.len() > REASON_MAX {
            let mut cut = REASON_MAX;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        self.attached.clear();
        self.attached
            .get_or_create(&AttachLabels { mode: "", reason })
            .set(0);
    }

    /// The exposition: OpenMetrics when the scraper accepts it (Prometheus does), else the
    /// Prometheus text format 0.0.4 (curl, `promtool check metrics`). Returns the body and
    /// its content type.
    pub fn encode(&self, openmetrics: bool) -> (String, &'static str) {
        let mut body = String::with_capacity(8 << 10);
        // Writing into a String cannot fail.
        if openmetrics {
            let _ = text::encode(&mut body, &self.registry);
            (
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        } else {
            let _ = prometheus_text::encode(&mut body, &self.registry);
            (body, prometheus_text::CONTENT_TYPE)
        }
    }
}

#[cfg(test)]
mod tests {
    use conntrack_trace_common::{
        drops,
        reason::{Reason, source},
        verdict::{HAS_REASON, LostKey, verdict},
        window::log_type,
    };

    use super::*;
    use crate::verdict::lost_kind;

    fn key(v: u8, reason: Option<Reason>, proto: u8, icmp_type: u8) -> LostKey {
        LostKey {
            verdict: v,
            drop_reason: 0,
            flags: if reason.is_some() { HAS_REASON } else { 0 },
            proto,
            icmp_type,
            _pad: [0; 3],
            reason: reason.unwrap_or_default(),
        }
    }

    /// Events the ring could not take are counted under the event and reason_code they
    /// would have had: the README's codes for the kernel's reasons.
    #[test]
    fn lost_packets_get_the_event_and_code_of_a_decoded_one() {
        let logged = |t| {
            let r = Reason {
                source: source::TCP_LOG_STRUCT,
                log_type: t,
                l4proto: 6,
                ..Default::default()
            };
            key(verdict::LOGGED, Some(r), 0, 0)
        };
        assert_eq!(
            lost_kind(&logged(log_type::SEQ_OVER)),
            (Verdict::Invalid, ReasonCode::SeqOver)
        );
        assert_eq!(
            lost_kind(&logged(log_type::SEQ_UNDER)),
            (Verdict::Ignored, ReasonCode::SeqUnder)
        );
        let mut flags = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            ..Default::default()
        };
        flags.fmt[..28].copy_from_slice(b"invalid tcp flag combination");
        assert_eq!(
            lost_kind(&key(verdict::INVALID, Some(flags), 0, 0)),
            (Verdict::Invalid, ReasonCode::BadFlags)
        );
        let mut full = key(verdict::DROP, None, 0, 0);
        full.drop_reason = drops::reason::TABLE_FULL;
        assert_eq!(lost_kind(&full), (Verdict::Drop, ReasonCode::TableFull));
        assert_eq!(
            lost_kind(&key(verdict::INVALID, None, 1, 3)),
            (Verdict::Invalid, ReasonCode::IcmpErrorNoFlow)
        );
        assert_eq!(
            lost_kind(&key(verdict::INVALID, None, 1, 8)),
            (Verdict::Invalid, ReasonCode::Unknown)
        );
    }

    /// The value of the first sample line `name{labels} VALUE` starts with.
    fn sample(body: &str, prefix: &str) -> Option<f64> {
        body.lines()
            .find(|l| l.starts_with(prefix))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    #[test]
    fn counts_and_attach_state_are_exposed_in_both_formats() {
        let m = Metrics::new();
        m.event(Verdict::Invalid, ReasonCode::SeqOver, 2);
        m.event(Verdict::Drop, ReasonCode::TableFull, 1);
        m.incident();
        m.lost(Loss::RingFull, 5);
        let (om, ct) = m.encode(true);
        assert!(ct.starts_with("application/openmetrics-text"));
        assert!(om.ends_with("# EOF\n"), "{om}");
        let (prom, _) = m.encode(false);
        for body in [&om, &prom] {
            assert_eq!(
                sample(
                    body,
                    "conntrack_trace_events_total{event=\"invalid\",reason_code=\"seq_over\"}"
                ),
                Some(2.0),
                "{body}"
            );
            assert_eq!(
                sample(
                    body,
                    "conntrack_trace_drops_total{reason_code=\"table_full\"}"
                ),
                Some(1.0)
            );
            assert_eq!(sample(body, "conntrack_trace_incidents_total"), Some(1.0));
            assert_eq!(
                sample(
                    body,
                    "conntrack_trace_lost_events_total{cause=\"ring_full\"}"
                ),
                Some(5.0)
            );
            assert_eq!(
                sample(
                    body,
                    "conntrack_trace_attached{mode=\"\",reason=\"starting\"}"
                ),
                Some(0.0)
            );
        }
        // 0.0.4 names the counter family by its sample name, as promtool expects.
        assert!(prom.contains("# TYPE conntrack_trace_events_total counter"));
        assert!(!prom.contains("# EOF"));

        m.attached(Mode::Cold);
        let (prom, _) = m.encode(false);
        assert_eq!(
            sample(&prom, "conntrack_trace_attached{mode=\"cold\",reason=\"\"}"),
            Some(1.0)
        );
        assert!(!prom.contains("starting"), "one attach series at a time");

        let long = format!("line one\n{}", "é".repeat(400));
        m.not_attached(&long);
        let (prom, _) = m.encode(false);
        let line = prom
            .lines()
            .find(|l| l.starts_with("conntrack_trace_attached{"))
            .unwrap();
        assert!(
            line.contains("reason=\"line one é") && line.len() < 320,
            "{line}"
        );
    }
}
