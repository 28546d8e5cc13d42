//! The TCP window check. `tcp_in_window` is inlined on the kernels we know, so the reason and
//! its numbers come from `nf_tcp_log_invalid`, which it calls on every failure (the
//! `nf_conntrack_log_invalid` sysctl is checked later, inside the logger).

use aya_ebpf::{macros::kprobe, programs::ProbeContext};
use conntrack_trace_common::{
    reason::source,
    verdict::HAS_REASON,
    window::{action, log_type},
};

use crate::{
    args::arg,
    ct,
    frame::{Frame, add_note, for_reason, note},
    read::{field, offsets},
    reason::{fmt_into, orphan},
    verdict,
};

/// IP_CT_TCP_FLAG_BE_LIBERAL in `ip_ct_tcp_state.flags`.
const BE_LIBERAL: u8 = 0x08;

/// 6.1+ `nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, ...)`. It returns ACCEPT
/// without logging when the connection or the netns is liberal, so that is checked here.
#[kprobe]
pub fn nf_tcp_log_invalid_variadic(ctx: ProbeContext) -> u32 {
    let skb = ctx.arg::<u64>(0).unwrap_or(0);
    // Its own line goes through the generic logger as "%pV", which that hook skips by itself.
    add_note(skb, note::WINDOW_LOGGED);
    let Some(f) = for_reason(skb, ctx.arg::<u64>(2).unwrap_or(0)) else {
        return orphan();
    };
    if f.event.flags & HAS_REASON != 0 {
        return 0;
    }
    let off = offsets();
    let sender = ctx.arg::<u64>(3).unwrap_or(0);
    let state = ctx.arg::<u64>(2).unwrap_or(0);
    let liberal_ct = field::<u8>(sender, off.tcp_flags).unwrap_or(0) & BE_LIBERAL != 0;
    let net = field::<u64>(state, off.state_net).unwrap_or(0);
    let liberal_net = field::<u8>(net, off.net_tcp_be_liberal).unwrap_or(0) != 0;
    if liberal_ct || liberal_net {
        return 0;
    }
    let r = &mut f.event.reason;
    r.source = source::TCP_LOG_VARIADIC;
    r.action = ctx
        .arg::<u64>(4)
        .map(|a| a as u8)
        .unwrap_or(action::UNKNOWN);
    r.log_type = log_type::NONE;
    r.l4proto = 6;
    // The bound is the first vararg (on the stack on x86-64, in x6 on arm64).
    r.args[0] = arg(&ctx, 6);
    fmt_into(ctx.arg::<u64>(5).unwrap_or(0), &mut r.fmt);
    r.arg[0] = 0;
    finish(f, skb, ctx.arg::<u64>(1).unwrap_or(0));
    0
}

/// Debian 6.1.187+ / 6.12 `nf_tcp_log_invalid(skb, ct, state, const struct nf_tcp_invalid_log *)`.
/// Only called when not liberal; the action is implied by the type.
#[kprobe]
pub fn nf_tcp_log_invalid_struct(ctx: ProbeContext) -> u32 {
    let skb = ctx.arg::<u64>(0).unwrap_or(0);
    // It logs its line through the generic logger, in its own words.
    add_note(skb, note::TCP_LOGGING | note::WINDOW_LOGGED);
    let Some(f) = for_reason(skb, ctx.arg::<u64>(2).unwrap_or(0)) else {
        return orphan();
    };
    if f.event.flags & HAS_REASON != 0 {
        return 0;
    }
    let off = offsets();
    let log = ctx.arg::<u64>(3).unwrap_or(0);
    let r = &mut f.event.reason;
    r.source = source::TCP_LOG_STRUCT;
    r.action = action::UNKNOWN;
    r.log_type = field::<u32>(log, off.log_type).unwrap_or(0) as u8;
    r.l4proto = 6;
    r.args[0] = field::<u32>(log, off.log_value).unwrap_or(0) as u64;
    r.fmt[0] = 0;
    r.arg[0] = 0;
    finish(f, skb, ctx.arg::<u64>(1).unwrap_or(0));
    0
}

#[inline(always)]
fn finish(f: &mut Frame, skb: u64, conn: u64) {
    let (nfct, _) = ct::of_skb(skb);
    ct::snapshot(conn, nfct, &mut f.event.ct, &mut f.event.seqadj);
    f.event.flags |= HAS_REASON;
    verdict::reason_logged(f);
}
