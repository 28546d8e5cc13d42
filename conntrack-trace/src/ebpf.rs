//! The embedded eBPF object, and loading it with the plan's globals patched in.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{FExit, ProgramError},
};

use conntrack_trace_common::{filter::Filter, offsets::Offsets};

use crate::{
    btf::BtfFunc,
    plan::{FexitProbe, Plan, Program},
};

/// The fexit program on `nf_conntrack_in`.
pub const FEXIT_PROGRAM: &str = Program::NfConntrackInFexit.as_str();

/// The kernel's internal ENOTSUPP (include/linux/errno.h), which bpf(2) passes on as it is;
/// libc has no name for it.
const ENOTSUPP: i32 = 524;

/// Built by build.rs (aya-build) from conntrack-trace-ebpf.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack-trace"));

/// The embedded object with this kernel's `offsetof(struct sk_buff, _nfct)` written into the
/// instructions that carry its placeholder: the fexit program's per-packet load takes it as
/// an immediate, so that its fast path reads no map (see `nfct_direct` in the eBPF crate).
pub struct Object(Vec<u64>);

/// `NFCT_OFFSET_MARK` in the eBPF crate, as the two halves of an `ld_imm64`.
const NFCT_MARK: [u32; 2] = [0x5f6f_6666, 0x6e66_6374];

impl Object {
    pub fn new(offsets: &Offsets) -> Result<Object> {
        // u64 storage: the ELF parser wants the object 8-byte aligned.
        let mut words = vec![0u64; OBJECT.len().div_ceil(8)];
        let bytes = as_bytes_mut(&mut words);
        bytes[..OBJECT.len()].copy_from_slice(OBJECT);
        let code = code_ranges(OBJECT)?;
        let patched = patch_ld_imm64(
            &mut bytes[..OBJECT.len()],
            &code,
            NFCT_MARK,
            offsets.skb_nfct,
        );
        anyhow::ensure!(
            patched > 0,
            "the eBPF object has no skb->_nfct placeholder: it was not built from this source"
        );
        Ok(Object(words))
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: plain integers viewed as bytes; the length is the object's.
        let all =
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.0.len() * 8) };
        &all[..OBJECT.len()]
    }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: plain integers viewed as bytes, same memory and lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// File ranges of the object's executable sections (the programs).
fn code_ranges(elf: &[u8]) -> Result<Vec<std::ops::Range<usize>>> {
    use object::{Object as _, ObjectSection as _, SectionFlags};
    let file = object::File::parse(elf).context("parsing the embedded eBPF object")?;
    Ok(file
        .sections()
        .filter(|s| {
            matches!(s.flags(), SectionFlags::Elf { sh_flags }
                if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0)
        })
        .filter_map(|s| {
            let (start, len) = s.file_range()?;
            Some(start as usize..(start + len) as usize)
        })
        .collect())
}

/// Rewrites every `dst = MARK ll` in `code` to `dst = value ll`; returns how many.
fn patch_ld_imm64(
    elf: &mut [u8],
    code: &[std::ops::Range<usize>],
    mark: [u32; 2],
    value: u32,
) -> usize {
    const LD_IMM64: u8 = 0x18;
    let mut patched = 0;
    for range in code {
        let insns = &mut elf[range.clone()];
        for i in (0..insns.len().saturating_sub(15)).step_by(8) {
            let imm = |at: usize| u32::from_le_bytes(insns[at..at + 4].try_into().unwrap());
            // src_reg 0: a plain constant, not a map or BTF reference.
            if insns[i] == LD_IMM64
                && insns[i + 1] >> 4 == 0
                && imm(i + 4) == mark[0]
                && imm(i + 12) == mark[1]
            {
                insns[i + 4..i + 8].copy_from_slice(&value.to_le_bytes());
                insns[i + 12..i + 16].copy_from_slice(&[0; 4]);
                patched += 1;
            }
        }
    }
    patched
}

