//! The test network: client and backend namespaces joined through a router namespace
//! ("wire"), with kube-proxy-style Service DNAT either in the client namespace or on the
//! router, which then plays the Kubernetes node.
//!
//! ```text
//!  client netns                            wire netns (router)          server netns
//!  10.0.0.1 veth-client <---> wire-c 10.0.0.254 | 10.0.1.254 wire-s <---> veth-server 10.0.1.2
//!  connect(10.96.0.10:80) --DNAT--> 10.0.1.2:8080                               listener :8080
//!  connect(10.96.0.11:80) --DNAT--> 10.0.1.2:9090                               listener :9090
//! ```
//!
//! `Nat::Client`: the DNAT is in the client's nat OUTPUT, so conntrack works in the client
//! namespace (a pod talking to a Service on its own node). `Nat::Node`: the DNAT is in the
//! wire's nat PREROUTING, so conntrack works on the router, the client namespace has no
//! conntrack at all, and an INVALID segment is forwarded un-NATed to a client stack that
//! has no socket for it (a client behind a node that routes to the backend).
//!
//! Forged segments are sent from the server namespace, so they reach conntrack through
//! PRE_ROUTING (where it also verifies checksums), exactly where a backend's late
//! retransmit meets a node's conntrack in the kube-proxy incident.
//!
//! The router also exists for netem: TCP does not retransmit a segment while the original
//! is still queued on its own host ("TCPSpuriousRtxHostQueues"), and a segment only leaves
//! that state when an IP layer receives it. Delayed on the wire's egress, the original has
//! left the backend, so the backend really retransmits and the original arrives late.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::process::{Child, Stdio};

use anyhow::{Context, Result};

use crate::counters::Counters;
use crate::netns::Netns;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const WIRE_CLIENT_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const WIRE_SERVER_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 254);
/// A second client address (secondary, never a source): traffic to it meets the client's
/// conntrack like the client's own, so filters on the destination have something in the
/// same namespace to leave out.
pub const CLIENT_IP_OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
/// The IPv6 plan beside the IPv4 one (`dual_stack`): fd00::/64 on the client side,
/// fd00:0:0:1::/64 on the server side.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
pub const CLIENT_IP6_OTHER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9);
pub const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 2);
const WIRE_CLIENT_SIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);
const WIRE_SERVER_SIDE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0xfe);
pub const CLIENT_IF: &str = "veth-client";
const SERVER_IF: &str = "veth-server";
/// The wire's interface towards the client: netem here delays what the backend sends.
pub const WIRE_TO_CLIENT_IF: &str = "wire-c";
const WIRE_TO_SERVER_IF: &str = "wire-s";

/// A ClusterIP Service and the single backend its DNAT rule points to.
#[derive(Clone, Copy, Debug)]
pub struct Service {
    pub vip: SocketAddrV4,
    pub backend: SocketAddrV4,
}

pub const WEB: Service = Service {
    vip: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80),
    backend: SocketAddrV4::new(SERVER_IP, 8080),
};

pub const API: Service = Service {
    vip: SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 80),
    backend: SocketAddrV4::new(SERVER_IP, 9090),
};

/// Where the Service DNAT, and with it conntrack, lives.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Nat {
    /// nat OUTPUT of the client namespace. `drop_invalid` adds kube-proxy's own mitigation
    /// (`--ctstate INVALID -j DROP` in INPUT): an INVALID segment is never DNAT-reversed, so
    /// without the rule the client stack answers it with an RST that kills the connection.
    Client { drop_invalid: bool },
    /// nat PREROUTING of the wire namespace (the node), with no INVALID drop rule anywhere.
    Node,
}

pub struct Topology {
    pub init: Netns,
    pub client: Netns,
    pub wire: Netns,
    pub server: Netns,
    pub nat: Nat,
    /// ifindex, in the conntrack namespace, of the interface the backend's packets arrive on
    /// (the tracer's `ifindex` for them).
    pub from_server_ifindex: u64,
    /// The same for packets from the client (only meaningful with `Nat::Node`: with
    /// `Nat::Client` the client's own packets are locally generated).
    pub from_client_ifindex: u64,
    /// Init-netns sysctls changed by the topology or a scenario, restored on drop.
    restore: Vec<(String, String)>,
    /// A process living in the conntrack namespace, as on any real node or pod. The tracer
    /// finds namespaces through `/proc/<pid>/ns/net`: it reads their counters for its
    /// summary and their conntrack table where the kernel gave it no entry (no module BTF).
    resident: Child,
}

