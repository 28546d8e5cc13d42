//! Remediation hints per reason_code: what the kernel did with the packet, the known ways out
//! with their cost, and which of them this node already has (sysctls and ruleset, read once
//! at start-up in the tracer's own network namespace).

use std::{process::Command, sync::Arc};

use foldhash::HashMap;

use schemars::JsonSchema;
use serde::Serialize;

use crate::{counters::sysctl, reason::ReasonCode};

#[derive(Debug, Serialize, JsonSchema)]
pub struct Fix {
    #[serde(rename = "do")]
    pub action: String,
    pub cost: &'static str,
    /// Whether the node already has it; absent when it could not be determined.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Hint {
    pub what: &'static str,
    pub fixes: Vec<Fix>,
}

/// What the node already does about INVALID packets.
#[derive(Clone, Debug, Default)]
pub struct Node {
    pub be_liberal: Option<bool>,
    pub ignore_invalid_rst: Option<bool>,
    pub checksum: Option<bool>,
    /// A rule dropping `ct state invalid` / `--ctstate INVALID` (None: no ruleset tool worked).
    pub invalid_drop_rule: Option<bool>,
}

impl Node {
    pub fn read() -> Self {
        Self {
            be_liberal: sysctl("nf_conntrack_tcp_be_liberal").map(|v| v != 0),
            ignore_invalid_rst: sysctl("nf_conntrack_tcp_ignore_invalid_rst").map(|v| v != 0),
            checksum: sysctl("nf_conntrack_checksum").map(|v| v != 0),
            invalid_drop_rule: ruleset().map(|r| has_invalid_drop(&r)),
        }
    }
}

/// The ruleset as text, from whichever of iptables-save / nft works here.
fn ruleset() -> Option<String> {
    let mut found = None;
    for (cmd, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[]),
        ("nft", &["list", "ruleset"]),
    ] {
        if let Ok(o) = Command::new(cmd).args(args).output()
            && o.status.success()
        {
            found
                .get_or_insert_with(String::new)
                .push_str(&String::from_utf8_lossy(&o.stdout));
        }
    }
    found
}

/// A rule that drops INVALID packets, iptables or nft syntax.
pub fn has_invalid_drop(ruleset: &str) -> bool {
    ruleset.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        let invalid = (l.contains("--ctstate invalid")
            || l.contains("--state invalid")
            || l.contains("ct state invalid"))
            && !l.contains("!");
        invalid && (l.contains("-j drop") || l.ends_with(" drop") || l.contains(" drop "))
    })
}

fn window_fixes(n: &Node) -> Vec<Fix> {
    vec![
        Fix {
            action: "drop INVALID packets before a stack can answer them: `iptables -I FORWARD -m conntrack --ctstate INVALID -j DROP` (kube-proxy's KUBE-FORWARD chain has this rule)".into(),
            cost: "the segment is dropped; TCP recovers by retransmitting",
            active: n.invalid_drop_rule,
        },
        Fix {
            action: "`sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1` (kube-proxy --conntrack-tcp-be-liberal)".into(),
            cost: "conntrack stops enforcing TCP windows: out-of-window and forged segments pass with their entry",
            active: n.be_liberal,
        },
    ]
}

