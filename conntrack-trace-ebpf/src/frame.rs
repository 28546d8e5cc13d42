//! Per-CPU stack of the `nf_conntrack_in` calls in flight, so that the reason logged inside a
//! call and the verdict at its return become one event. A stack, not a single slot: a softirq
//! can run `nf_conntrack_in` while the same CPU is inside it for a locally sent packet, and the
//! idle task shares pid 0 across CPUs, so neither a slot nor a pid-keyed hash would be safe.
//!
//! With the kprobe pair, the entry probe pushes every call. With fexit there is no entry
//! probe: a reason hook reports its packet itself, as in cold mode, and notes the skb so
//! that the fexit program, which sees only the packets that lost their entry or were
//! dropped, does not report it again.

use aya_ebpf::{
    Global,
    helpers::bpf_get_current_task,
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use conntrack_trace_common::{MAX_NEST, Mode, stat, verdict::PacketEvent};

use crate::ring::{count, count_by};

#[repr(C)]
pub struct Frame {
    pub skb: u64,
    pub state: u64,
    /// kprobe pair: the stack pointer the call will return with, which its return probe
    /// sees again (the return probe cannot read the skb argument any more), and how often
    /// the task had changed CPU at entry.
    pub sp: u64,
    pub migrations: u64,
    pub event: PacketEvent,
}

#[repr(C)]
pub struct Frames {
    /// Cold mode: the one event being built by a reason hook (hooks do not nest per CPU).
    pub cold: Frame,
    pub depth: u32,
    /// The skb `nf_ct_resolve_clash` is deciding about (confirm does not nest: BH is off).
    pub clash_skb: u64,
    pub frame: [Frame; MAX_NEST],
}

#[map]
static FRAMES: PerCpuArray<Frames> = PerCpuArray::with_max_entries(1, 0);

/// What one `nf_conntrack_in` call's hooks tell each other about its packet, by skb. Not per
/// CPU: on a preemptible kernel the call can move to another CPU between two of its hooks
/// (measured: with per-CPU notes, a thread moved between CPUs got duplicate events). Only
/// hooks that report something touch it, never the per-packet fast path. An LRU map, so a
/// note nobody takes (a packet that never reached the hook that takes it) ages out.
#[map]
static SKB_NOTES: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

/// What a table-full `early_drop` tells the `nf_conntrack_in` call it runs inside (the drop
/// reason), and in cold mode what its entry tells its return (the namespace), by task: the
/// call can move to another CPU in between on a preemptible kernel, and a task pointer,
/// unlike a pid, is one CPU's own for its idle task. Touched only while the table is full.
#[map]
static TASK_DROP_REASON: LruHashMap<u64, u8> = LruHashMap::with_max_entries(1024, 0);
#[map]
static TASK_EARLY_DROP_NET: LruHashMap<u64, u64> = LruHashMap::with_max_entries(1024, 0);

#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: the helper has no preconditions; it returns the current task's address.
    unsafe { bpf_get_current_task() }
}

/// Leaves `reason` for the drop the current task's `nf_conntrack_in` call is heading to.
#[inline(always)]
pub fn note_drop_reason(reason: u8) {
    let _ = TASK_DROP_REASON.insert(&current_task(), &reason, 0);
}

/// The reason left for the current task's call, which returned NF_DROP (0: none).
#[inline(always)]
pub fn take_drop_reason() -> u8 {
    take_for_task(&TASK_DROP_REASON).unwrap_or(0)
}

/// Cold mode: the namespace `early_drop` is running for, until it returns.
#[inline(always)]
pub fn note_early_drop_net(net: u64) {
    let _ = TASK_EARLY_DROP_NET.insert(&current_task(), &net, 0);
}

#[inline(always)]
pub fn take_early_drop_net() -> u64 {
    take_for_task(&TASK_EARLY_DROP_NET).unwrap_or(0)
}

#[inline(always)]
fn take_for_task<V: Copy>(map: &LruHashMap<u64, V>) -> Option<V> {
    let task = current_task();
    // SAFETY: a map value, read once.
    let v = *unsafe { map.get(&task) }?;
    let _ = map.remove(&task);
    Some(v)
}

