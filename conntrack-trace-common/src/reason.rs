//! Why conntrack rejected or ignored a packet: what the kernel's invalid-packet log
//! functions were called with. Filled by the `window` and `reason` hooks.

pub const TEXT_LEN: usize = 80;
/// How many varargs are kept ("packet (index %d) in dir %d invalid, state %s" has three).
pub const ARGS: usize = 3;

/// Where the format string sits in the variadic log functions' arguments, read from their BTF
/// prototypes (it moved one register later in 5.14). Written into the `LOG_ARGS` global.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogArgs {
    /// `nf_ct_l4proto_log_invalid`: index of `fmt` (ct is always argument 1).
    pub ct_log_fmt: u8,
    /// `nf_l4proto_log_invalid`: index of `fmt` (the protocol number is the one before it).
    pub l4_log_fmt: u8,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for LogArgs {}

/// Which kernel function the reason came from, so userspace knows how to read the fields.
pub mod source {
    pub const NONE: u8 = 0;
    /// `nf_tcp_log_invalid(skb, ct, state, sender, ret, fmt, ...)`: `fmt`, `value` = the `%u`.
    pub const TCP_LOG_VARIADIC: u8 = 1;
    /// `nf_tcp_log_invalid(skb, ct, state, log)`: `log_type`, `value`.
    pub const TCP_LOG_STRUCT: u8 = 2;
    /// `nf_ct_l4proto_log_invalid` / `nf_l4proto_log_invalid`: `fmt`, and `arg` when fmt is "%s".
    pub const L4PROTO_LOG: u8 = 3;
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Reason {
    pub source: u8,
    /// `enum nf_ct_tcp_action` for the variadic TCP form, else `window::action::UNKNOWN`.
    pub action: u8,
    /// `window::log_type` for the struct TCP form.
    pub log_type: u8,
    /// IPPROTO_* the log call named (L4PROTO_LOG), else 0.
    pub l4proto: u8,
    pub _pad: u32,
    /// The first varargs as raw registers/stack slots. TCP forms: `args[0]` is the bound.
    pub args: [u64; ARGS],
    /// The format string, NUL-terminated.
    pub fmt: [u8; TEXT_LEN],
    /// The string `args[0]` points to when `fmt` starts with "%s" (older kernels pass the
    /// whole reason this way).
    pub arg: [u8; TEXT_LEN],
}

impl Reason {
    /// The 6.1+ TCP window logger says the packet keeps its entry (IGNORE), by its action
    /// argument (variadic form) or its log type (struct form). Shared by the kernel programs,
    /// which then expect no verdict for the packet, and the decoder, which infers it.
    #[inline(always)]
    pub fn window_ignored(&self) -> bool {
        use crate::window::{action, log_type};
        match self.source {
            source::TCP_LOG_VARIADIC => self.action == action::IGNORE,
            source::TCP_LOG_STRUCT => matches!(
                self.log_type,
                log_type::SEQ_UNDER | log_type::ACK_UNDER | log_type::OVERSHOT
            ),
            _ => false,
        }
    }
}

impl Default for Reason {
    fn default() -> Self {
        Self {
            source: source::NONE,
            action: crate::window::action::UNKNOWN,
            log_type: 0,
            l4proto: 0,
            _pad: 0,
            args: [0; ARGS],
            fmt: [0; TEXT_LEN],
            arg: [0; TEXT_LEN],
        }
    }
}
