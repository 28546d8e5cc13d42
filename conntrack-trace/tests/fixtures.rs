//! Events recorded from real Debian kernels in the VM suite (`--record`, see
//! tests/fixtures/*.ctrec), decoded and rendered by the library. Two independent sources sit
//! in every TCP window event: the bound the kernel logged, and the window state read from the
//! conntrack entry. The kernel's formula must tie them together; nothing here compares the
//! output with a copy of itself.

use std::{fs, path::PathBuf};

use conntrack_trace::{
    events::Events,
    hints::{Hints, Node},
    output::{Output, json::Json},
    record,
};
use serde_json::Value;

fn fixture(name: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let (clock, records) = record::read(fs::File::open(&path).unwrap()).unwrap();
    let mut buf = Vec::new();
    {
        let mut out = Json::new(&mut buf);
        let mut events = Events::new(clock, Hints::new(Node::default()), true, None);
        for r in &records {
            events.handle(r, &mut out).unwrap();
        }
        out.summary(&events.summary).unwrap();
    }
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn u(v: &Value) -> u32 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}")) as u32
}

/// tcp_in_window's bounds (6.1+), from the entry's window state.
fn check_bound(e: &Value) {
    let w = &e["window"];
    let (s, r) = (&w["sender"], &w["receiver"]);
    let bound = u(&w["bound"]);
    let want = match e["reason_code"].as_str().unwrap() {
        "seq_over" => u(&s["maxend"]).wrapping_add(1),
        "ack_over" => u(&r["end"]).wrapping_add(1),
        "seq_under" => u(&s["end"]).wrapping_sub(u(&r["maxwin"])).wrapping_sub(1),
        other => panic!("unexpected {other}"),
    };
    assert_eq!(bound, want, "kernel bound vs window state: {e}");
    // And the number in the kernel's text is that bound.
    assert!(
        e["reason"].as_str().unwrap().contains(&bound.to_string()),
        "{e}"
    );
}

#[test]
fn window_events_on_6_12_tie_the_kernel_bound_to_the_window_state() {
    for name in ["6.12-tcp-window.ctrec", "6.12-tcp-window-exact.ctrec"] {
        let events = fixture(name);
        let codes: Vec<(&str, &str)> = events
            .iter()
            .filter(|e| e["event"] != "summary")
            .map(|e| {
                (
                    e["event"].as_str().unwrap(),
                    e["reason_code"].as_str().unwrap(),
                )
            })
            .collect();
        // 6.1+: SEQ/ACK over the window are INVALID, an old retransmit only IGNORED.
        assert_eq!(
            codes,
            [
                ("invalid", "seq_over"),
                ("invalid", "ack_over"),
                ("ignored", "seq_under")
            ],
            "{name}"
        );
        for e in events.iter().filter(|e| e["event"] != "summary") {
            check_bound(e);
            let ct = &e["ct"];
            assert_eq!(ct["dnat"], true);
            // The backend's segment: its source is where the Service was DNAT'd to.
            assert_eq!(ct["reply"]["saddr"], e["saddr"]);
            assert_eq!(ct["reply"]["sport"], e["sport"]);
            assert_eq!(e["hook"], "PRE_ROUTING");
            let tcp = &e["tcp"];
            let excess = u(&e["window"]["excess"]);
            match e["reason_code"].as_str().unwrap() {
                "seq_over" => assert_eq!(
                    excess,
                    u(&tcp["seq"]).wrapping_sub(u(&e["window"]["bound"])) + 1
                ),
                "ack_over" => assert_eq!(
                    excess,
                    u(&tcp["ack"]).wrapping_sub(u(&e["window"]["bound"])) + 1
                ),
                _ => assert!(excess >= 1),
            }
        }
        let summary = events.last().unwrap();
        assert_eq!(
            (summary["invalid"].as_u64(), summary["ignored"].as_u64()),
            (Some(2), Some(1))
        );
    }
}

/// Whether the segment, by its own headers, fails the bound derived from the window state:
/// the packet and the conntrack entry are read separately in the kernel.
fn fails_bound(e: &Value) -> bool {
    let (tcp, bound) = (&e["tcp"], u(&e["window"]["bound"]));
    let end = u(&tcp["seq"]).wrapping_add(u(&tcp["len"]));
    match e["reason_code"].as_str().unwrap() {
        "seq_over" => (u(&tcp["seq"]).wrapping_sub(bound) as i32) >= 0,
        "ack_over" => (u(&tcp["ack"]).wrapping_sub(bound) as i32) >= 0,
        "seq_under" => (bound.wrapping_sub(end) as i32) >= 0,
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn on_5_10_every_window_failure_is_invalid_and_explained_by_the_window() {
    for name in ["5.10-tcp-window.ctrec", "5.10-tcp-window-exact.ctrec"] {
        let events = fixture(name);
        let mut codes = Vec::new();
        for e in events.iter().filter(|e| e["event"] != "summary") {
            assert_eq!(
                e["event"], "invalid",
                "before 6.1 an old retransmit is INVALID too: {e}"
            );
            // 5.x logs no number: the bound is recomputed from the entry's window state
            // (Debian 5.10 has no module BTF, but its vmlinux BTF describes nf_conn).
            assert!(
                !e["reason"]
                    .as_str()
                    .unwrap()
                    .chars()
                    .any(|c| c.is_ascii_digit()),
                "{e}"
            );
            assert!(
                fails_bound(e),
                "the window state does not explain the verdict: {e}"
            );
            codes.push(e["reason_code"].as_str().unwrap().to_string());
        }
        assert_eq!(codes, ["seq_over", "ack_over", "seq_under"], "{name}");
    }
}

#[test]
fn on_6_12_the_packet_fails_the_kernel_bound() {
    for e in fixture("6.12-tcp-window.ctrec")
        .iter()
        .filter(|e| e["event"] != "summary")
    {
        assert!(fails_bound(e), "{e}");
    }
}

#[test]
fn kube_proxy_incident_names_service_and_backend() {
    for (name, effect) in [
        ("6.12-kube-proxy-incident.ctrec", "reset"),
        ("5.10-kube-proxy-incident.ctrec", "reset"),
    ] {
        let events = fixture(name);
        let incidents: Vec<&Value> = events.iter().filter(|e| e["event"] == "incident").collect();
        assert_eq!(incidents.len(), 1, "{name}");
        let i = incidents[0];
        assert_eq!(i["service"]["addr"], "10.96.0.10", "{i}");
        assert_eq!(i["service"]["port"], 80);
        // The backend is where the INVALID segment came from, the client where it went.
        assert_eq!(i["backend"]["addr"], i["invalid"]["saddr"]);
        assert_eq!(i["backend"]["port"], i["invalid"]["sport"]);
        assert_eq!(i["client"]["addr"], i["invalid"]["daddr"]);
        // The RST goes back from the client to the backend.
        assert_eq!(i["reset"]["saddr"], i["invalid"]["daddr"]);
        assert_eq!(i["reset"]["daddr"], i["invalid"]["saddr"]);
        if i["invalid"].get("window").is_some() {
            assert_eq!(i["effect"], effect, "{name}");
        } else {
            assert_eq!(i["effect"], "unknown", "no window state on {name}: {i}");
        }
    }
}
