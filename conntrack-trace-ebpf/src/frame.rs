//! Per-CPU stack of the `nf_conntrack_in` calls in flight, so that the reason logged inside a
//! call and the verdict at its return become one event. A stack, not a single slot: a softirq
//! can run `nf_conntrack_in` while the same CPU is inside it for a locally sent packet, and the
//! idle task shares pid 0 across CPUs, so neither a slot nor a pid-keyed hash would be safe.
//!
//! With the kprobe pair, the entry probe pushes every call. With fexit there is no entry
//! probe: a reason hook pushes a frame for its packet and the fexit program pops it.

use core::sync::atomic::AtomicU64;

use aya_ebpf::{macros::map, maps::PerCpuArray};
use conntrack_trace_common::{MAX_NEST, mode, stat, verdict::PacketEvent};

use crate::ring::count;

#[repr(C)]
pub struct Frame {
    pub skb: u64,
    pub state: u64,
    pub event: PacketEvent,
}

#[repr(C)]
pub struct Frames {
    /// Cold mode: the one event being built by a reason hook (hooks do not nest per CPU).
    pub cold: Frame,
    pub depth: u32,
    /// Set by `early_drop` inside the call in flight; taken by its return.
    pub drop_reason: u8,
    pub _pad: [u8; 3],
    /// Cold mode: the namespace `early_drop` was called for, until it returns.
    pub early_drop_net: u64,
    /// The skb `nf_ct_resolve_clash` is deciding about (confirm does not nest: BH is off).
    pub clash_skb: u64,
    /// The skb `nf_tcp_log_invalid` is logging for, until it returns: the generic logger it
    /// calls with the same text must not report the packet a second time.
    pub tcp_log_skb: u64,
    /// The skb `nf_tcp_log_invalid` last logged for on this CPU (kept after it returns): the
    /// timeout note `nf_tcp_handle_invalid` logs next for that packet is not a second event.
    pub window_logged_skb: u64,
    pub frame: [Frame; MAX_NEST],
}

#[map]
static FRAMES: PerCpuArray<Frames> = PerCpuArray::with_max_entries(1, 0);

/// Frames and drop reasons waiting for an fexit, summed over all CPUs. While it is 0 the
/// fexit program decides an accepted, tracked packet without looking up its CPU's frames:
/// that lookup was most of its time on the per-packet path. Only the rare paths write it.
/// A frame whose fexit never runs (a call already in flight at attach) keeps it above 0:
/// every packet then takes the full path, slower but still right.
static PENDING: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
pub fn nothing_pending() -> bool {
    // SAFETY: a plain load of a live global (this target cannot select an atomic load); a
    // stale 0 can only be read before this CPU's own add, which comes first on this CPU.
    unsafe { core::ptr::read_volatile(PENDING.as_ptr()) == 0 }
}

/// `PENDING += n`, n possibly negative (as its two's complement). The BPF target has an
/// atomic add but no compare-and-swap, so Rust offers no `fetch_add` there: the instruction
/// is written out.
#[inline(always)]
pub fn pending_add(n: u64) {
    // SAFETY: an atomic add to a live global; it touches nothing else.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({p} + 0) += {n}",
            p = in(reg) PENDING.as_ptr(),
            n = in(reg) n,
        )
    }
}

/// What a CPU contributes to PENDING.
#[inline(always)]
pub fn pending_of(frames: &Frames) -> u64 {
    frames.depth as u64 + u64::from(frames.drop_reason != 0)
}

/// `conntrack_trace_common::mode`, set by userspace from the attach plan.
#[unsafe(no_mangle)]
static MODE: u8 = mode::EXACT;

#[inline(always)]
pub fn mode() -> u8 {
    // SAFETY: .rodata global patched by userspace; volatile so it is not constant-folded.
    unsafe { core::ptr::read_volatile(&raw const MODE) }
}

#[inline(always)]
pub fn frames() -> Option<&'static mut Frames> {
    // SAFETY: the map value is valid per CPU for the duration of the program.
    FRAMES.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Pushes a frame for a new call. The depth always counts up, even past MAX_NEST, so the
/// matching pop stays balanced.
#[inline(always)]
pub fn push(frames: &mut Frames, skb: u64, state: u64) -> Option<&mut Frame> {
    let d = frames.depth as usize;
    frames.depth = d as u32 + 1;
    let Some(f) = frames.frame.get_mut(d) else {
        count(stat::NEST_OVERFLOW);
        return None;
    };
    f.skb = skb;
    f.state = state;
    f.event.flags = 0;
    f.event.ct.flags = 0;
    Some(f)
}

/// Pops the innermost frame; None when the stack is empty or that call was not tracked.
#[inline(always)]
pub fn pop(frames: &mut Frames) -> Option<&mut Frame> {
    let d = frames.depth as usize;
    if d == 0 {
        return None;
    }
    frames.depth = d as u32 - 1;
    frames.frame.get_mut(d - 1)
}

/// The frame a reason for `skb` belongs in: the innermost call if it is this packet's; with
/// fexit a new frame for it; in cold mode the scratch frame, which the hook emits itself.
#[inline(always)]
pub fn for_reason(skb: u64, state: u64) -> Option<&'static mut Frame> {
    let frames = frames()?;
    // One index, bounds-checked and masked, so the verifier tracks it (MAX_NEST is 2^n).
    let top = (frames.depth as usize).wrapping_sub(1);
    if top < MAX_NEST {
        let top = frames.frame.get_mut(top & (MAX_NEST - 1))?;
        if top.skb == skb {
            // SAFETY: re-borrow of the same per-CPU value; the first borrow ends here.
            return Some(unsafe { &mut *(top as *mut Frame) });
        }
    }
    match mode() {
        mode::FEXIT => {
            pending_add(1);
            push(frames, skb, state)
        }
        mode::COLD => {
            let f = &mut frames.cold;
            f.skb = skb;
            f.state = state;
            f.event.flags = 0;
            f.event.ct.flags = 0;
            Some(f)
        }
        _ => None,
    }
}
