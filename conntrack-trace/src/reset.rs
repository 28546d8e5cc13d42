//! Resets sent for packets that found no socket, and the incident they complete: an INVALID
//! segment escaped NAT, a stack answered it with an RST, the real connection died.

use std::{collections::VecDeque, net::IpAddr, rc::Rc, sync::Arc, time::SystemTime};

use anyhow::{Result, bail};
use conntrack_trace_common::{
    closed_set,
    reset::{HAS_NETNS, ResetEvent},
    string_schema,
};
use foldhash::HashMap;

use crate::{
    ct::{Conntrack, Endpoints},
    owner::Owner,
    verdict::{Clock, Packet, Record, Verdict},
};

#[derive(Clone, Debug)]
pub struct Reset {
    pub ts_ns: u64,
    pub time: SystemTime,
    /// Namespace and interface where the answered packet arrived (where the RST came from).
    pub netns: Option<u32>,
    /// Who owns `netns`, where the tracer knows.
    pub owner: Option<Arc<Owner>>,
    pub ifindex: Option<u32>,
    /// The packet that was answered. The RST itself goes from its destination to its source.
    pub trigger: Packet,
}

pub fn parse(bytes: &[u8]) -> Result<ResetEvent> {
    if bytes.len() < size_of::<ResetEvent>() {
        bail!("short reset event: {} bytes", bytes.len());
    }
    // SAFETY: ResetEvent is repr(C) plain data, any bit pattern is valid, length checked.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ResetEvent>()) })
}

pub fn decode(e: &ResetEvent, clock: &Clock) -> Reset {
    Reset {
        ts_ns: e.ts_ns,
        time: clock.wall(e.ts_ns),
        netns: (e.flags & HAS_NETNS != 0).then_some(e.netns),
        owner: None,
        ifindex: (e.ifindex != 0).then_some(e.ifindex),
        trigger: Packet::parse(&e.headers, e.skb_len),
    }
}

closed_set! {
    /// What an RST does to the connection it reaches: an incident's `effect`.
    pub enum Effect {
        /// Its sequence number is exactly what the peer expects: the connection is reset.
        Reset = "reset",
        /// In the peer's window but not exact: the peer answers with a challenge ACK.
        ChallengeAck = "challenge_ack",
        /// Outside the peer's window: dropped, the connection survives.
        Ignored = "ignored",
        /// Not decidable without the window state (no conntrack BTF, or no ACK on the
        /// segment).
        Unknown = "unknown",
    }
}

string_schema!(Effect);

impl Effect {
    pub fn sentence(self) -> &'static str {
        match self {
            Effect::Reset => {
                "its sequence number is exactly what the sender expects: the connection is reset"
            }
            Effect::ChallengeAck => {
                "its sequence number is in the sender's window but not exact: the sender answers with a challenge ACK and the connection survives"
            }
            Effect::Ignored => {
                "its sequence number is outside the sender's window: it is dropped and the connection survives"
            }
            Effect::Unknown => {
                "it may reset the connection (its sequence number cannot be checked without the window state)"
            }
        }
    }
}

/// An address and port.
pub type Addr = (IpAddr, u16);

/// An INVALID packet and the RST that answered it.
#[derive(Clone, Debug)]
pub struct Incident {
    pub invalid: Record,
    pub reset: Reset,
    /// The conntrack entry the INVALID packet belonged to: from the event, or looked up in the
    /// namespace's table when the kernel gave none (no module BTF).
    pub ct: Option<Conntrack>,
}

impl Incident {
    /// What the RST does to the connection whose packet was INVALID. The kernel's RST for a
    /// segment with ACK carries seq = that segment's ack; the segment's sender accepts an RST
    /// only at exactly its rcv_nxt, which conntrack knows as the other side's `td_end`
    /// (RFC 5961: in window but not exact gets a challenge ACK, outside is dropped).
    pub fn effect(&self) -> Effect {
        let (Some(tcp), Some(w)) = (&self.invalid.pkt.tcp, &self.invalid.window) else {
            return Effect::Unknown;
        };
        if !tcp.flags.contains(b'A') {
            return Effect::Unknown;
        }
        let rst_seq = tcp.ack;
        let from_edge = rst_seq.wrapping_sub(w.receiver.end);
        if from_edge == 0 {
            Effect::Reset
        } else if from_edge < w.sender.maxwin.max(1) {
            Effect::ChallengeAck
        } else {
            Effect::Ignored
        }
    }

    /// (client, Service, backend) when the entry is DNAT'd.
    pub fn roles(&self) -> Option<(&Endpoints, Addr, Addr)> {
        let ct = self.ct.as_ref()?;
        let o = &ct.original;
        Some((o, (o.daddr, o.dport), (ct.reply.saddr, ct.reply.sport)))
    }
}

