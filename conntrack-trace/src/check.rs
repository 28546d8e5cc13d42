//! `conntrack-trace check`: load every program into the running kernel without attaching,
//! report the verifier's verdict, and say what this kernel offers to attach to.

use std::{io::Write, path::Path};

use anyhow::Result;
use aya::programs::{FExit, KProbe, ProgramError, TracePoint};

use crate::{
    ebpf,
    plan::{self, FexitProbe, Plan, ProgramKind, Want},
    privs,
    symbols::Symbols,
};

/// Functions whose presence decides the attach plan, with what each gives.
const ATTACH_POINTS: &[(&str, &str)] = &[
    ("nf_conntrack_in", "the verdict for every packet"),
    (
        "tcp_in_window",
        "the TCP window check (inlined on most builds)",
    ),
    (
        "nf_tcp_log_invalid",
        "TCP window reasons with the kernel's bound (6.1+)",
    ),
    ("nf_ct_l4proto_log_invalid", "reasons for tracked packets"),
    (
        "nf_l4proto_log_invalid",
        "reasons for packets rejected before lookup",
    ),
    ("early_drop", "table-full drops"),
    ("nf_ct_resolve_clash", "insert clashes at confirm"),
];

pub struct ProgramReport {
    pub name: String,
    /// None: a kind of program the tracer does not use.
    pub kind: Option<ProgramKind>,
    pub outcome: Outcome,
}

pub enum Outcome {
    Verified {
        instructions: Option<u32>,
    },
    Rejected(String),
    /// Could not be submitted here for a reason that is not the verifier's (no fentry).
    NotLoadable(String),
}

pub fn run(out: &mut impl Write) -> Result<bool> {
    privs::check()?;
    let (plan, btf) = Plan::for_running_kernel(Want::Default)?;
    let syms = Symbols::from_proc(plan::KERNEL_FUNCTIONS)?;
    writeln!(out, "kernel {}", plan.release)?;
    writeln!(
        out,
        "BTF: nf_conntrack {}; conntrack entry fields {}",
        match &btf.conntrack_source {
            crate::btf::ConntrackBtf::BuiltIn => "built into vmlinux".to_string(),
            crate::btf::ConntrackBtf::Module(p) => format!("module BTF {}", p.display()),
            crate::btf::ConntrackBtf::NoModuleBtf => "is a module without BTF".to_string(),
        },
        if plan.offsets.has_ct() {
            "described (tuples, TCP state, window)"
        } else {
            "NOT described: events carry no ct/window"
        }
    )?;

    let kprobes = kprobes_available();
    writeln!(out, "\nattach points")?;
    writeln!(
        out,
        "  {:<28} {}",
        "kprobes",
        if kprobes {
            "available".into()
        } else {
            format!("UNAVAILABLE: {}", KPROBES_MISSING)
        }
    )?;
    let reports = load_all(
        &mut ebpf::open(
            &plan,
            1 << 16,
            &conntrack_trace_common::filter::Filter::any(),
        )?,
        &plan,
    )?;
    writeln!(
        out,
        "  {:<28} {}",
        "fexit on nf_conntrack_in",
        match &plan.fexit {
            FexitProbe::Loads(f) => format!(
                "loads (type id {} in BTF object {} {})",
                f.type_id, f.object_id, f.object
            ),
            FexitProbe::Unavailable(why) => format!("UNAVAILABLE: {why}"),
            FexitProbe::Rejected(_) => "REJECTED by the verifier (log below)".into(),
        }
    )?;
    for (name, what) in ATTACH_POINTS {
        let found = match syms.find(name) {
            Some(sym) => {
                let module = syms
                    .module_of(name)
                    .map(|m| format!(" [{m}]"))
                    .unwrap_or_default();
                let proto = btf
                    .func(name)
                    .map(|p| {
                        format!(
                            " ({}{})",
                            p.params.join(", "),
                            if p.variadic { ", ..." } else { "" }
                        )
                    })
                    .unwrap_or_else(|| " (no BTF prototype)".into());
                format!("{sym}{module}{proto}")
            }
            None => "absent".into(),
        };
        writeln!(out, "  {name:<28} {found}  -- {what}")?;
    }

    writeln!(out, "\nprograms (loaded, verified, not attached)")?;
    let mut all_ok = true;
    for r in &reports {
        let text = match &r.outcome {
            Outcome::Verified {
                instructions: Some(n),
            } => format!("verifier OK, {n} instructions"),
            Outcome::Verified { instructions: None } => "verifier OK".into(),
            Outcome::Rejected(log) => {
                all_ok = false;
                format!("REJECTED by the verifier:\n{log}")
            }
            Outcome::NotLoadable(why) => format!("not loadable here: {why}"),
        };
        let kind = r.kind.map_or("other", ProgramKind::as_str);
        writeln!(out, "  {:<30} {kind:<10} {text}", r.name)?;
    }

    writeln!(
        out,
        "\nattach plan for this kernel, default mode {} (window reasons from {:?}); {}",
        plan.mode.as_str(),
        plan.window,
        match plan.fexit {
            FexitProbe::Loads(_) => "--verdict-probe none drops the per-packet probe",
            _ => "--exact adds a kprobe pair on nf_conntrack_in",
        }
    )?;
    for a in &plan.attach {
        writeln!(
            out,
            "  {:<10} {:<30} -> {}",
            a.flavor.kind(),
            a.program,
            a.target
        )?;
    }
    for n in &plan.notes {
        writeln!(out, "  note: {n}")?;
    }
    if !kprobes {
        writeln!(
            out,
            "\nAttaching is impossible on this kernel: {KPROBES_MISSING}. The programs above \
             pass the verifier; run the tracer on a kernel with kprobes (any distribution \
             kernel), or see it work with `cargo xtask demo`, which boots one under QEMU."
        )?;
    }
    writeln!(
        out,
        "\n{}",
        if all_ok {
            "all programs passed the verifier"
        } else {
            "some programs were REJECTED"
        }
    )?;
    Ok(all_ok)
}

