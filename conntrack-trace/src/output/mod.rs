//! Renderers: one module per output format.

pub mod json;
pub mod pcap;
pub mod text;

use std::{
    fmt::{self, Write as _},
    io,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use conntrack_trace_common::{closed_set, string_schema};

use crate::{
    owner::Owner,
    reset::{Incident, Reset},
    summary::Summary,
    verdict::Record,
};

pub trait Output {
    fn event(&mut self, r: &Record) -> io::Result<()>;
    /// `n` events the kernel could not put in the ring buffer since the last report.
    fn lost(&mut self, n: u64, cause: Loss) -> io::Result<()>;
    /// An RST for a packet with no socket that no INVALID packet explains.
    fn reset(&mut self, r: &Reset) -> io::Result<()>;
    /// An INVALID packet and the RST that answered it.
    fn incident(&mut self, i: &Incident) -> io::Result<()>;
    fn summary(&mut self, s: &Summary) -> io::Result<()>;
    /// Writes out what is buffered. Called after each batch read from the ring buffer, so
    /// an event is never held back waiting for the next one, and a flood costs one write per
    /// batch instead of one per event.
    fn flush(&mut self) -> io::Result<()>;
}

closed_set! {
    /// Why events are missing from the stream: a `lost` line's `cause`.
    pub enum Loss {
        /// The ring buffer had no room: counted by our programs.
        RingFull = "ring_full",
        /// The kernel skipped a run of one of our programs because a BPF program was already
        /// running on that CPU (its `recursion_misses`): that packet's verdict or reason was
        /// not seen.
        Recursion = "recursion",
        /// The kprobe pair on `nf_conntrack_in` saw a call's entry without its return or its
        /// return without its entry (a probe the kernel skipped or could not run): that
        /// call's verdict was not seen.
        Unpaired = "unpaired",
        /// The kernel could not run one of our kprobes or kretprobes for a hit (one was
        /// already running on that CPU, or no return instance was free): its link's
        /// `missed` count (6.7+). That call's verdict, reason or drop was not seen.
        KprobeMissed = "kprobe_missed",
    }
}

string_schema!(Loss);

/// One sentence a reader can act on: what happened to the connection, with the roles.
pub fn incident_story(i: &Incident) -> String {
    let inv = &i.invalid;
    let trig = &i.reset.trigger;
    let mut s = String::with_capacity(320);
    // Writing to a String cannot fail.
    if let Some((client, svc, backend)) = i.roles() {
        let _ = write!(
            s,
            "client {} -> Service {} -> backend {}: ",
            Known(Some((client.saddr, client.sport))),
            Known(Some(svc)),
            Known(Some(backend))
        );
    }
    let _ = write!(
        s,
        "segment {} > {} was INVALID ({}) in netns {}, so it was not NATed; netns {} had no \
         socket for it and answered RST {} > {}: {}",
        Known(inv.pkt.saddr.zip(inv.pkt.sport)),
        Known(inv.pkt.daddr.zip(inv.pkt.dport)),
        inv.reason_code(),
        Netns(inv.netns, inv.owner.as_deref()),
        Netns(i.reset.netns, i.reset.owner.as_deref()),
        Known(trig.daddr.zip(trig.dport)),
        Known(trig.saddr.zip(trig.sport)),
        i.effect().sentence(),
    );
    s
}

/// Dotted IPv4, digit by digit: `Ipv4Addr`'s `Display` (with its padding support) costs
/// ~800 instructions, more than the rest of an event line.
pub fn ipv4(a: Ipv4Addr, buf: &mut [u8; 15]) -> &str {
    let mut len = 0;
    for (i, o) in a.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if o >= 100 {
            buf[len] = b'0' + o / 100;
            len += 1;
        }
        if o >= 10 {
            buf[len] = b'0' + o / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + o % 10;
        len += 1;
    }
    // SAFETY: only ASCII digits and dots were written (checking costs more than the rest).
    unsafe { std::str::from_utf8_unchecked(&buf[..len]) }
}

/// A namespace's inode (`?` when the event lacks it) and its owner where known:
/// `4026532124 (ip netns client, pid 57 sleep)`.
pub struct Netns<'a>(pub Option<u32>, pub Option<&'a Owner>);

impl fmt::Display for Netns<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Known(self.0).fmt(f)?;
        f.write_str(self.1.map_or("", |o| o.text()))
    }
}

/// A value the event may lack, shown as `?` then; an (address, port) pair as `addr:port`.
struct Known<T>(Option<T>);

impl fmt::Display for Known<u32> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("?"),
        }
    }
}

impl fmt::Display for Known<(IpAddr, u16)> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((IpAddr::V4(a), p)) => {
                f.write_str(ipv4(a, &mut [0; 15]))?;
                f.write_str(":")?;
                f.write_str(itoa::Buffer::new().format(p))
            }
            Some((a, p)) => write!(f, "{a}:{p}"),
            None => f.write_str("?"),
        }
    }
}

/// RFC 3339 UTC timestamps with microseconds, `2026-11-26T15:42:16.123456Z`. Events come in
/// bursts within one second: the date and time of day are formatted once per second.
#[derive(Default)]
pub struct Stamps {
    secs: Option<u64>,
    stamp: [u8; 27],
}

/// One formatted timestamp (ASCII).
#[derive(Clone, Copy)]
pub struct Stamp([u8; 27]);

impl Stamp {
    pub fn as_str(&self) -> &str {
        // SAFETY: only `Stamps::format` makes a Stamp, and it writes only ASCII (humantime's
        // digits and punctuation, then ours); this runs for every line printed.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl Stamps {
    pub fn format(&mut self, t: SystemTime) -> Stamp {
        // Times before 1970 cannot come from the kernel's clock; they print as the epoch.
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        if self.secs != Some(d.as_secs()) {
            let whole =
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(d.as_secs()));
            self.stamp[..19].copy_from_slice(&whole.to_string().as_bytes()[..19]);
            self.stamp[19] = b'.';
            self.stamp[26] = b'Z';
            self.secs = Some(d.as_secs());
        }
        let mut micros = d.subsec_micros();
        for b in self.stamp[20..26].iter_mut().rev() {
            *b = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        Stamp(self.stamp)
    }
}

/// Writes to two outputs: the terminal format and the `--pcap` evidence file.
pub struct Tee<'a>(pub &'a mut dyn Output, pub &'a mut dyn Output);

impl Output for Tee<'_> {
    fn event(&mut self, r: &Record) -> io::Result<()> {
        self.1.event(r)?;
        self.0.event(r)
    }
    fn lost(&mut self, n: u64, cause: Loss) -> io::Result<()> {
        self.0.lost(n, cause)
    }
    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        self.1.reset(r)?;
        self.0.reset(r)
    }
    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        self.1.incident(i)?;
        self.0.incident(i)
    }
    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        self.1.summary(s)?;
        self.0.summary(s)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.1.flush()?;
        self.0.flush()
    }
}
