//! The `--json` stream's one schema: every line's type, serde-serialisable and described for
//! JSON Schema (`conntrack-trace schema` prints it). The per-packet lines are written by hand
//! for speed (`output::json`); its tests check them, field by field, against these types'
//! serialisation. Every line carries `schema_version`.

use std::{collections::BTreeMap, net::IpAddr};

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings};
use serde::{Serialize, Serializer};
use serde_json::{Value, value::RawValue};

use crate::{
    ct::TcpState,
    hints::Hint,
    output::Loss,
    owner::OwnerJson,
    plan::Mode,
    reason::ReasonCode,
    reset::Effect,
    verdict::{Family, Hook, Verdict},
};

/// `schema_version` of every line. Raised when a key changes meaning or goes away, or a
/// closed set (an `event`, a `reason_code`…) loses a value; new keys and new values do not
/// raise it.
pub const VERSION: u32 = 1;

/// `schema_version`: serialises as [`VERSION`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Version;

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(VERSION)
    }
}

impl JsonSchema for Version {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SchemaVersion".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let mut s = Schema::default();
        s.insert("type".into(), "integer".into());
        s.insert("const".into(), VERSION.into());
        s.insert(
            "description".into(),
            "The version of this schema the line follows".into(),
        );
        s
    }
}

/// An `event` that names one kind of line: serialises as its name, a constant in the schema.
macro_rules! tag {
    ($name:ident, $text:literal) => {
        #[doc = concat!("`event` of a `", $text, "` line.")]
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name;

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($text)
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                let mut s = Schema::default();
                s.insert("type".into(), "string".into());
                s.insert("const".into(), $text.into());
                s
            }
        }
    };
}

tag!(ResetTag, "reset");
tag!(IncidentTag, "incident");
tag!(LostTag, "lost");
tag!(SummaryTag, "summary");

/// Any one line of the stream (the schema's root; lines are written as their own types).
#[derive(JsonSchema)]
#[serde(untagged)]
pub enum Line<'a> {
    Event(Box<EventLine<'a>>),
    Reset(Box<ResetLine<'a>>),
    Incident(Box<IncidentLine<'a>>),
    Lost(LostLine),
    Summary(Box<SummaryLine<'a>>),
}

/// A packet conntrack marked INVALID, kept with a logged reason (IGNORED), or dropped.
#[derive(Serialize, JsonSchema)]
pub struct EventLine<'a> {
    pub event: Verdict,
    pub schema_version: Version,
    /// RFC 3339 wall time, UTC, microseconds.
    pub time: String,
    /// The kernel's CLOCK_MONOTONIC, ns.
    pub ts_ns: u64,
    /// The kernel's text, numbers filled in.
    pub reason: &'a str,
    pub reason_code: ReasonCode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<Family>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, or the protocol number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp: Option<IcmpLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct: Option<CtLine>,
    /// The network namespace's inode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OwnerJson<'static>>")]
    pub owner: Option<&'a RawValue>,
    /// The input interface, else the output one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    /// What to do about it: with the first event of its reason_code in the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<&'a Hint>,
    /// The reason_code of the earlier line that carried this event's hint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint_ref: Option<ReasonCode>,
}

/// A TCP header's numbers.
#[derive(Serialize, JsonSchema)]
pub struct TcpLine {
    /// Set flags as tcpdump's letters, e.g. `PA`.
    pub flags: String,
    pub seq: u32,
    pub ack: u32,
    /// The window field, unscaled.
    pub win: u16,
    /// Payload bytes.
    pub len: u32,
}

#[derive(Serialize, JsonSchema)]
pub struct IcmpLine {
    #[serde(rename = "type")]
    pub kind: u8,
    pub code: u8,
}

/// The TCP window check that failed.
#[derive(Serialize, JsonSchema)]
pub struct WindowLine {
    /// The packet's sender's view of the window.
    pub sender: SideLine,
    /// The receiver's.
    pub receiver: SideLine,
    /// The bound compared against: the kernel's when it logs one, else recomputed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bound: Option<u32>,
    /// Bytes past the bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excess: Option<u32>,
    /// ACK checks on an entry a NAT helper changed a payload length of: what the kernel
    /// added to the ACK (and SACK edge) before comparing, when not 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seqadj: Option<i32>,
    /// The check in words, with the numbers.
    pub explain: String,
}

/// One direction's `struct ip_ct_tcp_state`.
#[derive(Serialize, JsonSchema)]
pub struct SideLine {
    pub end: u32,
    pub maxend: u32,
    pub maxwin: u32,
    pub maxack: u32,
    pub scale: u8,
}

/// The conntrack entry the packet was checked against.
#[derive(Serialize, JsonSchema)]
pub struct CtLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<TcpState>,
    pub original: EndsLine,
    pub reply: EndsLine,
    /// The reply does not come from where the original went.
    pub dnat: bool,
}

#[derive(Serialize, JsonSchema)]
pub struct EndsLine {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

/// An RST a stack sent for a packet with no socket.
#[derive(Serialize, JsonSchema)]
pub struct ResetLine<'a> {
    pub event: ResetTag,
    pub schema_version: Version,
    pub time: String,
    pub ts_ns: u64,
    /// The RST's own addresses (the answered packet's, reversed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub daddr: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OwnerJson<'static>>")]
    pub owner: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    /// The TCP header of the packet it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trigger: Option<TcpLine>,
}

/// An INVALID packet and the RST that answered it.
#[derive(Serialize, JsonSchema)]
pub struct IncidentLine<'a> {
    pub event: IncidentTag,
    pub schema_version: Version,
    /// The RST's time.
    pub time: String,
    pub ts_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<AddrLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<AddrLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<AddrLine>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct: Option<CtLine>,
    pub invalid: EventLine<'a>,
    pub reset: ResetLine<'a>,
    /// What the RST does to the connection.
    pub effect: Effect,
    /// The incident in one sentence.
    pub explain: String,
}

