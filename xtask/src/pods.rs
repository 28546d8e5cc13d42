//! What the `cri-pod` scenario needs in the guest to run pods with a real containerd:
//! Debian's containerd (with its CRI plugin, `ctr` and the runc v2 shim), runc and the CNI
//! plugins, from the host's packages (`cargo xtask setup`), and a pause image made here, since
//! no registry is reachable: an OCI image of busybox-static sleeping. About 100 MiB, so it is
//! a second cpio archive appended to the initramfs (the kernel unpacks archives laid end to
//! end) only when that scenario runs, not for every boot.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufWriter, Write as _},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::{arch::Arch, cpio, dist::sha256_hex, run_cmd, userland::Userland};

/// The scenario that needs them (tests/src/pods.rs).
pub const SCENARIO: &str = "cri-pod";

/// Guest paths of the files, where `arch`'s packages put them (the host's, for x86_64).
pub fn files(arch: Arch) -> Vec<String> {
    [
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/ctr",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
    ]
    .into_iter()
    .map(str::to_string)
    // runc's one library beyond libc (which the base archive has).
    .chain([format!("/usr/lib/{}/libseccomp.so.2", arch.triplet())])
    .collect()
}

/// Where the guest finds the pause image (tests/src/pods.rs imports it with `ctr`).
const PAUSE_ARCHIVE: &str = "/var/lib/ct-pods/pause.tar";
/// The name it is imported under, which containerd's `sandbox_image` names.
const PAUSE_NAME: &str = "docker.io/ct/pause:1";

/// Whether a run of `scenarios` (empty: all) needs the pod userland.
pub fn wanted(scenarios: &[String]) -> bool {
    scenarios.is_empty() || scenarios.iter().any(|s| s == SCENARIO)
}

/// Appends the pod userland, from `userland` (the guest's architecture), to the initramfs at
/// `initrd`, in `work`.
pub fn append(initrd: &Path, work: &Path, userland: &Userland) -> Result<()> {
    let pause = pause_image(work, userland)?;
    let mut tree: Vec<(String, Vec<u8>)> = Vec::new();
    for f in files(userland.arch()) {
        let here = userland.file(&f)?;
        tree.push((f, fs::read(&here)?));
    }
    tree.push((PAUSE_ARCHIVE.into(), pause));
    let before = fs::metadata(initrd)?.len();
    let file = fs::OpenOptions::new()
        .append(true)
        .open(initrd)
        .with_context(|| format!("cannot open {}", initrd.display()))?;
    let mut w = cpio::Writer::new(BufWriter::new(file));
    // Parents first: a path sorts after its ancestors.
    let dirs: BTreeSet<String> = tree
        .iter()
        .flat_map(|(path, _)| Path::new(path).ancestors().skip(1))
        .filter(|p| *p != Path::new("/"))
        .map(|p| p.display().to_string())
        .collect();
    for d in &dirs {
        w.dir(d.trim_start_matches('/'), 0o755)?;
    }
    for (path, data) in &tree {
        let perm = if path.ends_with(".tar") { 0o644 } else { 0o755 };
        w.file(path.trim_start_matches('/'), perm, data)?;
    }
    w.finish()?.flush()?;
    let after = fs::metadata(initrd)?.len();
    println!(
        "initramfs: + containerd, runc, CNI plugins and a pause image for {SCENARIO} ({:.1} MiB)",
        (after - before) as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// An OCI image layout in one tar: one uncompressed layer holding busybox-static, run as
/// `busybox sleep` (a sandbox's only job is to hold its namespaces).
fn pause_image(work: &Path, userland: &Userland) -> Result<Vec<u8>> {
    let dir = work.join("pause-image");
    let _ = fs::remove_dir_all(&dir);
    let root = dir.join("rootfs");
    let blobs = dir.join("layout/blobs/sha256");
    fs::create_dir_all(&root)?;
    fs::create_dir_all(&blobs)?;
    fs::copy(userland.busybox()?, root.join("busybox"))
        .context("busybox-static is missing: run `cargo xtask setup`")?;
    let layer_tar = dir.join("layer.tar");
    run_cmd(
        Command::new("tar")
            .current_dir(&root)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg("--mtime=@0")
            .arg("-cf")
            .arg(&layer_tar)
            .arg("busybox"),
    )?;
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes)?;
        Ok((format!("sha256:{hex}"), bytes.len()))
    };
    let (layer, layer_size) = put(&fs::read(&layer_tar)?)?;
    let config = json!({
        "architecture": userland.arch().debian(),
        "os": "linux",
        "config": {"Entrypoint": ["/busybox", "sleep", "2147483647"]},
        // An uncompressed layer's diff id is its digest.
        "rootfs": {"type": "layers", "diff_ids": [layer]},
    });
    let (config, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest,
            "size": manifest_size,
            "platform": {"architecture": userland.arch().debian(), "os": "linux"},
            // containerd's importer names the image after this annotation.
            "annotations": {"io.containerd.image.name": PAUSE_NAME, "org.opencontainers.image.ref.name": "1"},
        }],
    });
    let layout = dir.join("layout");
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = dir.join("pause.tar");
    run_cmd(
        Command::new("tar")
            .current_dir(&layout)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg("--mtime=@0")
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    let bytes = fs::read(&archive)?;
    if bytes.is_empty() {
        bail!("{} is empty", archive.display());
    }
    Ok(bytes)
}
