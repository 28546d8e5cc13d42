//! `--json`: one object per line, flushed with each batch read from the kernel, for jq. Keys are stable and documented in
//! README.md; a field the kernel did not provide is omitted, never invented.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use super::Output;
use crate::{
    ct::Endpoints,
    reset::{Incident, Reset},
    summary::Summary,
    verdict::Record,
    window,
};

/// A `Display` value written as a JSON string without an intermediate String.
struct Text<'a, T: std::fmt::Display>(&'a T);

impl<T: std::fmt::Display> Serialize for Text<'_, T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self.0)
    }
}

/// RFC 3339 time, written straight into the output (no String per event).
struct Rfc3339(std::time::SystemTime);

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(self.0))
    }
}

pub struct Json<W: Write> {
    out: W,
}

impl<W: Write> Json<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }

    fn line<T: Serialize>(&mut self, v: &T) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, v)?;
        self.out.write_all(b"\n")
    }
}

#[derive(Serialize)]
struct Event<'a> {
    event: &'static str,
    time: Rfc3339,
    ts_ns: u64,
    reason: &'a str,
    reason_code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    proto: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    saddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<Tcp<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    icmp: Option<Icmp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    window: Option<Window<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ct: Option<Ct<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ifindex: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<&'a serde_json::value::RawValue>,
}

#[derive(Serialize)]
struct Tcp<'a> {
    flags: &'a str,
    seq: u32,
    ack: u32,
    win: u16,
    len: u16,
}

#[derive(Serialize)]
struct Icmp {
    r#type: u8,
    code: u8,
}

#[derive(Serialize)]
struct Side {
    end: u32,
    maxend: u32,
    maxwin: u32,
    maxack: u32,
    scale: u8,
}

impl From<&conntrack_trace_common::window::TcpWindow> for Side {
    fn from(w: &conntrack_trace_common::window::TcpWindow) -> Self {
        Self {
            end: w.end,
            maxend: w.maxend,
            maxwin: w.maxwin,
            maxack: w.maxack,
            scale: w.scale,
        }
    }
}

#[derive(Serialize)]
struct Window<'a> {
    sender: Side,
    receiver: Side,
    #[serde(skip_serializing_if = "Option::is_none")]
    bound: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    excess: Option<u32>,
    explain: Text<'a, window::Explained>,
}

#[derive(Serialize)]
struct Ct<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'static str>,
    original: &'a Endpoints,
    reply: &'a Endpoints,
    dnat: bool,
}

#[derive(Serialize)]
struct Lost {
    event: &'static str,
    count: u64,
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    event: &'static str,
    seconds: f64,
    invalid: u64,
    ignored: u64,
    drop: u64,
    lost: u64,
    untracked: u64,
    resets: u64,
    incidents: u64,
    counts: &'a BTreeMap<&'static str, u64>,
    top_flows: Vec<Flow>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<&'a BTreeMap<String, u64>>,
    namespaces: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    missed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table_start: Option<Fill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    table_end: Option<Fill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_btf_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    startup_attached_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_kib: Option<u64>,
}

#[derive(Serialize)]
struct Flow {
    flow: String,
    events: u64,
}

#[derive(Serialize)]
struct Fill {
    count: u64,
    max: u64,
}

impl Serialize for Endpoints {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Endpoints", 4)?;
        st.serialize_field("saddr", &self.saddr)?;
        st.serialize_field("sport", &self.sport)?;
        st.serialize_field("daddr", &self.daddr)?;
        st.serialize_field("dport", &self.dport)?;
        st.end()
    }
}

