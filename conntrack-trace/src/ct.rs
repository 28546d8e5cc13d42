//! The conntrack entry a packet was checked against, decoded from `CtSnapshot`.

use std::net::IpAddr;

use conntrack_trace_common::{
    closed_set,
    ct::{CT_HAS_TCP, CT_VALID, CtSnapshot, Tuple},
    string_schema,
};

use crate::verdict::addr;

/// `IPS_CONFIRMED`: the entry is in the table (not one being created for this packet).
const IPS_CONFIRMED: u32 = 1 << 3;
/// `IPS_SEQ_ADJUST`: a NAT helper changed a payload's length, so the entry has a seqadj
/// extension with a non-zero offset.
const IPS_SEQ_ADJUST: u32 = 1 << 6;

closed_set! {
    /// `enum tcp_conntrack`, in kernel order: a TCP entry's state, JSON `ct.state`.
    #[repr(u8)]
    pub enum TcpState {
        None = "NONE",
        SynSent = "SYN_SENT",
        SynRecv = "SYN_RECV",
        Established = "ESTABLISHED",
        FinWait = "FIN_WAIT",
        CloseWait = "CLOSE_WAIT",
        LastAck = "LAST_ACK",
        TimeWait = "TIME_WAIT",
        Close = "CLOSE",
        SynSent2 = "SYN_SENT2",
        Max = "MAX",
        Ignore = "IGNORE",
        Retrans = "RETRANS",
        Unack = "UNACK",
    }
}

string_schema!(TcpState);

impl TcpState {
    /// From the state word of `/proc/net/nf_conntrack`.
    pub fn from_name(word: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| s.as_str() == word)
    }

    /// From the kernel's number (None past the enum: a kernel newer than this table).
    pub fn from_kernel(state: u8) -> Option<Self> {
        Self::ALL.get(state as usize).copied()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub saddr: IpAddr,
    pub sport: u16,
    pub daddr: IpAddr,
    pub dport: u16,
}

impl Endpoints {
    fn from_tuple(t: &Tuple) -> Option<Self> {
        let family = match t.l3num {
            2 => 4,
            10 => 6,
            _ => return None,
        };
        // Ports are only ports for port-carrying protocols; for ICMP they are id / type+code.
        let ports = matches!(t.protonum, 6 | 17 | 33 | 132 | 136);
        let port = |b: [u8; 2]| if ports { u16::from_be_bytes(b) } else { 0 };
        Some(Self {
            saddr: addr(family, &t.src),
            sport: port(t.src_u),
            daddr: addr(family, &t.dst),
            dport: port(t.dst_u),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conntrack {
    /// The TCP state, for TCP entries.
    pub state: Option<TcpState>,
    pub original: Endpoints,
    pub reply: Endpoints,
    /// The packet's direction: false = original, true = reply.
    pub reply_dir: bool,
    pub status: u32,
}

impl Conntrack {
    pub fn decode(s: &CtSnapshot) -> Option<Self> {
        // An unconfirmed entry is the one conntrack was creating for this very packet and
        // threw away with it: it names nothing but the packet itself.
        if s.flags & CT_VALID == 0 || s.status & IPS_CONFIRMED == 0 {
            return None;
        }
        Some(Self {
            state: (s.flags & CT_HAS_TCP != 0)
                .then(|| TcpState::from_kernel(s.tcp_state))
                .flatten(),
            original: Endpoints::from_tuple(&s.tuples[0])?,
            reply: Endpoints::from_tuple(&s.tuples[1])?,
            reply_dir: s.dir != 0,
            status: s.status,
        })
    }

    /// Whether a NAT helper shifted the entry's sequence numbers.
    pub fn seq_adjusted(&self) -> bool {
        self.status & IPS_SEQ_ADJUST != 0
    }

    /// Whether the entry is DNAT'd: the reply does not come from where the original went.
    pub fn dnat(&self) -> bool {
        self.original.daddr != self.reply.saddr || self.original.dport != self.reply.sport
    }
}
