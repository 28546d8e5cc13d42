//! The guest's initramfs: busybox, the static tracer and scenario runner, iproute2/iptables/
//! nft/conntrack with their libraries (the host's, or the same packages for the guest's
//! architecture: `userland`), the kernel modules, and `/init`.

use std::{
    collections::BTreeMap,
    fs,
    io::BufWriter,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{
    cpio,
    guest_build::GuestBins,
    kernels::Kernel,
    kernels::Unpacked,
    modules,
    userland::{HOST_BUSYBOX, Userland},
};

const INIT: &str = include_str!("init.sh");

/// Dynamic tools, installed at these guest paths. `ip` and `tc` must be the real iproute2
/// ones: busybox's applets of those names lack what the scenarios use (netns, netem), so no
/// busybox link is made for them.
pub const TOOLS: &[&str] = &[
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/bin/ss",
    "/usr/sbin/conntrack",
    "/usr/sbin/nft",
    "/usr/sbin/xtables-legacy-multi",
    "/usr/sbin/xtables-nft-multi",
];

const CONFIG_FILES: &[&str] = &["/etc/protocols", "/etc/services", "/etc/ethertypes"];

enum Node {
    Dir,
    File { perm: u32, data: Vec<u8> },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Guest paths (absolute) to contents; a BTreeMap so parents are written before children.
#[derive(Default)]
struct Tree(BTreeMap<String, Node>);

impl Tree {
    fn add(&mut self, path: &str, node: Node) {
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| *p != Path::new("/")) {
            self.0.entry(p.display().to_string()).or_insert(Node::Dir);
            parent = p.parent();
        }
        self.0.insert(path.to_string(), node);
    }

    /// Copies a host file (following symlinks) to `guest`.
    fn copy(&mut self, host: &Path, guest: &str, perm: u32) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("cannot read {}", host.display()))?;
        self.add(guest, Node::File { perm, data });
        Ok(())
    }
}

/// Where the demo finds the arguments for its tracer, one per line.
const TRACER_ARGS: &str = "/etc/ct-tracer-args";

/// Builds the initramfs for `kernel` and returns its path.
pub fn build(
    kernel: &Kernel,
    unpacked: &Unpacked,
    bins: &GuestBins,
    userland: &Userland,
    tracer_args: &[String],
) -> Result<PathBuf> {
    let mut tree = Tree::default();
    for dir in [
        "/proc", "/sys", "/dev", "/run", "/root", "/etc", "/sbin", "/usr/bin", "/tmp",
    ] {
        tree.add(dir, Node::Dir);
    }
    tree.add("/var/run", Node::Symlink("../run".into()));
    // The kernel opens /dev/console for init's stdio before anything is mounted.
    tree.add("/dev/console", Node::CharDev { major: 5, minor: 1 });
    tree.add(
        "/init",
        Node::File {
            perm: 0o755,
            data: INIT.as_bytes().to_vec(),
        },
    );
    tree.add(
        "/etc/passwd",
        Node::File {
            perm: 0o644,
            data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        },
    );
    tree.add(
        "/etc/group",
        Node::File {
            perm: 0o644,
            data: b"root:x:0:\n".to_vec(),
        },
    );
    for file in CONFIG_FILES {
        if Path::new(file).exists() {
            tree.copy(Path::new(file), file, 0o644)?;
        }
    }

    if !tracer_args.is_empty() {
        tree.add(
            TRACER_ARGS,
            Node::File {
                perm: 0o644,
                data: tracer_args.join("\n").into_bytes(),
            },
        );
    }
    busybox(&mut tree, userland)?;
    tree.copy(&bins.tracer, "/bin/conntrack-trace", 0o755)?;
    tree.copy(&bins.scenarios, "/bin/ct-scenarios", 0o755)?;

    let mut elves: Vec<PathBuf> = Vec::new();
    for tool in TOOLS {
        let here = userland.tool(tool)?;
        tree.copy(&here, tool, 0o755)?;
        elves.push(here);
    }
    for (multi, names) in [
        (
            "xtables-legacy-multi",
            &[
                "iptables",
                "ip6tables",
                "iptables-legacy",
                "ip6tables-legacy",
            ][..],
        ),
        ("xtables-nft-multi", &["iptables-nft", "ip6tables-nft"][..]),
    ] {
        for name in names {
            for suffix in ["", "-save", "-restore"] {
                tree.add(
                    &format!("/usr/sbin/{name}{suffix}"),
                    Node::Symlink(multi.into()),
                );
            }
        }
    }
    for (guest, dir) in userland.plugin_dirs() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                let name = path.file_name().expect("a listed file has a name");
                tree.copy(&path, &format!("{guest}/{}", name.to_string_lossy()), 0o644)?;
                if path.extension().is_some_and(|e| e == "so") {
                    elves.push(path);
                }
            }
        }
    }
    for (lib, guest) in userland.libraries(&elves)? {
        tree.copy(&lib, &guest, 0o755)?;
    }
    if Path::new("/etc/iproute2").is_dir() {
        for entry in fs::read_dir("/etc/iproute2")? {
            let path = entry?.path();
            if path.is_file() {
                tree.copy(&path, &path.display().to_string(), 0o644)?;
            }
        }
    }

    let mods = modules::resolve(&unpacked.modules_dir, &unpacked.work.join("modules"))?;
    let mut order = String::new();
    for m in &mods {
        tree.copy(&m.ko, &format!("/lib/modules/{}.ko", m.name), 0o644)?;
        order.push_str(&m.name);
        order.push('\n');
    }
    tree.add(
        "/lib/modules/load-order",
        Node::File {
            perm: 0o644,
            data: order.into_bytes(),
        },
    );

    let path = unpacked.work.join("initrd.cpio");
    write(&tree, &path)?;
    let size = fs::metadata(&path)?.len();
    println!(
        "initramfs: {}: {} ({} modules, {:.1} MiB)",
        kernel.name,
        path.display(),
        mods.len(),
        size as f64 / (1 << 20) as f64
    );
    Ok(path)
}

/// busybox-static with a link per applet, except where a real tool takes the name. The
/// applets are the host's busybox's: another architecture's binary cannot run here, and
/// `userland` fetched it at the host's version, which Debian builds with one configuration
/// for every architecture.
fn busybox(tree: &mut Tree, userland: &Userland) -> Result<()> {
    let out = Command::new(HOST_BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("cannot run {HOST_BUSYBOX}"))?;
    if !out.status.success() {
        bail!("{HOST_BUSYBOX} --list failed: is busybox-static installed? run `cargo xtask setup`");
    }
    tree.copy(&userland.busybox()?, "/bin/busybox", 0o755)?;
    let real: Vec<&str> = TOOLS.iter().filter_map(|t| t.rsplit('/').next()).collect();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if !applet.is_empty() && applet != "busybox" && !real.contains(&applet) {
            tree.add(&format!("/bin/{applet}"), Node::Symlink("busybox".into()));
        }
    }
    Ok(())
}

fn write(tree: &Tree, path: &Path) -> Result<()> {
    let file =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    for (guest, node) in &tree.0 {
        let name = guest.trim_start_matches('/');
        match node {
            Node::Dir => w.dir(name, if guest == "/tmp" { 0o1777 } else { 0o755 })?,
            Node::File { perm, data } => w.file(name, *perm, data)?,
            Node::Symlink(target) => w.symlink(name, target)?,
            Node::CharDev { major, minor } => w.char_dev(name, 0o600, *major, *minor)?,
        }
    }
    w.finish()?;
    Ok(())
}
