//! `window::explain` against a model of the kernel's `tcp_in_window` (the checks of
//! nf_conntrack_proto_tcp.c, 6.1+ order and messages): random window states of both
//! directions and random segments, in the 32-bit wrapping sequence space, the model deciding
//! which check fails and what number the kernel logs. The model knows only the kernel's
//! rules; what `explain` must satisfy is stated in terms of them (the bound the kernel logs,
//! the smallest shift of the segment that passes the failed check), not in its formulas.

use conntrack_trace::{
    reason::ReasonCode::{self, AckOver, AckUnder, Overshot, SeqOver, SeqUnder},
    verdict::Tcp,
    window,
};
use conntrack_trace_common::{ct::SeqAdj, window::TcpWindow};
use proptest::prelude::*;

/// `before(a, b)` of include/net/tcp.h: a comes first in sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// `MAXACKWINCONST`: the kernel's floor for how far back an ACK may lag.
const MAX_ACK_WIN_CONST: u32 = 66000;

#[derive(Clone, Copy, Debug)]
struct State {
    end: u32,
    maxend: u32,
    maxwin: u32,
    scale: u8,
    /// The side agreed to SACK (`IP_CT_TCP_FLAG_SACK_PERM`): segments to it are checked
    /// with their SACK edge.
    sack_perm: bool,
}

#[derive(Clone, Debug)]
struct Segment {
    syn: bool,
    fin: bool,
    has_ack: bool,
    seq: u32,
    ack: u32,
    /// The right edge of the highest SACK block; `ack` when the segment carries none.
    sack: u32,
    payload: u16,
    win: u16,
}

/// What `tcp_in_window` concludes, with the number it logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Accept,
    Fail(ReasonCode, u32),
}

/// The window checks of `tcp_in_window` for a segment from `sender` to `receiver`, past the
/// connection set-up branches (both directions seen; a NAT sequence offset is `adjusted`'s).
fn tcp_in_window(sender: &State, receiver: &State, s: &Segment) -> Verdict {
    let end = s
        .seq
        .wrapping_add(u32::from(s.payload))
        .wrapping_add(u32::from(s.syn))
        .wrapping_add(u32::from(s.fin));
    // Without ACK the kernel pretends the segment acknowledges exactly td_end; SACK blocks
    // are read only when the receiver agreed to SACK.
    let sack = match (s.has_ack, receiver.sack_perm) {
        (false, _) => receiver.end,
        (true, true) => s.sack,
        (true, false) => s.ack,
    };
    let max_ack_window = if sender.maxwin > MAX_ACK_WIN_CONST {
        sender.maxwin
    } else {
        MAX_ACK_WIN_CONST
    };
    let oldest_ack = receiver.end.wrapping_sub(max_ack_window).wrapping_sub(1);
    let lower_edge = sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1);
    if !before(s.seq, sender.maxend.wrapping_add(1)) {
        let overshot = end.wrapping_sub(sender.maxend).wrapping_add(1);
        let in_recv_win = receiver.maxwin != 0 && after(end, lower_edge);
        if in_recv_win
            && after(sack, oldest_ack)
            && overshot <= receiver.maxwin
            && before(sack, receiver.end.wrapping_add(1))
        {
            return Verdict::Fail(Overshot, overshot);
        }
        return Verdict::Fail(SeqOver, sender.maxend.wrapping_add(1));
    }
    if !before(sack, receiver.end.wrapping_add(1)) {
        return Verdict::Fail(AckOver, receiver.end.wrapping_add(1));
    }
    if receiver.maxwin != 0 && !after(end, lower_edge) {
        return Verdict::Fail(SeqUnder, lower_edge);
    }
    if !after(sack, oldest_ack) {
        return Verdict::Fail(AckUnder, oldest_ack);
    }
    Verdict::Accept
}