fn event_of(r: &Record) -> Event<'_> {
    Event {
        event: r.verdict.as_str(),
        time: Rfc3339(r.time),
        ts_ns: r.ts_ns,
        reason: r.reason_text(),
        reason_code: r.reason_code(),
        family: r.pkt.family,
        proto: r.pkt.proto.map(|_| r.pkt.proto_name()),
        saddr: r.pkt.saddr,
        sport: r.pkt.sport,
        daddr: r.pkt.daddr,
        dport: r.pkt.dport,
        tcp: r.pkt.tcp.as_ref().map(|t| Tcp {
            flags: t.flags.as_str(),
            seq: t.seq,
            ack: t.ack,
            win: t.win,
            len: t.len,
        }),
        icmp: r.pkt.icmp.map(|(t, c)| Icmp { r#type: t, code: c }),
        window: r.window.as_ref().map(|w| Window {
            sender: (&w.sender).into(),
            receiver: (&w.receiver).into(),
            bound: w.bound,
            excess: w.excess,
            explain: Text(w),
        }),
        ct: r.ct.as_ref().map(|c| Ct {
            state: c.state,
            original: &c.original,
            reply: &c.reply,
            dnat: c.dnat(),
        }),
        netns: r.netns,
        ifindex: r.ifindex,
        hook: r.hook,
        hint: r.hint.as_ref().map(|h| &*h.json),
    }
}

#[derive(Serialize)]
struct ResetLine<'a> {
    event: &'static str,
    time: Rfc3339,
    ts_ns: u64,
    /// The RST's own addresses: from the answered packet's destination to its source.
    #[serde(skip_serializing_if = "Option::is_none")]
    saddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    daddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ifindex: Option<u32>,
    /// The packet it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger: Option<Tcp<'a>>,
}

fn reset_of(r: &Reset) -> ResetLine<'_> {
    let t = &r.trigger;
    ResetLine {
        event: "reset",
        time: Rfc3339(r.time),
        ts_ns: r.ts_ns,
        saddr: t.daddr,
        sport: t.dport,
        daddr: t.saddr,
        dport: t.sport,
        netns: r.netns,
        ifindex: r.ifindex,
        trigger: t.tcp.as_ref().map(|t| Tcp {
            flags: t.flags.as_str(),
            seq: t.seq,
            ack: t.ack,
            win: t.win,
            len: t.len,
        }),
    }
}

#[derive(Serialize)]
struct Addr {
    addr: IpAddr,
    port: u16,
}

#[derive(Serialize)]
struct IncidentLine<'a> {
    event: &'static str,
    time: Rfc3339,
    ts_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ct: Option<Ct<'a>>,
    invalid: Event<'a>,
    reset: ResetLine<'a>,
    /// `reset`, `challenge_ack`, `ignored` or `unknown`: what the RST does to the connection.
    effect: &'static str,
    explain: String,
}

impl<W: Write> Output for Json<W> {
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn event(&mut self, r: &Record) -> io::Result<()> {
        self.line(&event_of(r))
    }

    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        self.line(&reset_of(r))
    }

    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        let roles = i.roles();
        self.line(&IncidentLine {
            event: "incident",
            time: Rfc3339(i.reset.time),
            ts_ns: i.reset.ts_ns,
            client: roles.map(|(c, _, _)| Addr {
                addr: c.saddr,
                port: c.sport,
            }),
            service: roles.map(|(_, s, _)| Addr {
                addr: s.0,
                port: s.1,
            }),
            backend: roles.map(|(_, _, b)| Addr {
                addr: b.0,
                port: b.1,
            }),
            ct: i.ct.as_ref().map(|c| Ct {
                state: c.state,
                original: &c.original,
                reply: &c.reply,
                dnat: c.dnat(),
            }),
            invalid: event_of(&i.invalid),
            reset: reset_of(&i.reset),
            effect: i.effect().as_str(),
            explain: super::incident_story(i),
        })
    }

    fn lost(&mut self, n: u64) -> io::Result<()> {
        self.line(&Lost {
            event: "lost",
            count: n,
        })
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let fill = |f: Option<(u64, u64)>| f.map(|(count, max)| Fill { count, max });
        self.line(&SummaryLine {
            event: "summary",
            seconds: s.seconds,
            invalid: s.invalid,
            ignored: s.ignored,
            drop: s.drops,
            lost: s.lost,
            untracked: s.untracked,
            resets: s.resets,
            incidents: s.incidents,
            counts: &s.by_code,
            top_flows: s
                .top_flows(10)
                .into_iter()
                .map(|(flow, events)| Flow { flow, events })
                .collect(),
            kernel: s.kernel.as_ref().map(|k| &k.0),
            namespaces: s.namespaces,
            missed: s.missed(),
            table_start: fill(s.fill_start),
            table_end: fill(s.fill_end),
            startup_btf_ms: s.startup_ms.map(|t| t.0),
            startup_attached_ms: s.startup_ms.map(|t| t.1),
            peak_rss_kib: s.peak_rss_kib,
        })
    }
}
