//! `--json`: one object per line, flushed with each batch read from the kernel, for jq. Keys
//! are stable and documented in README.md; a field the kernel did not provide is omitted,
//! never invented. Per-packet lines (event, reset, incident) are written by hand for speed
//! and checked against their records in the tests; the once-per-session lines use serde.
//! A reason's hint goes out in full with its first event; later ones name it by `hint_ref`.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use conntrack_trace_common::window::TcpWindow;
use foldhash::HashSet;
use serde::Serialize;

use super::{Loss, Output, Stamp, Stamps, ipv4};
use crate::{
    ct::{Conntrack, Endpoints},
    reason::ReasonCode,
    reset::{Incident, Reset},
    schema::{self, Fill, FlowRow, LostLine, NetnsRow, OwnerScans, SummaryLine},
    summary::Summary,
    verdict::{Record, Tcp},
};

/// JSON lines to `out`, which should be unbuffered: Json keeps its own buffer, because
/// appends to a `Vec` are inlined where calls into a `BufWriter` are not, and each line is
/// then copied once.
pub struct Json<W: Write> {
    out: W,
    /// Whole lines not yet written to `out`.
    buf: Vec<u8>,
    stamps: Stamps,
    /// Reason codes whose hint went out in full: a hint is about 800 bytes, a flood of one
    /// reason needs it once.
    hinted: HashSet<ReasonCode>,
}

/// `buf` goes to `out` when it holds this much, and on every flush.
const BUF_SIZE: usize = 1 << 16;

impl<W: Write> Json<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            buf: Vec::with_capacity(BUF_SIZE + 4096),
            stamps: Stamps::default(),
            hinted: HashSet::default(),
        }
    }

    /// Appends one line; never a partial one.
    fn put(&mut self, write: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
        let start = self.buf.len();
        if let Err(e) = write(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        self.buf.push(b'\n');
        if self.buf.len() >= BUF_SIZE {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> io::Result<()> {
        let written = self.out.write_all(&self.buf);
        self.buf.clear();
        written
    }

    /// How `r`'s hint goes out in this line: in full the first time for its reason code.
    fn hint_of<'r>(&mut self, r: &'r Record) -> Option<HintOut<'r>> {
        let code = r.reason_code();
        r.hint.as_ref().map(|h| {
            if self.hinted.insert(code) {
                HintOut::Full(h.json.get())
            } else {
                HintOut::Ref(code)
            }
        })
    }

    /// A once-per-session line, serde-derived.
    fn line<T: Serialize>(&mut self, v: &T) -> io::Result<()> {
        self.put(|o| Ok(serde_json::to_writer(o, v)?))
    }
}

/// What was not flushed still goes out (a writer failing now has nobody to tell).
impl<W: Write> Drop for Json<W> {
    fn drop(&mut self) {
        let _ = self.drain();
    }
}

/// An event's hint: the whole object, or the reason code of the line that carried it.
#[derive(Clone, Copy)]
enum HintOut<'a> {
    Full(&'a str),
    Ref(ReasonCode),
}

/// `,"k":` for a key of ours, as one constant: three appends per key were a quarter of
/// the event's cost.
macro_rules! key {
    ($o:expr, $k:literal) => {
        $o.extend_from_slice(concat!(",\"", $k, "\":").as_bytes())
    };
}

/// `,"k":` and the value, written by one of the writers below: `field!(o, "seq", num(t.seq))`.
/// With `?` after the key, only when the value (an Option) is known.
macro_rules! field {
    ($o:expr, $k:literal, $write:ident($v:expr)) => {{
        key!($o, $k);
        $write($o, $v);
    }};
    ($o:expr, $k:literal?, $write:ident($v:expr)) => {
        if let Some(v) = $v {
            field!($o, $k, $write(v));
        }
    };
}