impl Topology {
    pub fn build(tag: &str, nat: Nat) -> Result<Topology> {
        let init = Netns::current("init")?;
        let client = Netns::create(&format!("{tag}-client"))?;
        let wire = Netns::create(&format!("{tag}-wire"))?;
        let server = Netns::create(&format!("{tag}-server"))?;

        client.ip(&[
            "link",
            "add",
            CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            WIRE_TO_CLIENT_IF,
            "netns",
            &wire.path(),
        ])?;
        server.ip(&[
            "link",
            "add",
            SERVER_IF,
            "type",
            "veth",
            "peer",
            "name",
            WIRE_TO_SERVER_IF,
            "netns",
            &wire.path(),
        ])?;
        for (ns, dev, addr) in [
            (&client, CLIENT_IF, CLIENT_IP),
            (&wire, WIRE_TO_CLIENT_IF, WIRE_CLIENT_SIDE_IP),
            (&wire, WIRE_TO_SERVER_IF, WIRE_SERVER_SIDE_IP),
            (&server, SERVER_IF, SERVER_IP),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        wire.sysctl("net.ipv4.ip_forward", "1")?;
        // Default routes through the wire; for the client this also routes the Service VIPs,
        // which connect() needs before nat OUTPUT rewrites them.
        client.ip(&[
            "route",
            "add",
            "default",
            "via",
            &WIRE_CLIENT_SIDE_IP.to_string(),
        ])?;
        server.ip(&[
            "route",
            "add",
            "default",
            "via",
            &WIRE_SERVER_SIDE_IP.to_string(),
        ])?;

        let ct = match nat {
            Nat::Client { .. } => &client,
            Nat::Node => &wire,
        };
        let entry_chain = match nat {
            Nat::Client { .. } => "OUTPUT",
            Nat::Node => "PREROUTING",
        };
        ct.iptables(&["-t", "nat", "-N", "KUBE-SERVICES"])?;
        ct.iptables(&["-t", "nat", "-A", entry_chain, "-j", "KUBE-SERVICES"])?;
        for svc in [WEB, API] {
            ct.iptables(&[
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                &format!("{}/32", svc.vip.ip()),
                "-p",
                "tcp",
                "--dport",
                &svc.vip.port().to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &svc.backend.to_string(),
            ])?;
        }
        if nat == (Nat::Client { drop_invalid: true }) {
            client.on_invalid("iptables", "DROP")?;
        }
        ct.log_invalid()?;
        let (from_server_ifindex, from_client_ifindex) = match nat {
            Nat::Client { .. } => (ifindex(&client, CLIENT_IF)?, 0),
            Nat::Node => (
                ifindex(&wire, WIRE_TO_SERVER_IF)?,
                ifindex(&wire, WIRE_TO_CLIENT_IF)?,
            ),
        };

        let resident = ct
            .command("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("spawn a resident process in the conntrack namespace")?;
        let mut topo = Topology {
            init,
            client,
            wire,
            server,
            nat,
            from_server_ifindex,
            from_client_ifindex,
            restore: Vec::new(),
            resident,
        };
        topo.set_global_sysctl("net.netfilter.nf_log_all_netns", "1")
            .context("is nf_conntrack loaded?")?;
        Ok(topo)
    }

    /// Sets a sysctl of the init namespace (global settings live there), restored when the
    /// topology is dropped.
    pub fn set_global_sysctl(&mut self, key: &str, value: &str) -> Result<()> {
        let old = self.init.read_sysctl(key)?;
        self.init.sysctl(key, value)?;
        self.restore.push((key.to_string(), old));
        Ok(())
    }

    /// IPv6 on the same links (addresses without duplicate address detection, so they work
    /// at once), a second client address of each family, and in the conntrack namespace
    /// what IPv4 has: the INVALID drop rule (it also makes conntrack track IPv6 there) and
    /// the IPv6 logger for the kernel's log lines.
    pub fn dual_stack(&self) -> Result<()> {
        self.client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_IP_OTHER}/24"),
            "dev",
            CLIENT_IF,
        ])?;
        for (ns, dev, addr) in [
            (&self.client, CLIENT_IF, CLIENT_IP6),
            (&self.wire, WIRE_TO_CLIENT_IF, WIRE_CLIENT_SIDE_IP6),
            (&self.wire, WIRE_TO_SERVER_IF, WIRE_SERVER_SIDE_IP6),
            (&self.server, SERVER_IF, SERVER_IP6),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/64"), "dev", dev, "nodad"])?;
        }
        // Deprecated at once, so the client's connections keep CLIENT_IP6 as their source.
        self.client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_IP6_OTHER}/64"),
            "dev",
            CLIENT_IF,
            "nodad",
            "preferred_lft",
            "0",
        ])?;
        self.wire.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (ns, via) in [
            (&self.client, WIRE_CLIENT_SIDE_IP6),
            (&self.server, WIRE_SERVER_SIDE_IP6),
        ] {
            ns.ip(&["-6", "route", "add", "default", "via", &via.to_string()])?;
        }
        let ct = self.ct();
        ct.on_invalid("ip6tables", "DROP")?;
        ct.sysctl("net.netfilter.nf_log.10", "nf_log_ipv6")
    }

    /// The namespace whose conntrack judges the test traffic.
    pub fn ct(&self) -> &Netns {
        match self.nat {
            Nat::Client { .. } => &self.client,
            Nat::Node => &self.wire,
        }
    }

    /// Our namespaces, in the order counters are reported.
    pub fn namespaces(&self) -> [&Netns; 4] {
        [&self.init, &self.client, &self.wire, &self.server]
    }

    /// `/proc/net/stat/nf_conntrack` of every namespace we own (the file is per netns).
    pub fn counters(&self) -> Result<Vec<Counters>> {
        self.namespaces()
            .iter()
            .map(|ns| Counters::read(ns))
            .collect()
    }
}

fn ifindex(ns: &Netns, dev: &str) -> Result<u64> {
    let link = ns.ip(&["-o", "link", "show", dev])?;
    link.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("ifindex from {link:?}"))
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = self.resident.kill();
        let _ = self.resident.wait();
        for (key, value) in self.restore.iter().rev() {
            if let Err(e) = self.init.sysctl(key, value) {
                println!("warning: could not restore {key}={value}: {e:#}");
            }
        }
    }
}

/// Whether an IPv6 address is one of the test plan's (fd00::/16).
pub fn is_test_ipv6(a: Ipv6Addr) -> bool {
    a.segments()[0] == 0xfd00
}
