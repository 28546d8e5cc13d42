//! Who owns a network namespace: the processes living in it, its `ip netns` name, the cgroup
//! holding those processes and, from that cgroup's name, the container and Kubernetes pod.
//! Events name a namespace only by its inode; this turns the inode into something to act on.
//!
//! Finding owners means reading every /proc/PID, far too slow per event on a node with
//! thousands of processes. A thread scans in the background and publishes a snapshot; the
//! event loop only looks inodes up in it. An inode the snapshot lacks (a pod started after
//! the last scan) asks for a new scan, and the event loop waits for that scan once, briefly.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak},
    thread,
    time::{Duration, Instant},
};

use foldhash::HashMap;
use serde::Serialize;
use serde_json::value::RawValue;

use conntrack_trace_common::{closed_set, string_schema};

use crate::cri::{self, Pod};

/// How many processes an owner names (lowest pids first); the rest are only counted.
pub const PROCESSES_NAMED: usize = 3;

/// A snapshot older than this is rescanned on the next lookup: processes come and go, and a
/// namespace's inode number is reused once it is freed.
const REFRESH: Duration = Duration::from_secs(10);

/// Least pause between two scans; a scan that took longer pauses for 4 times its duration,
/// so scanning never takes more than a fifth of a core however often unknown inodes come.
const MIN_GAP: Duration = Duration::from_millis(50);

/// `missed` entries kept at most; a churn of short-lived namespaces cannot grow it further.
const MISSED_MAX: usize = 4096;

/// `PF_KTHREAD` in /proc/PID/stat's flags: kernel threads all live in the initial network
/// namespace and are not what owns it.
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Process {
    pub pid: u32,
    /// The kernel's `comm` (at most 15 bytes, chosen by the process itself).
    pub comm: String,
}

/// What is known about who owns one network namespace.
#[derive(Debug)]
pub struct Owner {
    /// The first `PROCESSES_NAMED` processes living in the namespace, by pid.
    pub processes: Vec<Process>,
    /// How many processes live in it (kernel threads left out).
    pub process_count: usize,
    /// Its name under /run/netns (`ip netns`, CNI plugins, CRI-O's pinned namespaces).
    pub ip_netns_name: Option<String>,
    /// The deepest cgroup holding every one of its processes, as /proc/PID/cgroup shows it.
    pub cgroup: Option<String>,
    /// From the cgroup's name, when it is one container's: its id, and the runtime when the
    /// name says which.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    /// From the cgroup's name, when it lies in one Kubernetes pod's, else from the runtime.
    pub pod_uid: Option<String>,
    /// From the container runtime's CRI API: the pod whose sandbox owns the namespace.
    pub pod: Option<Pod>,
    /// The JSON object, serialized once: every event of the namespace copies it.
    json: Box<RawValue>,
    /// ` (ip netns a, pid 1 comm +2 more, pod uid)`, or empty when nothing is known.
    text: String,
}

/// The JSON object's keys (README's `owner`), absent when unknown.
#[derive(Serialize, schemars::JsonSchema)]
pub(crate) struct OwnerJson<'a> {
    processes: &'a [Process],
    process_count: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_netns: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<Runtime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uid: Option<&'a str>,
    /// The pod's name, from the container runtime's CRI API.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    /// The pod's Kubernetes namespace, from the CRI API.
    #[serde(skip_serializing_if = "Option::is_none")]
    k8s_namespace: Option<&'a str>,
    /// The pod's running containers' names, sorted, from the CRI API.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    containers: &'a [String],
}

impl Owner {
    /// An owner from what a scan found; the container and pod are read from `cgroup`.
    /// `processes` are the first ones by pid, `process_count` all of them.
    pub fn new(
        processes: Vec<Process>,
        process_count: usize,
        ip_netns_name: Option<String>,
        cgroup: Option<String>,
    ) -> Owner {
        Owner::in_pod(processes, process_count, ip_netns_name, cgroup, None)
    }

    /// Like `new`, with the pod the runtime says owns the namespace.
    pub fn in_pod(
        processes: Vec<Process>,
        process_count: usize,
        ip_netns_name: Option<String>,
        cgroup: Option<String>,
        pod: Option<Pod>,
    ) -> Owner {
        let id = cgroup.as_deref().map(identify).unwrap_or_default();
        let pod_uid = id.pod_uid.or_else(|| {
            pod.as_ref()
                .map(|p| p.uid.clone())
                .filter(|u| !u.is_empty())
        });
        let json = serde_json::value::to_raw_value(&OwnerJson {
            processes: &processes,
            process_count,
            ip_netns: ip_netns_name.as_deref(),
            cgroup: cgroup.as_deref(),
            container_id: id.container_id.as_deref(),
            runtime: id.runtime,
            pod_uid: pod_uid.as_deref(),
            pod: pod.as_ref().map(|p| p.name.as_str()),
            k8s_namespace: pod.as_ref().map(|p| p.namespace.as_str()),
            containers: pod.as_ref().map_or(&[], |p| &p.containers[..]),
        })
        .expect("strings and numbers serialize");
        let mut owner = Owner {
            processes,
            process_count,
            ip_netns_name,
            cgroup,
            container_id: id.container_id,
            runtime: id.runtime,
            pod_uid,
            pod,
            json,
            text: String::new(),
        };
        owner.text = owner.short();
        owner
    }

