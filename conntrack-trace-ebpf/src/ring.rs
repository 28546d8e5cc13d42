//! The ring buffer to userspace, and the per-CPU counters of what could not go through it.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_kernel_str_bytes,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use conntrack_trace_common::{
    SNAP_LEN,
    reason::TEXT_LEN,
    stat,
    verdict::{HAS_REASON, LOST_BY_MAX, LostKey, PacketEvent},
};

/// Sized by userspace at load time (`--ring-size`); this is only the default.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Packet events the ring could not take, by what userspace needs for their event and
/// reason_code: the metrics count every packet, lost or not.
#[map]
static LOST_BY: PerCpuHashMap<LostKey, u64> = PerCpuHashMap::with_max_entries(LOST_BY_MAX, 0);

/// The key being built (too big for the BPF stack next to the callers' frames).
#[map]
static LOST_KEY: PerCpuArray<LostKey> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn count(slot: u32) {
    count_by(slot, 1);
}

#[inline(always)]
pub fn count_by(slot: u32, n: u64) {
    if let Some(v) = STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; kprobe programs do not nest on one CPU (bpf_prog_active).
        unsafe { *v += n }
    }
}

/// Sends `event` to userspace; a full ring is counted as a loss, never dropped silently.
#[inline(always)]
pub fn emit<T>(event: &T) {
    if EVENTS.output::<T>(event, 0).is_err() {
        count(stat::LOST);
    }
}

/// `emit` for a packet: a loss is also counted by its kind.
#[inline(always)]
pub fn emit_packet(event: &PacketEvent) {
    if EVENTS.output::<PacketEvent>(event, 0).is_err() {
        count(stat::LOST);
        count_lost(event);
    }
}

/// Copies a NUL-terminated text into a zeroed key: stale bytes after the NUL (of an earlier,
/// longer text) would make another key. A helper call, not a byte loop the verifier walks.
#[inline(always)]
fn text_key(src: &[u8; TEXT_LEN], dst: &mut [u8; TEXT_LEN]) {
    *dst = [0; TEXT_LEN];
    // SAFETY: both are this program's map values; the helper stops at the NUL or the end.
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(src.as_ptr(), dst) };
}

#[inline(always)]
fn count_lost(e: &PacketEvent) {
    let Some(k) = LOST_KEY.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch value, valid for this program run.
    let k = unsafe { &mut *k };
    k.verdict = e.verdict;
    k.drop_reason = e.drop_reason;
    k.flags = e.flags & HAS_REASON;
    k.proto = 0;
    k.icmp_type = 0;
    k.reason.source = e.reason.source;
    k.reason.action = e.reason.action;
    k.reason.log_type = e.reason.log_type;
    k.reason.l4proto = e.reason.l4proto;
    k.reason.args = [0; 3];
    if k.flags != 0 {
        text_key(&e.reason.fmt, &mut k.reason.fmt);
        text_key(&e.reason.arg, &mut k.reason.arg);
    } else {
        k.reason.source = 0;
        k.reason.action = 0;
        k.reason.log_type = 0;
        k.reason.l4proto = 0;
        k.reason.fmt = [0; TEXT_LEN];
        k.reason.arg = [0; TEXT_LEN];
        // IPv4 (protocol at byte 9, header length in the first) or IPv6 (next header at 6,
        // fixed 40-byte header); a packet event with no packet (a table-full drop seen
        // without a verdict probe) has an empty capture.
        let h = &e.headers;
        let (proto, off) = match h[0] >> 4 {
            4 => (h[9], ((h[0] & 0x0f) as usize) * 4),
            6 => (h[6], 40),
            _ => (0, 0),
        };
        if e.skb_len != 0 {
            k.proto = proto;
            if proto == 1 || proto == 58 {
                k.icmp_type = h[off & (SNAP_LEN - 1)];
            }
        }
    }
    match LOST_BY.get_ptr_mut(&*k) {
        // SAFETY: this CPU's value; kprobe programs do not nest on one CPU.
        Some(v) => unsafe { *v += 1 },
        None => {
            // Another CPU may insert the same key first: then add to it.
            if LOST_BY.insert(&*k, 1u64, BPF_NOEXIST as u64).is_err()
                && let Some(v) = LOST_BY.get_ptr_mut(&*k)
            {
                // SAFETY: as above.
                unsafe { *v += 1 }
            }
        }
    }
}
