//! Both ends send an out-of-window RST: conntrack and the endpoints are out of sync. Since
//! 6.1 the second one makes `nf_tcp_handle_invalid` shorten the entry's timeout and log a
//! second line for the same packet after the window line ("packet (index 3, dir 0) response
//! for index 3 lower timeout to 300", in later builds "lowered timeout to UNACK"). The kernel counts one INVALID per packet, and
//! the tracer must print one event per packet, with the window reason, in every mode.

use anyhow::Result;
use serde_json::Value;

use crate::connection::Flow;
use crate::inject::{ACK, Packet, RST, RawSender};
use crate::kmsg::CtLog;
use crate::observe::Observer;
use crate::scenarios::{Ctx, FAR};
use crate::topology::{Nat, Topology, WEB};
use crate::verify::{self, Problems};

/// The note `nf_tcp_handle_invalid` logs, in each wording the kernels have used.
fn is_note(log: &CtLog) -> bool {
    ["response for index", "lowered timeout"]
        .iter()
        .any(|w| log.reason.contains(w))
}

pub fn out_of_sync_rst(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("finrst", Nat::Client { drop_invalid: true })?;
    let mut flow = Flow::open(&topo, WEB)?;
    // Replies make the entry ASSURED, which the timeout note requires.
    flow.exchange(1000)?;
    let now = flow.seqs()?;
    // The backend's RST (reply direction) enters the client namespace at PRE_ROUTING; the
    // client's (original direction, to the Service address) leaves it at LOCAL_OUT.
    let backend_rst = Packet::tcp(
        flow.service.backend,
        flow.client_addr,
        now.server_next.wrapping_add(FAR),
        now.client_next,
        RST | ACK,
        Vec::new(),
    );
    let client_rst = Packet::tcp(
        flow.client_addr,
        flow.service.vip,
        now.client_next.wrapping_add(FAR),
        now.server_next,
        RST | ACK,
        Vec::new(),
    );
    let note_expected = ctx.kernel.logs_out_of_sync_note();
    let mut observer = Observer::start(&topo, ctx, &[])?;
    for (ns, packet) in [(&topo.server, &backend_rst), (&topo.client, &client_rst)] {
        println!("inject: out-of-window RST {}", packet.describe());
        RawSender::open(ns)?.send(packet)?;
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    observer.wait_logs(2 + usize::from(note_expected))?;
    let obs = observer.finish(|_| 2)?;

    let mut problems = Problems::default();
    let lines = |p: &Packet| -> Vec<&CtLog> {
        obs.logs
            .iter()
            .filter(|l| verify::log_is_packet(l, p))
            .collect()
    };
    // The kernel's side first: this is what makes the scenario mean anything.
    let window_line = |p: &Packet, problems: &mut Problems| -> Option<String> {
        let window: Vec<&CtLog> = lines(p).into_iter().filter(|l| !is_note(l)).collect();
        match window.as_slice() {
            [one] => Some(one.reason.clone()),
            other => {
                problems.add(format!(
                    "kernel logged {} window lines for {}",
                    other.len(),
                    p.describe()
                ));
                None
            }
        }
    };
    let backend_reason = window_line(&backend_rst, &mut problems);
    let client_reason = window_line(&client_rst, &mut problems);
    let notes = lines(&client_rst).iter().filter(|l| is_note(l)).count();
    if notes != usize::from(note_expected) {
        problems.add(format!(
            "kernel logged {notes} timeout notes for the client's RST, expected {}",
            usize::from(note_expected)
        ));
    }
    if lines(&backend_rst).len() != 1 {
        problems.add(format!(
            "kernel logged {} lines for the backend's RST, expected 1",
            lines(&backend_rst).len()
        ));
    }
    let invalid = obs.invalid_delta(topo.client.inode());
    if invalid != 2 {
        problems.add(format!(
            "kernel invalid counter in the client namespace moved by {invalid}, sent 2 INVALID packets"
        ));
    }

    // The tracer: one event per packet, carrying the window line, never the note.
    if let Some(trace) = &obs.trace {
        for (what, packet, reason) in [
            ("backend's RST", &backend_rst, &backend_reason),
            ("client's RST", &client_rst, &client_reason),
        ] {
            let events: Vec<&Value> = trace
                .events
                .iter()
                .filter(|ev| verify::event_is_packet(ev, packet))
                .collect();
            let [ev] = events.as_slice() else {
                problems.add(format!(
                    "{what}: tracer printed {} events, the kernel judged one packet",
                    events.len()
                ));
                continue;
            };
            if ev["event"] != "invalid" || ev["reason_code"] != "seq_over" {
                problems.add(format!(
                    "{what}: expected an invalid seq_over event: {}",
                    verify::brief(ev)
                ));
            }
            if let Some(reason) = reason
                && ev["reason"].as_str() != Some(reason)
            {
                problems.add(format!(
                    "{what}: reason should be the kernel's window line \"{reason}\": {}",
                    verify::brief(ev)
                ));
            }
            if ev["netns"].as_u64() != Some(topo.client.inode()) {
                problems.add(format!(
                    "{what}: netns should be the client's: {}",
                    verify::brief(ev)
                ));
            }
        }
    }
    verify::stream_is_complete(&topo, &obs, &mut problems);
    problems.into_result()
}
