//! `--pcap FILE`: a pcapng of exactly the packets reported, as captured in the kernel (from
//! the network header, LINKTYPE_RAW), each with a comment carrying the verdict, the reason and
//! the window numbers, so the evidence opens in Wireshark/tshark with the explanation attached.

use std::{
    borrow::Cow,
    io::{self, Write},
    time::UNIX_EPOCH,
};

use pcap_file::{
    DataLink,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

use super::Output;
use crate::{
    reset::{Incident, Reset},
    summary::Summary,
    verdict::{Packet, Record},
};

pub struct Pcap<W: Write> {
    writer: PcapNgWriter<W>,
    snaplen: usize,
}

fn to_io(e: pcap_file::PcapError) -> io::Error {
    match e {
        pcap_file::PcapError::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl<W: Write> Pcap<W> {
    pub fn new(out: W, snaplen: usize) -> io::Result<Self> {
        let mut writer = PcapNgWriter::new(out).map_err(to_io)?;
        let idb = InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen: snaplen as u32,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("conntrack-trace")),
                InterfaceDescriptionOption::IfDescription(Cow::Borrowed(
                    "packets netfilter conntrack marked INVALID/IGNORED or dropped, and packets answered with an RST for lack of a socket; captured from the network header in the kernel",
                )),
                // Timestamps are written in nanoseconds.
                InterfaceDescriptionOption::IfTsResol(9),
            ],
        };
        writer.write_pcapng_block(idb).map_err(to_io)?;
        writer.get_mut().flush()?;
        Ok(Self { writer, snaplen })
    }

    fn packet(
        &mut self,
        p: &Packet,
        time: std::time::SystemTime,
        comment: String,
    ) -> io::Result<()> {
        let data = &p.headers[..p.headers.len().min(self.snaplen)];
        let original_len = ip_len(&p.headers).unwrap_or(p.headers.len() as u32);
        let epb = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: time.duration_since(UNIX_EPOCH).unwrap_or_default(),
            original_len,
            data: Cow::Borrowed(data),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(comment))],
        };
        self.writer.write_pcapng_block(epb).map_err(to_io)?;
        Ok(())
    }
}

/// The packet's length from its IP header (the capture holds at most SNAP_LEN bytes of it).
fn ip_len(h: &[u8]) -> Option<u32> {
    match h.first()? >> 4 {
        4 => Some(u16::from_be_bytes([*h.get(2)?, *h.get(3)?]) as u32),
        6 => Some(40 + u16::from_be_bytes([*h.get(4)?, *h.get(5)?]) as u32),
        _ => None,
    }
}

fn comment(r: &Record) -> String {
    let mut c = format!(
        "{} {}: {}",
        r.verdict.as_str().to_uppercase(),
        r.reason_code(),
        r.reason_text()
    );
    if let Some(w) = &r.window {
        c += &format!(
            "; {}; sender end={} maxend={} maxwin={} scale={}; receiver end={} maxend={} maxwin={} scale={}",
            w,
            w.sender.end,
            w.sender.maxend,
            w.sender.maxwin,
            w.sender.scale,
            w.receiver.end,
            w.receiver.maxend,
            w.receiver.maxwin,
            w.receiver.scale
        );
    }
    if let Some(ct) = &r.ct {
        c += &format!(
            "; ct {} {}:{} > {}:{} reply {}:{} > {}:{}",
            ct.state.map_or("-", |s| s.as_str()),
            ct.original.saddr,
            ct.original.sport,
            ct.original.daddr,
            ct.original.dport,
            ct.reply.saddr,
            ct.reply.sport,
            ct.reply.daddr,
            ct.reply.dport
        );
    }
    if let Some(n) = r.netns {
        c += &format!("; netns {n}{}", r.owner.as_ref().map_or("", |o| o.text()));
    }
    if let Some(h) = r.hook {
        c += &format!("; hook {h}");
    }
    c
}

fn reset_comment(r: &Reset) -> String {
    format!(
        "answered with RST (no socket) in netns {}",
        super::Netns(r.netns, r.owner.as_deref())
    )
}

impl<W: Write> Output for Pcap<W> {
    fn event(&mut self, r: &Record) -> io::Result<()> {
        self.packet(&r.pkt, r.time, comment(r))
    }

    fn lost(&mut self, _n: u64, _cause: super::Loss) -> io::Result<()> {
        Ok(())
    }

    fn reset(&mut self, r: &Reset) -> io::Result<()> {
        self.packet(&r.trigger, r.time, reset_comment(r))
    }

    fn incident(&mut self, i: &Incident) -> io::Result<()> {
        let c = format!(
            "{}; it followed an INVALID packet: {}",
            reset_comment(&i.reset),
            super::incident_story(i)
        );
        self.packet(&i.reset.trigger, i.reset.time, c)
    }

    fn summary(&mut self, _s: &Summary) -> io::Result<()> {
        self.writer.get_mut().flush()
    }

    /// With every batch: an interrupted trace still leaves a complete file.
    fn flush(&mut self) -> io::Result<()> {
        self.writer.get_mut().flush()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use pcap_file::pcapng::{Block, PcapNgReader};

    use super::*;
    use crate::verdict::{Tcp, Verdict};

    #[test]
    fn written_packets_read_back_with_their_comments() {
        // A real IPv4/TCP header (SYN to 127.0.0.1:35045, captured on this host).
        let headers = vec![
            69, 0, 0, 60, 9, 208, 64, 0, 64, 6, 50, 234, 127, 0, 0, 1, 127, 0, 0, 1, 145, 72, 136,
            229, 104, 175, 232, 18, 0, 0, 0, 0, 160, 2, 255, 215, 254, 48, 0, 0,
        ];
        let time = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let pkt = Packet {
            headers: headers.clone(),
            tcp: Some(Tcp {
                flags: "S".into(),
                seq: 1,
                ack: 0,
                win: 1,
                len: 0,
                sack: None,
            }),
            ..Default::default()
        };
        let r = Record {
            netns: Some(4026531840),
            hook: Some(crate::verdict::Hook::PreRouting),
            ..Record::bare(Verdict::Invalid, 1, time, pkt)
        };
        let mut buf = Vec::new();
        let mut p = Pcap::new(&mut buf, 32).unwrap();
        p.event(&r).unwrap();
        drop(p);
        let mut reader = PcapNgReader::new(&buf[..]).unwrap();
        let mut packets = Vec::new();
        while let Some(b) = reader.next_block() {
            if let Block::EnhancedPacket(e) = b.unwrap() {
                packets.push(e.into_owned());
            }
        }
        assert_eq!(packets.len(), 1);
        let e = &packets[0];
        assert_eq!(&e.data[..], &headers[..32], "cut at the snap length");
        assert_eq!(e.original_len, 60, "the IP total length");
        assert_eq!(e.timestamp, time.duration_since(UNIX_EPOCH).unwrap());
        let EnhancedPacketOption::Comment(c) = &e.options[0] else {
            panic!("no comment")
        };
        assert!(c.starts_with("INVALID unknown: no reason logged"), "{c}");
        assert!(
            c.contains("netns 4026531840") && c.contains("PRE_ROUTING"),
            "{c}"
        );
    }
}
