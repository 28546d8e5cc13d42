//! The TCP window math: which bound a segment failed and by how much, from both directions'
//! window state as conntrack saw it. Formulas are `tcp_in_window`'s (unchanged since 4.x
//! apart from 6.1 turning some failures into IGNORE).

use std::fmt;

use conntrack_trace_common::window::TcpWindow;

use crate::{reason::ReasonCode, verdict::Tcp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    SeqOver,
    AckOver,
    SeqUnder,
    AckUnder,
    Overshot,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explained {
    /// The packet's sender's window state (`seen[dir]`) and the receiver's (`seen[!dir]`).
    pub sender: TcpWindow,
    pub receiver: TcpWindow,
    /// The bound the check compared against: the kernel's own `%u` when it logged one,
    /// otherwise recomputed from the window state.
    pub bound: Option<u32>,
    /// How far past the bound the packet was, in bytes (at least 1 when the check failed).
    pub excess: Option<u32>,
    check: Check,
    /// The packet's number the check was about (seq, ack or segment end), and its window.
    value: u32,
    /// For the ACK checks, the header's ACK when a SACK block moved the number compared.
    header_ack: Option<u32>,
    win: u16,
    syn: bool,
}

/// Appends text and numbers in order: literals as constant bytes, numbers through itoa.
macro_rules! put {
    (@one $out:expr, $l:literal) => {
        $out.extend_from_slice($l.as_bytes())
    };
    (@one $out:expr, $n:expr) => {
        $out.extend_from_slice(itoa::Buffer::new().format($n).as_bytes())
    };
    ($out:expr; $($x:tt)*) => {{
        $( put!(@one $out, $x); )*
    }};
}

impl Explained {
    /// Appends the sentence with the numbers (ASCII, nothing to escape in JSON). Rendered
    /// only when printed, with itoa rather than `fmt`: it goes out with every window event
    /// and was the largest part of the cost.
    pub fn write_into(&self, out: &mut Vec<u8>) {
        let (bound, excess, v) = (
            self.bound.unwrap_or(0),
            self.excess.unwrap_or(0),
            self.value,
        );
        let (above, below) = (bound.wrapping_sub(1), bound.wrapping_add(1));
        let (end, maxwin, maxend) = (self.sender.end, self.receiver.maxwin, self.sender.maxend);
        match self.check {
            Check::SeqOver => put!(out; "seq " v " is " excess
                " bytes past the receiver's window end " above " (td_maxend of the sender)"),
            Check::AckOver => {
                self.write_ack(out);
                put!(out; " is " excess
                    " bytes past the highest sequence the other side sent (" above ")")
            }
            Check::SeqUnder => put!(out; "segment ends at " v ", " excess
                " bytes below the lower edge " below " of the window (sender end " end
                " - receiver max window " maxwin "): data already acknowledged"),
            Check::AckUnder => {
                self.write_ack(out);
                put!(out; " is " excess " bytes below the oldest acceptable ACK " below)
            }
            Check::Overshot => put!(out; "segment ends at " v ", " excess
                " bytes past the receiver's window end " maxend),
        }
        let scale = self.sender.scale;
        // The kernel scales every window but a SYN's.
        if scale > 0 && !self.syn {
            let (win, scaled) = (self.win, (self.win as u64) << scale.min(14));
            put!(out; "; advertised window " win " << scale " scale " = " scaled);
        }
    }
}

impl Explained {
    /// The number the ACK checks compared: the header's ACK, or the SACK edge that replaced it.
    fn write_ack(&self, out: &mut Vec<u8>) {
        let v = self.value;
        match self.header_ack {
            Some(ack) => put!(out; "SACK right edge " v " (extending ack " ack ")"),
            None => put!(out; "ack " v),
        }
    }
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = Vec::with_capacity(192);
        self.write_into(&mut s);
        f.write_str(&String::from_utf8_lossy(&s))
    }
}

/// `MAXACKWINDOW(sender)`: how far below `td_end` an ACK may be before it is "too old".
fn max_ack_window(sender: &TcpWindow) -> u32 {
    sender.maxwin.max(66000)
}

/// `seg_end`: the sequence number after the segment (SYN and FIN count as one byte).
fn seg_end(t: &Tcp) -> u32 {
    t.seq
        .wrapping_add(t.len)
        .wrapping_add(u32::from(t.flags.contains(b'S')))
        .wrapping_add(u32::from(t.flags.contains(b'F')))
}

/// `IP_CT_TCP_FLAG_SACK_PERM`: the receiver agreed to SACK, so the kernel reads SACK blocks.
const SACK_PERM: u8 = 0x02;

