//! Crafted datagrams of either IP family (IPv6 with optional extension headers), TCP, UDP or
//! ICMP, sent through a raw socket that includes the IP header, and observed against the
//! kernel's log lines and per-namespace counters: what the filter and ICMP scenarios inject.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::inject::{flag_letters, transport_checksum};
use crate::kmsg::CtLog;
use crate::netns::Netns;
use crate::observe::{Observation, Observer};
use crate::scenarios::Ctx;
use crate::topology::Topology;
use crate::verify::{self, Problems, brief};

/// The transport part of a datagram.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
    },
    /// ICMP, or ICMPv6 in an IPv6 datagram. `rest` follows type, code and checksum: the
    /// 4-byte rest of the header and the body (for errors, the quoted datagram).
    Icmp { kind: u8, code: u8, rest: Vec<u8> },
}

/// An IPv6 extension header between the fixed header and the transport header, 8 bytes
/// each: options headers carry one PadN option, the routing header is type 0 with no
/// segments left (which every node passes on, RFC 5095).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ext {
    HopByHop,
    DestOptions,
    Routing,
}

impl Ext {
    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => 0,
            Ext::Routing => 43,
            Ext::DestOptions => 60,
        }
    }

    fn bytes(self, next: u8) -> [u8; 8] {
        match self {
            Ext::HopByHop | Ext::DestOptions => [next, 0, 1, 4, 0, 0, 0, 0],
            Ext::Routing => [next, 0, 0, 0, 0, 0, 0, 0],
        }
    }
}

#[derive(Clone, Debug)]
pub struct Datagram {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    /// IPv6 only.
    pub ext: Vec<Ext>,
    /// Store a wrong transport checksum (the correct one with all bits flipped).
    pub bad_checksum: bool,
    /// Cut the transport part to this many bytes.
    pub truncate: Option<usize>,
}

