//! The test network: a client namespace and a server namespace joined by a veth pair, with
//! kube-proxy-style Service DNAT in the client namespace, where conntrack does its work.
//!
//! ```text
//!  client netns (conntrack, DNAT)                     server netns (no conntrack)
//!  10.0.0.1  veth-client <------------------------> veth-server  10.0.0.2
//!  connect(10.96.0.10:80) --nat OUTPUT DNAT--> 10.0.0.2:8080        listener :8080
//!  connect(10.96.0.11:80) --nat OUTPUT DNAT--> 10.0.0.2:9090        listener :9090
//! ```
//!
//! Forged segments are sent from the server namespace, so they enter the client namespace
//! through PRE_ROUTING, the hook where conntrack also verifies checksums — exactly where a
//! backend's late retransmit meets the node's conntrack in the kube-proxy incident.

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result};

use crate::counters::Counters;
use crate::netns::Netns;

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const CLIENT_IF: &str = "veth-client";
pub const SERVER_IF: &str = "veth-server";

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
        let server = Netns::create(&format!("{tag}-server"))?;

        client.ip(&["link", "add", CLIENT_IF, "type", "veth", "peer", "name", SERVER_IF, "netns", &server.path()])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", CLIENT_IF])?;
        client.ip(&["link", "set", CLIENT_IF, "up"])?;
        server.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", SERVER_IF])?;
        server.ip(&["link", "set", SERVER_IF, "up"])?;
        // connect() routes the VIP before nat OUTPUT rewrites it, so the VIP needs a route.
        client.ip(&["route", "add", "default", "via", &SERVER_IP.to_string()])?;

        client.iptables(&["-t", "nat", "-N", "KUBE-SERVICES"])?;
        client.iptables(&["-t", "nat", "-A", "OUTPUT", "-j", "KUBE-SERVICES"])?;
        for svc in [WEB, API] {
            client.iptables(&[
                "-t", "nat", "-A", "KUBE-SERVICES",
                "-d", &format!("{}/32", svc.vip.ip()), "-p", "tcp", "--dport", &svc.vip.port().to_string(),
                "-j", "DNAT", "--to-destination", &svc.backend.to_string(),
            ])?;
        }
        if drop_invalid {
            client.iptables(&["-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])?;
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

        Ok(Topology { init, client, server, client_ifindex, restore })
    }

    /// Our namespaces, in the order counters are reported.
    pub fn namespaces(&self) -> [&Netns; 3] {
        [&self.init, &self.client, &self.server]
    }

    /// `/proc/net/stat/nf_conntrack` of every namespace we own (the file is per netns).
    pub fn counters(&self) -> Result<Vec<Counters>> {
        self.namespaces().iter().map(|ns| Counters::read(ns)).collect()
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