    /// The `owner` JSON object.
    pub fn json(&self) -> &RawValue {
        &self.json
    }

    /// What follows `netns N` in text output: ` (ip netns client, pid 123 nginx +2 more,
    /// pod UID)`, or nothing when nothing is known.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn short(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = &self.ip_netns_name {
            parts.push(format!("ip netns {}", printable(n)));
        }
        if let Some(p) = self.processes.first() {
            let mut s = format!("pid {} {}", p.pid, printable(&p.comm));
            if self.process_count > 1 {
                s.push_str(&format!(" +{} more", self.process_count - 1));
            }
            parts.push(s);
        }
        let short_id = |id: &str| id.get(..12).unwrap_or(id).to_string();
        if let Some(p) = &self.pod {
            let mut s = format!("pod {}/{}", printable(&p.namespace), printable(&p.name));
            if !p.containers.is_empty() {
                let names: Vec<String> = p.containers.iter().map(|c| printable(c)).collect();
                s.push_str(&format!(" [{}]", names.join(",")));
            }
            parts.push(s);
        } else {
            match (&self.pod_uid, &self.container_id) {
                (Some(pod), Some(c)) => parts.push(format!("pod {pod} container {}", short_id(c))),
                (Some(pod), None) => parts.push(format!("pod {pod}")),
                (None, Some(c)) => parts.push(format!(
                    "{} {}",
                    self.runtime.map_or("container", Runtime::as_str),
                    short_id(c)
                )),
                (None, None) => {}
            }
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" ({})", parts.join(", "))
        }
    }
}

/// Text a process or an administrator chose, made safe for a terminal: control characters
/// (escape sequences) become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// What a cgroup's path says about the container and pod a process runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    pub pod_uid: Option<String>,
}

/// Reads the container and pod from a cgroup path, for the layouts kubelet and the runtimes
/// create:
///
/// * kubelet, systemd driver: `/kubepods.slice/kubepods-burstable.slice/
///   kubepods-burstable-pod<uid, - as _>.slice/cri-containerd-<id>.scope` (also `crio-`,
///   `docker-`; guaranteed pods directly under `kubepods.slice`; kind's `kubelet-kubepods…`);
/// * kubelet, cgroupfs driver: `/kubepods/besteffort/pod<uid>/<id>` (CRI-O: `crio-<id>`);
/// * containerd given a systemd path while running cgroupfs: `…/kubepods-…-pod<uid>.slice:
///   cri-containerd:<id>` as one directory name;
/// * docker: `/docker/<id>`, `/system.slice/docker-<id>.scope`; podman:
///   `/machine.slice/libpod-<id>.scope`, `/libpod_parent/libpod-<id>`; nerdctl:
///   `nerdctl-<id>.scope`; containerd without kubelet: `/<namespace>/<id>` (runtime unnamed).
///
/// The deepest match wins (docker in docker; a process in a sub-cgroup of its container, as
/// podman's `…/libpod-<id>.scope/container`). Container ids are 64 hex digits, so a
/// containerd container named by hand is not mistaken for one; a runtime's monitor
/// (`crio-conmon-<id>`, `libpod-conmon-<id>`) is not the container. Leading `..` (a reader in
/// a child cgroup namespace) are skipped.
pub fn identify(path: &str) -> Identity {
    let mut id = Identity::default();
    let mut kubepods = false;
    let mut parent = "";
    for c in path.split('/').filter(|c| !c.is_empty() && *c != "..") {
        if let [slice, prefix, cid] = c.split(':').collect::<Vec<_>>()[..] {
            if let Some(uid) = slice.strip_suffix(".slice").and_then(pod_of_slice) {
                id.pod_uid = Some(uid);
            }
            if let Some(rt) = runtime_of(prefix).filter(|_| is_container_id(cid)) {
                id.container_id = Some(cid.to_string());
                id.runtime = Some(rt);
            }
        } else if let Some(slice) = c.strip_suffix(".slice") {
            kubepods |= slice.split('-').any(|w| w == "kubepods");
            if let Some(uid) = pod_of_slice(slice) {
                id.pod_uid = Some(uid);
            }
        } else if let Some(uid) = c.strip_prefix("pod").filter(|u| kubepods && is_pod_uid(u)) {
            id.pod_uid = Some(uid.to_string());
        } else {
            kubepods |= c == "kubepods";
            let name = c.strip_suffix(".scope").unwrap_or(c);
            if is_container_id(name) {
                id.container_id = Some(name.to_string());
                id.runtime = (parent == "docker").then_some(Runtime::Docker);
            } else if let Some((prefix, cid)) = name.rsplit_once('-')
                && let Some(rt) = runtime_of(prefix).filter(|_| is_container_id(cid))
            {
                id.container_id = Some(cid.to_string());
                id.runtime = Some(rt);
            }
        }
        parent = c;
    }
    id
}

