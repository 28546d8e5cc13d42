//! Who owns a network namespace, against real cgroups and processes. Every process living in
//! the conntrack namespace is moved into a cgroup named as kubelet (systemd and cgroupfs
//! drivers), docker and podman name a container's; the namespace is bind-mounted under
//! /run/netns as `ip netns add` does; a UDP datagram with a bad checksum is made INVALID
//! there. The event's `owner` must name those processes (pids and comm from /proc), that
//! name, that cgroup (as /proc/PID/cgroup shows it) and the container and pod the cgroup
//! was named after.

use std::ffi::CString;
use std::fs;
use std::net::SocketAddrV4;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::inject::{Packet, RawSender};
use crate::netns::Netns;
use crate::observe::{Observation, Observer};
use crate::scenarios::Ctx;
use crate::topology::{CLIENT_IP, Nat, SERVER_IP, Topology};
use crate::verify::{self, Expected, Problems, Verdict};

/// The namespace's name under /run/netns.
const NAME: &str = "ct-owner";

/// A container's cgroup as one runtime names it, and what that name says.
struct Layout {
    what: &'static str,
    /// Under the cgroup2 root.
    path: &'static str,
    container_id: &'static str,
    runtime: Option<&'static str>,
    pod_uid: Option<&'static str>,
}

const LAYOUTS: [Layout; 4] = [
    Layout {
        what: "kubelet, systemd driver, containerd",
        path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2a3b_4d5e_4f60_8a7b_9c0d1e2f3a4b.slice/cri-containerd-1c0ffee5a1f2e3d4c5b6a79881726354453627180918a7b6c5d4e3f2a1b0c9d8.scope",
        container_id: "1c0ffee5a1f2e3d4c5b6a79881726354453627180918a7b6c5d4e3f2a1b0c9d8",
        runtime: Some("containerd"),
        pod_uid: Some("6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b"),
    },
    Layout {
        what: "kubelet, cgroupfs driver",
        path: "/kubepods/besteffort/pod0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f80912",
        container_id: "2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f80912",
        runtime: None,
        pod_uid: Some("0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"),
    },
    Layout {
        what: "docker, systemd driver",
        path: "/system.slice/docker-3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c.scope",
        container_id: "3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c",
        runtime: Some("docker"),
        pod_uid: None,
    },
    Layout {
        what: "podman, its payload in a sub-cgroup",
        path: "/machine.slice/libpod-4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d.scope/container",
        container_id: "4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d",
        runtime: Some("podman"),
        pod_uid: None,
    },
];

pub fn netns_owner(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("owner", Nat::Client { drop_invalid: true })?;
    let ct = topo.ct();
    let root = cgroup2()?;
    let _name = Pinned::bind(ct, NAME)?;
    let sender = RawSender::open(&topo.server)?;
    let mut problems = Problems::default();
    for (i, layout) in LAYOUTS.iter().enumerate() {
        let pids = processes_in(ct.inode())?;
        ensure!(!pids.is_empty(), "no process lives in {}", ct.name());
        let cgroup = Cgroup::create(&root, layout.path)?;
        for pid in &pids {
            cgroup.add(*pid)?;
        }
        let port = 6000 + i as u16;
        let mut packet = Packet::udp(
            SocketAddrV4::new(SERVER_IP, port),
            SocketAddrV4::new(CLIENT_IP, port),
            vec![b'o'; 40],
        );
        packet.bad_checksum = true;
        let expected = Expected {
            what: layout.what,
            packet,
            reason_code: "udp_*",
            kernel_text: "bad checksum",
            verdict: Verdict::Invalid,
            service: None,
        };
        let mut observer = Observer::start(&topo, ctx, &[])?;
        println!("inject: {}: {}", layout.what, expected.packet.describe());
        sender.send(&expected.packet)?;
        observer.wait_logs(1)?;
        let obs = observer.finish(|o| o.logs.len())?;
        verify::kernel_saw_injections(&topo, &obs, std::slice::from_ref(&expected), &mut problems);
        if ctx.with_tracer {
            let want = expected_owner(layout, &pids)?;
            check_owner(layout, ct, port, &want, &obs, &mut problems);
        }
    }
    problems.into_result()
}

