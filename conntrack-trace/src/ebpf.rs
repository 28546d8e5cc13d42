//! The embedded eBPF object, and loading it with the plan's globals patched in.

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader};

use conntrack_trace_common::filter::Filter;

use crate::plan::Plan;

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
        .override_global("MODE", &plan.mode, true)
        .override_global("FILTER", filter, true)
        .override_global("RESET_TP", &plan.reset_tp, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
        .context("creating the eBPF maps")
}

#[cfg(test)]
mod tests {
    use aya::programs::KProbe;
    use conntrack_trace_common::{filter::Filter, mode};

    use crate::{filter, plan::Plan};

    /// `check` loads with an empty filter, which the verifier prunes as dead code; this loads
    /// the verdict program with every filter field set so the filter path is verified too.
    #[test]
    fn filter_path_passes_the_verifier() {
        let (plan, _) = Plan::for_running_kernel(true).unwrap();
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
        let (mut plan, _) = Plan::for_running_kernel(true).unwrap();
        for mode in [mode::EXACT, mode::FEXIT, mode::COLD] {
            plan.mode = mode;
            let mut bpf = super::open(&plan, 1 << 16, &Filter::any()).unwrap();
            let names: Vec<String> = bpf.programs().map(|(n, _)| n.to_string()).collect();
            for name in names {
                if let Ok(p) = <&mut KProbe>::try_from(bpf.program_mut(&name).unwrap()) {
                    p.load()
                        .unwrap_or_else(|e| panic!("{name} in mode {mode}: {e:?}"));
                }
            }
        }
    }
}
