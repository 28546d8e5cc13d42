//! A bounded run of every fuzz target (fuzz/: cargo-fuzz, libFuzzer with nightly), part of
//! `cargo xtask test`. Each target's corpus is seeded from the recorded fixtures: whole
//! recordings for the reader, their records split by kind for the event decoders, so the
//! fuzzer starts from real kernel events rather than from nothing.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{setup, workspace_root};

/// (target, what it is given)
const TARGETS: &[(&str, Seed)] = &[
    ("record_reader", Seed::Recording),
    ("packet_event", Seed::Kind(1)),
    ("reset_event", Seed::Kind(2)),
];

/// About a minute for all targets together.
const SECONDS_PER_TARGET: u32 = 20;

/// libFuzzer's limits: a run over this much resident memory, or a single allocation over
/// this size (a length taken from the input and believed), is a failure. The largest
/// legitimate allocation is a 64 KiB record.
const RSS_LIMIT_MB: u32 = 1024;
const MALLOC_LIMIT_MB: u32 = 16;

#[derive(Clone, Copy)]
enum Seed {
    /// Whole fixture files.
    Recording,
    /// The fixtures' records whose first `u32` (the event kind) is this.
    Kind(u32),
}

/// Builds and runs every target; prints one cargo-style line per target and a result line.
pub fn run() -> Result<bool> {
    let started = Instant::now();
    let root = workspace_root();
    println!("xtask: fuzzing ({SECONDS_PER_TARGET} s per target)");
    let build = setup::cargo()
        .current_dir(&root)
        .args(["+nightly", "fuzz", "build", "-O"])
        .status()
        .context("cannot run cargo fuzz (cargo xtask setup installs it)")?;
    let mut results = Vec::new();
    if !build.success() {
        results.push((
            "fuzz::build".to_string(),
            Err("cargo fuzz build failed".into()),
        ));
    } else {
        for &(target, seed) in TARGETS {
            let result = fuzz(&root, target, seed).map_err(|e| format!("{e:#}"));
            results.push((format!("fuzz::{target}"), result));
        }
    }
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    for (name, r) in &results {
        match r {
            Ok(stats) => println!("test {name} ... ok ({stats})"),
            Err(e) => println!("test {name} ... FAILED\n{e}"),
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed; finished in {:.1}s (fuzz targets)",
        if failed == 0 { "ok" } else { "FAILED" },
        results.len() - failed,
        started.elapsed().as_secs_f64()
    );
    Ok(failed == 0)
}

/// One bounded run; returns what it did ("N execs, corpus C").
fn fuzz(root: &Path, target: &str, seed: Seed) -> Result<String> {
    let corpus = root.join("target/fuzz-corpus").join(target);
    seed_corpus(root, &corpus, seed)?;
    let out = setup::cargo()
        .current_dir(root)
        .args(["+nightly", "fuzz", "run", "-O", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-malloc_limit_mb={MALLOC_LIMIT_MB}"))
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .output()
        .context("cannot run cargo fuzz")?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{target} failed ({}); the input is under fuzz/artifacts/{target}/:\n{}",
            out.status,
            tail.join("\n")
        );
    }
    let stat = |name: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    let execs = stat("number_of_executed_units");
    if execs == "?" || execs == "0" {
        bail!("{target} ran no input:\n{log}");
    }
    Ok(format!(
        "{execs} execs in {SECONDS_PER_TARGET} s, peak RSS {} MB, corpus {}",
        stat("peak_rss_mb"),
        fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0)
    ))
}

/// Writes the fixtures' seeds into `corpus` (keeping what earlier runs found there).
fn seed_corpus(root: &Path, corpus: &Path, seed: Seed) -> Result<()> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    for path in fixtures(root)? {
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        match seed {
            Seed::Recording => fs::write(corpus.join(format!("{stem}.ctrec")), &bytes)?,
            Seed::Kind(kind) => {
                for (i, rec) in records(&bytes).into_iter().enumerate() {
                    if rec
                        .get(..4)
                        .map(|k| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]))
                        == Some(kind)
                    {
                        fs::write(corpus.join(format!("{stem}-{i}")), rec)?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn fixtures(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("conntrack-trace/tests/fixtures");
    let mut v: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "ctrec"))
        .collect();
    v.sort();
    if v.is_empty() {
        bail!("no recordings in {}", dir.display());
    }
    Ok(v)
}

/// The records of a recording: a 24-byte header, then `u32 LE length + record` repeated
/// (a cut last record is left out).
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 24;
    while let Some(len) = bytes.get(at..at + 4) {
        let n = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let Some(rec) = bytes.get(at + 4..at + 4 + n) else {
            break;
        };
        out.push(rec);
        at += 4 + n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fixture_seeds_both_event_decoders() {
        let root = workspace_root();
        let mut kinds = [0usize; 3];
        for path in fixtures(&root).unwrap() {
            let bytes = fs::read(&path).unwrap();
            let recs = records(&bytes);
            assert!(!recs.is_empty(), "{}", path.display());
            let whole: usize = 24 + recs.iter().map(|r| 4 + r.len()).sum::<usize>();
            assert_eq!(whole, bytes.len(), "{} read to its end", path.display());
            for r in recs {
                let k = u32::from_ne_bytes(r[..4].try_into().unwrap()) as usize;
                kinds[k.min(2)] += 1;
            }
        }
        assert!(
            kinds[1] > 0 && kinds[2] > 0,
            "packets and resets: {kinds:?}"
        );
    }

    #[test]
    fn a_cut_record_is_left_out() {
        let mut bytes = vec![0u8; 24];
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(b"de");
        assert_eq!(records(&bytes), [b"abc"]);
    }
}
