//! Kernel programs of conntrack-trace. Each module is one hook family; the attach plan in
//! userspace decides which of these programs attach on the running kernel.
#![no_std]
#![no_main]
// Inline BPF assembly, for the one atomic add Rust's atomics do not offer on this target.
#![feature(asm_experimental_arch)]

mod args;
mod ct;
mod drops;
mod filter;
mod frame;
mod read;
mod reason;
mod reset;
mod ring;
mod skb;
mod verdict;
mod window;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists for rustc only.
    loop {}
}

// bpf_probe_read_kernel and the ring buffer are GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
