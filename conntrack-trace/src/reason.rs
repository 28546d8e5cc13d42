//! The kernel's reason for an INVALID/IGNORED packet: its text with numbers filled in, and a
//! stable snake_case code for scripts. The texts are the kernel's own, per version.

use std::{borrow::Cow, sync::LazyLock};

use conntrack_trace_common::{
    closed_set,
    reason::{Reason, TEXT_LEN, source},
    string_schema,
    window::log_type,
};
use memchr::memmem::Finder;

closed_set! {
    /// Why a packet was reported: the kernel's reason where it logged one, else what the
    /// drop path or the headers say. JSON `reason_code`, the metrics' `reason_code` label.
    pub enum ReasonCode {
        /// TCP: the sequence number is past the receiver's window.
        SeqOver = "seq_over",
        /// TCP: the segment ends before the window's lower edge (data already acknowledged).
        SeqUnder = "seq_under",
        /// TCP: acknowledges data the other side has not sent.
        AckOver = "ack_over",
        /// TCP: acknowledges data older than the window of acceptable ACKs.
        AckUnder = "ack_under",
        /// TCP: the segment ends past the receiver's window end.
        Overshot = "overshot",
        /// TCP: an invalid flag combination.
        BadFlags = "bad_flags",
        /// TCP: bad checksum.
        BadChecksum = "bad_checksum",
        /// TCP: header truncated or too short.
        Truncated = "truncated",
        /// TCP: not valid in the connection's state.
        InvalidState = "invalid_state",
        /// TCP: ignored in the connection's state (the entry is kept).
        IgnoredState = "ignored_state",
        /// TCP: an RST outside the window.
        InvalidRst = "invalid_rst",
        /// TCP: a packet that cannot open a connection, with no entry.
        InvalidNew = "invalid_new",
        /// TCP: a challenge ACK the kernel ignored.
        ChallengeAck = "challenge_ack",
        /// UDP: shorter than its header.
        UdpShort = "udp_short",
        /// UDP: truncated (the length field says more than there is).
        UdpTruncated = "udp_truncated",
        /// UDP: bad checksum.
        UdpBadChecksum = "udp_bad_checksum",
        /// ICMP: shorter than its header.
        IcmpShort = "icmp_short",
        /// ICMP: bad checksum.
        IcmpBadChecksum = "icmp_bad_checksum",
        /// ICMP: a type conntrack does not accept.
        IcmpInvalidType = "icmp_invalid_type",
        /// An ICMP error quoting no tracked connection: INVALID to `--ctstate`, counted by
        /// the kernel in `icmp_error`, not `invalid`; seen only with a verdict probe.
        IcmpErrorNoFlow = "icmp_error_no_flow",
        /// No reason logged and nothing else explains it.
        Unknown = "unknown",
        /// Dropped: the table is full and nothing could be evicted.
        TableFull = "table_full",
        /// Dropped: the entry could not be inserted at confirm (a clash not resolved).
        InsertFailed = "insert_failed",
        /// Dropped by `nf_conntrack_in` for another cause.
        ConntrackDrop = "conntrack_drop",
    }
}

string_schema!(ReasonCode);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explained {
    pub text: String,
    pub code: ReasonCode,
    /// The numeric argument the kernel logged (the window bound for TCP window reasons).
    pub value: Option<u32>,
    /// The text is ours (struct-form table and digits): plain ASCII, no JSON escaping needed.
    /// Text copied from kernel memory is escaped.
    pub ours: bool,
}

/// The struct-form logger's texts (Debian 6.1.187+, 6.12), the same as the variadic form's,
/// and their codes: the kernel says which check failed, so no text matching is needed.
fn struct_text(t: u8) -> Option<(&'static str, ReasonCode)> {
    Some(match t {
        log_type::OVERSHOT => ("%u bytes more than expected", ReasonCode::Overshot),
        log_type::SEQ_OVER => (
            "SEQ is over upper bound %u (over the window of the receiver)",
            ReasonCode::SeqOver,
        ),
        log_type::ACK_OVER => (
            "ACK is over upper bound %u (ACKed data not seen yet)",
            ReasonCode::AckOver,
        ),
        log_type::SEQ_UNDER => (
            "SEQ is under lower bound %u (already ACKed data retransmitted)",
            ReasonCode::SeqUnder,
        ),
        log_type::ACK_UNDER => (
            "ignored ACK under lower bound %u (possible overly delayed)",
            ReasonCode::AckUnder,
        ),
        _ => return None,
    })
}

