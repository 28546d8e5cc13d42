//! The TCP window check (`tcp_in_window`, or the `nf_tcp_log_invalid` that logs its verdict).

/// `struct ip_ct_tcp_state`: one direction's view of the window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpWindow {
    /// Highest sequence number seen from this sender (`td_end`).
    pub end: u32,
    /// Highest `ack + window` seen from this sender: the upper bound the other side may send to.
    pub maxend: u32,
    /// Largest window this sender advertised.
    pub maxwin: u32,
    /// Highest ACK this sender sent.
    pub maxack: u32,
    pub scale: u8,
    /// IP_CT_TCP_FLAG_* (0x08 = BE_LIBERAL).
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// `enum nf_ct_tcp_action` (6.1+): what the window check decided.
pub mod action {
    pub const IGNORE: u8 = 0;
    pub const INVALID: u8 = 1;
    pub const ACCEPT: u8 = 2;
    /// Not known on this kernel (bool-returning tcp_in_window, or the struct-form log).
    pub const UNKNOWN: u8 = 0xff;
}

/// `enum nf_ct_tcp_invalid_log_type`, the fixed-args `nf_tcp_log_invalid` form.
pub mod log_type {
    pub const NONE: u8 = 0;
    pub const OVERSHOT: u8 = 1;
    pub const SEQ_OVER: u8 = 2;
    pub const ACK_OVER: u8 = 3;
    pub const SEQ_UNDER: u8 = 4;
    pub const ACK_UNDER: u8 = 5;
}
