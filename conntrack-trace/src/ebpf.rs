//! The embedded eBPF object, and loading it with the plan's globals patched in.

use anyhow::{Context as _, Result};
use aya::{Ebpf, EbpfLoader};

use conntrack_trace_common::filter::Filter;

use crate::plan::Plan;

/// Built by build.rs (aya-build) from conntrack-trace-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/conntrack-trace"));

/// Creates the maps and relocates the programs; nothing is loaded into the verifier yet.
pub fn open(plan: &Plan, ring_bytes: u32, filter: &Filter) -> Result<Ebpf> {
    let lazy = u8::from(plan.uses_fexit());
    EbpfLoader::new()
        .override_global("OFFSETS", &plan.offsets, true)
        .override_global("LOG_ARGS", &plan.log_args, true)
        .override_global("LAZY_FRAMES", &lazy, true)
        .override_global("FILTER", filter, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(OBJECT)
        .context("creating the eBPF maps")
}
