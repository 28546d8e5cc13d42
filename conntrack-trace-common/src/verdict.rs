//! What `nf_conntrack_in` decided about a packet: the one event per packet the tracer emits.

use crate::{
    SNAP_LEN,
    ct::{CtSnapshot, SeqAdj},
    reason::Reason,
};

/// `PacketEvent::verdict`.
#[allow(clippy::module_inception)] // verdict::verdict::INVALID reads as what it is.
pub mod verdict {
    /// Returned NF_ACCEPT with no conntrack entry: INVALID (not NATed, `invalid` counter).
    pub const INVALID: u8 = 1;
    /// A reason was logged but the packet kept its entry (6.1+ TCP IGNORE and friends).
    pub const IGNORED: u8 = 2;
    /// `nf_conntrack_in` returned NF_DROP, or the entry could not be inserted at confirm.
    pub const DROP: u8 = 3;
    /// Cold mode: a reason was logged, the verdict was not observed (userspace infers it).
    pub const LOGGED: u8 = 4;
}

/// `PacketEvent::flags` bits: which optional parts were filled in.
pub const HAS_REASON: u8 = 1;
pub const HAS_NETNS: u8 = 2;
pub const HAS_IFINDEX: u8 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PacketEvent {
    /// Always `kind::PACKET`.
    pub kind: u32,
    pub verdict: u8,
    /// `state->pf`: NFPROTO_IPV4 (2) or NFPROTO_IPV6 (10).
    pub pf: u8,
    /// `state->hook`: NF_INET_PRE_ROUTING (0) ... NF_INET_POST_ROUTING (4).
    pub hook: u8,
    pub flags: u8,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
    pub netns: u32,
    pub ifindex_in: u32,
    pub ifindex_out: u32,
    pub cpu: u32,
    /// Packet length from the network header: how much of `headers` is real.
    pub skb_len: u32,
    /// `drops::reason` for DROP verdicts.
    pub drop_reason: u8,
    /// How many bytes of `headers` lie in the skb's linear area; the rest (in page
    /// fragments) were not read. 0 in recordings made before it was recorded: all of them.
    pub linear: u8,
    pub _pad: [u8; 2],
    /// The packet from its network header on (`skb->head + skb->network_header`).
    pub headers: [u8; SNAP_LEN],
    pub ct: CtSnapshot,
    pub reason: Reason,
    /// Part of the entry's snapshot, valid with `ct::CT_HAS_SEQADJ`. Last, so a recording
    /// made before it existed reads as this event with it zeroed (`record` pads them).
    pub seqadj: SeqAdj,
}

impl PacketEvent {
    /// How many bytes of `headers` are the packet's: those from the linear area (all of
    /// them in a recording from before `linear` was recorded).
    pub fn real_headers(&self) -> usize {
        match self.linear {
            0 => SNAP_LEN,
            n => (n as usize).min(SNAP_LEN),
        }
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketEvent {}

/// What the kernel side counts a `PacketEvent` the ring buffer could not take under (the
/// `LOST_BY` per-CPU hash map): what its `event` and `reason_code` are decided from in
/// userspace (the codes come from the kernel's texts there), without the packet and the
/// numbers, so a flood of one kind of packet is one key. Text past the NUL is zeroed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LostKey {
    pub verdict: u8,
    pub drop_reason: u8,
    /// `HAS_REASON` when `reason` is filled in (its `args` are always 0).
    pub flags: u8,
    /// For a packet without a reason: its IPPROTO and, for ICMP/ICMPv6, its type (an ICMP
    /// error quoting no flow has a code of its own).
    pub proto: u8,
    pub icmp_type: u8,
    pub _pad: [u8; 3],
    pub reason: Reason,
}

/// Kinds of lost packet events counted one by one: far more than the kernel has reasons
/// (a few dozen texts); a loss of a kind past these counts only in `stat::LOST`.
pub const LOST_BY_MAX: u32 = 256;

#[cfg(feature = "user")]
unsafe impl aya::Pod for LostKey {}
