//! ICMP and ICMPv6 the kernel refuses: an error quoting a datagram of no known connection
//! (counted in `icmp_error`, not logged, so only a verdict probe reports it), one too short
//! for its header, and one with a bad checksum (PRE_ROUTING with nf_conntrack_checksum=1),
//! both logged and also counted in `icmp_error`.

use anyhow::Result;

use crate::probe::{self, Column, Datagram, Probe, quoted_udp};
use crate::scenarios::{Ctx, DROP_INVALID};
use crate::topology::{CLIENT_IP, CLIENT_IP6, SERVER_IP, SERVER_IP6, Topology};
use crate::verify::Problems;

/// Destination unreachable, with a different code per probe so that log lines and events
/// tell them apart (port, host, network unreachable; in ICMPv6 port, address, no route).
const DEST_UNREACH: u8 = 3;
const CODES: [u8; 3] = [3, 1, 0];
const DEST_UNREACH_V6: u8 = 1;
const CODES_V6: [u8; 3] = [4, 3, 0];
/// What remains of a header cut short: type, code and checksum, half of the 8 bytes the
/// kernel reads.
const SHORT: usize = 4;

pub fn icmp_errors(ctx: &Ctx) -> Result<()> {
    let topo = Topology::build("icmp", DROP_INVALID)?;
    topo.dual_stack()?;
    let (from, judge) = (&topo.server, &topo.client);
    // The quoted datagram: the client's to the backend, never sent.
    let quote4 = quoted_udp((CLIENT_IP, 7100).into(), (SERVER_IP, 7101).into());
    let quote6 = quoted_udp((CLIENT_IP6, 7100).into(), (SERVER_IP6, 7101).into());
    let (s4, d4) = (SERVER_IP.into(), CLIENT_IP.into());
    let (s6, d6) = (SERVER_IP6.into(), CLIENT_IP6.into());
    let unreach4 = |code| Datagram::icmp(s4, d4, DEST_UNREACH, code, quote4.clone());
    let unreach6 = |code| Datagram::icmp(s6, d6, DEST_UNREACH_V6, code, quote6.clone());
    let short = |mut d: Datagram| {
        d.truncate = Some(SHORT);
        d
    };
    let bad = |mut d: Datagram| {
        d.bad_checksum = true;
        d
    };
    let probe = |what, datagram, code, kernel_text| Probe {
        what,
        datagram,
        from,
        judge,
        code,
        kernel_text,
        column: Column::IcmpError,
    };
    let probes = [
        probe(
            "ICMP error quoting no connection",
            unreach4(CODES[0]),
            "icmp_error_no_flow",
            None,
        ),
        probe(
            "short ICMP",
            short(unreach4(CODES[1])),
            "icmp_short",
            Some("short packet"),
        ),
        probe(
            "ICMP with a bad checksum",
            bad(unreach4(CODES[2])),
            "icmp_bad_checksum",
            Some("checksum"),
        ),
        probe(
            "ICMPv6 error quoting no connection",
            unreach6(CODES_V6[0]),
            "icmp_error_no_flow",
            None,
        ),
        probe(
            "short ICMPv6",
            short(unreach6(CODES_V6[1])),
            "icmp_short",
            Some("short packet"),
        ),
        probe(
            "ICMPv6 with a bad checksum",
            bad(unreach6(CODES_V6[2])),
            "icmp_bad_checksum",
            Some("checksum"),
        ),
    ];
    let obs = probe::observe(ctx, &topo, &[], &probes, |_| true)?;
    let mut problems = Problems::default();
    probe::check(ctx, &topo, &obs, &probes, |_| true, &mut problems);
    problems.into_result()
}
