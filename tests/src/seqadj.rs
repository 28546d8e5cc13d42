//! A NAT helper that changes a payload's length shifts one side's sequence numbers as the
//! other side sees them, and conntrack judges the ACKs coming back only after taking them
//! back by the entry's seqadj extension. Here the FTP helper, on the client's conntrack,
//! rewrites a PORT command for the client's SNAT address, whose text is longer; a forged ACK
//! from the server, `OVER` bytes past everything the client sent as the server counts it,
//! is INVALID "ACK is over", and the tracer must say `OVER` bytes, not `OVER` plus the
//! helper's change; where it cannot read the extension (no nf_conntrack BTF), no number.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::connection::{accept, quiet_ends};
use crate::evidence;
use crate::inject::{ACK, Packet};
use crate::scenarios::{Ctx, DROP_INVALID, check_injections, inject, window};
use crate::topology::{CLIENT_IF, SERVER_IP, Topology};
use crate::verify::{self, Problems, Verdict};

pub const NAME: &str = "nat-helper-seqadj";
const FTP: u16 = 21;
/// The client's SNAT address: "10,0,0,100" in a PORT command where it wrote "10,0,0,1".
const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// How far past the client's last byte the forged ACK reaches.
const OVER: u32 = 1000;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn nat_helper_seqadj(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("sadj", DROP_INVALID)?;
    let ct = topo.ct();
    let (server_ip, snat_ip, ftp) = (SERVER_IP.to_string(), SNAT_IP.to_string(), FTP.to_string());
    ct.ip(&["addr", "add", &format!("{snat_ip}/24"), "dev", CLIENT_IF])?;
    // Automatic helper assignment is off in current kernels: the CT target attaches it.
    let to_ftp = ["-p", "tcp", "-d", &server_ip, "--dport", &ftp];
    ct.iptables(
        &[
            &["-t", "raw", "-A", "OUTPUT"],
            &to_ftp[..],
            &["-j", "CT", "--helper", "ftp"],
        ]
        .concat(),
    )?;
    ct.iptables(
        &[
            &["-t", "nat", "-A", "POSTROUTING"],
            &to_ftp[..],
            &["-j", "SNAT", "--to-source", &snat_ip],
        ]
        .concat(),
    )?;

    let server_addr = SocketAddrV4::new(SERVER_IP, FTP);
    let listener = topo
        .server
        .run(|| TcpListener::bind(server_addr))?
        .with_context(|| format!("listen on {server_addr}"))?;
    let mut client = topo
        .client
        .run(|| TcpStream::connect_timeout(&server_addr.into(), IO_TIMEOUT))?
        .with_context(|| format!("connect to {server_addr}"))?;
    let mut server = accept(&listener)?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
    }
    let (client_ip, peer) = match (client.local_addr()?, server.peer_addr()?) {
        (SocketAddr::V4(c), SocketAddr::V4(p)) => (*c.ip(), p),
        other => bail!("not IPv4: {other:?}"),
    };
    ensure!(
        *peer.ip() == SNAT_IP,
        "the server sees the client as {peer}, not as the SNAT address {SNAT_IP}"
    );

    // The helper reads a command only where a line starts, which it learns from the line
    // before: one line first, then the PORT command in a segment of its own.
    let user = b"USER ct\r\n";
    let got = line(&mut client, &mut server, user)?;
    ensure!(
        got == user,
        "USER line changed in transit: {:?}",
        text(&got)
    );
    let [a, b, c, d] = client_ip.octets();
    let port = format!("PORT {a},{b},{c},{d},156,64\r\n");
    let got = line(&mut client, &mut server, port.as_bytes())?;
    // What the helper changed the client's byte count by, as the server counts.
    let grown = got.len() as i64 - port.len() as i64;
    let want_prefix = format!("PORT {},", snat_ip.replace('.', ","));
    ensure!(
        grown != 0 && got.starts_with(want_prefix.as_bytes()),
        "the FTP helper did not rewrite {:?} for {SNAT_IP}: the server got {:?}",
        port.trim_end(),
        text(&got)
    );
    println!(
        "{NAME}: the helper rewrote {:?} as {:?} ({grown:+} bytes)",
        port.trim_end(),
        text(&got).trim_end()
    );

    let [(client_next, client_expects), (server_next, server_expects)] =
        quiet_ends(&client, &server)?;
    ensure!(
        client_expects == server_next && server_expects == client_next.wrapping_add(grown as u32),
        "the ends should differ by the helper's {grown:+} bytes on the client's side only: \
         client snd {client_next} rcv {client_expects}, server snd {server_next} rcv {server_expects}"
    );
    // An ACK for OVER bytes more than the server received: in the client's numbers, which
    // conntrack compares after the correction, OVER bytes past the client's last byte.
    let forged = Packet::tcp(
        server_addr,
        peer,
        server_next,
        server_expects.wrapping_add(OVER),
        ACK,
        Vec::new(),
    );
    let expected = [window(
        "ACK over, in the helper-shifted sequence space",
        forged,
        "ack_over",
        "ACK is over",
        Verdict::Invalid,
    )];
    let name = format!("{NAME}{}", ctx.mode.suffix());
    let record = evidence::record_path(&name);
    let obs = inject(
        ctx,
        &topo,
        &["--record".into(), record.clone()],
        None,
        &expected,
    )?;
    let mut problems = Problems::default();
    check_injections(ctx, &topo, &obs, &expected, &mut problems);
    if let Some(trace) = &obs.trace {
        let event = trace
            .events
            .iter()
            .find(|ev| verify::event_is_packet(ev, &expected[0].packet));
        match event.map(|ev| &ev["window"]) {
            // Without nf_conntrack's BTF the extension is not read: the tracer must not
            // give a number the kernel did not compare.
            Some(w) if w.is_object() && !ctx.kernel.conntrack_btf => {
                let explain = w["explain"].as_str().unwrap_or_default();
                println!("{NAME}: window {w}");
                if !w["excess"].is_null()
                    || !w["seqadj"].is_null()
                    || !explain.contains("sequence adjustment the tracer cannot read")
                {
                    problems.add(format!(
                        "the adjustment cannot be read here, so no excess and an explain that \
                         says so: {w}"
                    ));
                }
            }
            Some(w) if w.is_object() => {
                let adj = -grown;
                let want = format!(
                    "ack {} (NAT helper sequence adjustment {adj:+} applied to ack {})",
                    client_next.wrapping_add(OVER),
                    server_expects.wrapping_add(OVER)
                );
                let explain = w["explain"].as_str().unwrap_or_default();
                println!("{NAME}: window {w}");
                if w["excess"].as_u64() != Some(OVER.into()) || w["seqadj"].as_i64() != Some(adj) {
                    problems.add(format!(
                        "the ACK is {OVER} bytes over after the helper's {adj:+}: the tracer \
                         said excess {} seqadj {}",
                        w["excess"], w["seqadj"]
                    ));
                }
                if !explain.starts_with(&want) {
                    problems.add(format!("explain should start with {want:?}: {explain:?}"));
                }
            }
            _ if ctx.kernel.conntrack_btf => problems.add(format!(
                "no window explanation for the forged ACK: {event:?}"
            )),
            _ => {}
        }
        evidence::check_replay(&record, &obs, &mut problems);
    }
    // kube-proxy's INVALID drop rule kept the forged ACK from the client's stack.
    if let Err(e) = line(&mut client, &mut server, b"NOOP\r\n") {
        problems.add(format!("connection did not survive the forged ACK: {e:#}"));
    }
    problems.into_result()
}

/// Writes one line on the client and reads what reaches the server, up to its newline.
fn line(client: &mut TcpStream, server: &mut TcpStream, line: &[u8]) -> Result<Vec<u8>> {
    client.write_all(line).context("client write")?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while got.last() != Some(&b'\n') {
        let n = server.read(&mut byte).context("server read")?;
        ensure!(n == 1, "connection closed after {:?}", text(&got));
        got.push(byte[0]);
    }
    Ok(got)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