/// What a fragment of the kernel's text says: a code, or a short packet, whose code depends
/// on the protocol.
#[derive(Clone, Copy)]
enum Found {
    Code(ReasonCode),
    Short,
}

/// Text fragment (lowercase) -> code, checked in order. Covers 4.18 to 6.18 wording.
const CODES: &[(&str, Found)] = {
    use Found::{Code, Short};
    use ReasonCode::*;
    &[
        ("seq is over", Code(SeqOver)),
        ("seq is under", Code(SeqUnder)),
        ("ack is over", Code(AckOver)),
        ("ack is under", Code(AckUnder)),
        ("ack under lower bound", Code(AckUnder)),
        ("bytes more than expected", Code(Overshot)),
        ("invalid tcp flag", Code(BadFlags)),
        ("truncated", Code(Truncated)),
        ("invalid rst", Code(InvalidRst)),
        ("invalid new", Code(InvalidNew)),
        ("challenge-ack ignored", Code(ChallengeAck)),
        (") ignored, state", Code(IgnoredState)),
        ("invalid, state", Code(InvalidState)),
        ("invalid state", Code(InvalidState)),
        ("short packet", Short),
        ("checksum", Code(BadChecksum)),
        ("invalid icmp type", Code(IcmpInvalidType)),
        ("invalid icmpv6 type", Code(IcmpInvalidType)),
    ]
};

/// CODES' fragments as precompiled searchers: building one per call cost more than searching.
static FINDERS: LazyLock<Vec<(Finder<'static>, Found)>> = LazyLock::new(|| {
    CODES
        .iter()
        .map(|&(frag, found)| (Finder::new(frag), found))
        .collect()
});

/// The code for a kernel text of at most TEXT_LEN bytes (the rest is not looked at).
fn code_for(text: &str, l4proto: u8) -> ReasonCode {
    use ReasonCode::*;
    // Lowercased once, on the stack.
    let mut buf = [0u8; TEXT_LEN];
    let n = text.len().min(TEXT_LEN);
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    buf[..n].make_ascii_lowercase();
    let Some(&(_, found)) = FINDERS.iter().find(|(f, _)| f.find(&buf[..n]).is_some()) else {
        return Unknown;
    };
    match (l4proto, found) {
        (17 | 136, Found::Short) => UdpShort,
        (17 | 136, Found::Code(Truncated)) => UdpTruncated,
        (17 | 136, Found::Code(BadChecksum)) => UdpBadChecksum,
        (1 | 58, Found::Short) => IcmpShort,
        (1 | 58, Found::Code(BadChecksum)) => IcmpBadChecksum,
        (_, Found::Short) => Truncated,
        (_, Found::Code(c)) => c,
    }
}

fn c_str(b: &[u8]) -> Cow<'_, str> {
    let b = &b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())];
    // from_utf8 first: it has an ASCII fast path that from_utf8_lossy lacks.
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => String::from_utf8_lossy(b),
    }
}

/// Fills a printk format with the logged arguments. `%s` other than a leading one is the TCP
/// state name (the only one the conntrack loggers pass), taken from the ct snapshot.
fn render(fmt: &str, args: &[u64], state: Option<&str>) -> String {
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut args = args.iter();
    // Copy the text between conversions whole: formats are mostly text.
    let mut parts = fmt.split('%');
    out.push_str(parts.next().unwrap_or_default());
    let mut escaped = false;
    for part in parts {
        if escaped {
            // The part after "%%": plain text.
            escaped = false;
            out.push_str(part);
            continue;
        }
        let mut chars = part.chars();
        match chars.next() {
            // "%%" splits into an empty part; the next part is text.
            None => {
                out.push('%');
                escaped = true;
                continue;
            }
            Some('u') => {
                if let Some(&a) = args.next() {
                    out.push_str(itoa::Buffer::new().format(a as u32));
                }
            }
            Some('d' | 'i') => {
                if let Some(&a) = args.next() {
                    out.push_str(itoa::Buffer::new().format(a as u32 as i32));
                }
            }
            Some('s') => {
                args.next();
                out.push_str(state.unwrap_or("?"));
            }
            Some(other) => {
                args.next();
                out.push('%');
                out.push(other);
            }
        }
        out.push_str(chars.as_str());
    }
    out
}

