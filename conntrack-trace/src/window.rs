//! The TCP window math: which bound a segment failed and by how much, from both directions'
//! window state as conntrack saw it. Formulas are `tcp_in_window`'s (unchanged since 4.x
//! apart from 6.1 turning some failures into IGNORE).

use std::fmt;

use conntrack_trace_common::{ct::SeqAdj, window::TcpWindow};

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
    /// For the ACK checks, what the NAT helpers' sequence adjustment added to the packet's
    /// ACK before the kernel compared it (the negated `nf_ct_seq_offset`), when not 0.
    pub seqadj: Option<i32>,
    /// For the ACK checks, the entry is adjusted but by how much was not read: `excess` is
    /// then unknown.
    seqadj_unknown: bool,
    check: Check,
    /// The packet's number the check was about (seq, ack or segment end), and its window.
    value: u32,
    /// For the ACK checks, the header's ACK when a SACK block or the sequence adjustment
    /// moved the number compared, and whether a SACK block did.
    header_ack: Option<u32>,
    sack: bool,
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
                match self.excess {
                    Some(excess) => put!(out; " is " excess " bytes"),
                    None => put!(out; " is"),
                }
                put!(out; " past the highest sequence the other side sent (" above ")")
            }
            Check::SeqUnder => put!(out; "segment ends at " v ", " excess
                " bytes below the lower edge " below " of the window (sender end " end
                " - receiver max window " maxwin "): data already acknowledged"),
            Check::AckUnder => {
                self.write_ack(out);
                match self.excess {
                    Some(excess) => put!(out; " is " excess " bytes"),
                    None => put!(out; " is"),
                }
                put!(out; " below the oldest acceptable ACK " below)
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
    /// The number the ACK checks compared: the header's ACK, or the SACK edge that replaced
    /// it, less the NAT helpers' sequence adjustment (or a word that it could not be read).
    fn write_ack(&self, out: &mut Vec<u8>) {
        let (v, ack) = (self.value, self.header_ack.unwrap_or(self.value));
        match (self.sack, self.seqadj) {
            (true, None) => put!(out; "SACK right edge " v " (extending ack " ack ")"),
            (true, Some(adj)) => {
                put!(out; "SACK right edge " v " (extending ack " ack ", ");
                write_seqadj(out, adj);
                put!(out; " applied)")
            }
            (false, Some(adj)) => {
                put!(out; "ack " v " (");
                write_seqadj(out, adj);
                put!(out; " applied to ack " ack ")")
            }
            (false, None) => put!(out; "ack " v),
        }
        if self.seqadj_unknown {
            put!(out; ", less a NAT helper's sequence adjustment the tracer cannot read here,");
        }
    }
}

