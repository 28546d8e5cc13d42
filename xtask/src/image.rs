//! `cargo xtask image`: a multi-arch OCI image (FROM scratch: the static tracer alone, no
//! shell) for linux/amd64 and linux/arm64, written as an OCI image layout directly (per
//! architecture a gzip'd tar layer, config and manifest JSON; an image index listing both
//! manifests by platform; each a sha256-named blob) and packed into one tar, the
//! `oci-archive:` that skopeo reads. A runtime pulling the index takes its node's manifest.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{
    arch::Arch,
    dist::{self, Release, sha256_file, sha256_hex},
    run_cmd,
};

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Where the tracer sits in the image, and so the entrypoint.
pub const ENTRYPOINT: &str = "/conntrack-trace";
/// The architectures the image holds, each from its release directory.
pub const ARCHES: [Arch; 2] = [Arch::X86_64, Arch::Aarch64];

/// The OCI platform's architecture (Go's GOARCH), as Kubernetes' `kubernetes.io/arch` label.
pub fn oci_arch(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "amd64",
        Arch::Aarch64 => "arm64",
    }
}

pub struct Image {
    /// The OCI layout packed as one tar (`oci-archive:` transport).
    pub archive: PathBuf,
}

pub fn build(release: &Release) -> Result<Image> {
    let name = format!("conntrack-trace-{}-oci", release.version);
    let layout = dist::out_dir().join(&name);
    let _ = fs::remove_dir_all(&layout);
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).with_context(|| format!("cannot create {}", blobs.display()))?;

    let mut manifests = Vec::new();
    for arch in ARCHES {
        let dir = match arch {
            Arch::X86_64 => &release.dir,
            Arch::Aarch64 => &release.aarch64_dir,
        };
        let manifest = arch_manifest(release, arch, &dir.join("conntrack-trace"), &blobs)?;
        manifests.push(json!({
            "mediaType": MANIFEST,
            "digest": manifest.digest,
            "size": manifest.size,
            "platform": {"architecture": oci_arch(arch), "os": "linux"},
        }));
    }
    let list = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": manifests,
        "annotations": labels(release),
    });
    let list = put_blob(&blobs, &serde_json::to_vec(&list)?)?;
    // The layout's own index names one image, the multi-arch one (a reader given no name
    // takes the only entry; skopeo refuses a layout with several).
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": INDEX,
            "digest": list.digest,
            "size": list.size,
            "annotations": {"org.opencontainers.image.ref.name": release.version},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    let archive = dist::out_dir().join(format!("{name}.tar"));
    run_cmd(
        Command::new("tar")
            .current_dir(&layout)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg("--mtime=@0")
            .arg("-cf")
            .arg(&archive)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    println!(
        "image: {} (OCI layout, linux/amd64 and linux/arm64), {} (push both with `skopeo copy --all oci-archive:{} docker://REGISTRY/conntrack-trace:{}`)",
        layout.display(),
        archive.display(),
        archive.display(),
        release.version
    );
    Ok(Image { archive })
}

/// One architecture's image: its layer (the tracer alone), config and manifest, written into
/// `blobs`; returns the manifest's blob.
fn arch_manifest(release: &Release, arch: Arch, tracer: &Path, blobs: &Path) -> Result<Blob> {
    let name = format!("conntrack-trace-{}-oci-{}", release.version, arch.name());
    // The layer: one file, root-owned, the commit's time (reproducible).
    let rootfs = dist::out_dir().join(format!("{name}.rootfs"));
    let _ = fs::remove_dir_all(&rootfs);
    fs::create_dir_all(&rootfs)?;
    let bin = rootfs.join(ENTRYPOINT.trim_start_matches('/'));
    fs::copy(tracer, &bin).with_context(|| format!("cannot copy {}", tracer.display()))?;
    let layer_tar = dist::out_dir().join(format!("{name}.layer.tar"));
    run_cmd(
        Command::new("tar")
            .current_dir(&rootfs)
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg("--mtime=@0")
            .arg("-cf")
            .arg(&layer_tar)
            .arg("conntrack-trace"),
    )?;
    let diff_id = sha256_file(&layer_tar)?;
    run_cmd(
        Command::new("gzip")
            .args(["-n", "-9", "-f"])
            .arg(&layer_tar),
    )?;
    let layer_gz = layer_tar.with_extension("tar.gz");
    let layer = put_blob(blobs, &fs::read(&layer_gz)?)?;
    fs::remove_file(&layer_gz)?;
    fs::remove_dir_all(&rootfs)?;

    let labels = labels(release);
    let config = json!({
        "created": release.created,
        "architecture": oci_arch(arch),
        "os": "linux",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created_by": "cargo xtask image"}],
    });
    let config = put_blob(blobs, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": LAYER, "digest": layer.digest, "size": layer.size}],
        "annotations": labels,
    });
    put_blob(blobs, &serde_json::to_vec(&manifest)?)
}

