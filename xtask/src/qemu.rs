//! Boots one kernel under QEMU (TCG), streams its console, and turns the guest's CT- lines
//! into test results. A guest that never finishes is killed at the deadline.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{arch::Arch, kernels::Kernel, summary::Tally};

#[derive(Clone, Copy, PartialEq)]
pub enum Mode {
    /// ct-scenarios runs every scenario and reports each.
    Test,
    /// `ct-scenarios demo`: the tracer's live output is the point; success is its exit status.
    Demo,
    /// `ct-scenarios bench`: measurements (`CT-BENCH` lines) and a result per phase.
    Bench,
}

/// What one guest run produced.
pub struct Outcome {
    pub tally: Tally,
    /// The JSON payloads of the guest's `CT-BENCH` lines, in order.
    pub bench: Vec<String>,
}

/// How long a guest that has printed CT-DONE may take to power off before it is killed.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

pub fn run(
    kernel: &Kernel,
    vmlinuz: &Path,
    initrd: &Path,
    mode: Mode,
    timeout: Duration,
    scenarios: &[String],
) -> Result<Outcome> {
    let (mode_arg, what) = match mode {
        Mode::Test => ("test", "running VM tests"),
        Mode::Demo => ("demo", "running the demo"),
        Mode::Bench => ("bench", "running the benchmarks"),
    };
    println!(
        "\n{what} on {}: {} {} ({})",
        kernel.name,
        kernel.package(),
        kernel.version,
        kernel.why
    );
    // arm64: the virt board boots the kernel image itself (no firmware), its console is the
    // PL011 UART. pauth-impdef swaps the architected pointer-authentication cipher, which
    // Debian's kernel signs every return address with, for QEMU's much cheaper one: the
    // guest sees no difference, TCG spends far less time per function call.
    let (qemu, machine, console): (&str, &[&str], &str) = match kernel.arch {
        Arch::X86_64 => ("qemu-system-x86_64", &["-cpu", "max"], "ttyS0"),
        Arch::Aarch64 => (
            "qemu-system-aarch64",
            &["-M", "virt", "-cpu", "max,pauth-impdef=on"],
            "ttyAMA0",
        ),
    };
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(machine)
        .args(["-accel", "tcg", "-m", "1024", "-smp", "2"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console={console} quiet panic=-1 ct.kernel={} ct.mode={mode_arg}{}",
            kernel.name,
            if scenarios.is_empty() {
                String::new()
            } else {
                format!(" ct.scenarios={}", scenarios.join(","))
            }
        ))
        // The guest's networks are namespaces over veth inside it; it needs no host NIC.
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {qemu} (run `cargo xtask setup`)"))?;

    let (tx, rx) = mpsc::channel();
    let forward = |stream: Box<dyn Read + Send>, from_qemu: bool| {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            // The console is not guaranteed to be UTF-8; read bytes, convert lossily.
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = printable(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']));
                if tx.send((from_qemu, line)).is_err() {
                    break;
                }
                buf.clear();
            }
        })
    };
    forward(Box::new(child.stdout.take().expect("piped")), false);
    forward(Box::new(child.stderr.take().expect("piped")), true);
    drop(tx);

    let mut guest = Protocol::new(kernel.name);
    let mut deadline = started + timeout;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok((from_qemu, line)) => {
                println!(
                    "[{}{}] {line}",
                    kernel.name,
                    if from_qemu { " qemu" } else { "" }
                );
                if !from_qemu && guest.line(&line, started.elapsed()) == Event::Done {
                    deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        // Killing qemu closes its pipes, which ends the reader threads.
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for qemu")?;
    let wall = started.elapsed();

    let name = kernel.name;
    let unfinished = guest.unfinished();
    let mut tally = guest.tally;
    match mode {
        Mode::Test | Mode::Bench if !guest.done => {
            let reason = if timed_out {
                format!("no CT-DONE within {}s; qemu was killed", timeout.as_secs())
            } else {
                match guest.scenarios_exit {
                    Some(code) => {
                        format!("ct-scenarios exited with status {code} without printing CT-DONE")
                    }
                    None => format!(
                        "the guest stopped before ct-scenarios finished (qemu {status}; kernel panic?)"
                    ),
                }
            };
            tally.fail(&format!("vm::{name}::ct-scenarios"), &reason);
        }
        Mode::Test if let Some(reason) = unfinished => {
            tally.fail(&format!("vm::{name}::ct-scenarios"), &reason);
        }
        Mode::Test | Mode::Bench => {
            if timed_out {
                println!(
                    "[{name}] note: the guest printed CT-DONE but did not power off; qemu was killed"
                );
            }
        }
        Mode::Demo => match guest.scenarios_exit {
            Some(0) => tally.pass(&format!("vm::{name}::demo")),
            Some(code) => tally.fail(
                &format!("vm::{name}::demo"),
                &format!("ct-scenarios demo exited with status {code}"),
            ),
            None if timed_out => tally.fail(
                &format!("vm::{name}::demo"),
                &format!(
                    "did not finish within {}s; qemu was killed",
                    timeout.as_secs()
                ),
            ),
            None => tally.fail(
                &format!("vm::{name}::demo"),
                &format!("the guest stopped before the demo finished (qemu {status})"),
            ),
        },
    }
    match guest.booted {
        Some(boot) => println!(
            "[{name}] booted to /init in {:.1}s; guest finished in {:.1}s",
            boot.as_secs_f64(),
            wall.as_secs_f64()
        ),
        None => println!(
            "[{name}] never reached /init; stopped after {:.1}s",
            wall.as_secs_f64()
        ),
    }
    tally.wall = wall;
    tally.boot = guest.booted;
    tally.release = guest.release;
    tally.print_result();
    Ok(Outcome {
        tally,
        bench: guest.bench,
    })
}

#[derive(PartialEq, Debug)]
enum Event {
    Other,
    Done,
}

/// The guest protocol: `CT-BOOTED <name> <uname -r>`, `CT-PLAN <scenario runs>`,
/// `CT-RESULT <scenario> ok|ignored|FAILED <reason>`, `CT-BENCH <json>`, `CT-DONE`,
/// `CT-SCENARIOS-EXIT <status>`. Markers are found anywhere in a line because kernel messages
/// can share a console line with them.
struct Protocol {
    kernel: &'static str,
    tally: Tally,
    booted: Option<Duration>,
    /// The guest's `uname -r`.
    release: Option<String>,
    done: bool,
    scenarios_exit: Option<i32>,
    /// How many scenario results the guest announced (`CT-PLAN`), and how many came after.
    planned: Option<usize>,
    reported: usize,
    bench: Vec<String>,
}

impl Protocol {
    fn new(kernel: &'static str) -> Self {
        Self {
            kernel,
            tally: Tally::default(),
            booted: None,
            release: None,
            done: false,
            scenarios_exit: None,
            planned: None,
            reported: 0,
            bench: Vec::new(),
        }
    }

    /// Why a test run that printed CT-DONE still proved less than it should have: the guest
    /// never announced its scenarios, announced none, reported fewer, or its runner failed
    /// without a failed result to show for it.
    fn unfinished(&self) -> Option<String> {
        match (self.planned, self.scenarios_exit) {
            (None, _) => Some("the guest announced no scenarios (no CT-PLAN line)".into()),
            (Some(0), _) => Some("the guest selected no scenario to run".into()),
            (Some(n), _) if self.reported < n => Some(format!(
                "only {} of the {n} announced scenario results were reported",
                self.reported
            )),
            (_, None) => Some("ct-scenarios' exit status was never printed".into()),
            (_, Some(code)) if code != 0 && self.tally.ok() => Some(format!(
                "ct-scenarios exited with status {code} although no scenario failed"
            )),
            _ => None,
        }
    }

    fn line(&mut self, line: &str, elapsed: Duration) -> Event {
        if let Some(rest) = marker(line, "CT-BOOTED") {
            self.booted.get_or_insert(elapsed);
            self.release = rest.split_whitespace().nth(1).map(str::to_string);
        } else if let Some(rest) = marker(line, "CT-PLAN ") {
            self.planned = rest.trim().parse().ok();
        } else if let Some(rest) = marker(line, "CT-RESULT ") {
            let mut words = rest.splitn(3, ' ');
            let (scenario, verdict) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            if self.planned.is_some() {
                self.reported += 1;
            }
            let name = format!("vm::{}::{scenario}", self.kernel);
            match verdict {
                _ if scenario.is_empty() => {}
                "ok" => self.tally.pass(&name),
                "ignored" => self.tally.ignore(&name),
                "FAILED" => self
                    .tally
                    .fail(&name, words.next().unwrap_or("no reason given").trim()),
                other => self.tally.fail(
                    &name,
                    &format!("unknown verdict '{other}' in: {}", line.trim()),
                ),
            }
        } else if let Some(rest) = marker(line, "CT-BENCH ") {
            self.bench.push(rest.trim().to_string());
        } else if let Some(rest) = marker(line, "CT-SCENARIOS-EXIT ") {
            self.scenarios_exit = rest.trim().parse().ok();
        } else if marker(line, "CT-DONE").is_some() {
            self.done = true;
            return Event::Done;
        }
        Event::Other
    }
}

/// Drops terminal control sequences (SeaBIOS clears the screen and resets the terminal) but
/// keeps colour (SGR, `ESC [ ... m`), which the tracer's human output uses.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.peek() != Some(&'[') {
            chars.next(); // a two-character escape such as ESC c (terminal reset)
            continue;
        }
        let mut seq = String::from("\x1b");
        for c in chars.by_ref() {
            seq.push(c);
            if c.is_ascii_alphabetic() && seq.len() > 2 {
                break;
            }
        }
        if seq.ends_with('m') {
            out.push_str(&seq);
        }
    }
    out
}

