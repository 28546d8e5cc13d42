//! Arguments of a kprobed function by a position known only at run time (a format string's
//! index, the varargs after it), read from the probe's registers or, past them, the stack.
//! The verifier refuses variable offsets into the context, so each register is loaded at its
//! constant offset and one is selected. The calling convention is the kernel's, chosen at
//! build time: aya-build sets `bpf_target_arch` to the architecture the CLI is built for.

use aya_ebpf::programs::{ProbeContext, RetProbeContext};

use crate::read::field;

/// x86-64 SysV: rdi, rsi, rdx, rcx, r8, r9, then the stack. At entry rsp points at the
/// return address; stack arguments follow it. Variadic arguments follow the same rule.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn arg(ctx: &ProbeContext, n: u64) -> u64 {
    let regs = ctx.regs;
    // SAFETY: regs is this hit's pt_regs; each read is a fixed-offset context load.
    let r = |p: *const u64| unsafe { core::ptr::read_volatile(p) };
    unsafe {
        match n {
            0 => r(&raw const (*regs).rdi),
            1 => r(&raw const (*regs).rsi),
            2 => r(&raw const (*regs).rdx),
            3 => r(&raw const (*regs).rcx),
            4 => r(&raw const (*regs).r8),
            5 => r(&raw const (*regs).r9),
            _ => field::<u64>(r(&raw const (*regs).rsp), (8 * (n - 5)) as u32).unwrap_or(0),
        }
    }
}

/// AAPCS64 as Linux uses it: x0-x7, then the stack. The return address is in x30, so at
/// entry sp points at the first stack argument. Variadic arguments follow the same rule
/// (unlike Apple's arm64 ABI, which puts every one of them on the stack).
#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn arg(ctx: &ProbeContext, n: u64) -> u64 {
    let regs = ctx.regs;
    // SAFETY: regs is this hit's pt_regs; each read is a fixed-offset context load.
    let r = |p: *const u64| unsafe { core::ptr::read_volatile(p) };
    unsafe {
        match n {
            0 => r(&raw const (*regs).regs[0]),
            1 => r(&raw const (*regs).regs[1]),
            2 => r(&raw const (*regs).regs[2]),
            3 => r(&raw const (*regs).regs[3]),
            4 => r(&raw const (*regs).regs[4]),
            5 => r(&raw const (*regs).regs[5]),
            6 => r(&raw const (*regs).regs[6]),
            7 => r(&raw const (*regs).regs[7]),
            _ => field::<u64>(r(&raw const (*regs).sp), (8 * (n - 8)) as u32).unwrap_or(0),
        }
    }
}

/// The stack pointer the probed call will have returned with, from its entry probe: past
/// the return address `call` pushed.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn sp_after_return(ctx: &ProbeContext) -> u64 {
    // SAFETY: a fixed-offset context load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.regs).rsp) }.wrapping_add(8)
}

/// The stack pointer at a return probe: the caller's, as the return left it.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn sp_at_return(ctx: &RetProbeContext) -> u64 {
    // SAFETY: a fixed-offset context load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.regs).rsp) }
}

/// The stack pointer the probed call will have returned with: the return address is in x30,
/// so the caller's stack pointer is already the one at entry.
#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn sp_after_return(ctx: &ProbeContext) -> u64 {
    // SAFETY: a fixed-offset context load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.regs).sp) }
}

#[cfg(bpf_target_arch = "aarch64")]
#[inline(always)]
pub fn sp_at_return(ctx: &RetProbeContext) -> u64 {
    // SAFETY: a fixed-offset context load.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.regs).sp) }
}

#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
compile_error!(
    "conntrack-trace reads kprobe arguments for x86_64 and aarch64 only; add this \
     architecture's calling convention to conntrack-trace-ebpf/src/args.rs"
);
