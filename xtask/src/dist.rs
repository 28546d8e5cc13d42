//! `cargo xtask dist`: the release directory and tarball for a node with no toolchain: the
//! static tracer (the VM suite's own build, eBPF object embedded), man pages, completions,
//! the README, the licenses of everything linked in, and SHA256SUMS; one for x86_64 and one
//! cross-built for aarch64.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::{arch::Arch, guest_build, licenses, run_cmd, run_output, workspace_root};

pub struct Release {
    /// `conntrack-trace 0.1.0 (commit ..., eBPF object sha256 ...)`, as the binary says.
    pub version_line: String,
    /// `0.1.0`
    pub version: String,
    /// Full commit hash the binary reports.
    pub commit: String,
    /// The commit's time, RFC 3339 (the image's `created`).
    pub created: String,
    pub dir: PathBuf,
    pub tarball: PathBuf,
    /// The same release cross-built for aarch64: its directory and tarball.
    pub aarch64_dir: PathBuf,
    pub aarch64_tarball: PathBuf,
}

/// Where releases go: `target/dist`.
pub fn out_dir() -> PathBuf {
    workspace_root().join("target").join("dist")
}

pub fn build() -> Result<Release> {
    let bins = guest_build::build()?;
    let version_line = run_output(Command::new(&bins.tracer).arg("--version"))?
        .trim()
        .to_string();
    let (version, commit) = parse_version(&version_line)
        .with_context(|| format!("unexpected --version output {version_line:?}"))?;
    println!("dist: {version_line}");
    if let Some(changed) = uncommitted() {
        println!(
            "dist: WARNING: uncommitted changes ({changed}): the build may include them, but its \
             --version names {commit} alone"
        );
    }
    let mtime = commit_time(&commit);
    let created = run_output(
        Command::new("date")
            .args(["-u", "-d"])
            .arg(format!("@{mtime}"))
            .arg("+%Y-%m-%dT%H:%M:%SZ"),
    )?
    .trim()
    .to_string();
    let (dir, tarball) = package(Arch::X86_64, &bins.tracer, &bins.tracer, &version, mtime)?;
    let cross = guest_build::build_for(Arch::Aarch64)?;
    // Man pages and completions come from the CLI's definition, the same on every
    // architecture: the host's binary writes them (the aarch64 one cannot run here).
    let (aarch64_dir, aarch64_tarball) =
        package(Arch::Aarch64, &cross.tracer, &bins.tracer, &version, mtime)?;
    Ok(Release {
        version_line,
        version,
        commit,
        created,
        dir,
        tarball,
        aarch64_dir,
        aarch64_tarball,
    })
}

/// The release directory and tarball of `tracer` built for `arch`; `docs_from` is a binary
/// of the same release that runs here. Returns both paths.
fn package(
    arch: Arch,
    tracer: &Path,
    docs_from: &Path,
    version: &str,
    mtime: u64,
) -> Result<(PathBuf, PathBuf)> {
    let name = format!("conntrack-trace-{version}-{}-linux", arch.name());
    let dir = out_dir().join(&name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    fs::copy(tracer, dir.join("conntrack-trace"))
        .with_context(|| format!("cannot copy {}", tracer.display()))?;
    run_cmd(Command::new(docs_from).arg("__generate-docs").arg(&dir))?;
    fs::copy(workspace_root().join("README.md"), dir.join("README.md"))
        .context("cannot copy README.md")?;
    let third_party = licenses::render(arch)?;
    fs::write(dir.join("THIRD-PARTY-LICENSES.txt"), third_party)
        .context("cannot write THIRD-PARTY-LICENSES.txt")?;
    let sums = sha256sums(&dir)?;
    fs::write(dir.join("SHA256SUMS"), &sums).context("cannot write SHA256SUMS")?;

    let tarball = out_dir().join(format!("{name}.tar.gz"));
    // Reproducible: sorted names, no owner, the commit's time on every file.
    run_cmd(
        Command::new("tar")
            .current_dir(out_dir())
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--mtime=@{mtime}"))
            .args(["--use-compress-program=gzip -n -9", "-cf"])
            .arg(&tarball)
            .arg(&name),
    )?;
    let tar_sum = format!(
        "{}  {}\n",
        sha256_file(&tarball)?,
        tarball.file_name().expect("named").to_string_lossy()
    );
    fs::write(tarball.with_extension("gz.sha256"), tar_sum)?;
    println!(
        "dist: {} ({} bytes)",
        tarball.display(),
        fs::metadata(&tarball)?.len()
    );
    Ok((dir, tarball))
}

/// `conntrack-trace 0.1.0 (commit C, eBPF object sha256 H)` -> ("0.1.0", "C").
pub fn parse_version(line: &str) -> Option<(String, String)> {
    let rest = line.strip_prefix("conntrack-trace ")?;
    let (version, rest) = rest.split_once(" (commit ")?;
    let (commit, rest) = rest.split_once(", eBPF object sha256 ")?;
    let hash = rest.strip_suffix(')')?;
    (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (version.to_string(), commit.to_string()))
}

/// Tracked files that differ from HEAD (a few names), or None for a clean tree.
fn uncommitted() -> Option<String> {
    let out = Command::new("git")
        .current_dir(workspace_root())
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let files: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.get(3..).map(str::to_string))
        .collect();
    match files.len() {
        0 => None,
        n if n <= 3 => Some(files.join(", ")),
        n => Some(format!("{} and {} more", files[..3].join(", "), n - 3)),
    }
}