/// `nf_ct_seq_offset`: a NAT helper's offset for sequence numbers after its correction
/// position, or the one for those up to it.
fn seq_offset(adj: &SeqAdj, seq: u32) -> i32 {
    if after(seq, adj.correction_pos) {
        adj.offset_after
    } else {
        adj.offset_before
    }
}

/// The segment as `tcp_in_window` checks it on an entry with a seqadj extension: before any
/// check, `ack` and `sack` both lose `nf_ct_seq_offset(ct, !dir, ack - 1)`.
fn adjusted(s: &Segment, adj: &SeqAdj) -> (Segment, i32) {
    let offset = seq_offset(adj, s.ack.wrapping_sub(1));
    let mut s = s.clone();
    s.ack = s.ack.wrapping_sub(offset as u32);
    s.sack = s.sack.wrapping_sub(offset as u32);
    (s, offset)
}

fn flags(s: &Segment) -> String {
    let mut f = String::new();
    if s.syn {
        f.push('S');
    }
    if s.fin {
        f.push('F');
    }
    if s.has_ack {
        f.push('A');
    }
    f
}

fn tcp(s: &Segment) -> Tcp {
    Tcp {
        flags: flags(s).as_str().into(),
        seq: s.seq,
        ack: s.ack,
        win: s.win,
        len: u32::from(s.payload),
        sack: (s.sack != s.ack).then_some(s.sack),
    }
}

fn window(s: &State) -> TcpWindow {
    TcpWindow {
        end: s.end,
        maxend: s.maxend,
        maxwin: s.maxwin,
        maxack: 0,
        scale: s.scale,
        flags: if s.sack_perm { 0x02 } else { 0 },
        _pad: [0; 2],
    }
}

/// The segment moved by `by` bytes (negative: back) in whichever number `code` is about.
fn shifted(s: &Segment, code: ReasonCode, by: i64) -> Segment {
    let mut s = s.clone();
    let by = by as u32; // two's complement: wrapping_add of a negative shift
    match code {
        SeqOver | SeqUnder | Overshot => s.seq = s.seq.wrapping_add(by),
        _ => {
            s.ack = s.ack.wrapping_add(by);
            s.sack = s.sack.wrapping_add(by);
        }
    }
    s
}

/// A window state near `base`, so that segments land on every side of every bound (and
/// across the 2^32 wrap when `base` is near it).
fn state(base: u32) -> impl Strategy<Value = State> {
    (
        -200_000i64..200_000,
        0u32..300_000,
        prop_oneof![Just(0u32), 1u32..200_000, 60_000u32..1 << 20],
        0u8..=14,
        any::<bool>(),
    )
        .prop_map(move |(d, span, maxwin, scale, sack_perm)| {
            let end = base.wrapping_add(d as u32);
            State {
                end,
                maxend: end.wrapping_add(span),
                maxwin,
                scale,
                sack_perm,
            }
        })
}

fn near(base: u32, spread: i64) -> impl Strategy<Value = u32> {
    (-spread..spread).prop_map(move |d| base.wrapping_add(d as u32))
}

/// Both directions' states and a segment from the first to the second, its numbers close
/// to the states' edges; `base` anywhere, including just below the wrap.
fn case() -> impl Strategy<Value = (State, State, Segment)> {
    (
        prop_oneof![any::<u32>(), (u32::MAX - 300_000)..=u32::MAX, 0u32..300_000],
        any::<u32>(),
    )
        .prop_flat_map(|(a, b)| (state(a), state(b)))
        .prop_flat_map(|(sender, receiver)| {
            let segment = (
                (any::<bool>(), any::<bool>(), prop::bool::weighted(0.9)),
                prop_oneof![
                    near(sender.maxend, 400_000),
                    near(sender.end, 400_000),
                    any::<u32>()
                ],
                prop_oneof![near(receiver.end, 400_000), any::<u32>()],
                prop_oneof![Just(0u32), 1u32..100_000],
                0u16..=9000,
                any::<u16>(),
            )
                .prop_map(
                    |((syn, fin, has_ack), seq, ack, sacked, payload, win)| Segment {
                        syn,
                        fin,
                        has_ack,
                        seq,
                        ack,
                        sack: ack.wrapping_add(sacked),
                        payload,
                        win,
                    },
                );
            (Just(sender), Just(receiver), segment)
        })
}

