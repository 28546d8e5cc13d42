//! Drops: a full table (`early_drop`) and an insert clash at confirm.

use super::{Flavor, Kernel, Mode, Part, Program};

pub(super) fn plan(k: &Kernel, mode: Mode) -> Part {
    let mut part = Part::default();
    // A table-full drop is tagged on the nf_conntrack_in call in flight; with no probe
    // there, early_drop's own argument names the namespace.
    match k.syms.find("early_drop") {
        Some(ed) => {
            part.add(Program::EarlyDropRet, Flavor::KRetProbe, ed);
            if mode == Mode::Cold {
                part.add(Program::EarlyDrop, Flavor::KProbe, ed);
            }
        }
        None => part.note("early_drop not found: table-full drops are reported as conntrack_drop"),
    }
    match k.syms.find("nf_ct_resolve_clash") {
        Some(rc) => {
            part.add(Program::NfCtResolveClashRet, Flavor::KRetProbe, rc);
            part.add(Program::NfCtResolveClash, Flavor::KProbe, rc);
        }
        None => part.note(
            "nf_ct_resolve_clash not found (before 5.10): insert_failed drops are not reported",
        ),
    }
    part
}
