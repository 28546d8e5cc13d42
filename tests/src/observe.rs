//! One observation window of a scenario: what the tracer printed, what the kernel logged and
//! how its counters moved, all over the same span of time.
//!
//! Order matters: the tracer is attached before the counters are read and the kernel log is
//! tailed, and the counters are read again before the tracer is stopped, so every packet
//! counted by the kernel in the window happened while the tracer was attached.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::counters::Counters;
use crate::kmsg::{CtLog, Kmsg};
use crate::topology::Topology;
use crate::tracer::{Trace, Tracer};

/// Time for conntrack log lines / tracer events of packets already sent to show up.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Observer<'a> {
    topo: &'a Topology,
    tracer: Option<Tracer>,
    tracer_error: Option<String>,
    kmsg: Kmsg,
    before: Vec<Counters>,
    logs: Vec<CtLog>,
}

pub struct Observation {
    pub before: Vec<Counters>,
    pub after: Vec<Counters>,
    /// Conntrack log lines about our test addresses.
    pub logs: Vec<CtLog>,
    /// `None` in oracle-only mode (no tracer run) or when it failed to start.
    pub trace: Option<Trace>,
    /// Why the tracer did not run although it should have.
    pub tracer_error: Option<String>,
}

impl<'a> Observer<'a> {
    /// `tracer_args: None` runs without a tracer (developing scenarios on a host that
    /// cannot attach kprobes). A tracer that fails to start fails the scenario later, but
    /// the scenario still runs so its kernel-side checks show whether the rest is sound.
    pub fn start(topo: &'a Topology, tracer_args: Option<&[String]>) -> Result<Observer<'a>> {
        let (tracer, tracer_error) = match tracer_args.map(Tracer::start_json) {
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
            kmsg,
            before,
            logs: Vec::new(),
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
        let new = self.kmsg.read_new()?;
        self.logs.extend(new.into_iter().filter(is_ours));
        Ok(())
    }

    /// Ends the window. `expected_events` says how many tracer events (invalid + ignored)
    /// the kernel log implies, so we wait for the tracer to catch up before stopping it.
    pub fn finish(mut self, expected_events: impl Fn(&[CtLog]) -> usize) -> Result<Observation> {
        self.poll_logs()?;
        let after = self.topo.counters()?;
        let trace = match self.tracer.take() {
            Some(tracer) => {
                let want = expected_events(&self.logs);
                let caught_up = tracer.wait_for(SETTLE_TIMEOUT, |evs| verdicts(evs) >= want);
                if !caught_up {
                    println!(
                        "observe: tracer reported {} of {want} expected events before stop",
                        verdicts(&tracer.events())
                    );
                }
                Some(tracer.stop()?)
            }
            None => None,
        };
        self.poll_logs()?;
        for log in &self.logs {
            println!("kmsg: {}", log.summary());
        }
        for (b, a) in self.before.iter().zip(&after) {
            println!(
                "counters[{}]: invalid +{} ignore +{} drop +{} error +{}",
                a.netns,
                a.delta(b, "invalid"),
                a.delta(b, "ignore"),
                a.delta(b, "drop"),
                a.delta(b, "icmp_error")
            );
        }
        Ok(Observation {
            before: self.before,
            after,
            logs: self.logs,
            trace,
            tracer_error: self.tracer_error,
        })
    }
}

/// Lines about the test networks only (a development host may log other traffic).
fn is_ours(log: &CtLog) -> bool {
    let test_net = |a: std::net::Ipv4Addr| a.octets()[0] == 10 && matches!(a.octets()[1], 0 | 96);
    test_net(log.src) || test_net(log.dst)
}

fn verdicts(events: &[Value]) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == "invalid" || e["event"] == "ignored")
        .count()
}

impl Observation {
    /// `invalid` counter growth in the namespace with this inode.
    pub fn invalid_delta(&self, inode: u64) -> u64 {
        self.before
            .iter()
            .zip(&self.after)
            .find(|(_, a)| a.inode == inode)
            .map(|(b, a)| a.delta(b, "invalid"))
            .unwrap_or(0)
    }
}