/// The `owner` the tracer must report, from /proc and from the cgroup's own name.
fn expected_owner(layout: &Layout, pids: &[u32]) -> Result<Value> {
    let mut processes = Vec::new();
    for &pid in pids.iter().take(3) {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
        processes.push(json!({"pid": pid, "comm": comm.trim_end_matches('\n')}));
        let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        ensure!(
            cgroups.lines().any(|l| l == format!("0::{}", layout.path)),
            "pid {pid} is not in {}: {cgroups:?}",
            layout.path
        );
    }
    let mut v = json!({
        "processes": processes,
        "process_count": pids.len(),
        "ip_netns": NAME,
        "cgroup": layout.path,
        "container_id": layout.container_id,
    });
    if let Some(r) = layout.runtime {
        v["runtime"] = r.into();
    }
    if let Some(p) = layout.pod_uid {
        v["pod_uid"] = p.into();
    }
    Ok(v)
}

fn check_owner(
    layout: &Layout,
    ct: &Netns,
    port: u16,
    want: &Value,
    obs: &Observation,
    problems: &mut Problems,
) {
    let Some(trace) = &obs.trace else {
        problems.add(format!(
            "{}: tracer did not run: {}",
            layout.what,
            obs.tracer_error.as_deref().unwrap_or("?")
        ));
        return;
    };
    let ours: Vec<&Value> = obs
        .events("invalid")
        .into_iter()
        .filter(|e| e["netns"] == ct.inode() && e["dport"] == port)
        .collect();
    match ours.as_slice() {
        [ev] if ev["owner"] == *want => {}
        [ev] => problems.add(format!(
            "{}: owner {} where {want} was expected",
            layout.what, ev["owner"]
        )),
        other => problems.add(format!(
            "{}: {} INVALID events to port {port} in {}",
            layout.what,
            other.len(),
            ct.name()
        )),
    }
    let Some(summary) = &trace.summary else {
        problems.add(format!("{}: no summary", layout.what));
        return;
    };
    let row = summary["top_netns"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["netns"] == ct.inode());
    match row {
        Some(r) if r["owner"] == *want => {}
        other => problems.add(format!(
            "{}: summary row of {} is {other:?}",
            layout.what,
            ct.name()
        )),
    }
    println!(
        "netns-owner: {}: owner scans {}, the longest {} ms",
        layout.what, summary["owner_scans"]["count"], summary["owner_scans"]["longest_ms"]
    );
}

/// Processes whose network namespace is `inode`, by pid: the ground truth from /proc.
fn processes_in(inode: u64) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Where the cgroup2 hierarchy is mounted; the guest's init mounts none, so it is mounted on
/// /sys/fs/cgroup then.
pub fn cgroup2() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    if let Some(at) = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| f[1].to_string())
    }) {
        return Ok(at.into());
    }
    let at = "/sys/fs/cgroup";
    mount(Some("cgroup2"), at, Some("cgroup2"), 0).context("mounting cgroup2")?;
    Ok(at.into())
}

fn mount(src: Option<&str>, dst: &str, fstype: Option<&str>, flags: libc::c_ulong) -> Result<()> {
    let c = |s: &str| CString::new(s).context("NUL in a path");
    let (src, dst, fstype) = (src.map(c).transpose()?, c(dst)?, fstype.map(c).transpose()?);
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: valid C strings or null, as mount(2) takes them.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            dst.as_ptr(),
            ptr(&fstype),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!("mount {dst:?}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A namespace bind-mounted under /run/netns, as `ip netns add` leaves it; unmounted on drop.
struct Pinned(PathBuf);

impl Pinned {
    fn bind(ns: &Netns, name: &str) -> Result<Pinned> {
        fs::create_dir_all("/run/netns")?;
        let path = Path::new("/run/netns").join(name);
        fs::File::create(&path)?;
        let pinned = Pinned(path);
        mount(Some(&ns.path()), pinned.path(), None, libc::MS_BIND)?;
        Ok(pinned)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Ok(p) = CString::new(self.path()) {
            // SAFETY: a valid C string.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_file(&self.0);
    }
}

/// A cgroup made with its ancestors; on drop its processes go back to the root and the
/// directories made are removed.
struct Cgroup {
    root: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroup {
    fn create(root: &Path, path: &str) -> Result<Cgroup> {
        let mut cg = Cgroup {
            root: root.to_path_buf(),
            made: Vec::new(),
        };
        let mut dir = root.to_path_buf();
        for c in path.split('/').filter(|c| !c.is_empty()) {
            dir.push(c);
            if !dir.exists() {
                fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
                cg.made.push(dir.clone());
            }
        }
        Ok(cg)
    }

    fn add(&self, pid: u32) -> Result<()> {
        let procs = self
            .made
            .last()
            .context("no cgroup made")?
            .join("cgroup.procs");
        fs::write(&procs, pid.to_string()).with_context(|| format!("{pid} > {}", procs.display()))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(leaf) = self.made.last() {
            let procs = fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines() {
                let _ = fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        for dir in self.made.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}
