//! The architectures the release is built for: the host's (x86_64) and, cross-built with
//! Debian's toolchain, aarch64.

use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    #[value(name = "x86_64", alias = "amd64")]
    X86_64,
    #[value(name = "arm64", alias = "aarch64")]
    Aarch64,
}

impl Arch {
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => crate::setup::AARCH64_TARGET,
        }
    }

    /// `uname -m`, which the tarball's name carries.
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name for it, which its packages carry.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    /// The multiarch directory name of its libraries (`/usr/lib/<triplet>`).
    pub fn triplet(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu",
            Arch::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// The ELF header's `e_machine`.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// The C compiler that links for this architecture: the host's, or Debian's cross
    /// toolchain (gcc-aarch64-linux-gnu with libc6-dev-arm64-cross, installed by set-up).
    pub fn gcc(self) -> &'static str {
        match self {
            Arch::X86_64 => "gcc",
            Arch::Aarch64 => "aarch64-linux-gnu-gcc",
        }
    }

    /// Points cargo's linker and the cc crate (C code of dependencies) at the cross toolchain;
    /// the host's own needs nothing.
    pub fn cross_toolchain(self, cmd: &mut Command) {
        if self == Arch::Aarch64 {
            cmd.env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", self.gcc())
                .env("CC_aarch64_unknown_linux_gnu", self.gcc());
        }
    }
}
