//! `ct-scenarios demo`: the kube-proxy incident, live. A client talks to a Service VIP that
//! is DNAT'd to a backend; out-of-window segments and real retransmits hit conntrack while
//! the tracer prints what it sees in human form on the console. There is no INVALID drop
//! rule, so the SEQ-over segment reaches the client un-NATed and the client's RST kills the
//! connection, exactly as in the incident.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::connection::Flow;
use crate::inject::RawSender;
use crate::kernel::Kernel;
use crate::scenarios::{self, BULK};
use crate::topology::{Nat, Topology, WEB};
use crate::tracer::Tracer;

/// The arguments `cargo xtask run -- ARGS` gave the tracer (written by xtask/src/initramfs.rs).
const TRACER_ARGS: &str = "/etc/ct-tracer-args";

fn tracer_args() -> Result<Vec<String>> {
    match std::fs::read_to_string(TRACER_ARGS) {
        Ok(s) => Ok(s.lines().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).context(TRACER_ARGS),
    }
}

pub fn run() -> Result<()> {
    let kernel = Kernel::detect()?;
    say(&kernel.describe());
    let topo = Topology::build(
        "demo",
        Nat::Client {
            drop_invalid: false,
        },
    )?;
    let mut flow = Flow::open(&topo, WEB)?;
    say(&format!(
        "client {} -> Service {} -> DNAT -> backend {} (client netns {}, conntrack lives there)",
        flow.client_addr,
        WEB.vip,
        WEB.backend,
        topo.client.inode()
    ));
    flow.exchange(1000)?;
    let old = flow.seqs()?;
    flow.bulk_to_client(BULK)?;
    let now = flow.seqs()?;
    let sender = RawSender::open(&topo.server)?;

    let tracer = Tracer::start_human(&tracer_args()?)?;
    std::thread::sleep(Duration::from_millis(500));

    say("backend ACKs data the client never sent: INVALID");
    sender.send(&scenarios::ack_over(&flow, now))?;
    std::thread::sleep(Duration::from_millis(300));

    say(&format!(
        "netem holds back {}% of the backend's segments for a second: real retransmits and late originals",
        scenarios::NETEM_HELD_PERCENT
    ));
    scenarios::netem_transfer(&topo, &mut flow)?;
    say(&format!(
        "the backend retransmitted {} segments",
        flow.server_retransmits()?
    ));

    let now = flow.seqs()?;
    say(&format!(
        "backend retransmits bytes the client ACKed over {} KiB ago: {}",
        BULK / 1024,
        if kernel.window_under_is_ignored() {
            "IGNORED since 6.1, the packet keeps its NAT"
        } else {
            "INVALID before 6.1, so it is not un-NATed..."
        }
    ));
    sender.send(&scenarios::old_retransmit(&flow, old, now))?;
    if !reset_seen(&flow)? {
        say(
            "backend sends a segment far beyond the client's window: INVALID, so it is not un-NATed...",
        );
        sender.send(&scenarios::seq_over(&flow, now))?;
        if !reset_seen(&flow)? {
            say("...but the backend's connection is still up (no reset seen)");
            tracer.stop().context("stop tracer")?;
            bail!("the incident was not reproduced: the backend's connection was not reset");
        }
    }

    std::thread::sleep(Duration::from_secs(2));
    say("stopping the tracer (SIGINT): its summary follows");
    tracer.stop().context("stop tracer")?;
    Ok(())
}

/// Whether the client's RST (answering an un-NATed segment) has reset the backend's socket.
fn reset_seen(flow: &Flow) -> Result<bool> {
    std::thread::sleep(Duration::from_millis(500));
    flow.server.set_nonblocking(true)?;
    let mut buf = [0u8; 16];
    let result = (&flow.server).read(&mut buf);
    flow.server.set_nonblocking(false)?;
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            say(
                "...the client stack answered it with an RST and the backend's connection was reset (ECONNRESET)",
            );
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        other => {
            say(&format!("...backend socket read returned {other:?}"));
            Ok(false)
        }
    }
}

fn say(line: &str) {
    println!("demo: {line}");
}