pub fn explain(
    code: ReasonCode,
    kernel_bound: Option<u32>,
    seen: [TcpWindow; 2],
    reply_dir: bool,
    tcp: &Tcp,
) -> Option<Explained> {
    let (sender, receiver) = if reply_dir {
        (seen[1], seen[0])
    } else {
        (seen[0], seen[1])
    };
    let end = seg_end(tcp);
    // `tcp_in_window` checks ACK bounds on `sack`: the ACK moved up to the highest SACK
    // right edge, when the receiver permitted SACK.
    let sack = tcp
        .sack
        .filter(|&s| receiver.flags & SACK_PERM != 0 && s != tcp.ack);
    let ack = sack.unwrap_or(tcp.ack);
    let (check, bound, value) = match code {
        ReasonCode::SeqOver => (
            Check::SeqOver,
            kernel_bound.unwrap_or(sender.maxend.wrapping_add(1)),
            tcp.seq,
        ),
        ReasonCode::AckOver => (
            Check::AckOver,
            kernel_bound.unwrap_or(receiver.end.wrapping_add(1)),
            ack,
        ),
        ReasonCode::SeqUnder => (
            Check::SeqUnder,
            kernel_bound.unwrap_or(sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1)),
            end,
        ),
        ReasonCode::AckUnder => (
            Check::AckUnder,
            kernel_bound.unwrap_or(
                receiver
                    .end
                    .wrapping_sub(max_ack_window(&sender))
                    .wrapping_sub(1),
            ),
            ack,
        ),
        ReasonCode::Overshot => (Check::Overshot, sender.maxend, end),
        _ => return None,
    };
    let excess = match check {
        Check::SeqOver | Check::AckOver => value.wrapping_sub(bound).wrapping_add(1),
        Check::SeqUnder | Check::AckUnder => bound.wrapping_sub(value).wrapping_add(1),
        // The bytes from td_maxend (the first byte past the window) to the segment's end.
        // The kernel's own number, "%u bytes more than expected", is one more than that
        // (`end - td_maxend + 1`), so it is not taken as is.
        Check::Overshot => kernel_bound
            .map(|n| n.wrapping_sub(1))
            .unwrap_or(end.wrapping_sub(sender.maxend)),
    };
    let header_ack = match check {
        Check::AckOver | Check::AckUnder => sack.map(|_| tcp.ack),
        _ => None,
    };
    Some(Explained {
        sender,
        receiver,
        bound: Some(bound),
        excess: Some(excess),
        check,
        value,
        header_ack,
        win: tcp.win,
        syn: tcp.flags.contains(b'S'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(end: u32, maxend: u32, maxwin: u32) -> TcpWindow {
        TcpWindow {
            end,
            maxend,
            maxwin,
            maxack: 0,
            scale: 7,
            flags: 0,
            _pad: [0; 2],
        }
    }

    fn tcp(seq: u32, ack: u32, len: u32, flags: &str) -> Tcp {
        Tcp {
            flags: flags.into(),
            seq,
            ack,
            win: 502,
            len,
            sack: None,
        }
    }

    #[test]
    fn seq_over_uses_kernel_bound_and_counts_excess() {
        let seen = [w(1000, 966, 65535), w(5000, 70000, 64000)];
        let e = explain(
            ReasonCode::SeqOver,
            Some(967),
            seen,
            false,
            &tcp(1000, 5000, 10, "PA"),
        )
        .unwrap();
        assert_eq!((e.bound, e.excess), (Some(967), Some(34)));
        assert!(
            e.to_string().starts_with("seq 1000 is 34 bytes past"),
            "{}",
            e
        );
        assert!(e.to_string().contains("502 << scale 7 = 64256"), "{e}");
        // Same numbers recomputed from the window when the kernel logged no bound (pre-6.1).
        let e2 = explain(
            ReasonCode::SeqOver,
            None,
            seen,
            false,
            &tcp(1000, 5000, 10, "PA"),
        )
        .unwrap();
        assert_eq!((e2.bound, e2.excess), (Some(967), Some(34)));
    }

    #[test]
    fn direction_picks_sender_and_receiver() {
        let seen = [w(100, 200, 300), w(1000, 2000, 3000)];
        let e = explain(ReasonCode::AckOver, None, seen, true, &tcp(0, 150, 0, "A")).unwrap();
        assert_eq!(e.sender, seen[1]);
        assert_eq!(e.bound, Some(101), "receiver (original dir) end + 1");
        assert_eq!(e.excess, Some(50));
    }

    #[test]
    fn seq_under_and_ack_under_with_wraparound() {
        // Sender end just past zero: the lower edge wraps below 2^32.
        let seen = [w(10, 0, 0), w(0, 0, 100)];
        let e = explain(
            ReasonCode::SeqUnder,
            None,
            seen,
            false,
            &tcp(u32::MAX - 200, 0, 50, "A"),
        )
        .unwrap();
        assert_eq!(e.bound, Some(10u32.wrapping_sub(101)));
        assert_eq!(
            e.excess,
            Some(10u32.wrapping_sub(101).wrapping_sub(u32::MAX - 150) + 1)
        );
        let e = explain(
            ReasonCode::AckUnder,
            None,
            [w(0, 0, 70000), w(100000, 0, 0)],
            false,
            &tcp(0, 10, 0, "A"),
        )
        .unwrap();
        assert_eq!(e.bound, Some(100000 - 70000 - 1));
        assert_eq!(e.excess, Some(29999 - 10 + 1));
        assert!(explain(ReasonCode::BadFlags, None, seen, false, &tcp(0, 0, 0, "SR")).is_none());
    }
}
