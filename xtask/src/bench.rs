//! `cargo xtask bench`: renders the guest's `CT-BENCH` records (tests/src/bench) into
//! BENCHMARKS.md, one section per kernel between `<!-- bench:NAME -->` markers, so a run
//! on one kernel replaces that kernel's tables and leaves the rest of the file alone.

use std::{collections::BTreeMap, fmt::Write as _, fs, path::Path};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::kernels::Kernel;

pub const FILE: &str = "BENCHMARKS.md";
const CRITERION_HEADING: &str = "## Userspace decode + render (criterion)";

/// Everything a section says besides the guest's records.
pub struct Run<'a> {
    pub kernel: &'a Kernel,
    /// The command line as typed, e.g. `cargo xtask bench --kernel 6.12`.
    pub command: &'a str,
    /// UTC date of the run.
    pub date: &'a str,
    /// What was built: `commit 1234abc`, with `+ uncommitted changes` when the tree differs.
    pub tree: &'a str,
    /// Host CPU model and count, from /proc/cpuinfo.
    pub host: &'a str,
}

/// The kernel's section of BENCHMARKS.md.
pub fn render(ctx: &Run, lines: &[String]) -> Result<String> {
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad CT-BENCH record: {l}")))
        .collect::<Result<_>>()?;
    let of = |kind: &str| -> Vec<&Value> { records.iter().filter(|r| r["kind"] == kind).collect() };
    let env = of("env").first().copied().cloned().unwrap_or(Value::Null);
    let module = env["nf_conntrack"] == "module";

    let mut s = String::new();
    let k = ctx.kernel;
    writeln!(
        s,
        "## Linux {} (`{}` {}, guest `{}`)\n",
        k.name,
        k.package(),
        k.version,
        env["release"].as_str().unwrap_or("?")
    )?;
    writeln!(
        s,
        "Produced by `{}` on {} from {}: QEMU **TCG** (no KVM on this host), guest `-smp 2 -m 1024`, on \
         the 2 cores of this host ({}). TCG emulates every guest instruction, so absolute times \
         are far above real hardware; compare rows within a table. nf_conntrack is {} in this \
         kernel.\n",
        ctx.command,
        ctx.date,
        ctx.tree,
        ctx.host,
        if module {
            "a loadable module"
        } else {
            "built into the kernel"
        }
    )?;
    let ns_per_skb = cost_table(&mut s, &of("cost"), &of("throughput"))?;
    throughput_table(&mut s, &of("throughput"), &ns_per_skb)?;
    flood_tables(
        &mut s,
        &of("flood"),
        &of("flood_prog"),
        &of("flood_zero_loss"),
    )?;
    startup_table(&mut s, &of("startup"))?;
    Ok(s)
}