/// `kubepods-burstable-pod0e9a_…` (a systemd slice name without `.slice`) → the pod's UID.
/// kubelet writes the UID's `-` as `_`, since `-` separates a slice's ancestors.
fn pod_of_slice(slice: &str) -> Option<String> {
    if !slice.split('-').any(|w| w == "kubepods") {
        return None;
    }
    let uid = slice
        .rsplit('-')
        .next()?
        .strip_prefix("pod")?
        .replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A pod UID: a UUID (`8-4-4-4-12` hex digits), or the 32 hex digits of a static pod's hash.
fn is_pod_uid(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let groups: Vec<&str> = s.split('-').collect();
    match groups[..] {
        [all] => hex(all, 32),
        [a, b, c, d, e] => hex(a, 8) && hex(b, 4) && hex(c, 4) && hex(d, 4) && hex(e, 12),
        _ => false,
    }
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

closed_set! {
    /// The container runtime a cgroup name says made the container: the owner's `runtime`.
    pub enum Runtime {
        Containerd = "containerd",
        CriO = "cri-o",
        Docker = "docker",
        Podman = "podman",
    }
}

string_schema!(Runtime);

/// The runtime a cgroup name's prefix stands for.
fn runtime_of(prefix: &str) -> Option<Runtime> {
    Some(match prefix {
        "cri-containerd" | "nerdctl" => Runtime::Containerd,
        "crio" => Runtime::CriO,
        "docker" => Runtime::Docker,
        "libpod" => Runtime::Podman,
        _ => return None,
    })
}

/// The cgroup a /proc/PID/cgroup file places the process in. With cgroup v2 alone, the one
/// `0::` line. With v1 (or hybrid) each hierarchy has its line: `name=systemd`'s, where
/// systemd runs (runtimes place a container at the same path in every hierarchy, the
/// systemd one included), else `memory`'s, else the first.
pub fn cgroup_path(file: &str) -> Option<&str> {
    let lines: Vec<(&str, &str)> = file
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            Some((controllers, path))
        })
        .collect();
    let v1 = |want: &str| {
        lines
            .iter()
            .find(|(c, _)| c.split(',').any(|c| c == want))
            .map(|&(_, p)| p)
    };
    match lines[..] {
        [("", path)] => Some(path),
        _ => v1("name=systemd")
            .or_else(|| v1("memory"))
            .or_else(|| lines.iter().find(|(c, _)| !c.is_empty()).map(|&(_, p)| p)),
    }
}

/// The deepest cgroup containing both paths.
fn common_ancestor(a: &str, b: &str) -> String {
    let common: Vec<&str> = a
        .split('/')
        .zip(b.split('/'))
        .take_while(|(x, y)| x == y)
        .map(|(x, _)| x)
        .collect();
    match common.join("/") {
        s if s.is_empty() => "/".into(),
        s => s,
    }
}

/// `net:[4026531840]` (a /proc/PID/ns/net link) → 4026531840.
fn netns_inode(link: &Path) -> Option<u32> {
    let link = link.to_str()?;
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// /proc/PID/stat → (comm, is a kernel thread). The comm is between the first `(` and the
/// last `)`: it may itself hold parentheses and spaces.
fn parse_stat(stat: &[u8]) -> Option<(String, bool)> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let comm = String::from_utf8_lossy(stat.get(open + 1..close)?).into_owned();
    // After the comm: state, ppid, pgrp, session, tty_nr, tpgid, flags.
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let flags: u64 = rest.split_whitespace().nth(6)?.parse().ok()?;
    Some((comm, flags & PF_KTHREAD != 0))
}

