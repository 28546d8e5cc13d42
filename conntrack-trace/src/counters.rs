//! The kernel's own conntrack counters: `/proc/net/stat/nf_conntrack` (per CPU, hex, one
//! file per network namespace) and the table fill. The tracer's ground truth.

use std::{
    collections::BTreeMap,
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

/// The file as the kernel writes it: column names (in its order) and one row per CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PerCpu {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<u64>>,
}

impl PerCpu {
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines();
        let columns: Vec<String> = lines
            .next()
            .context("empty stat file")?
            .split_whitespace()
            .map(String::from)
            .collect();
        let mut rows = Vec::new();
        for line in lines {
            let vals: Vec<&str> = line.split_whitespace().collect();
            if vals.len() != columns.len() {
                bail!(
                    "stat row has {} columns, header {}",
                    vals.len(),
                    columns.len()
                );
            }
            rows.push(
                vals.iter()
                    .map(|v| u64::from_str_radix(v, 16).with_context(|| format!("bad hex {v:?}")))
                    .collect::<Result<_>>()?,
            );
        }
        Ok(Self { columns, rows })
    }

    /// Summed over CPUs; `entries` is the global count repeated on every row, not summed.
    pub fn total(&self) -> Stats {
        let mut sums = BTreeMap::new();
        for row in &self.rows {
            for (name, &v) in self.columns.iter().zip(row) {
                let e = sums.entry(name.clone()).or_insert(0);
                *e = if name == "entries" { v } else { *e + v };
            }
        }
        Stats(sums)
    }
}

/// Column name -> value, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats(pub BTreeMap<String, u64>);

impl Stats {
    pub fn parse(text: &str) -> Result<Self> {
        Ok(PerCpu::parse(text)?.total())
    }

    pub fn read(path: &Path) -> Result<Self> {
        Self::parse(
            &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }

    /// `self - before`, column by column (counters only grow; a wrapped one reads as 0).
    pub fn delta(&self, before: &Stats) -> Stats {
        Stats(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k).unwrap_or(0))))
                .collect(),
        )
    }

    pub fn add(&mut self, other: &Stats) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_insert(0) += v;
        }
    }
}

/// A way into a network namespace.
#[derive(Clone, Debug)]
enum NsHandle {
    /// A process living in it: its /proc/PID/net files are that namespace's.
    Pid(u32),
    /// A file that pins it (a namespace fd a process holds, a bind mount under /run/netns)
    /// when no process lives in it: entered with setns(2) on a helper thread.
    Pinned(PathBuf),
}

/// Every network namespace this machine has that can be reached: those processes live in,
/// those bind-mounted by `ip netns` / CNI plugins, and with `fds` those pinned only by an open
/// fd (a walk of every process's fds: for a one-off summary, not for every scrape).
fn namespaces(fds: bool) -> BTreeMap<u64, NsHandle> {
    let mut out = BTreeMap::new();
    let ino = |p: &Path| fs::metadata(p).ok().map(|m| m.ino());
    let procs: Vec<(u32, PathBuf)> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
                .collect()
        })
        .unwrap_or_default();
    for (pid, dir) in &procs {
        if let Some(i) = ino(&dir.join("ns/net")) {
            out.entry(i).or_insert(NsHandle::Pid(*pid));
        }
    }
    let mut pinned: Vec<PathBuf> = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        pinned.extend(
            fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        );
    }
    for (_, dir) in procs.iter().filter(|_| fds) {
        for fd in fs::read_dir(dir.join("fd")).into_iter().flatten().flatten() {
            if fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("net:[")) {
                pinned.push(fd.path());
            }
        }
    }
    for p in pinned {
        if let Some(i) = ino(&p) {
            out.entry(i).or_insert(NsHandle::Pinned(p));
        }
    }
    out
}

/// Reads `/proc/net/<rel>` as seen from network namespace `ns`.
fn read_in(ns: &NsHandle, rel: &str) -> Option<String> {
    match ns {
        NsHandle::Pid(pid) => fs::read_to_string(format!("/proc/{pid}/net/{rel}")).ok(),
        NsHandle::Pinned(path) => {
            let (path, rel) = (path.clone(), rel.to_string());
            // setns changes only the calling thread's namespace: a thread that then exits.
            std::thread::spawn(move || {
                let f = fs::File::open(&path).ok()?;
                // SAFETY: a valid namespace fd; CLONE_NEWNET checks it is a network namespace.
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return None;
                }
                fs::read_to_string(format!("/proc/thread-self/net/{rel}")).ok()
            })
            .join()
            .ok()
            .flatten()
        }
    }
}