/// Sums `runs` and `run_time_ns` per key, keys in the order first seen.
fn totals<'a, K: PartialEq>(
    records: &[&'a Value],
    key: impl Fn(&'a Value) -> K,
) -> Vec<(K, (u64, u64))> {
    let mut out: Vec<(K, (u64, u64))> = Vec::new();
    for r in records {
        let (k, runs, ns) = (key(r), u64_of(r, "runs"), u64_of(r, "run_time_ns"));
        match out.iter_mut().find(|(o, _)| *o == k) {
            Some((_, t)) => *t = (t.0 + runs, t.1 + ns),
            None => out.push((k, (runs, ns))),
        }
    }
    out
}

/// Writes the table; returns each mode's BPF nanoseconds per skb.
fn cost_table(s: &mut String, cost: &[&Value], tput: &[&Value]) -> Result<BTreeMap<String, f64>> {
    writeln!(
        s,
        "### Per-packet kernel cost, bulk TCP transfer through the Service DNAT\n\n\
         `kernel.bpf_stats_enabled=1`: `run_time_ns` / `run_cnt` from the fdinfo of every \
         program the tracer holds, summed over all measurement windows of a mode (rounds \
         interleave off / cold / fexit / kprobe pair, the verdict probe forced with \
         `--verdict-probe`, and empty programs, `r0 = 0; exit`, attached as fexit and as \
         kprobe + kretprobe on `nf_conntrack_in`: what bpf_stats reports for doing nothing \
         there; and a fexit that only loads `skb->_nfct`). *skbs* are what conntrack saw: the client veth's \
         rx + tx packets, one `nf_conntrack_in` call each (veth does GSO: one skb carries up to \
         64 KiB). `run_time_ns` times the program body only (plus the stats' own clock reads); \
         the kprobe/kretprobe entry and trampoline cost is not in it and shows in the \
         throughput table instead.\n"
    )?;
    writeln!(
        s,
        "| mode | program | runs | runs per skb | ns per run | ns per skb |\n|---|---|---:|---:|---:|---:|"
    )?;
    let mut skbs: BTreeMap<&str, u64> = BTreeMap::new();
    for t in tput {
        *skbs.entry(str_of(t, "mode")).or_default() += u64_of(t, "skbs");
    }
    let progs = totals(cost, |c| (str_of(c, "mode"), str_of(c, "program")));
    let mut per_skb = BTreeMap::new();
    let mut modes: Vec<&str> = Vec::new();
    for ((m, _), _) in &progs {
        if !modes.contains(m) {
            modes.push(m);
        }
    }
    for mode in modes {
        let n = skbs.get(mode).copied().unwrap_or(0);
        let mut total = 0;
        for ((_, prog), (runs, ns)) in progs.iter().filter(|((m, _), _)| *m == mode) {
            total += ns;
            writeln!(
                s,
                "| {mode} | `{prog}` | {runs} | {} | {} | {} |",
                ratio(*runs as f64, n as f64, 3),
                if *runs == 0 {
                    "–".into()
                } else {
                    format!("{:.0}", *ns as f64 / *runs as f64)
                },
                ratio(*ns as f64, n as f64, 1)
            )?;
        }
        writeln!(
            s,
            "| {mode} | **all programs** ({n} skbs) | | | | **{}** |",
            ratio(total as f64, n as f64, 1)
        )?;
        per_skb.insert(mode.to_string(), total as f64 / n as f64);
    }
    writeln!(s)?;
    Ok(per_skb)
}

fn throughput_table(
    s: &mut String,
    tput: &[&Value],
    ns_per_skb: &BTreeMap<String, f64>,
) -> Result<()> {
    writeln!(
        s,
        "### Throughput of the same transfer\n\nMiB/s the client read per measurement window.\n"
    )?;
    let mut by_mode: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    for t in tput {
        let secs = f64_of(t, "secs");
        let point = (
            u64_of(t, "bytes") as f64 / secs / (1u64 << 20) as f64,
            u64_of(t, "skbs") as f64 / secs,
        );
        match by_mode.iter_mut().find(|(m, _)| *m == str_of(t, "mode")) {
            Some((_, v)) => v.push(point),
            None => by_mode.push((str_of(t, "mode"), vec![point])),
        }
    }
    let off = by_mode
        .iter()
        .find(|(m, _)| *m == "off")
        .map(|(_, v)| median(v.iter().map(|p| p.0).collect()));
    writeln!(
        s,
        "| tracer | MiB/s per round | median MiB/s | vs off | skbs/s (median) |\n|---|---|---:|---:|---:|"
    )?;
    let (mut overheads, mut worst_pct) = (Vec::new(), 0.0f64);
    for (mode, points) in &by_mode {
        let mib = median(points.iter().map(|p| p.0).collect());
        let skbs_per_s = median(points.iter().map(|p| p.1).collect());
        if let Some(ns) = ns_per_skb.get(*mode).filter(|ns| **ns > 0.0) {
            let pct = ns * skbs_per_s / 1e7;
            worst_pct = worst_pct.max(pct);
            overheads.push(format!(
                "{mode}: {ns:.0} ns per skb × {skbs_per_s:.0} skbs/s = {pct:.2}% of one vCPU"
            ));
        }
        writeln!(
            s,
            "| {mode} | {} | {mib:.1} | {} | {:.0} |",
            points
                .iter()
                .map(|p| format!("{:.1}", p.0))
                .collect::<Vec<_>>()
                .join(" / "),
            off.map_or("–".into(), |o| format!("{:.2}", mib / o)),
            skbs_per_s
        )?;
    }
    if let Some((_, points)) = by_mode.iter().find(|(m, _)| *m == "off") {
        let mibs: Vec<f64> = points.iter().map(|p| p.0).collect();
        let (lo, hi) = (
            mibs.iter().copied().fold(f64::INFINITY, f64::min),
            mibs.iter().copied().fold(0.0, f64::max),
        );
        let spread_pct = (hi - lo) / median(mibs) * 100.0;
        let fexit = by_mode.iter().find(|(m, _)| *m == "fexit");
        if let Some((_, fx)) = fexit {
            let fx_mib = median(fx.iter().map(|p| p.0).collect());
            if let Some(text) = default_mode(ns_per_skb, fx_mib, (lo, hi)) {
                writeln!(s, "\n{text}")?;
            }
        }
        writeln!(
            s,
            "\nWith the tracer off the rounds spread over {lo:.1}–{hi:.1} MiB/s ({spread_pct:.0}% of \
             the median). The programs' own time at these rates ({}) is {} that spread, so the \
             ratios above are {}.",
            if overheads.is_empty() {
                "none measured".to_string()
            } else {
                overheads.join("; ")
            },
            if worst_pct < spread_pct {
                "inside"
            } else {
                "larger than"
            },
            if worst_pct < spread_pct {
                "mostly noise plus whatever the attach mechanism costs"
            } else {
                "the programs' cost plus the attach mechanism's"
            }
        )?;
    }
    writeln!(s)?;
    Ok(())
}

/// Whether fexit meets the bar for the default mode: under a tenth of the kprobe pair's
/// program time per skb, and a median throughput not below the off rounds' spread. Program time
/// is taken above the floor an empty program measures at the same hook where that was
/// measured (the clock reads around every run are not the program's work).
fn default_mode(ns: &BTreeMap<String, f64>, fx_mib: f64, (lo, hi): (f64, f64)) -> Option<String> {
    let (fx, pair) = (*ns.get("fexit")?, *ns.get("kprobe pair")?);
    let floors = ns
        .get("empty fexit")
        .zip(ns.get("empty kprobe pair"))
        .map(|(f0, p0)| (*f0, *p0));
    let (net_fx, net_pair) = floors.map_or((fx, pair), |(f0, p0)| (fx - f0, pair - p0));
    let cheap = net_fx < net_pair / 10.0;
    let tenth = if cheap { "under" } else { "not under" };
    let mut text = format!(
        "**Default mode.** fexit's program time is {fx:.0} ns per skb against the kprobe \
         pair's {pair:.0}"
    );
    match floors {
        Some((f0, p0)) => {
            text += &format!(
                ". Empty programs at the same hooks measure {f0:.0} (fexit) and {p0:.0} \
                 (kprobe + kretprobe): the clock reads around each run and the trampoline's \
                 bookkeeping, paid whatever a program does there. Per skb fexit measures {} \
                 and the pair {net_pair:.0} ns above its own ({tenth} a tenth)",
                over_floor(net_fx)
            );
            if let Some(f1) = ns.get("fexit reading skb->_nfct") {
                let least = f1 - f0;
                text += &format!(
                    ". The least a verdict probe can do at fexit, one load of `skb->_nfct`, \
                     measures {f1:.0}: {}, {} a tenth of the pair's {net_pair:.0}",
                    over_floor(least),
                    if least < net_pair / 10.0 {
                        "under"
                    } else {
                        "already over"
                    }
                );
            }
        }
        None => text += &format!(" ({tenth} a tenth)"),
    }
    // Faster than every off round is noise too: only a median below the spread is a cost.
    let unseen = fx_mib >= lo;
    let (place, noise) = if fx_mib < lo {
        ("below", "")
    } else if fx_mib > hi {
        ("above", " (faster than every off round: noise)")
    } else {
        ("inside", "")
    };
    text += &format!(
        ". fexit's median throughput {fx_mib:.1} MiB/s is {place} the off rounds' spread \
         {lo:.1}–{hi:.1}{noise}: {}.",
        if cheap && unseen {
            "fexit meets the bar for the default mode"
        } else {
            "fexit does not meet the bar for the default mode"
        }
    );
    Some(text)
}

/// A program's time over the empty program's at its hook. Below it is run-to-run noise (no
/// program costs less than doing nothing): said so, not printed as a negative cost.
fn over_floor(net: f64) -> String {
    if net < 0.0 {
        format!(
            "{:.0} ns below the empty program (noise: no program costs less)",
            -net
        )
    } else {
        format!("{net:.0} ns above the empty program")
    }
}

fn flood_tables(s: &mut String, flood: &[&Value], progs: &[&Value], zero: &[&Value]) -> Result<()> {
    let sent = flood.first().map_or(0, |f| u64_of(f, "sent"));
    writeln!(
        s,
        "### Flood: {sent} forged SEQ-over-window segments on one live connection\n\n\
         Sent from the backend's namespace through one raw socket as fast as it goes; tracer in \
         its default mode, `--json` read by a consumer that counts lines. The kernel log runs \
         too (`nf_conntrack_log_invalid=255`, `nf_log.2=nf_log_ipv4`, as in the scenarios); \
         its lines are counted by `/dev/kmsg` sequence number between two markers, so lines \
         the log buffer overwrote still count.\n"
    )?;
    writeln!(
        s,
        "| ring | sent in | kernel `invalid` Δ | events | lost (summary / `lost` lines) | events + lost = Δ | kernel log lines | tracer CPU / wall | tracer CPU per event | caught up after |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
    )?;
    for f in flood {
        let send_s = f64_of(f, "send_s");
        writeln!(
            s,
            "| {}{} | {send_s:.1} s ({:.0}/s) | {} | {} | {} / {} | {} | {}{} | {:.1} s / {:.1} s | {} | {} |",
            mib(u64_of(f, "ring_bytes")),
            if f["default_ring"] == true {
                " (default)"
            } else {
                ""
            },
            u64_of(f, "sent") as f64 / send_s,
            u64_of(f, "invalid_delta"),
            u64_of(f, "events"),
            u64_of(f, "lost"),
            u64_of(f, "lost_in_lines"),
            if f["equal"] == true { "yes" } else { "**NO**" },
            u64_of(f, "log_records"),
            if f["log_wrapped"] == true {
                format!(" ({} still readable)", u64_of(f, "log_conntrack_read"))
            } else {
                String::new()
            },
            f64_of(f, "tracer_cpu_s"),
            f64_of(f, "busy_s"),
            cpu_per_event(f).map_or("–".into(), |us| format!("{us:.0} µs")),
            f["caught_up_s"]
                .as_f64()
                .map_or("never (stalled)".into(), |t| format!("{t:.1} s")),
        )?;
    }
    if let Some(z) = zero.first() {
        match z["zero_loss_ring"].as_u64() {
            Some(r) if Some(r) == z["default_ring"].as_u64() => {
                writeln!(s, "\nNo losses at the default ring size ({}).", mib(r))?
            }
            Some(r) => writeln!(
                s,
                "\nSmallest ring without losses at this rate: `--ring-size {r}` ({}).",
                mib(r)
            )?,
            None => writeln!(s, "\nEvery ring size tried lost events.")?,
        }
    }
    let packets: u64 = flood.iter().map(|f| u64_of(f, "invalid_delta")).sum();
    let logged: u64 = flood.iter().map(|f| u64_of(f, "log_records")).sum();
    writeln!(
        s,
        "\nThe kernel's own logging wrote {logged} lines for these {packets} INVALID packets{}.",
        if logged >= packets {
            ": every one, no rate limit on this path (only the log buffer's size limits what \
             can be read back)"
        } else {
            " (rate limited)"
        }
    )?;
    let hit = totals(progs, |p| str_of(p, "program"));
    let kernel_ns: u64 = hit.iter().map(|(_, (_, ns))| ns).sum();
    let busy = flood
        .iter()
        .map(|f| f64_of(f, "tracer_cpu_s") / f64_of(f, "busy_s"))
        .fold(f64::INFINITY, f64::min);
    if busy >= 0.8 {
        writeln!(
            s,
            "\nThe tracer process was on a CPU for at least {:.0}% of every flood: its userspace \
             (decode, explain, JSON, one write per event) is the bottleneck, at a median {:.0} µs \
             of CPU per event under TCG, against {:.1} µs per packet for all its kernel programs \
             together (below).",
            busy * 100.0,
            median(flood.iter().filter_map(|f| cpu_per_event(f)).collect()),
            kernel_ns as f64 / packets as f64 / 1e3
        )?;
    }
    writeln!(
        s,
        "\nCold-path programs that ran during the floods (all ring sizes, {packets} packets):\n\n\
         | program | runs | runs per packet | ns per run |\n|---|---:|---:|---:|"
    )?;
    for (prog, (runs, ns)) in hit.iter().filter(|(_, (runs, _))| *runs > 0) {
        writeln!(
            s,
            "| `{prog}` | {runs} | {} | {} |",
            ratio(*runs as f64, packets as f64, 2),
            ratio(*ns as f64, *runs as f64, 0)
        )?;
    }
    writeln!(s)?;
    Ok(())
}

/// Microseconds of tracer CPU per event it printed.
fn cpu_per_event(f: &Value) -> Option<f64> {
    let events = u64_of(f, "events");
    (events > 0).then(|| f64_of(f, "tracer_cpu_s") * 1e6 / events as f64)
}

fn startup_table(s: &mut String, runs: &[&Value]) -> Result<()> {
    writeln!(
        s,
        "### Start-up and memory\n\nFrom the tracer's JSON summary: launch to \"attached\" \
         (`startup_attached_ms`), the BTF part of it (`startup_btf_ms`), peak RSS (`peak_rss_kib`, \
         VmHWM).\n\n| mode | during | runs | launch → attached ms, median (min–max) | BTF ms, median | peak RSS KiB, max |\n\
         |---|---|---:|---:|---:|---:|"
    )?;
    let mut groups: Vec<((&str, &str), Vec<&Value>)> = Vec::new();
    for r in runs {
        let key = (str_of(r, "mode"), str_of(r, "during"));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => groups.push((key, vec![r])),
        }
    }
    for ((mode, during), rs) in &groups {
        let attached: Vec<f64> = rs.iter().map(|r| f64_of(r, "attached_ms")).collect();
        let btf: Vec<f64> = rs.iter().map(|r| f64_of(r, "btf_ms")).collect();
        let rss = rs
            .iter()
            .map(|r| u64_of(r, "peak_rss_kib"))
            .max()
            .unwrap_or(0);
        writeln!(
            s,
            "| {mode} | {during} | {} | {:.0} ({:.0}–{:.0}) | {:.0} | {rss} |",
            rs.len(),
            median(attached.clone()),
            attached.iter().copied().fold(f64::INFINITY, f64::min),
            attached.iter().copied().fold(0.0, f64::max),
            median(btf),
        )?;
    }
    writeln!(s)?;
    Ok(())
}

