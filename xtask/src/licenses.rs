//! THIRD-PARTY-LICENSES.txt for a release: every crate linked into the tracer (normal
//! dependencies for x86_64 Linux) or into its embedded eBPF object (for bpfel), from the lock
//! file via `cargo metadata`, with the license texts each crate ships; and the C runtime the
//! static binary carries (glibc, libgcc), with Debian's copyright files for them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{arch::Arch, run_output, setup, workspace_root};

/// (root package, platform its dependencies are resolved for: None for the release's own)
const ROOTS: &[(&str, Option<&str>)] = &[
    ("conntrack-trace", None),
    ("conntrack-trace-ebpf", Some("bpfel-unknown-none")),
];

const APACHE: &str = "/usr/share/common-licenses/Apache-2.0";

/// The MIT license's text, for crates that declare MIT but ship no file.
const MIT: &str = "\
Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the \"Software\"), to deal in the Software without
restriction, including without limitation the rights to use, copy, modify, merge, publish,
distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or
substantial portions of the Software.

THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
";

#[derive(Debug, PartialEq)]
pub struct Crate {
    pub name: String,
    pub authors: Vec<String>,
    pub version: String,
    pub license: String,
    pub dir: PathBuf,
    pub license_file: Option<PathBuf>,
}

pub fn render(arch: Arch) -> Result<String> {
    let mut crates: BTreeMap<(String, String), Crate> = BTreeMap::new();
    for (root, platform) in ROOTS {
        let platform = platform.unwrap_or(arch.rust_target());
        let out = run_output(
            setup::cargo()
                .current_dir(workspace_root())
                .args(["metadata", "--locked", "--format-version", "1"])
                .args(["--filter-platform", platform]),
        )?;
        let meta: Value = serde_json::from_str(&out).context("cargo metadata: not JSON")?;
        for c in linked(&meta, root)? {
            crates.insert((c.name.clone(), c.version.clone()), c);
        }
    }
    let mut out = String::from(
        "Third-party software in conntrack-trace\n\
         =======================================\n\n\
         conntrack-trace itself is licensed MIT OR Apache-2.0. The static binary links the \
         crates below\n(and its embedded eBPF object the bpfel ones), and the C runtime listed \
         at the end.\n\n",
    );
    let mut missing_apache = false;
    let mut by_license: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for c in crates.values() {
        by_license
            .entry(&c.license)
            .or_default()
            .push(format!("{} {}", c.name, c.version));
    }
    out.push_str("Summary by license expression:\n");
    for (license, names) in &by_license {
        out.push_str(&format!("  {license}: {}\n", names.join(", ")));
    }
    for c in crates.values() {
        out.push_str(&format!(
            "\n{rule}\n{} {} ({})\n{rule}\n",
            c.name,
            c.version,
            c.license,
            rule = "-".repeat(78)
        ));
        if !c.authors.is_empty() {
            out.push_str(&format!("Authors: {}\n", c.authors.join(", ")));
        }
        let texts = license_texts(c)?;
        if texts.is_empty() {
            out.push_str(&format!(
                "The crate ships no license file; its manifest declares `{}`. The standard \
                 text{} follow{}.\n",
                c.license,
                if c.license.contains("Apache-2.0") {
                    "s (MIT below, Apache-2.0 at the end)"
                } else {
                    ""
                },
                if c.license.contains("Apache-2.0") {
                    ""
                } else {
                    "s"
                },
            ));
            missing_apache |= c.license.contains("Apache-2.0");
            if c.license.contains("MIT") {
                let holders = if c.authors.is_empty() {
                    format!("the {} authors", c.name)
                } else {
                    c.authors.join(", ")
                };
                out.push_str(&format!("\nCopyright (c) {holders}\n\n{MIT}"));
            }
        }
        for (file, text) in texts {
            out.push_str(&format!("\n[{file}]\n{}\n", text.trim_end()));
        }
    }
    if missing_apache {
        let text = fs::read_to_string(APACHE)
            .with_context(|| format!("cannot read {APACHE} (Debian's base-files ships it)"))?;
        out.push_str(&format!(
            "\n{rule}\nApache License 2.0, for the crates above that ship no license file\n{rule}\n{}\n",
            text.trim_end(),
            rule = "-".repeat(78)
        ));
    }
    out.push_str(&c_runtime(arch)?);
    Ok(out)
}

