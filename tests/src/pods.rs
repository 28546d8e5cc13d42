//! Pods named by a real containerd. Debian's containerd (CRI plugin), runc and CNI bridge
//! plugin run in the guest (xtask/src/pods.rs puts them there with a pause image made from
//! busybox, as no registry is reachable); two pod sandboxes are made through the CRI API as
//! kubelet makes them, in a kubelet cgroupfs-layout parent cgroup; a UDP datagram with a bad
//! checksum is made INVALID in each pod's network namespace.
//!
//! Ground truth is what containerd itself keeps, read with `ctr` (not the CRI API the
//! tracer reads): the `io.kubernetes.cri.sandbox-name`/`-namespace`/`-uid` annotations of
//! each sandbox's OCI spec and its task's pid, whose /proc/PID/ns/net is the namespace. The kernel's `invalid` counter
//! of each pod's namespace says the packet was INVALID there. The tracer's event in that
//! namespace must name the pod, its Kubernetes namespace and UID, and the sandbox's cgroup;
//! with `--pod`, only that pod's events may come; `--pod` naming no pod exits 1.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use conntrack_trace::cri::{self, Method, api};
use serde_json::Value;

use crate::counters::Counters;
use crate::inject::{Packet, RawSender};
use crate::kernel::Kernel;
use crate::netns::Netns;
use crate::owner::cgroup2;
use crate::scenarios::Ctx;
use crate::tools;
use crate::tracer::Tracer;

const SOCKET: &str = "/run/containerd/containerd.sock";
const CONFIG: &str = "/etc/containerd/config.toml";
/// Written by xtask/src/pods.rs.
const PAUSE_ARCHIVE: &str = "/var/lib/ct-pods/pause.tar";
const PAUSE_NAME: &str = "docker.io/ct/pause:1";
const LOG: &str = "/tmp/containerd.log";
/// How long after the expected events others would have come too.
const SETTLE: Duration = Duration::from_millis(500);
/// The CNI bridge and its gateway address in the guest's own namespace.
const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

const CONTAINERD_TOML: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/ct/pause:1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    # The initramfs has no overlay module loaded and the guest's root is a tmpfs.
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        # pivot_root(2) fails on the initramfs root.
        NoPivotRoot = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
"#;

const CNI_CONFLIST: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "ct-pods",
  "plugins": [{
    "type": "bridge",
    "bridge": "ctpods0",
    "isGateway": true,
    "ipMasq": false,
    "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/24"}]]}
  }]
}
"#;

/// The pods made: name, Kubernetes namespace, UID (as kubelet gives them).
const PODS: [(&str, &str, &str); 2] = [
    ("web", "ct-shop", "7b3e1f0a-5c2d-4e8f-9a6b-1c0d2e3f4a5b"),
    ("db", "ct-data", "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"),
];

/// One pod as containerd reports it.
struct Pod {
    name: &'static str,
    namespace: &'static str,
    uid: &'static str,
    sandbox_id: String,
    /// The sandbox task's pid, from `ctr tasks ls`.
    pid: u32,
    netns: Netns,
    ip: Ipv4Addr,
    /// The sandbox's cgroup as /proc/PID/cgroup shows it.
    cgroup: String,
}

/// containerd and its pods, made once for every mode's pass.
struct Env {
    _containerd: Child,
    pods: Vec<Pod>,
}

static ENV: OnceLock<std::result::Result<Env, String>> = OnceLock::new();

/// The scenario's name in the suite.
pub const NAME: &str = "cri-pod";

/// Why this kernel cannot run the scenario, where it cannot. Debian's 5.10 cloud kernel
/// (5.10.0-32): runc 1.1.5's init dies before reading its bootstrap data when containerd
/// starts the pod sandbox (`runc create failed: unable to start container process: can't
/// copy bootstrap data to pipe: write init-p: broken pipe`), with nothing in the kernel log;
/// the same binaries and configuration run pods on 6.1 and later.
pub fn cannot_run(kernel: &Kernel) -> Option<&'static str> {
    kernel.release.starts_with("5.10.").then_some(
        "runc 1.1.5's init dies before reading its bootstrap data when containerd starts a \
         pod sandbox (can't copy bootstrap data to pipe: write init-p: broken pipe)",
    )
}