/// Every network namespace's owner, from /proc and /run/netns as they are now, with the
/// pods the runtime named (by namespace inode).
pub fn scan(mut pods: cri::ByNetns) -> HashMap<u32, Arc<Owner>> {
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    // inode → (pids living there, the first ones with their comm)
    let mut by_ns: HashMap<u32, (Vec<u32>, Vec<Process>)> = HashMap::default();
    for pid in pids {
        // A process that exits during the scan is simply not counted.
        let Some(ns) = fs::read_link(format!("/proc/{pid}/ns/net"))
            .ok()
            .and_then(|l| netns_inode(&l))
        else {
            continue;
        };
        let Some((comm, kthread)) = fs::read(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        if kthread {
            continue;
        }
        let (all, named) = by_ns.entry(ns).or_default();
        all.push(pid);
        if named.len() < PROCESSES_NAMED {
            named.push(Process { pid, comm });
        }
    }
    let mut names = ip_netns_names();
    let mut owners: HashMap<u32, Arc<Owner>> = HashMap::default();
    for (ns, (all, named)) in by_ns {
        let owner = Owner::in_pod(
            named,
            all.len(),
            names.remove(&ns),
            common_cgroup(&all),
            pods.remove(&ns),
        );
        owners.insert(ns, Arc::new(owner));
    }
    for (ns, name) in names {
        let owner = Owner::in_pod(Vec::new(), 0, Some(name), None, pods.remove(&ns));
        owners.insert(ns, Arc::new(owner));
    }
    // A sandbox whose processes all exited between the runtime's answer and the scan.
    for (ns, pod) in pods {
        owners.insert(
            ns,
            Arc::new(Owner::in_pod(Vec::new(), 0, None, None, Some(pod))),
        );
    }
    owners
}

/// The deepest cgroup holding all of `pids`. Stops reading at the root, where a namespace
/// shared by unrelated processes (the host's) ends up at once.
fn common_cgroup(pids: &[u32]) -> Option<String> {
    let mut common: Option<String> = None;
    for pid in pids {
        let Ok(file) = fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        let Some(path) = cgroup_path(&file) else {
            continue;
        };
        let next = match &common {
            None => path.to_string(),
            Some(c) => common_ancestor(c, path),
        };
        let root = next == "/";
        common = Some(next);
        if root {
            break;
        }
    }
    common
}

/// Names under /run/netns (and /var/run/netns where it is another directory) by the inode of
/// the namespace bind-mounted there; the first name in order when a namespace has several.
/// A file there that is not a mounted namespace (left by a failed `ip netns add`) is not one.
fn ip_netns_names() -> HashMap<u32, String> {
    let mut names: HashMap<u32, String> = HashMap::default();
    let Ok(nsfs) = fs::metadata("/proc/self/ns/net").map(|m| m.dev()) else {
        return names;
    };
    let mut found: Vec<(u32, String)> = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(m) = fs::metadata(e.path()) else {
                continue;
            };
            if let (true, Ok(ino), Some(name)) = (
                m.dev() == nsfs,
                u32::try_from(m.ino()),
                e.file_name().to_str(),
            ) {
                found.push((ino, name.to_string()));
            }
        }
    }
    found.sort();
    for (ino, name) in found {
        names.entry(ino).or_insert(name);
    }
    names
}

/// Network namespace owners, scanned in the background; cheap to clone and to share across
/// threads (the event loop, a metrics endpoint).
#[derive(Clone)]
pub struct OwnerCache {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for OwnerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnerCache").finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// The scanner waits here for a request.
    request: Condvar,
    /// Lookups wait here for a scan to end.
    scanned: Condvar,
}

#[derive(Default)]
struct State {
    owners: Arc<HashMap<u32, Arc<Owner>>>,
    /// Scans completed.
    done: u64,
    running: bool,
    wanted: bool,
    /// When the snapshot in `owners` was taken.
    taken: Option<Instant>,
    /// Inodes looked up and not found since their last scan.
    missed: HashMap<u32, Miss>,
    scans: u64,
    longest: Duration,
    /// A scanner thread runs (a cache built from known owners has none).
    scanning: bool,
}

struct Miss {
    /// `done` once a scan that started after the lookup has ended: the miss is then an
    /// answer (a namespace no process lives in and no name pins), not a wait for news.
    answered_at: u64,
    /// The event loop already waited for it once.
    waited: bool,
}

impl State {
    fn stale(&self) -> bool {
        self.taken.is_some_and(|t| t.elapsed() > REFRESH)
    }

    fn want(&mut self, shared: &Shared) {
        if !self.wanted {
            self.wanted = true;
            shared.request.notify_one();
        }
    }

    /// Records a miss; the scan count at which it is answered.
    fn miss(&mut self, inode: u32) -> &mut Miss {
        if self.missed.len() >= MISSED_MAX {
            self.missed.clear();
        }
        // A scan running now may have read /proc before this namespace had a process.
        let answered_at = self.done + if self.running { 2 } else { 1 };
        self.missed.entry(inode).or_insert(Miss {
            answered_at,
            waited: false,
        })
    }
}