/// Non-workspace packages reachable from `root` through normal (not dev, not build)
/// dependencies in `cargo metadata` output resolved for one platform. Proc-macro crates run
/// in the compiler, not in the binary: neither they nor their dependencies are linked.
pub fn linked(meta: &Value, root: &str) -> Result<Vec<Crate>> {
    let packages: HashMap<&str, &Value> = meta["packages"]
        .as_array()
        .context("metadata has no packages")?
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?, p)))
        .collect();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .context("metadata has no workspace_members")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .context("metadata has no resolve graph")?
        .iter()
        .filter_map(|n| Some((n["id"].as_str()?, n)))
        .collect();
    let Some(root_id) = members
        .iter()
        .find(|id| packages.get(*id).and_then(|p| p["name"].as_str()) == Some(root))
    else {
        bail!("{root} is not a workspace member");
    };
    let mut seen = BTreeSet::new();
    let mut todo = vec![*root_id];
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let Some(node) = nodes.get(id) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal
                && let Some(pkg) = dep["pkg"].as_str()
                && !packages.get(pkg).is_some_and(|p| is_proc_macro(p))
            {
                todo.push(pkg);
            }
        }
    }
    let mut out = Vec::new();
    for id in seen {
        if members.contains(id) {
            continue;
        }
        let p = packages
            .get(id)
            .with_context(|| format!("no package {id}"))?;
        let s = |k: &str| p[k].as_str().unwrap_or_default().to_string();
        let dir = Path::new(p["manifest_path"].as_str().unwrap_or_default())
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        out.push(Crate {
            name: s("name"),
            authors: p["authors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect(),
            version: s("version"),
            license: p["license"]
                .as_str()
                .map_or_else(|| "(none declared)".into(), str::to_string),
            license_file: p["license_file"].as_str().map(|f| dir.join(f)),
            dir,
        });
    }
    Ok(out)
}

fn is_proc_macro(package: &Value) -> bool {
    package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| {
            t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k == "proc-macro")
        })
}

/// The crate's own license files: its `license-file`, and LICENSE*, LICENCE*, COPYING*,
/// NOTICE*, UNLICENSE* and COPYRIGHT* at its root.
fn license_texts(c: &Crate) -> Result<Vec<(String, String)>> {
    let mut paths: BTreeSet<PathBuf> = c.license_file.iter().cloned().collect();
    if let Ok(entries) = fs::read_dir(&c.dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_uppercase();
            if [
                "LICENSE",
                "LICENCE",
                "COPYING",
                "NOTICE",
                "UNLICENSE",
                "COPYRIGHT",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                && e.path().is_file()
            {
                paths.insert(e.path());
            }
        }
    }
    paths
        .into_iter()
        .map(|p| {
            let text =
                fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((name, text))
        })
        .collect()
}