pub fn cri_pod(ctx: &Ctx) -> Result<()> {
    let env = ENV
        .get_or_init(|| {
            let started = Instant::now();
            let env = Env::start().map_err(|e| format!("{e:#}"));
            println!(
                "cri-pod: containerd and {} pods ready in {:.1} s",
                PODS.len(),
                started.elapsed().as_secs_f64()
            );
            env
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))?;
    for p in &env.pods {
        println!(
            "cri-pod: pod {}/{} sandbox {} pid {} netns {} ip {} cgroup {}",
            p.namespace,
            p.name,
            p.sandbox_id,
            p.pid,
            p.netns.inode(),
            p.ip,
            p.cgroup
        );
    }
    let Some(all) = ctx.tracer_args(&[]) else {
        // Oracle only: the injections still have to be INVALID in each pod.
        inject(&env.pods, 7100)?;
        return Ok(());
    };
    let mut problems = Vec::new();

    // Unfiltered: every pod's event names its pod.
    let run = traced(&env.pods, &all, 7100, env.pods.len())?;
    for (p, delta) in env.pods.iter().zip(&run.deltas) {
        ensure!(
            *delta == 1,
            "pod {}: invalid counter +{delta}, not +1",
            p.name
        );
        let ours = in_netns(&run.events, p);
        match ours.as_slice() {
            [ev] => check_owner(p, &ev["owner"], &mut problems),
            other => problems.push(format!(
                "pod {}: {} INVALID events in its namespace {}, not 1",
                p.name,
                other.len(),
                p.netns.inode()
            )),
        }
        let row = run.summary["top_netns"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["netns"] == p.netns.inode());
        match row {
            Some(r) => check_owner(p, &r["owner"], &mut problems),
            None => problems.push(format!("pod {}: no top_netns row", p.name)),
        }
    }

    // --pod web: the kernel sees both INVALID packets, the tracer reports only web's.
    let web = &env.pods[0];
    let mut args = all.clone();
    args.extend(["--pod".into(), web.name.into()]);
    let run = traced(&env.pods, &args, 7200, 1)?;
    for (p, delta) in env.pods.iter().zip(&run.deltas) {
        ensure!(
            *delta == 1,
            "pod {}: invalid counter +{delta}, not +1",
            p.name
        );
    }
    let invalid: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["event"] == "invalid")
        .collect();
    let web_events = invalid
        .iter()
        .filter(|e| e["netns"] == web.netns.inode())
        .count();
    if web_events != 1 || invalid.len() != 1 {
        problems.push(format!(
            "--pod {}: {} INVALID events, {web_events} in its namespace; expected exactly its one",
            web.name,
            invalid.len()
        ));
    }

    // --k8s-namespace of the other pod, --pod of no pod.
    let db = &env.pods[1];
    let mut args = all.clone();
    args.extend(["--k8s-namespace".into(), db.namespace.into()]);
    let run = traced(&env.pods, &args, 7300, 1)?;
    let netns: Vec<&Value> = run
        .events
        .iter()
        .filter(|e| e["event"] == "invalid")
        .map(|e| &e["netns"])
        .collect();
    if netns != [db.netns.inode()] {
        problems.push(format!(
            "--k8s-namespace {}: INVALID events in namespaces {netns:?}, expected only {}",
            db.namespace,
            db.netns.inode()
        ));
    }
    let out = Command::new(tools::tracer())
        .args(["--json", "--pod", "no-such-pod"])
        .stdin(Stdio::null())
        .output()
        .context("running the tracer")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(1) || !stderr.contains("no pod \"no-such-pod\"") {
        problems.push(format!(
            "--pod no-such-pod: exit {:?}, stderr {:?}; expected 1 naming the pod",
            out.status.code(),
            stderr.trim()
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{}", problems.join("; "))
    }
}

/// What one traced window saw.
struct Run {
    events: Vec<Value>,
    summary: Value,
    /// Each pod namespace's `invalid` counter growth, in `PODS` order.
    deltas: Vec<u64>,
}

/// The tracer with `args` around one INVALID datagram per pod (to `port`).
/// `want` is how many INVALID events the tracer should print; a filter that let more through
/// would print them as fast, so a short settle after those shows them.
fn traced(pods: &[Pod], args: &[String], port: u16, want: usize) -> Result<Run> {
    let tracer = Tracer::start_json(args)?;
    let deltas = inject(pods, port)?;
    tracer.wait_for(Duration::from_secs(5), |evs| {
        evs.iter().filter(|e| e["event"] == "invalid").count() >= want
    });
    std::thread::sleep(SETTLE);
    let trace = tracer.stop()?;
    let summary = trace.summary.context("the tracer printed no summary")?;
    Ok(Run {
        events: trace.events,
        summary,
        deltas,
    })
}

/// One UDP datagram with a bad checksum from the bridge to each pod; the growth of each
/// pod namespace's `invalid` counter.
fn inject(pods: &[Pod], port: u16) -> Result<Vec<u64>> {
    let host = Netns::current("guest")?;
    let sender = RawSender::open(&host)?;
    let mut deltas = Vec::new();
    for p in pods {
        let before = Counters::read(&p.netns)?;
        let mut packet = Packet::udp(
            SocketAddrV4::new(BRIDGE_IP, port),
            SocketAddrV4::new(p.ip, port),
            vec![b'p'; 32],
        );
        packet.bad_checksum = true;
        println!("inject: pod {}: {}", p.name, packet.describe());
        sender.send(&packet)?;
        let deadline = Instant::now() + Duration::from_secs(3);
        let delta = loop {
            let d = Counters::read(&p.netns)?.delta(&before, "invalid");
            if d >= 1 || Instant::now() > deadline {
                break d;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        deltas.push(delta);
    }
    Ok(deltas)
}

fn in_netns<'a>(events: &'a [Value], p: &Pod) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == "invalid" && e["netns"] == p.netns.inode())
        .collect()
}

