//! What to trace, decided in the kernel before an event is written to the ring buffer.

/// An address/prefix match; `prefix == 0` with `family == 0` matches anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr {
    /// 4 or 6; 0 = unset.
    pub family: u8,
    pub prefix: u8,
    pub _pad: [u8; 2],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Either address (`--host`).
    pub host: Cidr,
    pub src: Cidr,
    pub dst: Cidr,
    /// IPPROTO_*; 0 = any.
    pub proto: u8,
    /// Nonzero: only network namespaces whose inode is a key of the `NETNS_FILTER` map
    /// (`--pod`, `--k8s-namespace`: several pods may match).
    pub netns_set: u8,
    pub _pad: [u8; 2],
    /// Either port (`--port`), source, destination; 0 = any.
    pub port: u16,
    pub sport: u16,
    pub dport: u16,
    pub _pad2: u16,
    /// Network namespace inode; 0 = any.
    pub netns: u32,
}

impl Filter {
    pub const fn any() -> Self {
        const C: Cidr = Cidr {
            family: 0,
            prefix: 0,
            _pad: [0; 2],
            addr: [0; 16],
        };
        Self {
            host: C,
            src: C,
            dst: C,
            proto: 0,
            netns_set: 0,
            _pad: [0; 2],
            port: 0,
            sport: 0,
            dport: 0,
            _pad2: 0,
            netns: 0,
        }
    }
}

/// Entries of the `NETNS_FILTER` map: namespaces one `--pod`/`--k8s-namespace` may select.
pub const NETNS_FILTER_MAX: u32 = 1024;

#[cfg(feature = "user")]
unsafe impl aya::Pod for Filter {}
