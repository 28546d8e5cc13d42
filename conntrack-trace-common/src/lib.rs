//! The event ABI shared by the kernel programs and the userspace CLI.
//!
//! Everything here is `#[repr(C)]` plain data: the kernel side fills it, the ring buffer
//! carries it byte for byte, userspace reads it back. Kernel struct layouts are NOT part of
//! this ABI; they vary per build and arrive as [`offsets::Offsets`] computed from BTF.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

#[macro_use]
mod closed_set;
#[cfg(feature = "user")]
#[doc(hidden)]
pub mod __private {
    pub use schemars;
    pub use serde;
    pub use serde_json;
}

pub mod ct;
pub mod drops;
pub mod filter;
pub mod offsets;
pub mod reason;
pub mod reset;
pub mod verdict;
pub mod window;

/// Bytes of the packet, from its network header on, copied into each event.
pub const SNAP_LEN: usize = 128;

/// `nf_conntrack_in` calls tracked per CPU at once: more than can nest (a locally sent
/// packet's call interrupted by a softirq's), so a full stack means some lost their return.
pub const MAX_NEST: usize = 4;

closed_set! {
    /// How the verdict of `nf_conntrack_in` is observed: the attach plan's choice, and the
    /// eBPF side's `MODE` global (`Mode::X as u8`).
    #[repr(u8)]
    pub enum Mode {
        /// kprobe + kretprobe on `nf_conntrack_in`: every verdict, including INVALIDs the
        /// kernel does not log; costs a kprobe pair on every packet.
        KprobePair = "kprobe_pair",
        /// fexit on `nf_conntrack_in`: every verdict, one cheap probe per packet.
        Fexit = "fexit",
        /// No per-packet probe: events come from the invalid-packet loggers alone and the
        /// verdict is inferred from what was logged. Misses INVALIDs the kernel does not log.
        Cold = "cold",
    }
}

#[cfg(feature = "user")]
string_schema!(Mode);

/// Every ring-buffer record starts with a `u32` saying what follows.
pub mod kind {
    /// `verdict::PacketEvent`: an INVALID, IGNORED or dropped packet.
    pub const PACKET: u32 = 1;
    /// `reset::ResetEvent`: a TCP stack answered a packet that had no socket with an RST.
    pub const RESET: u32 = 2;
}

/// Slots of the per-CPU `STATS` array the kernel side counts into.
pub mod stat {
    /// `bpf_ringbuf_output` failed: the event is lost, userspace reports it.
    pub const LOST: u32 = 0;
    /// `nf_conntrack_in` calls whose verdict the kprobe pair did not see: an entry whose
    /// return never came, or a return whose entry was not seen on that CPU.
    pub const UNPAIRED: u32 = 1;
    /// A reason was logged for a packet whose `nf_conntrack_in` call we were not tracking.
    pub const ORPHAN_REASON: u32 = 2;
    pub const COUNT: u32 = 3;
}
