//! `--host/--src/--dst/--port/--sport/--dport/--proto/--netns/--pod/--k8s-namespace`, applied
//! to the copied headers before the event goes to the ring buffer, so filtered-out packets
//! cost no ring space.

use core::mem::{align_of, size_of};

use aya_ebpf::{macros::map, maps::HashMap};
use conntrack_trace_common::{
    SNAP_LEN,
    filter::{Cidr, Filter, NETNS_FILTER_MAX},
};
use network_types::{
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

#[unsafe(no_mangle)]
static FILTER: Filter = Filter::any();

/// The namespaces `--pod`/`--k8s-namespace` select (keys; the value is unused), read only
/// when `FILTER.netns_set` says so: an unfiltered event never looks here.
#[map]
static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(NETNS_FILTER_MAX, 0);

/// IPv6 extension headers walked before giving up on finding the transport header (the
/// kernel's `ipv6_skip_exthdr` has no limit; real packets carry one or two).
const MAX_EXT: usize = 8;

/// Where the transport header is, as far as the captured bytes tell.
enum L4 {
    At(usize),
    /// Not in the packet: a fragment other than the first carries none.
    Absent,
    /// Past the captured bytes: the filter cannot tell, so it lets the event through.
    Beyond,
}

#[inline(always)]
pub fn matches(h: &[u8; SNAP_LEN], netns: u32) -> bool {
    // SAFETY: .rodata global patched by userspace; volatile so it is not constant-folded.
    let f: &Filter = unsafe { &*core::ptr::read_volatile(&&raw const FILTER) };
    if f.netns != 0 && f.netns != netns {
        return false;
    }
    // SAFETY: a lookup of a plain u32 key; the value is not read.
    if f.netns_set != 0 && unsafe { NETNS_FILTER.get(&netns) }.is_none() {
        return false;
    }
    let (family, proto, saddr, daddr, l4): (u8, u8, &[u8], &[u8], L4) = match h[0] >> 4 {
        4 => {
            let Some(ip) = at::<Ipv4Hdr>(h, 0) else {
                return false;
            };
            (
                4,
                ip.proto,
                &ip.src_addr,
                &ip.dst_addr,
                L4::At(ip.ihl() as usize),
            )
        }
        6 => {
            let Some(ip) = at::<Ipv6Hdr>(h, 0) else {
                return false;
            };
            let (proto, l4) = ipv6_transport(h, ip.next_hdr);
            (6, proto, &ip.src_addr, &ip.dst_addr, l4)
        }
        _ => {
            return f.host.family == 0
                && f.src.family == 0
                && f.dst.family == 0
                && f.proto == 0
                && f.port == 0
                && f.sport == 0
                && f.dport == 0;
        }
    };
    if f.proto != 0 && f.proto != proto {
        return false;
    }
    let host_ok =
        f.host.family == 0 || cidr(&f.host, family, saddr) || cidr(&f.host, family, daddr);
    if !(cidr(&f.src, family, saddr) && cidr(&f.dst, family, daddr) && host_ok) {
        return false;
    }
    if f.port == 0 && f.sport == 0 && f.dport == 0 {
        return true;
    }
    let Some((sport, dport)) = (match l4 {
        L4::At(off) => ports(h, proto, off),
        L4::Absent => None,
        L4::Beyond => return true,
    }) else {
        return false;
    };
    (f.sport == 0 || f.sport == sport)
        && (f.dport == 0 || f.dport == dport)
        && (f.port == 0 || f.port == sport || f.port == dport)
}

/// The transport protocol and header after IPv6's extension headers (hop-by-hop, routing,
/// fragment, destination options, AH), as conntrack finds them.
#[inline(always)]
fn ipv6_transport(h: &[u8; SNAP_LEN], first: u8) -> (u8, L4) {
    const HOP: u8 = IpProto::HopOpt as u8;
    const ROUTE: u8 = IpProto::Ipv6Route as u8;
    const OPTS: u8 = IpProto::Ipv6Opts as u8;
    const FRAG: u8 = IpProto::Ipv6Frag as u8;
    const AH: u8 = IpProto::Ah as u8;
    let mut next = first;
    let mut off = Ipv6Hdr::LEN;
    for _ in 0..MAX_EXT {
        if !matches!(next, HOP | ROUTE | OPTS | FRAG | AH) {
            return (next, L4::At(off));
        }
        // Every extension header starts with (next header, length).
        let Some(&[nh, len]) = at::<[u8; 2]>(h, off) else {
            return (next, L4::Beyond);
        };
        let size = match next {
            // Fixed size; a fragment that does not start at offset 0 has no transport header.
            FRAG => match at::<[u8; 4]>(h, off) {
                Some(&[_, _, hi, lo]) if u16::from_be_bytes([hi, lo]) & !7 != 0 => {
                    return (nh, L4::Absent);
                }
                Some(_) => 8,
                None => return (next, L4::Beyond),
            },
            AH => (len as usize + 2) * 4,
            _ => (len as usize + 1) * 8,
        };
        next = nh;
        off += size;
    }
    (next, L4::Beyond)
}

/// Source and destination port of the protocols that have them, each from its header.
#[inline(always)]
fn ports(h: &[u8; SNAP_LEN], proto: u8, off: usize) -> Option<(u16, u16)> {
    const TCP: u8 = IpProto::Tcp as u8;
    // UDP-Lite, SCTP and DCCP put their ports first too, as UDP does.
    const UDP_LIKE: [u8; 4] = [
        IpProto::Udp as u8,
        IpProto::UdpLite as u8,
        IpProto::Sctp as u8,
        IpProto::Dccp as u8,
    ];
    if proto == TCP {
        let t = at::<TcpHdr>(h, off)?;
        return Some((u16::from_be_bytes(t.source), u16::from_be_bytes(t.dest)));
    }
    if !UDP_LIKE.contains(&proto) {
        return None;
    }
    let u = at::<UdpHdr>(h, off)?;
    Some((u.src_port(), u.dst_port()))
}

/// The header `T` at `off` in the captured bytes, if all of it was captured. The
/// network-types structs are byte arrays, so any offset is aligned for them.
#[inline(always)]
fn at<T>(h: &[u8; SNAP_LEN], off: usize) -> Option<&T> {
    const { assert!(align_of::<T>() == 1) };
    if off > SNAP_LEN - size_of::<T>() {
        return None;
    }
    // The verifier needs a bound on the very register that indexes; the compiler, knowing
    // the check above, drops a plain mask and may index with a copy taken before the check.
    let mut i = off as u64;
    // SAFETY: masks a register; nothing else. The value is unchanged (it is below SNAP_LEN).
    unsafe { core::arch::asm!("{i} &= {m}", i = inout(reg) i, m = const SNAP_LEN - 1) };
    // SAFETY: in bounds (checked above) and alignment 1 (asserted at compile time).
    Some(unsafe { &*(h.as_ptr().add(i as usize) as *const T) })
}

/// Whether `addr` is inside `c` (an unset `c` matches everything).
#[inline(always)]
fn cidr(c: &Cidr, family: u8, addr: &[u8]) -> bool {
    if c.family == 0 {
        return true;
    }
    if c.family != family {
        return false;
    }
    let mut left = c.prefix as u32;
    for i in 0..16 {
        if left == 0 {
            return true;
        }
        let Some(&a) = addr.get(i) else {
            return true;
        };
        let bits = if left >= 8 { 8 } else { left };
        let mask = (0xff00u16 >> bits) as u8;
        if (a ^ c.addr[i]) & mask != 0 {
            return false;
        }
        left -= bits;
    }
    true
}