fn marker<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    line.find(tag).map(|i| &line[i + tag.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_sequences_are_dropped_colour_kept() {
        assert_eq!(printable("\x1bc\x1b[?7l\x1b[2JSeaBIOS"), "SeaBIOS");
        assert_eq!(
            printable("\x1b[1;31mINVALID\x1b[0m x"),
            "\x1b[1;31mINVALID\x1b[0m x"
        );
        assert_eq!(printable("trailing \x1b"), "trailing ");
    }

    #[test]
    fn protocol_lines_become_results() {
        let mut p = Protocol::new("6.12");
        let t = Duration::from_secs(1);
        p.line("CT-BOOTED 6.12 6.12.115+deb12-cloud-amd64", t);
        p.line("CT-RESULT seq_over ok", t);
        p.line(
            "[   12.3] nf_ct_tcp: bad thing CT-RESULT ack_over FAILED expected 1 event, got 0",
            t,
        );
        p.line("CT-RESULT old_retransmit ignored", t);
        p.line("CT-RESULT weird maybe", t);
        p.line("CT-RESULT", t);
        p.line(r#"CT-BENCH {"kind":"env"}"#, t);
        assert_eq!(p.line("CT-DONE", t), Event::Done);
        p.line("CT-SCENARIOS-EXIT 1", t);
        assert_eq!(p.booted, Some(t));
        assert_eq!(p.release.as_deref(), Some("6.12.115+deb12-cloud-amd64"));
        assert!(p.done);
        assert_eq!(p.scenarios_exit, Some(1));
        assert_eq!(p.bench, [r#"{"kind":"env"}"#]);
        assert_eq!(p.tally.passed, 1);
        assert_eq!(p.tally.ignored, 1);
        let failed: Vec<_> = p
            .tally
            .failures
            .iter()
            .map(|(n, r)| (n.as_str(), r.as_str()))
            .collect();
        assert_eq!(failed[0], ("vm::6.12::ack_over", "expected 1 event, got 0"));
        assert_eq!(failed[1].0, "vm::6.12::weird");
        assert_eq!(failed.len(), 2);
    }

    /// A guest that printed CT-DONE fails its kernel unless it announced its scenarios, all of
    /// them reported and its runner exited cleanly.
    #[test]
    fn an_incomplete_guest_run_fails() {
        let t = Duration::from_secs(1);
        let run = |lines: &[&str]| {
            let mut p = Protocol::new("6.12");
            for l in lines {
                p.line(l, t);
            }
            p.unfinished()
        };
        let ok = [
            "CT-PLAN 2",
            "CT-RESULT a ok",
            "CT-RESULT b ok",
            "CT-DONE",
            "CT-SCENARIOS-EXIT 0",
        ];
        assert_eq!(run(&ok), None);
        // Kernel detection failed: the guest printed CT-DONE and nothing else.
        let none = run(&["CT-DONE", "CT-SCENARIOS-EXIT 1"]).unwrap();
        assert!(none.contains("no CT-PLAN"), "{none}");
        let zero = run(&["CT-PLAN 0", "CT-DONE", "CT-SCENARIOS-EXIT 0"]).unwrap();
        assert!(zero.contains("no scenario"), "{zero}");
        let short = run(&[
            "CT-PLAN 3",
            "CT-RESULT a ok",
            "CT-DONE",
            "CT-SCENARIOS-EXIT 0",
        ])
        .unwrap();
        assert!(short.contains("only 1 of the 3"), "{short}");
        let exit = run(&[
            "CT-PLAN 1",
            "CT-RESULT a ok",
            "CT-DONE",
            "CT-SCENARIOS-EXIT 2",
        ])
        .unwrap();
        assert!(exit.contains("status 2"), "{exit}");
        let silent = run(&["CT-PLAN 1", "CT-RESULT a ok", "CT-DONE"]).unwrap();
        assert!(silent.contains("never printed"), "{silent}");
        // A failed scenario explains a non-zero exit: it is already a failure of its own.
        let failed = [
            "CT-PLAN 1",
            "CT-RESULT a FAILED x",
            "CT-DONE",
            "CT-SCENARIOS-EXIT 1",
        ];
        assert_eq!(run(&failed), None);
    }
}
