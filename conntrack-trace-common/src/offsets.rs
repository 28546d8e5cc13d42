//! Kernel struct offsets, computed by userspace from BTF and written into the eBPF object's
//! `OFFSETS` global before load (rustc emits no CO-RE relocations).

/// An offset that BTF did not describe on this kernel: the kernel side skips the read.
pub const UNKNOWN: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offsets {
    // struct sk_buff
    pub skb_nfct: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub skb_data: u32,
    /// Bytes in page fragments: `len - data_len` are in the linear area.
    pub skb_data_len: u32,
    // struct nf_hook_state
    pub state_hook: u32,
    pub state_pf: u32,
    pub state_in: u32,
    pub state_out: u32,
    pub state_net: u32,
    // struct net_device / struct net
    pub dev_ifindex: u32,
    /// `nd_net.net`: the device's namespace, for hooks that have no `nf_hook_state`.
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    /// `net->ct.nf_ct_proto.tcp.tcp_be_liberal`: the per-netns sysctl.
    pub net_tcp_be_liberal: u32,
    // struct nf_conn (module BTF; UNKNOWN where the kernel has no module BTF)
    pub ct_status: u32,
    /// `tuplehash[IP_CT_DIR_ORIGINAL].tuple`
    pub ct_tuple_orig: u32,
    /// `tuplehash[IP_CT_DIR_REPLY].tuple`
    pub ct_tuple_reply: u32,
    /// `proto.tcp.state`
    pub ct_tcp_state: u32,
    /// `ct_net.net`: the entry's namespace, for loggers with neither hook state nor device.
    pub ct_net: u32,
    /// `proto.tcp.seen[0]`; `seen[1]` follows at `+ tcp_seen_size`
    pub ct_tcp_seen: u32,
    pub tcp_seen_size: u32,
    // struct ip_ct_tcp_state
    pub tcp_td_end: u32,
    pub tcp_td_maxend: u32,
    pub tcp_td_maxwin: u32,
    pub tcp_td_maxack: u32,
    pub tcp_td_scale: u32,
    pub tcp_flags: u32,
    /// `nf_conn.ext`, the extension area's pointer.
    pub ct_ext: u32,
    /// `nf_ct_ext.offset[NF_CT_EXT_SEQADJ]` (0: no seqadj extension); the id from BTF.
    pub ext_seqadj: u32,
    /// `nf_conn_seqadj.seq[0]`, and the size of one direction's `struct nf_ct_seqadj`.
    pub seqadj_seq: u32,
    pub seqadj_size: u32,
    // struct nf_ct_seqadj
    pub seqadj_pos: u32,
    pub seqadj_before: u32,
    pub seqadj_after: u32,
    // struct nf_tcp_invalid_log (only kernels with the fixed-args nf_tcp_log_invalid)
    pub log_type: u32,
    pub log_value: u32,
    /// `task_struct.se.nr_migrations`: how often a task changed CPU, so the kprobe pair can
    /// tell a call that moved CPU between its entry and return.
    pub task_nr_migrations: u32,
}

impl Offsets {
    pub const fn unknown() -> Self {
        Self {
            skb_nfct: UNKNOWN,
            skb_head: UNKNOWN,
            skb_network_header: UNKNOWN,
            skb_len: UNKNOWN,
            skb_dev: UNKNOWN,
            skb_data: UNKNOWN,
            skb_data_len: UNKNOWN,
            state_hook: UNKNOWN,
            state_pf: UNKNOWN,
            state_in: UNKNOWN,
            state_out: UNKNOWN,
            state_net: UNKNOWN,
            dev_ifindex: UNKNOWN,
            dev_nd_net: UNKNOWN,
            net_ns_inum: UNKNOWN,
            net_tcp_be_liberal: UNKNOWN,
            ct_status: UNKNOWN,
            ct_tuple_orig: UNKNOWN,
            ct_tuple_reply: UNKNOWN,
            ct_tcp_state: UNKNOWN,
            ct_net: UNKNOWN,
            ct_tcp_seen: UNKNOWN,
            tcp_seen_size: UNKNOWN,
            tcp_td_end: UNKNOWN,
            tcp_td_maxend: UNKNOWN,
            tcp_td_maxwin: UNKNOWN,
            tcp_td_maxack: UNKNOWN,
            tcp_td_scale: UNKNOWN,
            tcp_flags: UNKNOWN,
            ct_ext: UNKNOWN,
            ext_seqadj: UNKNOWN,
            seqadj_seq: UNKNOWN,
            seqadj_size: UNKNOWN,
            seqadj_pos: UNKNOWN,
            seqadj_before: UNKNOWN,
            seqadj_after: UNKNOWN,
            log_type: UNKNOWN,
            log_value: UNKNOWN,
            task_nr_migrations: UNKNOWN,
        }
    }

    /// Whether the conntrack entry itself (tuples, TCP state, window) can be read.
    pub const fn has_ct(&self) -> bool {
        self.ct_status != UNKNOWN && self.ct_tuple_orig != UNKNOWN && self.ct_tuple_reply != UNKNOWN
    }
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for Offsets {}