/// Reads `/proc/net/<rel>` in the network namespace with inode `ino`, if it can be reached.
pub fn read_in_netns(ino: u64, rel: &str) -> Option<String> {
    read_in(namespaces(true).get(&ino)?, rel)
}

/// Counters of every reachable network namespace, keyed by netns inode. The tracer sees all
/// namespaces, so its totals compare against the sum of these.
pub fn all_namespaces() -> BTreeMap<u64, Stats> {
    read_all(namespaces(true))
}

/// Counters of the namespaces processes live in and those under `/run/netns`, without the
/// walk of every open fd: cheap enough for each metrics scrape.
pub fn lived_in_or_mounted() -> BTreeMap<u64, Stats> {
    read_all(namespaces(false))
}

fn read_all(namespaces: BTreeMap<u64, NsHandle>) -> BTreeMap<u64, Stats> {
    namespaces
        .into_iter()
        .filter_map(|(ino, ns)| {
            Some((ino, Stats::parse(&read_in(&ns, "stat/nf_conntrack")?).ok()?))
        })
        .collect()
}

/// Delta of the sum over namespaces present both times (ones created or destroyed in
/// between would make the difference meaningless).
pub fn delta_common(before: &BTreeMap<u64, Stats>, after: &BTreeMap<u64, Stats>) -> Stats {
    let mut total = Stats::default();
    for (ns, a) in after {
        if let Some(b) = before.get(ns) {
            total.add(&a.delta(b));
        }
    }
    total
}

/// A `net.netfilter.*` sysctl of this namespace, if it exists on this kernel.
pub fn sysctl(name: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The fullest namespace's entry count (the `entries` column is per namespace) against
/// `nf_conntrack_max`, which is one limit for all of them.
pub fn fullest_table(per_ns: &BTreeMap<u64, Stats>) -> Option<(u64, u64)> {
    let fullest = per_ns.values().filter_map(|s| s.get("entries")).max()?;
    Some((fullest, sysctl("nf_conntrack_max")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cpus_and_keeps_entries() {
        let text = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n\
                    00000005  00000000 00000000 00000000 0000000a 00000001 00000000 00000000 00000000 00000000 00000002 00000000 00000000  00000000 00000000 00000000 00000000\n\
                    00000005  00000000 00000000 00000000 00000010 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000000\n";
        let s = Stats::parse(text).unwrap();
        assert_eq!(s.get("invalid"), Some(0x1a));
        assert_eq!(s.get("entries"), Some(5));
        assert_eq!(s.get("drop"), Some(2));
        let mut later = s.clone();
        later.0.insert("invalid".into(), 0x20);
        assert_eq!(later.delta(&s).get("invalid"), Some(6));
        assert!(Stats::parse("a b\n1\n").is_err());
    }

    #[test]
    fn reads_the_host_kernel() {
        // The test machine's kernel has conntrack (built in): its counters must parse.
        let s = Stats::read(Path::new("/proc/net/stat/nf_conntrack")).unwrap();
        assert!(
            s.get("invalid").is_some() && s.get("ignore").is_some(),
            "{s:?}"
        );
        assert!(!all_namespaces().is_empty());
    }

    /// A namespace no process lives in, pinned only by an fd this test holds, is still read.
    #[test]
    fn reaches_namespaces_pinned_only_by_an_fd() {
        let before = all_namespaces();
        // unshare(CLONE_NEWNET) on a thread that then exits, keeping its ns as an open fd.
        let pinned = std::thread::spawn(|| {
            // SAFETY: affects only this short-lived thread.
            assert_eq!(
                unsafe { libc::unshare(libc::CLONE_NEWNET) },
                0,
                "needs root"
            );
            fs::File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap();
        let ino = pinned.metadata().unwrap().ino();
        assert!(!before.contains_key(&ino));
        let after = all_namespaces();
        let s = after.get(&ino).expect("the pinned namespace's counters");
        assert_eq!(
            s.get("invalid"),
            Some(0),
            "a fresh namespace counts nothing"
        );
    }
}