/// The event object, one per INVALID packet: a flood is made of these, so it is written by
/// hand. serde_json spends about 140 instructions on every string token, keys included;
/// here keys are constant bytes. Text that is not ours (the kernel's reason) still goes
/// through serde_json's escaping. The tests check every field against the record.
fn write_event(o: &mut Vec<u8>, r: &Record, time: Stamp, hint: Option<HintOut>) -> io::Result<()> {
    let p = &r.pkt;
    o.extend_from_slice(b"{\"event\":");
    plain(o, r.verdict.as_str());
    field!(o, "schema_version", num(schema::VERSION));
    field!(o, "time", plain(time.as_str()));
    field!(o, "ts_ns", num(r.ts_ns));
    key!(o, "reason");
    if r.reason_is_ours() {
        plain(o, r.reason_text());
    } else {
        // Copied from kernel memory: escaped.
        serde_json::to_writer(&mut *o, r.reason_text())?;
    }
    field!(o, "reason_code", plain(r.reason_code().as_str()));
    field!(o, "family"?, plain(p.family.map(|f| f.as_str())));
    field!(
        o,
        "proto"?,
        plain(p.proto.map(|_| p.proto_name()).as_deref())
    );
    field!(o, "saddr"?, ip(p.saddr));
    field!(o, "sport"?, num(p.sport));
    field!(o, "daddr"?, ip(p.daddr));
    field!(o, "dport"?, num(p.dport));
    field!(o, "tcp"?, tcp(p.tcp.as_ref()));
    if let Some((t, c)) = p.icmp {
        key!(o, "icmp");
        o.extend_from_slice(b"{\"type\":");
        num(o, t);
        field!(o, "code", num(c));
        o.push(b'}');
    }
    if let Some(w) = &r.window {
        key!(o, "window");
        o.extend_from_slice(b"{\"sender\":");
        side(o, &w.sender);
        field!(o, "receiver", side(&w.receiver));
        field!(o, "bound"?, num(w.bound));
        field!(o, "excess"?, num(w.excess));
        field!(o, "seqadj"?, num(w.seqadj));
        key!(o, "explain");
        o.push(b'"');
        w.write_into(o);
        o.extend_from_slice(b"\"}");
    }
    field!(o, "ct"?, ct(r.ct.as_ref()));
    field!(o, "netns"?, num(r.netns));
    field!(o, "owner"?, raw(r.owner.as_ref().map(|w| w.json().get())));
    field!(o, "ifindex"?, num(r.ifindex));
    field!(o, "hook"?, plain(r.hook.map(|h| h.as_str())));
    match hint {
        Some(HintOut::Full(json)) => field!(o, "hint", raw(json)),
        Some(HintOut::Ref(code)) => field!(o, "hint_ref", plain(code.as_str())),
        None => {}
    }
    o.push(b'}');
    Ok(())
}

/// A string that needs no escaping (codes, names, numbers).
#[inline(always)]
fn plain(o: &mut Vec<u8>, v: &str) {
    debug_assert!(
        !v.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20),
        "{v}"
    );
    o.push(b'"');
    o.extend_from_slice(v.as_bytes());
    o.push(b'"');
}

/// JSON that is already JSON (a hint or an owner serialized once).
fn raw(o: &mut Vec<u8>, json: &str) {
    o.extend_from_slice(json.as_bytes());
}

#[inline(always)]
fn num(o: &mut Vec<u8>, n: impl itoa::Integer) {
    o.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn ip(o: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => plain(o, ipv4(a, &mut [0; 15])),
        // Writing to a Vec cannot fail; IPv6 text needs no escaping.
        IpAddr::V6(a) => {
            let _ = write!(o, "\"{a}\"");
        }
    }
}

/// An INVALID packet and the RST that answered it; `times`: the RST's, the packet's.
fn write_incident(
    o: &mut Vec<u8>,
    i: &Incident,
    times: (Stamp, Stamp),
    hint: Option<HintOut>,
) -> io::Result<()> {
    o.extend_from_slice(b"{\"event\":\"incident\"");
    field!(o, "schema_version", num(schema::VERSION));
    field!(o, "time", plain(times.0.as_str()));
    field!(o, "ts_ns", num(i.reset.ts_ns));
    if let Some((client, service, backend)) = i.roles() {
        field!(o, "client", addr((client.saddr, client.sport)));
        field!(o, "service", addr(service));
        field!(o, "backend", addr(backend));
    }
    field!(o, "ct"?, ct(i.ct.as_ref()));
    key!(o, "invalid");
    write_event(o, &i.invalid, times.1, hint)?;
    key!(o, "reset");
    write_reset(o, &i.reset, times.0);
    // `reset`, `challenge_ack`, `ignored` or `unknown`: what the RST does to the connection.
    field!(o, "effect", plain(i.effect().as_str()));
    key!(o, "explain");
    serde_json::to_writer(&mut *o, &super::incident_story(i))?;
    o.push(b'}');
    Ok(())
}

