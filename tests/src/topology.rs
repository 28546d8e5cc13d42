//! The test network: client and backend namespaces joined through a plain router
//! namespace ("wire"), with kube-proxy-style Service DNAT in the client namespace, where
//! conntrack does its work.
//!
//! ```text
//!  client netns (conntrack, DNAT)          wire netns (router)          server netns
//!  10.0.0.1 veth-client <---> wire-c 10.0.0.254 | 10.0.1.254 wire-s <---> veth-server 10.0.1.2
//!  connect(10.96.0.10:80) --nat OUTPUT DNAT--> 10.0.1.2:8080                 listener :8080
//!  connect(10.96.0.11:80) --nat OUTPUT DNAT--> 10.0.1.2:9090                 listener :9090
//! ```
//!
//! Forged segments are sent from the server namespace, so they enter the client namespace
//! through PRE_ROUTING, the hook where conntrack also verifies checksums — exactly where a
//! backend's late retransmit meets the node's conntrack in the kube-proxy incident.
//!
//! The router exists for netem: TCP does not retransmit a segment while the original is
//! still queued on its own host ("TCPSpuriousRtxHostQueues"), and a segment only leaves
//! that state when an IP layer receives it. Delayed on the wire's egress, the original has
//! left the backend, so the backend really retransmits and the original arrives late.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::counters::Counters;
use crate::netns::Netns;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
const WIRE_CLIENT_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
const WIRE_SERVER_SIDE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 254);
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

pub struct Topology {
    pub init: Netns,
    pub client: Netns,
    pub wire: Netns,
    pub server: Netns,
    /// ifindex of `veth-client` inside the client netns (the tracer's `ifindex`).
    pub client_ifindex: u64,
    /// Init-netns sysctls changed for the log oracle, restored on drop.
    restore: Vec<(String, String)>,
}

impl Topology {
    /// `drop_invalid` installs kube-proxy's own mitigation (`--ctstate INVALID -j DROP` in
    /// INPUT). The suite wants it: an INVALID segment is never DNAT-reversed, so without the
    /// rule the client stack answers it with an RST that conntrack judges too and that kills
    /// the live connection. The demo leaves it out to show exactly that.
    pub fn build(tag: &str, drop_invalid: bool) -> Result<Topology> {
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

        client.iptables(&["-t", "nat", "-N", "KUBE-SERVICES"])?;
        client.iptables(&["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"])?;
        for svc in [WEB, API] {
            client.iptables(&[
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
        if drop_invalid {
            client.iptables(&[
                "-A",
                "INPUT",
                "-m",
                "conntrack",
                "--ctstate",
                "INVALID",
                "-j",
                "DROP",
            ])?;
        }

        // The kernel's own log is an oracle: every INVALID/IGNORE reason, per packet, with
        // the same %u bound the tracer must report. 255 = log every protocol.
        client.sysctl("net.netfilter.nf_conntrack_log_invalid", "255")?;
        client.sysctl("net.netfilter.nf_log.2", "nf_log_ipv4")?;
        client.sysctl("net.netfilter.nf_conntrack_checksum", "1")?;
        let mut restore = Vec::new();
        let key = "net.netfilter.nf_log_all_netns";
        let old = std::fs::read_to_string(format!("/proc/sys/{}", key.replace('.', "/")))
            .context("nf_log_all_netns (is nf_conntrack loaded?)")?;
        init.sysctl(key, "1")?;
        restore.push((key.to_string(), old.trim().to_string()));

        let link = client.ip(&["-o", "link", "show", CLIENT_IF])?;
        let client_ifindex = link
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("ifindex from {link:?}"))?;

        Ok(Topology {
            init,
            client,
            wire,
            server,
            client_ifindex,
            restore,
        })
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

impl Drop for Topology {
    fn drop(&mut self) {
        for (key, value) in &self.restore {
            if let Err(e) = self.init.sysctl(key, value) {
                println!("warning: could not restore {key}={value}: {e:#}");
            }
        }
    }
}
