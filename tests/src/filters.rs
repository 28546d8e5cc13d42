//! The tracer's filters against the kernel: every run sends the same INVALID datagrams,
//! some matching the filter and some not, inside one observation window. The kernel must
//! count and log all of them; the tracer must report exactly the matching ones.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::connection;
use crate::inject::{ACK, PSH, RST, SYN};
use crate::netns::Netns;
use crate::probe::{self, Column, Datagram, Ext, Probe};
use crate::scenarios::{Ctx, DROP_INVALID, FAR};
use crate::topology::{
    CLIENT_IP, CLIENT_IP_OTHER, CLIENT_IP6, CLIENT_IP6_OTHER, SERVER_IP, SERVER_IP6, Topology,
};
use crate::verify::Problems;

/// A filter flag and which probes (by index) it lets through.
struct Case {
    args: Vec<String>,
    shown: Vec<usize>,
}

fn case(args: &[&str], shown: &[usize]) -> Case {
    Case {
        args: args.iter().map(|a| a.to_string()).collect(),
        shown: shown.to_vec(),
    }
}

/// Runs every case over the same probes and gathers the problems, each prefixed with the
/// case's flags.
fn run_cases(ctx: &Ctx, topo: &Topology, probes: &[Probe], cases: &[Case]) -> Result<Problems> {
    let mut all = Problems::default();
    for c in cases {
        let flags = c.args.join(" ");
        println!("filter case: {flags}");
        let index = |p: &Probe| probes.iter().position(|q| std::ptr::eq(q, p));
        let shown = |p: &Probe| index(p).is_some_and(|i| c.shown.contains(&i));
        let obs = probe::observe(ctx, topo, &c.args, probes, shown)?;
        let mut problems = Problems::default();
        probe::check(ctx, topo, &obs, probes, shown, &mut problems);
        for p in problems.0 {
            all.add(format!("{flags}: {p}"));
        }
    }
    Ok(all)
}

fn bad_flags<'t>(
    what: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    from: &'t Netns,
    judge: &'t Netns,
) -> Probe<'t> {
    Probe {
        what,
        datagram: Datagram::tcp(src, dst, 1, 0, SYN | RST, Vec::new()),
        from,
        judge,
        code: "bad_flags",
        kernel_text: Some("invalid tcp flag combination"),
        column: Column::Invalid,
    }
}

fn bad_udp_checksum<'t>(
    what: &'static str,
    src: SocketAddr,
    dst: SocketAddr,
    from: &'t Netns,
    judge: &'t Netns,
) -> Probe<'t> {
    let mut datagram = Datagram::udp(src, dst, vec![b'u'; 40]);
    datagram.bad_checksum = true;
    Probe {
        what,
        datagram,
        from,
        judge,
        code: "udp_*",
        kernel_text: Some("bad checksum"),
        column: Column::Invalid,
    }
}

fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// A process kept in a namespace for the scenario's life: the tracer finds a namespace's
/// counters through its processes.
struct Resident(Child);

