//! What the programs read from a `struct sk_buff` and its device.

use conntrack_trace_common::SNAP_LEN;

use crate::read::{bytes, field, offsets};

/// Copies the packet from its network header into `headers`; returns its length from the
/// network header on (0 when the headers could not be read) and how many of the copied
/// bytes are in the linear area: past it the packet is in page fragments, and what follows
/// the linear area in memory is not the packet. In the TCP layer `skb->data` has moved past
/// the IP header, so `skb->len` alone would be short by that much.
#[inline(always)]
pub fn headers(skb: u64, headers: &mut [u8; SNAP_LEN]) -> (u32, u8) {
    let off = offsets();
    let len = field::<u32>(skb, off.skb_len).unwrap_or(0);
    let head = field::<u64>(skb, off.skb_head).unwrap_or(0);
    let data = field::<u64>(skb, off.skb_data).unwrap_or(0);
    let nh = field::<u16>(skb, off.skb_network_header).unwrap_or(0);
    if !bytes(head, nh as u32, headers) {
        return (0, 0);
    }
    let pulled = data.wrapping_sub(head + nh as u64);
    let from_nh = if pulled < 0xffff {
        len + pulled as u32
    } else {
        len
    };
    let paged = field::<u32>(skb, off.skb_data_len).unwrap_or(0);
    let linear = from_nh.saturating_sub(paged).min(SNAP_LEN as u32);
    (from_nh, linear as u8)
}

#[inline(always)]
pub fn ifindex(dev: u64) -> u32 {
    field::<u32>(dev, offsets().dev_ifindex).unwrap_or(0)
}

/// Inode of a `struct net *`'s namespace.
#[inline(always)]
pub fn net_inum(net: u64) -> Option<u32> {
    field::<u32>(net, offsets().net_ns_inum)
}

/// `skb->dev`, and the inode of that device's namespace.
#[inline(always)]
pub fn dev_and_netns(skb: u64) -> (u64, Option<u32>) {
    let off = offsets();
    let dev = field::<u64>(skb, off.skb_dev).unwrap_or(0);
    let net = field::<u64>(dev, off.dev_nd_net).unwrap_or(0);
    (dev, net_inum(net))
}
