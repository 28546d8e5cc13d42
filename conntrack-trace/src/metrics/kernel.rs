//! The kernel's conntrack counters per network namespace, read at each scrape.
//!
//! What the kernel keeps per namespace (net/netfilter/nf_conntrack_standalone.c and _core.c):
//! every column of `/proc/net/stat/nf_conntrack` is that namespace's own per-CPU statistics,
//! and `entries` is its own entry count (the same on every CPU's row). `nf_conntrack_max` is
//! one global value: outside the initial namespace the sysctl is read-only and shows the same
//! number, and each namespace's own count is checked against it when an entry is allocated,
//! so every namespace may hold up to that many entries and `table_max` is the same for all.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{
    counters::{self, Stats},
    owner::OwnerCache,
};

/// Namespaces with a label of their own; the rest are summed into `netns="other"`, so a node
/// that churns through namespaces (a pod each) cannot grow the scrape without bound.
pub const NETNS_MAX: usize = 256;

const OTHER: &str = "other";

/// What the columns count, where the name does not say it well enough.
fn help(column: &str) -> String {
    let what = match column {
        "invalid" => "Packets conntrack could not track (INVALID: no entry, not NATed)",
        "ignore" => {
            "Packets conntrack left alone: already tracked or untracked, or (Linux 6.1+) \
             IGNOREd TCP segments that kept their entry"
        }
        "drop" => "Packets dropped because no entry could be made (table full, nothing to evict)",
        "early_drop" => "Entries evicted to make room in a full table",
        "insert_failed" => {
            "Packets dropped at confirm: their new entry clashed and could not be resolved"
        }
        "clashres" => "Clashes at confirm that were resolved (the packet kept going)",
        "icmp_error" => "ICMP errors that were invalid or quoted no tracked connection",
        "search_restart" => {
            "Table lookups restarted because a resize or a concurrent change moved an entry"
        }
        _ => "",
    };
    let source = format!("/proc/net/stat/nf_conntrack column {column}, summed over CPUs");
    if what.is_empty() {
        format!("The kernel's {source}")
    } else {
        format!("{what} ({source})")
    }
}

/// Which namespaces have a label, and the sum kept for the rest.
#[derive(Debug, Default)]
struct Labels {
    labelled: BTreeSet<u64>,
    /// The last counters of each namespace counted in "other", to add only what grew.
    others: BTreeMap<u64, Stats>,
    /// "other"'s counters: only ever grows, whether its namespaces come or go.
    other_total: Stats,
}

impl Labels {
    /// Rows to expose, one per label value. A namespace keeps its label for as long as it
    /// exists; one that went away loses its series and frees its place.
    fn rows(&mut self, now: BTreeMap<u64, Stats>, cap: usize) -> Vec<(String, Stats)> {
        self.labelled.retain(|ns| now.contains_key(ns));
        self.others.retain(|ns, _| now.contains_key(ns));
        let mut rows = Vec::new();
        let mut other_entries = 0;
        for (ns, stats) in now {
            if !self.labelled.contains(&ns)
                && !self.others.contains_key(&ns)
                && self.labelled.len() < cap
            {
                self.labelled.insert(ns);
            }
            if self.labelled.contains(&ns) {
                rows.push((ns.to_string(), stats));
                continue;
            }
            // A namespace first seen here adds all it counted since it was made.
            let before = self.others.get(&ns).cloned().unwrap_or_default();
            let mut grown = stats.delta(&before);
            grown.0.remove("entries");
            self.other_total.add(&grown);
            other_entries += stats.get("entries").unwrap_or(0);
            self.others.insert(ns, stats);
        }
        if !self.other_total.0.is_empty() {
            let mut other = self.other_total.clone();
            other.0.insert("entries".into(), other_entries);
            rows.push((OTHER.into(), other));
        }
        rows
    }
}

#[derive(Debug, Default)]
pub struct Kernel {
    labels: Mutex<Labels>,
    /// Who owns each namespace, once the tracer has started looking: a namespace a pod owns
    /// gets its `pod` and `k8s_namespace` labels (one pod per namespace, so no more series).
    pub owners: Arc<OnceLock<OwnerCache>>,
}

impl Kernel {
    /// Each labelled namespace's labels: `netns`, and the pod's where one owns it.
    fn labels<'a>(
        &self,
        rows: &'a [(String, Stats)],
    ) -> HashMap<&'a str, Vec<(&'static str, String)>> {
        let owners = self.owners.get();
        rows.iter()
            .map(|(netns, _)| {
                let mut labels = vec![("netns", netns.clone())];
                let pod = netns
                    .parse::<u32>()
                    .ok()
                    .and_then(|ino| owners?.get(ino))
                    .and_then(|o| o.pod.clone());
                if let Some(p) = pod {
                    labels.push(("pod", p.name));
                    labels.push(("k8s_namespace", p.namespace));
                }
                (netns.as_str(), labels)
            })
            .collect()
    }
}

