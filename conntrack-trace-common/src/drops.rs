//! Packets conntrack dropped: a full table, or an entry that could not be inserted.

/// `PacketEvent::drop_reason`.
pub mod reason {
    /// NF_DROP from `nf_conntrack_in` for a cause not otherwise identified.
    pub const OTHER: u8 = 0;
    /// `early_drop` found nothing to evict while the table was full: "table full, dropping packet".
    pub const TABLE_FULL: u8 = 1;
    /// `nf_ct_resolve_clash` returned NF_DROP at confirm: `insert_failed`.
    pub const INSERT_FAILED: u8 = 2;
}
