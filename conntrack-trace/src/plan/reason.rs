//! The generic invalid-packet loggers, and where their format argument sits.

use conntrack_trace_common::reason::LogArgs;

use super::{Flavor, Kernel, Part, Program, kernel_before};

pub(super) fn plan(k: &Kernel) -> (LogArgs, Part) {
    let mut part = Part::default();
    // The generic loggers gained a `state` argument in 5.14, moving fmt one slot later.
    let pre_5_14 = kernel_before(k.release, 5, 14);
    let fmt_index = |name: &str, fallback_old: u8, fallback_new: u8| -> u8 {
        match k.btf.func(name) {
            Some(p) => p.params.len().saturating_sub(1) as u8,
            None if pre_5_14 => fallback_old,
            None => fallback_new,
        }
    };
    let log_args = LogArgs {
        ct_log_fmt: fmt_index("nf_ct_l4proto_log_invalid", 2, 3),
        l4_log_fmt: fmt_index("nf_l4proto_log_invalid", 4, 3),
        _pad: [0; 2],
    };
    for (program, base) in [
        (Program::NfCtL4protoLogInvalid, "nf_ct_l4proto_log_invalid"),
        (Program::NfL4protoLogInvalid, "nf_l4proto_log_invalid"),
    ] {
        match k.syms.find(base) {
            Some(sym) => part.add(program, Flavor::KProbe, sym),
            None => part.note(format!("{base} not found: its reasons are not reported")),
        }
    }
    (log_args, part)
}
