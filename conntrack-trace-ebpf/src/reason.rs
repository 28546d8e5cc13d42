//! The generic invalid-packet loggers, `nf_ct_l4proto_log_invalid` (has the ct) and
//! `nf_l4proto_log_invalid` (errors before lookup: flags, checksum, truncation; UDP, ICMP).
//! On kernels before 6.1 they also carry the TCP window reasons, as a "%s" vararg.

use aya_ebpf::{helpers::bpf_probe_read_kernel_str_bytes, macros::kprobe, programs::ProbeContext};
use conntrack_trace_common::{
    reason::{ARGS, LogArgs, Reason, TEXT_LEN, source},
    stat,
    verdict::HAS_REASON,
    window::action,
};

use crate::{
    args::arg,
    ct,
    frame::{for_reason, note, noted, take},
    read::field,
    ring::count,
};

#[unsafe(no_mangle)]
static LOG_ARGS: LogArgs = LogArgs {
    ct_log_fmt: 3,
    l4_log_fmt: 3,
    _pad: [0; 2],
};

#[inline(always)]
fn log_args() -> LogArgs {
    // SAFETY: a .rodata global patched by userspace; volatile so it is not constant-folded.
    unsafe { core::ptr::read_volatile(&raw const LOG_ARGS) }
}

#[kprobe]
pub fn nf_ct_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    let fmt = log_args().ct_log_fmt as u64;
    // 5.14+ passes the hook state right before fmt; older kernels pass no state.
    let state = if fmt == 3 { arg(&ctx, 2) } else { 0 };
    record(&ctx, ctx.arg::<u64>(1).unwrap_or(0), state, 0, fmt)
}

#[kprobe]
pub fn nf_l4proto_log_invalid(ctx: ProbeContext) -> u32 {
    let fmt = log_args().l4_log_fmt as u64;
    let proto = arg(&ctx, fmt.saturating_sub(1)) as u8;
    let state = if fmt == 3 { arg(&ctx, 1) } else { 0 };
    record(&ctx, 0, state, proto, fmt)
}

/// Records the reason logged for the packet (the first, if several loggers ran).
#[inline(always)]
fn record(ctx: &ProbeContext, conn: u64, state: u64, proto: u8, fmt_idx: u64) -> u32 {
    let skb = arg(ctx, 0);
    let fmt = arg(ctx, fmt_idx);
    // The TCP logger re-logs through here ("%pV" on 6.1, its own text on the struct form):
    // that packet is already reported. So is a packet whose window failure made
    // `nf_tcp_handle_invalid` (6.1+) shorten the entry's timeout: it logs "packet (index ..."
    // (later "lowered timeout to UNACK") under the same ct lock, right after the window line.
    if field::<u32>(fmt, 0) == Some(u32::from_le_bytes(*b"%pV\0"))
        || take(skb, note::TCP_LOGGING)
        || (matches!(field::<u64>(fmt, 0).map(u64::to_le_bytes),
                     Some(p) if p == *b"packet (" || p == *b"lowered ")
            && noted(skb, note::WINDOW_LOGGED))
    {
        return 0;
    }
    let Some(f) = for_reason(skb, state) else {
        return orphan();
    };
    if f.event.flags & HAS_REASON != 0 {
        return 0;
    }
    let r: &mut Reason = &mut f.event.reason;
    r.source = source::L4PROTO_LOG;
    r.action = action::UNKNOWN;
    r.log_type = 0;
    let (nfct, skb_ct) = ct::of_skb(skb);
    let conn = if conn != 0 { conn } else { skb_ct };
    r.l4proto = proto;
    fmt_into(fmt, &mut r.fmt);
    for i in 0..ARGS {
        r.args[i] = arg(ctx, fmt_idx + 1 + i as u64);
    }
    // Before 6.1 the whole reason is a "%s" argument. Other "%s" (the TCP state name) are
    // rebuilt in userspace from the ct snapshot, which keeps a format scan out of the kernel.
    r.arg[0] = 0;
    if r.fmt[0] == b'%' && r.fmt[1] == b's' {
        fmt_into(r.args[0], &mut r.arg);
    }
    ct::snapshot(conn, nfct, &mut f.event.ct, &mut f.event.seqadj);
    if r.l4proto == 0 {
        r.l4proto = f.event.ct.tuples[0].protonum;
    }
    f.event.flags |= HAS_REASON;
    crate::verdict::reason_logged(f);
    0
}

/// A reason for a packet whose `nf_conntrack_in` call is not being tracked.
#[inline(always)]
pub fn orphan() -> u32 {
    count(stat::ORPHAN_REASON);
    0
}

/// Copies a kernel C string (a format string or "%s" argument), NUL-terminated.
#[inline(always)]
pub fn fmt_into(ptr: u64, dst: &mut [u8; TEXT_LEN]) {
    dst[0] = 0;
    if ptr != 0 {
        // SAFETY: the helper checks the address and always NUL-terminates.
        let _ = unsafe { bpf_probe_read_kernel_str_bytes(ptr as *const u8, dst) };
    }
}