/// How long after an INVALID packet an RST for it still counts as its answer. The RST is sent
/// within one forwarding hop, microseconds later; a second leaves room for a loaded node.
const LINK_WINDOW_NS: u64 = 1_000_000_000;

/// Remembers recent INVALID TCP packets and links each RST to the one it answers: the RST's
/// trigger is the INVALID packet itself (same tuple, never NATed; same sequence and
/// acknowledgment numbers), in any namespace.
#[derive(Default)]
pub struct Correlator {
    /// The latest INVALID TCP packet of each tuple and seq/ack pair.
    latest: HashMap<Key, Rc<Record>>,
    /// Arrival order, for expiry: (time, key).
    order: VecDeque<(u64, Key)>,
}

/// The 4-tuple and the TCP sequence and acknowledgment numbers: in a burst on one flow only
/// these tell the segment an RST answers from its neighbours.
type Key = (IpAddr, u16, IpAddr, u16, u32, u32);

fn key(p: &Packet) -> Option<Key> {
    let (s, sp, d, dp) = p.tuple()?;
    let t = p.tcp.as_ref()?;
    Some((s, sp, d, dp, t.seq, t.ack))
}

/// At most this many INVALID packets are remembered: in a flood the oldest go first (an RST
/// follows its packet within microseconds).
const RECENT_MAX: usize = 16384;

impl Correlator {
    pub fn invalid(&mut self, r: &Rc<Record>) {
        let Some(key) = key(&r.pkt).filter(|_| r.verdict == Verdict::Invalid) else {
            return;
        };
        self.expire(r.ts_ns);
        if self.order.len() == RECENT_MAX {
            self.pop_oldest();
        }
        self.order.push_back((r.ts_ns, key));
        self.latest.insert(key, Rc::clone(r));
    }

    fn pop_oldest(&mut self) {
        if let Some((ts, key)) = self.order.pop_front()
            && self.latest.get(&key).is_some_and(|r| r.ts_ns == ts)
        {
            self.latest.remove(&key);
        }
    }

    fn expire(&mut self, now: u64) {
        while self
            .order
            .front()
            .is_some_and(|(ts, _)| now.saturating_sub(*ts) > LINK_WINDOW_NS)
        {
            self.pop_oldest();
        }
    }

    /// The incident this RST completes, if any; each INVALID packet links to one RST.
    pub fn reset(&mut self, rst: &Reset) -> Option<Incident> {
        self.expire(rst.ts_ns);
        let key = key(&rst.trigger)?;
        if self.latest.get(&key)?.ts_ns > rst.ts_ns {
            return None;
        }
        let invalid = Rc::unwrap_or_clone(self.latest.remove(&key)?);
        let ct = invalid.ct.clone().or_else(|| lookup_entry(&invalid));
        Some(Incident {
            invalid,
            reset: rst.clone(),
            ct,
        })
    }
}

/// Finds the entry whose reply tuple is this packet (a reply-direction packet that lost its
/// entry) or whose original tuple is, in the packet's namespace's `/proc/net/nf_conntrack`.
fn lookup_entry(r: &Record) -> Option<Conntrack> {
    let ns = r.netns?;
    let (s, sp, d, dp) = r.pkt.tuple()?;
    let table = crate::counters::read_in_netns(ns as u64, "nf_conntrack")?;
    table.lines().find_map(|line| {
        let ct = parse_proc_entry(line)?;
        let is = |e: &Endpoints| e.saddr == s && e.sport == sp && e.daddr == d && e.dport == dp;
        (is(&ct.reply) || is(&ct.original)).then_some(ct)
    })
}

