//! The verdict probe on `nf_conntrack_in`: which mode, and its programs.

use anyhow::{Result, bail};

use super::{FexitProbe, Flavor, Mode, Part, Program, Want};

/// The mode for what the user asked and what fexit's probe gave, and the programs on
/// `nf_conntrack_in` (symbol `ct_in`). nf_conntrack_in runs for every packet: fexit there
/// by default where it loads (as cheap as an empty program); the kprobe pair only when
/// asked for.
pub(super) fn plan(ct_in: &str, fexit: &FexitProbe, want: Want) -> Result<(Mode, Part)> {
    let mut part = Part::default();
    let why_not = fexit.why_not().unwrap_or_default();
    let mode = match (want, fexit) {
        (Want::Force(Mode::Fexit), FexitProbe::Unavailable(_) | FexitProbe::Rejected(_)) => {
            bail!("fexit on nf_conntrack_in cannot be used here: {why_not}")
        }
        (Want::Force(mode), _) => mode,
        (Want::Exact, FexitProbe::Loads(_)) => Mode::Fexit,
        (Want::Exact, _) => Mode::KprobePair,
        (Want::Default, FexitProbe::Loads(_)) => Mode::Fexit,
        (Want::Default, _) => Mode::Cold,
    };
    match (mode, fexit) {
        (Mode::Fexit, FexitProbe::Loads(f)) => {
            part.add(Program::NfConntrackInFexit, Flavor::FExit(*f), ct_in)
        }
        (Mode::Fexit, _) => unreachable!("fexit is planned only where it loads"),
        (Mode::KprobePair, _) => {
            if want == Want::Exact {
                part.note(format!(
                    "fexit on nf_conntrack_in cannot be used here ({why_not}): --exact uses \
                     a kprobe pair on every packet instead"
                ));
            }
            part.add(Program::NfConntrackIn, Flavor::KProbe, ct_in);
            part.add(Program::NfConntrackInRet, Flavor::KRetProbe, ct_in);
        }
        (Mode::Cold, FexitProbe::Loads(_)) => part.note(
            "no per-packet probe (--verdict-probe none): packets are reported when the \
             kernel logs a reason; INVALIDs it does not log (ICMP errors matching nothing, \
             an RST with no entry before 6.8) are missed, which the default, fexit on \
             nf_conntrack_in, sees here; table-full drops name only their namespace",
        ),
        (Mode::Cold, _) => part.note(format!(
            "no per-packet probe (fexit on nf_conntrack_in cannot be used here: {why_not}): \
             packets are reported when the kernel logs a reason; INVALIDs it does not log \
             (ICMP errors matching nothing, an RST with no entry before 6.8) need --exact, \
             which adds a kprobe pair on nf_conntrack_in; table-full drops name only their \
             namespace"
        )),
    }
    Ok((mode, part))
}
