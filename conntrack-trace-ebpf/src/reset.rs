//! RSTs a TCP stack on this machine sends because a packet found no socket: the second half
//! of the kube-proxy failure (an INVALID segment escapes NAT, a stack answers RST).
//! 6.10+ has the `tcp:tcp_send_reset` tracepoint for socketless resets; older kernels are
//! probed at `tcp_v4_send_reset` / `tcp_v6_send_reset`.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{kprobe, tracepoint},
    programs::{ProbeContext, TracePointContext},
};
use conntrack_trace_common::{
    SNAP_LEN, kind,
    reset::{HAS_NETNS, ResetEvent, ResetTp},
};

use crate::{filter, ring::emit, skb};

#[unsafe(no_mangle)]
static RESET_TP: ResetTp = ResetTp { skb: 8, sk: 16 };

/// `tcp_v{4,6}_send_reset(sk, skb, ...)`: only the socketless ones.
#[kprobe]
pub fn tcp_send_reset_kprobe(ctx: ProbeContext) -> u32 {
    if ctx.arg::<u64>(0).unwrap_or(1) == 0 {
        send(ctx.arg::<u64>(1).unwrap_or(0));
    }
    0
}

#[tracepoint]
pub fn tcp_send_reset_tp(ctx: TracePointContext) -> u32 {
    // SAFETY: .rodata global patched by userspace; volatile so it is not constant-folded.
    let tp = unsafe { core::ptr::read_volatile(&raw const RESET_TP) };
    // SAFETY: offsets come from this tracepoint's own format file.
    let sk = unsafe { ctx.read_at::<u64>(tp.sk as usize) }.unwrap_or(1);
    let skb = unsafe { ctx.read_at::<u64>(tp.skb as usize) }.unwrap_or(0);
    if sk == 0 {
        send(skb);
    }
    0
}

#[inline(always)]
fn send(skb: u64) {
    if skb == 0 {
        return;
    }
    let mut e = ResetEvent {
        kind: kind::RESET,
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: unsafe { bpf_ktime_get_ns() },
        netns: 0,
        ifindex: 0,
        skb_len: 0,
        flags: 0,
        headers: [0; SNAP_LEN],
    };
    let (dev, netns) = skb::dev_and_netns(skb);
    if let Some(n) = netns {
        e.netns = n;
        e.flags |= HAS_NETNS;
    }
    e.ifindex = skb::ifindex(dev);
    // The trigger's headers: an RST answers a packet that reached the stack, its headers
    // pulled into the linear area.
    e.skb_len = skb::headers(skb, &mut e.headers).0;
    if filter::matches(&e.headers, e.netns) {
        emit(&e);
    }
}
