//! Where the guest's dynamic tools (iproute2, iptables, nft, conntrack), busybox and the
//! libraries they load come from: the host itself for an x86_64 guest; for an arm64 guest the
//! same Debian packages at the host's versions, downloaded for arm64 and unpacked under the
//! cache, so both architectures run the same tools.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{apt::PrivateApt, arch::Arch, kernels::sha256, modules::section, run_cmd, setup};

/// busybox-static's binary on the host.
pub const HOST_BUSYBOX: &str = "/usr/bin/busybox";

/// Directories a package puts programs in, newest layout first.
const BIN_DIRS: &[&str] = &["usr/sbin", "usr/bin", "sbin", "bin"];

pub enum Userland {
    /// The host's own files (an x86_64 guest on this x86_64 host).
    Host,
    /// Debian packages built for `arch`, unpacked under `root`.
    Packages { arch: Arch, root: PathBuf },
}

impl Userland {
    /// The guest's userland for `arch`: `tools` are the host paths of the dynamic programs
    /// (and libraries) the guest gets, which decide the packages to fetch for another
    /// architecture.
    pub fn for_arch(arch: Arch, tools: &[String]) -> Result<Userland> {
        match arch {
            Arch::X86_64 => Ok(Userland::Host),
            Arch::Aarch64 => fetch(arch, tools),
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            Userland::Host => Arch::X86_64,
            Userland::Packages { arch, .. } => *arch,
        }
    }

    fn triplet(&self) -> &'static str {
        self.arch().triplet()
    }

    /// The file to copy to the guest path `guest`, which is where its package puts it (across
    /// the /usr merge).
    pub fn file(&self, guest: &str) -> Result<PathBuf> {
        match self {
            Userland::Host => fs::canonicalize(guest)
                .with_context(|| format!("{guest} is missing: run `cargo xtask setup`")),
            Userland::Packages { root, .. } => spellings(guest)
                .iter()
                .find_map(|p| in_root(root, Path::new(&p[1..])))
                .with_context(|| format!("{guest} is not under {}", root.display())),
        }
    }

    /// The file to copy to the guest path `guest` of a tool.
    pub fn tool(&self, guest: &str) -> Result<PathBuf> {
        match self {
            Userland::Host => fs::canonicalize(guest)
                .with_context(|| format!("{guest} is missing: run `cargo xtask setup`")),
            Userland::Packages { root, .. } => {
                let name = Path::new(guest)
                    .file_name()
                    .context("a tool path names a file")?;
                BIN_DIRS
                    .iter()
                    .find_map(|d| in_root(root, &Path::new(d).join(name)))
                    .with_context(|| {
                        format!(
                            "{} is in none of {} under {}",
                            name.to_string_lossy(),
                            BIN_DIRS.join(", "),
                            root.display()
                        )
                    })
            }
        }
    }

    pub fn busybox(&self) -> Result<PathBuf> {
        match self {
            Userland::Host => Ok(PathBuf::from(HOST_BUSYBOX)),
            Userland::Packages { .. } => self.tool(HOST_BUSYBOX),
        }
    }

    /// Plugin directories the tools dlopen (so no dependency walk finds them): the guest
    /// path and the directory holding them here.
    pub fn plugin_dirs(&self) -> Vec<(String, PathBuf)> {
        ["xtables", "tc"]
            .iter()
            .map(|sub| {
                let guest = format!("/usr/lib/{}/{sub}", self.triplet());
                let here = match self {
                    Userland::Host => PathBuf::from(&guest),
                    Userland::Packages { root, .. } => root.join(&guest[1..]),
                };
                (guest, here)
            })
            .collect()
    }

    /// Every shared library (and the dynamic loader) `elves` load, directly or through
    /// another library: each file here and its path in the guest.
    pub fn libraries(&self, elves: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
        match self {
            Userland::Host => Ok(ldd(elves)?
                .into_iter()
                .map(|p| (PathBuf::from(&p), p))
                .collect()),
            Userland::Packages { root, arch } => needed_closure(root, *arch, elves),
        }
    }
}

