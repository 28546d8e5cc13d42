//! Flood completeness: `PACKETS` forged SEQ-over segments on a live DNAT'd connection, sent
//! from the backend's namespace as fast as one raw socket can, while the tracer runs in its
//! default mode with a consumer reading its JSON. Every segment the kernel counts as INVALID
//! must come out of the tracer as an event or as a reported loss: events + losses equal the
//! `invalid` counter's growth exactly, or the run fails. When losses are not zero at the
//! default ring size, the ring is doubled until they are (or `MAX_RING` is reached).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use super::counting::{CountingTracer, cpu_time};
use super::klog::LogSpan;
use super::{progs, record, startup_record};
use crate::connection::Flow;
use crate::counters::Counters;
use crate::inject::{Packet, RawSender};
use crate::scenarios;
use crate::tools;
use crate::topology::{API, Topology};

pub const PACKETS: u64 = 100_000;
/// A quarter of the guest's memory; beyond it a ring size says nothing about real nodes.
const MAX_RING: u64 = 256 << 20;
/// No new event or loss for this long after the flood: the tracer is as caught up as it gets.
const STALL: Duration = Duration::from_secs(20);
/// Upper bound on waiting for the tracer to catch up, however slowly it progresses.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(400);

/// Runs the floods; prints one `CT-RESULT flood-ring-<size>` per ring size tried and returns
/// whether every one added up.
pub fn run(topo: &Topology) -> Result<bool> {
    let mut flow = Flow::open(topo, API)?;
    flow.exchange(1000)?;
    let packet = scenarios::seq_over(&flow, flow.seqs()?);
    let sender = RawSender::open(&topo.server)?;
    let default_ring = default_ring_size()?;
    let mut ring = default_ring;
    let mut all_equal = true;
    let zero_loss_ring = loop {
        let name = format!("flood-ring-{}", size_label(ring));
        let outcome = flood(topo, &sender, &packet, ring, ring == default_ring);
        let lost = match outcome {
            Ok(Flooded {
                equal: true, lost, ..
            }) => {
                println!("CT-RESULT {name} ok");
                lost
            }
            Ok(Flooded { why, lost, .. }) => {
                all_equal = false;
                println!("CT-RESULT {name} FAILED {why}");
                lost
            }
            Err(e) => return Ok(super::failed(&name, &e)),
        };
        if lost == 0 {
            break Some(ring);
        }
        if ring * 2 > MAX_RING {
            println!(
                "bench: still losing events with a {} ring; not trying larger rings",
                size_label(ring)
            );
            break None;
        }
        ring *= 2;
    };
    record(
        json!({"kind": "flood_zero_loss", "default_ring": default_ring,
                  "zero_loss_ring": zero_loss_ring}),
    );
    // The INVALID drop rule keeps the forged segments from the client's stack: the
    // connection must have survived them.
    flow.exchange(100).context("connection after the floods")?;
    Ok(all_equal)
}

struct Flooded {
    equal: bool,
    lost: u64,
    why: String,
}

