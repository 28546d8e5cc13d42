//! A snapshot of the conntrack entry a packet was checked against.

use crate::window::TcpWindow;

/// `struct nf_conntrack_tuple`, copied raw. Its layout is fixed by the kernel's definition
/// (u3 / u / l3num, then u3 / u / protonum / dir) and checked against BTF at start-up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub src: [u8; 16],
    /// Source port (network order) or ICMP id.
    pub src_u: [u8; 2],
    pub l3num: u16,
    pub dst: [u8; 16],
    /// Destination port (network order) or ICMP type, code.
    pub dst_u: [u8; 2],
    pub protonum: u8,
    pub dir: u8,
}

pub const TUPLE_SIZE: usize = 40;

/// `CtSnapshot::flags` bits.
pub const CT_VALID: u8 = 1;
pub const CT_HAS_TCP: u8 = 2;
/// The entry has the seqadj extension (a NAT helper changed a payload's length):
/// `PacketEvent::seqadj` holds it.
pub const CT_HAS_SEQADJ: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtSnapshot {
    pub flags: u8,
    /// `enum tcp_conntrack` (ESTABLISHED = 3, ...).
    pub tcp_state: u8,
    /// Direction of the packet: 0 original, 1 reply.
    pub dir: u8,
    pub _pad: u8,
    /// `ct->status` (IPS_* bits).
    pub status: u32,
    /// Original and reply tuples: the reply's source is where DNAT really sent the flow.
    pub tuples: [Tuple; 2],
    /// `proto.tcp.seen[0]` (original direction's sender) and `seen[1]`.
    pub seen: [TcpWindow; 2],
}

/// `struct nf_ct_seqadj` of the entry's seqadj extension, for the direction opposite the
/// packet's (`seq[!dir]`): the one `tcp_in_window` takes the packet's ACK back through, as
/// `nf_ct_seq_offset(ct, !dir, ack - 1)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqAdj {
    /// Sequence number of the segment whose length the helper changed last.
    pub correction_pos: u32,
    /// The offset for sequence numbers up to `correction_pos`, and for those after it.
    pub offset_before: i32,
    pub offset_after: i32,
    pub _pad: u32,
}
