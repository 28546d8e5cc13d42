//! Resets sent for packets with no socket.

use conntrack_trace_common::reset::ResetTp;

use super::{Flavor, Kernel, Part, Program, tracepoint_offsets};

/// 6.10+ traces socketless resets (and names a reason); before, the tracepoint fires only
/// with a full socket, so the send functions are probed instead.
pub(super) fn plan(k: &Kernel) -> (ResetTp, Part) {
    let mut part = Part::default();
    match k.reset_format.and_then(tracepoint_offsets) {
        Some((tp, true)) => {
            part.add(
                Program::TcpSendResetTp,
                Flavor::TracePoint,
                "tcp/tcp_send_reset",
            );
            (tp, part)
        }
        _ => {
            for f in ["tcp_v4_send_reset", "tcp_v6_send_reset"] {
                match k.syms.find(f) {
                    Some(sym) => part.add(Program::TcpSendResetKprobe, Flavor::KProbe, sym),
                    None => part.note(format!("{f} not found: those resets are not reported")),
                }
            }
            (ResetTp::default(), part)
        }
    }
}