/// How many /proc scans the cache ran and the longest one took, for the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScanStats {
    pub scans: u64,
    pub longest: Duration,
}

impl OwnerCache {
    /// Starts the scanner thread, which scans at once; with `cri`, each scan also asks the
    /// runtime at that socket for its pods.
    pub fn start(cri: Option<PathBuf>) -> OwnerCache {
        let cache = OwnerCache {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    wanted: true,
                    ..State::default()
                }),
                request: Condvar::new(),
                scanned: Condvar::new(),
            }),
        };
        let weak = Arc::downgrade(&cache.shared);
        match thread::Builder::new()
            .name("netns-owners".into())
            .spawn(move || scanner(weak, cri.map(cri::Pods::new)))
        {
            Ok(_) => cache.lock().scanning = true,
            Err(e) => log::warn!("no network namespace owners: {e}"),
        }
        cache
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The owner of network namespace `inode` as of the last scan, never waiting. A miss or an
    /// old snapshot asks the scanner for a new one.
    pub fn get(&self, inode: u32) -> Option<Arc<Owner>> {
        let mut s = self.lock();
        let found = s.owners.get(&inode).cloned();
        let ask = match &found {
            Some(_) => s.stale(),
            None => {
                let done = s.done;
                s.miss(inode).answered_at > done || s.stale()
            }
        };
        if ask {
            s.want(&self.shared);
        }
        found
    }

    /// Like `get`, but the first lookup of an inode the snapshot lacks waits up to `wait` for
    /// the scan it asks for (a new pod's first event then names its pod). Later lookups of it
    /// never wait, so a namespace nobody owns costs the event loop one wait at most.
    pub fn wait_for(&self, inode: u32, wait: Duration) -> Option<Arc<Owner>> {
        if let found @ Some(_) = self.get(inode) {
            return found;
        }
        let deadline = Instant::now() + wait;
        let mut s = self.lock();
        let done = s.done;
        let scanning = s.scanning;
        let miss = s.miss(inode);
        if !scanning || miss.waited || miss.answered_at <= done {
            return None;
        }
        miss.waited = true;
        let until = miss.answered_at;
        while s.done < until && !s.owners.contains_key(&inode) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .scanned
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.owners.get(&inode).cloned()
    }

    pub fn scan_stats(&self) -> ScanStats {
        let s = self.lock();
        ScanStats {
            scans: s.scans,
            longest: s.longest,
        }
    }
}

/// A cache holding these owners and never scanning (owners known from elsewhere).
impl FromIterator<(u32, Owner)> for OwnerCache {
    fn from_iter<I: IntoIterator<Item = (u32, Owner)>>(owners: I) -> Self {
        let owners = owners.into_iter().map(|(i, o)| (i, Arc::new(o))).collect();
        OwnerCache {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    owners: Arc::new(owners),
                    ..State::default()
                }),
                request: Condvar::new(),
                scanned: Condvar::new(),
            }),
        }
    }
}