/// The commit's time, so the same commit gives the same tarball; 0 outside git.
fn commit_time(commit: &str) -> u64 {
    Command::new("git")
        .current_dir(workspace_root())
        .args(["show", "-s", "--format=%ct", commit])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(sha256_hex(&bytes))
}

/// `sha256sum -c`'s format for every file under `dir` (relative paths, sorted), except
/// SHA256SUMS itself.
pub fn sha256sums(dir: &Path) -> Result<String> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let mut out = String::new();
    for f in files {
        let rel = f.strip_prefix(dir).expect("under dir");
        if rel == Path::new("SHA256SUMS") {
            continue;
        }
        out.push_str(&format!("{}  {}\n", sha256_file(&f)?, rel.display()));
    }
    Ok(out)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = e?.path();
        if path.is_dir() {
            walk(&path, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// What a user on a node does with the tarball alone: unpack it somewhere else, check the
/// sums, and run the binary's `--version`, `check` and `stats`.
pub fn test(release: &Release) -> Result<()> {
    let scratch = out_dir().join("test-unpack");
    let dir = unpack_and_verify(&release.tarball, &scratch)?;
    // The bash completion completes a subcommand.
    let script = "source completions/conntrack-trace.bash; COMP_WORDS=(conntrack-trace st); \
                  COMP_CWORD=1; _conntrack__trace conntrack-trace st conntrack-trace; \
                  echo \"${COMPREPLY[*]}\"";
    let words = run_output(Command::new("bash").current_dir(&dir).args(["-c", script]))?;
    if words.trim() != "stats" {
        bail!(
            "bash completion of `conntrack-trace st` offers {:?}, not stats",
            words.trim()
        );
    }
    let tracer = dir.join("conntrack-trace");
    guest_build::ensure_static(&tracer, Arch::X86_64)?;
    ensure_ldd_finds_nothing(&tracer)?;
    // Nothing of the build may leak in: run with an empty environment from /.
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(&tracer)
            .env_clear()
            .current_dir("/")
            .args(args)
            .output()
            .with_context(|| format!("cannot start {}", tracer.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "`conntrack-trace {}` exited with {}:\n{stdout}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    };
    let version = run(&["--version"])?;
    if version.trim() != release.version_line {
        bail!(
            "the unpacked binary says {:?}, the build said {:?}",
            version.trim(),
            release.version_line
        );
    }
    // `check` exits 0 exactly when every program passes the verifier.
    run(&["check"])?;
    let stats = run(&["stats", "--json"])?;
    serde_json::from_str::<serde_json::Value>(stats.trim())
        .with_context(|| format!("`stats --json` from the tarball is not JSON: {stats}"))?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// The aarch64 tarball as far as this host can take it: unpacked elsewhere, every file the
/// x86_64 one has, its sums, and a static aarch64 binary (running it is the arm64 VM's part).
pub fn test_aarch64(release: &Release) -> Result<()> {
    let scratch = out_dir().join("test-unpack-aarch64");
    let dir = unpack_and_verify(&release.aarch64_tarball, &scratch)?;
    guest_build::ensure_static(&dir.join("conntrack-trace"), Arch::Aarch64)?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// Unpacks `tarball` into a fresh `scratch` and checks that it holds the release's files and
/// that they match its SHA256SUMS; returns the release directory.
fn unpack_and_verify(tarball: &Path, scratch: &Path) -> Result<PathBuf> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch)?;
    run_cmd(
        Command::new("tar")
            .arg("-xzf")
            .arg(tarball)
            .arg("-C")
            .arg(scratch),
    )?;
    let name = tarball
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .with_context(|| format!("{} is not a .tar.gz", tarball.display()))?;
    let dir = scratch.join(name);
    for want in [
        "conntrack-trace",
        "README.md",
        "THIRD-PARTY-LICENSES.txt",
        "SHA256SUMS",
        "man/conntrack-trace.1",
        "man/conntrack-trace-check.1",
        "man/conntrack-trace-stats.1",
        "man/conntrack-trace-replay.1",
        "completions/conntrack-trace.bash",
        "completions/_conntrack-trace",
        "completions/conntrack-trace.fish",
    ] {
        if !dir.join(want).is_file() {
            bail!("{} has no {want}", tarball.display());
        }
    }
    run_cmd(
        Command::new("sha256sum")
            .current_dir(&dir)
            .args(["--quiet", "-c", "SHA256SUMS"]),
    )?;
    Ok(dir)
}

/// The host's own `ldd`, as a user on a node would run it: a static-pie still counts as
/// "statically linked" there; only a plain static executable is "not a dynamic executable".
fn ensure_ldd_finds_nothing(bin: &Path) -> Result<()> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    if said.trim() != "not a dynamic executable" {
        bail!(
            "`ldd {}` says {:?}, not \"not a dynamic executable\"",
            bin.display(),
            said.trim()
        );
    }
    Ok(())
}

/// A dynamic executable names its loader in a PT_INTERP program header; a static (or
/// static-pie) one has none, so it needs no libc on the node.
pub fn ensure_no_interpreter(bin: &Path) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("cannot read {}", bin.display()))?;
    match has_interpreter(&elf) {
        Some(false) => Ok(()),
        Some(true) => bail!("{} is dynamically linked (it has PT_INTERP)", bin.display()),
        None => bail!("{} is not a 64-bit little-endian ELF file", bin.display()),
    }
}

fn has_interpreter(elf: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    let mut interp = false;
    for i in 0..phnum {
        interp |= u32_at(phoff.checked_add(i.checked_mul(phentsize)?)?)? == PT_INTERP;
    }
    Some(interp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_parses() {
        let h = "c22cd1d45e260eb14fcd2b4af8f01ef214e343fdefc2d7d8617d8744ab008a3f";
        let line = format!("conntrack-trace 0.1.0 (commit 856b691c, eBPF object sha256 {h})");
        assert_eq!(
            parse_version(&line),
            Some(("0.1.0".into(), "856b691c".into()))
        );
        // An object-less build (AYA_BUILD_SKIP) is not a release.
        let none = "conntrack-trace 0.1.0 (commit 856b691c, eBPF object sha256 none)";
        assert_eq!(parse_version(none), None);
        assert_eq!(parse_version("conntrack-trace 0.1.0"), None);
    }

    #[test]
    fn sums_are_sha256sum_format_and_skip_themselves() {
        let dir = std::env::temp_dir().join(format!("xtask-sums-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("man")).unwrap();
        fs::write(dir.join("a"), "abc").unwrap();
        fs::write(dir.join("man/b.1"), "").unwrap();
        fs::write(dir.join("SHA256SUMS"), "old").unwrap();
        let sums = sha256sums(&dir).unwrap();
        assert_eq!(
            sums,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  man/b.1\n"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn interpreter_is_found_in_program_headers() {
        // The test binary itself is dynamic (plain cargo test); a header-only static ELF is not.
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(has_interpreter(&me), Some(true));
        let mut elf = vec![0u8; 64 + 56];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert_eq!(has_interpreter(&elf), Some(false));
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(has_interpreter(&elf), Some(true));
        assert_eq!(has_interpreter(b"#!/bin/sh\n"), None);
    }
}