/// The host's libraries as `ldd` lists them, at the path it lists, which is where the
/// guest's loader will look.
fn ldd(files: &[PathBuf]) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .args(files)
        .output()
        .context("cannot run ldd")?;
    if !out.status.success() {
        bail!(
            "ldd failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut libs: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        // Per-file headers ("/usr/sbin/ip:") are not indented; library lines are.
        .filter(|line| line.starts_with('\t'))
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vdso has no path.
            let before = line.split(" (").next()?.trim();
            let path = before.rsplit("=> ").next()?;
            path.starts_with('/').then(|| path.to_string())
        })
        .collect();
    libs.sort();
    libs.dedup();
    Ok(libs)
}

/// `ldd` cannot run another architecture's loader, so the walk reads each ELF file's
/// `DT_NEEDED` names and its interpreter itself and finds them in the unpacked packages.
/// Libraries go to `/lib/<triplet>`, a directory Debian's loader searches without a cache.
fn needed_closure(root: &Path, arch: Arch, elves: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let dirs = [
        format!("lib/{}", arch.triplet()),
        format!("usr/lib/{}", arch.triplet()),
    ];
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut todo: Vec<PathBuf> = elves.to_vec();
    while let Some(file) = todo.pop() {
        let elf = fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let (needed, interp) =
            dynamic(&elf).with_context(|| format!("reading {}", file.display()))?;
        let mut wanted = Vec::new();
        for name in needed {
            let here = dirs
                .iter()
                .find_map(|d| in_root(root, &Path::new(d).join(&name)))
                .with_context(|| {
                    format!(
                        "{} needs {name}, which is in none of {} under {}",
                        file.display(),
                        dirs.join(", "),
                        root.display()
                    )
                })?;
            wanted.push((format!("/lib/{}/{name}", arch.triplet()), here));
        }
        if let Some(guest) = interp {
            let here = spellings(&guest)
                .iter()
                .find_map(|p| in_root(root, Path::new(&p[1..])))
                .with_context(|| {
                    format!(
                        "{}'s interpreter {guest} is not under {}",
                        file.display(),
                        root.display()
                    )
                })?;
            wanted.push((guest, here));
        }
        for (guest, here) in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = found.entry(guest) {
                todo.push(here.clone());
                slot.insert(here);
            }
        }
    }
    Ok(found
        .into_iter()
        .map(|(guest, here)| (here, guest))
        .collect())
}

/// `DT_NEEDED` names and the interpreter (`.interp`) of a little-endian ELF64 file.
fn dynamic(elf: &[u8]) -> Result<(Vec<String>, Option<String>)> {
    const DT_NEEDED: u64 = 1;
    let cstr = |bytes: &[u8]| {
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[..end]).into_owned()
    };
    let interp = section(elf, ".interp").ok().map(cstr);
    let Ok(dynamic) = section(elf, ".dynamic") else {
        return Ok((Vec::new(), interp));
    };
    let strings = section(elf, ".dynstr")?;
    let mut needed = Vec::new();
    for entry in dynamic.chunks_exact(16) {
        let tag = u64::from_le_bytes(entry[..8].try_into()?);
        let val = u64::from_le_bytes(entry[8..].try_into()?);
        if tag == DT_NEEDED {
            let name = usize::try_from(val)
                .ok()
                .and_then(|v| strings.get(v..))
                .context("DT_NEEDED points outside .dynstr")?;
            needed.push(cstr(name));
        }
    }
    Ok((needed, interp))
}

/// `rel` under `root` as a regular file, following symlinks inside `root` (an absolute
/// target means `root`'s own, never the host's).
fn in_root(root: &Path, rel: &Path) -> Option<PathBuf> {
    let mut rel = rel.to_path_buf();
    for _ in 0..16 {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).ok()?;
        if meta.is_file() {
            return Some(path);
        }
        let target = fs::read_link(&path).ok()?;
        rel = match target.strip_prefix("/") {
            Ok(absolute) => absolute.to_path_buf(),
            Err(_) => rel.parent()?.join(target),
        };
    }
    None
}

/// A path and its other spelling across the /usr merge (`/bin/ip`, `/usr/bin/ip`): dpkg
/// knows a file by the one its package ships.
fn spellings(path: &str) -> [String; 2] {
    let other = match path.strip_prefix("/usr") {
        Some(rest) => rest.to_string(),
        None => format!("/usr{path}"),
    };
    [path.to_string(), other]
}

