//! One observation window of a scenario: what the tracer printed, what the kernel logged and
//! how its counters moved, all over the same span of time.
//!
//! Order matters: the tracer is attached before the counters are read and the kernel log is
//! tailed, and the counters are read again before the tracer is stopped, so every packet
//! counted by the kernel in the window happened while the tracer was attached.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::counters::Counters;
use crate::kmsg::{CtLog, Kmsg};
use crate::scenarios::Ctx;
use crate::topology::Topology;
use crate::tracer::{Trace, Tracer};

/// Time for conntrack log lines / tracer events of packets already sent to show up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Observer<'a> {
    topo: &'a Topology,
    tracer: Option<Tracer>,
    tracer_error: Option<String>,
    complete: bool,
    expected_mode: conntrack_trace::plan::Mode,
    kmsg: Kmsg,
    before: Vec<Counters>,
    logs: Vec<CtLog>,
    messages: Vec<String>,
}

pub struct Observation {
    pub before: Vec<Counters>,
    pub after: Vec<Counters>,
    /// Conntrack log lines about our test addresses.
    pub logs: Vec<CtLog>,
    /// Other kernel messages of netfilter conntrack ("nf_conntrack: table full, ...").
    pub messages: Vec<String>,
    /// `None` in oracle-only mode (no tracer run) or when it failed to start.
    pub trace: Option<Trace>,
    /// Why the tracer did not run although it should have.
    pub tracer_error: Option<String>,
    /// The tracer saw every verdict (fexit or the kprobe pair): it also reports INVALIDs the
    /// kernel does not log.
    pub complete: bool,
    /// The summary's `mode` this run must show.
    pub expected_mode: conntrack_trace::plan::Mode,
}

impl<'a> Observer<'a> {
    /// Starts the tracer in the pass's mode with `args` (none in oracle-only runs, for
    /// developing scenarios on a host that cannot attach kprobes). A tracer that fails to
    /// start fails the scenario later, but the scenario still runs so its kernel-side checks
    /// show whether the rest is sound.
    pub fn start(topo: &'a Topology, ctx: &Ctx, args: &[String]) -> Result<Observer<'a>> {
        let (tracer, tracer_error) = match ctx.tracer_args(args).as_deref().map(Tracer::start_json)
        {
            None => (None, None),
            Some(Ok(t)) => (Some(t), None),
            Some(Err(e)) => (None, Some(format!("{e:#}"))),
        };
        let kmsg = Kmsg::open_at_end()?;
        let before = topo.counters()?;
        Ok(Observer {
            topo,
            tracer,
            tracer_error,
            complete: ctx.complete(),
            expected_mode: ctx.expected_mode(),
            kmsg,
            before,
            logs: Vec::new(),
            messages: Vec::new(),
        })
    }

    /// Waits (bounded) until the kernel has logged at least `n` lines for our addresses.
    pub fn wait_logs(&mut self, n: usize) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            self.poll_logs()?;
            if self.logs.len() >= n || Instant::now() > deadline {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn poll_logs(&mut self) -> Result<()> {
        for msg in self.kmsg.read_new()? {
            match CtLog::parse(&msg) {
                Some(log) if is_ours(&log) => self.logs.push(log),
                Some(_) => {}
                None if msg.contains("nf_conntrack") => self.messages.push(msg),
                None => {}
            }
        }
        Ok(())
    }

    /// Ends the window. `expected_events` says, from the kernel's side of the window, how
    /// many tracer events (invalid + ignored + drop) to wait for before stopping the tracer.
    pub fn finish(
        mut self,
        expected_events: impl Fn(&Observation) -> usize,
    ) -> Result<Observation> {
        self.poll_logs()?;
        let after = self.topo.counters()?;
        let mut obs = Observation {
            before: std::mem::take(&mut self.before),
            after,
            logs: self.logs.clone(),
            messages: Vec::new(),
            trace: None,
            tracer_error: self.tracer_error.take(),
            complete: self.complete,
            expected_mode: self.expected_mode,
        };
        if let Some(tracer) = self.tracer.take() {
            let want = expected_events(&obs);
            let caught_up = tracer.wait_for(SETTLE_TIMEOUT, |evs| verdicts(evs) >= want);
            if !caught_up {
                println!(
                    "observe: tracer reported {} of {want} expected events before stop",
                    verdicts(&tracer.events())
                );
            }
            obs.trace = Some(tracer.stop()?);
        }
        // Lines the kernel printed while the tracer drained still belong to the window.
        self.poll_logs()?;
        obs.logs = self.logs;
        obs.messages = self.messages;
        for log in &obs.logs {
            println!("kmsg: {}", log.summary());
        }
        for msg in &obs.messages {
            println!("kmsg: {msg}");
        }
        for (b, a) in obs.before.iter().zip(&obs.after) {
            println!(
                "counters[{}]: invalid +{} ignore +{} drop +{} early_drop +{} error +{}",
                a.netns,
                a.delta(b, "invalid"),
                a.delta(b, "ignore"),
                a.delta(b, "drop"),
                a.delta(b, "early_drop"),
                a.delta(b, "icmp_error")
            );
        }
        Ok(obs)
    }
}

/// Lines about the test networks only (a development host may log other traffic).
fn is_ours(log: &CtLog) -> bool {
    let test_net = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets()[0] == 10 && matches!(a.octets()[1], 0 | 96),
        IpAddr::V6(a) => crate::topology::is_test_ipv6(a),
    };
    test_net(log.src) || test_net(log.dst)
}

/// Per-packet events: verdicts and drops (not resets, incidents or the summary).
fn verdicts(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e["event"].as_str(), Some("invalid" | "ignored" | "drop")))
        .count()
}

impl Observation {
    /// Growth of counter `column` in the namespace with this inode.
    pub fn delta(&self, inode: u64, column: &str) -> u64 {
        self.before
            .iter()
            .zip(&self.after)
            .find(|(_, a)| a.inode == inode)
            .map(|(b, a)| a.delta(b, column))
            .unwrap_or(0)
    }

    /// `invalid` counter growth in the namespace with this inode.
    pub fn invalid_delta(&self, inode: u64) -> u64 {
        self.delta(inode, "invalid")
    }

    /// The tracer's events of one kind (`invalid`, `incident`, ...).
    pub fn events(&self, kind: &str) -> Vec<&Value> {
        self.trace
            .iter()
            .flat_map(|t| &t.events)
            .filter(|e| e["event"] == kind)
            .collect()
    }
}