/// Flags in `SKB_NOTES`.
pub mod note {
    /// The fixed-args `nf_tcp_log_invalid` is logging the packet: the generic logger it calls
    /// with the same text must not report it a second time.
    pub const TCP_LOGGING: u8 = 1;
    /// The window logger reported it: the timeout note `nf_tcp_handle_invalid` logs next for
    /// that packet (6.1+) is not a second event.
    pub const WINDOW_LOGGED: u8 = 2;
    /// fexit mode: a reason hook reported it, and it may still reach the fexit program's
    /// slow path (not when the kernel said it ignores the packet).
    pub const REPORTED: u8 = 4;
}

/// Adds `flags` to the notes about `skb`.
#[inline(always)]
pub fn add_note(skb: u64, flags: u8) {
    match SKB_NOTES.get_ptr_mut(&skb) {
        // SAFETY: a map value pointer, valid for this program run; one task handles one skb.
        Some(p) => unsafe { *p |= flags },
        None => {
            let _ = SKB_NOTES.insert(&skb, &flags, 0);
        }
    }
}

/// Whether `flag` is noted for `skb`; forgets it if so.
#[inline(always)]
pub fn take(skb: u64, flag: u8) -> bool {
    let Some(p) = SKB_NOTES.get_ptr_mut(&skb) else {
        return false;
    };
    // SAFETY: a map value pointer, valid for this program run; one task handles one skb.
    let v = unsafe { &mut *p };
    if *v & flag == 0 {
        return false;
    }
    *v &= !flag;
    if *v == 0 {
        let _ = SKB_NOTES.remove(&skb);
    }
    true
}

/// Whether `flag` is noted for `skb`.
#[inline(always)]
pub fn noted(skb: u64, flag: u8) -> bool {
    SKB_NOTES.get_ptr(&skb).is_some_and(|p| {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { *p & flag != 0 }
    })
}

/// `conntrack_trace_common::Mode` as a `u8`, set by userspace from the attach plan.
#[unsafe(no_mangle)]
static MODE: Global<u8> = Global::new(Mode::KprobePair as u8);

#[inline(always)]
pub fn mode() -> u8 {
    MODE.load()
}

#[inline(always)]
pub fn frames() -> Option<&'static mut Frames> {
    // SAFETY: the map value is valid per CPU for the duration of the program.
    FRAMES.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Pushes a frame for a new call. A full stack holds more calls than can be in flight on one
/// CPU (a locally sent packet's call and a softirq's inside it), so some of them lost their
/// return: all are dropped, counted, and tracking starts over rather than stay shifted.
#[inline(always)]
pub fn push(frames: &mut Frames, skb: u64, state: u64, call: Call) -> Option<&mut Frame> {
    let mut d = frames.depth as usize;
    if d >= MAX_NEST {
        count_by(stat::UNPAIRED, d as u64);
        d = 0;
    }
    frames.depth = d as u32 + 1;
    let f = frames.frame.get_mut(d)?;
    f.skb = skb;
    f.state = state;
    f.sp = call.sp;
    f.migrations = call.migrations;
    f.event.flags = 0;
    f.event.ct.flags = 0;
    Some(f)
}

/// What identifies one `nf_conntrack_in` call to both probes of the pair.
#[derive(Clone, Copy)]
pub struct Call {
    pub sp: u64,
    /// The current task's CPU changes so far (0 where BTF does not say where to read them).
    pub migrations: u64,
}

/// Pops the frame of the call returning now. Frames above it are calls whose return was
/// never seen (a return probe the kernel skipped or could not run): dropped and counted. A
/// frame at the same stack pointer whose task has changed CPU since is not this call's
/// (that call or this one moved between its entry and return): dropped, counted, and this
/// verdict is not attributed. A return whose entry is not on this CPU's stack (its entry
/// probe was skipped, or the task moved here) is counted and leaves the stack as it is.
#[inline(always)]
pub fn pop(frames: &mut Frames, call: Call) -> Option<&mut Frame> {
    let d = frames.depth as usize;
    for k in 1..=MAX_NEST {
        if k > d {
            break;
        }
        let i = (d - k) & (MAX_NEST - 1);
        if frames.frame[i].sp == call.sp {
            frames.depth = i as u32;
            if frames.frame[i].migrations != call.migrations {
                count_by(stat::UNPAIRED, k as u64 + 1);
                return None;
            }
            if k > 1 {
                count_by(stat::UNPAIRED, k as u64 - 1);
            }
            return frames.frame.get_mut(i);
        }
    }
    count(stat::UNPAIRED);
    None
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
