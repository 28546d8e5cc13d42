//! `--record FILE` and `replay FILE`: the raw ring-buffer records of a session, replayable
//! offline through the same decoder and outputs. For bug reports, for looking again at an
//! incident, and as real captured fixtures for the tests and benchmarks.
//!
//! Format: magic, the ABI's struct sizes (a file from another ABI is refused, not misread),
//! the recording machine's boot time, then `u32 length (LE) + record` repeated. One older
//! ABI is read: the one before `PacketEvent::seqadj`, whose packet records are that much
//! shorter and are padded with zeros (no seqadj extension). A file ends
//! after any whole record; a tracer killed mid-write leaves a cut last record, which `replay`
//! reports with its offset after printing the rest.

use std::{
    fmt,
    fs::File,
    io::{self, BufReader, BufWriter, Read, Write},
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use conntrack_trace_common::{ct::SeqAdj, kind, reset::ResetEvent, verdict::PacketEvent};

use crate::{
    events::{Events, Stop},
    hints::{Hints, Node},
    output::Output,
    verdict::Clock,
};

const MAGIC: &[u8; 8] = b"CTTRACE\x01";
/// Magic, two struct sizes, boot time.
const HEADER: usize = 24;

fn sizes() -> [u32; 2] {
    [
        size_of::<PacketEvent>() as u32,
        size_of::<ResetEvent>() as u32,
    ]
}

/// The struct sizes of recordings made before `PacketEvent` ended with `seqadj`.
fn sizes_before_seqadj() -> [u32; 2] {
    let [packet, reset] = sizes();
    [packet - size_of::<SeqAdj>() as u32, reset]
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

/// The most a record can be: the largest event is a few hundred bytes; a length past this
/// is a corrupt file, refused before anything is allocated for it.
pub const MAX_RECORD: usize = 1 << 16;

/// Why a recording could not be read to its end.
#[derive(Debug)]
pub enum ReadError {
    /// The file ends inside a record (the tracer was killed mid-write): every record before
    /// `offset`, where the cut one starts, was complete. `want` is its whole size, unknown
    /// when the cut is inside its length.
    Cut {
        offset: u64,
        have: usize,
        want: Option<usize>,
    },
    /// A record length no event can have, at byte `offset`.
    Corrupt {
        offset: u64,
        len: usize,
    },
    Io(io::Error),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Cut { offset, have, want } => {
                write!(
                    f,
                    "cut off at byte {offset}: the last record has {have} of its "
                )?;
                match want {
                    Some(n) => write!(f, "{n} bytes")?,
                    None => write!(f, "bytes, not even its 4-byte length")?,
                }
                write!(f, " (the tracer stopped mid-write)")
            }
            ReadError::Corrupt { offset, len } => write!(
                f,
                "corrupt recording: a {len}-byte record at byte {offset} (at most {MAX_RECORD})"
            ),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// A recording read one record at a time: memory stays one record, however long the file.
pub struct Reader<R> {
    input: R,
    clock: Clock,
    /// Bytes consumed so far: where the next record starts.
    offset: u64,
    /// A recording from before `PacketEvent::seqadj`: packet records get it zeroed.
    before_seqadj: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self> {
        let mut head = [0u8; HEADER];
        let got = read_full(&mut input, &mut head)?;
        if got < HEADER {
            bail!("not a conntrack-trace recording (too short)");
        }
        if &head[..8] != MAGIC {
            bail!("not a conntrack-trace recording (bad magic)");
        }
        let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let got = [word(8), word(12)];
        let before_seqadj = got == sizes_before_seqadj();
        if got != sizes() && !before_seqadj {
            bail!(
                "recorded with another event ABI (struct sizes {got:?}, this build {:?})",
                sizes()
            );
        }
        let mut boot = [0u8; 8];
        boot.copy_from_slice(&head[16..24]);
        let boot = UNIX_EPOCH + Duration::from_nanos(u64::from_le_bytes(boot));
        Ok(Self {
            input,
            clock: Clock::from_boot_wall(boot),
            offset: HEADER as u64,
            before_seqadj,
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// How many bytes of the input the reader has consumed: the header and every record
    /// yielded so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next record into `buf` (replacing its contents); `Ok(false)` at a clean end.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, ReadError> {
        let start = self.offset;
        let mut len = [0u8; 4];
        let got = read_full(&mut self.input, &mut len).map_err(ReadError::Io)?;
        if got == 0 {
            return Ok(false);
        }
        if got < len.len() {
            return Err(ReadError::Cut {
                offset: start,
                have: got,
                want: None,
            });
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_RECORD {
            return Err(ReadError::Corrupt {
                offset: start,
                len: n,
            });
        }
        buf.clear();
        buf.resize(n, 0);
        let got = read_full(&mut self.input, buf).map_err(ReadError::Io)?;
        if got < n {
            return Err(ReadError::Cut {
                offset: start,
                have: 4 + got,
                want: Some(4 + n),
            });
        }
        self.offset = start + 4 + n as u64;
        if self.before_seqadj
            && n == sizes_before_seqadj()[0] as usize
            && buf[..4] == kind::PACKET.to_ne_bytes()
        {
            buf.resize(size_of::<PacketEvent>(), 0);
        }
        Ok(true)
    }
}

/// Fills `buf` as far as the input goes; returns how many bytes it got (fewer only at EOF).
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads a whole recording: its clock and its records (for tests and benchmarks; `replay`
/// streams). A cut or corrupt file is an error.
pub fn read(input: impl Read) -> Result<(Clock, Vec<Vec<u8>>)> {
    let mut reader = Reader::new(input)?;
    let mut records = Vec::new();
    let mut rec = Vec::new();
    while reader.next_into(&mut rec)? {
        records.push(std::mem::take(&mut rec));
    }
    Ok((reader.clock, records))
}

/// `conntrack-trace replay FILE`: the recorded session through the same outputs, one record
/// at a time. A recording cut off mid-record still has every complete record printed, and
/// the summary; then the cut is reported and the result is `Ok(false)` (exit status 1).
pub fn replay(path: &Path, out: &mut dyn Output, resets: bool, count: Option<u64>) -> Result<bool> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader =
        Reader::new(BufReader::new(f)).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Events::new(reader.clock, Hints::new(Node::read()), resets, count);
    let mut rec = Vec::new();
    let mut cut = None;
    loop {
        match reader.next_into(&mut rec) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e @ ReadError::Cut { .. }) => {
                cut = Some(e);
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        match events.handle(&rec, out) {
            Ok(()) => {}
            Err(Stop::Closed) => return Ok(true),
            Err(Stop::Count) => break,
            Err(Stop::Io(k)) => bail!("writing output: {}", io::Error::from(k)),
        }
    }
    match out.summary(&events.summary).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(true),
        r => r.context("writing the summary")?,
    }
    match cut {
        Some(e) => {
            eprintln!(
                "conntrack-trace: warning: {} is {e}; every complete record before it was shown",
                path.display()
            );
            Ok(false)
        }
        None => Ok(true),
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

    /// A recording made before `PacketEvent::seqadj` existed reads on, its packet records
    /// padded to the current event with the extension absent; other records stay as they are.
    #[test]
    fn a_recording_from_before_seqadj_reads_as_events_without_it() {
        let [old_packet, reset] = sizes_before_seqadj();
        let mut file = MAGIC.to_vec();
        for s in [old_packet, reset] {
            file.extend_from_slice(&s.to_le_bytes());
        }
        file.extend_from_slice(&0u64.to_le_bytes());
        let mut packet = vec![0x5a; old_packet as usize];
        packet[..4].copy_from_slice(&kind::PACKET.to_ne_bytes());
        let other = [7u8; 12];
        for rec in [&packet[..], &other[..]] {
            file.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            file.extend_from_slice(rec);
        }
        let (_, recs) = read(&file[..]).unwrap();
        assert_eq!(recs[0].len(), size_of::<PacketEvent>());
        assert_eq!(
            recs[0][..packet.len()],
            packet[..],
            "the old bytes kept in place"
        );
        let ev = crate::verdict::parse(&recs[0]).unwrap();
        assert_eq!(ev.seqadj, SeqAdj::default());
        assert_eq!(recs[1], other);
    }

    fn recording(records: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut r = Recorder::new(&mut buf, &Clock::now()).unwrap();
        for rec in records {
            r.write(rec).unwrap();
        }
        buf
    }

    /// Every record the reader yields before it stops, and how it stopped.
    fn stream(bytes: &[u8]) -> (Vec<Vec<u8>>, Result<(), ReadError>) {
        let mut reader = Reader::new(bytes).unwrap();
        let (mut got, mut rec) = (Vec::new(), Vec::new());
        loop {
            match reader.next_into(&mut rec) {
                Ok(true) => got.push(rec.clone()),
                Ok(false) => return (got, Ok(())),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    #[test]
    fn a_cut_anywhere_in_the_last_record_keeps_the_others_and_names_its_offset() {
        let full = recording(&[b"first", b"second!", b"third record"]);
        let last_starts = (HEADER + 4 + 5 + 4 + 7) as u64;
        for cut in last_starts as usize + 1..full.len() {
            let (got, end) = stream(&full[..cut]);
            assert_eq!(
                got,
                [b"first".to_vec(), b"second!".to_vec()],
                "cut at {cut}"
            );
            match end {
                Err(ReadError::Cut { offset, have, want }) => {
                    assert_eq!(offset, last_starts, "cut at {cut}");
                    let have_want = (cut - last_starts as usize, (have >= 4).then_some(4 + 12));
                    assert_eq!((have, want), have_want, "cut at {cut}");
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // A cut exactly between records is a clean end.
        let (got, end) = stream(&full[..last_starts as usize]);
        assert_eq!(got.len(), 2);
        assert!(end.is_ok());
    }

    #[test]
    fn an_impossible_length_is_refused_before_allocating() {
        let mut bytes = recording(&[b"ok"]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let (got, end) = stream(&bytes);
        assert_eq!(got, [b"ok".to_vec()]);
        match end {
            Err(ReadError::Corrupt { offset, len }) => {
                assert_eq!((offset, len), ((HEADER + 6) as u64, u32::MAX as usize));
            }
            other => panic!("{other:?}"),
        }
        let largest = recording(&[&[0; MAX_RECORD]]);
        assert_eq!(stream(&largest).0[0].len(), MAX_RECORD);
    }

    #[test]
    fn a_header_cut_short_is_not_a_recording() {
        let full = recording(&[]);
        for cut in 0..HEADER {
            let e = Reader::new(&full[..cut]).err().expect("refused");
            assert!(e.to_string().contains("too short"), "{e}");
        }
        assert!(Reader::new(&full[..]).is_ok());
    }

    /// `replay` does not hold the file: a reader over an endless input yields records one at
    /// a time (reading it whole would never return).
    #[test]
    fn records_are_yielded_as_they_are_read() {
        let head = recording(&[]);
        let endless = head.as_slice().chain(io::repeat(0));
        let mut reader = Reader::new(endless).unwrap();
        let mut rec = vec![1; 10];
        for _ in 0..1000 {
            assert!(reader.next_into(&mut rec).unwrap());
            assert!(rec.is_empty(), "a zero length is an empty record");
        }
    }
}