impl Datagram {
    pub fn tcp(
        src: SocketAddr,
        dst: SocketAddr,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    ) -> Datagram {
        Self::new(
            src.ip(),
            dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                seq,
                ack,
                flags,
                payload,
            },
        )
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: Vec<u8>) -> Datagram {
        Self::new(
            src.ip(),
            dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
                payload,
            },
        )
    }

    pub fn icmp(src: IpAddr, dst: IpAddr, kind: u8, code: u8, rest: Vec<u8>) -> Datagram {
        Self::new(src, dst, L4::Icmp { kind, code, rest })
    }

    fn new(src: IpAddr, dst: IpAddr, l4: L4) -> Datagram {
        Datagram {
            src,
            dst,
            l4,
            ext: Vec::new(),
            bad_checksum: false,
            truncate: None,
        }
    }

    pub fn with_ext(mut self, ext: &[Ext]) -> Datagram {
        self.ext = ext.to_vec();
        self
    }

    pub fn protonum(&self) -> u8 {
        match (&self.l4, self.src) {
            (L4::Tcp { .. }, _) => 6,
            (L4::Udp { .. }, _) => 17,
            (L4::Icmp { .. }, IpAddr::V4(_)) => 1,
            (L4::Icmp { .. }, IpAddr::V6(_)) => 58,
        }
    }

    /// The tracer's `proto` for this datagram.
    pub fn proto_name(&self) -> &'static str {
        match self.protonum() {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            _ => "icmpv6",
        }
    }

    pub fn ports(&self) -> Option<(u16, u16)> {
        match self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => Some((sport, dport)),
            L4::Icmp { .. } => None,
        }
    }

    fn seq_ack(&self) -> Option<(u32, u32)> {
        match self.l4 {
            L4::Tcp { seq, ack, .. } => Some((seq, ack)),
            _ => None,
        }
    }

    pub fn describe(&self) -> String {
        let ends = match self.ports() {
            Some((s, d)) => format!(
                "{} -> {}",
                SocketAddr::new(self.src, s),
                SocketAddr::new(self.dst, d)
            ),
            None => format!("{} -> {}", self.src, self.dst),
        };
        let what = match &self.l4 {
            L4::Tcp {
                seq,
                ack,
                flags,
                payload,
                ..
            } => format!(
                " [{}] seq {seq} ack {ack} len {}",
                flag_letters(*flags).into_iter().collect::<String>(),
                payload.len()
            ),
            L4::Udp { payload, .. } => format!(" len {}", payload.len()),
            L4::Icmp { kind, code, .. } => format!(" type {kind} code {code}"),
        };
        let mut s = format!("{} {ends}{what}", self.proto_name());
        if !self.ext.is_empty() {
            s += &format!(" ext {:?}", self.ext);
        }
        if self.bad_checksum {
            s += " bad-csum";
        }
        if let Some(n) = self.truncate {
            s += &format!(" cut to {n} bytes");
        }
        s
    }

    /// The transport part with its checksum.
    fn l4_bytes(&self) -> Vec<u8> {
        let (mut l4, at) = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                flags,
                payload,
            } => {
                let mut h = Vec::with_capacity(20 + payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.extend_from_slice(&[5 << 4, *flags]);
                h.extend_from_slice(&512u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                h.extend_from_slice(payload);
                (h, 16)
            }
            L4::Udp {
                sport,
                dport,
                payload,
            } => {
                let mut h = Vec::with_capacity(8 + payload.len());
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(payload);
                (h, 6)
            }
            L4::Icmp { kind, code, rest } => {
                let mut h = vec![*kind, *code, 0, 0];
                h.extend_from_slice(rest);
                (h, 2)
            }
        };
        // ICMP (v4) sums the message alone; everything else adds the pseudo-header.
        let mut summed = match (self.src, self.dst) {
            (IpAddr::V4(_), _) if self.protonum() == 1 => Vec::new(),
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                p.extend_from_slice(&[0, self.protonum()]);
                p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                p
            }
            (s, d) => {
                let mut p = Vec::with_capacity(40);
                p.extend_from_slice(&v6_octets(s));
                p.extend_from_slice(&v6_octets(d));
                p.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                p.extend_from_slice(&[0, 0, 0, self.protonum()]);
                p
            }
        };
        summed.extend_from_slice(&l4);
        let sum = transport_checksum(&summed, self.bad_checksum);
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        if let Some(n) = self.truncate {
            l4.truncate(n);
        }
        l4
    }

    /// The datagram as it goes on the wire. For IPv4 the kernel fills in the total length
    /// and the header checksum; IPv6 has neither to fill.
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, self.protonum(), 0, 0];
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&l4);
                ip
            }
            (s, d) => {
                let payload_len = 8 * self.ext.len() + l4.len();
                let first = self.ext.first().map_or(self.protonum(), |e| e.number());
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend_from_slice(&(payload_len as u16).to_be_bytes());
                ip.extend_from_slice(&[first, 64]);
                ip.extend_from_slice(&v6_octets(s));
                ip.extend_from_slice(&v6_octets(d));
                for (i, e) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(self.protonum(), |n| n.number());
                    ip.extend_from_slice(&e.bytes(next));
                }
                ip.extend_from_slice(&l4);
                ip
            }
        }
    }

    /// Sends the datagram from `ns` through a raw socket that takes the whole IP header.
    pub fn send_from(&self, ns: &Netns) -> Result<()> {
        let bytes = self.bytes();
        let dst = self.dst;
        let sent = ns.run(move || -> io::Result<()> {
            let family = match dst {
                IpAddr::V4(_) => libc::AF_INET,
                IpAddr::V6(_) => libc::AF_INET6,
            };
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    family,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let n = match dst {
                IpAddr::V4(a) => {
                    let sa = libc::sockaddr_in {
                        sin_family: libc::AF_INET as libc::sa_family_t,
                        sin_port: 0,
                        sin_addr: libc::in_addr {
                            s_addr: u32::from_ne_bytes(a.octets()),
                        },
                        sin_zero: [0; 8],
                    };
                    // SAFETY: buffer and address are valid for the duration of the call.
                    unsafe {
                        libc::sendto(
                            fd.as_raw_fd(),
                            bytes.as_ptr().cast(),
                            bytes.len(),
                            0,
                            (&sa as *const libc::sockaddr_in).cast(),
                            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                        )
                    }
                }
                IpAddr::V6(a) => {
                    // IPPROTO_RAW implies it; said explicitly since the header is ours.
                    let on: libc::c_int = 1;
                    // SAFETY: setsockopt(2) with a pointer to a live int and its size.
                    if unsafe {
                        libc::setsockopt(
                            fd.as_raw_fd(),
                            libc::IPPROTO_IPV6,
                            libc::IPV6_HDRINCL,
                            (&on as *const libc::c_int).cast(),
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        )
                    } != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    // SAFETY: all-zero is a valid sockaddr_in6.
                    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
                    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                    sa.sin6_addr.s6_addr = a.octets();
                    // SAFETY: buffer and address are valid for the duration of the call.
                    unsafe {
                        libc::sendto(
                            fd.as_raw_fd(),
                            bytes.as_ptr().cast(),
                            bytes.len(),
                            0,
                            (&sa as *const libc::sockaddr_in6).cast(),
                            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                        )
                    }
                }
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })?;
        sent.with_context(|| format!("[{}] send {}", ns.name(), self.describe()))
    }

    pub fn is_logged_as(&self, log: &CtLog) -> bool {
        log.protonum == self.protonum()
            && log.src == self.src
            && log.dst == self.dst
            && self
                .ports()
                .is_none_or(|(s, d)| log.sport == Some(s) && log.dport == Some(d))
            && self
                .seq_ack()
                .is_none_or(|(seq, ack)| log.seq == Some(seq) && log.ack == Some(ack))
            && match self.l4 {
                // nf_log prints no type for a header cut short.
                L4::Icmp { .. } if self.truncate.is_some() => log.icmp.is_none(),
                L4::Icmp { kind, code, .. } => log.icmp == Some((kind, code)),
                _ => true,
            }
    }

    pub fn is_event(&self, ev: &Value) -> bool {
        let addr = |k: &str| ev[k].as_str().and_then(|a| a.parse::<IpAddr>().ok());
        let same_l4 = match &self.l4 {
            L4::Tcp { seq, ack, .. } => {
                ev["tcp"]["seq"].as_u64() == Some((*seq).into())
                    && ev["tcp"]["ack"].as_u64() == Some((*ack).into())
            }
            L4::Udp { .. } => true,
            L4::Icmp { kind, code, .. } => {
                ev["icmp"]["type"].as_u64() == Some((*kind).into())
                    && ev["icmp"]["code"].as_u64() == Some((*code).into())
            }
        };
        ev["proto"] == self.proto_name()
            && addr("saddr") == Some(self.src)
            && addr("daddr") == Some(self.dst)
            && self.ports().is_none_or(|(s, d)| {
                ev["sport"].as_u64() == Some(s.into()) && ev["dport"].as_u64() == Some(d.into())
            })
            && same_l4
    }
}

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// The kernel counter a datagram moves in its conntrack namespace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Column {
    Invalid,
    /// ICMP errors the kernel could not use (5.7+ counts them here, not in `invalid`).
    IcmpError,
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Column::Invalid => "invalid",
            Column::IcmpError => "icmp_error",
        }
    }
}

