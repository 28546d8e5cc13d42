//! The tracer as a node agent, scraped by a real Prometheus: `--metrics` on this host (where
//! the programs may not attach: then the kernel's counters alone), INVALID packets made in a
//! fresh network namespace, and what Prometheus stored compared with that namespace's
//! `/proc/net/stat/nf_conntrack`. Also `promtool check metrics` on a scrape and `promtool
//! check rules` / `test rules` on deploy/prometheus.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{run_cmd, workspace_root};

/// Sends INVALID TCP segments (SYN+FIN: an invalid flag combination on every kernel) from
/// 127.0.0.1 to itself, after one real connection that leaves an entry in the table.
const TRAFFIC: &str = r#"
import socket, struct, sys
n = int(sys.argv[1])
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
cli = socket.create_connection(srv.getsockname()); acc, _ = srv.accept()
cli.sendall(b"x"); acc.recv(1)
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
lo = socket.inet_aton("127.0.0.1")
for i in range(n):
    tcp = struct.pack("!HHIIBBHHH", 40000 + i, 9, 1000 + i, 0, 5 << 4, 0x03, 1024, 0, 0)
    pseudo = lo + lo + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    raw.sendto(tcp, ("127.0.0.1", 0))
"#;

/// Kills the child when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace under /run/netns for the test's traffic, deleted at the end.
struct Netns(String);

impl Netns {
    fn new() -> Result<Self> {
        let name = format!("ct-prom-test-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_cmd(Command::new("ip").args(["netns", "add", &name]))?;
        Ok(Self(name))
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(fs::metadata(format!("/run/netns/{}", self.0))?.ino())
    }

    fn delete(&self) -> Result<()> {
        run_cmd(Command::new("ip").args(["netns", "del", &self.0]))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A port nobody listens on now (the kernel's pick for port 0).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// HTTP/1.0 GET (so the answer comes whole, never chunked): status and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {resp:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let mut last = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                last.map(|e| format!(" (last error: {e:#})"))
                    .unwrap_or_default()
            );
        }
        sleep(Duration::from_millis(200));
    }
}

fn encode_query(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector: each series' labels and value.
fn query(prom: SocketAddr, q: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let (status, body) = get(prom, &format!("/api/v1/query?query={}", encode_query(q)))?;
    let v: Value = serde_json::from_str(&body).with_context(|| format!("{status}: {body}"))?;
    ensure!(v["status"] == "success", "query {q}: {body}");
    v["data"]["result"]
        .as_array()
        .context("no result")?
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .context("no labels")?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .context("no value")?;
            Ok((labels, value))
        })
        .collect()
}

/// The namespace's counters as the kernel shows them: per-CPU hex rows, summed here.
fn kernel_counters(ns: &Netns) -> Result<BTreeMap<String, u64>> {
    let out = ns.exec(&["cat", "/proc/net/stat/nf_conntrack"]).output()?;
    ensure!(
        out.status.success(),
        "cannot read the namespace's stat file"
    );
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let columns: Vec<&str> = lines.next().context("empty")?.split_whitespace().collect();
    let mut sums = BTreeMap::new();
    for line in lines {
        for (c, v) in columns.iter().zip(line.split_whitespace()) {
            let v = u64::from_str_radix(v, 16)?;
            let e = sums.entry(c.to_string()).or_insert(0);
            // The same count on every CPU's row: the namespace's entries.
            *e = if *c == "entries" { v } else { *e + v };
        }
    }
    Ok(sums)
}

fn tool(name: &str) -> Result<PathBuf> {
    let path = Path::new("/usr/bin").join(name);
    ensure!(
        path.exists(),
        "{} is missing: `cargo xtask setup` installs Debian's prometheus package",
        path.display()
    );
    Ok(path)
}

/// promtool on what it is given on stdin (a scrape) or on files; Err with what it said.
fn promtool(args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(tool("promtool")?)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "promtool {args:?}: {}\n{said}",
        out.status
    );
    Ok(())
}

