//! Empty programs on `nf_conntrack_in`, attached the way the tracer's verdict probes are:
//! what `bpf_stats` reports for a program that does nothing at that hook.
//!
//! `run_time_ns` brackets every run with two clock reads (and, for fexit, the trampoline's
//! enter/exit bookkeeping); under TCG that fixed part is most of a short program's time. An
//! empty program measures it, so the report can show what each verdict probe does above it.
//! Loaded with raw bpf(2)/perf_event_open(2): two instructions need no ELF object, and
//! keeping them out of the tracer's object keeps them off its attach plan.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};
use conntrack_trace::bpf_sys::bpf_fd;
use conntrack_trace::btf::{self, KernelBtf};

use super::progs::{self, Prog};

const FUNC: &str = "nf_conntrack_in";

/// A set of empty programs and what keeps them attached.
pub struct Floor {
    progs: Vec<(&'static str, OwnedFd)>,
    _attachments: Vec<OwnedFd>,
}

impl Floor {
    /// An empty fexit on `nf_conntrack_in`, against the BTF object that describes it.
    pub fn fexit() -> Result<Floor> {
        Self::fexit_with("empty fexit", c"empty_fexit", |_| Ok(EMPTY.to_vec()))
    }

    /// The least a verdict probe can do at fexit: load `skb->_nfct` (is the entry still
    /// there?) and nothing else.
    pub fn fexit_nfct() -> Result<Floor> {
        Self::fexit_with("fexit reading skb->_nfct", c"fexit_nfct", |btf| {
            let off = btf.offsets()?.0.skb_nfct;
            let off = i16::try_from(off).context("skb->_nfct offset")?;
            // r2 = ctx[0] (skb); r3 = *(u64 *)(r2 + off); then the empty program.
            let mut insns = vec![ldx_dw(2, 1, 0), ldx_dw(3, 2, off)];
            insns.extend(EMPTY);
            Ok(insns)
        })
    }

    fn fexit_with(
        name: &'static str,
        prog_name: &std::ffi::CStr,
        insns: impl Fn(&KernelBtf) -> Result<Vec<u64>>,
    ) -> Result<Floor> {
        let btf = KernelBtf::from_sys()?;
        let insns = insns(&btf)?;
        let (type_id, object) = btf
            .func_id(FUNC)
            .with_context(|| format!("{FUNC} is not in this kernel's BTF"))?;
        let object_id = btf::kernel_object_id(object)
            .context("list the kernel's BTF objects")?
            .with_context(|| format!("no kernel BTF object named {object}"))?;
        let object_fd = btf::BtfFunc {
            object,
            object_id,
            type_id,
        }
        .object_fd()
        .context("open the BTF object")?;
        let prog = load(Load {
            prog_type: BPF_PROG_TYPE_TRACING,
            expected_attach_type: BPF_TRACE_FEXIT,
            attach_btf_id: type_id,
            attach_btf_obj_fd: object_fd.as_raw_fd() as u32,
            ..Load::new(prog_name, &insns)
        })
        .with_context(|| format!("load the {name} program"))?;
        let mut attr = RawTpAttr {
            name: 0,
            prog_fd: prog.as_raw_fd() as u32,
            pad: 0,
        };
        let link = bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &mut attr)
            .with_context(|| format!("attach the {name}"))?;
        Ok(Floor {
            progs: vec![(name, prog)],
            _attachments: vec![link],
        })
    }

    /// An empty kprobe and an empty kretprobe on `nf_conntrack_in` (perf kprobe PMU events,
    /// as aya attaches its own).
    pub fn kprobe_pair() -> Result<Floor> {
        let pmu = kprobe_pmu()?;
        let mut floor = Floor {
            progs: Vec::new(),
            _attachments: Vec::new(),
        };
        for (name, prog_name, ret) in [
            ("empty kprobe", c"empty_kprobe", false),
            ("empty kretprobe", c"empty_kretprobe", true),
        ] {
            let prog = load(Load {
                prog_type: BPF_PROG_TYPE_KPROBE,
                ..Load::new(prog_name, &EMPTY)
            })
            .with_context(|| format!("load an {name} program"))?;
            let event = pmu
                .open(FUNC, ret)
                .with_context(|| format!("{name} on {FUNC}"))?;
            for (request, arg) in [
                (PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd() as libc::c_ulong),
                (PERF_EVENT_IOC_ENABLE, 0),
            ] {
                // SAFETY: both requests take an integer argument, not a pointer.
                if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } < 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("attach the {name}"));
                }
            }
            floor.progs.push((name, prog));
            floor._attachments.push(event);
        }
        Ok(floor)
    }

    /// Current totals of each program, by id, and each id's name.
    pub fn snapshot(&self) -> Result<(HashMap<u32, Prog>, HashMap<u32, String>)> {
        let (mut totals, mut names) = (HashMap::new(), HashMap::new());
        for (name, fd) in &self.progs {
            let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
            let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            let prog = progs::parse_fdinfo(&text).with_context(|| format!("{path}: no program"))?;
            names.insert(prog.id, name.to_string());
            totals.insert(prog.id, prog);
        }
        Ok((totals, names))
    }
}

