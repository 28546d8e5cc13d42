//! The attach plan: the one place that knows how kernel versions differ. Computed once at
//! start-up from kallsyms and BTF; everything else just follows it.

use std::path::Path;

use anyhow::{Result, bail};
pub use conntrack_trace_common::Mode;
use conntrack_trace_common::{closed_set, offsets::Offsets, reason::LogArgs, reset::ResetTp};

use crate::{
    btf::{self, BtfFunc, ConntrackBtf, KernelBtf},
    ebpf,
    symbols::Symbols,
};

mod drops;
mod reason;
mod reset;
mod verdict;
mod window;

/// Every kernel function the plan may attach to or decide by.
pub const KERNEL_FUNCTIONS: &[&str] = &[
    "nf_conntrack_in",
    "tcp_in_window",
    "nf_tcp_log_invalid",
    "nf_ct_l4proto_log_invalid",
    "nf_l4proto_log_invalid",
    "early_drop",
    "nf_ct_resolve_clash",
    "tcp_v4_send_reset",
    "tcp_v6_send_reset",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    KProbe,
    KRetProbe,
    /// The function as its kernel BTF object describes it (vmlinux or nf_conntrack's).
    FExit(BtfFunc),
    /// A tracepoint; the target is "category/name".
    TracePoint,
}

closed_set! {
    /// The kinds of eBPF program the tracer attaches.
    pub enum ProgramKind {
        KProbe = "kprobe",
        KRetProbe = "kretprobe",
        FExit = "fexit",
        TracePoint = "tracepoint",
    }
}

impl Flavor {
    pub fn kind(self) -> ProgramKind {
        match self {
            Flavor::KProbe => ProgramKind::KProbe,
            Flavor::KRetProbe => ProgramKind::KRetProbe,
            Flavor::FExit(_) => ProgramKind::FExit,
            Flavor::TracePoint => ProgramKind::TracePoint,
        }
    }
}

closed_set! {
    /// The eBPF object's programs the plan may attach, by their names in the object.
    pub enum Program {
        NfConntrackIn = "nf_conntrack_in",
        NfConntrackInRet = "nf_conntrack_in_ret",
        NfConntrackInFexit = "nf_conntrack_in_fexit",
        NfTcpLogInvalidVariadic = "nf_tcp_log_invalid_variadic",
        NfTcpLogInvalidStruct = "nf_tcp_log_invalid_struct",
        NfCtL4protoLogInvalid = "nf_ct_l4proto_log_invalid",
        NfL4protoLogInvalid = "nf_l4proto_log_invalid",
        EarlyDrop = "early_drop",
        EarlyDropRet = "early_drop_ret",
        NfCtResolveClash = "nf_ct_resolve_clash",
        NfCtResolveClashRet = "nf_ct_resolve_clash_ret",
        TcpSendResetTp = "tcp_send_reset_tp",
        TcpSendResetKprobe = "tcp_send_reset_kprobe",
    }
}

/// One program attached to one kernel function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    pub program: Program,
    pub flavor: Flavor,
    /// Kernel symbol (with any `.isra.N` suffix kallsyms shows).
    pub target: String,
}

/// Where the TCP window verdict and its numbers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowSource {
    /// 6.1+: `nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, ...)`.
    LogVariadic,
    /// Debian 6.1.187+, 6.12: `nf_tcp_log_invalid(skb, ct, state, log)`.
    LogStruct,
    /// Before 6.1: the reason string goes through `nf_ct_l4proto_log_invalid("%s", ...)`; the
    /// bound is recomputed from the conntrack window snapshot.
    L4ProtoLog,
}

/// The mode the user asked for on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Want {
    /// fexit where it loads, else no per-packet probe. fexit's per-packet path reads the
    /// skb and nothing else, and costs what an empty program at that hook costs
    /// (BENCHMARKS.md); the kprobe pair is never the default.
    #[default]
    Default,
    /// Every verdict (`--exact`): fexit where it loads, else the kprobe pair.
    Exact,
    /// This verdict probe or none (`--verdict-probe`), failing where it cannot attach.
    Force(Mode),
}

/// Whether fexit on `nf_conntrack_in` loads on this kernel: probed once, before planning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FexitProbe {
    Loads(BtfFunc),
    /// This kernel cannot (no BTF for the function, no trampolines): why, for the user.
    Unavailable(String),
    /// The verifier refused the program: a bug of ours, with the verifier's log.
    Rejected(String),
}