/// A datagram and what the kernel does with it.
pub struct Probe<'t> {
    pub what: &'static str,
    pub datagram: Datagram,
    /// Where it is sent from, and the namespace whose conntrack judges it.
    pub from: &'t Netns,
    pub judge: &'t Netns,
    /// Tracer `reason_code`; a trailing `*` accepts any code with that prefix.
    pub code: &'static str,
    /// A part of the kernel's log text; None: the kernel logs nothing for it (the tracer
    /// then sees it only through a verdict probe).
    pub kernel_text: Option<&'static str>,
    pub column: Column,
}

/// Sends the probes inside one observation window with the tracer running with `args`.
pub fn observe(
    ctx: &Ctx,
    topo: &Topology,
    args: &[String],
    probes: &[Probe],
    shown: impl Fn(&Probe) -> bool,
) -> Result<Observation> {
    let mut observer = Observer::start(topo, ctx, args)?;
    for p in probes {
        println!("inject: {}: {}", p.what, p.datagram.describe());
        p.datagram.send_from(p.from)?;
        // Keep packets apart so log lines and events arrive in a readable order.
        std::thread::sleep(Duration::from_millis(20));
    }
    let logged = probes.iter().filter(|p| p.kernel_text.is_some()).count();
    observer.wait_logs(logged)?;
    let reported = probes
        .iter()
        .filter(|p| shown(p) && (p.kernel_text.is_some() || ctx.complete()))
        .count();
    observer.finish(|_| reported)
}

