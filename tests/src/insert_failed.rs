//! A clash at confirm that cannot be resolved (`insert_failed`): two SYNs of one new
//! TCP flow each get an unconfirmed entry at LOCAL_OUT. NFQUEUE holds the first between its
//! entry's creation and confirm (POST_ROUTING) while the second is confirmed, so when the
//! first is let go its tuple is taken. From 6.12, TCP allowing no clash, `nf_ct_resolve_clash`
//! drops it and counts `insert_failed`: the mechanism of the parallel DNS A/AAAA race, made
//! deterministic. Before 6.12 nfnetlink_queue re-attaches the packet to the confirmed entry
//! itself, and the kernel counts nothing: then the tracer must report nothing either. The
//! tracer runs in its default mode (the clash hooks are cold-path).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nfq::{Message, Queue, Verdict};

use crate::inject::{Packet, RawSender, SYN};
use crate::observe::Observer;
use crate::scenarios::Ctx;
use crate::topology::{CLIENT_IP, Nat, SERVER_IP, Topology};
use crate::verify::{self, Problems, brief};

const QUEUE: u16 = 7;
/// The mark that sends a packet into the queue.
const HELD: u32 = 1;
const CLIENT_PORT: u16 = 45000;
/// Where the SYNs go: the backend drops them, because an answer (RST or SYN-ACK, then the
/// client's RST) would remove the confirmed entry before the held SYN reaches confirm.
const SILENT_PORT: u16 = 7777;

pub fn insert_failed(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build(
        "clash",
        Nat::Client {
            drop_invalid: false,
        },
    )?;
    let client = topo.client.inode();
    let mark = HELD.to_string();
    let queue_num = QUEUE.to_string();
    topo.client.iptables(&[
        "-A",
        "OUTPUT",
        "-m",
        "mark",
        "--mark",
        &mark,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue_num,
    ])?;
    let port = SILENT_PORT.to_string();
    topo.server
        .iptables(&["-A", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"])?;
    let mut queue = topo
        .client
        .run(|| -> std::io::Result<Queue> {
            let mut q = Queue::open()?;
            q.bind(QUEUE)?;
            q.set_nonblocking(true);
            Ok(q)
        })?
        .context("NFQUEUE in the client namespace")?;
    let held_sender = RawSender::open(&topo.client)?;
    held_sender.set_mark(HELD)?;
    let sender = RawSender::open(&topo.client)?;

    let from = SocketAddrV4::new(CLIENT_IP, CLIENT_PORT);
    let to = SocketAddrV4::new(SERVER_IP, SILENT_PORT);
    let syn = Packet::tcp(from, to, 1000, 0, SYN, Vec::new());

    let mut observer = Observer::start(&topo, ctx, &[])?;
    println!("send: {} (held in NFQUEUE {QUEUE})", syn.describe());
    held_sender.send(&syn)?;
    let held = next_packet(&mut queue, Duration::from_secs(5))?;
    println!("send: {} again (confirmed first)", syn.describe());
    sender.send(&syn)?;
    std::thread::sleep(Duration::from_millis(200));
    println!("nfqueue: releasing the held SYN: its tuple is now taken");
    let mut held = held;
    held.set_verdict(Verdict::Accept);
    queue.verdict(held).context("NFQUEUE verdict")?;
    std::thread::sleep(Duration::from_millis(200));
    observer.wait_logs(0)?;
    let obs = observer.finish(|o| o.delta(client, "insert_failed") as usize)?;

    let mut problems = Problems::default();
    // The kernel side: exactly the one clash, in the client's namespace (none where the
    // queue resolves it).
    let clash = !ctx.kernel.queue_reinject_resolves_clash();
    for ns in topo.namespaces() {
        let want = u64::from(clash && ns.inode() == client);
        let got = obs.delta(ns.inode(), "insert_failed");
        if got != want {
            problems.add(format!(
                "kernel insert_failed counter in {} moved by {got}, expected {want}",
                ns.name()
            ));
        }
    }
    // The tracer side: one insert_failed drop per failed insert, attributed to the held SYN.
    verify::stream_is_complete(&topo, &obs, &mut problems);
    if obs.trace.is_some() {
        let drops = obs.events("drop");
        let counted = obs.delta(client, "insert_failed");
        let failed: Vec<_> = drops
            .iter()
            .filter(|e| e["reason_code"] == "insert_failed")
            .collect();
        if failed.len() as u64 != counted {
            problems.add(format!(
                "tracer printed {} insert_failed drops, the kernel's insert_failed counter moved by {counted}",
                failed.len()
            ));
        }
        for ev in &failed {
            let ok = ev["proto"] == "tcp"
                && verify::endpoint(ev, "s") == Some((*from.ip(), from.port()))
                && verify::endpoint(ev, "d") == Some((*to.ip(), to.port()))
                && ev["tcp"]["flags"] == "S"
                && ev["netns"].as_u64() == Some(client);
            if !ok {
                problems.add(format!(
                    "insert_failed drop should be the SYN {from} -> {to} in netns {client}: {}",
                    brief(ev)
                ));
            }
        }
        for ev in drops.iter().filter(|e| e["reason_code"] != "insert_failed") {
            problems.add(format!("unexpected drop: {}", brief(ev)));
        }
    }
    problems.into_result()
}

/// The next packet the queue holds, waiting at most `timeout`.
fn next_packet(queue: &mut Queue, timeout: Duration) -> Result<Message> {
    let deadline = Instant::now() + timeout;
    loop {
        match queue.recv() {
            Ok(msg) => return Ok(msg),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("no packet reached NFQUEUE {QUEUE} within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("NFQUEUE recv"),
        }
    }
}
