//! `--record FILE` and `replay FILE`: the raw ring-buffer records of a session, replayable
//! offline through the same decoder and outputs. For bug reports, for looking again at an
//! incident, and as real captured fixtures for the tests and benchmarks.
//!
//! Format: magic, the ABI's struct sizes (a file from another ABI is refused, not misread),
//! the recording machine's boot time, then `u32 length (LE) + record` repeated.

use std::{
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_common::{reset::ResetEvent, verdict::PacketEvent};

use crate::{
    events::{Events, Stop},
    hints::{Hints, Node},
    output::Output,
    verdict::Clock,
};

const MAGIC: &[u8; 8] = b"CTTRACE\x01";

fn sizes() -> [u32; 2] {
    [
        size_of::<PacketEvent>() as u32,
        size_of::<ResetEvent>() as u32,
    ]
}

pub struct Recorder<W: Write> {
    out: W,
}

impl Recorder<BufWriter<File>> {
    pub fn create(path: &Path, clock: &Clock) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Recorder::new(BufWriter::new(f), clock)
            .with_context(|| format!("writing {}", path.display()))
    }
}

impl<W: Write> Recorder<W> {
    pub fn new(mut out: W, clock: &Clock) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        for s in sizes() {
            out.write_all(&s.to_le_bytes())?;
        }
        let boot = clock
            .boot_wall()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        out.write_all(&(boot.as_nanos() as u64).to_le_bytes())?;
        Ok(Self { out })
    }

    /// Appends one record (written out by `flush`, once per batch).
    pub fn write(&mut self, record: &[u8]) -> io::Result<()> {
        self.out.write_all(&(record.len() as u32).to_le_bytes())?;
        self.out.write_all(record)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Reads a recording: its clock and its records.
pub fn read(mut input: impl Read) -> Result<(Clock, Vec<Vec<u8>>)> {
    let mut head = [0u8; 24];
    input
        .read_exact(&mut head)
        .context("not a conntrack-trace recording (too short)")?;
    if &head[..8] != MAGIC {
        bail!("not a conntrack-trace recording (bad magic)");
    }
    let got = [
        u32::from_le_bytes(head[8..12].try_into()?),
        u32::from_le_bytes(head[12..16].try_into()?),
    ];
    if got != sizes() {
        bail!(
            "recorded with another event ABI (struct sizes {got:?}, this build {:?})",
            sizes()
        );
    }
    let boot = UNIX_EPOCH + Duration::from_nanos(u64::from_le_bytes(head[16..24].try_into()?));
    let mut records = Vec::new();
    let mut len = [0u8; 4];
    loop {
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > 1 << 16 {
            bail!("corrupt recording: a {n}-byte record");
        }
        let mut rec = vec![0u8; n];
        input.read_exact(&mut rec).context("truncated recording")?;
        records.push(rec);
    }
    Ok((Clock::from_boot_wall(boot), records))
}

/// `conntrack-trace replay FILE`: the recorded session through the same outputs.
pub fn replay(path: &Path, out: &mut dyn Output, resets: bool, count: Option<u64>) -> Result<bool> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let (clock, records) =
        read(BufReader::new(f)).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Events::new(clock, Hints::new(Node::read()), resets, count);
    for r in &records {
        match events.handle(r, out) {
            Ok(()) => {}
            Err(Stop::Closed) => return Ok(true),
            Err(Stop::Count) => break,
            Err(Stop::Io(k)) => bail!("writing output: {}", io::Error::from(k)),
        }
    }
    match out.summary(&events.summary).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(true),
        r => r.map(|()| true).context("writing the summary"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let clock = Clock::now();
        let mut buf = Vec::new();
        let mut r = Recorder::new(&mut buf, &clock).unwrap();
        r.write(b"abcd").unwrap();
        r.write(&[7; 300]).unwrap();
        let (c, recs) = read(&buf[..]).unwrap();
        assert_eq!(recs, vec![b"abcd".to_vec(), vec![7; 300]]);
        let drift = c
            .boot_wall()
            .duration_since(clock.boot_wall())
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_micros(1), "boot time kept to the ns");
        assert!(read(&b"garbage-garbage-garbage-"[..]).is_err());
        let mut other_abi = buf.clone();
        other_abi[8] ^= 1;
        assert!(
            read(&other_abi[..])
                .unwrap_err()
                .to_string()
                .contains("another event ABI")
        );
        assert!(read(&buf[..buf.len() - 1]).is_err(), "truncated");
    }
}