/// Replaces the kernel's section of `path` (creating the file when needed) with `section`.
pub fn update_file(path: &Path, kernel: &str, section: &str) -> Result<()> {
    let (begin, end) = (
        format!("<!-- bench:{kernel} -->"),
        format!("<!-- /bench:{kernel} -->"),
    );
    let block = format!("{begin}\n{}\n{end}\n", section.trim_end());
    let old = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => skeleton(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{block}{}",
            &old[..b],
            &old[e + end.len()..].trim_start_matches('\n')
        ),
        // New kernel: before the userspace section, whose numbers are not from the VM.
        _ => match old.find(CRITERION_HEADING) {
            Some(at) => format!("{}{block}\n{}", &old[..at], &old[at..]),
            None => format!("{}\n{block}", old.trim_end()),
        },
    };
    fs::write(path, new).with_context(|| format!("write {}", path.display()))
}

fn skeleton() -> String {
    format!(
        "# Benchmarks\n\n\
         Every number below comes from a run recorded here, under the command that produced it. \
         The kernel sections come from `cargo xtask bench [--kernel K]` (default 6.12), which \
         boots the Debian kernel under QEMU with `ct-scenarios bench` (tests/src/bench) and \
         rewrites that kernel's section of this file.\n\n\
         {CRITERION_HEADING}\n\nSee below.\n"
    )
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("?")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

fn f64_of(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

fn ratio(num: f64, den: f64, decimals: usize) -> String {
    if den == 0.0 {
        "–".into()
    } else {
        format!("{:.*}", decimals, num / den)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> &'static Kernel {
        &crate::kernels::KERNELS[0]
    }

    fn records() -> Vec<String> {
        [
            r#"{"kind":"env","release":"6.12.0-test","nf_conntrack":"module","cpus":2}"#,
            r#"{"kind":"throughput","mode":"off","round":1,"bytes":104857600,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"throughput","mode":"off","round":2,"bytes":94371840,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"throughput","mode":"exact","round":1,"bytes":52428800,"secs":1.0,"skbs":800}"#,
            r#"{"kind":"cost","mode":"exact","round":1,"program":"nf_conntrack_in","runs":800,"run_time_ns":80000,"skbs":800}"#,
            r#"{"kind":"cost","mode":"exact","round":1,"program":"nf_conntrack_in_ret","runs":800,"run_time_ns":160000,"skbs":800}"#,
            r#"{"kind":"throughput","mode":"kprobe pair","round":1,"bytes":52428800,"secs":1.0,"skbs":800}"#,
            r#"{"kind":"cost","mode":"kprobe pair","round":1,"program":"nf_conntrack_in_ret","runs":800,"run_time_ns":160000,"skbs":800}"#,
            r#"{"kind":"throughput","mode":"fexit","round":1,"bytes":99614720,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"cost","mode":"fexit","round":1,"program":"nf_conntrack_in_fexit","runs":1000,"run_time_ns":115000,"skbs":1000}"#,
            r#"{"kind":"throughput","mode":"empty fexit","round":1,"bytes":99614720,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"cost","mode":"empty fexit","round":1,"program":"empty fexit","runs":1000,"run_time_ns":100000,"skbs":1000}"#,
            r#"{"kind":"throughput","mode":"fexit reading skb->_nfct","round":1,"bytes":99614720,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"cost","mode":"fexit reading skb->_nfct","round":1,"program":"fexit reading skb->_nfct","runs":1000,"run_time_ns":110000,"skbs":1000}"#,
            r#"{"kind":"throughput","mode":"empty kprobe pair","round":1,"bytes":99614720,"secs":1.0,"skbs":1000}"#,
            r#"{"kind":"cost","mode":"empty kprobe pair","round":1,"program":"empty kprobe","runs":1000,"run_time_ns":20000,"skbs":1000}"#,
            r#"{"kind":"flood","ring_bytes":8388608,"default_ring":true,"sent":100000,"send_s":10.0,"invalid_delta":100000,"events":90000,"lost":10000,"lost_in_lines":10000,"log_records":100001,"log_conntrack_read":900,"log_wrapped":true,"tracer_cpu_s":9.0,"busy_s":12.0,"caught_up_s":11.5,"equal":true}"#,
            r#"{"kind":"flood_zero_loss","default_ring":8388608,"zero_loss_ring":33554432}"#,
            r#"{"kind":"startup","mode":"exact","during":"bulk","btf_ms":300.0,"attached_ms":900.0,"peak_rss_kib":20000}"#,
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn section_has_command_tables_and_sums() {
        let ctx = Run {
            kernel: kernel(),
            command: "cargo xtask bench --kernel 6.12",
            date: "2026-11-26",
            tree: "commit 1234abc",
            host: "2 x Test CPU",
        };
        let text = render(&ctx, &records()).unwrap();
        assert!(text.contains(
            "Produced by `cargo xtask bench --kernel 6.12` on 2026-11-26 from commit 1234abc"
        ));
        assert!(text.contains("QEMU **TCG**"));
        // 80 + 160 us over 800 skbs.
        assert!(text.contains("| exact | **all programs** (800 skbs) | | | | **300.0** |"));
        assert!(text.contains("| exact | `nf_conntrack_in_ret` | 800 | 1.000 | 200 | 200.0 |"));
        assert!(text.contains("| exact | 50.0 | 50.0 | 0.50 | 800 |"));
        // fexit 115 - floor 100 = 15 ns/skb < (200 - 20)/10; 95 MiB/s inside off's 90-100.
        assert!(text.contains("fexit's program time is 115 ns per skb against the kprobe pair's 200. Empty programs at the same hooks measure 100 (fexit) and 20 (kprobe + kretprobe)"), "{text}");
        assert!(text.contains("Per skb fexit measures 15 ns above the empty program and the pair 180 ns above its own (under a tenth). The least a verdict probe can do at fexit, one load of `skb->_nfct`, measures 110: 10 ns above the empty program, under a tenth of the pair's 180. fexit's median throughput 95.0 MiB/s is inside the off rounds' spread 90.0–100.0: fexit meets the bar for the default mode."), "{text}");
        assert!(text.contains("| 8 MiB (default) | 10.0 s (10000/s) | 100000 | 90000 | 10000 / 10000 | yes | 100001 (900 still readable) |"));
        assert!(text.contains("`--ring-size 33554432` (32 MiB)"));
        assert!(text.contains("| exact | bulk | 1 | 900 (900–900) | 300 | 20000 |"));
    }

    #[test]
    fn only_a_throughput_below_the_off_spread_misses_the_bar() {
        let ns = [("fexit", 15.0), ("kprobe pair", 200.0)]
            .map(|(k, v)| (k.to_string(), v))
            .into_iter()
            .collect();
        let above = default_mode(&ns, 105.0, (90.0, 100.0)).unwrap();
        assert!(
            above.contains(
                "is above the off rounds' spread 90.0–100.0 (faster than every off round: noise)"
            ),
            "{above}"
        );
        assert!(above.contains("fexit meets the bar"), "{above}");
        let below = default_mode(&ns, 85.0, (90.0, 100.0)).unwrap();
        assert!(below.contains("is below the off rounds' spread"), "{below}");
        assert!(below.contains("does not meet the bar"), "{below}");
    }

    #[test]
    fn a_kernel_section_is_replaced_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE);
        let _ = fs::remove_file(&path);
        update_file(&path, "6.12", "## Linux 6.12\nfirst\n").unwrap();
        update_file(&path, "6.1-struct", "## Linux 6.1-struct\nother\n").unwrap();
        update_file(&path, "6.12", "## Linux 6.12\nsecond\n").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("# Benchmarks\n"));
        assert!(text.contains("second") && !text.contains("first"));
        assert!(text.contains("other"));
        let criterion = text.find(CRITERION_HEADING).unwrap();
        assert!(text.find("second").unwrap() < criterion);
        assert!(text.find("other").unwrap() < criterion);
        assert!(text.ends_with("See below.\n"));
    }
}