/// Creates the maps and relocates the programs; nothing is loaded into the verifier yet.
pub fn open(plan: &Plan, ring_bytes: u32, filter: &Filter) -> Result<Ebpf> {
    let object = Object::new(&plan.offsets)?;
    EbpfLoader::new()
        // No CO-RE relocations to apply (offsets come in as globals): skip aya's own parse of
        // the kernel BTF, which would double start-up time and memory.
        .btf(None)
        .override_global("OFFSETS", &plan.offsets, true)
        .override_global("LOG_ARGS", &plan.log_args, true)
        .override_global("MODE", &(plan.mode as u8), true)
        .override_global("FILTER", filter, true)
        .override_global("RESET_TP", &plan.reset_tp, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(object.bytes())
        .context("creating the eBPF maps")
}

/// Loads an fexit program against `func`, in vmlinux or a module: the kernel resolves the
/// type id in the BTF object passed with it.
pub fn load_fexit(prog: &mut FExit, func: BtfFunc) -> Result<(), ProgramError> {
    let fd = func.object_fd().map_err(|io_error| {
        ProgramError::SyscallError(aya::sys::SyscallError {
            call: "bpf_btf_get_fd_by_id",
            io_error,
        })
    })?;
    prog.load_from_btf_object(func.type_id, fd)
}

/// Whether the fexit program loads here against `func` and the kernel can attach it, before
/// anything is planned (so with the object's own globals but this kernel's offsets).
///
/// Loading is not enough: arm64 kernels before 6.4 verify and load an fexit program, then
/// refuse to attach it with ENOTSUPP (524), since their BPF trampolines reach a kernel
/// function only through ftrace direct calls, which arm64 gained in 6.4. So the probe also
/// attaches this throw-away copy and detaches it at once: for that instant it runs against
/// its own maps, which nothing reads.
pub fn probe_fexit(func: BtfFunc, offsets: &Offsets) -> FexitProbe {
    let object = match Object::new(offsets) {
        Ok(o) => o,
        Err(e) => return FexitProbe::Rejected(format!("{e:#}")),
    };
    let mut bpf = match EbpfLoader::new()
        .btf(None)
        .override_global("OFFSETS", offsets, true)
        .map_max_entries("EVENTS", 1 << 12)
        .load(object.bytes())
    {
        Ok(bpf) => bpf,
        Err(e) => return FexitProbe::Unavailable(format!("creating the eBPF maps: {e}")),
    };
    let Some(prog) = bpf
        .program_mut(FEXIT_PROGRAM)
        .and_then(|p| <&mut FExit>::try_from(p).ok())
    else {
        return FexitProbe::Rejected(format!("{FEXIT_PROGRAM} missing from the eBPF object"));
    };
    match load_fexit(prog, func) {
        Ok(()) => match prog.attach() {
            Ok(link) => {
                // Dropping the object would detach it too; a failed detach changes nothing
                // about what the kernel can do.
                let _ = prog.detach(link);
                FexitProbe::Loads(func)
            }
            Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(ENOTSUPP) => {
                FexitProbe::Unavailable(format!(
                    "the verifier accepts it but attaching fails ({}: ENOTSUPP): this kernel \
                     has no BPF trampoline for its functions (arm64 before 6.4)",
                    e.call
                ))
            }
            Err(e) => {
                FexitProbe::Unavailable(format!("the verifier accepts it but attaching fails: {e}"))
            }
        },
        Err(ProgramError::LoadError { io_error, .. })
            if io_error.raw_os_error() == Some(libc::EPERM) =>
        {
            FexitProbe::Unavailable(format!(
                "the kernel refused to load fexit ({io_error}): no fentry/fexit support"
            ))
        }
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => FexitProbe::Rejected(format!("{io_error}\n{verifier_log}")),
        Err(ProgramError::SyscallError(e)) => {
            FexitProbe::Unavailable(format!("{e}: {}", e.io_error))
        }
        Err(e) => FexitProbe::Unavailable(format!("{e}")),
    }
}

#[cfg(test)]
mod tests {
    use aya::programs::KProbe;

    use super::{NFCT_MARK, OBJECT, Object, code_ranges, patch_ld_imm64};

    #[test]
    fn the_nfct_placeholder_is_patched_in_the_fexit_program_only() {
        let mut offsets = conntrack_trace_common::offsets::Offsets::unknown();
        offsets.skb_nfct = 0x68;
        let object = Object::new(&offsets).unwrap();
        let code = code_ranges(OBJECT).unwrap();
        // Nothing left to patch, and the object otherwise unchanged.
        let mut copy = object.bytes().to_vec();
        assert_eq!(patch_ld_imm64(&mut copy, &code, NFCT_MARK, 0), 0);
        let changed: Vec<usize> = (0..OBJECT.len())
            .filter(|&i| OBJECT[i] != object.bytes()[i])
            .collect();
        assert!(!changed.is_empty() && changed.len() <= 8, "{changed:?}");
        // aya still parses it, and the fexit program is there.
        let obj = aya_obj::Object::parse(object.bytes()).unwrap();
        assert!(obj.programs.contains_key(super::FEXIT_PROGRAM));
    }
    use conntrack_trace_common::filter::Filter;

    use crate::{
        filter,
        plan::{Mode, Plan, Program, Want},
    };

    /// `check` loads with an empty filter, which the verifier prunes as dead code; this loads
    /// the verdict program with every filter field set so the filter path is verified too.
    #[test]
    fn filter_path_passes_the_verifier() {
        let (plan, _) = Plan::for_running_kernel(Want::Exact).unwrap();
        let mut f: Filter = filter::build(&filter::Flags {
            host: Some("fd00::/64"),
            src: Some("10.0.0.0/8"),
            dst: Some("10.96.0.10"),
            proto: Some("tcp"),
            port: Some(80),
            sport: Some(40000),
            dport: Some(8080),
            netns: Some(4026531840),
        })
        .unwrap();
        f.host.family = 4;
        let mut bpf = super::open(&plan, 1 << 16, &f).unwrap();
        let p: &mut KProbe = bpf
            .program_mut(Program::NfConntrackInRet.as_str())
            .unwrap()
            .try_into()
            .unwrap();
        p.load().expect("verifier accepts the filter path");
    }

    /// The mode is a load-time constant the verifier prunes on, so `check` (one mode) does
    /// not cover the others: load every kprobe program in every mode.
    #[test]
    fn every_mode_passes_the_verifier() {
        let (mut plan, _) = Plan::for_running_kernel(Want::Exact).unwrap();
        for mode in [Mode::KprobePair, Mode::Fexit, Mode::Cold] {
            plan.mode = mode;
            let mut bpf = super::open(&plan, 1 << 16, &Filter::any()).unwrap();
            let names: Vec<String> = bpf.programs().map(|(n, _)| n.to_string()).collect();
            for name in names {
                if let Ok(p) = <&mut KProbe>::try_from(bpf.program_mut(&name).unwrap()) {
                    p.load()
                        .unwrap_or_else(|e| panic!("{name} in mode {mode:?}: {e:?}"));
                }
            }
        }
    }
}
