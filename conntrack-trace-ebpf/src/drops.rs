//! Conntrack's drop paths: a full table (`early_drop` finding nothing to evict inside
//! `nf_conntrack_in`) and a clash at confirm that could not be resolved (`insert_failed`).
//! Resolved clashes are not events: the summary takes them from the kernel's counter.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext},
};
use conntrack_trace_common::{
    drops::reason,
    kind,
    verdict::{HAS_IFINDEX, HAS_NETNS, PacketEvent, verdict},
};

use crate::{
    filter,
    frame::{frames, mode, note_drop_reason, note_early_drop_net, take_early_drop_net},
    ring::emit_packet,
    skb,
};

const NF_DROP: i32 = 0;

/// Built here for drops outside `nf_conntrack_in` (too big for the BPF stack).
#[map]
static SCRATCH: PerCpuArray<PacketEvent> = PerCpuArray::with_max_entries(1, 0);

/// `early_drop(net, hash)`, cold mode only: it runs only while the table is full, so keeping
/// its namespace costs nothing on a healthy node. With a verdict probe the packet names it.
#[kprobe]
pub fn early_drop(ctx: ProbeContext) -> u32 {
    note_early_drop_net(ctx.arg::<u64>(0).unwrap_or(0));
    0
}

/// `early_drop` returned false: the table is full and nothing could be evicted, so the
/// allocation fails and the `nf_conntrack_in` in flight returns NF_DROP. With a verdict probe
/// that call's event carries the reason; in cold mode, where no probe sees the packet, one
/// event names the namespace alone.
#[kretprobe]
pub fn early_drop_ret(ctx: RetProbeContext) -> u32 {
    if ctx.ret::<u64>() & 0xff != 0 {
        return 0;
    }
    if mode() != conntrack_trace_common::Mode::Cold as u8 {
        // The verdict probe's return takes it: the call ends in NF_DROP, which fexit too
        // sees.
        note_drop_reason(reason::TABLE_FULL);
        return 0;
    }
    let net = take_early_drop_net();
    let Some(e) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, valid for this program run.
    let e = unsafe { &mut *e };
    start(e, reason::TABLE_FULL);
    if let Some(n) = skb::net_inum(net) {
        e.netns = n;
        e.flags |= HAS_NETNS;
    }
    e.ifindex_in = 0;
    e.skb_len = 0;
    e.linear = 0;
    // No packet: only the namespace filter can apply, packet filters hide it.
    e.headers[0] = 0;
    if filter::matches(&e.headers, e.netns) {
        emit_packet(e);
    }
    0
}

/// The fields every drop event built outside `nf_conntrack_in` starts with.
#[inline(always)]
fn start(e: &mut PacketEvent, drop_reason: u8) {
    e.kind = kind::PACKET;
    e.verdict = verdict::DROP;
    e.drop_reason = drop_reason;
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.cpu = unsafe { bpf_get_smp_processor_id() };
    // No hook state here.
    e.hook = u8::MAX;
    e.pf = 0;
    e.flags = 0;
    e.ct.flags = 0;
    e.ifindex_out = 0;
}

/// `nf_ct_resolve_clash(skb, h, repl_idx)`: confirm runs with BH off, so one slot per CPU.
#[kprobe]
pub fn nf_ct_resolve_clash(ctx: ProbeContext) -> u32 {
    if let Some(frames) = frames() {
        frames.clash_skb = ctx.arg::<u64>(0).unwrap_or(0);
    }
    0
}

#[kretprobe]
pub fn nf_ct_resolve_clash_ret(ctx: RetProbeContext) -> u32 {
    let Some(frames) = frames() else { return 0 };
    let skb = core::mem::take(&mut frames.clash_skb);
    if skb == 0 || ctx.ret::<i32>() != NF_DROP {
        return 0;
    }
    let Some(e) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch value, valid for this program run.
    let e = unsafe { &mut *e };
    start(e, reason::INSERT_FAILED);
    // Confirm has no hook state: the device's namespace and index stand in.
    let (dev, netns) = skb::dev_and_netns(skb);
    if let Some(n) = netns {
        e.netns = n;
        e.flags |= HAS_NETNS;
    }
    e.ifindex_in = skb::ifindex(dev);
    if e.ifindex_in != 0 {
        e.flags |= HAS_IFINDEX;
    }
    (e.skb_len, e.linear) = skb::headers(skb, &mut e.headers);
    if filter::matches(&e.headers, e.netns) {
        emit_packet(e);
    }
    0
}
