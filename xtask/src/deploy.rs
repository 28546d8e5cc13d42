//! Checks of deploy/kubernetes: every resource against the Kubernetes OpenAPI schemas
//! (kubernetes-validate, strict: unknown fields fail) of the oldest and newest release it
//! ships, the kustomization against the files beside it, and the DaemonSet's privileges and
//! sizes against what the tracer needs and nothing more.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{setup, workspace_root};

/// Schemas kubernetes-validate 1.37 ships: the oldest and the newest.
pub const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.37.0"];

pub fn dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// Every document of a YAML file as JSON, read with the validator's own PyYAML.
pub fn load(venv: &Path, file: &Path) -> Result<Vec<Value>> {
    let out = Command::new(venv.join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file)
        .output()
        .context("cannot run the virtualenv's python")?;
    if !out.status.success() {
        bail!(
            "{} is not YAML: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Runs kubernetes-validate --strict on `files` for each version; Err with its report.
pub fn validate(venv: &Path, files: &[PathBuf]) -> Result<()> {
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(files)
            .output()
            .context("cannot run kubernetes-validate")?;
        let report = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        // A kind it has no schema for is only a warning there: here it fails.
        if !out.status.success() || report.contains("WARN") || report.contains("ERROR") {
            bail!("kubernetes-validate (Kubernetes {version}) failed:\n{report}");
        }
        let passed = report.matches(" passed for resource ").count();
        if passed != files.len() {
            bail!(
                "kubernetes-validate passed {passed} of {} files:\n{report}",
                files.len()
            );
        }
    }
    Ok(())
}

/// The files the kustomization lists, checked against the directory's other YAML files.
pub fn resources(venv: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir();
    let kustomization = load(venv, &dir.join("kustomization.yaml"))?;
    let [k] = kustomization.as_slice() else {
        bail!("kustomization.yaml must hold one document");
    };
    if k["kind"] != "Kustomization" || k["apiVersion"] != "kustomize.config.k8s.io/v1beta1" {
        bail!("kustomization.yaml is not a kustomize.config.k8s.io/v1beta1 Kustomization");
    }
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .context("kustomization lists no resources")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_string)
                .context("resource is not a string")
        })
        .collect::<Result<_>>()?;
    let present: BTreeSet<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    if listed != present {
        bail!("kustomization lists {listed:?}, the directory holds {present:?}");
    }
    Ok(listed.into_iter().map(|f| dir.join(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One install for all tests (they run in parallel; the first one installs).
    fn venv() -> PathBuf {
        static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        VENV.get_or_init(|| setup::kubernetes_validate().unwrap())
            .clone()
    }

    fn one(venv: &Path, file: &str) -> Value {
        let docs = load(venv, &dir().join(file)).unwrap();
        assert_eq!(docs.len(), 1, "{file}");
        docs.into_iter().next().unwrap()
    }

    #[test]
    fn manifests_validate_against_the_kubernetes_schemas() {
        let venv = venv();
        let files = resources(&venv).unwrap();
        validate(&venv, &files).unwrap();
        // The validator does fail: an unknown field under strict validation.
        let bad = std::env::temp_dir().join(format!("xtask-bad-ds-{}.yaml", std::process::id()));
        let ds = std::fs::read_to_string(dir().join("daemonset.yaml")).unwrap();
        std::fs::write(&bad, ds.replace("hostPID: true", "hostPid: true")).unwrap();
        let err = validate(&venv, std::slice::from_ref(&bad)).unwrap_err();
        std::fs::remove_file(&bad).unwrap();
        assert!(format!("{err:#}").contains("hostPid"), "{err:#}");
    }

    #[test]
    fn daemonset_has_the_privileges_it_needs_and_no_more() {
        let venv = venv();
        let ds = one(&venv, "daemonset.yaml");
        let pod = &ds["spec"]["template"];
        let spec = &pod["spec"];
        assert_eq!(spec["hostPID"], true);
        assert_eq!(spec["hostNetwork"], true);
        assert_eq!(spec["automountServiceAccountToken"], false);
        // The metrics port is declared, announced to annotation-based scraping, and the one
        // the tracer is told to serve.
        let annotations = &pod["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "9477");
        assert_eq!(annotations["prometheus.io/path"], "/metrics");

        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(
            c["ports"],
            serde_json::json!([{"name": "metrics", "containerPort": 9477, "protocol": "TCP"}])
        );
        assert_eq!(
            c["args"],
            serde_json::json!(["--metrics", "0.0.0.0:9477", "--json"])
        );
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        let sc = &c["securityContext"];
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
        let add: BTreeSet<&str> = sc["capabilities"]["add"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            add,
            BTreeSet::from(["BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"])
        );
        // Sized from the peak RSS the benchmarks measured on every kernel: the request
        // leaves half as much again, the limit three times the peak, so a pod is neither
        // scheduled onto a node without room for it nor killed for what it was measured to use.
        let peak = peak_rss_kib();
        let request = kib(&c["resources"]["requests"]["memory"]);
        let limit = kib(&c["resources"]["limits"]["memory"]);
        assert!(
            request * 2 >= peak * 3,
            "request {request} KiB, peak {peak} KiB"
        );
        assert!(limit >= peak * 3, "limit {limit} KiB, peak {peak} KiB");

        // Every host path is mounted read-only, and these ones are there.
        let mounts = c["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().all(|m| m["readOnly"] == true), "{mounts:?}");
        let host_paths: BTreeSet<&str> = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["hostPath"]["path"].as_str().unwrap())
            .collect();
        assert_eq!(
            host_paths,
            BTreeSet::from([
                "/sys/kernel/btf",
                "/sys/kernel/tracing",
                "/sys/kernel/debug",
                "/run/containerd",
            ])
        );
        // containerd's directory, at the same path, so its socket is where the tracer looks
        // by default (/run/containerd/containerd.sock), also after containerd restarts; a
        // node without it still starts the pod.
        let volume = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["hostPath"]["path"] == "/run/containerd")
            .unwrap();
        assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate");
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("/run/containerd is mounted");
        assert_eq!(mount["mountPath"], "/run/containerd");
    }

    /// The pods go to the nodes the image has a platform for, and to no other.
    #[test]
    fn daemonset_runs_on_every_architecture_of_the_image() {
        let venv = venv();
        let ds = one(&venv, "daemonset.yaml");
        let spec = &ds["spec"]["template"]["spec"];
        assert_eq!(
            spec["nodeSelector"],
            serde_json::json!({"kubernetes.io/os": "linux"})
        );
        let terms = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        let image: Vec<&str> = crate::image::ARCHES
            .iter()
            .map(|&a| crate::image::oci_arch(a))
            .collect();
        assert_eq!(
            *terms,
            serde_json::json!([{"matchExpressions": [
                {"key": "kubernetes.io/arch", "operator": "In", "values": image}
            ]}])
        );
    }

    /// The largest peak RSS in BENCHMARKS.md's start-up and memory tables, KiB.
    fn peak_rss_kib() -> u64 {
        let text = std::fs::read_to_string(workspace_root().join("BENCHMARKS.md")).unwrap();
        let mut peaks = Vec::new();
        let mut in_table = false;
        for line in text.lines() {
            if line.starts_with("| mode |") {
                in_table = line.trim_end().ends_with("peak RSS KiB, max |");
            } else if !line.starts_with('|') {
                in_table = false;
            } else if in_table && !line.starts_with("|---") {
                let cell = line.trim_end_matches('|').rsplit('|').next().unwrap();
                peaks.push(cell.trim().parse::<u64>().unwrap());
            }
        }
        assert!(peaks.len() >= 10, "{peaks:?}");
        peaks.into_iter().max().unwrap()
    }

    /// A Kubernetes memory quantity in Mi or Gi, in KiB.
    fn kib(quantity: &Value) -> u64 {
        let q = quantity.as_str().unwrap();
        match (q.strip_suffix("Mi"), q.strip_suffix("Gi")) {
            (Some(n), _) => n.parse::<u64>().unwrap() * 1024,
            (_, Some(n)) => n.parse::<u64>().unwrap() * 1024 * 1024,
            _ => panic!("memory {q} is neither Mi nor Gi"),
        }
    }

    #[test]
    fn service_account_has_no_token_and_no_rbac() {
        let venv = venv();
        let sa = one(&venv, "serviceaccount.yaml");
        assert_eq!(sa["automountServiceAccountToken"], false);
        let ds = one(&venv, "daemonset.yaml");
        assert_eq!(
            ds["spec"]["template"]["spec"]["serviceAccountName"],
            sa["metadata"]["name"]
        );
        for f in resources(&venv).unwrap() {
            for doc in load(&venv, &f).unwrap() {
                let kind = doc["kind"].as_str().unwrap_or_default();
                assert!(!kind.contains("Role"), "{}: {kind}", f.display());
            }
        }
    }
}
