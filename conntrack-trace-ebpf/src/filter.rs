//! `--host/--src/--dst/--port/--sport/--dport/--proto/--netns/--pod/--k8s-namespace`, applied
//! to the copied headers before the event goes to the ring buffer, so filtered-out packets
//! cost no ring space.

use aya_ebpf::{macros::map, maps::HashMap};
use conntrack_trace_common::{
    SNAP_LEN,
    filter::{Cidr, Filter, NETNS_FILTER_MAX},
};

#[unsafe(no_mangle)]
static FILTER: Filter = Filter::any();

/// The namespaces `--pod`/`--k8s-namespace` select (keys; the value is unused), read only
/// when `FILTER.netns_set` says so: an unfiltered event never looks here.
#[map]
static NETNS_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(NETNS_FILTER_MAX, 0);

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
    // (family, l4 protocol, offset of saddr, offset of daddr, address length, l4 offset)
    let (family, proto, l4) = match h[0] >> 4 {
        4 => (4u8, h[9], ((h[0] & 0x0f) as usize) * 4),
        6 => (6u8, h[6], 40usize),
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
    let (s_off, d_off) = if family == 4 { (12, 16) } else { (8, 24) };
    let src_ok = cidr(&f.src, family, h, s_off);
    let dst_ok = cidr(&f.dst, family, h, d_off);
    let host_ok =
        f.host.family == 0 || cidr(&f.host, family, h, s_off) || cidr(&f.host, family, h, d_off);
    if !(src_ok && dst_ok && host_ok) {
        return false;
    }
    if f.port == 0 && f.sport == 0 && f.dport == 0 {
        return true;
    }
    // Ports only exist for TCP, UDP, SCTP, DCCP, UDPLITE: all put them first in the header.
    if !matches!(proto, 6 | 17 | 33 | 132 | 136) || l4 + 4 > SNAP_LEN {
        return false;
    }
    let l4 = l4 & (SNAP_LEN - 1);
    let (Some(s0), Some(s1), Some(d0), Some(d1)) =
        (h.get(l4), h.get(l4 + 1), h.get(l4 + 2), h.get(l4 + 3))
    else {
        return false;
    };
    let sport = u16::from_be_bytes([*s0, *s1]);
    let dport = u16::from_be_bytes([*d0, *d1]);
    (f.sport == 0 || f.sport == sport)
        && (f.dport == 0 || f.dport == dport)
        && (f.port == 0 || f.port == sport || f.port == dport)
}

/// Whether the address at `h[off..]` is inside `c` (an unset `c` matches everything).
#[inline(always)]
fn cidr(c: &Cidr, family: u8, h: &[u8; SNAP_LEN], off: usize) -> bool {
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
        let bits = if left >= 8 { 8 } else { left };
        let mask = (0xff00u16 >> bits) as u8;
        if (h[off + i] ^ c.addr[i]) & mask != 0 {
            return false;
        }
        left -= bits;
    }
    true
}