impl Resident {
    fn spawn(ns: &Netns) -> Result<Resident> {
        let child = ns
            .command("sleep")
            .arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("spawn a resident process in {}", ns.name()))?;
        Ok(Resident(child))
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--src`, `--dst`, `--host` (IPv4 addresses and CIDRs), `--proto` and `--netns`. Two
/// namespaces judge: the client's (its usual conntrack) and the backend's, given conntrack
/// for this scenario. Everything is sent from the router, which has no conntrack, so each
/// datagram is judged exactly once.
pub fn ipv4_filters(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("f4", DROP_INVALID)?;
    topo.dual_stack()?;
    let server = &topo.server;
    server.on_invalid("iptables", "DROP")?;
    server.log_invalid()?;
    let _resident = Resident::spawn(server)?;
    let (wire, client) = (&topo.wire, &topo.client);
    let other_source = std::net::Ipv4Addr::new(10, 0, 1, 3);
    let router = std::net::Ipv4Addr::new(10, 0, 0, 254);
    let probes = [
        bad_flags(
            "SYN+RST from the backend",
            at(SERVER_IP, 7001),
            at(CLIENT_IP, 7002),
            wire,
            client,
        ),
        bad_flags(
            "SYN+RST from another source",
            at(other_source, 7003),
            at(CLIENT_IP, 7004),
            wire,
            client,
        ),
        bad_udp_checksum(
            "bad UDP checksum",
            at(SERVER_IP, 7005),
            at(CLIENT_IP, 7006),
            wire,
            client,
        ),
        bad_flags(
            "SYN+RST to the second client address",
            at(SERVER_IP, 7007),
            at(CLIENT_IP_OTHER, 7008),
            wire,
            client,
        ),
        bad_flags(
            "SYN+RST into the backend's namespace",
            at(router, 7009),
            at(SERVER_IP, 7010),
            wire,
            server,
        ),
    ];
    let netns = server.inode().to_string();
    let cases = [
        case(&["--src", &other_source.to_string()], &[1]),
        case(&["--dst", "10.0.0.8/29"], &[3]),
        case(&["--host", "10.0.0.0/28"], &[0, 1, 2, 3]),
        case(&["--proto", "udp"], &[2]),
        case(&["--netns", &netns], &[4]),
    ];
    run_cases(ctx, &topo, &probes, &cases)?.into_result()
}

/// `--port`, `--sport`, `--dport`, `--proto`, `--src`, `--dst` and `--host` on IPv6: SEQ
/// over on a live IPv6 connection, plain and behind each kind of extension header (the
/// kernel walks them to find TCP, and so must the filter), among INVALID datagrams each
/// some filter leaves out.
pub fn ipv6_filters(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("f6", DROP_INVALID)?;
    topo.dual_stack()?;
    let backend = at(SERVER_IP6, 8080);
    let listener = topo
        .server
        .run(|| TcpListener::bind(backend))?
        .with_context(|| format!("listen on {backend}"))?;
    let mut client = topo
        .client
        .run(|| TcpStream::connect_timeout(&backend, Duration::from_secs(20)))?
        .with_context(|| format!("connect to {backend}"))?;
    let mut server = connection::accept(&listener)?;
    exchange(&mut client, &mut server)?;
    let now = connection::quiet_seqs(&client, &server)?;
    let client_addr = client.local_addr()?;

    let (from, judge) = (&topo.server, &topo.client);
    let seq_over = |what, i: u32, ext: &[Ext]| Probe {
        what,
        datagram: Datagram::tcp(
            backend,
            client_addr,
            // Distinct sequence numbers tell the probes apart in log and events.
            now.server_next.wrapping_add(FAR + i * 1000),
            now.client_next,
            ACK | PSH,
            vec![b'o'; 100],
        )
        .with_ext(ext),
        from,
        judge,
        code: "seq_over",
        kernel_text: Some("SEQ is over"),
        column: Column::Invalid,
    };
    let elsewhere = "fd00:0:0:2::5".parse::<IpAddr>()?;
    let probes = [
        seq_over("SEQ over", 0, &[]),
        seq_over("SEQ over after hop-by-hop options", 1, &[Ext::HopByHop]),
        seq_over("SEQ over after destination options", 2, &[Ext::DestOptions]),
        seq_over("SEQ over after a routing header", 3, &[Ext::Routing]),
        bad_flags(
            "SYN+RST on other ports",
            at(SERVER_IP6, 7001),
            at(CLIENT_IP6, 7002),
            from,
            judge,
        ),
        bad_udp_checksum(
            "bad UDP checksum",
            at(SERVER_IP6, 7003),
            at(CLIENT_IP6, 7004),
            from,
            judge,
        ),
        bad_flags(
            "SYN+RST from another network",
            at(elsewhere, 7005),
            at(CLIENT_IP6, 7006),
            from,
            judge,
        ),
        bad_flags(
            "SYN+RST to the second client address",
            at(SERVER_IP6, 7007),
            at(CLIENT_IP6_OTHER, 7008),
            from,
            judge,
        ),
    ];
    let flow = [0, 1, 2, 3];
    let cases = [
        case(&["--port", "8080"], &flow),
        case(&["--sport", "8080"], &flow),
        case(&["--dport", &client_addr.port().to_string()], &flow),
        case(&["--proto", "tcp"], &[0, 1, 2, 3, 4, 6, 7]),
        case(&["--src", "fd00:0:0:1::/64"], &[0, 1, 2, 3, 4, 5, 7]),
        case(
            &["--dst", &format!("{CLIENT_IP6}/128")],
            &[0, 1, 2, 3, 4, 5, 6],
        ),
        case(&["--host", "fd00:0:0:2::/64"], &[6]),
    ];
    let mut problems = run_cases(ctx, &topo, &probes, &cases)?;
    if let Err(e) = exchange(&mut client, &mut server) {
        problems.add(format!(
            "IPv6 connection did not survive the injections: {e:#}"
        ));
    }
    problems.into_result()
}

/// A request and a response over the IPv6 connection, content checked.
fn exchange(client: &mut TcpStream, server: &mut TcpStream) -> Result<()> {
    for s in [&*client, &*server] {
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
    }
    let request = vec![b'q'; 1000];
    client.write_all(&request).context("client write")?;
    let mut got = vec![0; request.len()];
    server.read_exact(&mut got).context("server read")?;
    anyhow::ensure!(got == request, "request corrupted in transit");
    server.write_all(&got).context("server write")?;
    client.read_exact(&mut got).context("client read")?;
    anyhow::ensure!(got == request, "response corrupted in transit");
    Ok(())
}
