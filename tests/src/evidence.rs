//! The tracer's files: `--pcap` read back with a pcapng parser, `--record` replayed through
//! `conntrack-trace replay`, and recordings handed to the host as fixtures.
//!
//! Fixture protocol: `CT-FIXTURE <kernel>-<scenario>.ctrec <base64 of the file>` on one
//! console line; the host saves the console and decodes these lines into
//! `conntrack-trace/tests/fixtures/`.

use std::process::Command;

use anyhow::{Context, Result};
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::{Block, PcapNgReader};
use serde_json::Value;

use crate::inject::Packet;
use crate::kernel::Kernel;
use crate::kmsg::CtLog;
use crate::observe::Observation;
use crate::tools;
use crate::verify::{Expected, Problems, Verdict, log_is_packet};

/// Where a scenario's tracer writes its files in the guest.
pub fn pcap_path(scenario: &str) -> String {
    format!("/tmp/{scenario}.pcapng")
}

pub fn record_path(scenario: &str) -> String {
    format!("/tmp/{scenario}.ctrec")
}

/// The pcapng holds one Enhanced Packet Block per reported packet and nothing else: each
/// injected packet once, with its own addresses, ports and TCP header bytes, and a comment
/// that carries the verdict and the kernel's reason text.
pub fn check_pcap(path: &str, obs: &Observation, expected: &[Expected], problems: &mut Problems) {
    let Some(trace) = &obs.trace else { return };
    let packets = match read_packets(path) {
        Ok(p) => p,
        Err(e) => return problems.0.push(format!("pcap {path}: {e:#}")),
    };
    // Every event that stands for a packet the tracer saw (an incident stands for its RST's
    // trigger; the INVALID packet inside it was already reported on its own).
    let reported = trace
        .events
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("invalid" | "ignored" | "drop" | "reset" | "incident")
            )
        })
        .count();
    if packets.len() != reported {
        problems.0.push(format!(
            "pcap {path}: {} packet blocks for {reported} reported packets",
            packets.len()
        ));
    }
    if packets.len() != expected.len() {
        problems.0.push(format!(
            "pcap {path}: {} packet blocks for {} injected packets",
            packets.len(),
            expected.len()
        ));
    }
    for e in expected {
        let found: Vec<&(EnhancedPacketBlock<'static>, String)> = packets
            .iter()
            .filter(|(epb, _)| same_packet(&epb.data, &e.packet))
            .collect();
        let [(epb, comment)] = found.as_slice() else {
            problems.0.push(format!(
                "pcap {path}: {} packet blocks for {}",
                found.len(),
                e.packet.describe()
            ));
            continue;
        };
        let sent = e.packet.bytes();
        if epb.original_len as usize != sent.len() {
            problems.0.push(format!(
                "pcap {path}: {}: original length {} but {} bytes were sent",
                e.what,
                epb.original_len,
                sent.len()
            ));
        }
        let verdict = match e.verdict {
            Verdict::Invalid => "INVALID",
            Verdict::Ignored => "IGNORED",
        };
        let reason = obs
            .logs
            .iter()
            .find(|l| log_is_packet(l, &e.packet))
            .map(|l: &CtLog| l.reason.as_str());
        let comment_ok = comment.contains(verdict) && reason.is_none_or(|r| comment.contains(r));
        if !comment_ok {
            problems.0.push(format!(
                "pcap {path}: {}: comment should carry {verdict} and the kernel's reason {reason:?}: {comment:?}",
                e.what
            ));
        }
    }
}

/// The Enhanced Packet Blocks of a pcapng file with their comments.
fn read_packets(path: &str) -> Result<Vec<(EnhancedPacketBlock<'static>, String)>> {
    let file = std::fs::File::open(path).context("open")?;
    let mut reader = PcapNgReader::new(std::io::BufReader::new(file)).context("pcapng header")?;
    let mut out = Vec::new();
    while let Some(block) = reader.next_block() {
        if let Block::EnhancedPacket(epb) = block.context("pcapng block")? {
            let comment = epb
                .options
                .iter()
                .filter_map(|o| match o {
                    EnhancedPacketOption::Comment(c) => Some(c.to_string()),
                    _ => None,
                })
                .collect::<Vec<_>>()
                .join("\n");
            out.push((epb.into_owned(), comment));
        }
    }
    Ok(out)
}

