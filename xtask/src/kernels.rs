//! The kernel matrix: exact Debian packages (pinned by version and SHA256), their download
//! into the cache, verification on every run, and unpacking.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{apt::PrivateApt, arch::Arch, run_cmd, setup};

pub struct Kernel {
    /// Test name: `vm::<name>::<scenario>`; unique across architectures.
    pub name: &'static str,
    /// What it runs on: the guest's QEMU, tracer build and tools follow it.
    pub arch: Arch,
    /// The packages that together hold the kernel image and its modules, the image first:
    /// one `linux-image` up to 6.12; from 7.x Debian splits it into `linux-binary` (the
    /// image), `linux-modules` and `linux-base` (`modules.builtin`).
    pub debs: &'static [Deb],
    /// The version every package in `debs` has.
    pub version: &'static str,
    /// Why this build is in the matrix.
    pub why: &'static str,
}

pub struct Deb {
    pub package: &'static str,
    /// From `apt-cache show` when the version was pinned.
    pub sha256: &'static str,
}

impl Kernel {
    /// The package holding the kernel image, which names the build.
    pub fn package(&self) -> &'static str {
        self.debs[0].package
    }
}

/// Which build has which `nf_tcp_log_invalid` was read from `conntrack-trace check` in the
/// guest (2026-11): variadic in 6.1.0-47 (6.1.170-3) and 6.1.0-50 (6.1.176-1); the struct form
/// in 6.1.0-53 (6.1.187-1) and later 6.1 builds, in every 6.12 build seen (6.12.107 on) and
/// in trixie-backports' 7.3.4. Each pick is the newest build of its kind, which stays in the archive longest.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1-variadic",
        arch: Arch::X86_64,
        debs: &[Deb {
            package: "linux-image-6.1.0-50-cloud-amd64-unsigned",
            sha256: "4f217f710203cdfedde21f836bc66a0a4d773752d7fe8e5e13f701f891788945",
        }],
        version: "6.1.176-1",
        why: "bookworm 6.1.176: nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, ...)",
    },
    Kernel {
        name: "6.1-struct",
        arch: Arch::X86_64,
        debs: &[Deb {
            package: "linux-image-6.1.0-56-cloud-amd64-unsigned",
            sha256: "7ff7fc8da85d313242c20698c6b34542aea447673c7c1975b0d38bd6005100b5",
        }],
        version: "6.1.192-2",
        why: "bookworm-security 6.1.192: nf_tcp_log_invalid(skb, ct, state, log)",
    },
    Kernel {
        name: "6.12",
        arch: Arch::X86_64,
        debs: &[Deb {
            package: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
            sha256: "670b2688bcf94c24693f7c7e1fc9776ff2e202ff15553a2614f79415d48a6607",
        }],
        version: "6.12.117-1~deb12u1",
        why: "bookworm-security 6.12.117: nf_tcp_log_invalid(skb, ct, state, log), tcp_send_reset with reason",
    },
    Kernel {
        name: "6.12-trixie",
        arch: Arch::X86_64,
        debs: &[Deb {
            package: "linux-image-6.12.118+deb13-cloud-amd64-unsigned",
            sha256: "6e5bf7a08ae170f62ab9da4f8ced023d243144583857a0e133e09a5164b2eb83",
        }],
        version: "6.12.118-1",
        why: "trixie-security 6.12.118, the current stable's kernel: modules under usr/lib/modules",
    },
    Kernel {
        name: "7.3",
        arch: Arch::X86_64,
        debs: &[
            Deb {
                package: "linux-binary-7.3.4+deb13-cloud-amd64",
                sha256: "c4fbc8e404958693b28825474c20742d70594d65ca58aea7be6a279c81eb6fa0",
            },
            Deb {
                package: "linux-modules-7.3.4+deb13-cloud-amd64",
                sha256: "359f04c363b7d3c5f9ce999ccb7351e00cc8eec0a30d6bc1cda37734987fc43d",
            },
            Deb {
                package: "linux-base-7.3.4+deb13-cloud-amd64",
                sha256: "e08baa43706ba6e8daff58029b039f46beecfb3b3750c6fa0d6d5ca508a46a43",
            },
        ],
        version: "7.3.4-1~bpo13+1",
        why: "trixie-backports 7.3.4, the newest Debian ships: split packages, table-full log names the netns",
    },
    Kernel {
        name: "5.10",
        arch: Arch::X86_64,
        debs: &[Deb {
            package: "linux-image-5.10.0-32-cloud-amd64-unsigned",
            sha256: "b1fb8d34c26105a2ba1271a3df868a9eea460657df98c77fd08822ef4908c9db",
        }],
        version: "5.10.223-1",
        why: "bullseye 5.10.223: variadic nf_ct_l4proto_log_invalid, no module BTF",
    },
    // arm64 (qemu-system-aarch64): bookworm's and trixie's kernels, the newest build of each
    // (2026-11), one image package each as on x86_64.
    Kernel {
        name: "6.1-struct-arm64",
        arch: Arch::Aarch64,
        debs: &[Deb {
            package: "linux-image-6.1.0-57-cloud-arm64-unsigned",
            sha256: "2e5f31fb28e0748e529a2cfad77a0352421571bbbfa7f902ec59a678ea02f377",
        }],
        version: "6.1.192-3",
        why: "bookworm 6.1.192 on arm64: nf_tcp_log_invalid(skb, ct, state, log), kprobe arguments per AAPCS64",
    },
    Kernel {
        name: "6.12-trixie-arm64",
        arch: Arch::Aarch64,
        debs: &[Deb {
            package: "linux-image-6.12.118+deb13-cloud-arm64-unsigned",
            sha256: "b67b3b110d20d72d07d47bb05a3772a08e9c88a658bb08b46ab91d16229d8ef4",
        }],
        version: "6.12.118-1",
        why: "trixie-security 6.12.118 on arm64, the current stable's kernel",
    },
];