fn flood(
    topo: &Topology,
    sender: &RawSender,
    packet: &Packet,
    ring: u64,
    is_default: bool,
) -> Result<Flooded> {
    let args = if is_default {
        vec![]
    } else {
        vec!["--ring-size".to_string(), ring.to_string()]
    };
    let tracer = CountingTracer::start(&args)?;
    let pid = tracer.pid();
    let names = progs::names()?;
    let progs0 = progs::snapshot(pid)?;
    let cpu0 = cpu_time(pid)?;
    let log = LogSpan::start()?;
    let before = Counters::read(&topo.client)?;

    let started = Instant::now();
    for _ in 0..PACKETS {
        sender.send(packet)?;
    }
    let send_s = started.elapsed().as_secs_f64();
    let delta = settled_invalid_delta(topo, &before)?;
    let caught_up_s = catch_up(&tracer, delta).map(|at| (at - started).as_secs_f64());
    let busy_s = started.elapsed().as_secs_f64();
    let cpu_s = (cpu_time(pid)? - cpu0).as_secs_f64();
    let progs1 = progs::snapshot(pid)?;
    // Read again: a late packet after the settle check would otherwise go uncompared.
    let delta = Counters::read(&topo.client)?.delta(&before, "invalid");

    let counts = tracer.counts.clone();
    let summary = tracer.stop()?;
    let log = log.finish()?;
    let events = counts.verdicts.load(Ordering::Relaxed);
    let lost = summary["lost"].as_u64().context("summary without lost")?;
    let lost_in_lines = counts.lost.load(Ordering::Relaxed);
    let equal = events + lost == delta;
    println!(
        "bench: flood with a {} ring: sent {PACKETS} in {send_s:.1} s, kernel invalid +{delta}, \
         tracer events {events} + lost {lost} (lost lines say {lost_in_lines}), \
         kernel log {} records ({} conntrack lines readable{}), tracer CPU {cpu_s:.1} s over {busy_s:.1} s",
        size_label(ring),
        log.records,
        log.conntrack_read,
        if log.wrapped { ", buffer wrapped" } else { "" },
    );
    record(json!({
        "kind": "flood", "ring_bytes": ring, "default_ring": is_default, "sent": PACKETS,
        "send_s": send_s, "invalid_delta": delta, "events": events, "lost": lost,
        "lost_in_lines": lost_in_lines, "lost_lines": counts.lost_lines.load(Ordering::Relaxed),
        "other_events": counts.other.load(Ordering::Relaxed),
        "summary_invalid": summary["invalid"], "summary_ignored": summary["ignored"],
        "log_records": log.records, "log_conntrack_read": log.conntrack_read,
        "log_read": log.read, "log_wrapped": log.wrapped,
        "tracer_cpu_s": cpu_s, "busy_s": busy_s, "caught_up_s": caught_up_s, "equal": equal,
    }));
    for d in progs::delta(&progs0, &progs1, |p| names.get(&p.tag).cloned()) {
        record(
            json!({"kind": "flood_prog", "ring_bytes": ring, "program": d.name,
                      "runs": d.run_cnt, "run_time_ns": d.run_time_ns}),
        );
    }
    startup_record(
        "default",
        &format!("flood, {} ring", size_label(ring)),
        &summary,
    );

    let mut why = Vec::new();
    if !equal {
        why.push(format!(
            "tracer events {events} + reported losses {lost} = {} but the kernel's invalid counter grew by {delta}",
            events + lost
        ));
    }
    if lost_in_lines != lost {
        why.push(format!(
            "the lost lines add up to {lost_in_lines}, the summary says {lost}"
        ));
    }
    Ok(Flooded {
        equal: why.is_empty(),
        lost,
        why: why.join("; "),
    })
}

/// The `invalid` growth once packets still queued in the veth backlogs have been processed.
fn settled_invalid_delta(topo: &Topology, before: &Counters) -> Result<u64> {
    let mut last = Counters::read(&topo.client)?.delta(before, "invalid");
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = Counters::read(&topo.client)?.delta(before, "invalid");
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// When the tracer had accounted (as events or losses) for `target` packets; `None` when it
/// stopped making progress short of that.
fn catch_up(tracer: &CountingTracer, target: u64) -> Option<Instant> {
    let limit = Instant::now() + CATCH_UP_LIMIT;
    let (mut seen, mut progressed) = (tracer.accounted(), Instant::now());
    loop {
        if seen >= target {
            return Some(Instant::now());
        }
        if progressed.elapsed() > STALL || Instant::now() > limit {
            println!("bench: the tracer accounted for {seen} of {target} packets, then stalled");
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
        let now = tracer.accounted();
        if now != seen {
            (seen, progressed) = (now, Instant::now());
        }
    }
}

/// The tracer's own default `--ring-size`, from its `--help` (so the report follows the tracer).
fn default_ring_size() -> Result<u64> {
    let binary = tools::tracer();
    let out = std::process::Command::new(&binary)
        .arg("--help")
        .output()
        .with_context(|| format!("run {binary} --help"))?;
    parse_default_ring(&String::from_utf8_lossy(&out.stdout))
        .context("no `--ring-size ... [default: N]` in the tracer's --help")
}

fn parse_default_ring(help: &str) -> Option<u64> {
    let after = &help[help.find("--ring-size")?..];
    let value = &after[after.find("[default: ")? + "[default: ".len()..];
    value[..value.find(']')?].parse().ok()
}

/// 8388608 -> "8MiB".
fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{}KiB", bytes >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ring_comes_from_help() {
        let help = "      --record <FILE>\n          Also save the raw events\n      \
                    --ring-size <RING_SIZE>\n          Ring buffer size in bytes (a power of two, at least one page)\n          \
                    \n          [default: 8388608]\n  -v, --verbose...\n";
        assert_eq!(parse_default_ring(help), Some(8 << 20));
        assert_eq!(parse_default_ring("--snaplen [default: 256]"), None);
    }

    #[test]
    fn sizes_are_labelled_in_binary_units() {
        assert_eq!(size_label(8 << 20), "8MiB");
        assert_eq!(size_label(256 << 10), "256KiB");
    }
}
