//! Kernel type information: struct offsets and function prototypes, read from
//! `/sys/kernel/btf/vmlinux` and the split module BTF `/sys/kernel/btf/nf_conntrack`.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Backend, Btf, BtfType as _, Type};
use conntrack_trace_common::{ct::TUPLE_SIZE, offsets::Offsets};

use crate::bpf_sys::{self, Object};

pub struct KernelBtf {
    /// vmlinux, with nf_conntrack's split BTF on top when the kernel has module BTF.
    btf: Btf,
    /// Where the conntrack types came from, for messages.
    pub conntrack_source: ConntrackBtf,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConntrackBtf {
    /// nf_conntrack is built into the kernel: its types are in vmlinux.
    BuiltIn,
    /// Loaded as a module with its own split BTF.
    Module(PathBuf),
    /// A module without its own BTF (Debian 5.10: CONFIG_DEBUG_INFO_BTF_MODULES unset). The
    /// structs may still be in vmlinux BTF (Debian 5.10's describes nf_conn): `offsets`
    /// says which fields could be found.
    NoModuleBtf,
}

/// sysfs can map vmlinux BTF only since 6.16: before, a copy in a memfd is mapped instead
/// (5-6 MiB, against ~40 MiB for the parsed form).
fn mapped_copy(path: &Path) -> btf_rs::Result<Btf> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: a NUL-terminated name; the returned fd is owned below.
    let fd = unsafe { libc::memfd_create(c"vmlinux-btf".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Streamed, not read whole first: a 5-6 MiB buffer would count in peak memory.
    std::io::copy(&mut std::fs::File::open(path)?, &mut file)?;
    // The mapping outlives the fd: it is closed when `file` drops.
    Btf::from_file_with_backend(format!("/proc/self/fd/{fd}"), Backend::Mmap)
}

/// A function the kernel knows by BTF: the id of the kernel BTF object describing it (vmlinux
/// or a module's) and its type id there. fentry/fexit programs name both at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BtfFunc {
    /// The object's name: "vmlinux" or the module's.
    pub object: &'static str,
    pub object_id: u32,
    pub type_id: u32,
}

impl BtfFunc {
    /// A file descriptor for the BTF object, as `BPF_PROG_LOAD` wants it.
    pub fn object_fd(&self) -> std::io::Result<OwnedFd> {
        bpf_sys::fd_by_id(Object::Btf, self.object_id)
    }
}

/// `struct bpf_btf_info` (5.11+ with name and kernel_btf).
#[repr(C)]
#[derive(Default)]
struct BtfInfo {
    btf: u64,
    btf_size: u32,
    id: u32,
    name: u64,
    name_len: u32,
    kernel_btf: u32,
}

/// The id of the kernel's BTF object called `name` ("vmlinux" or a module), from the kernel's
/// list of loaded BTF objects. None when the kernel has none by that name (before 5.11 module
/// BTF is never listed).
pub fn kernel_object_id(name: &str) -> std::io::Result<Option<u32>> {
    for id in bpf_sys::ids(Object::Btf)? {
        // An object can go away between the two calls (a program's BTF, an unloaded module).
        let Ok(fd) = bpf_sys::fd_by_id(Object::Btf, id) else {
            continue;
        };
        let mut buf = [0u8; 64];
        let mut info = BtfInfo {
            name: buf.as_mut_ptr() as u64,
            name_len: buf.len() as u32,
            ..Default::default()
        };
        if bpf_sys::info(fd.as_fd(), &mut info).is_err() || info.kernel_btf == 0 {
            continue;
        }
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if &buf[..len] == name.as_bytes() {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

impl KernelBtf {
    /// Reads the running kernel's BTF from sysfs.
    pub fn from_sys() -> Result<Self> {
        Self::from_dir(Path::new("/sys/kernel/btf"))
    }

    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vmlinux = dir.join("vmlinux");
        if !vmlinux.exists() {
            bail!(
                "{} does not exist: this kernel was built without CONFIG_DEBUG_INFO_BTF, and \
                 conntrack-trace needs BTF to find the kernel's struct layouts",
                vmlinux.display()
            );
        }
        // Mapped, not parsed up front: the full parse of vmlinux BTF costs ~40 MiB and seconds
        // under emulation, for the few dozen lookups the plan needs.
        let base = Btf::from_file_with_backend(&vmlinux, Backend::Mmap)
            .or_else(|_| mapped_copy(&vmlinux))
            .or_else(|_| Btf::from_file(&vmlinux))
            .with_context(|| format!("parsing {}", vmlinux.display()))?;
        let module = dir.join("nf_conntrack");
        if module.exists() {
            let btf = Btf::from_split_file(&module, &base)
                .with_context(|| format!("parsing {}", module.display()))?;
            return Ok(Self {
                btf,
                conntrack_source: ConntrackBtf::Module(module),
            });
        }
        let source = if base
            .resolve_ids_by_name("nf_conntrack_in")
            .is_ok_and(|v| !v.is_empty())
        {
            ConntrackBtf::BuiltIn
        } else {
            ConntrackBtf::NoModuleBtf
        };
        Ok(Self {
            btf: base,
            conntrack_source: source,
        })
    }

    /// The named struct (or union) with members, skipping forward declarations.
    fn composite(&self, name: &str) -> Result<btf_rs::Struct> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) | Type::Union(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("BTF has no struct {name}"))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<Type> {
        loop {
            let t = self.btf.resolve_type_by_id(id)?;
            match &t {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    id = t.as_btf_type().and_then(|b| b.get_type_id()).unwrap_or(0);
                }
                _ => return Ok(t),
            }
        }
    }

    fn size_of(&self, t: &Type) -> Result<usize> {
        Ok(match t {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Array(a) => {
                a.len() * self.size_of(&self.resolve(a.get_type_id().unwrap_or(0))?)?
            }
            other => bail!("no size for BTF {}", other.name()),
        })
    }

    /// Finds member `name` in `s`, looking through anonymous struct/union members. Returns the
    /// byte offset and the member's resolved type.
    fn member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.resolve(m.get_type_id().unwrap_or(0))?;
            if mname == name {
                if m.bitfield_size().is_some_and(|b| b != 0) || m.bit_offset() % 8 != 0 {
                    bail!("{name} is a bitfield");
                }
                return Ok(Some((m.bit_offset() / 8, ty)));
            }
            if mname.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = &ty
                && let Some((off, t)) = self.member(inner, name)?
            {
                return Ok(Some((m.bit_offset() / 8 + off, t)));
            }
        }
        Ok(None)
    }

    /// Byte offset of `path` ("a.b[1].c") inside `struct root`, and the size of what it names.
    pub fn offset_of(&self, root: &str, path: &str) -> Result<(u32, usize)> {
        let mut ty = Type::Struct(self.composite(root)?);
        let mut total = 0u32;
        for seg in path.split('.') {
            let (name, index) = match seg.split_once('[') {
                Some((n, i)) => (n, Some(i.trim_end_matches(']').parse::<u32>()?)),
                None => (seg, None),
            };
            let (Type::Struct(s) | Type::Union(s)) = &ty else {
                bail!("{root}.{path}: {name} is not inside a struct");
            };
            let (off, t) = self
                .member(s, name)?
                .ok_or_else(|| anyhow!("struct {root} has no member {path}"))?;
            total += off;
            ty = t;
            if let Some(i) = index {
                let Type::Array(a) = &ty else {
                    bail!("{root}.{path}: {name} is not an array")
                };
                let elem = self.resolve(a.get_type_id().unwrap_or(0))?;
                total += i * self.size_of(&elem)? as u32;
                ty = elem;
            }
        }
        Ok((total, self.size_of(&ty)?))
    }

    /// Byte offset only, with the expected size checked so a changed type is caught here
    /// rather than read wrongly in the kernel.
    fn field(&self, root: &str, path: &str, size: usize) -> Result<u32> {
        self.field_sized(root, path, &[size])
    }

    /// Like `field`, for a member whose width changed between kernels (read as its low bytes).
    fn field_sized(&self, root: &str, path: &str, sizes: &[usize]) -> Result<u32> {
        let (off, got) = self.offset_of(root, path)?;
        if !sizes.contains(&got) {
            bail!("{root}.{path} is {got} bytes, expected {sizes:?}");
        }
        Ok(off)
    }

    pub fn struct_size(&self, name: &str) -> Result<usize> {
        Ok(self.composite(name)?.size())
    }

    /// The value of `member` in `enum name`: ids like `enum nf_ct_ext_id`'s depend on the
    /// kernel's configuration.
    fn enum_value(&self, name: &str, member: &str) -> Result<u32> {
        let types = self.btf.resolve_types_by_name(name).unwrap_or_default();
        let e = types
            .into_iter()
            .find_map(|t| match t {
                Type::Enum(e) if !e.members.is_empty() => Some(e),
                _ => None,
            })
            .ok_or_else(|| anyhow!("BTF has no enum {name}"))?;
        e.members
            .iter()
            .find(|m| self.btf.resolve_name(*m).is_ok_and(|n| n == member))
            .map(|m| m.val())
            .ok_or_else(|| anyhow!("enum {name} has no {member}"))
    }

    /// Where the kernel side finds the seqadj extension of an entry (`nfct_seqadj`), for the
    /// ACK correction `tcp_in_window` makes. Its `struct nf_ct_ext` changed between
    /// versions and the extension's id depends on the kernel's configuration.
    fn seqadj_offsets(&self, o: &mut Offsets) -> Result<()> {
        let id = self.enum_value("nf_ct_ext_id", "NF_CT_EXT_SEQADJ")?;
        let (offsets, size) = self.offset_of("nf_ct_ext", "offset")?;
        if id as usize >= size {
            bail!("NF_CT_EXT_SEQADJ is {id}, past nf_ct_ext.offset[{size}]");
        }
        let pos = self.field("nf_ct_seqadj", "correction_pos", 4)?;
        let before = self.field("nf_ct_seqadj", "offset_before", 4)?;
        let after = self.field("nf_ct_seqadj", "offset_after", 4)?;
        let seq = self.offset_of("nf_conn_seqadj", "seq[0]")?.0;
        let dir_size = self.struct_size("nf_ct_seqadj")? as u32;
        o.ct_ext = self.field("nf_conn", "ext", 8)?;
        o.ext_seqadj = offsets + id;
        (o.seqadj_seq, o.seqadj_size) = (seq, dir_size);
        (o.seqadj_pos, o.seqadj_before, o.seqadj_after) = (pos, before, after);
        Ok(())
    }

    /// The BTF type id of function `name` (in the module's split BTF when it is there, whose
    /// ids continue vmlinux's), and the name of the kernel BTF object that holds it.
    pub fn func_id(&self, name: &str) -> Option<(u32, &'static str)> {
        let ids = self.btf.resolve_ids_by_name(name).ok()?;
        let id = ids
            .into_iter()
            .find(|&id| matches!(self.btf.resolve_type_by_id(id), Ok(Type::Func(_))))?;
        let in_module = self.btf.split().is_some_and(|m| id >= m.type_id_range().0);
        let object = if in_module { "nf_conntrack" } else { "vmlinux" };
        Some((id, object))
    }

    /// The prototype of a kernel function, if BTF describes it.
    pub fn func(&self, name: &str) -> Option<FuncProto> {
        let ids = self.btf.resolve_ids_by_name(name).ok()?;
        ids.into_iter().find_map(|id| {
            let Type::Func(f) = self.btf.resolve_type_by_id(id).ok()? else {
                return None;
            };
            let Type::FuncProto(p) = self.btf.resolve_type_by_id(f.get_type_id()?).ok()? else {
                return None;
            };
            let mut params = Vec::new();
            let mut variadic = false;
            for param in &p.parameters {
                if param.is_variadic() {
                    variadic = true;
                } else {
                    params.push(self.btf.resolve_name(param).unwrap_or_default());
                }
            }
            Some(FuncProto { params, variadic })
        })
    }

    /// All offsets the kernel programs read. Fields this kernel's BTF does not describe stay
    /// `UNKNOWN` and are listed in the returned notes; a missing core field is an error.
    pub fn offsets(&self) -> Result<(Offsets, Vec<String>)> {
        let mut o = Offsets::unknown();
        let mut notes = Vec::new();
        // Core: without these nothing can be traced.
        o.skb_nfct = self.field("sk_buff", "_nfct", 8)?;
        o.skb_head = self.field("sk_buff", "head", 8)?;
        o.skb_network_header = self.field("sk_buff", "network_header", 2)?;
        o.skb_len = self.field("sk_buff", "len", 4)?;
        o.skb_dev = self.field("sk_buff", "dev", 8)?;
        o.skb_data = self.field("sk_buff", "data", 8)?;
        o.skb_data_len = self.field("sk_buff", "data_len", 4)?;
        // `unsigned int hook` until 5.12, `u8` since: the low byte is the same on x86-64.
        o.state_hook = self.field_sized("nf_hook_state", "hook", &[1, 4])?;
        o.state_pf = self.field("nf_hook_state", "pf", 1)?;
        o.state_in = self.field("nf_hook_state", "in", 8)?;
        o.state_out = self.field("nf_hook_state", "out", 8)?;
        o.state_net = self.field("nf_hook_state", "net", 8)?;
        o.dev_ifindex = self.field("net_device", "ifindex", 4)?;
        o.dev_nd_net = self.field("net_device", "nd_net.net", 8)?;
        o.net_ns_inum = self.field("net", "ns.inum", 4)?;

        o.net_tcp_be_liberal = optional(
            &mut notes,
            "per-netns tcp_be_liberal",
            self.field_sized("net", "ct.nf_ct_proto.tcp.tcp_be_liberal", &[1, 4]),
        );
        o.ct_status = optional(
            &mut notes,
            "conntrack entry",
            self.field("nf_conn", "status", 8),
        );
        if o.ct_status != offsets_unknown() {
            let tuple = self.struct_size("nf_conntrack_tuple").unwrap_or(0);
            if tuple != TUPLE_SIZE {
                notes.push(format!(
                    "struct nf_conntrack_tuple is {tuple} bytes, expected {TUPLE_SIZE}"
                ));
                o.ct_status = offsets_unknown();
            } else {
                o.ct_tuple_orig = optional(
                    &mut notes,
                    "original tuple",
                    self.field("nf_conn", "tuplehash[0].tuple", TUPLE_SIZE),
                );
                o.ct_tuple_reply = optional(
                    &mut notes,
                    "reply tuple",
                    self.field("nf_conn", "tuplehash[1].tuple", TUPLE_SIZE),
                );
                o.ct_tcp_state = optional(
                    &mut notes,
                    "TCP state",
                    self.field("nf_conn", "proto.tcp.state", 1),
                );
                o.ct_net = optional(
                    &mut notes,
                    "entry's namespace",
                    self.field("nf_conn", "ct_net.net", 8),
                );
                o.ct_tcp_seen = optional(
                    &mut notes,
                    "TCP window",
                    self.offset_of("nf_conn", "proto.tcp.seen[0]").map(|x| x.0),
                );
                o.tcp_seen_size = optional(
                    &mut notes,
                    "TCP window",
                    self.struct_size("ip_ct_tcp_state").map(|s| s as u32),
                );
                o.tcp_td_end = optional(
                    &mut notes,
                    "td_end",
                    self.field("ip_ct_tcp_state", "td_end", 4),
                );
                o.tcp_td_maxend = optional(
                    &mut notes,
                    "td_maxend",
                    self.field("ip_ct_tcp_state", "td_maxend", 4),
                );
                o.tcp_td_maxwin = optional(
                    &mut notes,
                    "td_maxwin",
                    self.field("ip_ct_tcp_state", "td_maxwin", 4),
                );
                o.tcp_td_maxack = optional(
                    &mut notes,
                    "td_maxack",
                    self.field("ip_ct_tcp_state", "td_maxack", 4),
                );
                o.tcp_td_scale = optional(
                    &mut notes,
                    "td_scale",
                    self.field("ip_ct_tcp_state", "td_scale", 1),
                );
                o.tcp_flags = optional(
                    &mut notes,
                    "window flags",
                    self.field("ip_ct_tcp_state", "flags", 1),
                );
                // Left UNKNOWN where BTF lacks any of it: the ACK checks are then explained
                // without the NAT helpers' sequence adjustment. No plan note: nothing on
                // the node could supply it.
                if let Err(e) = self.seqadj_offsets(&mut o) {
                    log::debug!("seqadj extension: {e:#}");
                }
            }
        }
        if self.composite("nf_tcp_invalid_log").is_ok() {
            o.log_type = optional(
                &mut notes,
                "nf_tcp_invalid_log.type",
                self.offset_of("nf_tcp_invalid_log", "type").map(|x| x.0),
            );
            o.log_value = optional(
                &mut notes,
                "nf_tcp_invalid_log.value",
                self.field("nf_tcp_invalid_log", "value", 4),
            );
        }
        o.task_nr_migrations = optional(
            &mut notes,
            "task migrations (the kprobe pair cannot tell a call that changed CPU)",
            self.field("task_struct", "se.nr_migrations", 8),
        );
        Ok((o, notes))
    }
}

