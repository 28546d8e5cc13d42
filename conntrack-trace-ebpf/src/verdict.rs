//! `nf_conntrack_in`: the one place every packet passes and the verdict is decided.
//! Entry pushes a frame (the hot path: a map lookup and a few stores), return pops it and,
//! only for INVALID / IGNORED / dropped packets, fills in the packet and emits one event.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use conntrack_trace_common::verdict::{HAS_IFINDEX, HAS_NETNS, HAS_REASON, verdict};

use crate::{
    args, ct, filter,
    frame::{
        Call, Frame, add_note, current_task, frames, mode, note, pop, push, take, take_drop_reason,
    },
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
            Call {
                sp: args::sp_after_return(&ctx),
                migrations: migrations(),
            },
        );
    }
    0
}

#[kretprobe]
pub fn nf_conntrack_in_ret(ctx: RetProbeContext) -> u32 {
    let Some(frames) = frames() else { return 0 };
    let ret = ctx.ret::<i32>();
    // Taken whether or not the call pairs, so it cannot be left for a later one.
    let drop_reason = drop_reason(ret);
    let call = Call {
        sp: args::sp_at_return(&ctx),
        migrations: migrations(),
    };
    if let Some(f) = pop(frames, call) {
        decide(f, ret, drop_reason);
    }
    0
}

/// The reason `early_drop` left for the current task's call, for a call that returned
/// NF_DROP (which takes it); 0 for any other.
#[inline(always)]
fn drop_reason(ret: i32) -> u8 {
    if ret == NF_DROP {
        take_drop_reason()
    } else {
        0
    }
}

/// How often the current task has changed CPU: a kprobe pair call whose task moved between
/// entry and return has its frame on another CPU's stack.
#[inline(always)]
fn migrations() -> u64 {
    field::<u64>(current_task(), offsets().task_nr_migrations).unwrap_or(0)
}

/// One program instead of the pair, where fexit can attach. Reason hooks report logged
/// packets themselves in this mode, so this program only has to find the packets no reason
/// was logged for: those that lost their entry (INVALID) or were dropped.
#[fexit(function = "nf_conntrack_in")]
pub fn nf_conntrack_in_fexit(ctx: FExitContext) -> u32 {
    let skb: u64 = ctx.arg(0);
    // The return value's slot holds an `unsigned int`: its low half, loaded as such, needs no
    // truncation on the per-packet path (the target is little-endian).
    // SAFETY: slot 2 of the context is the return value, after the two arguments.
    let ret = unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u32).add(4)) } as i32;
    // Nearly every packet: accepted and still tracked. This test touches only the context
    // and the skb, no map: under TCG each map page costs more than the rest of the program.
    if ret == NF_ACCEPT && nfct_direct(skb) != 0 {
        return 0;
    }
    let Some(frames) = frames() else { return 0 };
    let drop_reason = drop_reason(ret);
    if take(skb, note::REPORTED) {
        return 0;
    }
    let depth = frames.depth;
    let call = Call {
        sp: 0,
        migrations: 0,
    };
    if let Some(f) = push(frames, skb, ctx.arg(1), call) {
        decide(f, ret, drop_reason);
    }
    frames.depth = depth;
    0
}

/// The placeholder userspace replaces, in the loaded instructions, with
/// `offsetof(struct sk_buff, _nfct)` (ASCII "nfct_off").
const NFCT_OFFSET_MARK: u64 = 0x6e66_6374_5f6f_6666;

/// `skb->_nfct` by a plain load at an immediate offset: fexit's `skb` is a typed kernel
/// pointer the verifier lets a program read at a constant offset, and an immediate needs no
/// map read (the frozen `OFFSETS` would be one).
#[inline(always)]
fn nfct_direct(skb: u64) -> u64 {
    let off: u64;
    // SAFETY: loads a 64-bit immediate into a register; nothing else.
    unsafe {
        core::arch::asm!("{off} = {mark} ll", off = out(reg) off, mark = const NFCT_OFFSET_MARK)
    };
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

/// Called by a reason hook once its frame is filled: in cold and fexit mode nobody else will
/// emit it. fexit still sees the packet if it lost its entry, so it is noted for fexit to
/// skip, unless the kernel's own action says the packet keeps its entry.
#[inline(always)]
pub fn reason_logged(f: &mut Frame) {
    let m = mode();
    if m == conntrack_trace_common::Mode::KprobePair as u8 {
        return;
    }
    fill(f, verdict::LOGGED);
    if filter::matches(&f.event.headers, f.event.netns) {
        emit_packet(&f.event);
    }
    if m == conntrack_trace_common::Mode::Fexit as u8 && !f.event.reason.window_ignored() {
        add_note(f.skb, note::REPORTED);
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
    // Loggers before 5.14 get no hook state: the device's namespace stands in, or for a
    // locally sent packet, which has no device yet, its entry's.
    let netns = if f.state != 0 {
        skb::net_inum(net)
    } else {
        skb::dev_and_netns(f.skb)
            .1
            .or_else(|| ct::netns_of_skb(f.skb))
    };
    if let Some(inum) = netns {
        e.netns = inum;
        e.flags |= HAS_NETNS;
    }
    (e.skb_len, e.linear) = skb::headers(f.skb, &mut e.headers);
}