pub fn test(tracer: &Path) -> Result<()> {
    let rules = workspace_root().join("deploy/prometheus/rules.yaml");
    let rules_test = workspace_root().join("deploy/prometheus/rules-test.yaml");
    promtool(&["check", "rules", rules.to_str().context("path")?], None)?;
    promtool(
        &["test", "rules", rules_test.to_str().context("path")?],
        None,
    )?;

    let scratch = std::env::temp_dir().join(format!("ct-prom-test-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let ns = Netns::new()?;
    let ino = ns.inode()?;

    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let _tracer = Running(
        Command::new(tracer)
            .args(["--json", "--metrics", &metrics.to_string()])
            .stdout(fs::File::create(scratch.join("tracer.out"))?)
            .stderr(fs::File::create(scratch.join("tracer.err"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", tracer.display()))?,
    );
    wait_for("the tracer's /healthz", Duration::from_secs(10), || {
        Ok(get(metrics, "/healthz").ok().filter(|r| r.0 == 200))
    })?;
    let (_, scrape) = get(metrics, "/metrics")?;
    promtool(&["check", "metrics"], Some(&scrape))
        .with_context(|| format!("on this scrape:\n{scrape}"))?;

    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let config = scratch.join("prometheus.yml");
    fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: conntrack-trace\n    static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    )?;
    let _prometheus = Running(
        Command::new(tool("prometheus")?)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                scratch.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(fs::File::create(scratch.join("prometheus.err"))?)
            .spawn()
            .context("cannot start prometheus")?,
    );
    wait_for("Prometheus to be ready", Duration::from_secs(20), || {
        Ok(get(prom, "/-/ready").ok().filter(|r| r.0 == 200))
    })?;

    // Conntrack runs in a namespace once a rule there uses it.
    run_cmd(&mut ns.exec(&["ip", "link", "set", "lo", "up"]))?;
    run_cmd(&mut ns.exec(&[
        "nft",
        "add table inet ct_prom_test; add chain inet ct_prom_test out { type filter hook output priority 0; }; add rule inet ct_prom_test out ct state invalid counter",
    ]))?;
    run_cmd(&mut ns.exec(&["python3", "-c", TRAFFIC, "25"]))?;
    let kernel = kernel_counters(&ns)?;
    ensure!(
        kernel.get("invalid").is_some_and(|&v| v > 0)
            && kernel.get("entries").is_some_and(|&v| v > 0),
        "the traffic made no INVALID packet or no entry in the namespace: {kernel:?}"
    );
    let max: u64 = String::from_utf8(
        ns.exec(&["cat", "/proc/sys/net/netfilter/nf_conntrack_max"])
            .output()?
            .stdout,
    )?
    .trim()
    .parse()?;

    // What Prometheus stored, once a scrape after the traffic has come in.
    let selector = format!("{{netns=\"{ino}\"}}");
    let stored = wait_for(
        "Prometheus to store the namespace's counters as the kernel has them",
        Duration::from_secs(20),
        || {
            let mut got = BTreeMap::new();
            for (labels, v) in query(prom, &format!("{{__name__=~\"conntrack_trace_(kernel_.*_total|table_entries|table_max)\",netns=\"{ino}\"}}"))? {
                got.insert(labels["__name__"].clone(), v as u64);
            }
            let want: BTreeMap<String, u64> = kernel
                .iter()
                .map(|(c, &v)| match c.as_str() {
                    "entries" => ("conntrack_trace_table_entries".to_string(), v),
                    _ => (format!("conntrack_trace_kernel_{c}_total"), v),
                })
                .chain([("conntrack_trace_table_max".to_string(), max)])
                .collect();
            Ok((got == want).then_some(got))
        },
    )
    .with_context(|| format!("kernel: {kernel:?}, max {max}"))?;
    println!(
        "prometheus: netns {ino}: invalid {} entries {} max {} ({} series equal to the kernel's)",
        kernel["invalid"],
        kernel["entries"],
        max,
        stored.len()
    );

    let attached = query(prom, "conntrack_trace_attached")?;
    let [(labels, value)] = attached.as_slice() else {
        bail!("conntrack_trace_attached: {attached:?}");
    };
    if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        ensure!(*value == 1.0, "attached where kprobes exist: {attached:?}");
    } else {
        let reason = labels.get("reason").map(String::as_str).unwrap_or_default();
        ensure!(
            *value == 0.0 && reason.contains("kprobes"),
            "not attached here (no kprobes), and the reason must say so: {attached:?}"
        );
    }

    // A namespace that goes away leaves the scrape, and Prometheus marks its series stale.
    ns.delete()?;
    wait_for(
        "the deleted namespace's series to go stale",
        Duration::from_secs(20),
        || {
            Ok(
                query(prom, &format!("conntrack_trace_table_entries{selector}"))?
                    .is_empty()
                    .then_some(()),
            )
        },
    )?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}