pub fn explain(r: &Reason, tcp_state: Option<&str>) -> Option<Explained> {
    match r.source {
        source::TCP_LOG_VARIADIC | source::TCP_LOG_STRUCT => {
            let ours = r.source == source::TCP_LOG_STRUCT;
            let (fmt, code) = if ours {
                let (fmt, code) = struct_text(r.log_type)?;
                (Cow::Borrowed(fmt), code)
            } else {
                let fmt = c_str(&r.fmt);
                let code = code_for(&fmt, 6);
                (fmt, code)
            };
            Some(Explained {
                code,
                text: render(&fmt, &r.args, tcp_state),
                value: Some(r.args[0] as u32),
                ours,
            })
        }
        source::L4PROTO_LOG => {
            let fmt = c_str(&r.fmt);
            // The code comes from the kernel's own words: the "%s" argument before 6.1, the
            // format otherwise (at most TEXT_LEN bytes either way).
            let (text, code) = if fmt.starts_with("%s") {
                let arg = c_str(&r.arg);
                let code = code_for(&arg, r.l4proto);
                (arg.into_owned(), code)
            } else {
                (render(&fmt, &r.args, tcp_state), code_for(&fmt, r.l4proto))
            };
            let value = fmt.contains("%u").then_some(r.args[0] as u32);
            Some(Explained {
                code,
                text,
                value,
                ours: false,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> [u8; TEXT_LEN] {
        let mut b = [0; TEXT_LEN];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn variadic_tcp_fills_the_bound() {
        let r = Reason {
            source: source::TCP_LOG_VARIADIC,
            action: 1,
            fmt: text("SEQ is over upper bound %u (over the window of the receiver)"),
            args: [2839577113, 0, 0],
            ..Default::default()
        };
        let e = explain(&r, Some("ESTABLISHED")).unwrap();
        assert_eq!(
            e.text,
            "SEQ is over upper bound 2839577113 (over the window of the receiver)"
        );
        assert_eq!((e.code, e.value), (ReasonCode::SeqOver, Some(2839577113)));
    }

    #[test]
    fn struct_form_uses_kernel_wording() {
        for (t, code) in [
            (log_type::SEQ_OVER, ReasonCode::SeqOver),
            (log_type::SEQ_UNDER, ReasonCode::SeqUnder),
            (log_type::ACK_OVER, ReasonCode::AckOver),
            (log_type::ACK_UNDER, ReasonCode::AckUnder),
            (log_type::OVERSHOT, ReasonCode::Overshot),
        ] {
            let r = Reason {
                source: source::TCP_LOG_STRUCT,
                log_type: t,
                args: [7, 0, 0],
                ..Default::default()
            };
            let e = explain(&r, None).unwrap();
            assert_eq!(e.code, code, "{}", e.text);
            assert!(e.text.contains('7'), "{}", e.text);
        }
        let bad = Reason {
            source: source::TCP_LOG_STRUCT,
            log_type: 9,
            ..Default::default()
        };
        assert!(explain(&bad, None).is_none());
    }

    #[test]
    fn pre_6_1_reason_is_the_string_argument() {
        let r = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("%s"),
            arg: text("SEQ is under the lower bound (already ACKed data retransmitted)"),
            ..Default::default()
        };
        let e = explain(&r, None).unwrap();
        assert_eq!(e.code, ReasonCode::SeqUnder);
        assert_eq!(e.value, None);
    }

    #[test]
    fn state_and_protocol_specific_codes() {
        let state = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("packet (index %d) in dir %d invalid, state %s"),
            args: [4, 1, 0xffff_ffff_8100_0000],
            ..Default::default()
        };
        let e = explain(&state, Some("SYN_SENT")).unwrap();
        assert_eq!(e.text, "packet (index 4) in dir 1 invalid, state SYN_SENT");
        assert_eq!(e.code, ReasonCode::InvalidState);
        let udp = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 17,
            fmt: text("short packet"),
            ..Default::default()
        };
        assert_eq!(explain(&udp, None).unwrap().code, ReasonCode::UdpShort);
        let csum = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("bad checksum"),
            ..Default::default()
        };
        assert_eq!(explain(&csum, None).unwrap().code, ReasonCode::BadChecksum);
        let flags = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("invalid tcp flag combination"),
            ..Default::default()
        };
        assert_eq!(explain(&flags, None).unwrap().code, ReasonCode::BadFlags);
        let odd = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("something new in 7.3"),
            ..Default::default()
        };
        assert_eq!(explain(&odd, None).unwrap().code, ReasonCode::Unknown);
        assert!(explain(&Reason::default(), None).is_none());
    }
}
