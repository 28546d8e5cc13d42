//! How many lines the kernel logged over a span of time, counted even when the log buffer
//! wrapped: a flood of conntrack log lines can overwrite `/dev/kmsg` records before anyone
//! reads them, so lines are counted by record sequence number between two markers this
//! module writes, and the conntrack lines still readable are counted as a cross-check.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Markers are logged by us, so they show up within milliseconds.
const MARKER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct LogSpan {
    file: File,
    start_seq: u64,
}

pub struct LogCount {
    /// Records logged strictly between the two markers, by sequence number.
    pub records: u64,
    /// Of the records still in the buffer when read, those from conntrack (`nf_ct_proto_`).
    pub conntrack_read: u64,
    /// All records still in the buffer when read.
    pub read: u64,
    /// Records were overwritten before they could be read (then only `records` is exact).
    pub wrapped: bool,
}

impl LogSpan {
    pub fn start() -> Result<LogSpan> {
        // Each open /dev/kmsg has its own write rate limit (10 per 5 s): two markers fit.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .context("open /dev/kmsg")?;
        file.seek(SeekFrom::End(0)).context("seek /dev/kmsg")?;
        let mut span = LogSpan { file, start_seq: 0 };
        span.start_seq = span.mark("start", &mut |_| {})?;
        Ok(span)
    }

    pub fn finish(mut self) -> Result<LogCount> {
        let (mut read, mut conntrack_read) = (0, 0);
        let mut wrapped = false;
        let end_seq = {
            let mut seen = |r: Record| match r {
                Record::Message(msg) => {
                    read += 1;
                    if msg.contains("nf_ct_proto_") {
                        conntrack_read += 1;
                    }
                }
                Record::Wrapped => wrapped = true,
            };
            self.mark("end", &mut seen)?
        };
        Ok(LogCount {
            records: end_seq - self.start_seq - 1,
            conntrack_read,
            read,
            wrapped,
        })
    }

    /// Logs a marker and reads up to it, handing every other record to `seen`; returns the
    /// marker's sequence number.
    fn mark(&mut self, what: &str, seen: &mut dyn FnMut(Record)) -> Result<u64> {
        let marker = format!("ct-bench: log span {what} {}", std::process::id());
        // Without the newline the record stays open (a continuation could follow) and no
        // reader sees it until something else is logged.
        self.file
            .write_all(format!("{marker}\n").as_bytes())
            .context("write a marker to /dev/kmsg")?;
        let deadline = Instant::now() + MARKER_TIMEOUT;
        // One read() returns exactly one record; 8 KiB is the kernel's record limit.
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    let (header, msg) = record.split_once(';').unwrap_or(("", &record));
                    if msg.trim_end() == marker {
                        return sequence(header);
                    }
                    seen(Record::Message(msg.to_string()));
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => seen(Record::Wrapped),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        bail!("our /dev/kmsg marker did not show up within {MARKER_TIMEOUT:?}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("read /dev/kmsg"),
            }
        }
    }
}

enum Record {
    Message(String),
    Wrapped,
}

/// `prio,seq,timestamp,flags[,...]` -> seq.
fn sequence(header: &str) -> Result<u64> {
    header
        .split(',')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no sequence number in /dev/kmsg header {header:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_the_second_header_field() {
        assert_eq!(sequence("12,3456,789012,-").unwrap(), 3456);
        assert!(sequence("garbage").is_err());
    }
}