/// Downloads (once) and unpacks (once per package set) the arm64 builds of the packages the
/// host's guest files come from.
fn fetch(arch: Arch, tools: &[String]) -> Result<Userland> {
    let host = Userland::Host;
    let mut elves = Vec::new();
    for tool in tools {
        elves.push(host.file(tool)?);
    }
    for (_, dir) in host.plugin_dirs() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                elves.push(path);
            }
        }
    }
    let mut files: Vec<String> = elves.iter().map(|p| p.display().to_string()).collect();
    files.push(HOST_BUSYBOX.to_string());
    files.extend(host.libraries(&elves)?.into_iter().map(|(_, guest)| guest));
    let packages = host_packages(&files)?;

    let dir = setup::cache_dir().join("userland").join(arch.debian());
    let debs_dir = dir.join("debs");
    fs::create_dir_all(&debs_dir)
        .with_context(|| format!("cannot create {}", debs_dir.display()))?;
    let apt = PrivateApt::new(arch)?;
    let names: Vec<&str> = packages.keys().map(String::as_str).collect();
    let picks = |known: &BTreeMap<String, Vec<(String, String)>>| -> Vec<Option<(String, String)>> {
        packages
            .iter()
            .map(|(p, v)| matching_version(known.get(p).map_or(&[][..], Vec::as_slice), v))
            .collect()
    };
    let mut picked = picks(&apt.versions(&names)?);
    if picked.iter().any(Option::is_none) {
        apt.update()?;
        picked = picks(&apt.versions(&names)?);
    }
    let mut debs = Vec::new();
    for ((package, host_version), pick) in packages.iter().zip(picked) {
        let Some((version, sum)) = pick else {
            bail!(
                "{package} {host_version} (the host's) has no {} build in the Debian archive",
                arch.debian()
            );
        };
        let deb = debs_dir.join(format!("{package}_{version}.deb"));
        if !(deb.exists() && sha256(&deb)? == sum) {
            println!(
                "userland: downloading {package} {version} for {}",
                arch.debian()
            );
            let downloaded = apt.download(package, &version, &dir.join("download"))?;
            let got = sha256(&downloaded)?;
            if got != sum {
                bail!(
                    "{} has sha256 {got}, the archive lists {sum}: refusing to use it",
                    downloaded.display()
                );
            }
            fs::rename(&downloaded, &deb)
                .with_context(|| format!("cannot move the .deb to {}", deb.display()))?;
            let _ = fs::remove_dir_all(dir.join("download"));
        }
        debs.push(deb);
    }
    println!(
        "userland: {} packages for {}, at the host's versions: {}",
        debs.len(),
        arch.debian(),
        packages.keys().cloned().collect::<Vec<_>>().join(" ")
    );

    let root = dir.join("root");
    let marker = root.join(".unpacked");
    let names: Vec<String> = debs.iter().map(|d| d.display().to_string()).collect();
    let names = names.join("\n");
    if fs::read_to_string(&marker).ok().as_deref() != Some(names.as_str()) {
        let _ = fs::remove_dir_all(&root);
        for deb in &debs {
            run_cmd(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        fs::write(&marker, &names)?;
    }
    Ok(Userland::Packages { arch, root })
}

/// The host packages (name to installed version) that own `files`.
fn host_packages(files: &[String]) -> Result<BTreeMap<String, String>> {
    let spelled: Vec<[String; 2]> = files.iter().map(|f| spellings(f)).collect();
    // dpkg-query exits 1 when any path is unknown, which the other spelling of each is.
    let out = Command::new("dpkg-query")
        .arg("-S")
        .args(spelled.iter().flatten())
        .output()
        .context("cannot run dpkg-query")?;
    let mut owners: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6", "a, b: /path"; diversions say
        // "diversion by ...".
        if line.starts_with("diversion ") {
            continue;
        }
        let Some((pkgs, path)) = line.split_once(": ") else {
            continue;
        };
        for pkg in pkgs.split(", ") {
            let name = pkg.split(':').next().unwrap_or(pkg);
            owners
                .entry(path.to_string())
                .or_default()
                .insert(name.to_string());
        }
    }
    let mut packages = BTreeSet::new();
    for (file, both) in files.iter().zip(&spelled) {
        let owned: Vec<&String> = both
            .iter()
            .filter_map(|p| owners.get(p))
            .flatten()
            .collect();
        if owned.is_empty() {
            bail!("no installed Debian package owns {file} (dpkg-query -S)");
        }
        packages.extend(owned.into_iter().cloned());
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Architecture} ${Version}\\n"])
        .args(&packages)
        .output()
        .context("cannot run dpkg-query")?;
    let mut versions = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let [name, arch, version] = line.split(' ').collect::<Vec<_>>()[..]
            && (arch == Arch::X86_64.debian() || arch == "all")
        {
            versions.insert(name.to_string(), version.to_string());
        }
    }
    if let Some(missing) = packages.iter().find(|p| !versions.contains_key(*p)) {
        bail!("dpkg-query -W names no installed version of {missing}");
    }
    Ok(versions)
}