/// One line of `/proc/net/nf_conntrack`:
/// `ipv4 2 tcp 6 431999 ESTABLISHED src=.. dst=.. sport=.. dport=.. src=.. dst=.. sport=.. dport=.. [ASSURED] ...`
pub fn parse_proc_entry(line: &str) -> Option<Conntrack> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let state = words
        .get(5)
        .filter(|w| !w.contains('='))
        .map(|w| crate::ct::TcpState::from_name(w));
    let vals =
        |key: &str| -> Vec<&str> { words.iter().filter_map(|w| w.strip_prefix(key)).collect() };
    let (src, dst, sport, dport) = (vals("src="), vals("dst="), vals("sport="), vals("dport="));
    let side = |i: usize| -> Option<Endpoints> {
        Some(Endpoints {
            saddr: src.get(i)?.parse().ok()?,
            sport: sport.get(i)?.parse().ok()?,
            daddr: dst.get(i)?.parse().ok()?,
            dport: dport.get(i)?.parse().ok()?,
        })
    };
    Some(Conntrack {
        state: state.flatten(),
        original: side(0)?,
        reply: side(1)?,
        reply_dir: true,
        status: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verdict::Tcp;

    fn pkt(s: &str, sp: u16, d: &str, dp: u16) -> Packet {
        Packet {
            family: Some(crate::verdict::Family::Ipv4),
            proto: Some(6),
            saddr: Some(s.parse().unwrap()),
            daddr: Some(d.parse().unwrap()),
            sport: Some(sp),
            dport: Some(dp),
            tcp: Some(Tcp {
                flags: "PA".into(),
                seq: 1,
                ack: 1,
                win: 1,
                len: 1,
                sack: None,
            }),
            ..Default::default()
        }
    }

    fn invalid(ts: u64, p: Packet) -> Record {
        Record::bare(Verdict::Invalid, ts, SystemTime::UNIX_EPOCH, p)
    }

    fn rst(ts: u64, p: Packet) -> Reset {
        Reset {
            ts_ns: ts,
            time: SystemTime::UNIX_EPOCH,
            netns: Some(2),
            owner: None,
            ifindex: None,
            trigger: p,
        }
    }

    #[test]
    fn links_reset_to_the_invalid_packet_it_answers_once() {
        let mut c = Correlator::default();
        c.invalid(&Rc::new(invalid(
            100,
            pkt("10.0.2.2", 8080, "10.0.1.2", 40000),
        )));
        // An RST for another flow does not link.
        assert!(
            c.reset(&rst(150, pkt("10.0.2.2", 8080, "10.0.1.2", 40001)))
                .is_none()
        );
        let i = c
            .reset(&rst(200, pkt("10.0.2.2", 8080, "10.0.1.2", 40000)))
            .expect("linked");
        assert_eq!(i.invalid.ts_ns, 100);
        // The same INVALID packet does not explain a second RST.
        assert!(
            c.reset(&rst(300, pkt("10.0.2.2", 8080, "10.0.1.2", 40000)))
                .is_none()
        );
    }

    /// Two INVALID segments of one flow, then the RST answering the first: the incident names
    /// the first (same seq/ack as the RST's trigger), not the latest on the tuple.
    #[test]
    fn a_burst_on_one_flow_links_the_segment_the_reset_answers() {
        let seg = |seq: u32, ack: u32| {
            let mut p = pkt("10.0.2.2", 8080, "10.0.1.2", 40000);
            let t = p.tcp.as_mut().unwrap();
            (t.seq, t.ack) = (seq, ack);
            p
        };
        let mut c = Correlator::default();
        c.invalid(&Rc::new(invalid(100, seg(5000, 77))));
        c.invalid(&Rc::new(invalid(110, seg(9000, 77))));
        let i = c.reset(&rst(200, seg(5000, 77))).expect("linked");
        assert_eq!(i.invalid.ts_ns, 100);
        assert!(
            c.reset(&rst(210, seg(1234, 77))).is_none(),
            "no segment had seq 1234"
        );
        let later = c
            .reset(&rst(220, seg(9000, 77)))
            .expect("the second links too");
        assert_eq!(later.invalid.ts_ns, 110);
    }

    #[test]
    fn effect_follows_rfc5961() {
        use crate::window;
        use conntrack_trace_common::window::TcpWindow;
        let w = |end, maxwin| TcpWindow {
            end,
            maxend: 0,
            maxwin,
            maxack: 0,
            scale: 0,
            flags: 0,
            _pad: [0; 2],
        };
        let mut inv = invalid(1, pkt("10.0.2.2", 8080, "10.0.1.2", 40000));
        let incident = |inv: &Record| Incident {
            invalid: inv.clone(),
            reset: rst(2, inv.pkt.clone()),
            ct: None,
        };
        assert_eq!(incident(&inv).effect(), Effect::Unknown, "no window state");
        inv.pkt.tcp.as_mut().unwrap().flags = "PA".into();
        for (ack, want) in [
            (5000, Effect::Reset),
            (5100, Effect::ChallengeAck),
            (5000 + (1 << 28), Effect::Ignored),
        ] {
            inv.pkt.tcp.as_mut().unwrap().ack = ack;
            let (seen, tcp) = ([w(1, 65535), w(5000, 65535)], inv.pkt.tcp.as_ref().unwrap());
            inv.window = window::explain(
                crate::reason::ReasonCode::AckOver,
                None,
                seen,
                false,
                window::Adjust::None,
                tcp,
            );
            assert_eq!(incident(&inv).effect(), want, "ack {ack}");
        }
    }

    #[test]
    fn old_invalid_packets_expire() {
        let mut c = Correlator::default();
        c.invalid(&Rc::new(invalid(
            0,
            pkt("10.0.2.2", 8080, "10.0.1.2", 40000),
        )));
        assert!(
            c.reset(&rst(
                LINK_WINDOW_NS + 1,
                pkt("10.0.2.2", 8080, "10.0.1.2", 40000)
            ))
            .is_none()
        );
    }

    #[test]
    fn proc_conntrack_line() {
        let ct = parse_proc_entry(
            "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.1.2 dst=10.96.0.10 sport=40000 dport=80 \
             src=10.0.2.2 dst=10.0.1.2 sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2",
        )
        .unwrap();
        assert_eq!(ct.state, Some(crate::ct::TcpState::Established));
        assert_eq!(ct.original.daddr.to_string(), "10.96.0.10");
        assert_eq!(
            (ct.reply.saddr.to_string(), ct.reply.sport),
            ("10.0.2.2".into(), 8080)
        );
        assert!(ct.dnat());
        assert!(parse_proc_entry("garbage").is_none());
    }
}

#[cfg(test)]
mod kernel_tests {
    use std::{net::TcpStream, time::Duration};

    use aya::{
        maps::RingBuf,
        programs::{KProbe, TracePoint},
    };
    use conntrack_trace_common::{filter::Filter, kind};

    use crate::{
        check, ebpf,
        plan::{Flavor, Plan, Program},
        verdict::Clock,
    };

    /// (major, minor) of a kernel release string such as "6.18.44-fc".
    fn release(r: &str) -> (u32, u32) {
        let mut n = r
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    }

    /// The socketless-RST probe the plan picks runs for real here: the `tcp:tcp_send_reset`
    /// tracepoint from 6.10 (this host), the kprobes on tcp_v{4,6}_send_reset before. A connect
    /// to a closed port is answered by the kernel with an RST that no socket sends; the event
    /// must carry that exact tuple.
    #[test]
    fn socketless_rst_is_traced_on_this_kernel() {
        let (plan, _) = Plan::for_running_kernel(crate::plan::Want::Exact).unwrap();
        let probes: Vec<_> = plan
            .attach
            .iter()
            .filter(|a| {
                matches!(
                    a.program,
                    Program::TcpSendResetTp | Program::TcpSendResetKprobe
                )
            })
            .collect();
        assert!(
            !probes.is_empty(),
            "no reset probe planned: {:?}",
            plan.notes
        );
        let release = release(&plan.release);
        let tracepoint = probes.iter().any(|a| a.flavor == Flavor::TracePoint);
        assert_eq!(
            tracepoint,
            release >= (6, 10),
            "the tracepoint sees socketless resets from 6.10 on (kernel {})",
            plan.release
        );
        if !tracepoint && !check::kprobes_available() {
            // Only a kernel before 6.10 that also lacks kprobes: nothing can see its resets,
            // which the plan test above has just checked is what the plan says.
            eprintln!("kernel before 6.10 without kprobes: no reset probe can attach here");
            return;
        }
        let mut bpf = ebpf::open(&plan, 1 << 16, &Filter::any()).unwrap();
        for a in &probes {
            let prog = bpf.program_mut(a.program.as_str()).unwrap();
            if a.flavor == Flavor::TracePoint {
                let tp: &mut TracePoint = prog.try_into().unwrap();
                tp.load().unwrap();
                tp.attach("tcp", "tcp_send_reset").unwrap();
            } else {
                let kp: &mut KProbe = prog.try_into().unwrap();
                if kp.fd().is_err() {
                    kp.load().unwrap();
                }
                kp.attach(&a.target, 0).unwrap();
            }
        }
        let mut ring = RingBuf::try_from(bpf.take_map("EVENTS").unwrap()).unwrap();

        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_secs(2),
        );
        assert!(err.is_err(), "connect to a closed port must be refused");

        let clock = Clock::now();
        let mut found = None;
        while let Some(item) = ring.next() {
            if u32::from_ne_bytes(item[..4].try_into().unwrap()) != kind::RESET {
                continue;
            }
            let r = super::decode(&super::parse(&item).unwrap(), &clock);
            if r.trigger.dport == Some(port) {
                found = Some(r);
            }
        }
        let r = found.expect("the RST for the refused connect was traced");
        let t = r.trigger.tcp.as_ref().unwrap();
        assert_eq!(t.flags, "S", "the answered packet is the SYN");
        assert_eq!(r.trigger.daddr, Some("127.0.0.1".parse().unwrap()));
        assert!(r.netns.is_some());
    }
}