/// The scanner thread: one scan per request, paced by `MIN_GAP`; it ends once every
/// `OwnerCache` handle is gone.
fn scanner(shared: Weak<Shared>, mut cri: Option<cri::Pods>) {
    let mut gap = Duration::ZERO;
    loop {
        thread::sleep(gap);
        let Some(sh) = shared.upgrade() else { return };
        {
            let mut s = sh.state.lock().unwrap_or_else(PoisonError::into_inner);
            while !s.wanted {
                // Wakes now and then to notice that the cache was dropped.
                s = sh
                    .request
                    .wait_timeout(s, Duration::from_secs(1))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                if Arc::strong_count(&sh) == 1 {
                    return;
                }
            }
            s.wanted = false;
            s.running = true;
        }
        let started = Instant::now();
        let pods = cri.as_mut().map(cri::Pods::refresh).unwrap_or_default();
        let owners = scan(pods);
        let took = started.elapsed();
        log::debug!(
            "network namespace owners: {} namespaces in {took:?}",
            owners.len()
        );
        {
            let mut s = sh.state.lock().unwrap_or_else(PoisonError::into_inner);
            s.missed.retain(|i, _| !owners.contains_key(i));
            s.owners = Arc::new(owners);
            s.done += 1;
            s.running = false;
            s.taken = Some(started);
            s.scans += 1;
            s.longest = s.longest.max(took);
        }
        sh.scanned.notify_all();
        gap = (took * 4).max(MIN_GAP);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        ffi::CString,
        os::unix::process::CommandExt as _,
        path::PathBuf,
        process::{Child, Command, Stdio},
    };

    use super::*;

    const ID: &str = "3f6b4c7a1e2d90b8c5a4f3e2d1c0b9a8f7e6d5c4b3a29180f7e6d5c4b3a2918f";
    const UID: &str = "0e9a4c1b-2f3d-4e5a-8b6c-7d8e9f0a1b2c";
    const UID_SYSTEMD: &str = "0e9a4c1b_2f3d_4e5a_8b6c_7d8e9f0a1b2c";

    fn id(container: Option<&str>, runtime: Option<Runtime>, pod: Option<&str>) -> Identity {
        Identity {
            container_id: container.map(str::to_string),
            runtime,
            pod_uid: pod.map(str::to_string),
        }
    }

    #[test]
    fn kubelet_systemd_driver() {
        for (scope, runtime) in [
            (format!("cri-containerd-{ID}.scope"), Runtime::Containerd),
            (format!("crio-{ID}.scope"), Runtime::CriO),
            (format!("docker-{ID}.scope"), Runtime::Docker),
        ] {
            for qos in ["burstable", "besteffort"] {
                let path = format!(
                    "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_SYSTEMD}.slice/{scope}"
                );
                assert_eq!(
                    identify(&path),
                    id(Some(ID), Some(runtime), Some(UID)),
                    "{path}"
                );
            }
            // Guaranteed pods sit directly under kubepods.slice.
            let path = format!("/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/{scope}");
            assert_eq!(identify(&path), id(Some(ID), Some(runtime), Some(UID)));
        }
        // kind nests kubelet's slices under kubelet.slice.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            identify(&kind),
            id(Some(ID), Some(Runtime::Containerd), Some(UID))
        );
        // A static pod's UID is its manifest's hash, no dashes.
        let hash = "487a0dc6dccaeefbcfedba7a7ce1ca18";
        let static_pod = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            identify(&static_pod),
            id(Some(ID), Some(Runtime::CriO), Some(hash))
        );
        // The pod's own slice (its processes in several containers): the pod, no container.
        let pod = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice"
        );
        assert_eq!(identify(&pod), id(None, None, Some(UID)));
        // CRI-O's monitor is not the container.
        let conmon = format!("{pod}/crio-conmon-{ID}.scope");
        assert_eq!(identify(&conmon), id(None, None, Some(UID)));
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        for qos in ["/burstable", "/besteffort", ""] {
            let path = format!("/kubepods{qos}/pod{UID}/{ID}");
            assert_eq!(identify(&path), id(Some(ID), None, Some(UID)), "{path}");
            let crio = format!("/kubepods{qos}/pod{UID}/crio-{ID}");
            assert_eq!(
                identify(&crio),
                id(Some(ID), Some(Runtime::CriO), Some(UID))
            );
        }
        // A process in a sub-cgroup its container made still belongs to the container.
        let sub = format!("/kubepods/besteffort/pod{UID}/{ID}/kube-proxy");
        assert_eq!(identify(&sub), id(Some(ID), None, Some(UID)));
        // containerd handed a systemd path while running the cgroupfs driver writes it as
        // one directory name.
        let mixed = format!(
            "/system.slice/containerd.service/kubepods-besteffort-pod{UID_SYSTEMD}.slice:cri-containerd:{ID}"
        );
        assert_eq!(
            identify(&mixed),
            id(Some(ID), Some(Runtime::Containerd), Some(UID))
        );
        // `pod…` outside kubepods is not a pod.
        assert_eq!(
            identify(&format!("/user.slice/pod{UID}")),
            Identity::default()
        );
    }

    #[test]
    fn docker_podman_containerd() {
        let docker = Some(Runtime::Docker);
        assert_eq!(
            identify(&format!("/docker/{ID}")),
            id(Some(ID), docker, None)
        );
        assert_eq!(
            identify(&format!("/system.slice/docker-{ID}.scope")),
            id(Some(ID), docker, None)
        );
        // Docker in docker: the inner container.
        let outer = ID.replace('3', "4");
        assert_eq!(
            identify(&format!("/docker/{outer}/docker/{ID}")),
            id(Some(ID), docker, None)
        );
        let podman = Some(Runtime::Podman);
        for path in [
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/libpod_parent/libpod-{ID}"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            format!(
                "/machine.slice/machine-libpod_pod_{}.slice/libpod-{ID}.scope",
                &ID[..12]
            ),
        ] {
            assert_eq!(identify(&path), id(Some(ID), podman, None), "{path}");
        }
        assert_eq!(
            identify(&format!("/machine.slice/libpod-conmon-{ID}.scope")),
            Identity::default()
        );
        assert_eq!(
            identify(&format!("/system.slice/nerdctl-{ID}.scope")),
            id(Some(ID), Some(Runtime::Containerd), None)
        );
        // containerd without kubelet (ctr, nerdctl with cgroupfs): /<namespace>/<id>.
        assert_eq!(
            identify(&format!("/default/{ID}")),
            id(Some(ID), None, None)
        );
        // A container named by hand is not told from any other cgroup.
        assert_eq!(identify("/default/redis"), Identity::default());
        // Seen from a child cgroup namespace.
        assert_eq!(
            identify(&format!("/../../system.slice/docker-{ID}.scope")),
            id(Some(ID), docker, None)
        );
    }

    #[test]
    fn not_containers() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/sshd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/docker.service",
            "/kubepods.slice/kubepods-burstable.slice",
            // One hex digit short, and upper case.
            &format!("/docker/{}", &ID[1..]),
            &format!("/docker/{}", ID.to_uppercase()),
            // A pod UID one group short.
            "/kubepods/besteffort/pod0e9a4c1b-2f3d-4e5a-8b6c",
        ] {
            assert_eq!(identify(path), Identity::default(), "{path}");
        }
    }

    #[test]
    fn cgroup_of_each_hierarchy_layout() {
        assert_eq!(
            cgroup_path("0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        let scope = format!("/system.slice/docker-{ID}.scope");
        // cgroup v1: one line per hierarchy; systemd's names the unit.
        let v1 = format!(
            "12:pids:{scope}\n11:rdma:/\n4:cpu,cpuacct:{scope}\n3:cpuset:/\n1:name=systemd:{scope}\n"
        );
        assert_eq!(cgroup_path(&v1), Some(scope.as_str()));
        // Hybrid: the unified line is there too.
        assert_eq!(
            cgroup_path(&format!("{v1}0::{scope}\n")),
            Some(scope.as_str())
        );
        // No systemd: memory's.
        let cgroupfs = format!("5:memory:/docker/{ID}\n2:cpuset:/\n");
        assert_eq!(cgroup_path(&cgroupfs), Some(&*format!("/docker/{ID}")));
        // A path with colons is kept whole.
        assert_eq!(cgroup_path("0::/a:b:c\n"), Some("/a:b:c"));
        assert_eq!(cgroup_path(""), None);
        assert_eq!(cgroup_path("garbage"), None);
    }

    #[test]
    fn this_process_cgroup_file_parses() {
        let file = fs::read_to_string("/proc/self/cgroup").unwrap();
        let path = cgroup_path(&file).expect(&file);
        assert!(path.starts_with('/'), "{path}");
        assert!(
            file.lines().any(|l| l.ends_with(&format!(":{path}"))),
            "{file}"
        );
    }

    #[test]
    fn ancestors_and_stat() {
        assert_eq!(common_ancestor("/a/b/c", "/a/b/d"), "/a/b");
        assert_eq!(common_ancestor("/a/bc", "/a/b"), "/a");
        assert_eq!(common_ancestor("/a", "/b"), "/");
        assert_eq!(common_ancestor("/a/b", "/a/b"), "/a/b");
        assert_eq!(
            parse_stat(b"42 (a) b (c)) S 1 42 42 0 -1 4194560 99 0"),
            Some(("a) b (c)".to_string(), false))
        );
        assert_eq!(
            parse_stat(b"2 (kthreadd) S 0 0 0 0 -1 2129984 0 0"),
            Some(("kthreadd".to_string(), true))
        );
        assert_eq!(parse_stat(b"7 (x"), None);
        assert_eq!(parse_stat(b"7 (x) S 1"), None);
        assert_eq!(netns_inode(Path::new("net:[4026531840]")), Some(4026531840));
        assert_eq!(netns_inode(Path::new("mnt:[4026531840]")), None);
    }

    #[test]
    fn text_is_short_and_printable() {
        let o = Owner::new(
            vec![Process {
                pid: 7,
                comm: "evil\x1b[2J".into(),
            }],
            3,
            Some("client".into()),
            Some(format!(
                "/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
            )),
        );
        assert_eq!(
            o.text(),
            format!(
                " (ip netns client, pid 7 evil?[2J +2 more, pod {UID} container {})",
                &ID[..12]
            )
        );
        let v: serde_json::Value = serde_json::from_str(o.json().get()).unwrap();
        assert_eq!(v["processes"][0]["comm"], "evil\x1b[2J");
        assert_eq!(v["runtime"], "containerd");
        assert_eq!(Owner::new(Vec::new(), 0, None, None).text(), "");
    }

    /// A process in its own network namespace, in a cgroup it was moved to, the namespace
    /// bind-mounted under /run/netns: what a pod is, made by hand.
    struct Sandbox {
        child: Child,
        netns: u32,
        name: PathBuf,
        cgroups: Vec<PathBuf>,
        /// The cgroup's path as /proc/PID/cgroup shows it.
        cgroup: String,
    }

    impl Sandbox {
        fn new(tag: &str, layout: &str) -> Sandbox {
            let mut cmd = Command::new("sleep");
            cmd.arg("60").stdin(Stdio::null());
            // SAFETY: unshare is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap();
            let pid = child.id();
            // Until exec, the child's comm is the test's: wait for sleep's.
            while fs::read_to_string(format!("/proc/{pid}/comm")).unwrap() != "sleep\n" {
                thread::sleep(Duration::from_millis(1));
            }
            let ns_path = format!("/proc/{pid}/ns/net");
            let netns = u32::try_from(fs::metadata(&ns_path).unwrap().ino()).unwrap();
            // The hierarchy this host places processes by: systemd's on v1 and hybrid.
            let root = [
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup",
            ]
            .into_iter()
            .find(|r| Path::new(r).join("cgroup.procs").exists())
            .unwrap();
            let own = format!("{}-{}", tag, std::process::id());
            let mut cgroups = Vec::new();
            let mut dir = PathBuf::from(root);
            let rel = format!("ct-owner-test-{own}{layout}");
            for c in rel.split('/') {
                dir.push(c);
                fs::create_dir(&dir).unwrap();
                cgroups.push(dir.clone());
            }
            fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
            let name = PathBuf::from(format!("/run/netns/ct-owner-test-{own}"));
            fs::create_dir_all("/run/netns").unwrap();
            fs::File::create(&name).unwrap();
            let (src, dst) = (
                CString::new(ns_path).unwrap(),
                CString::new(name.to_str().unwrap()).unwrap(),
            );
            // SAFETY: valid C strings; a bind mount of the namespace file, as `ip netns` does.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            let cgroup = format!("/{rel}");
            let file = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            assert!(file.contains(&format!(":{cgroup}\n")), "{file}");
            Sandbox {
                child,
                netns,
                name,
                cgroups,
                cgroup,
            }
        }
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let dst = CString::new(self.name.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
            let _ = fs::remove_file(&self.name);
            for dir in self.cgroups.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    /// The scan against processes, cgroups and a name made for it: every layout's ids come
    /// out of the real /proc, and a namespace that appears after a scan is found by the scan
    /// its first lookup asks for.
    #[test]
    fn owners_of_real_namespaces() {
        let cache = OwnerCache::start(None);
        let layouts = [
            (
                "systemd",
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
                ),
                Some(Runtime::Containerd),
                Some(UID),
            ),
            (
                "cgroupfs",
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                None,
                Some(UID),
            ),
            (
                "docker",
                format!("/docker/{ID}"),
                Some(Runtime::Docker),
                None,
            ),
            (
                "podman",
                format!("/machine.slice/libpod-{ID}.scope"),
                Some(Runtime::Podman),
                None,
            ),
        ];
        // Made after the first scan: found by the scan their first lookup asks for.
        while cache.scan_stats().scans == 0 {
            thread::sleep(Duration::from_millis(5));
        }
        let boxes: Vec<_> = layouts
            .iter()
            .map(|(tag, layout, ..)| Sandbox::new(tag, layout))
            .collect();
        for (b, (_, _, runtime, pod)) in boxes.iter().zip(&layouts) {
            let o = cache
                .wait_for(b.netns, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("no owner for {}", b.cgroup));
            assert_eq!(
                o.processes,
                vec![Process {
                    pid: b.child.id(),
                    comm: "sleep".into()
                }]
            );
            assert_eq!(o.process_count, 1);
            assert_eq!(
                o.ip_netns_name.as_deref(),
                b.name.file_name().unwrap().to_str()
            );
            assert_eq!(o.cgroup.as_deref(), Some(b.cgroup.as_str()));
            assert_eq!(o.container_id.as_deref(), Some(ID));
            assert_eq!(o.runtime, *runtime);
            assert_eq!(o.pod_uid.as_deref(), *pod);
        }
        // The host's own namespace: its processes, kernel threads left out.
        let own = u32::try_from(fs::metadata("/proc/self/ns/net").unwrap().ino()).unwrap();
        let host = cache.get(own).expect("this process's namespace");
        assert!(host.processes.iter().any(|p| p.pid <= std::process::id()));
        assert!(host.processes.windows(2).all(|w| w[0].pid < w[1].pid));
        assert!(
            host.processes
                .iter()
                .all(|p| !p.comm.starts_with("kworker"))
        );
        assert!(host.container_id.is_none());
        // An inode no namespace has: the first lookup waits for its scan, later ones do not.
        let none = 1;
        assert!(cache.wait_for(none, Duration::from_secs(5)).is_none());
        let again = Instant::now();
        assert!(cache.wait_for(none, Duration::from_secs(5)).is_none());
        assert!(again.elapsed() < Duration::from_secs(1));
        assert!(cache.scan_stats().scans >= 1);
        drop(boxes);
    }
}
