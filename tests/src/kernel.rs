//! Which kernel the scenarios run on, and the documented conntrack semantics that differ
//! between versions.

use std::path::Path;

use anyhow::{Context, Result};

pub struct Kernel {
    pub release: String,
    /// `ct.kernel=` from /proc/cmdline, the matrix entry xtask booted (absent on a host).
    pub label: Option<String>,
    version: (u32, u32),
    /// Module BTF for nf_conntrack: without it (Debian 5.10) the tracer cannot decode the
    /// conntrack entry, so `ct` and `window` may be missing from its events.
    pub conntrack_btf: bool,
}

impl Kernel {
    pub fn detect() -> Result<Kernel> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_string();
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let mut next = || -> Result<u32> {
            parts
                .next()
                .context("version part")?
                .parse()
                .with_context(|| format!("kernel release {release:?}"))
        };
        let version = (next()?, next()?);
        let label = std::fs::read_to_string("/proc/cmdline")
            .unwrap_or_default()
            .split_whitespace()
            .find_map(|arg| arg.strip_prefix("ct.kernel=").map(str::to_string));
        let conntrack_btf = Path::new("/sys/kernel/btf/nf_conntrack").exists()
            || (Path::new("/sys/kernel/btf/vmlinux").exists()
                && !Path::new("/sys/module/nf_conntrack/initstate").exists());
        Ok(Kernel {
            release,
            label,
            version,
            conntrack_btf,
        })
    }

    /// Whether fexit can attach to `nf_conntrack_in`: its BTF is there (module BTF, or
    /// conntrack built into vmlinux), and the kernel has BPF trampolines for kernel functions,
    /// which arm64 has only since 6.4 ("arm64: ftrace: Add direct call support"; before, fexit
    /// loads and attaching it fails with ENOTSUPP). `--exact` then uses fexit instead of the
    /// kprobe pair.
    pub fn fexit_attaches(&self) -> bool {
        self.conntrack_btf && (cfg!(not(target_arch = "aarch64")) || self.version >= (6, 4))
    }

    /// 6.1 split window failures: SEQ/ACK *over* stay INVALID, SEQ/ACK *under* became
    /// IGNORE (logged, packet keeps its conntrack entry). Up to 6.0 all four were INVALID.
    pub fn window_under_is_ignored(&self) -> bool {
        self.version >= (6, 1)
    }

    /// 5.19 ("netfilter: conntrack: work around exceeded receive window"): a segment that
    /// starts past the receiver's window end but overshoots it by no more than the receiver's
    /// largest window, with an acceptable ACK, is logged as "N bytes more than expected" and
    /// let through (IGNORE). Before, it was "SEQ is over", INVALID.
    pub fn window_tolerates_overshoot(&self) -> bool {
        self.version >= (5, 19)
    }

    /// 6.1 added `nf_tcp_handle_invalid` ("netfilter: conntrack: reduce timeout when
    /// receiving out-of-window fin or rst"): an out-of-window FIN/RST answering the other
    /// side's out-of-window FIN/RST shortens the entry's timeout and logs a second line.
    pub fn logs_out_of_sync_note(&self) -> bool {
        self.version >= (6, 1)
    }

    /// Before 6.12 nfnetlink_queue resolved a clash itself when a packet was let go: it
    /// re-attached the packet to the entry confirmed meanwhile, so confirm saw no clash. 6.12
    /// removed that ("netfilter: nfnetlink_queue: remove old clash resolution logic") and
    /// leaves it to confirm, which drops a TCP packet and counts insert_failed. Stable trees
    /// may carry the removal; the matrix's 5.10.223, 6.1.176 and 6.1.192 do not.
    pub fn queue_reinject_resolves_clash(&self) -> bool {
        self.version < (6, 12)
    }

    /// 6.17 ("netfilter: conntrack: table full detailed log") names the namespace in the
    /// table-full warning when it is not init_net: "table full in netns N, dropping packet".
    pub fn table_full_log_names_netns(&self) -> bool {
        self.version >= (6, 17)
    }

    /// 6.7 ("bpf: Add missed value to kprobe perf link info") reports in `bpf_link_info`
    /// how many hits a kprobe or kretprobe link could not run its program for.
    pub fn reports_kprobe_misses(&self) -> bool {
        self.version >= (6, 7)
    }

    pub fn describe(&self) -> String {
        format!(
            "kernel {} ({}), nf_conntrack BTF {}",
            self.release,
            self.label.as_deref().unwrap_or("no ct.kernel label"),
            if self.conntrack_btf {
                "present"
            } else {
                "absent"
            }
        )
    }
}