/// An RST sent for a packet with no socket.
fn write_reset(o: &mut Vec<u8>, r: &Reset, time: Stamp) {
    let t = &r.trigger;
    o.extend_from_slice(b"{\"event\":\"reset\"");
    field!(o, "schema_version", num(schema::VERSION));
    field!(o, "time", plain(time.as_str()));
    field!(o, "ts_ns", num(r.ts_ns));
    // The RST's own addresses: from the answered packet's destination to its source.
    field!(o, "saddr"?, ip(t.daddr));
    field!(o, "sport"?, num(t.dport));
    field!(o, "daddr"?, ip(t.saddr));
    field!(o, "dport"?, num(t.sport));
    field!(o, "netns"?, num(r.netns));
    field!(o, "owner"?, raw(r.owner.as_ref().map(|w| w.json().get())));
    field!(o, "ifindex"?, num(r.ifindex));
    // The packet it answered.
    field!(o, "trigger"?, tcp(t.tcp.as_ref()));
    o.push(b'}');
}

fn tcp(o: &mut Vec<u8>, t: &Tcp) {
    o.extend_from_slice(b"{\"flags\":");
    plain(o, t.flags.as_str());
    field!(o, "seq", num(t.seq));
    field!(o, "ack", num(t.ack));
    field!(o, "win", num(t.win));
    field!(o, "len", num(t.len));
    o.push(b'}');
}

fn addr(o: &mut Vec<u8>, (a, port): (IpAddr, u16)) {
    o.extend_from_slice(b"{\"addr\":");
    ip(o, a);
    field!(o, "port", num(port));
    o.push(b'}');
}

fn ct(o: &mut Vec<u8>, c: &Conntrack) {
    o.push(b'{');
    if let Some(state) = c.state {
        o.extend_from_slice(b"\"state\":");
        plain(o, state.as_str());
        o.push(b',');
    }
    o.extend_from_slice(b"\"original\":");
    endpoints(o, &c.original);
    field!(o, "reply", endpoints(&c.reply));
    key!(o, "dnat");
    o.extend_from_slice(if c.dnat() { b"true" } else { b"false" });
    o.push(b'}');
}

fn side(o: &mut Vec<u8>, w: &TcpWindow) {
    o.extend_from_slice(b"{\"end\":");
    num(o, w.end);
    field!(o, "maxend", num(w.maxend));
    field!(o, "maxwin", num(w.maxwin));
    field!(o, "maxack", num(w.maxack));
    field!(o, "scale", num(w.scale));
    o.push(b'}');
}

fn endpoints(o: &mut Vec<u8>, e: &Endpoints) {
    o.extend_from_slice(b"{\"saddr\":");
    ip(o, e.saddr);
    field!(o, "sport", num(e.sport));
    field!(o, "daddr", ip(e.daddr));
    field!(o, "dport", num(e.dport));
    o.push(b'}');
}