#[derive(Serialize, JsonSchema)]
pub struct AddrLine {
    pub addr: IpAddr,
    pub port: u16,
}

/// Events missing from the stream since the last such line.
#[derive(Serialize, JsonSchema)]
pub struct LostLine {
    pub event: LostTag,
    pub schema_version: Version,
    pub cause: Loss,
    pub count: u64,
}

/// The last line: what the session saw.
#[derive(Serialize, JsonSchema)]
pub struct SummaryLine<'a> {
    pub event: SummaryTag,
    pub schema_version: Version,
    /// The verdict probe (absent in a replay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub seconds: f64,
    pub invalid: u64,
    pub ignored: u64,
    pub drop: u64,
    pub lost: u64,
    pub recursion_misses: u64,
    /// Hits the kernel could not run a kprobe or kretprobe of ours for; absent where the
    /// kernel does not report them (before 6.7) and in a replay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kprobe_misses: Option<u64>,
    pub untracked: u64,
    pub orphan_reasons: u64,
    pub resets: u64,
    pub incidents: u64,
    /// Events per reason_code.
    pub counts: &'a BTreeMap<ReasonCode, u64>,
    pub top_flows: Vec<FlowRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_netns: Vec<NetnsRow<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_scans: Option<OwnerScans>,
    /// The kernel's counter deltas over the session, by column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<&'a BTreeMap<String, u64>>,
    pub namespaces: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_start: Option<Fill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table_end: Option<Fill>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_btf_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub startup_attached_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_kib: Option<u64>,
}

#[derive(Serialize, JsonSchema)]
pub struct FlowRow {
    pub flow: String,
    pub events: u64,
}

#[derive(Serialize, JsonSchema)]
pub struct NetnsRow<'a> {
    pub netns: u32,
    pub events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<OwnerJson<'static>>")]
    pub owner: Option<&'a RawValue>,
}