fn labels(release: &Release) -> Value {
    json!({
        "org.opencontainers.image.title": "conntrack-trace",
        "org.opencontainers.image.description": "See, live, every packet netfilter conntrack marks INVALID, and why",
        "org.opencontainers.image.version": release.version,
        "org.opencontainers.image.revision": release.commit,
        "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
    })
}

struct Blob {
    digest: String,
    size: u64,
}

fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<Blob> {
    let hex = sha256_hex(bytes);
    fs::write(blobs.join(&hex), bytes)?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    })
}

/// Reads an OCI archive as a runtime on an `arch` node would: the layout's index -> the
/// image index -> that platform's manifest -> config and layers, every blob checked against
/// its digest and size; unpacks the layers into `rootfs`; returns the config.
pub fn unpack(archive: &Path, scratch: &Path, rootfs: &Path, arch: Arch) -> Result<Value> {
    let _ = fs::remove_dir_all(scratch);
    fs::create_dir_all(scratch)?;
    fs::create_dir_all(rootfs)?;
    run_cmd(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(scratch),
    )?;
    let read_json = |p: &Path| -> Result<Value> {
        serde_json::from_slice(
            &fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
        )
        .with_context(|| format!("{} is not JSON", p.display()))
    };
    let layout = read_json(&scratch.join("oci-layout"))?;
    if layout["imageLayoutVersion"] != "1.0.0" {
        bail!("oci-layout: {layout}");
    }
    let blob = |desc: &Value, media: &str| -> Result<Vec<u8>> {
        if desc["mediaType"] != media {
            bail!("descriptor {desc} is not {media}");
        }
        let digest = desc["digest"]
            .as_str()
            .context("descriptor without digest")?;
        let hex = digest
            .strip_prefix("sha256:")
            .context("digest is not sha256")?;
        let bytes = fs::read(scratch.join("blobs/sha256").join(hex))
            .with_context(|| format!("blob {digest} missing"))?;
        if sha256_hex(&bytes) != hex || Some(bytes.len() as u64) != desc["size"].as_u64() {
            bail!("blob {digest} does not match its descriptor {desc}");
        }
        Ok(bytes)
    };
    let index = read_json(&scratch.join("index.json"))?;
    let images = index["manifests"]
        .as_array()
        .context("index.json without manifests")?;
    let [image] = images.as_slice() else {
        bail!("index.json names {} images, expected one", images.len());
    };
    let list: Value = serde_json::from_slice(&blob(image, INDEX)?)?;
    let manifests = list["manifests"]
        .as_array()
        .context("image index without manifests")?;
    let platforms: Vec<(&str, &str)> = manifests
        .iter()
        .map(|m| {
            let p = &m["platform"];
            (
                p["os"].as_str().unwrap_or("?"),
                p["architecture"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let want: Vec<(&str, &str)> = ARCHES.iter().map(|&a| ("linux", oci_arch(a))).collect();
    if platforms != want {
        bail!("the image index lists platforms {platforms:?}, expected {want:?}");
    }
    let desc = manifests
        .iter()
        .find(|m| m["platform"]["architecture"] == oci_arch(arch))
        .expect("every platform is listed");
    let manifest: Value = serde_json::from_slice(&blob(desc, MANIFEST)?)?;
    let config: Value = serde_json::from_slice(&blob(&manifest["config"], CONFIG)?)?;
    if config["architecture"] != oci_arch(arch) || config["os"] != "linux" {
        bail!(
            "the {} manifest's config is for {}/{}",
            oci_arch(arch),
            config["os"],
            config["architecture"]
        );
    }
    let diff_ids = config["rootfs"]["diff_ids"]
        .as_array()
        .context("config without diff_ids")?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest without layers")?;
    if layers.len() != diff_ids.len() {
        bail!("{} layers but {} diff_ids", layers.len(), diff_ids.len());
    }
    for (i, (layer, diff_id)) in layers.iter().zip(diff_ids).enumerate() {
        let gz = scratch.join(format!("layer{i}.tar.gz"));
        fs::write(&gz, blob(layer, LAYER)?)?;
        run_cmd(Command::new("gzip").args(["-d", "-f"]).arg(&gz))?;
        let tar = gz.with_extension("");
        if Some(format!("sha256:{}", sha256_file(&tar)?).as_str()) != diff_id.as_str() {
            bail!("layer {i} does not match diff_id {diff_id}");
        }
        run_cmd(
            Command::new("tar")
                .arg("-xpf")
                .arg(&tar)
                .arg("-C")
                .arg(rootfs),
        )?;
    }
    Ok(config)
}

/// Unpacks the image once per platform, as a runtime on such a node would. Each holds the
/// tracer alone, that architecture's binary of the release; the amd64 one runs its
/// entrypoint's `check` in the unpacked root filesystem. This host cannot start containers,
/// so the runtime's part is done by hand: a private mount namespace (`unshare`), /proc and
/// /sys mounted into the root, then `chroot`.
pub fn test(release: &Release, image: &Image) -> Result<()> {
    let scratch = dist::out_dir().join("test-image");
    for arch in ARCHES {
        let dir = scratch.join(arch.name());
        let rootfs = dir.join("rootfs");
        let config = unpack(&image.archive, &dir.join("layout"), &rootfs, arch)?;
        let entrypoint = check_config(release, &config)?;
        // FROM scratch: the tracer is the only file, so there is no shell to fall back on.
        let mut files = Vec::new();
        for e in fs::read_dir(&rootfs)? {
            files.push(e?.file_name().to_string_lossy().into_owned());
        }
        if files != ["conntrack-trace"] {
            bail!(
                "the {} image holds {files:?}, expected the tracer alone",
                oci_arch(arch)
            );
        }
        let tracer = rootfs.join("conntrack-trace");
        crate::guest_build::ensure_static(&tracer, arch)?;
        let released = match arch {
            Arch::X86_64 => &release.dir,
            Arch::Aarch64 => &release.aarch64_dir,
        };
        if sha256_file(&tracer)? != sha256_file(&released.join("conntrack-trace"))? {
            bail!(
                "the {} image's tracer is not the {} release's",
                oci_arch(arch),
                arch.name()
            );
        }
        if arch == Arch::X86_64 {
            run_check(&rootfs, &entrypoint)?;
        }
    }
    skopeo_reads(release, &image.archive, &scratch.join("skopeo"))?;
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// The labels name the release and its commit; returns the entrypoint.
fn check_config(release: &Release, config: &Value) -> Result<Vec<String>> {
    let labels = &config["config"]["Labels"];
    if labels["org.opencontainers.image.version"] != release.version.as_str()
        || labels["org.opencontainers.image.revision"] != release.commit.as_str()
    {
        bail!(
            "image labels {labels} do not name {} at {}",
            release.version,
            release.commit
        );
    }
    let entrypoint: Vec<String> = config["config"]["Entrypoint"]
        .as_array()
        .context("config without Entrypoint")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    if entrypoint != [ENTRYPOINT] {
        bail!("entrypoint is {entrypoint:?}, expected [{ENTRYPOINT}]");
    }
    Ok(entrypoint)
}

/// Runs the entrypoint's `check` inside `rootfs`.
fn run_check(rootfs: &Path, entrypoint: &[String]) -> Result<()> {
    for d in ["proc", "sys"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    let root = rootfs.display().to_string();
    let script = format!(
        "set -e; mount -t proc proc '{root}/proc'; mount --rbind /sys '{root}/sys'; \
         exec chroot '{root}' {} check",
        entrypoint.join(" ")
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "sh",
            "-c",
            &script,
        ])
        .env_clear()
        .output()
        .context("cannot run unshare")?;
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    // `check` exits 0 exactly when every program passes the verifier.
    if !out.status.success() {
        bail!("the image's `check` failed ({}):\n{text}", out.status);
    }
    Ok(())
}

/// A second, independent reader of the archive: skopeo (containers/image, as podman and
/// CRI-O use it) resolves the image index to each platform's image and copies all of them,
/// verifying every blob's digest on the way.
fn skopeo_reads(release: &Release, archive: &Path, copy: &Path) -> Result<()> {
    let source = format!("oci-archive:{}", archive.display());
    for arch in ARCHES {
        let out = crate::run_output(
            Command::new("skopeo")
                .args(["--override-os", "linux", "--override-arch", oci_arch(arch)])
                .args(["inspect", &source]),
        )?;
        let inspect: Value = serde_json::from_str(&out).context("skopeo inspect: not JSON")?;
        if inspect["Labels"]["org.opencontainers.image.revision"] != release.commit.as_str()
            || inspect["Architecture"] != oci_arch(arch)
        {
            bail!("skopeo inspect for {} reads {inspect}", oci_arch(arch));
        }
    }
    let _ = fs::remove_dir_all(copy);
    run_cmd(
        Command::new("skopeo")
            .args(["copy", "--all", "--quiet", &source])
            .arg(format!("dir:{}", copy.display())),
    )
}