/// "NAT helper sequence adjustment -6", with the sign either way.
fn write_seqadj(out: &mut Vec<u8>, adj: i32) {
    put!(out; "NAT helper sequence adjustment ");
    if adj > 0 {
        out.push(b'+');
    }
    put!(out; adj);
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

/// `nf_ct_seq_offset`: the offset a NAT helper's length change put on sequence numbers
/// after its correction position (`after(seq, correction_pos)`), or the one before.
fn seq_offset(adj: &SeqAdj, seq: u32) -> i32 {
    if (adj.correction_pos.wrapping_sub(seq) as i32) < 0 {
        adj.offset_after
    } else {
        adj.offset_before
    }
}

/// What is known of the NAT helpers' sequence adjustment on the packet's entry.
#[derive(Clone, Copy, Debug)]
pub enum Adjust<'a> {
    /// None: the entry's status has no `IPS_SEQ_ADJUST`.
    None,
    /// The entry's seqadj extension, for the direction opposite the packet's.
    Known(&'a SeqAdj),
    /// The entry is adjusted (`IPS_SEQ_ADJUST`) but its extension was not read (BTF does
    /// not describe it): the ACK the kernel compared is not known.
    Unknown,
}

pub fn explain(
    code: ReasonCode,
    kernel_bound: Option<u32>,
    seen: [TcpWindow; 2],
    reply_dir: bool,
    adjust: Adjust,
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
    // Then both are taken back by the NAT helpers' sequence adjustment of what the ACK
    // acknowledges: `ack -= nf_ct_seq_offset(ct, !dir, ack - 1)`, the same for `sack`.
    let offset = match adjust {
        Adjust::Known(a) => seq_offset(a, tcp.ack.wrapping_sub(1)),
        Adjust::None | Adjust::Unknown => 0,
    };
    let ack = sack.unwrap_or(tcp.ack).wrapping_sub(offset as u32);
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
    let ack_check = matches!(check, Check::AckOver | Check::AckUnder);
    let seqadj = (ack_check && offset != 0).then(|| offset.wrapping_neg());
    let seqadj_unknown = ack_check && matches!(adjust, Adjust::Unknown);
    let header_ack = (ack_check && (sack.is_some() || seqadj.is_some())).then_some(tcp.ack);
    Some(Explained {
        sender,
        receiver,
        bound: Some(bound),
        excess: (!seqadj_unknown).then_some(excess),
        seqadj,
        seqadj_unknown,
        check,
        value,
        header_ack,
        sack: ack_check && sack.is_some(),
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
            Adjust::None,
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
            Adjust::None,
            &tcp(1000, 5000, 10, "PA"),
        )
        .unwrap();
        assert_eq!((e2.bound, e2.excess), (Some(967), Some(34)));
    }

    #[test]
    fn direction_picks_sender_and_receiver() {
        let seen = [w(100, 200, 300), w(1000, 2000, 3000)];
        let e = explain(
            ReasonCode::AckOver,
            None,
            seen,
            true,
            Adjust::None,
            &tcp(0, 150, 0, "A"),
        )
        .unwrap();
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
            Adjust::None,
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
            Adjust::None,
            &tcp(0, 10, 0, "A"),
        )
        .unwrap();
        assert_eq!(e.bound, Some(100000 - 70000 - 1));
        assert_eq!(e.excess, Some(29999 - 10 + 1));
        assert!(
            explain(
                ReasonCode::BadFlags,
                None,
                seen,
                false,
                Adjust::None,
                &tcp(0, 0, 0, "SR")
            )
            .is_none()
        );
    }

    fn adj(correction_pos: u32, offset_before: i32, offset_after: i32) -> SeqAdj {
        SeqAdj {
            correction_pos,
            offset_before,
            offset_after,
            _pad: 0,
        }
    }

    #[test]
    fn ack_over_takes_the_helpers_offset_off_the_ack() {
        // The client (original direction) sent up to td_end 2000; an FTP helper grew its
        // segment at seq 1500 by 6 bytes, so the server acknowledges in a space 6 ahead.
        // A reply ACK 2010: ack - 1 = 2009 is after 1500, offset_after 6 applies, the
        // kernel compares 2010 - 6 = 2004 with td_end + 1 = 2001: 2004 - 2000 = 4 bytes over.
        let seen = [w(2000, 0, 0), w(9000, 0, 0)];
        let a = adj(1500, 0, 6);
        let t = tcp(9000, 2010, 0, "A");
        let e = explain(ReasonCode::AckOver, None, seen, true, Adjust::Known(&a), &t).unwrap();
        assert_eq!(
            (e.bound, e.excess, e.seqadj),
            (Some(2001), Some(4), Some(-6))
        );
        assert!(
            e.to_string().starts_with(
                "ack 2004 (NAT helper sequence adjustment -6 applied to ack 2010) is 4 bytes \
                 past the highest sequence the other side sent (2000);"
            ),
            "{e}"
        );
        // The kernel's own bound (6.1+) gives the same number.
        let k = explain(
            ReasonCode::AckOver,
            Some(2001),
            seen,
            true,
            Adjust::Known(&a),
            &t,
        )
        .unwrap();
        assert_eq!(k.excess, Some(4));
    }

    #[test]
    fn the_offset_is_chosen_by_ack_minus_one_against_the_correction_position() {
        let seen = [w(2000, 0, 0), w(9000, 0, 0)];
        // ack 1501: ack - 1 = 1500 is not after 1500, so offset_before (-2) applies and
        // the kernel compares 1501 + 2 = 1503 with td_end + 1 = 2001: under, not over. Asked
        // as AckOver anyway, the excess wraps, which shows the -2 was taken.
        let a = adj(1500, -2, 6);
        let e = explain(
            ReasonCode::AckUnder,
            None,
            [w(0, 0, 70000), w(100000, 0, 0)],
            false,
            Adjust::Known(&a),
            &tcp(0, 1501, 0, "A"),
        )
        .unwrap();
        // bound = receiver end 100000 - max(70000, 66000) - 1 = 29999;
        // excess = 29999 - 1503 + 1 = 28497.
        assert_eq!(
            (e.bound, e.excess, e.seqadj),
            (Some(29999), Some(28497), Some(2))
        );
        assert!(e.to_string().starts_with(
            "ack 1503 (NAT helper sequence adjustment +2 applied to ack 1501) is 28497 bytes below"
        ), "{e}");
        // ack 1502: ack - 1 = 1501 is after 1500, offset_after 6: 1502 - 6 = 1496.
        let e = explain(
            ReasonCode::AckUnder,
            None,
            [w(0, 0, 70000), w(100000, 0, 0)],
            false,
            Adjust::Known(&a),
            &tcp(0, 1502, 0, "A"),
        )
        .unwrap();
        assert_eq!((e.excess, e.seqadj), (Some(29999 - 1496 + 1), Some(-6)));
        // Across the wrap: correction at 2^32 - 10, ack 5 (ack - 1 = 4 is 14 after it).
        let a = adj(u32::MAX - 9, 0, 3);
        let e = explain(
            ReasonCode::AckOver,
            None,
            seen,
            true,
            Adjust::Known(&a),
            &tcp(0, 5, 0, "A"),
        );
        // 5 - 3 = 2 compared with bound 2001: excess 2 - 2001 + 1 wraps to 2^32 - 1998.
        assert_eq!(e.unwrap().excess, Some(u32::MAX - 1997));
    }

    #[test]
    fn a_zero_offset_changes_nothing_and_seq_checks_ignore_it() {
        let seen = [w(2000, 0, 0), w(9000, 0, 0)];
        let a = adj(1500, 0, 0);
        let t = tcp(9000, 2010, 0, "A");
        let e = explain(ReasonCode::AckOver, None, seen, true, Adjust::Known(&a), &t).unwrap();
        let plain = explain(ReasonCode::AckOver, None, seen, true, Adjust::None, &t).unwrap();
        assert_eq!((e.excess, e.seqadj), (Some(10), None));
        assert_eq!(e.to_string(), plain.to_string());
        // The SEQ checks are about the packet's own numbers, which seqadj does not touch.
        let a = adj(0, 100, 100);
        let s = [w(1000, 966, 65535), w(5000, 70000, 64000)];
        let t = tcp(1000, 5000, 10, "PA");
        let e = explain(ReasonCode::SeqOver, None, s, false, Adjust::Known(&a), &t).unwrap();
        assert_eq!((e.excess, e.seqadj), (Some(34), None));
    }

    #[test]
    fn an_adjusted_entry_whose_extension_was_not_read_gets_no_excess() {
        // 5.10's BTF does not describe the extension: the kernel compared ack - offset, and
        // the offset is not known, so neither is how far over it was.
        let seen = [w(2000, 0, 0), w(9000, 0, 0)];
        let t = tcp(9000, 2010, 0, "A");
        let e = explain(ReasonCode::AckOver, None, seen, true, Adjust::Unknown, &t).unwrap();
        assert_eq!((e.bound, e.excess, e.seqadj), (Some(2001), None, None));
        assert!(
            e.to_string().starts_with(
                "ack 2010, less a NAT helper's sequence adjustment the tracer cannot read \
                 here, is past the highest sequence the other side sent (2000);"
            ),
            "{e}"
        );
        // The SEQ checks do not depend on it.
        let s = [w(1000, 966, 65535), w(5000, 70000, 64000)];
        let t = tcp(1000, 5000, 10, "PA");
        let e = explain(ReasonCode::SeqOver, None, s, false, Adjust::Unknown, &t).unwrap();
        assert_eq!(e.excess, Some(34));
    }

    #[test]
    fn sack_edge_and_offset_together() {
        // Receiver permitted SACK; header ack 2000, SACK edge 2100; ack - 1 = 1999 is after
        // 1500: offset 6 off the edge gives 2094, against bound 2001: 2094 - 2000 = 94 over.
        let mut receiver = w(2000, 0, 0);
        receiver.flags = SACK_PERM;
        let seen = [receiver, w(9000, 0, 0)];
        let mut t = tcp(9000, 2000, 0, "A");
        t.sack = Some(2100);
        let e = explain(
            ReasonCode::AckOver,
            None,
            seen,
            true,
            Adjust::Known(&adj(1500, 0, 6)),
            &t,
        );
        let e = e.unwrap();
        assert_eq!((e.excess, e.seqadj), (Some(94), Some(-6)));
        assert!(e.to_string().starts_with(
            "SACK right edge 2094 (extending ack 2000, NAT helper sequence adjustment -6 applied)"
        ), "{e}");
    }
}