/// The archive's build of the host's `version`: the same version, or the same but for a
/// binary-only rebuild suffix (`+bN`), which each architecture numbers on its own; failing
/// both (the archive moved on since the host was updated), the newest Debian revision of the
/// same upstream version.
fn matching_version(available: &[(String, String)], version: &str) -> Option<(String, String)> {
    let source = |v: &str| -> String {
        match v.rsplit_once("+b") {
            Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                base.to_string()
            }
            _ => v.to_string(),
        }
    };
    let upstream = |v: &str| v.rsplit_once('-').map_or(v, |(u, _)| u).to_string();
    available
        .iter()
        .find(|(v, _)| v == version)
        .or_else(|| available.iter().find(|(v, _)| source(v) == source(version)))
        .or_else(|| {
            available
                .iter()
                .filter(|(v, _)| upstream(v) == upstream(version))
                .reduce(|a, b| if newer(&b.0, &a.0) { b } else { a })
        })
        .cloned()
}

/// Whether Debian version `a` sorts after `b`, by dpkg's own rules.
fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_rebuild_matches_its_source_version() {
        let available = [
            ("1:1.4.7-1+b1".to_string(), "a".to_string()),
            ("1:1.4.8-1".to_string(), "b".to_string()),
        ];
        assert_eq!(
            matching_version(&available, "1:1.4.7-1+b2").map(|(v, _)| v),
            Some("1:1.4.7-1+b1".into())
        );
        assert_eq!(
            matching_version(&available, "1:1.4.8-1").map(|(_, s)| s),
            Some("b".into())
        );
        assert_eq!(matching_version(&available, "1:1.4.6-1"), None);
        // A host older than the archive: the newest revision of its upstream version.
        let moved_on = [
            ("1:2.66-4+deb12u3+b1".to_string(), "new".to_string()),
            ("1:2.66-4".to_string(), "old".to_string()),
            ("1:2.75-10".to_string(), "other".to_string()),
        ];
        assert_eq!(
            matching_version(&moved_on, "1:2.66-4+deb12u2+b2").map(|(_, s)| s),
            Some("new".into())
        );
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = std::env::temp_dir().join(format!("xtask-in-root-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("usr/sbin")).unwrap();
        fs::write(root.join("bin/ip"), b"arm64").unwrap();
        // Absolute, as iproute2's compatibility link is: it must not reach the host's /bin/ip.
        std::os::unix::fs::symlink("/bin/ip", root.join("usr/sbin/ip")).unwrap();
        std::os::unix::fs::symlink("ip", root.join("bin/ip2")).unwrap();
        assert_eq!(
            in_root(&root, Path::new("usr/sbin/ip")),
            Some(root.join("bin/ip"))
        );
        assert_eq!(
            in_root(&root, Path::new("bin/ip2")),
            Some(root.join("bin/ip"))
        );
        assert_eq!(in_root(&root, Path::new("bin/none")), None);
        let _ = fs::remove_dir_all(&root);
    }

    /// The walk's ELF reading against a host binary whose libraries `ldd` also lists.
    #[test]
    fn needed_names_match_the_host_loader() {
        let elf = fs::read("/usr/bin/ls").unwrap();
        let (needed, interp) = dynamic(&elf).unwrap();
        assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
        assert_eq!(interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
        let listed = ldd(&[PathBuf::from("/usr/bin/ls")]).unwrap();
        for name in &needed {
            assert!(
                listed.iter().any(|l| l.ends_with(&format!("/{name}"))),
                "{name}"
            );
        }
    }
}