/// The kernel `demo` and `run` boot by default.
pub const DEFAULT: &str = "6.12";

/// Possible values of `--kernel`, for clap: every architecture's, or one's.
pub fn names(arch: Option<Arch>) -> impl Iterator<Item = &'static str> {
    KERNELS
        .iter()
        .filter(move |k| arch.is_none_or(|a| k.arch == a))
        .map(|k| k.name)
}

/// The named kernels of `arch` in matrix order; all of them when `names` is empty.
pub fn select(arch: Arch, names: &[String]) -> Result<Vec<&'static Kernel>> {
    for name in names {
        match KERNELS.iter().find(|k| k.name == name.as_str()) {
            None => bail!(
                "unknown kernel '{name}'; known: {}",
                self::names(None).collect::<Vec<_>>().join(", ")
            ),
            Some(k) if k.arch != arch => bail!(
                "kernel '{name}' runs on {}: add --arch {}",
                k.arch.name(),
                clap::ValueEnum::to_possible_value(&k.arch)
                    .expect("every Arch has a value")
                    .get_name()
            ),
            Some(_) => {}
        }
    }
    Ok(KERNELS
        .iter()
        .filter(|k| k.arch == arch && (names.is_empty() || names.iter().any(|n| n == k.name)))
        .collect())
}

