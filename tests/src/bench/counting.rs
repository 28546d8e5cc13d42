//! The tracer as a child process whose `--json` lines are counted, not kept.
//!
//! `tracer::Tracer` keeps every event as a parsed value and echoes every line to the serial
//! console, which is right for a handful of scenario events; a 100,000-event flood would
//! then measure the emulated UART and the guest's memory instead of the tracer. Here a
//! reader thread classifies each line by its first key (`{"event":"<kind>"`, the order the
//! tracer writes its keys) and only parses `lost` and `summary` lines in full.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::tools;
use crate::tracer::{wait_attached, watch_stderr};

/// The tracer parses BTF before it attaches, which takes seconds under TCG.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(90);
/// After SIGINT the tracer drains what is left in the ring, up to a few hundred MiB here.
const EXIT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Default)]
pub struct Counts {
    /// `invalid` and `ignored` lines: one per packet conntrack judged.
    pub verdicts: AtomicU64,
    /// The sum of the `count` of `lost` lines.
    pub lost: AtomicU64,
    /// `lost` lines themselves.
    pub lost_lines: AtomicU64,
    /// Any other event kind (drop, reset, incident).
    pub other: AtomicU64,
    pub summary: Mutex<Option<Value>>,
}

pub struct CountingTracer {
    child: Child,
    pub counts: Arc<Counts>,
    readers: Vec<JoinHandle<()>>,
}

impl CountingTracer {
    /// Starts `conntrack-trace --json ARGS` and returns once it says it attached.
    pub fn start(args: &[String]) -> Result<CountingTracer> {
        let binary = tools::tracer();
        println!("bench: starting {binary} --json {}", args.join(" "));
        let mut child = Command::new(&binary)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {binary}"))?;
        let counts = Arc::new(Counts::default());
        let out = child.stdout.take().expect("stdout piped");
        let stdout = {
            let counts = counts.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    count_line(&counts, &line);
                }
            })
        };
        let (stderr, attached_rx) = watch_stderr(&mut child);
        let mut tracer = CountingTracer {
            child,
            counts,
            readers: vec![stdout, stderr],
        };
        if let Err(e) = wait_attached(&mut tracer.child, &attached_rx, ATTACH_TIMEOUT) {
            // Also when it exited: kill is then a no-op, and the readers are joined.
            tracer.kill();
            return Err(e);
        }
        Ok(tracer)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Verdict events plus reported losses so far: what must add up to the kernel's count.
    pub fn accounted(&self) -> u64 {
        self.counts.verdicts.load(Ordering::Relaxed) + self.counts.lost.load(Ordering::Relaxed)
    }

    /// SIGINT, wait for the exit, and return the summary line.
    pub fn stop(mut self) -> Result<Value> {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("tracer still running {EXIT_TIMEOUT:?} after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.join_readers();
        if !status.success() {
            bail!("tracer exited with {status}");
        }
        self.counts
            .summary
            .lock()
            .unwrap()
            .take()
            .context("tracer printed no summary line")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for handle in self.readers.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for CountingTracer {
    /// A bench step that fails half-way must not leave a tracer attached for the next one.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn count_line(counts: &Counts, line: &str) {
    let kind = line
        .strip_prefix("{\"event\":\"")
        .and_then(|rest| rest.split_once('"'))
        .map(|(kind, _)| kind);
    match kind {
        Some("invalid" | "ignored") => {
            counts.verdicts.fetch_add(1, Ordering::Relaxed);
        }
        Some("lost") => {
            let n = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v["count"].as_u64());
            match n {
                Some(n) => {
                    counts.lost.fetch_add(n, Ordering::Relaxed);
                    counts.lost_lines.fetch_add(1, Ordering::Relaxed);
                }
                None => println!("bench: unparsable lost line: {line}"),
            }
        }
        Some("summary") => match serde_json::from_str::<Value>(line) {
            Ok(v) => *counts.summary.lock().unwrap() = Some(v),
            Err(e) => println!("bench: unparsable summary line ({e}): {line}"),
        },
        Some(_) => {
            counts.other.fetch_add(1, Ordering::Relaxed);
        }
        None => println!("bench: unexpected tracer output: {line}"),
    }
}

/// User + system CPU time the process has used so far (all its threads).
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no ')' in /proc/pid/stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: u64 = fields
        .get(11..13)
        .context("short /proc/pid/stat")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()
        .context("utime/stime")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(ticks * 1000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_counted_by_kind() {
        let c = Counts::default();
        count_line(
            &c,
            r#"{"event":"invalid","time":"x","reason":"SEQ is over"}"#,
        );
        count_line(&c, r#"{"event":"ignored","time":"x"}"#);
        count_line(&c, r#"{"event":"lost","count":17}"#);
        count_line(&c, r#"{"event":"incident","client":"x"}"#);
        count_line(&c, r#"{"event":"summary","invalid":1,"lost":17}"#);
        assert_eq!(c.verdicts.load(Ordering::Relaxed), 2);
        assert_eq!(c.lost.load(Ordering::Relaxed), 17);
        assert_eq!(c.lost_lines.load(Ordering::Relaxed), 1);
        assert_eq!(c.other.load(Ordering::Relaxed), 1);
        assert_eq!(c.summary.lock().unwrap().as_ref().unwrap()["lost"], 17);
    }
}
