//! Snapshot of a `struct nf_conn`: tuples, TCP state and both directions' window.

use conntrack_trace_common::ct::{
    CT_HAS_SEQADJ, CT_HAS_TCP, CT_VALID, CtSnapshot, SeqAdj, TUPLE_SIZE,
};
use conntrack_trace_common::offsets::UNKNOWN;
use conntrack_trace_common::window::TcpWindow;

use crate::read::{bytes, field, offsets};

/// `IP_CT_IS_REPLY`: ctinfo values at or above it are reply-direction packets.
const IP_CT_IS_REPLY: u64 = 3;
const NFCT_INFOMASK: u64 = 7;

/// Reads `ct` into `snap` (and, for TCP, its seqadj extension into `adj`). `nfct` is the
/// packet's `skb->_nfct` at the time, which says the packet's direction.
#[inline(always)]
pub fn snapshot(ct: u64, nfct: u64, snap: &mut CtSnapshot, adj: &mut SeqAdj) {
    let off = offsets();
    if ct == 0 || !off.has_ct() {
        return;
    }
    snap.status = field::<u32>(ct, off.ct_status).unwrap_or(0);
    let mut ok = true;
    for (i, toff) in [off.ct_tuple_orig, off.ct_tuple_reply]
        .into_iter()
        .enumerate()
    {
        let Some(t) = snap.tuples.get_mut(i) else {
            return;
        };
        // SAFETY: Tuple is plain bytes of exactly TUPLE_SIZE.
        let raw = unsafe { &mut *(t as *mut _ as *mut [u8; TUPLE_SIZE]) };
        ok &= bytes(ct, toff, raw);
    }
    if !ok {
        return;
    }
    snap.flags = CT_VALID;
    snap.dir = u8::from(nfct & NFCT_INFOMASK >= IP_CT_IS_REPLY && nfct != 0);
    if snap.tuples[0].protonum != 6 {
        return;
    }
    if let Some(state) = field::<u8>(ct, off.ct_tcp_state) {
        snap.tcp_state = state;
        window(ct, off.ct_tcp_seen, &mut snap.seen[0]);
        if off.ct_tcp_seen != u32::MAX && off.tcp_seen_size != u32::MAX {
            window(ct, off.ct_tcp_seen + off.tcp_seen_size, &mut snap.seen[1]);
        }
        snap.flags |= CT_HAS_TCP;
        if seqadj(ct, snap.dir, adj) {
            snap.flags |= CT_HAS_SEQADJ;
        }
    }
}

/// `nfct_seqadj(ct)->seq[!dir]`, when the entry has the extension: a few reads, made only
/// for packets being reported.
#[inline(always)]
fn seqadj(ct: u64, dir: u8, adj: &mut SeqAdj) -> bool {
    let off = offsets();
    if off.seqadj_seq == UNKNOWN || off.seqadj_size == UNKNOWN {
        return false;
    }
    let Some(ext) = field::<u64>(ct, off.ct_ext) else {
        return false;
    };
    // `nf_ct_ext.offset[NF_CT_EXT_SEQADJ]`: 0 when the extension is absent.
    let at = match field::<u8>(ext, off.ext_seqadj) {
        Some(at) if at != 0 => at,
        _ => return false,
    };
    let base =
        ext + at as u64 + off.seqadj_seq as u64 + u64::from(dir ^ 1) * off.seqadj_size as u64;
    let (Some(pos), Some(before), Some(after)) = (
        field::<u32>(base, off.seqadj_pos),
        field::<i32>(base, off.seqadj_before),
        field::<i32>(base, off.seqadj_after),
    ) else {
        return false;
    };
    adj.correction_pos = pos;
    adj.offset_before = before;
    adj.offset_after = after;
    true
}

#[inline(always)]
fn window(ct: u64, seen: u32, w: &mut TcpWindow) {
    let off = offsets();
    if seen == u32::MAX {
        return;
    }
    let base = ct + seen as u64;
    w.end = field::<u32>(base, off.tcp_td_end).unwrap_or(0);
    w.maxend = field::<u32>(base, off.tcp_td_maxend).unwrap_or(0);
    w.maxwin = field::<u32>(base, off.tcp_td_maxwin).unwrap_or(0);
    w.maxack = field::<u32>(base, off.tcp_td_maxack).unwrap_or(0);
    w.scale = field::<u8>(base, off.tcp_td_scale).unwrap_or(0);
    w.flags = field::<u8>(base, off.tcp_flags).unwrap_or(0);
}

/// `skb->_nfct` now, and the `nf_conn` it points to (0 when none or untracked).
#[inline(always)]
pub fn of_skb(skb: u64) -> (u64, u64) {
    let nfct = field::<u64>(skb, offsets().skb_nfct).unwrap_or(0);
    (nfct, nfct & !NFCT_INFOMASK)
}

/// The namespace of the entry `skb` is attached to, if any.
#[inline(always)]
pub fn netns_of_skb(skb: u64) -> Option<u32> {
    let ct = of_skb(skb).1;
    if ct == 0 {
        return None;
    }
    crate::skb::net_inum(field::<u64>(ct, offsets().ct_net)?)
}
