//! `nf_conntrack_in`: the one place every packet passes and the verdict is decided.
//! Entry pushes a frame (the hot path: a map lookup and a few stores), return pops it and,
//! only for INVALID / IGNORED / dropped packets, fills in the packet and emits one event.

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use conntrack_trace_common::{
    MAX_NEST,
    verdict::{HAS_IFINDEX, HAS_NETNS, HAS_REASON, verdict},
};

use crate::{
    filter,
    frame::{Frame, Frames, frames, mode, nothing_pending, pending_add, pending_of, pop, push},
    read::{field, offsets},
    ring::emit_packet,
    skb,
};

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;

#[kprobe]
pub fn nf_conntrack_in(ctx: ProbeContext) -> u32 {
    if let Some(frames) = frames() {
        push(
            frames,
            ctx.arg::<u64>(0).unwrap_or(0),
            ctx.arg::<u64>(1).unwrap_or(0),
        );
    }
    0
}

#[kretprobe]
pub fn nf_conntrack_in_ret(ctx: RetProbeContext) -> u32 {
    let Some(frames) = frames() else { return 0 };
    let drop_reason = take_drop_reason(frames);
    if let Some(f) = pop(frames) {
        decide(f, ctx.ret::<i32>(), drop_reason);
    }
    0
}

/// The drop reason `early_drop` left for the call returning now (cleared for the next one).
#[inline(always)]
fn take_drop_reason(frames: &mut Frames) -> u8 {
    let r = frames.drop_reason;
    if r != 0 {
        frames.drop_reason = 0;
    }
    r
}

/// One program instead of the pair, where fexit can attach. Frames are pushed only by reason
/// hooks, so the innermost one is this call's only if it holds this skb.
#[fexit(function = "nf_conntrack_in")]
pub fn nf_conntrack_in_fexit(ctx: FExitContext) -> u32 {
    let skb: u64 = ctx.arg(0);
    let ret = ctx.arg::<u64>(2) as i32;
    // Nearly every packet: accepted, still tracked, nothing logged or dropped anywhere.
    if ret == NF_ACCEPT && nothing_pending() && nfct_direct(skb) != 0 {
        return 0;
    }
    let Some(frames) = frames() else { return 0 };
    let before = pending_of(frames);
    let state: u64 = ctx.arg(1);
    let drop_reason = take_drop_reason(frames);
    // Bounds-checked and masked in one index, so the verifier tracks it (MAX_NEST is 2^n).
    let top = (frames.depth as usize).wrapping_sub(1);
    let mine = top < MAX_NEST
        && frames
            .frame
            .get(top & (MAX_NEST - 1))
            .is_some_and(|f| f.skb == skb);
    if !mine {
        // No reason was logged for this call: decide on a fresh frame.
        push(frames, skb, state);
    }
    let f = pop(frames);
    if let Some(f) = f {
        f.state = state;
        decide(f, ret, drop_reason);
    }
    pending_add(pending_of(frames).wrapping_sub(before));
    0
}

/// `skb->_nfct` by a plain load: fexit's `skb` is a typed kernel pointer the verifier lets a
/// program read at a constant offset (the frozen `OFFSETS`), with no helper call.
#[inline(always)]
fn nfct_direct(skb: u64) -> u64 {
    let off = offsets().skb_nfct as u64;
    // SAFETY: a BTF-typed pointer; the verifier checks the field and the JIT guards the load.
    unsafe { core::ptr::read_volatile((skb + off) as *const u64) }
}

/// `skb->_nfct`: 0 once conntrack has taken the packet's entry away.
#[inline(always)]
fn nfct(skb: u64) -> Option<u64> {
    field::<u64>(skb, offsets().skb_nfct)
}

/// The exit rule: NF_ACCEPT with no `_nfct` is INVALID, NF_DROP is a drop, and a logged
/// reason on a packet that kept its entry is IGNORED. Anything else is a normal packet.
#[inline(always)]
fn decide(f: &mut Frame, ret: i32, drop_reason: u8) {
    let verdict = match (ret, nfct(f.skb)) {
        (NF_ACCEPT, Some(0)) => verdict::INVALID,
        (NF_DROP, _) => verdict::DROP,
        _ if f.event.flags & HAS_REASON != 0 => verdict::IGNORED,
        _ => return,
    };
    fill(f, verdict);
    f.event.drop_reason = drop_reason;
    if filter::matches(&f.event.headers, f.event.netns) {
        emit_packet(&f.event);
    }
}

/// Called by a reason hook once its frame is filled: in cold mode nobody else will emit it.
#[inline(always)]
pub fn reason_logged(f: &mut Frame) {
    if mode() == conntrack_trace_common::mode::COLD {
        fill(f, verdict::LOGGED);
        if filter::matches(&f.event.headers, f.event.netns) {
            emit_packet(&f.event);
        }
    }
}

/// Everything about the packet that the reason hooks did not already record.
#[inline(always)]
fn fill(f: &mut Frame, verdict: u8) {
    let off = offsets();
    let e = &mut f.event;
    e.kind = conntrack_trace_common::kind::PACKET;
    e.verdict = verdict;
    e.ts_ns = unsafe { bpf_ktime_get_ns() };
    e.cpu = unsafe { bpf_get_smp_processor_id() };
    e.hook = field::<u8>(f.state, off.state_hook).unwrap_or(u8::MAX);
    e.pf = field::<u8>(f.state, off.state_pf).unwrap_or(0);
    e.ifindex_in = field::<u64>(f.state, off.state_in).map_or(0, skb::ifindex);
    e.ifindex_out = field::<u64>(f.state, off.state_out).map_or(0, skb::ifindex);
    if e.ifindex_in != 0 || e.ifindex_out != 0 {
        e.flags |= HAS_IFINDEX;
    }
    let net = field::<u64>(f.state, off.state_net).unwrap_or(0);
    // Loggers before 5.14 get no hook state: the device's namespace stands in.
    let netns = if f.state != 0 {
        skb::net_inum(net)
    } else {
        skb::dev_and_netns(f.skb).1
    };
    if let Some(inum) = netns {
        e.netns = inum;
        e.flags |= HAS_NETNS;
    }
    e.skb_len = skb::headers(f.skb, &mut e.headers);
}
