//! Drop events: which of conntrack's drop paths a dropped packet took.

use conntrack_trace_common::drops::reason;

use crate::reason::ReasonCode;

/// Stable code for a DROP verdict's `drop_reason`.
pub fn code(drop_reason: u8) -> ReasonCode {
    match drop_reason {
        reason::TABLE_FULL => ReasonCode::TableFull,
        reason::INSERT_FAILED => ReasonCode::InsertFailed,
        _ => ReasonCode::ConntrackDrop,
    }
}

/// The kernel's words for it (what it prints, where it prints anything). Without a verdict
/// probe a table-full drop is seen by its namespace alone: `packet_known` is false then.
pub fn text(drop_reason: u8, packet_known: bool) -> &'static str {
    match drop_reason {
        reason::TABLE_FULL if !packet_known => {
            "nf_conntrack: table full, dropping packet (which packet is unknown with no \
             per-packet probe: the default mode where fexit loads, or --exact, names it)"
        }
        reason::TABLE_FULL => "nf_conntrack: table full, dropping packet",
        reason::INSERT_FAILED => "entry could not be inserted at confirm (clash not resolved)",
        _ => "nf_conntrack_in returned NF_DROP",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes() {
        use super::ReasonCode::*;
        assert_eq!(super::code(1), TableFull);
        assert_eq!(super::code(2), InsertFailed);
        assert_eq!(super::code(0), ConntrackDrop);
        assert!(super::text(1, true).contains("table full"));
        assert!(super::text(1, false).contains("which packet is unknown"));
    }
}
