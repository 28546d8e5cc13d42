//! Reads of kernel memory at offsets that userspace took from BTF.

use aya_ebpf::helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf};
use conntrack_trace_common::offsets::{Offsets, UNKNOWN};

/// Filled in by userspace before load (`EbpfLoader::override_global`).
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets::unknown();

/// The offsets, read through a volatile load so rustc cannot fold in the placeholder.
#[inline(always)]
pub fn offsets() -> &'static Offsets {
    // SAFETY: OFFSETS lives in .rodata; the pointer is valid for the program's lifetime.
    unsafe { &*core::ptr::read_volatile(&&raw const OFFSETS) }
}

/// `*(T *)(base + off)`, or None when the offset is unknown or the read faults.
#[inline(always)]
pub fn field<T>(base: u64, off: u32) -> Option<T> {
    if off == UNKNOWN || base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one returns an error.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T).ok() }
}

/// Copies `dst.len()` bytes from `base + off`; false when unknown or faulting.
#[inline(always)]
pub fn bytes(base: u64, off: u32, dst: &mut [u8]) -> bool {
    if off == UNKNOWN || base == 0 {
        return false;
    }
    // SAFETY: as above, the helper validates the source.
    unsafe { bpf_probe_read_kernel_buf((base + off as u64) as *const u8, dst).is_ok() }
}
