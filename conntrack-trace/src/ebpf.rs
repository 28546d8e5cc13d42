//! The embedded eBPF object, and loading it with the plan's globals patched in.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{FExit, ProgramError},
};

use conntrack_trace_common::{filter::Filter, offsets::Offsets};

use crate::{
    btf::BtfFunc,
    plan::{FexitProbe, Plan},
};

/// The fexit program on `nf_conntrack_in`.
pub const FEXIT_PROGRAM: &str = "nf_conntrack_in_fexit";

/// Built by build.rs (aya-build) from conntrack-trace-ebpf.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack-trace"));

/// Creates the maps and relocates the programs; nothing is loaded into the verifier yet.
pub fn open(plan: &Plan, ring_bytes: u32, filter: &Filter) -> Result<Ebpf> {
    EbpfLoader::new()
        // No CO-RE relocations to apply (offsets come in as globals): skip aya's own parse of
        // the kernel BTF, which would double start-up time and memory.
        .btf(None)
        .override_global("OFFSETS", &plan.offsets, true)
        .override_global("LOG_ARGS", &plan.log_args, true)
        .override_global("MODE", &plan.mode.abi(), true)
        .override_global("FILTER", filter, true)
        .override_global("RESET_TP", &plan.reset_tp, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
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

/// Whether the fexit program loads here against `func`, before anything is planned (so with
/// the object's own globals but this kernel's offsets).
pub fn probe_fexit(func: BtfFunc, offsets: &Offsets) -> FexitProbe {
    let mut bpf = match EbpfLoader::new()
        .btf(None)
        .override_global("OFFSETS", offsets, true)
        .map_max_entries("EVENTS", 1 << 12)
        .load(OBJECT)
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
        Ok(()) => FexitProbe::Loads(func),
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
    use conntrack_trace_common::filter::Filter;

    use crate::{
        filter,
        plan::{Mode, Plan, Want},
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
            .program_mut("nf_conntrack_in_ret")
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