/// The check `code` alone, on a moved segment: whether the kernel would still fail it.
fn fails(code: ReasonCode, sender: &State, receiver: &State, s: &Segment) -> bool {
    // Only the number the check is about moves, so no earlier check starts failing; an
    // overshoot is a seq_over the kernel forgives, so it still fails the seq test.
    match tcp_in_window(sender, receiver, s) {
        Verdict::Fail(c, _) => c == code || (code == SeqOver && c == Overshot),
        Verdict::Accept => false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    /// Whatever check fails, `explain` names the bound the kernel logs (6.1+), recomputes
    /// that same bound when the kernel logged none (before 6.1), and its excess is the
    /// smallest move of the offending number that gets the segment past that check.
    #[test]
    fn explain_agrees_with_the_kernel_checks((sender, receiver, seg) in case(), reply in any::<bool>()) {
        let Verdict::Fail(code, logged) = tcp_in_window(&sender, &receiver, &seg) else {
            return Ok(());
        };
        let seen = if reply {
            [window(&receiver), window(&sender)]
        } else {
            [window(&sender), window(&receiver)]
        };
        let t = tcp(&seg);
        let logged_now = window::explain(code, Some(logged), seen, reply, window::Adjust::None, &t).expect("a window code");
        let recomputed = window::explain(code, None, seen, reply, window::Adjust::None, &t).expect("a window code");
        if code == Overshot {
            // The kernel logs `end - td_maxend + 1`; td_maxend is the first sequence number
            // past the window, so the segment runs one byte less than that past it.
            prop_assert_eq!(logged_now.excess, Some(logged - 1));
            prop_assert_eq!(recomputed.excess, Some(logged - 1));
            return Ok(());
        }
        prop_assert_eq!(logged_now.bound, Some(logged));
        prop_assert_eq!(recomputed.bound, Some(logged), "recomputed bound");
        prop_assert_eq!(recomputed.excess, logged_now.excess);

        let excess = i64::from(logged_now.excess.expect("an excess"));
        prop_assert!(excess >= 1, "a failed check is at least one byte past: {}", excess);
        // The number compared is the SACK edge whenever the kernel used it, and then the
        // sentence says so.
        let sacked = receiver.sack_perm && seg.has_ack && seg.sack != seg.ack;
        if matches!(code, AckOver | AckUnder) {
            prop_assert_eq!(sacked, logged_now.to_string().starts_with("SACK right edge"), "{}", logged_now);
        }
        let toward = match code {
            SeqOver | AckOver => -1,
            _ => 1,
        };
        prop_assert!(
            !fails(code, &sender, &receiver, &shifted(&seg, code, toward * excess)),
            "moved by the excess {} the segment still fails {}", excess, code
        );
        prop_assert!(
            fails(code, &sender, &receiver, &shifted(&seg, code, toward * (excess - 1))),
            "moved by less than the excess {} the segment already passes {}", excess, code
        );
    }

    /// On an entry a NAT helper adjusted, the kernel checks the ACK and SACK edge taken back
    /// by the helper's offset: `explain` names the bound it logs, and its excess is the
    /// smallest move of the number the kernel compared that passes the check.
    #[test]
    fn explain_takes_the_helpers_offset_off_like_the_kernel(
        (sender, receiver, seg) in case(),
        reply in any::<bool>(),
        // The correction position often right at the ACK, where `ack - 1` decides.
        (pos, offset_before, offset_after) in (
            prop_oneof![-3i64..3, -100_000i64..100_000],
            -600i32..600,
            -600i32..600,
        ),
    ) {
        let adj = SeqAdj {
            correction_pos: seg.ack.wrapping_add(pos as u32),
            offset_before,
            offset_after,
            _pad: 0,
        };
        let (checked, offset) = adjusted(&seg, &adj);
        let Verdict::Fail(code, logged) = tcp_in_window(&sender, &receiver, &checked) else {
            return Ok(());
        };
        let seen = if reply {
            [window(&receiver), window(&sender)]
        } else {
            [window(&sender), window(&receiver)]
        };
        let e = window::explain(code, Some(logged), seen, reply, window::Adjust::Known(&adj), &tcp(&seg))
            .expect("a window code");
        if code == Overshot {
            prop_assert_eq!(e.excess, Some(logged - 1));
            return Ok(());
        }
        prop_assert_eq!(e.bound, Some(logged));
        let ack_check = matches!(code, AckOver | AckUnder);
        let moved = ack_check && seg.has_ack && offset != 0;
        prop_assert_eq!(e.seqadj, moved.then_some(-offset));
        prop_assert_eq!(moved, e.to_string().contains("NAT helper sequence adjustment"), "{}", e);
        let excess = i64::from(e.excess.expect("an excess"));
        prop_assert!(excess >= 1, "a failed check is at least one byte past: {}", excess);
        let toward = match code {
            SeqOver | AckOver => -1,
            _ => 1,
        };
        prop_assert!(
            !fails(code, &sender, &receiver, &shifted(&checked, code, toward * excess)),
            "moved by the excess {} the checked segment still fails {}", excess, code
        );
        prop_assert!(
            fails(code, &sender, &receiver, &shifted(&checked, code, toward * (excess - 1))),
            "moved by less than the excess {} the checked segment already passes {}", excess, code
        );
    }

    /// The scaled window the sentence prints is the kernel's `win << td_scale`, which the
    /// kernel applies to every segment but a SYN.
    #[test]
    fn scaled_window_is_the_kernels((sender, receiver, seg) in case()) {
        let Verdict::Fail(code, logged) = tcp_in_window(&sender, &receiver, &seg) else {
            return Ok(());
        };
        let e = window::explain(code, Some(logged), [window(&sender), window(&receiver)], false, window::Adjust::None, &tcp(&seg))
            .expect("a window code");
        let text = e.to_string();
        let scaled = u32::from(seg.win) << sender.scale;
        let clause = format!("advertised window {} << scale {} = {}", seg.win, sender.scale, scaled);
        if sender.scale == 0 || seg.syn {
            prop_assert!(!text.contains("<< scale"), "{}", text);
        } else {
            prop_assert!(text.contains(&clause), "{} lacks {}", text, clause);
        }
    }
}

/// The model itself, on the numbers of a real event (the README's 6.12 demo): a segment the
/// kernel logged as `SEQ is over upper bound 2760275922` is one here too.
#[test]
fn model_reproduces_a_recorded_seq_over() {
    let sender = State {
        end: 2760264337,
        maxend: 2760275921,
        maxwin: 65536,
        scale: 7,
        sack_perm: true,
    };
    let receiver = State {
        end: 401959093,
        maxend: 401959093 + 65536,
        maxwin: 23168,
        scale: 7,
        sack_perm: true,
    };
    let seg = Segment {
        syn: false,
        fin: false,
        has_ack: true,
        seq: 3028699793,
        ack: 401959093,
        sack: 401959093,
        payload: 100,
        win: 512,
    };
    assert_eq!(
        tcp_in_window(&sender, &receiver, &seg),
        Verdict::Fail(SeqOver, 2760275922)
    );
    // And a segment inside every bound is accepted.
    let ok = Segment {
        seq: 2760264337,
        ..seg
    };
    assert_eq!(tcp_in_window(&sender, &receiver, &ok), Verdict::Accept);
}