pub struct Unpacked {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` or, merged-/usr, `usr/lib/modules/<release>` where `dpkg -x`
    /// put the packages.
    pub modules_dir: PathBuf,
    /// Per-kernel scratch space (decompressed modules, the initramfs).
    pub work: PathBuf,
}

fn cache_dir(kernel: &Kernel) -> PathBuf {
    setup::cache_dir()
        .join("kernels")
        .join(format!("{}_{}", kernel.package(), kernel.version))
}

/// Deletes cached kernels the table no longer names (each takes 100-160 MB).
pub fn prune_cache() {
    let keep: Vec<PathBuf> = KERNELS.iter().map(cache_dir).collect();
    let Ok(entries) = fs::read_dir(setup::cache_dir().join("kernels")) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.is_dir() && !keep.contains(&path) {
            println!(
                "kernels: removing {}, which the kernel table no longer names",
                path.display()
            );
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Downloads (once) and verifies (every time) the kernel's packages, and unpacks them (once).
pub fn fetch(kernel: &Kernel) -> Result<Unpacked> {
    let dir = cache_dir(kernel);
    let mut debs = Vec::new();
    for d in kernel.debs {
        let deb = dir.join(format!("{}.deb", d.package));
        if deb.exists() && sha256(&deb)? == d.sha256 {
            println!(
                "kernels: {}: {} {} cached, sha256 ok",
                kernel.name, d.package, kernel.version
            );
        } else {
            println!(
                "kernels: {}: downloading {} {}",
                kernel.name, d.package, kernel.version
            );
            let downloaded = PrivateApt::new(kernel.arch)?.download(
                d.package,
                kernel.version,
                &dir.join("download"),
            )?;
            let got = sha256(&downloaded)?;
            if got != d.sha256 {
                bail!(
                    "{} has sha256 {got}, expected {}: refusing to use it",
                    downloaded.display(),
                    d.sha256
                );
            }
            fs::rename(&downloaded, &deb)
                .with_context(|| format!("cannot move the .deb to {}", deb.display()))?;
            let _ = fs::remove_dir_all(dir.join("download"));
        }
        debs.push(deb);
    }

    let root = dir.join("root");
    let marker = root.join(".unpacked-sha256");
    let sums: Vec<&str> = kernel.debs.iter().map(|d| d.sha256).collect();
    let sums = sums.join("\n");
    if fs::read_to_string(&marker).ok().as_deref() != Some(sums.as_str()) {
        let _ = fs::remove_dir_all(&root);
        for deb in &debs {
            run_cmd(Command::new("dpkg").arg("-x").arg(deb).arg(&root))?;
        }
        fs::write(&marker, &sums)?;
    }
    let (vmlinuz, modules_dir) =
        locate(&root).with_context(|| format!("unpacking {}", kernel.package()))?;
    // One work dir (decompressed modules, initrd) per xtask process: two runs of the same
    // kernel at once must not boot each other's half-written initramfs. Dirs of processes
    // that are gone are removed.
    for e in fs::read_dir(&dir)?.flatten() {
        let name = e.file_name();
        if let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("work-"))
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let _ = fs::remove_dir_all(dir.join("work"));
    let work = dir.join(format!("work-{}", std::process::id()));
    fs::create_dir_all(&work)?;
    Ok(Unpacked {
        vmlinuz,
        modules_dir,
        work,
    })
}

/// The kernel image and the modules directory in unpacked packages: `boot/vmlinuz-<release>`
/// (up to 6.12) or `usr/lib/modules/<release>/vmlinuz` (7.x's `linux-binary`); the modules
/// under `lib/modules/<release>` (bullseye, bookworm) or `usr/lib/modules/<release>`
/// (trixie's merged /usr).
fn locate(root: &Path) -> Result<(PathBuf, PathBuf)> {
    let dirs = ["lib/modules", "usr/lib/modules"];
    let releases: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| fs::read_dir(root.join(d)).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    let [modules_dir] = releases.as_slice() else {
        bail!(
            "expected one kernel release under {}, found {}",
            dirs.join(" or "),
            releases.len()
        );
    };
    let release = modules_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the modules directory's name is not UTF-8")?;
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules_dir.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| {
        format!(
            "no boot/vmlinuz-{release} nor vmlinuz in {}",
            modules_dir.display()
        )
    })?;
    Ok((vmlinuz, modules_dir.clone()))
}

pub fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("cannot run sha256sum")?;
    if !out.status.success() {
        bail!(
            "sha256sum {} failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both package layouts, and the errors of an unpacking that is neither.
    #[test]
    fn image_and_modules_are_found_in_both_layouts() {
        let base = std::env::temp_dir().join(format!("xtask-locate-{}", std::process::id()));
        let root = |name: &str, files: &[&str]| {
            let root = base.join(name);
            for f in files {
                let path = root.join(f);
                if f.ends_with('/') {
                    fs::create_dir_all(&path).unwrap();
                } else {
                    fs::create_dir_all(path.parent().unwrap()).unwrap();
                    fs::write(&path, b"").unwrap();
                }
            }
            root
        };
        let image = root(
            "image",
            &["boot/vmlinuz-6.12.1", "lib/modules/6.12.1/kernel/"],
        );
        assert_eq!(
            locate(&image).unwrap(),
            (
                image.join("boot/vmlinuz-6.12.1"),
                image.join("lib/modules/6.12.1")
            )
        );
        let split = root("split", &["usr/lib/modules/7.3.4/vmlinuz"]);
        assert_eq!(
            locate(&split).unwrap(),
            (
                split.join("usr/lib/modules/7.3.4/vmlinuz"),
                split.join("usr/lib/modules/7.3.4")
            )
        );
        let two = root("two", &["lib/modules/a/", "usr/lib/modules/b/"]);
        assert!(locate(&two).unwrap_err().to_string().contains("found 2"));
        let no_image = root("no-image", &["usr/lib/modules/7.3.4/"]);
        assert!(
            locate(&no_image)
                .unwrap_err()
                .to_string()
                .contains("vmlinuz")
        );
        let _ = fs::remove_dir_all(&base);
    }
}

#[cfg(test)]
mod selection {
    use super::*;

    /// Each architecture's run takes its own kernels; naming another's says which flag to add.
    #[test]
    fn kernels_are_selected_per_architecture() {
        let arm: Vec<&str> = select(Arch::Aarch64, &[])
            .unwrap()
            .iter()
            .map(|k| k.name)
            .collect();
        assert_eq!(arm, ["6.1-struct-arm64", "6.12-trixie-arm64"]);
        assert!(
            select(Arch::X86_64, &[])
                .unwrap()
                .iter()
                .all(|k| k.arch == Arch::X86_64)
        );
        let error = |arch, name: &str| match select(arch, &[name.to_string()]) {
            Ok(_) => panic!("{name} selected for {arch:?}"),
            Err(e) => e.to_string(),
        };
        let wrong = error(Arch::X86_64, "6.12-trixie-arm64");
        assert!(wrong.contains("add --arch arm64"), "{wrong}");
        let unknown = error(Arch::Aarch64, "4.19");
        assert!(unknown.contains("unknown kernel"), "{unknown}");
    }
}

#[cfg(test)]
mod readme {
    use super::*;

    /// README's table of tested kernels names exactly the matrix, each with its architecture
    /// and at its pinned version.
    #[test]
    fn readme_table_is_the_matrix() {
        let readme = fs::read_to_string(crate::workspace_root().join("README.md")).unwrap();
        let rows: Vec<Vec<String>> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| `--kernel` |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
            .collect();
        let listed: Vec<(String, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r[1].trim_matches('`').to_string(),
                    r[2].clone(),
                    r[3].clone(),
                )
            })
            .collect();
        let matrix: Vec<(String, String, String)> = KERNELS
            .iter()
            .map(|k| {
                (
                    k.name.to_string(),
                    k.arch.name().to_string(),
                    k.version.to_string(),
                )
            })
            .collect();
        assert_eq!(listed, matrix);
    }
}