// uapi constants (libc does not carry the bpf ones).
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_int = 17;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FEXIT: u32 = 25;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// `r0 = 0; exit`: the least a program can be (fexit must return 0; a kprobe returning 0
/// adds no perf sample).
const EMPTY: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];

/// `dst = *(u64 *)(src + off)` (BPF_LDX | BPF_MEM | BPF_DW).
fn ldx_dw(dst: u8, src: u8, off: i16) -> u64 {
    0x79 | u64::from(dst | (src << 4)) << 8 | u64::from(off as u16) << 16
}

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `attach_btf_obj_fd` (5.11+) and the field
/// after it, so no padding byte reaches the kernel (it rejects non-zero unknown tails).
#[repr(C)]
#[derive(Default)]
struct Load {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    core_relo_cnt: u32,
}

impl Load {
    /// `insns` must outlive the load call.
    fn new(name: &std::ffi::CStr, insns: &[u64]) -> Load {
        let mut prog_name = [0; 16];
        let bytes = name.to_bytes();
        prog_name[..bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
        Load {
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            prog_name,
            ..Default::default()
        }
    }
}

fn load(mut attr: Load) -> Result<OwnedFd> {
    Ok(bpf_fd(BPF_PROG_LOAD, &mut attr)?)
}

/// `union bpf_attr` for `BPF_RAW_TRACEPOINT_OPEN` (a tracing program's attach point is its
/// load-time BTF id, so no name).
#[repr(C)]
struct RawTpAttr {
    name: u64,
    prog_fd: u32,
    pad: u32,
}

/// `struct perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// `kprobe_func`: the function's name.
    config1: u64,
    /// `probe_offset`.
    config2: u64,
}

/// The kprobe PMU: its type and the config bit that makes a probe a return probe.
struct KprobePmu {
    type_: u32,
    retprobe_bit: u32,
}

fn kprobe_pmu() -> Result<KprobePmu> {
    let dir = "/sys/bus/event_source/devices/kprobe";
    let read = |f: &str| {
        std::fs::read_to_string(format!("{dir}/{f}")).with_context(|| format!("read {dir}/{f}"))
    };
    let type_ = read("type")?.trim().parse().context("kprobe PMU type")?;
    let format = read("format/retprobe")?;
    let Some(bit) = format
        .trim()
        .strip_prefix("config:")
        .and_then(|b| b.parse().ok())
    else {
        bail!("unexpected kprobe retprobe format {format:?}");
    };
    Ok(KprobePmu {
        type_,
        retprobe_bit: bit,
    })
}

impl KprobePmu {
    fn open(&self, func: &str, ret: bool) -> Result<OwnedFd> {
        let name = CString::new(func)?;
        let attr = PerfEventAttr {
            type_: self.type_,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: if ret { 1 << self.retprobe_bit } else { 0 },
            config1: name.as_ptr() as u64,
            ..Default::default()
        };
        // pid -1, cpu 0: a kprobe is global, its program runs on every CPU.
        // SAFETY: attr is a valid perf_event_attr of the size it states; name outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                &attr as *const PerfEventAttr,
                -1,
                0,
                -1,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: a new fd owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_llvm_emits_them() {
        // llvm-objdump: `b7 00 00 00 00 00 00 00  r0 = 0`, `95 00 ... exit`,
        // `79 12 00 00 00 00 00 00  r2 = *(u64 *)(r1 + 0)`, `79 23 c8 00 ... (r2 + 200)`.
        assert_eq!(EMPTY[0].to_le_bytes(), [0xb7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(EMPTY[1].to_le_bytes(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            ldx_dw(2, 1, 0).to_le_bytes(),
            [0x79, 0x12, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            ldx_dw(3, 2, 200).to_le_bytes(),
            [0x79, 0x23, 0xc8, 0, 0, 0, 0, 0]
        );
    }
}
