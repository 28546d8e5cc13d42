//! The TCP reasons besides SEQ over/under and ACK over, on one live DNAT'd connection in one
//! tracer run: an ACK far below the oldest acceptable one, a segment just past the receiver's
//! window end (tolerated as an overshoot since 5.19), and an RST below what the other side
//! acknowledged ("invalid rst").

use anyhow::Result;
use serde_json::Value;

use crate::connection::Flow;
use crate::inject::{ACK, PSH, Packet, RST};
use crate::observe::Observation;
use crate::scenarios::{self, Ctx, DROP_INVALID, FAR};
use crate::topology::{Topology, WEB};
use crate::verify::{Expected, Problems, Verdict, event_is_packet, log_is_packet};

/// Payload of the overshooting segment: far below any receive window, so the kernel's
/// tolerance (overshoot at most the receiver's largest window) applies.
const OVERSHOOT_LEN: usize = 10;

pub fn tcp_reasons(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("reasons", DROP_INVALID)?;
    let mut flow = Flow::open(&topo, WEB)?;
    flow.exchange(1000)?;
    let now = flow.seqs()?;
    let window_end = flow.client_window_end()?;
    let (from, to) = (flow.service.backend, flow.client_addr);

    // 6.1 made an ACK below the lower bound IGNORE, like SEQ under.
    let (ack_under_text, ack_under_verdict) = if ctx.kernel.window_under_is_ignored() {
        ("ignored ACK under lower bound", Verdict::Ignored)
    } else {
        ("ACK is under the lower bound", Verdict::Invalid)
    };
    let (overshot_code, overshot_text, overshot_verdict) =
        if ctx.kernel.window_tolerates_overshoot() {
            ("overshot", "bytes more than expected", Verdict::Ignored)
        } else {
            ("seq_over", "SEQ is over", Verdict::Invalid)
        };
    let expected = [
        scenarios::window(
            "ACK under the lower bound",
            Packet::tcp(
                from,
                to,
                now.server_next,
                now.client_next.wrapping_sub(FAR),
                ACK,
                Vec::new(),
            ),
            "ack_under",
            ack_under_text,
            ack_under_verdict,
        ),
        // The first byte past the client's advertised window: the start fails the window
        // check, the end lies well within the tolerance.
        scenarios::window(
            "segment past the window end",
            Packet::tcp(
                from,
                to,
                window_end.wrapping_add(1),
                now.client_next,
                ACK | PSH,
                vec![b'w'; OVERSHOOT_LEN],
            ),
            overshot_code,
            overshot_text,
            overshot_verdict,
        ),
        // The client acknowledged everything up to server_next: an RST from before that
        // point is one conntrack refuses to close the entry for.
        scenarios::plain(
            "RST below the acknowledged data",
            Packet::tcp(
                from,
                to,
                now.server_next.wrapping_sub(1),
                0,
                RST,
                Vec::new(),
            ),
            "invalid_rst",
            "invalid rst",
        ),
    ];
    let obs = scenarios::inject(ctx, &topo, &[], None, &expected)?;
    let mut problems = Problems::default();
    if let Err(e) = flow.exchange(100) {
        problems.add(format!("connection did not survive the injections: {e:#}"));
    }
    scenarios::check_injections(ctx, &topo, &obs, &expected, &mut problems);
    if ctx.kernel.window_tolerates_overshoot() {
        check_overshoot(&obs, &expected[1], &mut problems);
    }
    problems.into_result()
}

/// The overshoot event's explanation counts the bytes from td_maxend (the first byte past
/// the window) to the segment's end: one less than the kernel's own number, which is
/// `end - td_maxend + 1`.
fn check_overshoot(obs: &Observation, e: &Expected, problems: &mut Problems) {
    let Some(logged) = obs
        .logs
        .iter()
        .find(|l| log_is_packet(l, &e.packet))
        .and_then(|l| l.overshoot())
    else {
        return problems.add(format!(
            "{}: the kernel logged no \"N bytes more than expected\"",
            e.what
        ));
    };
    let Some(trace) = &obs.trace else { return };
    for ev in trace
        .events
        .iter()
        .filter(|ev| event_is_packet(ev, &e.packet))
    {
        let past = bytes_past(ev);
        if past != Some(logged - 1) {
            problems.add(format!(
                "{}: kernel logged {logged} bytes more than expected, so {} bytes past the window end; \
                 the tracer's explanation says {past:?}: {}",
                e.what,
                logged - 1,
                ev["window"]["explain"]
            ));
        }
    }
}

/// N of "..., N bytes past ..." in the event's window explanation.
fn bytes_past(ev: &Value) -> Option<u64> {
    let text = ev["window"]["explain"].as_str()?;
    let (head, _) = text.split_once(" bytes past")?;
    head.rsplit(' ').next()?.parse().ok()
}
