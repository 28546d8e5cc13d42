//! Where the external programs live, in the guest initramfs and on a Debian host.

use std::path::Path;

/// iproute2's `ip`. Called by full path because busybox answers to `ip` on PATH in the
/// guest and its applet cannot create a veth peer inside another namespace.
pub fn ip() -> &'static str {
    first_existing(&["/usr/sbin/ip", "/sbin/ip"]).unwrap_or("ip")
}

/// iproute2's `tc`, needed for netem; `None` when the image has none.
pub fn tc() -> Option<&'static str> {
    first_existing(&["/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc", "/bin/tc"])
}

/// The tracer under test: `$CT_TRACER`, else the guest's `/bin/conntrack-trace`, else PATH.
pub fn tracer() -> String {
    if let Ok(path) = std::env::var("CT_TRACER") {
        return path;
    }
    first_existing(&["/bin/conntrack-trace"])
        .unwrap_or("conntrack-trace")
        .to_string()
}

fn first_existing(candidates: &[&'static str]) -> Option<&'static str> {
    candidates.iter().copied().find(|p| Path::new(p).exists())
}
