//! From ring-buffer records to outputs: decode by kind, attach hints, link resets to INVALID
//! packets, count for the summary. Shared by the live tracer and `replay`.

use std::{io, rc::Rc, sync::Arc, time::Duration};

use conntrack_trace_common::kind;

use crate::{
    hints::Hints,
    metrics::Metrics,
    output::Output,
    owner::{Owner, OwnerCache},
    reset::{self, Correlator},
    summary::Summary,
    verdict::{self, Clock},
};

/// Why handling stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// `--count` reached.
    Count,
    /// stdout is closed (`| head`): end quietly.
    Closed,
    Io(io::ErrorKind),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Stop::Closed
        } else {
            Stop::Io(e.kind())
        }
    }
}

pub struct Events {
    pub clock: Clock,
    pub summary: Summary,
    corr: Correlator,
    hints: Hints,
    /// Print RSTs no INVALID packet explains.
    resets: bool,
    count: Option<u64>,
    /// `--metrics`: every packet and incident handled is counted there too.
    pub metrics: Option<Arc<Metrics>>,
    /// Who owns each network namespace: the live tracer's (a replay has none, the recording's
    /// machine is elsewhere).
    pub owners: Option<OwnerCache>,
}

/// How long the first event of a namespace the owner cache does not know waits for the scan
/// it asks for (measured: 32 ms for 2,000 processes); its later events never wait.
const OWNER_WAIT: Duration = Duration::from_millis(100);

impl Events {
    pub fn new(clock: Clock, hints: Hints, resets: bool, count: Option<u64>) -> Self {
        Self {
            clock,
            summary: Summary::default(),
            corr: Correlator::default(),
            hints,
            resets,
            count,
            metrics: None,
            owners: None,
        }
    }

    fn owner(&self, netns: Option<u32>) -> Option<Arc<Owner>> {
        self.owners.as_ref()?.wait_for(netns?, OWNER_WAIT)
    }

    /// Handles one ring-buffer record. Malformed records are logged and skipped.
    pub fn handle(&mut self, bytes: &[u8], out: &mut dyn Output) -> Result<(), Stop> {
        let kind = bytes
            .get(..4)
            .map(|k| u32::from_ne_bytes([k[0], k[1], k[2], k[3]]));
        let written = match kind {
            Some(kind::PACKET) => match verdict::parse(bytes) {
                Ok(ev) => {
                    let mut r = verdict::decode(&ev, &self.clock);
                    r.hint = self.hints.get(r.reason_code());
                    r.owner = self.owner(r.netns);
                    self.summary.record(&r);
                    if let Some(m) = &self.metrics {
                        m.event(r.verdict, r.reason_code(), 1);
                    }
                    // Shared with the correlator, which keeps recent INVALID packets.
                    let r = Rc::new(r);
                    self.corr.invalid(&r);
                    out.event(&r)
                }
                Err(e) => {
                    log::warn!("{e}");
                    return Ok(());
                }
            },
            Some(kind::RESET) => match reset::parse(bytes) {
                Ok(ev) => {
                    let mut rst = reset::decode(&ev, &self.clock);
                    rst.owner = self.owner(rst.netns);
                    self.summary.resets += 1;
                    match self.corr.reset(&rst) {
                        Some(incident) => {
                            self.summary.incidents += 1;
                            if let Some(m) = &self.metrics {
                                m.incident();
                            }
                            out.incident(&incident)
                        }
                        None if self.resets => out.reset(&rst),
                        None => Ok(()),
                    }
                }
                Err(e) => {
                    log::warn!("{e}");
                    return Ok(());
                }
            },
            other => {
                log::warn!("unknown event kind {other:?}");
                return Ok(());
            }
        };
        match written {
            Err(e) => Err(Stop::from(e)),
            Ok(()) => match self.count {
                Some(n) if self.summary.events() >= n => Err(Stop::Count),
                _ => Ok(()),
            },
        }
    }
}
