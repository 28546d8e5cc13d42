//! The ring buffer to userspace, and the per-CPU counters of what could not go through it.

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use conntrack_trace_common::stat;

/// Sized by userspace at load time (`--ring-size`); this is only the default.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
pub fn count(slot: u32) {
    if let Some(v) = STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; kprobe programs do not nest on one CPU (bpf_prog_active).
        unsafe { *v += 1 }
    }
}

/// Sends `event` to userspace; a full ring is counted as a loss, never dropped silently.
#[inline(always)]
pub fn emit<T>(event: &T) {
    if EVENTS.output::<T>(event, 0).is_err() {
        count(stat::LOST);
    }
}