/// The kernel did what each probe expects (logged it once with the expected text, or not at
/// all; moved the expected counter in the expected namespace and nothing else), and the
/// tracer reported exactly the probes `shown` says its filter lets through: once each, with
/// the kernel's reason, the namespace that judged it, and nothing else.
pub fn check(
    ctx: &Ctx,
    topo: &Topology,
    obs: &Observation,
    probes: &[Probe],
    shown: impl Fn(&Probe) -> bool,
    problems: &mut Problems,
) {
    for p in probes {
        let logs: Vec<&CtLog> = obs
            .logs
            .iter()
            .filter(|l| p.datagram.is_logged_as(l))
            .collect();
        match (p.kernel_text, logs.as_slice()) {
            (None, []) => {}
            (Some(text), [log]) if log.reason.contains(text) => {}
            (Some(text), [log]) => problems.add(format!(
                "{}: kernel logged \"{}\", expected \"{text}\"",
                p.what, log.reason
            )),
            (_, other) => problems.add(format!(
                "{}: kernel logged {} lines for {} ({})",
                p.what,
                other.len(),
                p.datagram.describe(),
                p.kernel_text
                    .map_or("none expected".into(), |t| format!("\"{t}\" expected"))
            )),
        }
    }
    for ns in topo.namespaces() {
        for column in [Column::Invalid, Column::IcmpError] {
            let want = probes
                .iter()
                .filter(|p| p.column == column && p.judge.inode() == ns.inode())
                .count() as u64;
            let got = obs.delta(ns.inode(), column.name());
            if got != want {
                problems.add(format!(
                    "kernel {} counter in {} moved by {got}, the probes expect {want}",
                    column.name(),
                    ns.name()
                ));
            }
        }
    }

    verify::stream_is_complete(topo, obs, problems);
    let Some(trace) = &obs.trace else { return };
    let verdicts: Vec<&Value> = trace
        .events
        .iter()
        .filter(|e| matches!(e["event"].as_str(), Some("invalid" | "ignored" | "drop")))
        .collect();
    let mut claimed = BTreeSet::new();
    for p in probes {
        let events: Vec<(usize, &&Value)> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, ev)| p.datagram.is_event(ev))
            .collect();
        claimed.extend(events.iter().map(|(i, _)| *i));
        let want = usize::from(shown(p) && (p.kernel_text.is_some() || ctx.complete()));
        if events.len() != want {
            problems.add(format!(
                "{}: tracer printed {} events for {}, expected {want}{}",
                p.what,
                events.len(),
                p.datagram.describe(),
                if shown(p) {
                    ""
                } else {
                    " (its filter leaves it out)"
                }
            ));
            continue;
        }
        let Some((_, ev)) = events.first() else {
            continue;
        };
        let mut check = |ok: bool, what: String| {
            if !ok {
                problems.add(format!("{}: {what}; event {}", p.what, brief(ev)));
            }
        };
        check(
            ev["event"] == "invalid",
            "event should be \"invalid\"".into(),
        );
        let code = ev["reason_code"].as_str().unwrap_or("");
        check(
            verify::code_matches(code, p.code),
            format!("reason_code should be {}", p.code),
        );
        check(
            ev["netns"].as_u64() == Some(p.judge.inode()),
            format!("netns should be {} ({})", p.judge.inode(), p.judge.name()),
        );
        if let Some(log) = obs.logs.iter().find(|l| p.datagram.is_logged_as(l)) {
            verify::agrees_with_log(ev, log, &mut check);
        }
    }
    for (i, ev) in verdicts.iter().enumerate() {
        if !claimed.contains(&i) {
            problems.add(format!("event for no probe: {}", brief(ev)));
        }
    }
}

/// An ICMP error's rest of header and quote: a UDP datagram from `src` to `dst` (one
/// family) that was never sent, so no conntrack entry matches it.
pub fn quoted_udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut rest = vec![0; 4]; // unused / MTU field
    rest.extend_from_slice(&Datagram::udp(src, dst, vec![b'q'; 8]).bytes());
    rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::internet_checksum;

    #[test]
    fn ipv6_tcp_checksum_verifies_and_ext_headers_chain() {
        let d = Datagram::tcp(
            "[fd00::1:2]:8080".parse().unwrap(),
            "[fd00::1]:40000".parse().unwrap(),
            7,
            9,
            0x18,
            b"hello".to_vec(),
        )
        .with_ext(&[Ext::HopByHop, Ext::Routing, Ext::DestOptions]);
        let b = d.bytes();
        assert_eq!(b[6], 0, "first next header: hop-by-hop");
        assert_eq!(u16::from_be_bytes([b[4], b[5]]) as usize, b.len() - 40);
        assert_eq!((b[40], b[48], b[56]), (43, 60, 6), "chain ends at TCP");
        let l4 = &b[64..];
        let mut pseudo = b[8..40].to_vec();
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        pseudo.extend_from_slice(l4);
        assert_eq!(internet_checksum(&pseudo), 0);
    }

    #[test]
    fn icmp_checksum_covers_the_message_only() {
        let d = Datagram::icmp(
            "10.0.1.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            3,
            3,
            vec![0; 12],
        );
        let b = d.bytes();
        assert_eq!(internet_checksum(&b[20..]), 0);
        let mut bad = d.clone();
        bad.bad_checksum = true;
        assert_ne!(internet_checksum(&bad.bytes()[20..]), 0);
    }
}
