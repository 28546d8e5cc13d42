//! Decoding the one event per packet that `nf_conntrack_in`'s probes emit: the verdict, the
//! packet's headers, the reason and, for TCP, the window math.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Result, bail};
use conntrack_trace_common::{
    closed_set,
    ct::CT_HAS_SEQADJ,
    string_schema,
    verdict::{HAS_IFINDEX, HAS_NETNS, HAS_REASON, LostKey, PacketEvent, verdict},
};
use etherparse::{
    Ipv4HeaderSlice, Ipv6ExtensionsSlice, Ipv6HeaderSlice, TcpHeaderSlice, UdpHeaderSlice,
};

use crate::{
    ct::{Conntrack, TcpState},
    drops, hints,
    owner::Owner,
    reason::{self, ReasonCode},
    window,
};

closed_set! {
    /// What conntrack did with a reported packet: its event's `event`.
    pub enum Verdict {
        /// No entry: not NATed, counted in the kernel's `invalid`.
        Invalid = "invalid",
        /// A reason was logged and the packet kept its entry.
        Ignored = "ignored",
        /// Dropped by conntrack (`reason_code` says which drop path).
        Drop = "drop",
    }
}

string_schema!(Verdict);

closed_set! {
    /// The packet's network protocol: JSON `family`.
    pub enum Family {
        Ipv4 = "ipv4",
        Ipv6 = "ipv6",
    }
}

string_schema!(Family);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tcp {
    /// Set flags, in tcpdump order: "S", "F", "R", "P", "A", "U", "E", "C" (e.g. "PA").
    pub flags: Flags,
    pub seq: u32,
    pub ack: u32,
    pub win: u16,
    /// Payload bytes, from the packet's length as the kernel had it (`skb->len`, as
    /// conntrack counts them): right for GSO and BIG TCP packets, whose IP length field is
    /// a fraction of the packet or 0, and when the snapshot is shorter.
    pub len: u32,
    /// The ACK moved up to the highest right edge of the SACK option's blocks, as
    /// `tcp_sack` does; None without a SACK option.
    pub sack: Option<u32>,
}

/// What the captured headers say about a packet.
#[derive(Clone, Debug, Default)]
pub struct Packet {
    pub family: Option<Family>,
    pub proto: Option<u8>,
    pub saddr: Option<IpAddr>,
    pub daddr: Option<IpAddr>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub tcp: Option<Tcp>,
    /// ICMP type and code.
    pub icmp: Option<(u8, u8)>,
    /// The headers as captured (from the network header, at most SNAP_LEN bytes).
    pub headers: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct Record {
    pub verdict: Verdict,
    pub ts_ns: u64,
    pub time: SystemTime,
    pub pkt: Packet,
    pub reason: Option<reason::Explained>,
    pub window: Option<window::Explained>,
    pub ct: Option<Conntrack>,
    pub netns: Option<u32>,
    /// Who owns `netns` (processes, name, cgroup, container, pod), where the tracer knows.
    pub owner: Option<Arc<Owner>>,
    pub ifindex: Option<u32>,
    pub hook: Option<Hook>,
    /// For DROP verdicts: which drop path (`drops::code`).
    pub drop_reason: u8,
    /// What to do about it, attached by the tracer per reason_code.
    pub hint: Option<Arc<hints::Cached>>,
}

#[cfg(test)]
impl Record {
    /// A record of a packet and nothing else the kernel may add, for tests to fill in.
    pub fn bare(verdict: Verdict, ts_ns: u64, time: SystemTime, pkt: Packet) -> Self {
        Self {
            verdict,
            ts_ns,
            time,
            pkt,
            reason: None,
            window: None,
            ct: None,
            netns: None,
            owner: None,
            ifindex: None,
            hook: None,
            drop_reason: 0,
            hint: None,
        }
    }
}

impl Record {
    pub fn reason_code(&self) -> ReasonCode {
        code(
            self.reason.as_ref(),
            self.verdict,
            self.drop_reason,
            &self.pkt,
        )
    }

    /// Whether `reason_text` is this program's own ASCII (nothing to escape in JSON).
    pub fn reason_is_ours(&self) -> bool {
        self.reason.as_ref().is_none_or(|r| r.ours)
    }