/// A captured IPv4 packet is the one we sent: same addresses and protocol, and the transport
/// header as we wrote it (routing changes only TTL, IP ID and IP checksum on the way; the
/// packet is captured inside conntrack, before any NAT).
fn same_packet(captured: &[u8], sent: &Packet) -> bool {
    let ours = sent.bytes();
    let ihl = usize::from(captured.first().map_or(0, |b| b & 0x0f)) * 4;
    let transport_header = match sent.protonum() {
        6 => 20,
        _ => 8,
    };
    captured.len() >= ihl + transport_header
        && ihl == 20
        && captured[9] == ours[9]
        && captured[12..20] == ours[12..20]
        && captured[20..] == ours[20..captured.len().min(ours.len())]
}

/// `conntrack-trace replay FILE --json` prints the live session's stream again: the same
/// events in the same order, field for field (the summary aside, which times the session).
pub fn check_replay(path: &str, obs: &Observation, problems: &mut Problems) {
    let Some(trace) = &obs.trace else { return };
    let replayed = match replay(path) {
        Ok(r) => r,
        Err(e) => return problems.0.push(format!("replay {path}: {e:#}")),
    };
    let replayed: Vec<&Value> = replayed
        .iter()
        .filter(|e| e["event"] != "summary")
        .collect();
    if replayed.len() != trace.events.len() {
        problems.0.push(format!(
            "replay {path}: {} events, the live stream had {}",
            replayed.len(),
            trace.events.len()
        ));
    }
    for (i, (live, again)) in trace.events.iter().zip(&replayed).enumerate() {
        // Who owned a namespace is looked up on the live node; a recording, replayed later
        // and elsewhere, does not know it.
        let mut live = live.clone();
        drop_owners(&mut live);
        if live != **again {
            problems.0.push(format!(
                "replay {path}: event {i} differs: live {live} replayed {again}"
            ));
        }
    }
}

/// Removes every `owner` object (an incident carries one in each of its packets), and the
/// owner an incident's sentence names after each namespace ("netns 4026532126 (pid 461
/// sleep)").
fn drop_owners(v: &mut Value) {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("owner");
        if let Some(Value::String(text)) = obj.get_mut("explain") {
            *text = without_netns_owners(text);
        }
        obj.values_mut().for_each(drop_owners);
    }
}

fn without_netns_owners(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("netns ") {
        let digits = rest[at + 6..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - at - 6);
        let end = at + 6 + digits;
        out.push_str(&rest[..end]);
        rest = &rest[end..];
        if digits > 0
            && rest.starts_with(" (")
            && let Some(close) = rest.find(')')
        {
            rest = &rest[close + 1..];
        }
    }
    out.push_str(rest);
    out
}

fn replay(path: &str) -> Result<Vec<Value>> {
    let out = Command::new(tools::tracer())
        .args(["replay", path, "--json"])
        .output()
        .context("spawn conntrack-trace replay")?;
    anyhow::ensure!(
        out.status.success(),
        "exited with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("JSON line {l:?}")))
        .collect()
}

/// Prints the recording as a `CT-FIXTURE` line for the host to collect.
pub fn print_fixture(kernel: &Kernel, scenario: &str, path: &str) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("read {path}"))?;
    let label = kernel.label.as_deref().unwrap_or(&kernel.release);
    println!("CT-FIXTURE {label}-{scenario}.ctrec {}", base64(&bytes));
    Ok(())
}

/// Standard base64 (RFC 4648) with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_taken_out_of_incident_sentences() {
        assert_eq!(
            without_netns_owners(
                "INVALID (seq_over) in netns 4026532126 (pid 461 sleep), so it was not NATed; \
                 netns 4026532151 had no socket"
            ),
            "INVALID (seq_over) in netns 4026532126, so it was not NATed; netns 4026532151 \
             had no socket"
        );
        assert_eq!(without_netns_owners("netns (x)"), "netns (x)");
    }

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn captured_packet_matches_despite_routing_changes() {
        let p = Packet::tcp(
            "10.0.1.2:8080".parse().unwrap(),
            "10.0.0.1:40000".parse().unwrap(),
            7,
            9,
            crate::inject::ACK,
            b"hello".to_vec(),
        );
        let mut captured = p.bytes();
        captured[8] -= 1; // TTL after one router
        captured[4] = 0x12; // IP ID chosen by the kernel
        assert!(same_packet(&captured, &p));
        assert!(same_packet(&captured[..40], &p), "cut at a snap length");
        captured[24] ^= 1; // a different sequence number
        assert!(!same_packet(&captured, &p));
    }
}