#[derive(Serialize, JsonSchema)]
pub struct OwnerScans {
    pub count: u64,
    pub longest_ms: f64,
}

#[derive(Serialize, JsonSchema)]
pub struct Fill {
    pub count: u64,
    pub max: u64,
}

/// The schema of one line (JSON Schema 2020-12). Objects allow no keys but their own, so a
/// key the schema does not know fails validation.
pub fn schema() -> Value {
    // What is written: a key skipped when empty or unknown is not required.
    let mut v = SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
        .into_root_schema_for::<Line>()
        .to_value();
    closed(&mut v);
    if let Some(o) = v.as_object_mut() {
        o.insert("title".into(), "conntrack-trace --json line".into());
        o.insert(
            "description".into(),
            format!(
                "One line of `conntrack-trace --json` (and `replay --json`), \
                 schema_version {VERSION}"
            )
            .into(),
        );
    }
    v
}

/// Sets `additionalProperties: false` on every object schema with `properties` (maps, which
/// have none, keep theirs).
fn closed(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), false.into());
            }
            o.values_mut().for_each(closed);
        }
        Value::Array(a) => a.iter_mut().for_each(closed),
        _ => {}
    }
}

/// Checks `value` against `schema` (as [`schema`] makes it), for the keywords it uses:
/// `$ref` into `$defs`, `type`, `const`, `enum`, `oneOf`, `anyOf`, `properties`,
/// `required`, `additionalProperties`, `items`, `minimum`, `maximum`. Returns what is
/// wrong, with the path. A validator crate would pull in a regex engine and more for these
/// few keywords: the guest's release build took minutes longer.
pub fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    check(schema, schema, value, "$")
}

