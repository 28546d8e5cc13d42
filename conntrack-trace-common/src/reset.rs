//! RSTs sent by a TCP stack on this machine for a packet that found no socket.

use crate::SNAP_LEN;

/// Where `skbaddr` / `skaddr` sit in the `tcp:tcp_send_reset` tracepoint record (6.10+), read
/// from its format file; written into the `RESET_TP` global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetTp {
    pub skb: u32,
    pub sk: u32,
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for ResetTp {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ResetEvent {
    /// Always `kind::RESET`.
    pub kind: u32,
    pub cpu: u32,
    pub ts_ns: u64,
    /// Namespace and interface of the packet being answered (`skb->dev`).
    pub netns: u32,
    pub ifindex: u32,
    pub skb_len: u32,
    pub flags: u32,
    /// The packet that triggered the RST, from its network header: the RST goes back to its
    /// source, from its destination.
    pub headers: [u8; SNAP_LEN],
}

/// `ResetEvent::flags`.
pub const HAS_NETNS: u32 = 1;

#[cfg(feature = "user")]
unsafe impl aya::Pod for ResetEvent {}
