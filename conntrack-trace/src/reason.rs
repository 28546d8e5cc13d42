//! The kernel's reason for an INVALID/IGNORED packet: its text with numbers filled in, and a
//! stable snake_case code for scripts. The texts are the kernel's own, per version.

use std::{borrow::Cow, sync::LazyLock};

use conntrack_trace_common::{
    reason::{Reason, TEXT_LEN, source},
    window::log_type,
};
use memchr::memmem::Finder;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explained {
    pub text: String,
    pub code: &'static str,
    /// The numeric argument the kernel logged (the window bound for TCP window reasons).
    pub value: Option<u32>,
    /// The text is ours (struct-form table and digits): plain ASCII, no JSON escaping needed.
    /// Text copied from kernel memory is escaped.
    pub ours: bool,
}

/// The struct-form logger's texts (Debian 6.1.187+, 6.12), the same as the variadic form's,
/// and their codes: the kernel says which check failed, so no text matching is needed.
fn struct_text(t: u8) -> Option<(&'static str, &'static str)> {
    Some(match t {
        log_type::OVERSHOT => ("%u bytes more than expected", "overshot"),
        log_type::SEQ_OVER => (
            "SEQ is over upper bound %u (over the window of the receiver)",
            "seq_over",
        ),
        log_type::ACK_OVER => (
            "ACK is over upper bound %u (ACKed data not seen yet)",
            "ack_over",
        ),
        log_type::SEQ_UNDER => (
            "SEQ is under lower bound %u (already ACKed data retransmitted)",
            "seq_under",
        ),
        log_type::ACK_UNDER => (
            "ignored ACK under lower bound %u (possible overly delayed)",
            "ack_under",
        ),
        _ => return None,
    })
}

/// Text fragment (lowercase) -> code, checked in order. Covers 4.18 to 6.18 wording.
const CODES: &[(&str, &str)] = &[
    ("seq is over", "seq_over"),
    ("seq is under", "seq_under"),
    ("ack is over", "ack_over"),
    ("ack is under", "ack_under"),
    ("ack under lower bound", "ack_under"),
    ("bytes more than expected", "overshot"),
    ("invalid tcp flag", "bad_flags"),
    ("truncated", "truncated"),
    ("invalid rst", "invalid_rst"),
    ("invalid new", "invalid_new"),
    ("challenge-ack ignored", "challenge_ack"),
    (") ignored, state", "ignored_state"),
    ("invalid, state", "invalid_state"),
    ("invalid state", "invalid_state"),
    ("short packet", "short"),
    ("checksum", "bad_checksum"),
    ("invalid icmp type", "icmp_invalid_type"),
    ("invalid icmpv6 type", "icmp_invalid_type"),
];

/// CODES' fragments as precompiled searchers: building one per call cost more than searching.
static FINDERS: LazyLock<Vec<(Finder<'static>, &'static str)>> = LazyLock::new(|| {
    CODES
        .iter()
        .map(|&(frag, code)| (Finder::new(frag), code))
        .collect()
});

/// The code for a kernel text of at most TEXT_LEN bytes (the rest is not looked at).
fn code_for(text: &str, l4proto: u8) -> &'static str {
    // Lowercased once, on the stack.
    let mut buf = [0u8; TEXT_LEN];
    let n = text.len().min(TEXT_LEN);
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    buf[..n].make_ascii_lowercase();
    let Some(&(_, code)) = FINDERS.iter().find(|(f, _)| f.find(&buf[..n]).is_some()) else {
        return "unknown";
    };
    match (l4proto, code) {
        (17 | 136, "short") => "udp_short",
        (17 | 136, "truncated") => "udp_truncated",
        (17 | 136, "bad_checksum") => "udp_bad_checksum",
        (1 | 58, "short") => "icmp_short",
        (1 | 58, "bad_checksum") => "icmp_bad_checksum",
        (_, "short") => "truncated",
        (_, c) => c,
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
        assert_eq!((e.code, e.value), ("seq_over", Some(2839577113)));
    }

    #[test]
    fn struct_form_uses_kernel_wording() {
        for (t, code) in [
            (log_type::SEQ_OVER, "seq_over"),
            (log_type::SEQ_UNDER, "seq_under"),
            (log_type::ACK_OVER, "ack_over"),
            (log_type::ACK_UNDER, "ack_under"),
            (log_type::OVERSHOT, "overshot"),
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
        assert_eq!(e.code, "seq_under");
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
        assert_eq!(e.code, "invalid_state");
        let udp = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 17,
            fmt: text("short packet"),
            ..Default::default()
        };
        assert_eq!(explain(&udp, None).unwrap().code, "udp_short");
        let csum = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("bad checksum"),
            ..Default::default()
        };
        assert_eq!(explain(&csum, None).unwrap().code, "bad_checksum");
        let flags = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("invalid tcp flag combination"),
            ..Default::default()
        };
        assert_eq!(explain(&flags, None).unwrap().code, "bad_flags");
        let odd = Reason {
            source: source::L4PROTO_LOG,
            l4proto: 6,
            fmt: text("something new in 7.3"),
            ..Default::default()
        };
        assert_eq!(explain(&odd, None).unwrap().code, "unknown");
        assert!(explain(&Reason::default(), None).is_none());
    }
}