fn check(root: &Value, s: &Value, v: &Value, at: &str) -> Result<(), String> {
    let Some(s) = s.as_object() else {
        // `true` accepts anything, `false` nothing.
        return match s.as_bool() {
            Some(false) => Err(format!("{at}: not allowed here")),
            _ => Ok(()),
        };
    };
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let target = r
            .strip_prefix('#')
            .and_then(|p| root.pointer(p))
            .ok_or_else(|| format!("{at}: unresolvable $ref {r}"))?;
        check(root, target, v, at)?;
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.iter().any(|t| is_type(v, t)) {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        return Err(format!("{at}: {v} is not {c}"));
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        return Err(format!(
            "{at}: {v} is not one of {}",
            Value::from(e.clone())
        ));
    }
    for (key, exactly_one) in [("oneOf", true), ("anyOf", false)] {
        if let Some(alts) = s.get(key).and_then(Value::as_array) {
            let results: Vec<_> = alts.iter().map(|a| check(root, a, v, at)).collect();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            if ok == 0 || (exactly_one && ok > 1) {
                let why: Vec<String> = results.into_iter().filter_map(Result::err).collect();
                return Err(format!(
                    "{at}: matches {ok} of {key}'s {} schemas ({})",
                    alts.len(),
                    why.join("; ")
                ));
            }
        }
    }
    for key in ["minimum", "maximum"] {
        if let (Some(bound), Some(n)) = (s.get(key).and_then(Value::as_f64), v.as_f64())
            && (if key == "minimum" {
                n < bound
            } else {
                n > bound
            })
        {
            return Err(format!("{at}: {v} is out of range ({key} {bound})"));
        }
    }
    if let Some(o) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !o.contains_key(r) {
                return Err(format!("{at}: no {r}"));
            }
        }
        for (k, x) in o {
            let at = format!("{at}.{k}");
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(p), _) => check(root, p, x, &at)?,
                (None, Some(extra)) => check(root, extra, x, &at)?,
                (None, None) => {}
            }
        }
    }
    if let (Some(a), Some(items)) = (v.as_array(), s.get("items")) {
        for (i, x) in a.iter().enumerate() {
            check(root, items, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

fn is_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}

/// Every property name the schema defines, at any depth.
pub fn keys(schema: &Value) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    fn walk(v: &Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            Value::Object(o) => {
                if let Some(p) = o.get("properties").and_then(Value::as_object) {
                    out.extend(p.keys().cloned());
                }
                o.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(schema, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn readme_table() -> (Vec<String>, String) {
        let readme = include_str!("../../README.md");
        let table = readme
            .split("### JSON keys")
            .nth(1)
            .expect("README has a JSON keys section")
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .collect::<Vec<_>>();
        let mut first = Vec::new();
        let mut all = String::new();
        for row in table {
            let mut cells = row.split('|').skip(1);
            let keys = cells.next().unwrap_or_default();
            first.extend(ticked(keys));
            all.push_str(row);
        }
        (first, all)
    }

    /// The words in backticks.
    fn ticked(s: &str) -> Vec<String> {
        s.split('`').skip(1).step_by(2).map(String::from).collect()
    }

    /// Every key the table's first column names is a key of the schema, and every key of
    /// the schema is named somewhere in the table, in backticks.
    #[test]
    fn readme_key_table_matches_the_schema() {
        let schema = schema();
        let keys = keys(&schema);
        let (first, table) = readme_table();
        assert!(first.len() >= 10, "{first:?}");
        for k in &first {
            assert!(
                keys.contains(k),
                "README's table names `{k}`, the schema has no such key"
            );
        }
        let documented: std::collections::BTreeSet<String> = ticked(&table)
            .iter()
            .flat_map(|t| t.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .map(String::from)
            .collect();
        let missing: Vec<_> = keys.iter().filter(|k| !documented.contains(*k)).collect();
        assert!(
            missing.is_empty(),
            "keys of the schema README's table does not name: {missing:?}"
        );
    }

    #[test]
    fn schema_names_every_closed_set_value() {
        let s = schema().to_string();
        for c in ReasonCode::ALL {
            assert!(s.contains(&format!("\"{}\"", c.as_str())), "{c}");
        }
        for m in Mode::ALL {
            assert!(s.contains(&format!("\"{}\"", m.as_str())), "{m}");
        }
    }

    #[test]
    fn validator_rejects_what_the_schema_does_not_allow() {
        let s = schema();
        let lost =
            json!({"event": "lost", "schema_version": VERSION, "cause": "ring_full", "count": 3});
        assert_eq!(validate(&s, &lost), Ok(()));
        for (bad, why) in [
            (
                json!({"event": "lost", "schema_version": VERSION, "cause": "ring_ful", "count": 3}),
                "a cause out of its set",
            ),
            (
                json!({"event": "lost", "schema_version": VERSION, "cause": "ring_full", "count": -1}),
                "a negative count",
            ),
            (
                json!({"event": "lost", "schema_version": VERSION, "cause": "ring_full"}),
                "a required key missing",
            ),
            (
                json!({"event": "lost", "schema_version": VERSION, "cause": "ring_full", "count": 3, "extra": 1}),
                "an unknown key",
            ),
            (
                json!({"event": "lost", "schema_version": VERSION + 1, "cause": "ring_full", "count": 3}),
                "another version",
            ),
            (
                json!({"event": "lose", "schema_version": VERSION, "cause": "ring_full", "count": 3}),
                "an unknown event",
            ),
        ] {
            assert!(validate(&s, &bad).is_err(), "{why}: {bad}");
        }
    }
}

/// The lines a record makes, built from its fields with serde's serialisation, for the hand
/// writer's tests to compare with.
#[cfg(test)]
mod from_records {
    use super::*;
    use crate::{
        ct::{Conntrack, Endpoints},
        reset::{Incident, Reset},
        verdict::{Record, Tcp},
    };
    use conntrack_trace_common::window::TcpWindow;

    fn time(t: std::time::SystemTime) -> String {
        humantime::format_rfc3339_micros(t).to_string()
    }

    impl<'a> EventLine<'a> {
        /// `hint_seen`: an earlier line carried the hint of its reason_code.
        pub fn of(r: &'a Record, hint_seen: bool) -> Self {
            let p = &r.pkt;
            EventLine {
                event: r.verdict,
                schema_version: Version,
                time: time(r.time),
                ts_ns: r.ts_ns,
                reason: r.reason_text(),
                reason_code: r.reason_code(),
                family: p.family,
                proto: p.proto.map(|_| p.proto_name().into_owned()),
                saddr: p.saddr,
                sport: p.sport,
                daddr: p.daddr,
                dport: p.dport,
                tcp: p.tcp.as_ref().map(TcpLine::of),
                icmp: p.icmp.map(|(kind, code)| IcmpLine { kind, code }),
                window: r.window.as_ref().map(|w| WindowLine {
                    sender: SideLine::of(&w.sender),
                    receiver: SideLine::of(&w.receiver),
                    bound: w.bound,
                    excess: w.excess,
                    seqadj: w.seqadj,
                    explain: w.to_string(),
                }),
                ct: r.ct.as_ref().map(CtLine::of),
                netns: r.netns,
                owner: r.owner.as_ref().map(|o| o.json()),
                ifindex: r.ifindex,
                hook: r.hook,
                hint: r.hint.as_ref().filter(|_| !hint_seen).map(|h| &h.hint),
                hint_ref: r
                    .hint
                    .as_ref()
                    .filter(|_| hint_seen)
                    .map(|_| r.reason_code()),
            }
        }
    }

    impl TcpLine {
        fn of(t: &Tcp) -> Self {
            TcpLine {
                flags: t.flags.as_str().into(),
                seq: t.seq,
                ack: t.ack,
                win: t.win,
                len: t.len,
            }
        }
    }

    impl SideLine {
        fn of(w: &TcpWindow) -> Self {
            SideLine {
                end: w.end,
                maxend: w.maxend,
                maxwin: w.maxwin,
                maxack: w.maxack,
                scale: w.scale,
            }
        }
    }

    impl CtLine {
        fn of(c: &Conntrack) -> Self {
            let ends = |e: &Endpoints| EndsLine {
                saddr: e.saddr,
                sport: e.sport,
                daddr: e.daddr,
                dport: e.dport,
            };
            CtLine {
                state: c.state,
                original: ends(&c.original),
                reply: ends(&c.reply),
                dnat: c.dnat(),
            }
        }
    }

    impl<'a> ResetLine<'a> {
        pub fn of(r: &'a Reset) -> Self {
            let t = &r.trigger;
            ResetLine {
                event: ResetTag,
                schema_version: Version,
                time: time(r.time),
                ts_ns: r.ts_ns,
                saddr: t.daddr,
                sport: t.dport,
                daddr: t.saddr,
                dport: t.sport,
                netns: r.netns,
                owner: r.owner.as_ref().map(|o| o.json()),
                ifindex: r.ifindex,
                trigger: t.tcp.as_ref().map(TcpLine::of),
            }
        }
    }

    impl<'a> IncidentLine<'a> {
        pub fn of(i: &'a Incident, hint_seen: bool) -> Self {
            let roles = i.roles();
            let addr = |(addr, port): (IpAddr, u16)| AddrLine { addr, port };
            IncidentLine {
                event: IncidentTag,
                schema_version: Version,
                time: time(i.reset.time),
                ts_ns: i.reset.ts_ns,
                client: roles.map(|(c, _, _)| addr((c.saddr, c.sport))),
                service: roles.map(|(_, s, _)| addr(s)),
                backend: roles.map(|(_, _, b)| addr(b)),
                ct: i.ct.as_ref().map(CtLine::of),
                invalid: EventLine::of(&i.invalid, hint_seen),
                reset: ResetLine::of(&i.reset),
                effect: i.effect(),
                explain: crate::output::incident_story(i),
            }
        }
    }
}
