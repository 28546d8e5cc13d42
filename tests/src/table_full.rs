//! A full conntrack table: the node's table holds only its established
//! connections, so every new flow's first packet is dropped by `nf_conntrack_in`
//! ("nf_conntrack: table full, dropping packet", `drop` counter). With a verdict probe each
//! drop is attributed to its packet; in cold mode `early_drop` names only the namespace.

use std::net::{SocketAddrV4, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::connection::Flow;
use crate::observe::Observer;
use crate::scenarios::Ctx;
use crate::topology::{API, CLIENT_IP, Nat, SERVER_IP, Topology, WEB};
use crate::verify::{self, Problems, brief};

const MAX_KEY: &str = "net.netfilter.nf_conntrack_max";
/// New flows sent into the full table, one datagram each.
const NEW_FLOWS: u16 = 5;
const SOURCE_PORT: u16 = 5400;
const FIRST_DEST_PORT: u16 = 6000;

pub fn table_full(ctx: &Ctx) -> Result<()> {
    let mut topo = Topology::build("full", Nat::Node)?;
    // Established, ASSURED entries: early_drop() never evicts those, so nothing makes room.
    let mut flows = [Flow::open(&topo, WEB)?, Flow::open(&topo, API)?];
    for f in &mut flows {
        f.exchange(100)?;
    }
    let count = topo
        .ct()
        .read_sysctl("net.netfilter.nf_conntrack_count")?
        .parse::<u64>()
        .context("nf_conntrack_count")?;
    println!("table-full: the node's table holds {count} entries");
    limit_table(&mut topo, count)?;

    let mut observer = Observer::start(&topo, ctx, &[])?;
    let sent = send_new_flows(&topo)?;
    std::thread::sleep(Duration::from_millis(200));
    observer.wait_logs(0)?;
    let node = topo.ct().inode();
    let obs = observer.finish(|o| o.delta(node, "drop") as usize)?;

    let mut problems = Problems::default();
    // The kernel side: every new flow was dropped for want of room, nothing was evicted.
    for ns in topo.namespaces() {
        let dropped = if ns.inode() == node {
            u64::from(NEW_FLOWS)
        } else {
            0
        };
        for (column, want) in [("drop", dropped), ("invalid", 0)] {
            let got = obs.delta(ns.inode(), column);
            if got != want {
                problems.add(format!(
                    "kernel {column} counter in {} moved by {got}, expected {want}",
                    ns.name()
                ));
            }
        }
    }
    if obs.delta(node, "early_drop") != 0 {
        problems.add("early_drop evicted an entry: the table was not full of ASSURED ones".into());
    }
    // printk is rate limited: at least one line, not one per packet. Outside init_net 6.17+
    // names the namespace, which must be the node's.
    let logged = if ctx.kernel.table_full_log_names_netns() {
        format!("nf_conntrack: table full in netns {node}, dropping packet")
    } else {
        "nf_conntrack: table full, dropping packet".to_string()
    };
    if !obs.messages.iter().any(|m| m.contains(&logged)) {
        problems.add(format!("the kernel did not log \"{logged}\""));
    }

    // The tracer side: one table_full drop per dropped packet, each attributed to its packet.
    verify::stream_is_complete(&topo, &obs, &mut problems);
    if let Some(trace) = &obs.trace {
        let drops = obs.events("drop");
        let table_full = drops
            .iter()
            .filter(|e| e["reason_code"] == "table_full")
            .count() as u64;
        let counted = obs.delta(node, "drop");
        if table_full != counted {
            problems.add(format!(
                "tracer printed {table_full} table_full drops, the node's drop counter moved by {counted}"
            ));
        }
        for ev in trace.events.iter().filter(|e| e["event"] != "drop") {
            problems.add(format!("unexpected event: {}", brief(ev)));
        }
        if !obs.complete {
            // No packet to name: each drop says its namespace and that the packet is unknown.
            for ev in &drops {
                let ok = ev["reason_code"] == "table_full"
                    && ev["netns"].as_u64() == Some(node)
                    && ev["saddr"].is_null()
                    && ev["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("which packet is unknown"));
                if !ok {
                    problems.add(format!(
                        "cold drop should be table_full in the node's netns {node}, packet unknown: {ev}"
                    ));
                }
            }
            return problems.into_result();
        }
        for (from, to) in &sent {
            let matching: Vec<&&Value> = drops
                .iter()
                .filter(|e| {
                    e["proto"] == "udp"
                        && verify::endpoint(e, "s") == Some((*from.ip(), from.port()))
                        && verify::endpoint(e, "d") == Some((*to.ip(), to.port()))
                })
                .collect();
            let [ev] = matching.as_slice() else {
                problems.add(format!(
                    "{} drop events for the datagram {from} -> {to}",
                    matching.len()
                ));
                continue;
            };
            let ok = ev["reason_code"] == "table_full"
                && ev["netns"].as_u64() == Some(node)
                && (ev["hook"].is_null() || ev["hook"] == "PRE_ROUTING")
                && (ev["ifindex"].is_null()
                    || ev["ifindex"].as_u64() == Some(topo.from_server_ifindex));
            if !ok {
                problems.add(format!(
                    "drop of {from} -> {to} should be table_full in the node's netns {node} at PRE_ROUTING on ifindex {}: {}",
                    topo.from_server_ifindex,
                    brief(ev)
                ));
            }
        }
    }
    problems.into_result()
}

/// Lowers nf_conntrack_max to `max`. The namespace's own sysctl is tried first: on the
/// matrix kernels it is read-only outside init_net (the limit is global, the count per
/// namespace), so the global value is set and restored when the topology goes.
fn limit_table(topo: &mut Topology, max: u64) -> Result<()> {
    match topo.ct().sysctl(MAX_KEY, &max.to_string()) {
        Ok(()) => println!("table-full: {MAX_KEY}={max} set in the node's own namespace"),
        Err(e) => {
            println!(
                "table-full: {MAX_KEY} is not writable in a non-init namespace ({e:#}); \
                 setting the global limit in init_net"
            );
            topo.set_global_sysctl(MAX_KEY, &max.to_string())?;
        }
    }
    Ok(())
}

/// One UDP datagram from the backend to each of `NEW_FLOWS` client ports: each is a new
/// flow at the node, routed through its PRE_ROUTING.
fn send_new_flows(topo: &Topology) -> Result<Vec<(SocketAddrV4, SocketAddrV4)>> {
    let from = SocketAddrV4::new(SERVER_IP, SOURCE_PORT);
    let socket = topo
        .server
        .run(|| UdpSocket::bind(from))?
        .with_context(|| format!("bind {from}"))?;
    (0..NEW_FLOWS)
        .map(|i| {
            let to = SocketAddrV4::new(CLIENT_IP, FIRST_DEST_PORT + i);
            println!("send: udp {from} -> {to} (a new flow)");
            socket
                .send_to(b"new flow", to)
                .with_context(|| format!("send to {to}"))?;
            Ok((from, to))
        })
        .collect()
}
