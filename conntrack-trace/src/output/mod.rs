//! Renderers: one module per output format.

pub mod json;
pub mod pcap;
pub mod text;

use std::io;

use crate::{
    reset::{Incident, Reset},
    summary::Summary,
    verdict::Record,
};

pub trait Output {
    fn event(&mut self, r: &Record) -> io::Result<()>;
    /// `n` events the kernel could not put in the ring buffer since the last report.
    fn lost(&mut self, n: u64) -> io::Result<()>;
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

/// One sentence a reader can act on: what happened to the connection, with the roles.
pub fn incident_story(i: &Incident) -> String {
    let inv = &i.invalid;
    let trig = &i.reset.trigger;
    let ep = |a: Option<std::net::IpAddr>, p: Option<u16>| match (a, p) {
        (Some(a), Some(p)) => format!("{a}:{p}"),
        _ => "?".into(),
    };
    let head = match i.roles() {
        Some((client, svc, backend)) => format!(
            "client {}:{} -> Service {}:{} -> backend {}:{}: ",
            client.saddr, client.sport, svc.0, svc.1, backend.0, backend.1
        ),
        None => String::new(),
    };
    format!(
        "{head}segment {} > {} was INVALID ({}) in netns {}, so it was not NATed; netns {} had no \
         socket for it and answered RST {} > {}: {}",
        ep(inv.pkt.saddr, inv.pkt.sport),
        ep(inv.pkt.daddr, inv.pkt.dport),
        inv.reason_code(),
        inv.netns.map_or("?".into(), |n| n.to_string()),
        i.reset.netns.map_or("?".into(), |n| n.to_string()),
        ep(trig.daddr, trig.dport),
        ep(trig.saddr, trig.sport),
        i.effect().sentence(),
    )
}

/// Writes to two outputs: the terminal format and the `--pcap` evidence file.
pub struct Tee<'a>(pub &'a mut dyn Output, pub &'a mut dyn Output);

impl Output for Tee<'_> {
    fn event(&mut self, r: &Record) -> io::Result<()> {
        self.1.event(r)?;
        self.0.event(r)
    }
    fn lost(&mut self, n: u64) -> io::Result<()> {
        self.0.lost(n)
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
