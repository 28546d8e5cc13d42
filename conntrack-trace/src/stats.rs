//! `conntrack-trace stats`: the kernel's conntrack counters and the sysctls that decide what
//! becomes INVALID, with no BPF and no root needed where the files are readable.

use std::{
    collections::BTreeMap,
    io::Write,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::Serialize;

use crate::counters::{self, PerCpu, Stats};

/// The sysctls that change what conntrack marks INVALID or drops, with what each means.
pub const SYSCTLS: &[(&str, &str)] = &[
    (
        "nf_conntrack_tcp_be_liberal",
        "1: out-of-window TCP segments are not INVALID (RSTs and flags still checked)",
    ),
    (
        "nf_conntrack_tcp_loose",
        "1: pick up connections mid-stream without seeing the SYN",
    ),
    (
        "nf_conntrack_tcp_ignore_invalid_rst",
        "1: out-of-window RSTs are ignored instead of INVALID",
    ),
    (
        "nf_conntrack_log_invalid",
        "protocol number whose INVALID packets the kernel logs (0 off, 255 all)",
    ),
    (
        "nf_conntrack_checksum",
        "1: verify checksums at PRE_ROUTING; bad ones are INVALID",
    ),
    (
        "nf_conntrack_tcp_max_retrans",
        "retransmits of unacknowledged data before the short timeout applies",
    ),
    (
        "nf_conntrack_max",
        "table size; new flows are dropped when it is full and nothing can be evicted",
    ),
    ("nf_conntrack_buckets", "hash buckets"),
    ("nf_conntrack_count", "entries in the table now"),
];

#[derive(Serialize)]
struct Snapshot {
    #[serde(skip_serializing_if = "Option::is_none")]
    interval_s: Option<f64>,
    table: Table,
    counters: BTreeMap<String, u64>,
    per_cpu: Vec<BTreeMap<String, u64>>,
    sysctls: BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct Table {
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<u64>,
}

const STAT_FILE: &str = "/proc/net/stat/nf_conntrack";

fn read() -> Result<PerCpu> {
    let path = Path::new(STAT_FILE);
    if !path.exists() {
        anyhow::bail!("{STAT_FILE} does not exist: nf_conntrack is not loaded in this kernel");
    }
    PerCpu::parse(&std::fs::read_to_string(path).with_context(|| format!("reading {STAT_FILE}"))?)
}

fn snapshot(per_cpu: &PerCpu, shown: &Stats, interval: Option<f64>) -> Snapshot {
    Snapshot {
        interval_s: interval,
        table: Table {
            count: counters::sysctl("nf_conntrack_count"),
            max: counters::sysctl("nf_conntrack_max"),
            buckets: counters::sysctl("nf_conntrack_buckets"),
        },
        counters: shown.0.clone(),
        per_cpu: per_cpu
            .rows
            .iter()
            .map(|r| {
                per_cpu
                    .columns
                    .iter()
                    .cloned()
                    .zip(r.iter().copied())
                    .collect()
            })
            .collect(),
        sysctls: SYSCTLS
            .iter()
            .filter_map(|(n, _)| Some((*n, counters::sysctl(n)?)))
            .collect(),
    }
}

fn print_text(
    out: &mut dyn Write,
    per_cpu: &PerCpu,
    shown: &Stats,
    interval: Option<f64>,
) -> Result<()> {
    let t = &snapshot(per_cpu, shown, interval).table;
    if let (Some(c), Some(m)) = (t.count, t.max) {
        writeln!(
            out,
            "table: {c} / {m} entries ({:.1}% full), {} buckets",
            100.0 * c as f64 / m.max(1) as f64,
            t.buckets.map_or("?".into(), |b| b.to_string())
        )?;
    }
    match interval {
        Some(s) => writeln!(out, "counters over the last {s:.1} s (per second):")?,
        None => writeln!(
            out,
            "counters since boot (sum of {} CPUs):",
            per_cpu.rows.len()
        )?,
    }
    for name in &per_cpu.columns {
        let v = shown.get(name).unwrap_or(0);
        match interval {
            Some(s) if name != "entries" => {
                writeln!(out, "  {name:<15} {v:>10}  {:>10.1}/s", v as f64 / s)?
            }
            _ => writeln!(out, "  {name:<15} {v:>10}")?,
        }
    }
    if interval.is_none() {
        writeln!(out, "per CPU:")?;
        write!(out, "  {:<4}", "cpu")?;
        for c in &per_cpu.columns {
            write!(out, " {c:>13}")?;
        }
        writeln!(out)?;
        for (i, row) in per_cpu.rows.iter().enumerate() {
            write!(out, "  {i:<4}")?;
            for v in row {
                write!(out, " {v:>13}")?;
            }
            writeln!(out)?;
        }
        writeln!(out, "sysctls (net.netfilter.*):")?;
        for (name, meaning) in SYSCTLS {
            if let Some(v) = counters::sysctl(name) {
                writeln!(out, "  {name:<36} {v:>8}  {meaning}")?;
            }
        }
    }
    Ok(())
}

/// Prints once, or every `watch` with per-interval rates, until interrupted or stdout closes.
pub fn run(out: &mut impl Write, json: bool, watch: Option<Duration>) -> Result<bool> {
    match watch_loop(out, json, watch) {
        Err(e) if broken_pipe(&e) => Ok(true),
        r => r,
    }
}

/// A closed stdout (`| head`), however deep in the error it is.
fn broken_pipe(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::BrokenPipe;
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|e| e.io_error_kind() == Some(BrokenPipe))
    })
}

fn watch_loop(out: &mut impl Write, json: bool, watch: Option<Duration>) -> Result<bool> {
    let mut prev = read()?;
    let emit =
        |out: &mut dyn Write, pc: &PerCpu, shown: &Stats, interval: Option<f64>| -> Result<()> {
            if json {
                serde_json::to_writer(&mut *out, &snapshot(pc, shown, interval))?;
                writeln!(out)?;
            } else {
                print_text(out, pc, shown, interval)?;
            }
            out.flush()?;
            Ok(())
        };
    emit(out, &prev, &prev.total(), None)?;
    let Some(every) = watch else { return Ok(true) };
    let mut at = Instant::now();
    loop {
        std::thread::sleep(every);
        let now = read()?;
        let elapsed = at.elapsed().as_secs_f64();
        let delta = now.total().delta(&prev.total());
        if !json {
            writeln!(out)?;
        }
        emit(out, &now, &delta, Some(elapsed))?;
        prev = now;
        at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    /// Runs against this machine's real counters and sysctls.
    #[test]
    fn text_and_json_on_this_kernel() {
        let mut text = Vec::new();
        assert!(super::run(&mut text, false, None).unwrap());
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("invalid") && text.contains("nf_conntrack_tcp_be_liberal"),
            "{text}"
        );
        let mut json = Vec::new();
        super::run(&mut json, true, None).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert!(v["per_cpu"].as_array().unwrap().len() >= cpus.min(1));
        // The summed column is the sum of the per-CPU column.
        let sum: u64 = v["per_cpu"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["invalid"].as_u64().unwrap())
            .sum();
        assert_eq!(
            v["counters"]["invalid"].as_u64().unwrap(),
            sum,
            "summed from the same read"
        );
        assert!(v["table"]["max"].as_u64().unwrap() > 0);
    }
}
