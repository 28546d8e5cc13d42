//! Builds the kernel programs (conntrack-trace-ebpf) for bpfel-unknown-none with the nightly
//! toolchain, so `cargo build` of the CLI always embeds programs that match its ABI.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../conntrack-trace-common/src");
    let ebpf = aya_build::Package {
        name: "conntrack-trace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../conntrack-trace-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