impl<W: Write> Output for Json<W> {
    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.out.flush()
    }

    fn event(&mut self, r: &Record) -> io::Result<()> {
        let time = self.stamps.format(r.time);
        let hint = self.hint_of(r);
        self.put(|o| write_event(o, r, time, hint))
    }

    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        let time = self.stamps.format(r.time);
        self.put(|o| {
            write_reset(o, r, time);
            Ok(())
        })
    }

    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        let times = (
            self.stamps.format(i.reset.time),
            self.stamps.format(i.invalid.time),
        );
        let hint = self.hint_of(&i.invalid);
        self.put(|o| write_incident(o, i, times, hint))
    }

    fn lost(&mut self, n: u64, cause: Loss) -> io::Result<()> {
        self.line(&LostLine {
            event: schema::LostTag,
            schema_version: schema::Version,
            cause,
            count: n,
        })
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let fill = |f: Option<(u64, u64)>| f.map(|(count, max)| Fill { count, max });
        self.line(&SummaryLine {
            event: schema::SummaryTag,
            schema_version: schema::Version,
            mode: s.mode,
            seconds: s.seconds,
            invalid: s.invalid,
            ignored: s.ignored,
            drop: s.drops,
            lost: s.lost,
            recursion_misses: s.recursion_misses,
            kprobe_misses: s.kprobe_misses,
            untracked: s.untracked,
            orphan_reasons: s.orphan_reasons,
            resets: s.resets,
            incidents: s.incidents,
            counts: &s.by_code,
            top_flows: s
                .top_flows(10)
                .into_iter()
                .map(|(flow, events)| FlowRow { flow, events })
                .collect(),
            top_netns: s
                .top_netns(10)
                .into_iter()
                .map(|(netns, events, owner)| NetnsRow {
                    netns,
                    events,
                    owner: owner.map(|o| o.json()),
                })
                .collect(),
            owner_scans: s.owner_scans.map(|o| OwnerScans {
                count: o.scans,
                longest_ms: o.longest.as_secs_f64() * 1e3,
            }),
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

#[cfg(test)]
mod tests {
    use std::{
        fs,
        net::Ipv6Addr,
        path::Path,
        sync::Arc,
        time::{Duration, SystemTime},
    };

    use conntrack_trace_common::window::TcpWindow;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        events::Events,
        hints::{Hints, Node},
        owner::{Owner, OwnerCache, Process},
        reason, record,
        verdict::{Packet, Tcp, Verdict},
        window,
    };

    /// What an event line must hold, built field by field from the record with other code
    /// than the writer's: humantime for the time, `Display` for addresses, serde for hints;
    /// `hint_seen`: a line before it carried the hint of its reason code.
    fn expected(r: &Record, hint_seen: bool) -> Value {
        let p = &r.pkt;
        let mut v = json!({
            "event": r.verdict.as_str(),
            "schema_version": schema::VERSION,
            "time": humantime::format_rfc3339_micros(r.time).to_string(),
            "ts_ns": r.ts_ns,
            "reason": r.reason_text(),
            "reason_code": r.reason_code(),
        });
        let m = v.as_object_mut().unwrap();
        let mut put = |k: &str, x: Option<Value>| {
            if let Some(x) = x {
                m.insert(k.into(), x);
            }
        };
        let ends = |e: &Endpoints| {
            json!({"saddr": e.saddr.to_string(), "sport": e.sport,
                   "daddr": e.daddr.to_string(), "dport": e.dport})
        };
        let side = |w: &TcpWindow| {
            json!({"end": w.end, "maxend": w.maxend, "maxwin": w.maxwin,
                   "maxack": w.maxack, "scale": w.scale})
        };
        put("family", p.family.map(|f| f.as_str().into()));
        put("proto", p.proto.map(|_| p.proto_name().into()));
        put("saddr", p.saddr.map(|a| a.to_string().into()));
        put("sport", p.sport.map(Value::from));
        put("daddr", p.daddr.map(|a| a.to_string().into()));
        put("dport", p.dport.map(Value::from));
        put(
            "tcp",
            p.tcp.as_ref().map(|t| {
                json!({"flags": t.flags.as_str(), "seq": t.seq, "ack": t.ack,
                       "win": t.win, "len": t.len})
            }),
        );
        put("icmp", p.icmp.map(|(t, c)| json!({"type": t, "code": c})));
        put(
            "window",
            r.window.as_ref().map(|w| {
                let mut x = json!({"sender": side(&w.sender), "receiver": side(&w.receiver),
                                   "explain": w.to_string()});
                if let Some(b) = w.bound {
                    x["bound"] = b.into();
                }
                if let Some(e) = w.excess {
                    x["excess"] = e.into();
                }
                if let Some(a) = w.seqadj {
                    x["seqadj"] = a.into();
                }
                x
            }),
        );
        put(
            "ct",
            r.ct.as_ref().map(|c| {
                let mut x = json!({"original": ends(&c.original), "reply": ends(&c.reply),
                                   "dnat": c.dnat()});
                if let Some(s) = c.state {
                    x["state"] = s.as_str().into();
                }
                x
            }),
        );
        put("netns", r.netns.map(Value::from));
        put("owner", r.owner.as_deref().map(expected_owner));
        put("ifindex", r.ifindex.map(Value::from));
        put("hook", r.hook.map(|h| h.as_str().into()));
        match &r.hint {
            Some(_) if hint_seen => put("hint_ref", Some(r.reason_code().as_str().into())),
            Some(h) => put("hint", Some(serde_json::to_value(&h.hint).unwrap())),
            None => {}
        }
        v
    }

    /// An owner object from the owner's fields, each key only when known.
    fn expected_owner(o: &Owner) -> Value {
        let processes: Vec<Value> = o
            .processes
            .iter()
            .map(|p| json!({"pid": p.pid, "comm": p.comm}))
            .collect();
        let mut v = json!({"processes": processes, "process_count": o.process_count});
        for (k, x) in [
            ("ip_netns", &o.ip_netns_name),
            ("cgroup", &o.cgroup),
            ("container_id", &o.container_id),
            ("pod_uid", &o.pod_uid),
        ] {
            if let Some(x) = x {
                v[k] = x.as_str().into();
            }
        }
        if let Some(r) = o.runtime {
            v["runtime"] = r.as_str().into();
        }
        v
    }

    /// An owner with every field and text to escape in each of them.
    fn nasty_owner(pid: u32) -> Owner {
        let id = "9c4f".repeat(16);
        Owner::new(
            vec![
                Process {
                    pid,
                    comm: "a\"q\\\u{1}ü".into(),
                },
                Process {
                    pid: pid + 1,
                    comm: "sleep".into(),
                },
            ],
            5,
            Some("cni-\"x\"".into()),
            Some(format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0e9a4c1b_2f3d_4e5a_8b6c_7d8e9f0a1b2c.slice/cri-containerd-{id}.scope"
            )),
        )
    }

    /// What a reset line must hold: the RST's addresses are the answered packet's, reversed.
    fn expected_reset(r: &Reset) -> Value {
        let t = &r.trigger;
        let mut v = json!({
            "event": "reset",
            "schema_version": schema::VERSION,
            "time": humantime::format_rfc3339_micros(r.time).to_string(),
            "ts_ns": r.ts_ns,
        });
        let m = v.as_object_mut().unwrap();
        let mut put = |k: &str, x: Option<Value>| {
            if let Some(x) = x {
                m.insert(k.into(), x);
            }
        };
        put("saddr", t.daddr.map(|a| a.to_string().into()));
        put("sport", t.dport.map(Value::from));
        put("daddr", t.saddr.map(|a| a.to_string().into()));
        put("dport", t.sport.map(Value::from));
        put("netns", r.netns.map(Value::from));
        put("owner", r.owner.as_deref().map(expected_owner));
        put("ifindex", r.ifindex.map(Value::from));
        put(
            "trigger",
            expected(&Record::bare(Verdict::Invalid, 0, r.time, t.clone()), false)
                .get("tcp")
                .cloned(),
        );
        v
    }

    /// Renders through `Json` and checks each line against the record it came from.
    #[derive(Default)]
    struct Check {
        json: Option<Json<Vec<u8>>>,
        /// Reason codes of the hints rendered so far.
        hinted: std::collections::HashSet<ReasonCode>,
        events: usize,
        resets: usize,
        incidents: usize,
    }

    impl Check {
        fn render(&mut self, f: impl FnOnce(&mut Json<Vec<u8>>) -> io::Result<()>) -> Value {
            let json = self.json.get_or_insert_with(|| Json::new(Vec::new()));
            json.out.clear();
            f(json).unwrap();
            json.flush().unwrap();
            let line = std::str::from_utf8(&json.out).unwrap();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
            let v = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if let Err(e) = schema::validate(&SCHEMA, &v) {
                panic!("{e}: {line}");
            }
            v
        }
    }

    static SCHEMA: std::sync::LazyLock<Value> = std::sync::LazyLock::new(schema::schema);

    /// The hand-written line has the keys and values of the schema types' serialisation.
    fn same_fields(got: &Value, derived: &Value, at: &str) {
        match (got.as_object(), derived.as_object()) {
            (Some(g), Some(d)) => {
                let keys = |m: &serde_json::Map<String, Value>| {
                    m.keys().cloned().collect::<std::collections::BTreeSet<_>>()
                };
                assert_eq!(keys(g), keys(d), "{at}: keys");
                for (k, v) in g {
                    same_fields(v, &d[k], &format!("{at}.{k}"));
                }
            }
            _ => assert_eq!(got, derived, "{at}"),
        }
    }

    impl Output for Check {
        fn event(&mut self, r: &Record) -> io::Result<()> {
            let got = self.render(|j| j.event(r));
            let seen = r.hint.is_some() && !self.hinted.insert(r.reason_code());
            assert_eq!(got, expected(r, seen));
            let derived = serde_json::to_value(schema::EventLine::of(r, seen)).unwrap();
            same_fields(&got, &derived, "event");
            self.events += 1;
            Ok(())
        }
        fn incident(&mut self, i: &Incident) -> io::Result<()> {
            let got = self.render(|j| j.incident(i));
            // The packet's own event line came first, with the hint or its reference.
            assert!(self.hinted.contains(&i.invalid.reason_code()) || i.invalid.hint.is_none());
            assert_eq!(
                got["invalid"],
                expected(&i.invalid, i.invalid.hint.is_some())
            );
            let (c, s, b) = i.roles().expect("the fixtures' incidents are DNAT'd");
            assert_eq!(
                got["client"],
                json!({"addr": c.saddr.to_string(), "port": c.sport})
            );
            assert_eq!(
                got["service"],
                json!({"addr": s.0.to_string(), "port": s.1})
            );
            assert_eq!(
                got["backend"],
                json!({"addr": b.0.to_string(), "port": b.1})
            );
            assert_eq!(got["ct"], got["invalid"]["ct"]);
            assert_eq!(got["effect"], i.effect().as_str());
            assert_eq!(got["explain"], super::super::incident_story(i));
            assert_eq!(got["reset"], expected_reset(&i.reset));
            let hinted = i.invalid.hint.is_some();
            let derived = serde_json::to_value(schema::IncidentLine::of(i, hinted)).unwrap();
            same_fields(&got, &derived, "incident");
            assert_eq!(
                got["time"],
                humantime::format_rfc3339_micros(i.reset.time).to_string()
            );
            self.incidents += 1;
            Ok(())
        }
        fn lost(&mut self, _: u64, _: Loss) -> io::Result<()> {
            Ok(())
        }
        fn reset(&mut self, r: &Reset) -> io::Result<()> {
            let got = self.render(|j| j.reset(r));
            assert_eq!(got, expected_reset(r));
            same_fields(
                &got,
                &serde_json::to_value(schema::ResetLine::of(r)).unwrap(),
                "reset",
            );
            self.resets += 1;
            Ok(())
        }
        fn summary(&mut self, s: &Summary) -> io::Result<()> {
            let got = self.render(|j| j.summary(s));
            let rows: Vec<Value> = s
                .top_netns(10)
                .into_iter()
                .map(|(ns, n, owner)| {
                    let mut row = json!({"netns": ns, "events": n});
                    if let Some(o) = owner {
                        row["owner"] = expected_owner(o);
                    }
                    row
                })
                .collect();
            assert!(!rows.is_empty());
            assert_eq!(got["top_netns"], Value::from(rows));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The namespace a ring-buffer record names, read apart from the decoder.
    fn netns_of(bytes: &[u8]) -> Option<u32> {
        use conntrack_trace_common::kind;
        match bytes
            .get(..4)
            .map(|k| u32::from_ne_bytes(k.try_into().unwrap()))
        {
            Some(kind::PACKET) => crate::verdict::parse(bytes).ok().map(|e| e.netns),
            Some(kind::RESET) => crate::reset::parse(bytes).ok().map(|e| e.netns),
            _ => None,
        }
    }

    #[test]
    fn recorded_events_and_incidents_match_their_records() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut check = Check::default();
        let mut owned = 0;
        for e in fs::read_dir(dir).unwrap() {
            let (clock, records) =
                record::read(fs::File::open(e.unwrap().path()).unwrap()).unwrap();
            // Every other namespace has an owner: events with and without one.
            let mut inodes: Vec<u32> = records.iter().filter_map(|r| netns_of(r)).collect();
            inodes.sort_unstable();
            inodes.dedup();
            let owners: OwnerCache = inodes
                .iter()
                .step_by(2)
                .map(|&ns| (ns, nasty_owner(ns % 1000)))
                .collect();
            let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
            events.owners = Some(owners.clone());
            for r in &records {
                owned += usize::from(netns_of(r).and_then(|ns| owners.get(ns)).is_some());
                events.handle(r, &mut check).unwrap();
            }
            check.summary(&events.summary).unwrap();
        }
        assert!(
            check.events >= 15 && check.incidents >= 2 && owned >= 5,
            "{} {} {owned}",
            check.events,
            check.incidents
        );
    }

    /// Over a whole run, each reason's hint is written out once, in full, with the first
    /// event of its reason; every later event of that reason names it by `hint_ref` alone.
    #[test]
    fn each_hint_goes_out_once_then_by_reference() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut events = None;
        let mut json = Json::new(Vec::new());
        // Every recording through one run, twice: the second pass repeats every reason.
        for _ in 0..2 {
            for e in fs::read_dir(&dir).unwrap() {
                let (clock, records) =
                    record::read(fs::File::open(e.unwrap().path()).unwrap()).unwrap();
                let events = events.get_or_insert_with(|| {
                    Events::new(clock, Hints::new(Node::default()), true, None)
                });
                for r in &records {
                    events.handle(r, &mut json).unwrap();
                }
            }
        }
        json.flush().unwrap();
        let mut hints: std::collections::HashMap<String, Value> = Default::default();
        let mut refs = 0;
        for line in std::str::from_utf8(&json.out).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let ev = if v["event"] == "incident" {
                &v["invalid"]
            } else {
                &v
            };
            let code = ev["reason_code"].as_str().unwrap().to_string();
            assert!(
                ev.get("hint").is_none() || ev.get("hint_ref").is_none(),
                "{line}"
            );
            if let Some(h) = ev.get("hint") {
                assert!(
                    hints.insert(code.clone(), h.clone()).is_none(),
                    "second {code} hint: {line}"
                );
                assert!(h["what"].is_string() && h["fixes"].is_array(), "{line}");
            }
            if let Some(r) = ev.get("hint_ref") {
                assert_eq!(r, &Value::from(code.as_str()), "{line}");
                assert!(
                    hints.contains_key(&code),
                    "{code} referenced before its hint: {line}"
                );
                refs += 1;
            }
        }
        assert!(
            hints.len() >= 3 && refs >= 30,
            "{} hints, {refs} references",
            hints.len()
        );
    }

    #[test]
    fn text_that_needs_escaping_addresses_and_times() {
        let tcp = Tcp {
            flags: "SA".into(),
            seq: 1,
            ack: 2,
            win: 3,
            len: 0,
            sack: None,
        };
        let w = TcpWindow {
            end: 10,
            maxend: 20,
            maxwin: 30,
            maxack: 40,
            scale: 0,
            flags: 0,
            _pad: [0; 2],
        };
        let mut check = Check::default();
        for (i, (a, b)) in [
            ("0.9.10.99".parse().unwrap(), "100.255.1.0".parse().unwrap()),
            (
                IpAddr::V6(Ipv6Addr::LOCALHOST),
                "2001:db8::1".parse().unwrap(),
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let time =
                SystemTime::UNIX_EPOCH + Duration::new(1_790_000_000 + i as u64, 999_999_999);
            let pkt = Packet {
                family: Some(crate::verdict::Family::Ipv4),
                proto: Some(200),
                saddr: Some(a),
                sport: Some(0),
                daddr: Some(b),
                dport: Some(65535),
                tcp: Some(tcp.clone()),
                icmp: Some((3, 4)),
                headers: Vec::new(),
            };
            let r = Record {
                reason: Some(reason::Explained {
                    text: "a \"quoted\" \\ path\twith\u{1} control and ünïcode".into(),
                    code: reason::ReasonCode::Unknown,
                    value: None,
                    ours: false,
                }),
                window: window::explain(
                    reason::ReasonCode::SeqOver,
                    None,
                    [w, w],
                    false,
                    window::Adjust::None,
                    &tcp,
                ),
                netns: Some(7),
                owner: Some(Arc::new(nasty_owner(1))),
                ifindex: Some(0),
                ..Record::bare(Verdict::Invalid, u64::MAX, time, pkt)
            };
            check.event(&r).unwrap();
            let rst = Reset {
                ts_ns: 5,
                time,
                netns: Some(u32::MAX),
                // Known for the processes alone: no name, cgroup or container.
                owner: Some(Arc::new(Owner::new(
                    vec![Process {
                        pid: u32::MAX,
                        comm: String::new(),
                    }],
                    1,
                    None,
                    None,
                ))),
                ifindex: None,
                trigger: r.pkt.clone(),
            };
            check.reset(&rst).unwrap();
        }
        // A drop with no headers: only what is known.
        let bare = Record::bare(
            Verdict::Drop,
            0,
            SystemTime::UNIX_EPOCH + Duration::from_micros(1),
            Packet::default(),
        );
        check.event(&bare).unwrap();
        let rst = Reset {
            ts_ns: 0,
            time: bare.time,
            netns: None,
            owner: None,
            ifindex: None,
            trigger: Packet::default(),
        };
        check.reset(&rst).unwrap();
        assert_eq!((check.events, check.resets), (3, 3));
    }
}
