//! Per-CPU stack of the `nf_conntrack_in` calls in flight, so that the reason logged inside a
//! call and the verdict at its return become one event. A stack, not a single slot: a softirq
//! can run `nf_conntrack_in` while the same CPU is inside it for a locally sent packet, and the
//! idle task shares pid 0 across CPUs, so neither a slot nor a pid-keyed hash would be safe.
//!
//! With the kprobe pair, the entry probe pushes every call. With fexit there is no entry
//! probe: a reason hook reports its packet itself, as in cold mode, and notes the skb so
//! that the fexit program, which sees only the packets that lost their entry or were
//! dropped, does not report it again.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use conntrack_trace_common::{MAX_NEST, Mode, stat, verdict::PacketEvent};

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
    /// fexit mode: skbs a reason hook reported that may still reach the fexit program's slow
    /// path (not those the kernel said it ignores), most recent last.
    pub logged: [u64; LOGGED],
    pub logged_next: u64,
    pub frame: [Frame; MAX_NEST],
}

/// Reported skbs remembered per CPU: more than the calls that can be in flight at once.
const LOGGED: usize = 4;

#[map]
static FRAMES: PerCpuArray<Frames> = PerCpuArray::with_max_entries(1, 0);

/// Remembers that a reason hook reported `skb`.
#[inline(always)]
pub fn note_logged(frames: &mut Frames, skb: u64) {
    let i = frames.logged_next as usize & (LOGGED - 1);
    frames.logged_next = frames.logged_next.wrapping_add(1);
    if let Some(slot) = frames.logged.get_mut(i) {
        *slot = skb;
    }
}

/// Whether a reason hook reported `skb`; forgets it if so.
#[inline(always)]
pub fn take_logged(frames: &mut Frames, skb: u64) -> bool {
    for slot in frames.logged.iter_mut() {
        if *slot == skb {
            *slot = 0;
            return true;
        }
    }
    false
}

/// `conntrack_trace_common::Mode` as a `u8`, set by userspace from the attach plan.
#[unsafe(no_mangle)]
static MODE: u8 = Mode::KprobePair as u8;

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

/// The frame a reason for `skb` belongs in: the innermost call if it is this packet's (the
/// kprobe pair); with fexit and in cold mode the scratch frame, which the hook emits itself.
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
        m if m == Mode::Fexit as u8 || m == Mode::Cold as u8 => {
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
