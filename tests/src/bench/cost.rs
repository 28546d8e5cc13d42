//! Per-packet kernel cost and throughput: one steady bulk TCP transfer from the backend to
//! the client through the Service DNAT runs for the whole phase, and measurement windows are
//! taken with the tracer off, with each verdict probe (none, fexit, the kprobe pair) and with
//! empty programs where fexit and the kprobe pair attach (the `bpf_stats` floor of each hook),
//! in rounds that interleave them so drift (TCG, caches) hits them alike.
//!
//! For every program the tracer holds, the window's `run_time_ns`/`run_cnt` growth is
//! recorded; the number of skbs conntrack saw is the client veth's rx + tx packet count
//! (every one passes `nf_conntrack_in` once, at PRE_ROUTING or LOCAL_OUT). veth does GSO, so
//! a "packet" here is an skb of up to 64 KiB, which is also what `nf_conntrack_in` is called
//! for.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;

use super::counting::CountingTracer;
use super::floor::Floor;
use super::progs::{self, Prog};
use super::record;
use crate::topology::{CLIENT_IF, Topology, WEB};

/// Round-to-round noise under TCG is tens of percent (TCP's own dynamics on two emulated
/// CPUs); five interleaved rounds give a median that one outlier cannot move.
const ROUNDS: usize = 5;
const WINDOW: Duration = Duration::from_secs(8);
/// Lets the transfer recover from the tracer's start-up (BTF parsing is CPU-heavy).
const SETTLE: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(20);
const CHUNK: usize = 256 * 1024;

/// What runs in a measurement window.
#[derive(Clone, Copy)]
pub enum Setup {
    Off,
    /// The tracer with these arguments.
    Tracer(&'static [&'static str]),
    /// Empty programs where a verdict probe attaches: the `bpf_stats` floor of that hook.
    Empty(fn() -> Result<Floor>),
}

/// The configurations, by the label the report uses; fexit only where nf_conntrack has
/// module BTF (or is built in).
pub fn modes(fexit: bool) -> Vec<(&'static str, Setup)> {
    let mut modes = vec![
        ("off", Setup::Off),
        ("cold", Setup::Tracer(&["--verdict-probe", "none"])),
        ("fexit", Setup::Tracer(&["--verdict-probe", "fexit"])),
        ("empty fexit", Setup::Empty(Floor::fexit)),
        ("fexit reading skb->_nfct", Setup::Empty(Floor::fexit_nfct)),
        (
            "kprobe pair",
            Setup::Tracer(&["--verdict-probe", "kprobe-pair"]),
        ),
        ("empty kprobe pair", Setup::Empty(Floor::kprobe_pair)),
    ];
    modes.retain(|(m, _)| fexit || !m.contains("fexit"));
    modes
}

pub fn run(topo: &Topology, fexit: bool) -> Result<()> {
    let bulk = Bulk::start(topo)?;
    let measured = (|| -> Result<()> {
        for round in 1..=ROUNDS {
            for (mode, setup) in modes(fexit) {
                window(topo, &bulk, round, mode, setup)?;
            }
        }
        Ok(())
    })();
    let ended = bulk.finish();
    measured?;
    ended
}

/// What a window holds attached, and how its programs' totals are read.
enum Running {
    Off,
    Tracer(CountingTracer, HashMap<String, String>),
    Empty(Floor),
}

impl Running {
    fn start(setup: Setup) -> Result<Running> {
        Ok(match setup {
            Setup::Off => Running::Off,
            Setup::Tracer(args) => {
                let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                let tracer = CountingTracer::start(&args)?;
                Running::Tracer(tracer, progs::names()?)
            }
            Setup::Empty(attach) => Running::Empty(attach()?),
        })
    }

    /// Every program's totals by id, and each id's name.
    fn snapshot(&self) -> Result<(HashMap<u32, Prog>, HashMap<u32, String>)> {
        match self {
            Running::Off => Ok(Default::default()),
            Running::Tracer(t, by_tag) => {
                let totals = progs::snapshot(t.pid())?;
                let names = totals
                    .values()
                    .filter_map(|p| Some((p.id, by_tag.get(&p.tag)?.clone())))
                    .collect();
                Ok((totals, names))
            }
            Running::Empty(floor) => floor.snapshot(),
        }
    }

    fn stop(self) -> Result<()> {
        if let Running::Tracer(t, _) = self {
            t.stop()?;
        }
        Ok(())
    }
}

