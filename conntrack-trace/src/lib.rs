//! conntrack-trace: see, live, every packet netfilter conntrack marks INVALID, and why.
//! The library holds everything; `main.rs` is the command line.

pub mod bpf_sys;
pub mod btf;
pub mod check;
pub mod cli;
pub mod counters;
pub mod cri;
pub mod ct;
pub mod drops;
pub mod ebpf;
pub mod events;
pub mod filter;
pub mod hints;
pub mod metrics;
pub mod misses;
pub mod output;
pub mod owner;
pub mod plan;
pub mod privs;
pub mod reason;
pub mod record;
pub mod reset;
pub mod schema;
pub mod stats;
pub mod summary;
pub mod symbols;
pub mod trace;
pub mod verdict;
pub mod window;