/// The owner must name the pod as containerd does, and the sandbox's cgroup.
fn check_owner(p: &Pod, owner: &Value, problems: &mut Vec<String>) {
    let want = [
        ("pod", Value::from(p.name)),
        ("k8s_namespace", Value::from(p.namespace)),
        ("pod_uid", Value::from(p.uid)),
        ("cgroup", Value::from(p.cgroup.as_str())),
        ("container_id", Value::from(p.sandbox_id.as_str())),
    ];
    for (key, value) in want {
        if owner[key] != value {
            problems.push(format!(
                "pod {}: owner {key} {} where containerd says {value} (owner {owner})",
                p.name, owner[key]
            ));
        }
    }
    let pids: Vec<u64> = owner["processes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["pid"].as_u64())
        .collect();
    if !pids.contains(&u64::from(p.pid)) {
        problems.push(format!(
            "pod {}: owner processes {pids:?} lack the sandbox task's pid {}",
            p.name, p.pid
        ));
    }
}

impl Env {
    fn start() -> Result<Env> {
        ensure!(
            Path::new("/usr/bin/containerd").exists(),
            "containerd is not in this guest (xtask appends it to x86_64 guests running cri-pod)"
        );
        cgroup2()?;
        for (path, text) in [
            (CONFIG, CONTAINERD_TOML),
            ("/etc/cni/net.d/10-ct-pods.conflist", CNI_CONFLIST),
            // containerd copies the node's into each sandbox.
            ("/etc/resolv.conf", ""),
            ("/etc/hosts", "127.0.0.1 localhost\n"),
        ] {
            if let Some(dir) = Path::new(path).parent() {
                fs::create_dir_all(dir)?;
            }
            if !Path::new(path).exists() || path == CONFIG {
                fs::write(path, text).with_context(|| format!("writing {path}"))?;
            }
        }
        let log = fs::File::create(LOG)?;
        let containerd = Command::new("/usr/bin/containerd")
            .args(["--config", CONFIG])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let result = Env::pods(containerd);
        if result.is_err() {
            let log = fs::read_to_string(LOG).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            for l in tail.iter().rev() {
                println!("containerd> {l}");
            }
            // What the kernel said while runc set the sandbox up (a killed runc init).
            if let Ok(out) = Command::new("dmesg").output() {
                let text = String::from_utf8_lossy(&out.stdout);
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                for l in tail.iter().rev() {
                    println!("dmesg> {l}");
                }
            }
        }
        result
    }

    fn pods(containerd: Child) -> Result<Env> {
        let env = Env {
            _containerd: containerd,
            pods: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Path::new(SOCKET).exists() {
            ensure!(
                Instant::now() < deadline,
                "containerd made no socket in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ctr(&["images", "import", "--snapshotter", "native", PAUSE_ARCHIVE])?;
        let images = ctr(&["images", "ls", "-q"])?;
        ensure!(
            images.lines().any(|l| l == PAUSE_NAME),
            "the pause image was imported as {images:?}, not {PAUSE_NAME}"
        );
        let mut env = env;
        for (name, namespace, uid) in PODS {
            env.pods.push(run_pod(name, namespace, uid)?);
        }
        Ok(env)
    }
}

fn ctr(args: &[&str]) -> Result<String> {
    let out = Command::new("/usr/bin/ctr")
        .args(["--address", SOCKET, "-n", "k8s.io"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ctr")?;
    ensure!(
        out.status.success(),
        "ctr {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A sandbox made as kubelet (cgroupfs driver) makes one, then read back from containerd's
/// own records.
fn run_pod(name: &'static str, namespace: &'static str, uid: &'static str) -> Result<Pod> {
    let parent = format!("/kubepods/besteffort/pod{uid}");
    let req = api::RunPodSandboxRequest {
        config: Some(api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: format!("/var/log/pods/{namespace}_{name}_{uid}"),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: parent.clone(),
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: 0,
                        pid: 1,
                        ipc: 0,
                    }),
                }),
            }),
        }),
        runtime_handler: String::new(),
    };
    let started = Instant::now();
    let resp: api::RunPodSandboxResponse = cri::unary(
        Path::new(SOCKET),
        Method::RunPodSandbox,
        req,
        Duration::from_secs(90),
    )
    .with_context(|| format!("RunPodSandbox {namespace}/{name}"))?;
    let id = resp.pod_sandbox_id;
    println!(
        "cri-pod: RunPodSandbox {namespace}/{name}: {id} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // containerd's records: the OCI annotations it gave runc for the sandbox, its task's pid.
    let info: Value = serde_json::from_str(&ctr(&["containers", "info", &id])?)
        .context("ctr containers info is not JSON")?;
    let notes = &info["Spec"]["annotations"];
    ensure!(
        notes["io.kubernetes.cri.sandbox-name"] == name
            && notes["io.kubernetes.cri.sandbox-namespace"] == namespace
            && notes["io.kubernetes.cri.sandbox-uid"] == uid,
        "containerd's annotations of sandbox {id}: {notes}"
    );
    let tasks = ctr(&["tasks", "ls"])?;
    let pid: u32 = tasks
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id.as_str())).then(|| f.get(1)?.parse().ok())?
        })
        .with_context(|| format!("no task of {id} in {tasks:?}"))?;
    let netns = Netns::open(&format!("pod {name}"), &format!("/proc/{pid}/ns/net"))?;
    let own = fs::metadata("/proc/self/ns/net")?.ino();
    ensure!(
        netns.inode() != own,
        "pod {name} shares the guest's namespace"
    );
    // Conntrack runs in a namespace once a rule there needs it (as kube-proxy's do).
    netns.on_invalid("iptables", "ACCEPT")?;
    let addr = netns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
    let ip: Ipv4Addr = addr
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .with_context(|| format!("no IPv4 address on pod {name}'s eth0: {addr:?}"))?;
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let cgroup = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("pid {pid}: no cgroup v2 line in {cgroups:?}"))?
        .to_string();
    ensure!(
        cgroup == format!("{parent}/{id}"),
        "the sandbox's cgroup is {cgroup}, not {parent}/{id}"
    );
    Ok(Pod {
        name,
        namespace,
        uid,
        sandbox_id: id,
        pid,
        netns,
        ip,
        cgroup,
    })
}