impl FexitProbe {
    /// Loads the fexit program against `nf_conntrack_in` as this kernel's BTF describes it,
    /// with this kernel's struct offsets (the program reads `skb->_nfct` at one).
    pub fn run(btf: &KernelBtf, offsets: &Offsets) -> Self {
        let Some((type_id, object)) = btf.func_id("nf_conntrack_in") else {
            return Self::Unavailable(
                "BTF does not describe nf_conntrack_in (a module without module BTF)".into(),
            );
        };
        let object_id = match btf::kernel_object_id(object) {
            Ok(Some(id)) => id,
            Ok(None) => {
                return Self::Unavailable(format!("the kernel lists no BTF object {object}"));
            }
            Err(e) => {
                return Self::Unavailable(format!("listing the kernel's BTF objects: {e}"));
            }
        };
        let func = BtfFunc {
            object,
            object_id,
            type_id,
        };
        ebpf::probe_fexit(func, offsets)
    }

    /// Why fexit is not used, if it is not.
    pub fn why_not(&self) -> Option<&str> {
        match self {
            Self::Loads(_) => None,
            Self::Unavailable(why) => Some(why),
            Self::Rejected(_) => {
                Some("the verifier rejected it: `conntrack-trace check` shows why")
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub release: String,
    pub offsets: Offsets,
    pub log_args: LogArgs,
    pub reset_tp: ResetTp,
    pub mode: Mode,
    /// What loading fexit on `nf_conntrack_in` gave.
    pub fexit: FexitProbe,
    pub window: WindowSource,
    pub attach: Vec<Attach>,
    /// Where `struct bpf_link_info` has a kprobe link's `missed` count (6.7+): the hits the
    /// kernel could not run a kprobe or kretprobe for. None where it does not report them.
    pub kprobe_missed: Option<usize>,
    /// What is degraded on this kernel, in words a user can act on.
    pub notes: Vec<String>,
}

impl Plan {
    /// Reads the running kernel and plans for the mode the user asked for.
    pub fn for_running_kernel(want: Want) -> Result<(Self, KernelBtf)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string();
        let syms = Symbols::from_proc(KERNEL_FUNCTIONS)?;
        let btf = KernelBtf::from_sys()?;
        let tp = tracefs()
            .and_then(|t| std::fs::read_to_string(t.join("events/tcp/tcp_send_reset/format")).ok());
        let offsets = btf.offsets()?;
        let fexit = FexitProbe::run(&btf, &offsets.0);
        let plan = Self::new(&release, &syms, &btf, offsets, tp.as_deref(), fexit, want)?;
        Ok((plan, btf))
    }

    /// `reset_format` is the `tcp:tcp_send_reset` tracepoint's format file, if it exists.
    /// `offsets` are `btf.offsets()`, with their notes. Each hook family plans its own
    /// attachments and notes from these facts.
    pub fn new(
        release: &str,
        syms: &Symbols,
        btf: &KernelBtf,
        (offsets, offset_notes): (Offsets, Vec<String>),
        reset_format: Option<&str>,
        fexit: FexitProbe,
        want: Want,
    ) -> Result<Self> {
        let Some(ct_in) = syms.find("nf_conntrack_in") else {
            bail!("{}", not_loaded_message(release));
        };
        if let Some(p) = btf.func("nf_conntrack_in")
            && p.params.first().map(String::as_str) != Some("skb")
        {
            bail!(
                "nf_conntrack_in({}) is the pre-4.20 prototype; conntrack-trace supports 4.20+",
                p.params.join(", ")
            );
        }
        let kernel = Kernel {
            release,
            syms,
            btf,
            offsets: &offsets,
            reset_format,
        };
        let mut all = Part::default();
        all.notes.extend(offset_notes);
        if !offsets.has_ct() {
            all.note(format!(
                "no BTF for the conntrack structs ({}): events carry the packet, verdict and \
                 reason, but not the conntrack tuples, TCP state or window numbers",
                match &btf.conntrack_source {
                    ConntrackBtf::NoModuleBtf => "this kernel has no module BTF",
                    _ => "struct nf_conn not described",
                }
            ));
        }
        let (mode, part) = verdict::plan(ct_in, &fexit, want)?;
        all.extend(part);
        let (window, part) = window::plan(&kernel);
        all.extend(part);
        let (log_args, part) = reason::plan(&kernel);
        all.extend(part);
        all.extend(drops::plan(&kernel, mode));
        let (reset_tp, part) = reset::plan(&kernel);
        all.extend(part);
        let kprobe_missed = btf
            .offset_of("bpf_link_info", "perf_event.kprobe.missed")
            .ok()
            .map(|(at, _)| at as usize);
        let kprobes = all
            .attach
            .iter()
            .any(|a| matches!(a.flavor, Flavor::KProbe | Flavor::KRetProbe));
        if kprobe_missed.is_none() && kprobes {
            all.note(
                "this kernel does not report kprobe misses (6.7+ does): a hit it could not run \
                 a kprobe or kretprobe for (one already running on that CPU, no free return \
                 instance) is not counted",
            );
        }
        Ok(Self {
            release: release.to_string(),
            offsets,
            log_args,
            reset_tp,
            mode,
            fexit,
            window,
            attach: all.attach,
            kprobe_missed,
            notes: all.notes,
        })
    }
}

/// What the plan is made from: the running kernel's symbols, BTF and tracepoint format.
struct Kernel<'a> {
    release: &'a str,
    syms: &'a Symbols,
    btf: &'a KernelBtf,
    offsets: &'a Offsets,
    /// The `tcp:tcp_send_reset` tracepoint's format file, if it exists.
    reset_format: Option<&'a str>,
}

/// What one hook family attaches, and what is degraded about it on this kernel.
#[derive(Default)]
struct Part {
    attach: Vec<Attach>,
    notes: Vec<String>,
}

impl Part {
    fn add(&mut self, program: Program, flavor: Flavor, target: &str) {
        self.attach.push(Attach {
            program,
            flavor,
            target: target.to_string(),
        });
    }

    fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    fn extend(&mut self, other: Part) {
        self.attach.extend(other.attach);
        self.notes.extend(other.notes);
    }
}

/// Offsets of `skbaddr` and `skaddr` in a tracepoint format, and whether it has a `reason`
/// field (the 6.10 version that also fires without a socket).
fn tracepoint_offsets(format: &str) -> Option<(ResetTp, bool)> {
    let offset_of = |name: &str| {
        format
            .lines()
            .find(|l| l.contains(&format!(" {name};")))
            .and_then(|l| {
                l.split(';')
                    .find_map(|p| p.trim().strip_prefix("offset:"))
                    .and_then(|v| v.parse().ok())
            })
    };
    let tp = ResetTp {
        skb: offset_of("skbaddr")?,
        sk: offset_of("skaddr")?,
    };
    Some((tp, offset_of("reason").is_some()))
}

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing if it is not.
pub fn tracefs() -> Option<std::path::PathBuf> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").exists() {
            return Some(p.into());
        }
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| "/sys/kernel/tracing".into())
}

/// `release` is older than `major.minor` (unparseable releases count as new).
fn kernel_before(release: &str, major: u32, minor: u32) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => false,
    }
}

fn not_loaded_message(release: &str) -> String {
    let ko = Path::new("/lib/modules")
        .join(release)
        .join("kernel/net/netfilter");
    let shipped = std::fs::read_dir(&ko)
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("nf_conntrack.ko")
            })
        })
        .unwrap_or(false);
    if shipped {
        "nf_conntrack is not loaded, so no packet is being connection-tracked and there is \
         nothing to trace. It loads with the first conntrack/NAT rule (or `modprobe nf_conntrack`)."
            .into()
    } else {
        "this kernel has no nf_conntrack_in: connection tracking is neither built in nor loaded \
         as a module (CONFIG_NF_CONNTRACK), so there is nothing to trace"
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_tracepoint_format() {
        // 6.18's format (this host's); 6.1's lacks the reason field.
        let new = "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;\n";
        assert_eq!(
            tracepoint_offsets(new),
            Some((ResetTp { skb: 8, sk: 16 }, true))
        );
        let old = "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;\n";
        assert_eq!(
            tracepoint_offsets(old),
            Some((ResetTp { skb: 8, sk: 16 }, false))
        );
        assert_eq!(tracepoint_offsets("garbage"), None);
    }

    #[test]
    fn version_compare() {
        assert!(kernel_before("5.10.0-35-cloud-amd64", 5, 14));
        assert!(!kernel_before("6.1.0-31-cloud-amd64", 5, 14));
        assert!(!kernel_before("5.14.0", 5, 14));
        assert!(!kernel_before("garbage", 5, 14));
    }

    #[test]
    fn host_plan_is_complete() {
        let (plan, _) =
            Plan::for_running_kernel(Want::Exact).expect("plan for the test machine's kernel");
        let programs: Vec<_> = plan.attach.iter().map(|a| a.program).collect();
        assert!(
            programs
                .iter()
                .any(|p| p.as_str().starts_with("nf_conntrack_in")),
            "{programs:?}"
        );
        assert!(
            programs.contains(&Program::NfCtL4protoLogInvalid),
            "{programs:?}"
        );
    }

    /// Every program a plan may name exists in the object the CLI embeds.
    #[test]
    fn every_program_is_in_the_object() {
        let obj = aya_obj::Object::parse(crate::ebpf::OBJECT).unwrap();
        for p in Program::ALL {
            assert!(
                obj.programs.contains_key(p.as_str()),
                "the plan may name {p}, which the object lacks"
            );
        }
    }

    /// The mode for each answer of the fexit probe and each request.
    #[test]
    fn mode_per_probe_and_request() {
        let btf = KernelBtf::from_sys().unwrap();
        let syms = Symbols::parse(
            [
                "ffffffffc0000000 t nf_conntrack_in\t[nf_conntrack]",
                "ffffffffc0001000 t early_drop\t[nf_conntrack]",
            ],
            KERNEL_FUNCTIONS,
        );
        let f = BtfFunc {
            object: "nf_conntrack",
            object_id: 7,
            type_id: 90000,
        };
        let refused = FexitProbe::Unavailable("EPERM".into());
        let cases = [
            (FexitProbe::Loads(f), Want::Default, Mode::Fexit),
            (FexitProbe::Loads(f), Want::Exact, Mode::Fexit),
            (FexitProbe::Loads(f), Want::Force(Mode::Fexit), Mode::Fexit),
            (refused.clone(), Want::Default, Mode::Cold),
            (refused.clone(), Want::Exact, Mode::KprobePair),
            (
                FexitProbe::Loads(f),
                Want::Force(Mode::KprobePair),
                Mode::KprobePair,
            ),
            (FexitProbe::Loads(f), Want::Force(Mode::Cold), Mode::Cold),
            (
                refused.clone(),
                Want::Force(Mode::KprobePair),
                Mode::KprobePair,
            ),
        ];
        for (probe, want, mode) in cases {
            let offsets = btf.offsets().unwrap();
            let plan =
                Plan::new("6.12.0", &syms, &btf, offsets, None, probe.clone(), want).unwrap();
            assert_eq!(plan.mode, mode, "{probe:?} {want:?}");
            let on_ct_in: Vec<_> = plan
                .attach
                .iter()
                .filter(|a| a.target == "nf_conntrack_in")
                .map(|a| a.flavor)
                .collect();
            let expected: Vec<Flavor> = match mode {
                Mode::Fexit => vec![Flavor::FExit(f)],
                Mode::KprobePair => vec![Flavor::KProbe, Flavor::KRetProbe],
                Mode::Cold => vec![],
            };
            assert_eq!(on_ct_in, expected, "{probe:?} {want:?}");
            // Cold mode keeps early_drop's namespace; the others tag the packet's event.
            let ed = plan
                .attach
                .iter()
                .filter(|a| a.target == "early_drop")
                .count();
            assert_eq!(ed, if mode == Mode::Cold { 2 } else { 1 });
        }
        let err = Plan::new(
            "6.12.0",
            &syms,
            &btf,
            btf.offsets().unwrap(),
            None,
            refused,
            Want::Force(Mode::Fexit),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("EPERM"), "{err}");
    }

    #[test]
    fn missing_conntrack_is_explained() {
        let btf = KernelBtf::from_sys().unwrap();
        let syms = Symbols::parse(["ffffffff81000000 T tcp_v4_rcv"], KERNEL_FUNCTIONS);
        let err = Plan::new(
            "6.1.0-1-amd64",
            &syms,
            &btf,
            btf.offsets().unwrap(),
            None,
            FexitProbe::Unavailable(String::new()),
            Want::Default,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("nf_conntrack"), "{err}");
    }
}