fn hint_for(code: ReasonCode, n: &Node) -> Option<Hint> {
    use ReasonCode::*;
    Some(match code {
        SeqOver | AckOver | SeqUnder | AckUnder | Overshot => Hint {
            what: "outside the TCP window conntrack tracks: if INVALID, the packet lost its entry and skipped NAT; sent to a DNAT'd Service, the receiving stack answers RST and the real connection dies (if IGNORED, it kept its entry and is harmless for NAT)",
            fixes: window_fixes(n),
        },
        InvalidState | BadFlags | InvalidNew | Unknown => Hint {
            what: "not valid for the connection's state: INVALID, so not NATed",
            fixes: window_fixes(n).into_iter().take(1).collect(),
        },
        InvalidRst => Hint {
            what: "an RST outside the window: INVALID, so not NATed",
            fixes: vec![Fix {
                action: "`sysctl -w net.netfilter.nf_conntrack_tcp_ignore_invalid_rst=1`".into(),
                cost: "such RSTs are ignored instead of passing un-NATed",
                active: n.ignore_invalid_rst,
            }],
        },
        IcmpErrorNoFlow => Hint {
            what: "an ICMP error about a connection conntrack does not know (often one that already ended, or an entry lost to an earlier INVALID): no entry, so not NATed back; `--ctstate INVALID` rules match it",
            fixes: window_fixes(n).into_iter().take(1).collect(),
        },
        BadChecksum | UdpBadChecksum | IcmpBadChecksum => Hint {
            what: "bad checksum at PRE_ROUTING (often checksum offload on a virtual NIC): INVALID",
            fixes: vec![Fix {
                action: "`sysctl -w net.netfilter.nf_conntrack_checksum=0`, or fix offload on the interface (`ethtool -K IF tx off`)".into(),
                cost: "conntrack no longer rejects corrupt packets; the stack still does",
                active: n.checksum.map(|on| !on),
            }],
        },
        TableFull => Hint {
            what: "the conntrack table is full and nothing could be evicted: new flows are dropped",
            fixes: vec![
                Fix {
                    action: format!(
                        "raise `net.netfilter.nf_conntrack_max` (now {})",
                        sysctl("nf_conntrack_max").map_or("?".into(), |v| v.to_string())
                    ),
                    cost: "kernel memory, about 300 bytes per entry",
                    active: None,
                },
                Fix {
                    action: "shorten `nf_conntrack_tcp_timeout_established` / UDP timeouts, or NOTRACK high-volume flows in the raw table".into(),
                    cost: "idle connections lose their entry sooner; NOTRACK flows get no NAT or stateful filtering",
                    active: None,
                },
            ],
        },
        InsertFailed => Hint {
            what: "two packets of one new flow raced to create its entry and the clash could not be resolved: the second is dropped (classic with parallel UDP DNS A/AAAA queries)",
            fixes: vec![Fix {
                action: "`options single-request-reopen` in resolv.conf, or a node-local DNS cache".into(),
                cost: "DNS lookups serialize per socket",
                active: None,
            }],
        },
        Truncated | IgnoredState | ChallengeAck | UdpShort | UdpTruncated | IcmpShort
        | IcmpInvalidType | ConntrackDrop => return None,
    })
}

/// A hint and its JSON, serialized once: it goes out with every event of its code.
#[derive(Debug)]
pub struct Cached {
    pub hint: Hint,
    pub json: Box<serde_json::value::RawValue>,
}

/// Hints by reason_code, built once each.
pub struct Hints {
    node: Node,
    cache: HashMap<ReasonCode, Option<Arc<Cached>>>,
}

impl Hints {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            cache: HashMap::default(),
        }
    }

    pub fn get(&mut self, code: ReasonCode) -> Option<Arc<Cached>> {
        let node = &self.node;
        self.cache
            .entry(code)
            .or_insert_with(|| {
                let hint = hint_for(code, node)?;
                let json = serde_json::value::to_raw_value(&hint).expect("a hint serializes");
                Some(Arc::new(Cached { hint, json }))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_drop_rule_detection() {
        assert!(has_invalid_drop(
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
        ));
        assert!(has_invalid_drop("\t\tct state invalid drop"));
        assert!(has_invalid_drop(
            "ct state invalid counter packets 0 bytes 0 drop"
        ));
        assert!(!has_invalid_drop(
            "-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
        assert!(!has_invalid_drop(
            "-A FORWARD -m conntrack ! --ctstate INVALID -j DROP"
        ));
        assert!(!has_invalid_drop("ct state invalid accept"));
    }

    #[test]
    fn hints_say_what_is_active() {
        let node = Node {
            be_liberal: Some(true),
            invalid_drop_rule: Some(false),
            ..Default::default()
        };
        let mut h = Hints::new(node);
        let cached = h.get(ReasonCode::SeqOver).unwrap();
        let w = &cached.hint;
        assert_eq!(w.fixes.len(), 2);
        assert_eq!(w.fixes[0].active, Some(false));
        assert_eq!(w.fixes[1].active, Some(true));
        assert!(h.get(ReasonCode::TableFull).is_some());
        assert!(h.get(ReasonCode::IgnoredState).is_none());
        let json: serde_json::Value = serde_json::from_str(cached.json.get()).unwrap();
        assert!(
            json["fixes"][0]["do"]
                .as_str()
                .unwrap()
                .contains("INVALID -j DROP")
        );
    }
}