    pub fn reason_text(&self) -> &str {
        match (&self.reason, self.verdict) {
            (Some(r), _) => &r.text,
            (None, Verdict::Drop) => drops::text(self.drop_reason, self.pkt.saddr.is_some()),
            (None, Verdict::Invalid) if self.pkt.is_icmp_error() => {
                "ICMP error quoting no tracked connection (the kernel counts it in icmp_error, \
                 not invalid, and logs no reason)"
            }
            // Conntrack logs nothing for e.g. an ICMP error that matches no connection.
            (None, _) => "no reason logged by the kernel",
        }
    }
}

/// The reason code of a packet: the kernel's reason where one was logged, else what its drop
/// path or its headers say.
fn code(
    reason: Option<&reason::Explained>,
    verdict: Verdict,
    drop_reason: u8,
    pkt: &Packet,
) -> ReasonCode {
    match (reason, verdict) {
        (Some(r), _) => r.code,
        (None, Verdict::Drop) => drops::code(drop_reason),
        (None, Verdict::Invalid) if pkt.is_icmp_error() => ReasonCode::IcmpErrorNoFlow,
        (None, _) => ReasonCode::Unknown,
    }
}

/// The verdict and reason code of the packet events the kernel side counted under `k`
/// because the ring buffer could not take them: what decoding each would have given.
pub fn lost_kind(k: &LostKey) -> (Verdict, ReasonCode) {
    let verdict = verdict_of(k.verdict, &k.reason);
    let reason = if k.flags & HAS_REASON != 0 {
        reason::explain(&k.reason, None)
    } else {
        None
    };
    let pkt = Packet {
        proto: Some(k.proto).filter(|&p| p != 0),
        icmp: matches!(k.proto, 1 | 58).then_some((k.icmp_type, 0)),
        ..Default::default()
    };
    (verdict, code(reason.as_ref(), verdict, k.drop_reason, &pkt))
}

fn verdict_of(v: u8, r: &conntrack_trace_common::reason::Reason) -> Verdict {
    match v {
        verdict::IGNORED => Verdict::Ignored,
        verdict::DROP => Verdict::Drop,
        verdict::LOGGED => inferred(r),
        _ => Verdict::Invalid,
    }
}

impl Packet {
    /// ICMP destination unreachable, source quench, redirect, time exceeded, parameter
    /// problem; ICMPv6 types 1-4: the messages that quote the packet they answer.
    pub fn is_icmp_error(&self) -> bool {
        match (self.proto, self.icmp) {
            (Some(1), Some((t, _))) => matches!(t, 3 | 4 | 5 | 11 | 12),
            (Some(58), Some((t, _))) => (1..=4).contains(&t),
            _ => false,
        }
    }

    /// (source, source port, destination, destination port), for matching across events.
    pub fn tuple(&self) -> Option<(IpAddr, u16, IpAddr, u16)> {
        Some((self.saddr?, self.sport?, self.daddr?, self.dport?))
    }

    pub fn proto_name(&self) -> Cow<'static, str> {
        match self.proto {
            Some(6) => "tcp".into(),
            Some(17) => "udp".into(),
            Some(1) => "icmp".into(),
            Some(58) => "icmpv6".into(),
            Some(132) => "sctp".into(),
            Some(n) => n.to_string().into(),
            None => "?".into(),
        }
    }
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    boot_wall: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        Self {
            boot_wall: SystemTime::now() - mono,
        }
    }

    /// A clock from a recorded boot time (for replaying another machine's events).
    pub fn from_boot_wall(boot_wall: SystemTime) -> Self {
        Self { boot_wall }
    }

    pub fn boot_wall(&self) -> SystemTime {
        self.boot_wall
    }

    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        self.boot_wall + Duration::from_nanos(ts_ns)
    }
}

pub fn addr(family: u8, b: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*b))
    }
}

closed_set! {
    /// The netfilter hook conntrack ran at: JSON `hook`.
    pub enum Hook {
        /// NF_INET_PRE_ROUTING: a packet arriving, before routing.
        PreRouting = "PRE_ROUTING",
        /// NF_INET_LOCAL_IN: arriving, for this host.
        LocalIn = "LOCAL_IN",
        /// NF_INET_FORWARD: being forwarded.
        Forward = "FORWARD",
        /// NF_INET_LOCAL_OUT: sent by this host.
        LocalOut = "LOCAL_OUT",
        /// NF_INET_POST_ROUTING: leaving, after routing.
        PostRouting = "POST_ROUTING",
        /// NF_BR_PRE_ROUTING: on a bridge, arriving.
        BrPreRouting = "BR_PRE_ROUTING",
        /// NF_BR_LOCAL_IN: on a bridge, for this host.
        BrLocalIn = "BR_LOCAL_IN",
        /// NF_BR_FORWARD: on a bridge, being forwarded.
        BrForward = "BR_FORWARD",
        /// NF_BR_LOCAL_OUT: on a bridge, sent by this host.
        BrLocalOut = "BR_LOCAL_OUT",
        /// NF_BR_POST_ROUTING: on a bridge, leaving.
        BrPostRouting = "BR_POST_ROUTING",
    }
}

