//! The tracer under test as a child process: start, wait for "attached", collect its JSON
//! lines, SIGINT, collect the summary.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::tools;

/// TCG is slow and the tracer parses BTF before attaching.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// The contract says "within a second"; leave room for an emulated CPU.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// PID of the running tracer, so the watchdog can kill it before giving up on a scenario.
pub static RUNNING_PID: AtomicI32 = AtomicI32::new(0);

pub struct Tracer {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<()>>,
}

/// Everything the tracer printed, split into per-packet events and the final summary.
pub struct Trace {
    pub events: Vec<Value>,
    pub summary: Option<Value>,
}

impl Tracer {
    /// `--json` mode: stdout lines are parsed and kept (and echoed as log).
    pub fn start_json(args: &[String]) -> Result<Tracer> {
        let mut all = vec!["--json".to_string()];
        all.extend_from_slice(args);
        Self::start(&all, true)
    }

    /// Human mode with stdout straight to the console (the demo).
    pub fn start_human(args: &[String]) -> Result<Tracer> {
        Self::start(args, false)
    }

    fn start(args: &[String], capture: bool) -> Result<Tracer> {
        let binary = tools::tracer();
        println!("tracer: starting {binary} {}", args.join(" "));
        let mut child = Command::new(&binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(if capture {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {binary}"))?;
        RUNNING_PID.store(child.id() as i32, Ordering::SeqCst);

        let events = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().map(|out| {
            let events = events.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    println!("tracer> {line}");
                    match serde_json::from_str::<Value>(&line) {
                        Ok(v) => events.lock().unwrap().push(v),
                        Err(e) => println!("tracer: unparsable JSON line ({e})"),
                    }
                }
            })
        });

        let (stderr, attached_rx) = watch_stderr(&mut child);

        let mut tracer = Tracer {
            child,
            events,
            stdout,
            stderr: Some(stderr),
        };
        if let Err(e) = wait_attached(&mut tracer.child, &attached_rx, ATTACH_TIMEOUT) {
            // Also when it exited: kill is then a no-op, and the readers are joined.
            tracer.kill();
            return Err(e);
        }
        Ok(tracer)
    }

    /// Events received so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Polls until `done(events)` holds; false on timeout.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if done(&self.events.lock().unwrap()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        done(&self.events.lock().unwrap())
    }

    /// SIGINT, then wait for the exit and the summary line.
    pub fn stop(mut self) -> Result<Trace> {
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let signalled = Instant::now();
        let deadline = signalled + EXIT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                print_tasks(self.child.id());
                self.kill();
                bail!("tracer still running {EXIT_TIMEOUT:?} after SIGINT");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        RUNNING_PID.store(0, Ordering::SeqCst);
        println!(
            "tracer: exited with {status}, {} ms after SIGINT",
            signalled.elapsed().as_millis()
        );
        self.join_readers();
        let mut events = std::mem::take(&mut *self.events.lock().unwrap());
        follows_the_schema(&events)?;
        let summary = match events.last() {
            Some(v) if v["event"] == "summary" => events.pop(),
            _ => None,
        };
        Ok(Trace { events, summary })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        RUNNING_PID.store(0, Ordering::SeqCst);
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for handle in [self.stdout.take(), self.stderr.take()]
            .into_iter()
            .flatten()
        {
            let _ = handle.join();
        }
    }
}

/// The JSON Schema the tracer under test publishes (`conntrack-trace schema`), read once.
fn schema() -> &'static Result<Value, String> {
    static SCHEMA: OnceLock<Result<Value, String>> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let binary = tools::tracer();
        let o = Command::new(&binary)
            .arg("schema")
            .output()
            .map_err(|e| format!("{binary} schema: {e}"))?;
        if !o.status.success() {
            return Err(format!("{binary} schema exited with {}", o.status));
        }
        serde_json::from_slice(&o.stdout).map_err(|e| format!("{binary} schema: not JSON: {e}"))
    })
}

/// Every line the tracer printed follows its published schema. Checked once it has exited,
/// so that checking never slows the reading of its output.
fn follows_the_schema(lines: &[Value]) -> Result<()> {
    let schema = schema().as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let broken: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            conntrack_trace::schema::validate(schema, l)
                .err()
                .map(|why| format!("{why}: {l}"))
        })
        .collect();
    println!(
        "tracer: {} JSON lines checked against the published schema, {} broke it",
        lines.len(),
        broken.len()
    );
    match broken.first() {
        Some(first) => bail!(
            "{} of the tracer's {} JSON lines break its published schema; the first: {first}",
            broken.len(),
            lines.len()
        ),
        None => Ok(()),
    }
}

/// Where each thread of a process is stuck, for a tracer that does not exit: name, state,
/// the kernel function it sleeps in and its kernel stack (as far as this kernel shows them).
fn print_tasks(pid: u32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let dir = task.path();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let status = read("status");
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or("?")
                .trim()
                .to_string()
        };
        println!(
            "tracer: thread {} {:?} state {} wchan {}",
            task.file_name().to_string_lossy(),
            field("Name:"),
            field("State:"),
            read("wchan")
        );
        for frame in read("stack").lines() {
            println!("tracer:     {frame}");
        }
    }
}

impl Drop for Tracer {
    /// A scenario that fails half-way must not leave a tracer attached for the next one.
    fn drop(&mut self) {
        if RUNNING_PID.load(Ordering::SeqCst) == self.child.id() as i32 {
            self.kill();
        }
    }
}

/// Waits for `watch_stderr`'s "attached" signal: an error when the tracer exits first or
/// `timeout` passes. Cleaning up the child is the caller's.
pub fn wait_attached(
    child: &mut Child,
    attached: &mpsc::Receiver<()>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if attached.recv_timeout(Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("tracer exited ({status}) before attaching");
        }
        if Instant::now() > deadline {
            bail!("tracer did not print \"attached\" within {timeout:?}");
        }
    }
}

/// Echoes the tracer's stderr as log; the receiver gets a message when it says "attached".
pub fn watch_stderr(child: &mut Child) -> (JoinHandle<()>, mpsc::Receiver<()>) {
    let (attached_tx, attached_rx) = mpsc::channel();
    let err = child.stderr.take().expect("stderr piped");
    let handle = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            println!("tracer: {line}");
            if line.contains("conntrack-trace: attached") {
                let _ = attached_tx.send(());
            }
        }
    });
    (handle, attached_rx)
}
