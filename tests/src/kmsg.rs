//! The kernel log as an oracle: with `nf_conntrack_log_invalid` set, conntrack logs every
//! INVALID (and, on 6.1+, IGNORE) verdict through nf_log, one line per packet, e.g.
//!
//! `nf_ct_proto_6: SEQ is over upper bound 2839577113 (over the window of the receiver)
//!  IN=veth-client OUT= MAC=... SRC=10.0.1.2 DST=10.0.0.1 ... SPT=8080 DPT=41234 SEQ=.. ACK=..`
//!
//! The reason text between the prefix and ` IN=` is exactly what the tracer must report as
//! `reason`, and its `%u` is the `window.bound`.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{Context, Result};

/// A `/dev/kmsg` reader positioned after everything logged before it was opened.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    pub fn open_at_end() -> Result<Kmsg> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .context("open /dev/kmsg")?;
        file.seek(SeekFrom::End(0)).context("seek /dev/kmsg")?;
        Ok(Kmsg { file })
    }

    /// Every message logged since the last call (non-blocking), without the record header.
    pub fn read_new(&mut self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        // One read() returns exactly one record; 8 KiB is the kernel's record limit.
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = record.split_once(';') {
                        out.push(msg.trim_end().to_string());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // Records were overwritten before we read them: carry on with the rest,
                // the counters will then disagree and say so.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e).context("read /dev/kmsg"),
            }
        }
        Ok(out)
    }
}

/// One `nf_ct_proto_N:` line.
#[derive(Clone, Debug, PartialEq)]
pub struct CtLog {
    pub protonum: u8,
    pub reason: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub seq: Option<u32>,
    pub ack: Option<u32>,
    /// ICMP type and code (absent when the header is cut short: nf_log then says
    /// "INCOMPLETE").
    pub icmp: Option<(u8, u8)>,
}

impl CtLog {
    pub fn parse(message: &str) -> Option<CtLog> {
        let rest = &message[message.find("nf_ct_proto_")? + "nf_ct_proto_".len()..];
        let (proto, rest) = rest.split_once(": ")?;
        let (reason, fields) = rest.split_once(" IN=")?;
        let field = |key: &str| {
            fields
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        };
        Some(CtLog {
            protonum: proto.parse().ok()?,
            reason: reason.trim().to_string(),
            src: field("SRC")?.parse().ok()?,
            dst: field("DST")?.parse().ok()?,
            sport: field("SPT").and_then(|v| v.parse().ok()),
            dport: field("DPT").and_then(|v| v.parse().ok()),
            seq: field("SEQ").and_then(|v| v.parse().ok()),
            ack: field("ACK").and_then(|v| v.parse().ok()),
            icmp: field("TYPE")
                .and_then(|t| t.parse().ok())
                .zip(field("CODE").and_then(|c| c.parse().ok())),
        })
    }

    /// The `%u` bound the 6.1+ window messages carry (older kernels print no number). The
    /// overshoot line's number is a byte count, not a bound: see `overshoot`.
    pub fn bound(&self) -> Option<u64> {
        if self.overshoot().is_some() {
            return None;
        }
        self.reason.split_whitespace().find_map(|w| w.parse().ok())
    }

    /// N of "N bytes more than expected" (5.19+: a segment past the receiver's window end
    /// that conntrack lets pass), which the kernel computes as `end - td_maxend + 1`.
    pub fn overshoot(&self) -> Option<u64> {
        self.reason
            .strip_suffix(" bytes more than expected")?
            .parse()
            .ok()
    }

    /// Kernel semantics of the window messages since 6.1: logged, but the packet keeps its
    /// conntrack entry (NFCT_TCP_IGNORE). Everything else conntrack logs is INVALID.
    pub fn is_window_ignore(&self) -> bool {
        [
            "SEQ is under lower bound",
            "ignored ACK under lower bound",
            "bytes more than expected",
        ]
        .iter()
        .any(|m| self.reason.contains(m))
    }

    pub fn involves_port(&self, port: u16) -> bool {
        self.sport == Some(port) || self.dport == Some(port)
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "proto {} {}:{} -> {}:{}",
            self.protonum,
            self.src,
            self.sport.unwrap_or(0),
            self.dst,
            self.dport.unwrap_or(0)
        );
        if let (Some(seq), Some(ack)) = (self.seq, self.ack) {
            s += &format!(" seq {seq} ack {ack}");
        }
        s + &format!(" \"{}\"", self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_window_line_with_bound() {
        let msg = "nf_ct_proto_6: SEQ is over upper bound 2839577113 (over the window of the receiver) \
                   IN=veth-client OUT= MAC=aa:bb SRC=10.0.1.2 DST=10.0.0.1 LEN=140 TOS=0x00 PREC=0x00 \
                   TTL=64 ID=0 DF PROTO=TCP SPT=8080 DPT=41234 SEQ=3107012473 ACK=1799 WINDOW=512 \
                   RES=0x00 ACK PSH URGP=0";
        let log = CtLog::parse(msg).unwrap();
        assert_eq!(log.protonum, 6);
        assert_eq!(
            log.reason,
            "SEQ is over upper bound 2839577113 (over the window of the receiver)"
        );
        assert_eq!(log.bound(), Some(2839577113));
        assert_eq!((log.sport, log.dport), (Some(8080), Some(41234)));
        assert_eq!((log.seq, log.ack), (Some(3107012473), Some(1799)));
        assert!(!log.is_window_ignore());
    }

    #[test]
    fn overshoot_count_is_no_bound() {
        let msg = "nf_ct_proto_6: 12 bytes more than expected IN=veth-client OUT= SRC=10.0.1.2 \
                   DST=10.0.0.1 LEN=50 PROTO=TCP SPT=8080 DPT=41234 SEQ=5 ACK=7 WINDOW=512";
        let log = CtLog::parse(msg).unwrap();
        assert_eq!((log.overshoot(), log.bound()), (Some(12), None));
        assert!(log.is_window_ignore());
    }

    #[test]
    fn icmp_type_is_the_outer_one() {
        let msg = "nf_ct_proto_1: bad hw icmp checksum IN=veth-client OUT= SRC=10.0.1.2 \
                   DST=10.0.0.1 LEN=64 PROTO=ICMP TYPE=3 CODE=0 [SRC=10.0.0.1 DST=10.0.1.2 \
                   LEN=36 PROTO=UDP SPT=7100 DPT=7101 LEN=16 ]";
        let log = CtLog::parse(msg).unwrap();
        assert_eq!(log.icmp, Some((3, 0)));
    }

    #[test]
    fn parses_udp_line_without_seq() {
        let msg = "nf_ct_proto_17: truncated/malformed packet IN=veth-client OUT= SRC=10.0.1.2 \
                   DST=10.0.0.1 LEN=40 PROTO=UDP SPT=5353 DPT=5353 LEN=84";
        let log = CtLog::parse(msg).unwrap();
        assert_eq!(log.reason, "truncated/malformed packet");
        assert_eq!(log.bound(), None);
        assert_eq!(log.seq, None);
    }
}
