//! The kernel's own counts of the tracer's program runs it skipped: `recursion_misses` per
//! program, and the hits each kprobe and kretprobe link could not handle (`missed`).

use std::os::fd::AsFd as _;

use aya::{Ebpf, programs::Program};

use crate::bpf_sys::{self, Object};

/// `struct bpf_link_info` up to the perf-event kprobe's `cookie` (6.9); the kernel fills what
/// it has of it. `missed` is read at the offset the running kernel's BTF gives.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    /// The union, 8-aligned after the three ids: zero in, so `func_name`/`name_len` are
    /// null and the kernel copies no name.
    rest: [u64; 8],
}

/// `BPF_LINK_TYPE_PERF_EVENT`: how kprobes attach since 5.15.
const LINK_TYPE_PERF_EVENT: u32 = 7;

/// What the tracer attached, to read its misses from.
pub struct Misses {
    /// Our kprobe and kretprobe links, by id, when this kernel reports their misses.
    links: Vec<u32>,
    /// Which word of `LinkInfo::rest` is `missed`; None where the kernel does not report it.
    word: Option<usize>,
}

impl Misses {
    /// Finds the links of the kprobe programs in `bpf`, once they are attached.
    pub fn find(bpf: &Ebpf, missed_at: Option<usize>) -> Misses {
        // The union starts at byte 16, after three u32 ids and 8-byte alignment; a layout
        // past what is asked for, or unaligned, is one this does not know and is not read.
        let word = missed_at
            .filter(|&at| at >= 16 && at % 8 == 0 && (at - 16) / 8 < 8)
            .map(|at| (at - 16) / 8);
        let mut links = Vec::new();
        if word.is_some() {
            let ours: Vec<u32> = bpf
                .programs()
                .filter(|(_, p)| matches!(p, Program::KProbe(_)))
                .filter_map(|(_, p)| p.info().ok())
                .map(|i| i.id())
                .collect();
            for id in bpf_sys::ids(Object::Link).unwrap_or_default() {
                if let Some(info) = link_info(id)
                    && info.type_ == LINK_TYPE_PERF_EVENT
                    && ours.contains(&info.prog_id)
                {
                    links.push(id);
                }
            }
        }
        Misses { links, word }
    }

    /// Hits of our kprobes and kretprobes the kernel did not run them for, summed: a kprobe
    /// that fired while another ran on that CPU, a return with no free instance to catch
    /// it (`maxactive`). None where the kernel does not report them.
    pub fn kprobe(&self) -> Option<u64> {
        let word = self.word?;
        Some(
            self.links
                .iter()
                .filter_map(|&id| link_info(id))
                .map(|info| info.rest[word])
                .sum(),
        )
    }
}

fn link_info(id: u32) -> Option<LinkInfo> {
    let fd = bpf_sys::fd_by_id(Object::Link, id).ok()?;
    let mut info = LinkInfo::default();
    bpf_sys::info(fd.as_fd(), &mut info).ok()?;
    Some(info)
}

/// Runs of our programs the kernel skipped because a BPF program was already running on
/// that CPU: `recursion_misses` in each program's fdinfo (5.12+; absent before, then 0).
pub fn recursion(bpf: &Ebpf) -> u64 {
    bpf.programs()
        .filter_map(|(_, p)| p.fd().ok())
        .filter_map(program_recursion_misses)
        .sum()
}

fn program_recursion_misses(fd: &aya::programs::ProgramFd) -> Option<u64> {
    use std::os::fd::AsRawFd as _;
    let raw = fd.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use aya::programs::KProbe;
    use conntrack_trace_common::filter::Filter;

    use crate::{
        ebpf,
        plan::{Plan, Program, Want},
    };

    /// 6.7+ (this host): `missed` is where the uapi header puts it: after type, id and
    /// prog_id (16 bytes with the union's alignment), perf_event's type and padding (8),
    /// and the kprobe's func_name, name_len, offset and addr (24).
    #[test]
    fn kprobe_missed_is_found_in_btf() {
        let (plan, _) = Plan::for_running_kernel(Want::Default).unwrap();
        assert_eq!(plan.kprobe_missed, Some(48));
    }

    /// The kernel's skip counter is found in a loaded program's fdinfo (5.12+; this host).
    #[test]
    fn recursion_misses_are_read_from_fdinfo() {
        let (plan, _) = Plan::for_running_kernel(Want::Exact).unwrap();
        let mut bpf = ebpf::open(&plan, 1 << 16, &Filter::any()).unwrap();
        let early_drop = Program::EarlyDrop.as_str();
        let p: &mut KProbe = bpf.program_mut(early_drop).unwrap().try_into().unwrap();
        p.load().unwrap();
        assert_eq!(super::program_recursion_misses(p.fd().unwrap()), Some(0));
        assert_eq!(super::recursion(&bpf), 0);
    }
}
