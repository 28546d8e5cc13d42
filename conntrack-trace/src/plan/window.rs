//! The TCP window reasons: `nf_tcp_log_invalid` in whichever form this kernel has.

use super::{Flavor, Kernel, Part, Program, WindowSource};

pub(super) fn plan(k: &Kernel) -> (WindowSource, Part) {
    let mut part = Part::default();
    let window = match (
        k.syms.find("nf_tcp_log_invalid"),
        k.btf.func("nf_tcp_log_invalid"),
    ) {
        (Some(sym), Some(p)) if p.variadic => {
            part.add(Program::NfTcpLogInvalidVariadic, Flavor::KProbe, sym);
            WindowSource::LogVariadic
        }
        (Some(sym), Some(p)) if p.params.len() == 4 && k.offsets.log_type != u32::MAX => {
            part.add(Program::NfTcpLogInvalidStruct, Flavor::KProbe, sym);
            WindowSource::LogStruct
        }
        (Some(_), p) => {
            part.note(format!(
                "nf_tcp_log_invalid has an unknown prototype ({p:?}): TCP window reasons \
                 come only from the generic logger, without the kernel's bound"
            ));
            WindowSource::L4ProtoLog
        }
        (None, _) => WindowSource::L4ProtoLog,
    };
    if k.syms.find("tcp_in_window").is_some() {
        part.note(
            "tcp_in_window is a symbol here, but its verdict is read where it is logged, \
             which carries the same reason and bound",
        );
    }
    (window, part)
}