pub const KPROBES_MISSING: &str = "no kprobe PMU (/sys/bus/event_source/devices/kprobe) and no \
    kprobe_events in tracefs: the kernel was built without CONFIG_KPROBES";

pub fn kprobes_available() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
        || [
            "/sys/kernel/tracing/kprobe_events",
            "/sys/kernel/debug/tracing/kprobe_events",
        ]
        .iter()
        .any(|p| Path::new(p).exists())
}

/// Loads every program in the object (kprobes need no target to load; fexit needs the
/// function's BTF, which the plan's probe found, or the probe's reason why not).
fn load_all(bpf: &mut aya::Ebpf, plan: &Plan) -> Result<Vec<ProgramReport>> {
    let mut names: Vec<String> = bpf.programs().map(|(n, _)| n.to_string()).collect();
    names.sort();
    let mut reports = Vec::new();
    for name in names {
        let prog = bpf.program_mut(&name).expect("listed program");
        let (kind, result) = if let Ok(k) = <&mut KProbe>::try_from(&mut *prog) {
            let kind = match k.kind() {
                aya::programs::ProbeKind::Entry => ProgramKind::KProbe,
                _ => ProgramKind::KRetProbe,
            };
            (Some(kind), Ok(k.load()))
        } else if let Ok(t) = <&mut TracePoint>::try_from(&mut *prog) {
            (Some(ProgramKind::TracePoint), Ok(t.load()))
        } else if let Ok(f) = <&mut FExit>::try_from(&mut *prog) {
            let kind = Some(ProgramKind::FExit);
            match &plan.fexit {
                FexitProbe::Loads(func) => (kind, Ok(ebpf::load_fexit(f, *func))),
                FexitProbe::Unavailable(why) => (kind, Err(why.clone())),
                FexitProbe::Rejected(log) => {
                    reports.push(ProgramReport {
                        name,
                        kind,
                        outcome: Outcome::Rejected(log.clone()),
                    });
                    continue;
                }
            }
        } else {
            (None, Err("not a program kind the tracer uses".into()))
        };
        let outcome = match result {
            Err(why) => Outcome::NotLoadable(why),
            Ok(Ok(())) => Outcome::Verified {
                instructions: prog
                    .info()
                    .ok()
                    .and_then(|i| i.verified_instruction_count()),
            },
            Ok(Err(ProgramError::LoadError {
                io_error,
                verifier_log,
            })) => Outcome::Rejected(format!("{io_error}\n{verifier_log}")),
            Ok(Err(e)) => Outcome::Rejected(format!("{e:#}")),
        };
        reports.push(ProgramReport {
            name,
            kind,
            outcome,
        });
    }
    Ok(reports)
}