string_schema!(Hook);

impl Hook {
    /// From `state->pf` and `state->hook`. NFPROTO_BRIDGE = 7: conntrack is also called
    /// from bridge, OVS and tc act_ct.
    fn from_state(pf: u8, hook: u8) -> Option<Self> {
        let bridge = if pf == 7 { 5 } else { 0 };
        Self::ALL
            .get(bridge + hook as usize)
            .filter(|_| hook < 5)
            .copied()
    }
}

/// TCP flag letters, inline (no allocation per packet).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    letters: [u8; 8],
    len: u8,
}

impl Flags {
    /// From the header's flags byte, in tcpdump order.
    pub fn from_bits(bits: u8) -> Self {
        let mut f = Flags::default();
        for (m, c) in [
            (0x02, b'S'),
            (0x01, b'F'),
            (0x04, b'R'),
            (0x08, b'P'),
            (0x10, b'A'),
            (0x20, b'U'),
            (0x40, b'E'),
            (0x80, b'C'),
        ] {
            if bits & m != 0 {
                f.letters[f.len as usize] = c;
                f.len += 1;
            }
        }
        f
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII letters are ever stored.
        std::str::from_utf8(&self.letters[..self.len as usize]).unwrap_or("")
    }

    pub fn contains(&self, letter: u8) -> bool {
        self.letters[..self.len as usize].contains(&letter)
    }
}

impl From<&str> for Flags {
    fn from(s: &str) -> Self {
        let mut f = Flags::default();
        for b in s.bytes().take(8) {
            f.letters[f.len as usize] = b;
            f.len += 1;
        }
        f
    }
}

