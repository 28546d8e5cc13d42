//! Kernel modules for the guest: find them in the unpacked package, decompress them on the
//! host, and order them so each one's `depends=` (from its `.modinfo` section) loads first.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use object::{Object as _, ObjectSection as _};

/// What the scenarios need. `a|b`: the first of these that the kernel has (5.10 predates
/// nf_log_syslog); a leading `?`: load it when the kernel has it.
const WANTED: &[&str] = &[
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_log_syslog|nf_log_ipv4",
    "?nf_log_ipv6",
    "veth",
    // The cri-pod scenario's CNI bridge plugin.
    "bridge",
    "sch_netem",
    // iptables (legacy and nft flavours) as kube-proxy uses it.
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "iptable_mangle",
    "iptable_raw",
    "ip6_tables",
    "ip6table_filter",
    "ip6table_nat",
    "ip6table_mangle",
    "ip6table_raw",
    "xt_conntrack",
    "xt_state",
    "xt_nat",
    "xt_tcpudp",
    "xt_LOG",
    "xt_MASQUERADE",
    "xt_REDIRECT",
    "xt_mark",
    "xt_comment",
    "xt_multiport",
    "xt_addrtype",
    "xt_statistic",
    "xt_CT",
    // The nat-helper-seqadj scenario's FTP helper, which changes a payload's length.
    "nf_conntrack_ftp",
    "nf_nat_ftp",
    // The insert-failed scenario holds a packet between conntrack and confirm.
    "xt_NFQUEUE",
    "nfnetlink_queue",
    "ipt_REJECT",
    "ip6t_REJECT",
    // nftables; counter and objref are modules of their own before 6.x.
    "nf_tables",
    "?nft_counter",
    "?nft_objref",
    "nft_compat",
    "nft_ct",
    "nft_nat",
    "nft_chain_nat",
    "nft_log",
    "nft_masq",
    "nft_redir",
    "nft_reject_inet",
];

pub struct Module {
    pub name: String,
    /// The decompressed `.ko`.
    pub ko: PathBuf,
}

/// Modules to load, in load order. `modules_dir` is `lib/modules/<release>` of the unpacked
/// package; decompressed copies go to `scratch`.
pub fn resolve(modules_dir: &Path, scratch: &Path) -> Result<Vec<Module>> {
    let mut files = BTreeMap::new();
    index(&modules_dir.join("kernel"), &mut files)?;
    // modules.builtin lists what is compiled in: such a module needs no file.
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| module_name(Path::new(l)))
        .collect();
    fs::create_dir_all(scratch)?;
    let mut order = Orderer {
        files: &files,
        builtin: &builtin,
        scratch,
        done: BTreeSet::new(),
        order: Vec::new(),
    };
    for spec in WANTED {
        let (optional, spec) = match spec.strip_prefix('?') {
            Some(rest) => (true, rest),
            None => (false, *spec),
        };
        let choices: Vec<&str> = spec.split('|').collect();
        if let Some(name) = choices.iter().find(|c| files.contains_key(**c)) {
            order.visit(name, &mut Vec::new())?;
        } else if !optional && !choices.iter().any(|c| builtin.contains(*c)) {
            bail!(
                "this kernel has no module {spec} (neither a .ko under {} nor built in)",
                modules_dir.display()
            );
        }
    }
    Ok(order.order)
}

struct Orderer<'a> {
    files: &'a BTreeMap<String, PathBuf>,
    builtin: &'a BTreeSet<String>,
    scratch: &'a Path,
    done: BTreeSet<String>,
    order: Vec<Module>,
}

impl Orderer<'_> {
    /// Depth-first: a module goes after everything it depends on.
    fn visit(&mut self, name: &str, stack: &mut Vec<String>) -> Result<()> {
        if self.done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        let ko = decompress(&self.files[name], &self.scratch.join(format!("{name}.ko")))?;
        let deps = depends(&fs::read(&ko)?)
            .with_context(|| format!("reading .modinfo of {}", ko.display()))?;
        stack.push(name.to_string());
        for dep in deps {
            if self.files.contains_key(&dep) {
                self.visit(&dep, stack)?;
            } else if !self.builtin.contains(&dep) {
                bail!(
                    "module {name} depends on {dep}, which this kernel has neither as a file nor built in"
                );
            }
        }
        stack.pop();
        self.done.insert(name.to_string());
        self.order.push(Module {
            name: name.to_string(),
            ko,
        });
        Ok(())
    }
}

/// Module name as the kernel spells it: file stem without `.ko*`, `-` as `_`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = &file[..file.find(".ko")?];
    Some(stem.replace('-', "_"))
}

fn index(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index(&path, out)?;
        } else if let Some(name) = module_name(&path) {
            out.insert(name, path);
        }
    }
    Ok(())
}

/// Copies `src` (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`) to `dst` uncompressed, once: busybox
/// insmod in the guest takes plain `.ko` files only.
fn decompress(src: &Path, dst: &Path) -> Result<PathBuf> {
    if dst.exists() {
        return Ok(dst.to_path_buf());
    }
    let tool = match src.extension().and_then(|e| e.to_str()) {
        Some("ko") => {
            fs::copy(src, dst).with_context(|| format!("cannot copy {}", src.display()))?;
            return Ok(dst.to_path_buf());
        }
        Some("xz") => "xz",
        Some("zst") => "zstd",
        Some("gz") => "gzip",
        _ => bail!("unknown module compression: {}", src.display()),
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(src)
        .output()
        .with_context(|| format!("cannot run {tool}"))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // Write under a temporary name so an interrupted run never leaves a truncated module.
    let tmp = dst.with_extension("ko.tmp");
    fs::write(&tmp, &out.stdout)?;
    fs::rename(&tmp, dst)?;
    Ok(dst.to_path_buf())
}

/// The `depends=` list of a module, read from its ELF `.modinfo` section.
fn depends(elf: &[u8]) -> Result<Vec<String>> {
    let modinfo = section(elf, ".modinfo")?;
    Ok(modinfo
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default())
}

/// A section's bytes from an ELF file.
pub fn section<'a>(elf: &'a [u8], wanted: &str) -> Result<&'a [u8]> {
    let file = object::File::parse(elf).context("not an ELF file")?;
    let section = file
        .section_by_name(wanted)
        .with_context(|| format!("no {wanted} section"))?;
    section
        .data()
        .with_context(|| format!("reading the {wanted} section"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_follow_the_kernel_spelling() {
        assert_eq!(
            module_name(Path::new("a/b/nf_conntrack.ko.xz")).as_deref(),
            Some("nf_conntrack")
        );
        assert_eq!(
            module_name(Path::new("kernel/net/ipv4/netfilter/nf-log-ipv4.ko")).as_deref(),
            Some("nf_log_ipv4")
        );
        assert_eq!(module_name(Path::new("modules.dep")), None);
    }

    #[test]
    fn bad_elf_is_an_error_not_a_panic() {
        assert!(depends(b"").is_err());
        assert!(depends(b"\x7fELF\x02\x01\0\0").is_err());
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(depends(&elf).is_err());
    }
}
