//! A private apt configuration under our cache dir, one per architecture, so kernel packages
//! from every suite the matrix uses (and, for arm64, the guest's tools) can be downloaded
//! without touching the system's apt sources, lists or architectures.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{arch::Arch, run_cmd, setup};

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

pub struct PrivateApt {
    dir: PathBuf,
    arch: Arch,
}

impl PrivateApt {
    /// The configuration whose lists describe `arch`'s packages.
    pub fn new(arch: Arch) -> Result<Self> {
        // The host's keeps the directory it always had, so its lists stay valid.
        let dir = match arch {
            Arch::X86_64 => setup::cache_dir().join("apt"),
            Arch::Aarch64 => setup::cache_dir().join(format!("apt-{}", arch.debian())),
        };
        for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        if fs::read_to_string(&sources).ok().as_deref() != Some(SOURCES) {
            fs::write(&sources, SOURCES)
                .with_context(|| format!("cannot write {}", sources.display()))?;
        }
        // apt wants a dpkg status file; an empty one means "nothing installed", which is all
        // a download needs.
        let status = dir.join("status");
        if !status.exists() {
            fs::write(&status, "").with_context(|| format!("cannot write {}", status.display()))?;
        }
        Ok(Self { dir, arch })
    }

    fn command(&self, program: &str) -> Command {
        let d = |sub: &str| self.dir.join(sub).display().to_string();
        let mut cmd = Command::new(program);
        for opt in [
            format!("Dir::Etc::SourceList={}", d("sources.list")),
            format!("Dir::Etc::SourceParts={}", d("sources.list.d")),
            format!("Dir::State::Lists={}", d("lists")),
            format!("Dir::State::status={}", d("status")),
            format!("Dir::Cache={}", d("cache")),
            // Our dirs belong to the invoking user; apt's _apt sandbox user cannot write them.
            "APT::Sandbox::User=root".into(),
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            format!("APT::Architecture={}", self.arch.debian()),
            format!("APT::Architectures::={}", self.arch.debian()),
        ] {
            cmd.arg("-o").arg(opt);
        }
        cmd
    }

    /// Whether the private lists know `package` at exactly `version`.
    pub fn knows(&self, package: &str, version: &str) -> bool {
        self.command("apt-cache")
            .arg("show")
            .arg(format!("{package}={version}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn update(&self) -> Result<()> {
        println!(
            "apt: apt-get update for {} (private lists in {})",
            self.arch.debian(),
            self.dir.display()
        );
        run_cmd(self.command("apt-get").arg("-qq").arg("update"))
    }

    /// Every version of each of `packages` the lists know, each with the SHA256 of its .deb,
    /// in one apt-cache run (each run reads every list). Packages the lists do not know are
    /// absent.
    pub fn versions(&self, packages: &[&str]) -> Result<BTreeMap<String, Vec<(String, String)>>> {
        let out = self
            .command("apt-cache")
            .arg("show")
            .args(packages)
            .stderr(Stdio::null())
            .output()
            .context("cannot run apt-cache")?;
        Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Downloads `package=version` into `dir` and returns the .deb's path (apt checks it
    /// against the signed lists).
    pub fn download(&self, package: &str, version: &str, dir: &Path) -> Result<PathBuf> {
        if !self.knows(package, version) {
            self.update()?;
            if !self.knows(package, version) {
                bail!(
                    "{package} {version} is no longer in the Debian archive (bullseye, bookworm, \
                     trixie, their security suites and trixie-backports were searched); pick a current build and update the \
                     table in xtask/src/kernels.rs"
                );
            }
        }
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        run_cmd(
            self.command("apt-get")
                .current_dir(dir)
                .arg("-q")
                .arg("download")
                .arg(format!("{package}={version}")),
        )?;
        let deb = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
        Ok(deb)
    }
}

/// `apt-cache show`'s records: package to its versions, each with its .deb's SHA256.
fn parse_show(text: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut known: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for record in text.split("\n\n") {
        let field = |name: &str| {
            record
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                .map(str::to_string)
        };
        if let (Some(package), Some(version), Some(sum)) =
            (field("Package"), field("Version"), field("SHA256"))
        {
            known.entry(package).or_default().push((version, sum));
        }
    }
    known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_records_are_grouped_by_package() {
        let text = "Package: libcap2\nVersion: 1:2.66-4+deb12u3+b1\nSHA256: aa\nSHA256sum-like: x\n\n\
                    Package: libcap2\nVersion: 1:2.44-1\nSHA256: bb\n\n\
                    Package: runc\nVersion: 1.1.5+ds1-1+deb12u1\nMD5sum: cc\nSHA256: dd\n\n\
                    Package: nohash\nVersion: 1\n";
        let known = parse_show(text);
        assert_eq!(
            known["libcap2"],
            [
                ("1:2.66-4+deb12u3+b1".to_string(), "aa".to_string()),
                ("1:2.44-1".to_string(), "bb".to_string())
            ]
        );
        assert_eq!(
            known["runc"],
            [("1.1.5+ds1-1+deb12u1".to_string(), "dd".to_string())]
        );
        assert!(!known.contains_key("nohash"));
    }
}