impl PartialEq<&str> for Flags {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Flags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// Cold mode: what the kernel did with a packet it logged, from what it logged. The 6.1+
/// TCP logger says INVALID or IGNORE outright (or by log type); the generic loggers mark
/// INVALID except for the "ignored" reasons.
fn inferred(r: &conntrack_trace_common::reason::Reason) -> Verdict {
    use conntrack_trace_common::reason::source;
    let ignored = match r.source {
        source::TCP_LOG_VARIADIC | source::TCP_LOG_STRUCT => r.window_ignored(),
        _ => reason::explain(r, None)
            .is_some_and(|e| matches!(e.code, ReasonCode::IgnoredState | ReasonCode::ChallengeAck)),
    };
    if ignored {
        Verdict::Ignored
    } else {
        Verdict::Invalid
    }
}

/// Reads a ring-buffer record as a `PacketEvent`.
pub fn parse(bytes: &[u8]) -> Result<PacketEvent> {
    if bytes.len() < size_of::<PacketEvent>() {
        bail!(
            "short event: {} bytes, expected {}",
            bytes.len(),
            size_of::<PacketEvent>()
        );
    }
    // SAFETY: PacketEvent is repr(C) plain data, every bit pattern is valid, length checked.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<PacketEvent>()) })
}

pub fn decode(e: &PacketEvent, clock: &Clock) -> Record {
    let verdict = verdict_of(e.verdict, &e.reason);
    let mut r = Record {
        verdict,
        ts_ns: e.ts_ns,
        time: clock.wall(e.ts_ns),
        pkt: Packet::parse(&e.headers[..e.real_headers()], e.skb_len),
        reason: None,
        window: None,
        ct: Conntrack::decode(&e.ct),
        netns: (e.flags & HAS_NETNS != 0).then_some(e.netns),
        owner: None,
        ifindex: (e.flags & HAS_IFINDEX != 0).then_some(if e.ifindex_in != 0 {
            e.ifindex_in
        } else {
            e.ifindex_out
        }),
        hook: Hook::from_state(e.pf, e.hook),
        drop_reason: e.drop_reason,
        hint: None,
    };
    if e.flags & HAS_REASON != 0 {
        let state = r.ct.as_ref().and_then(|c| c.state).map(TcpState::as_str);
        r.reason = reason::explain(&e.reason, state);
    }
    if let (Some(reason), Some(tcp), Some(ct)) = (&r.reason, &r.pkt.tcp, &r.ct)
        && ct.state.is_some()
    {
        let seqadj = if e.ct.flags & CT_HAS_SEQADJ != 0 {
            window::Adjust::Known(&e.seqadj)
        } else if ct.seq_adjusted() {
            window::Adjust::Unknown
        } else {
            window::Adjust::None
        };
        r.window = window::explain(
            reason.code,
            reason.value,
            e.ct.seen,
            ct.reply_dir,
            seqadj,
            tcp,
        );
    }
    r
}

impl Packet {
    /// Decodes the first `min(len, captured.len())` captured bytes: `len` is the packet's
    /// length from its network header. Header slices, not the owned header structs: those
    /// are tens of KiB with IPv6 extension buffers, copied per packet.
    pub fn parse(captured: &[u8], len: u32) -> Self {
        let mut r = Packet {
            headers: captured[..(len as usize).min(captured.len())].to_vec(),
            ..Default::default()
        };
        let h = &r.headers[..];
        // (l4 protocol, l4 offset)
        let l4 = match h.first().map(|b| b >> 4) {
            Some(4) => Ipv4HeaderSlice::from_slice(h).ok().map(|ip| {
                r.family = Some(Family::Ipv4);
                r.saddr = Some(IpAddr::V4(ip.source_addr()));
                r.daddr = Some(IpAddr::V4(ip.destination_addr()));
                (ip.protocol().0, ip.slice().len())
            }),
            Some(6) => Ipv6HeaderSlice::from_slice(h).ok().map(|ip| {
                r.family = Some(Family::Ipv6);
                r.saddr = Some(IpAddr::V6(ip.source_addr()));
                r.daddr = Some(IpAddr::V6(ip.destination_addr()));
                // Past the extension headers when they are all captured; else stop at them.
                match Ipv6ExtensionsSlice::from_slice(ip.next_header(), &h[40..]) {
                    Ok((exts, next, _)) => (next.0, 40 + exts.slice().len()),
                    Err(_) => (ip.next_header().0, 40),
                }
            }),
            _ => None,
        };
        let Some((proto, off)) = l4 else {
            return r;
        };
        // Conntrack measures segments by `skb->len`, not by the IP header's length field.
        let l4_len = (len as usize).checked_sub(off);
        r.proto = Some(proto);
        let l4 = &h[off.min(h.len())..];
        match proto {
            6 => match TcpHeaderSlice::from_slice(l4) {
                Ok(t) => {
                    r.sport = Some(t.source_port());
                    r.dport = Some(t.destination_port());
                    let len = l4_len
                        .and_then(|l| l.checked_sub(t.slice().len()))
                        .unwrap_or(0);
                    r.tcp = Some(Tcp {
                        flags: Flags::from_bits(l4[13]),
                        seq: t.sequence_number(),
                        ack: t.acknowledgment_number(),
                        win: t.window_size(),
                        len: len as u32,
                        sack: sack(&t),
                    });
                }
                Err(_) => raw_transport(&mut r, off, l4_len),
            },
            17 => match UdpHeaderSlice::from_slice(l4) {
                Ok(u) => {
                    r.sport = Some(u.source_port());
                    r.dport = Some(u.destination_port());
                }
                Err(_) => raw_transport(&mut r, off, l4_len),
            },
            1 | 58 => {
                if let [t, c, ..] = l4 {
                    r.icmp = Some((*t, *c));
                }
            }
            _ => raw_transport(&mut r, off, l4_len),
        }
        r
    }
}

/// What can still be read of a transport header etherparse refused (a TCP data offset below
/// 5, a header cut off by the snapshot or the linear area). Fields that are not in the
/// bytes stay unset; the payload length comes from the packet's length and the data offset.
fn raw_transport(r: &mut Packet, off: usize, l4_len: Option<usize>) {
    let Some(l4) = r.headers.get(off..) else {
        return;
    };
    let be16 = |i: usize| l4.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let be32 = |i: usize| {
        l4.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if !matches!(r.proto, Some(6 | 17 | 33 | 132 | 136)) {
        return;
    }
    r.sport = be16(0);
    r.dport = be16(2);
    if r.proto == Some(6)
        && let (Some(seq), Some(ack), Some(&bits), Some(win)) =
            (be32(4), be32(8), l4.get(13), be16(14))
    {
        let flags = Flags::from_bits(bits);
        // A data offset below 5 is conntrack's "truncated packet": no payload to speak of.
        let doff = l4.get(12).map_or(0, |b| usize::from(b >> 4) * 4);
        let len = match l4_len {
            Some(l) if doff >= 20 => l.saturating_sub(doff),
            _ => 0,
        };
        r.tcp = Some(Tcp {
            flags,
            seq,
            ack,
            win,
            len: len as u32,
            sack: None,
        });
    }
}

/// `tcp_sack`: the ACK moved up to each SACK block's right edge that lies after it (in
/// sequence space), from the first well-formed SACK option; None when there is none. Walked
/// by hand with the kernel's rules: etherparse's option iterator stops at a kind it does not
/// know (MPTCP, TCP-AO), where the kernel skips it by its length and goes on.
fn sack(t: &TcpHeaderSlice) -> Option<u32> {
    const EOL: u8 = 0;
    const NOP: u8 = 1;
    const SACK: u8 = 5;
    let mut opts = t.options();
    while let [kind, rest @ ..] = opts {
        match *kind {
            EOL => return None,
            NOP => opts = rest,
            _ => {
                let size = *rest.first()? as usize;
                if size < 2 || size > opts.len() {
                    return None;
                }
                let blocks = &opts[2..size];
                if *kind == SACK && !blocks.is_empty() && blocks.len().is_multiple_of(8) {
                    let mut sack = t.acknowledgment_number();
                    for b in blocks.chunks_exact(8) {
                        let right = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                        if (right.wrapping_sub(sack) as i32) > 0 {
                            sack = right;
                        }
                    }
                    return Some(sack);
                }
                opts = &opts[size..];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use conntrack_trace_common::SNAP_LEN;

    use super::*;

    fn captured(bytes: &[u8]) -> [u8; SNAP_LEN] {
        let mut b = [0u8; SNAP_LEN];
        b[..bytes.len()].copy_from_slice(bytes);
        b
    }

    /// IPv4 + a TCP header with data offset 2 (conntrack's "truncated packet"): etherparse
    /// refuses it, the fields that are there are still reported.
    #[test]
    fn truncated_tcp_header_keeps_ports_and_numbers() {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 1, 2, 10, 0, 0, 1,
        ];
        p.extend_from_slice(&[0x1f, 0x90, 0xee, 0x02]); // 8080 -> 60930
        p.extend_from_slice(&2619359910u32.to_be_bytes());
        p.extend_from_slice(&2429437391u32.to_be_bytes());
        p.extend_from_slice(&[0x20, 0x10, 0x02, 0x00, 0, 0, 0, 0]); // doff 2, ACK, win 512
        let pkt = Packet::parse(&captured(&p), p.len() as u32);
        assert_eq!((pkt.sport, pkt.dport), (Some(8080), Some(60930)));
        let t = pkt.tcp.unwrap();
        assert_eq!(
            (t.seq, t.ack, t.flags.as_str(), t.win),
            (2619359910, 2429437391, "A", 512)
        );
    }

    /// IPv4 + TCP with `opts` as its options (ACK 1000), IP length field `tot_len`.
    fn tcp_with_options(opts: &[u8], tot_len: u16) -> Vec<u8> {
        let [l0, l1] = tot_len.to_be_bytes();
        let mut p = vec![
            0x45, 0, l0, l1, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 1, 2, 10, 0, 0, 1,
        ];
        p.extend_from_slice(&[0x1f, 0x90, 0xee, 0x02, 0, 0, 0, 1, 0, 0, 0x03, 0xe8]);
        let doff = (20 + opts.len()) / 4;
        p.extend_from_slice(&[(doff as u8) << 4, 0x10, 0x02, 0x00, 0, 0, 0, 0]);
        p.extend_from_slice(opts);
        p
    }

    /// The SACK edge as `tcp_sack` finds it: past an option kind etherparse does not know
    /// (MPTCP, skipped by its length as the kernel does), the highest right edge after the
    /// ACK in sequence space (a block wrapped below the ACK does not count).
    #[test]
    fn sack_edge_is_the_highest_right_edge_after_the_ack() {
        let mut opts = vec![30, 4, 0, 0, 1, 1, 5, 18];
        for (l, r) in [(1500u32, 2000u32), (u32::MAX - 10, 900)] {
            opts.extend_from_slice(&l.to_be_bytes());
            opts.extend_from_slice(&r.to_be_bytes());
        }
        opts.extend_from_slice(&[1, 1]);
        let p = tcp_with_options(&opts, 0);
        let t = Packet::parse(&captured(&p), p.len() as u32).tcp.unwrap();
        assert_eq!((t.ack, t.sack), (1000, Some(2000)));
        // Timestamps only: no SACK; a SACK option of a length that is no whole block: none.
        for opts in [
            &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2][..],
            &[5, 6, 0, 0, 0, 9, 1, 1],
        ] {
            let p = tcp_with_options(opts, 0);
            let t = Packet::parse(&captured(&p), p.len() as u32).tcp.unwrap();
            assert_eq!(t.sack, None, "{opts:?}");
        }
    }

    /// Headers past the skb's linear area were not the packet's: only the linear bytes are
    /// decoded, so options lying in page fragments are absent, not garbage; the fixed TCP
    /// fields and the payload length are still known.
    #[test]
    fn bytes_past_the_linear_area_are_not_decoded() {
        let mut opts = vec![1, 1, 5, 10];
        opts.extend_from_slice(&1500u32.to_be_bytes());
        opts.extend_from_slice(&2000u32.to_be_bytes());
        let p = tcp_with_options(&opts, 0);
        let mut e: PacketEvent = unsafe { std::mem::zeroed() };
        e.headers = captured(&p);
        e.skb_len = 1000;
        e.linear = 40;
        let cut = Packet::parse(&e.headers[..e.real_headers()], e.skb_len);
        let t = cut.tcp.unwrap();
        assert_eq!((cut.headers.len(), t.ack, t.sack), (40, 1000, None));
        assert_eq!(
            t.len,
            1000 - 20 - 32,
            "the data offset says 32 header bytes"
        );
        // A recording from before `linear` existed: every captured byte counts.
        e.linear = 0;
        let all = Packet::parse(&e.headers[..e.real_headers()], e.skb_len);
        assert_eq!(all.tcp.unwrap().sack, Some(2000));
    }

    /// A BIG TCP / GSO packet: the IP length field says 0 (or a fraction), the skb holds
    /// 180 000 bytes; the payload is what conntrack counts, from the skb's length.
    #[test]
    fn payload_length_comes_from_the_skb_not_the_ip_length_field() {
        let p = tcp_with_options(&[], 0);
        let t = Packet::parse(&captured(&p), 180_000).tcp.unwrap();
        assert_eq!(t.len, 180_000 - 40);
        let p = tcp_with_options(&[], 1500);
        assert_eq!(
            Packet::parse(&captured(&p), 64_000).tcp.unwrap().len,
            64_000 - 40
        );
    }

    /// An ICMP port unreachable quoting a UDP datagram, parsed from its bytes, with no reason
    /// logged: its own code; an echo request with none stays unknown.
    #[test]
    fn icmp_errors_without_a_reason_get_their_own_code() {
        let mut p = vec![
            0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 1, 2,
        ];
        p.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]); // type 3 code 3
        p.extend_from_slice(&[
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 1, 2, 10, 0, 0, 1,
        ]);
        p.extend_from_slice(&[0x14, 0xe9, 0x17, 0x70, 0, 8, 0, 0]);
        let now = SystemTime::UNIX_EPOCH;
        let pkt = Packet::parse(&captured(&p), p.len() as u32);
        assert_eq!(pkt.icmp, Some((3, 3)));
        let r = Record::bare(Verdict::Invalid, 1, now, pkt);
        assert_eq!(r.reason_code(), ReasonCode::IcmpErrorNoFlow);
        assert!(r.reason_text().contains("icmp_error"));
        p[20] = 8; // echo request
        let echo = Record::bare(Verdict::Invalid, 1, now, Packet::parse(&captured(&p), 56));
        assert_eq!(echo.reason_code(), ReasonCode::Unknown);
    }

    #[test]
    fn hooks_by_family() {
        assert_eq!(Hook::from_state(2, 0), Some(Hook::PreRouting));
        assert_eq!(Hook::from_state(10, 4), Some(Hook::PostRouting));
        assert_eq!(Hook::from_state(7, 2), Some(Hook::BrForward));
        assert_eq!(Hook::from_state(2, 5), None);
        assert_eq!(Hook::from_state(7, 5), None);
    }

    #[test]
    fn short_capture_sets_only_what_is_there() {
        let p = [
            0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 1, 2, 10, 0, 0, 1, 0x14, 0xe9,
        ];
        let pkt = Packet::parse(&captured(&p), p.len() as u32);
        assert_eq!(pkt.proto, Some(17));
        assert_eq!(
            (pkt.sport, pkt.dport),
            (Some(5353), None),
            "2 bytes of UDP header: one port"
        );
    }
}