/// An offset that is fine to lack: UNKNOWN, with a note saying what that costs.
fn optional(notes: &mut Vec<String>, what: &str, r: Result<u32>) -> u32 {
    r.unwrap_or_else(|e| {
        notes.push(format!("{what}: {e:#}"));
        offsets_unknown()
    })
}

fn offsets_unknown() -> u32 {
    conntrack_trace_common::offsets::UNKNOWN
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuncProto {
    /// Parameter names, without the trailing `...`.
    pub params: Vec<String>,
    pub variadic: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's own BTF: these tests check the lookup against a real kernel, not a fixture.
    fn host() -> KernelBtf {
        KernelBtf::from_sys().expect("the test machine's kernel has BTF")
    }

    #[test]
    fn core_offsets_resolve_on_host_kernel() {
        let k = host();
        let (o, _) = k.offsets().unwrap();
        // _nfct sits between the dst/sk fields and len in every sk_buff layout since 4.20.
        assert!(o.skb_nfct > 0 && o.skb_nfct < o.skb_len, "{o:?}");
        assert!(
            o.skb_network_header < 256 && o.skb_head > o.skb_len,
            "{o:?}"
        );
        assert_eq!(o.state_hook, 0, "nf_hook_state.hook is its first member");
        assert_ne!(o.net_ns_inum, offsets_unknown());
    }

    #[test]
    fn conntrack_offsets_are_consistent_where_described() {
        let k = host();
        let (o, notes) = k.offsets().unwrap();
        assert!(o.has_ct(), "{notes:?}");
        // tuplehash[1] follows tuplehash[0] by one nf_conntrack_tuple_hash.
        let hash = k.struct_size("nf_conntrack_tuple_hash").unwrap() as u32;
        assert_eq!(o.ct_tuple_reply - o.ct_tuple_orig, hash);
        assert_eq!(
            o.tcp_seen_size, 20,
            "ip_ct_tcp_state: four u32, two u8, padded to 4"
        );
        assert_eq!(
            (
                o.tcp_td_end,
                o.tcp_td_maxend,
                o.tcp_td_maxwin,
                o.tcp_td_maxack
            ),
            (0, 4, 8, 12)
        );
        // struct nf_ct_seqadj { u32 correction_pos; s32 offset_before; s32 offset_after; },
        // one per direction, found through the extension area's offset table.
        assert_eq!(
            (
                o.seqadj_pos,
                o.seqadj_before,
                o.seqadj_after,
                o.seqadj_seq,
                o.seqadj_size
            ),
            (0, 4, 8, 0, 12),
            "{notes:?}"
        );
        assert_ne!(o.ct_ext, offsets_unknown());
        let (table, len) = k.offset_of("nf_ct_ext", "offset").unwrap();
        assert!(
            o.ext_seqadj > table && o.ext_seqadj < table + len as u32,
            "{o:?}"
        );
    }

    #[test]
    fn prototypes_and_missing_things() {
        let k = host();
        let p = k.func("nf_conntrack_in").expect("nf_conntrack_in in BTF");
        assert_eq!(p.params, ["skb", "state"]);
        assert!(!p.variadic);
        assert!(k.func("no_such_function_in_any_kernel").is_none());
        assert!(k.offset_of("sk_buff", "no_such_member").is_err());
        assert!(k.offset_of("no_such_struct", "x").is_err());
    }

    /// The memfd copy kernels before 6.16 need describes the same types.
    #[test]
    fn mapped_copy_reads_the_same_btf() {
        let copy = mapped_copy(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let direct = Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        assert_eq!(
            copy.resolve_ids_by_name("sk_buff").unwrap(),
            direct.resolve_ids_by_name("sk_buff").unwrap()
        );
    }

    #[test]
    fn missing_btf_is_a_clear_error() {
        let dir = std::env::temp_dir().join("conntrack-trace-no-btf");
        std::fs::create_dir_all(&dir).unwrap();
        let err = KernelBtf::from_dir(&dir).err().unwrap().to_string();
        assert!(err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