/// One measurement window in one mode.
fn window(topo: &Topology, bulk: &Bulk, round: usize, mode: &str, setup: Setup) -> Result<()> {
    let running = Running::start(setup).with_context(|| format!("{mode} mode"))?;
    std::thread::sleep(SETTLE);
    let (progs0, skbs0, bytes0) = (running.snapshot()?.0, skbs(topo)?, bulk.received());
    let started = Instant::now();
    std::thread::sleep(WINDOW);
    let ((progs1, names), skbs1, bytes1) = (running.snapshot()?, skbs(topo)?, bulk.received());
    let secs = started.elapsed().as_secs_f64();
    let (bytes, skbs) = (bytes1 - bytes0, skbs1 - skbs0);
    ensure!(
        bytes > 0,
        "the bulk transfer stalled in the {mode} window of round {round}"
    );
    println!(
        "bench: round {round} {mode}: {:.1} MiB/s, {skbs} skbs through conntrack",
        bytes as f64 / secs / (1 << 20) as f64
    );
    record(json!({"kind": "throughput", "mode": mode, "round": round,
                  "bytes": bytes, "secs": secs, "skbs": skbs}));
    for d in progs::delta(&progs0, &progs1, |p| names.get(&p.id).cloned()) {
        record(
            json!({"kind": "cost", "mode": mode, "round": round, "program": d.name,
                      "runs": d.run_cnt, "run_time_ns": d.run_time_ns, "skbs": skbs}),
        );
    }
    // Its start-up time competed with the transfer for both vCPUs: the idle phase
    // measures that instead.
    running.stop()
}

/// Packets through the client's veth in both directions, from its namespace's /proc/net/dev.
fn skbs(topo: &Topology) -> Result<u64> {
    let dev = topo.client.read_proc_net("dev")?;
    parse_dev_packets(&dev, CLIENT_IF).with_context(|| format!("{CLIENT_IF} in /proc/net/dev"))
}

fn parse_dev_packets(dev: &str, iface: &str) -> Option<u64> {
    let counters = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(iface)?.strip_prefix(':'))?;
    let fields: Vec<u64> = counters
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
    Some(fields.get(1)? + fields.get(9)?)
}

/// The backend streams to the client through the Service VIP until told to stop; the
/// client counts what it reads.
struct Bulk {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    client: TcpStream,
    server: TcpStream,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Bulk {
    fn start(topo: &Topology) -> Result<Bulk> {
        let listener = topo
            .server
            .run(|| TcpListener::bind(WEB.backend))?
            .with_context(|| format!("listen on {}", WEB.backend))?;
        // Default socket buffers (autotuning): a realistic bulk transfer, unlike the
        // scenarios' small-window connection.
        let client = topo
            .client
            .run(|| TcpStream::connect_timeout(&SocketAddr::V4(WEB.vip), IO_TIMEOUT))?
            .with_context(|| format!("connect to Service {}", WEB.vip))?;
        let server = crate::connection::accept(&listener)?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mut server, stop) = (server.try_clone()?, stop.clone());
            std::thread::spawn(move || {
                let data = vec![0x5a; CHUNK];
                let result = (|| -> io::Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        server.write_all(&data)?;
                    }
                    Ok(())
                })();
                stopped_ok(result, &stop)
            })
        };
        let reader = {
            let (mut client, stop, received) =
                (client.try_clone()?, stop.clone(), received.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0; CHUNK];
                let result = (|| -> io::Result<()> {
                    while !stop.load(Ordering::Relaxed) {
                        let n = client.read(&mut buf)?;
                        if n == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Ok(())
                })();
                stopped_ok(result, &stop)
            })
        };
        Ok(Bulk {
            received,
            stop,
            client,
            server,
            threads: vec![writer, reader],
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops both ends; an error either end hit before the stop is the transfer's failure.
    fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        // Unblocks a read or write in progress (the errors that follow are expected).
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
        for t in self.threads {
            t.join()
                .map_err(|_| anyhow::anyhow!("bulk thread panicked"))?
                .context("bulk transfer")?;
        }
        Ok(())
    }
}

/// An I/O error after the stop flag was set comes from our own shutdown.
fn stopped_ok(result: io::Result<()>, stop: &AtomicBool) -> io::Result<()> {
    match result {
        Err(_) if stop.load(Ordering::Relaxed) => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_packets_are_rx_plus_tx() {
        let dev = "Inter-|   Receive                            |  Transmit\n \
                   face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
                   lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
                   veth-client: 123456  40    0    0    0     0          0         0   7890   25    0    0    0     0       0          0\n";
        assert_eq!(parse_dev_packets(dev, "veth-client"), Some(65));
        assert_eq!(parse_dev_packets(dev, "veth-server"), None);
    }
}