/// Metric names are made from the kernel's column names: only ones that make a valid name.
fn is_name(column: &str) -> bool {
    !column.is_empty()
        && column
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Collector for Kernel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = counters::lived_in_or_mounted();
        let rows = match self.labels.lock() {
            Ok(mut l) => l.rows(now, NETNS_MAX),
            Err(poisoned) => poisoned.into_inner().rows(now, NETNS_MAX),
        };
        let labels = self.labels(&rows);
        let columns: BTreeSet<&str> = rows
            .iter()
            .flat_map(|(_, s)| s.0.keys().map(String::as_str))
            .filter(|c| *c != "entries" && is_name(c))
            .collect();
        for column in columns {
            let name = format!("kernel_{column}");
            let mut family =
                encoder.encode_descriptor(&name, &help(column), None, MetricType::Counter)?;
            for (netns, stats) in &rows {
                if let Some(v) = stats.get(column) {
                    let labels = &labels[netns.as_str()];
                    ConstCounter::new(v).encode(family.encode_family(labels)?)?;
                }
            }
        }
        let mut entries = encoder.encode_descriptor(
            "table_entries",
            "Entries in the namespace's conntrack table now (the entries column)",
            None,
            MetricType::Gauge,
        )?;
        for (netns, stats) in &rows {
            if let Some(v) = stats.get("entries") {
                let labels = &labels[netns.as_str()];
                ConstGauge::new(v).encode(entries.encode_family(labels)?)?;
            }
        }
        if let Some(max) = counters::sysctl("nf_conntrack_max") {
            let mut family = encoder.encode_descriptor(
                "table_max",
                "Entries the namespace may hold: nf_conntrack_max, one global limit that each \
                 namespace's own count is checked against",
                None,
                MetricType::Gauge,
            )?;
            for (netns, _) in &rows {
                let labels = &labels[netns.as_str()];
                ConstGauge::new(max).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(invalid: u64, entries: u64) -> Stats {
        Stats(
            [("invalid".into(), invalid), ("entries".into(), entries)]
                .into_iter()
                .collect(),
        )
    }

    fn find<'a>(rows: &'a [(String, Stats)], label: &str) -> Option<&'a Stats> {
        rows.iter().find(|(l, _)| l == label).map(|(_, s)| s)
    }

    #[test]
    fn namespaces_past_the_cap_share_one_series_that_never_goes_down() {
        let mut l = Labels::default();
        let now = |pairs: &[(u64, u64)]| -> BTreeMap<u64, Stats> {
            pairs.iter().map(|&(ns, inv)| (ns, stats(inv, 1))).collect()
        };
        let rows = l.rows(now(&[(1, 10), (2, 20), (3, 30)]), 2);
        assert_eq!(find(&rows, "1").unwrap().get("invalid"), Some(10));
        assert_eq!(find(&rows, "2").unwrap().get("invalid"), Some(20));
        assert!(find(&rows, "3").is_none());
        let other = find(&rows, OTHER).unwrap();
        assert_eq!(
            (other.get("invalid"), other.get("entries")),
            (Some(30), Some(1))
        );

        // 3 grows by 5 and 4 appears with 7; nothing is left to label.
        let rows = l.rows(now(&[(1, 10), (2, 20), (3, 35), (4, 7)]), 2);
        assert_eq!(find(&rows, OTHER).unwrap().get("invalid"), Some(42));
        assert_eq!(find(&rows, OTHER).unwrap().get("entries"), Some(2));

        // 2 goes away: its series goes too and its place is free for the next newcomer; 3
        // going away does not take its count out of "other".
        let rows = l.rows(now(&[(1, 10), (4, 8), (5, 50)]), 2);
        assert!(find(&rows, "2").is_none());
        assert_eq!(find(&rows, "5").unwrap().get("invalid"), Some(50));
        assert_eq!(find(&rows, OTHER).unwrap().get("invalid"), Some(43));
        assert_eq!(rows.len(), 3);
    }

    #[test]
    fn only_valid_names_are_made_from_columns() {
        assert!(is_name("search_restart"));
        assert!(!is_name("Search-Restart"));
        assert!(!is_name(""));
    }

    /// The collector against this machine's kernel: the host's own namespace is there with
    /// the kernel's columns, and the exposition parses as metrics with the names it promises.
    #[test]
    fn exposes_this_kernels_columns() {
        let mut registry = prometheus_client::registry::Registry::with_prefix("conntrack_trace");
        registry.register_collector(Box::new(Kernel::default()));
        let mut body = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut body, &registry).unwrap();
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| {
            use std::os::unix::fs::MetadataExt as _;
            m.ino()
        });
        let own = format!("netns=\"{}\"", own.unwrap());
        for name in [
            "conntrack_trace_kernel_invalid_total{",
            "conntrack_trace_kernel_insert_failed_total{",
            "conntrack_trace_table_entries{",
            "conntrack_trace_table_max{",
        ] {
            assert!(
                body.lines()
                    .any(|l| l.starts_with(name) && l.contains(&own)),
                "{name} for {own} missing:\n{body}"
            );
        }
        assert!(!body.contains("kernel_entries"), "entries is a gauge");
    }

    /// A namespace a pod owns carries the pod's labels on every series; others only `netns`.
    #[test]
    fn pod_labels_where_a_pod_owns_the_namespace() {
        use std::os::unix::fs::MetadataExt as _;
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino() as u32;
        let pod = crate::cri::Pod {
            name: "web".into(),
            namespace: "shop".into(),
            uid: String::new(),
            sandbox_id: String::new(),
            containers: vec!["nginx".into()],
        };
        let owner = crate::owner::Owner::in_pod(Vec::new(), 0, None, None, Some(pod));
        let kernel = Kernel::default();
        kernel
            .owners
            .set([(own, owner)].into_iter().collect())
            .unwrap();
        let mut registry = prometheus_client::registry::Registry::with_prefix("conntrack_trace");
        registry.register_collector(Box::new(kernel));
        let mut body = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut body, &registry).unwrap();
        let labelled = format!("{{netns=\"{own}\",pod=\"web\",k8s_namespace=\"shop\"}}");
        for name in ["kernel_invalid_total", "table_entries", "table_max"] {
            let series = format!("conntrack_trace_{name}{labelled}");
            assert!(
                body.lines().any(|l| l.starts_with(&series)),
                "{series} missing:\n{body}"
            );
        }
        let own_series = format!("netns=\"{own}\"");
        assert!(
            body.lines()
                .filter(|l| l.contains(&own_series))
                .all(|l| l.contains("pod=\"web\"")),
            "{body}"
        );
    }
}