/// glibc and libgcc are linked statically into the release binary; their terms (LGPL-2.1+
/// with its exceptions, GPL-3+ with the GCC Runtime Library Exception) come from Debian's
/// copyright files of the packages that shipped the archives (the cross toolchain's for
/// another architecture).
fn c_runtime(arch: Arch) -> Result<String> {
    let mut out = format!(
        "\n{rule}\nC runtime linked statically: GNU C Library and GCC's libgcc\n{rule}\n\
         The GNU C Library is under the LGPL-2.1-or-later (with exceptions); its sources are at\n\
         https://sourceware.org/glibc/ and in Debian's source package `glibc` of the version\n\
         below. libgcc is under the GPL-3.0-or-later with the GCC Runtime Library Exception.\n",
        rule = "-".repeat(78)
    );
    for archive in ["libc.a", "libgcc.a"] {
        let path = run_output(Command::new(arch.gcc()).arg(format!("-print-file-name={archive}")))?;
        let path = fs::canonicalize(path.trim())
            .with_context(|| format!("gcc does not know {archive}"))?;
        let owner = run_output(Command::new("dpkg").arg("-S").arg(&path))?;
        let package = owner
            .split(':')
            .next()
            .filter(|p| !p.is_empty())
            .with_context(|| format!("dpkg does not know who ships {}", path.display()))?
            .to_string();
        let version =
            run_output(Command::new("dpkg-query").args(["-W", "-f=${Version}", &package]))?;
        let copyright = Path::new("/usr/share/doc").join(&package).join("copyright");
        let text = fs::read_to_string(&copyright)
            .with_context(|| format!("cannot read {}", copyright.display()))?;
        out.push_str(&format!(
            "\n[{archive} from Debian package {package} {version}: {}]\n{}\n",
            copyright.display(),
            text.trim_end()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_normal_dependencies_of_the_root_are_linked() {
        let meta: Value = serde_json::from_str(
            r#"{
            "packages": [
                {"id": "app", "name": "app", "version": "0.1.0", "license": "MIT", "manifest_path": "/w/app/Cargo.toml"},
                {"id": "lib", "name": "lib", "version": "1.0.0", "license": "Apache-2.0", "manifest_path": "/r/lib/Cargo.toml"},
                {"id": "deep", "name": "deep", "version": "2.0.0", "license": null, "license_file": "COPYING.txt", "manifest_path": "/r/deep/Cargo.toml"},
                {"id": "bench", "name": "bench", "version": "0.5.0", "license": "MIT", "manifest_path": "/r/bench/Cargo.toml"},
                {"id": "gen", "name": "gen", "version": "0.2.0", "license": "MIT", "manifest_path": "/r/gen/Cargo.toml"},
                {"id": "derive", "name": "derive", "version": "1.0.0", "license": "MIT", "manifest_path": "/r/derive/Cargo.toml",
                 "targets": [{"kind": ["proc-macro"], "name": "derive"}]},
                {"id": "syn", "name": "syn", "version": "2.0.0", "license": "MIT", "manifest_path": "/r/syn/Cargo.toml"}
            ],
            "workspace_members": ["app"],
            "resolve": {"nodes": [
                {"id": "app", "deps": [
                    {"pkg": "lib", "dep_kinds": [{"kind": null, "target": null}]},
                    {"pkg": "bench", "dep_kinds": [{"kind": "dev", "target": null}]},
                    {"pkg": "gen", "dep_kinds": [{"kind": "build", "target": null}]}
                ]},
                {"id": "lib", "deps": [
                    {"pkg": "deep", "dep_kinds": [{"kind": null, "target": null}]},
                    {"pkg": "derive", "dep_kinds": [{"kind": null, "target": null}]}
                ]},
                {"id": "derive", "deps": [{"pkg": "syn", "dep_kinds": [{"kind": null, "target": null}]}]},
                {"id": "syn", "deps": []},
                {"id": "deep", "deps": []},
                {"id": "bench", "deps": []},
                {"id": "gen", "deps": []}
            ]}
        }"#,
        )
        .unwrap();
        let names: Vec<String> = linked(&meta, "app")
            .unwrap()
            .into_iter()
            .map(|c| {
                format!(
                    "{} {} {} {:?}",
                    c.name, c.version, c.license, c.license_file
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                "deep 2.0.0 (none declared) Some(\"/r/deep/COPYING.txt\")",
                "lib 1.0.0 Apache-2.0 None"
            ]
        );
        assert!(linked(&meta, "nope").is_err());
    }
}
