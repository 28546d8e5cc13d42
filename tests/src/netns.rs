//! Anonymous network namespaces held by a file descriptor.
//!
//! No `/var/run/netns` bind mounts: the busybox initramfs may not support them, and a
//! namespace that only lives as long as its fd cleans itself up (veths included) when a
//! scenario ends or the runner dies.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::thread;

use anyhow::{Context, Result, bail};

pub struct Netns {
    name: String,
    fd: OwnedFd,
    inode: u64,
}

impl Netns {
    /// The namespace the runner itself lives in (init netns in the guest).
    pub fn current(name: &str) -> Result<Netns> {
        let file = File::open("/proc/thread-self/ns/net").context("open own netns")?;
        Self::from_file(name, file)
    }

    /// An existing namespace by path (another process's /proc/PID/ns/net); the open file
    /// keeps it alive.
    pub fn open(name: &str, path: &str) -> Result<Netns> {
        let file = File::open(path).with_context(|| format!("open {path}"))?;
        Self::from_file(name, file)
    }

    /// A fresh namespace. `unshare` runs on a throwaway thread so the caller's thread
    /// stays where it is; the returned fd keeps the namespace alive.
    pub fn create(name: &str) -> Result<Netns> {
        let file = thread::spawn(|| -> io::Result<File> {
            // SAFETY: plain syscall, affects only this short-lived thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            File::open("/proc/thread-self/ns/net")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netns creation thread panicked"))?
        .with_context(|| format!("unshare(CLONE_NEWNET) for {name}"))?;
        let ns = Self::from_file(name, file)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn from_file(name: &str, file: File) -> Result<Netns> {
        let inode = file.metadata()?.ino();
        Ok(Netns {
            name: name.to_string(),
            fd: file.into(),
            inode,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The inode the tracer reports as `netns`.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// A path other processes (iproute2's `netns` argument) can open to reach this namespace.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    /// Runs `f` on a thread that has joined this namespace. Sockets created there stay
    /// bound to the namespace and may be used from any thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let fd = self.fd.as_raw_fd();
        thread::scope(|s| {
            s.spawn(|| -> Result<T> {
                // SAFETY: fd is a valid netns fd owned by self for the scope's duration.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error()).context("setns");
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// A command that will execute inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let fd = self.fd.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd is inherited until exec (CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs a command in the namespace, fails with its stderr when it fails, returns stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("spawn {program}"))?;
        if !out.status.success() {
            bail!(
                "[{}] {} {} failed: {}",
                self.name,
                program,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// iproute2's `ip` (never busybox's applet, which lacks veth peers in other netns).
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        self.exec(crate::tools::ip(), args)
    }

    pub fn iptables(&self, args: &[&str]) -> Result<String> {
        self.exec("iptables", args)
    }

    /// Makes conntrack judge this namespace's traffic (an INPUT rule that needs its state, as
    /// kube-proxy's do) and sends INVALID packets to `target`: `DROP` as a node does, or
    /// `ACCEPT` to let them through. `tool` is iptables or ip6tables.
    pub fn on_invalid(&self, tool: &str, target: &str) -> Result<()> {
        let rule = [
            "-A",
            "INPUT",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            target,
        ];
        self.exec(tool, &rule).map(drop)
    }

    /// The kernel's own log as an oracle: conntrack logs every INVALID/IGNORE reason of every
    /// protocol (255), per IPv4 packet, with the bound the tracer must report; checksums are
    /// checked as on a node.
    pub fn log_invalid(&self) -> Result<()> {
        self.sysctl("net.netfilter.nf_conntrack_log_invalid", "255")?;
        self.sysctl("net.netfilter.nf_log.2", "nf_log_ipv4")?;
        self.sysctl("net.netfilter.nf_conntrack_checksum", "1")
    }

    /// Writes a per-namespace sysctl (`net.*` files resolve against the writer's netns).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("[{}] sysctl {key}={value}", self.name))
    }

    /// Reads a per-namespace sysctl, trimmed.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("[{}] read sysctl {key}", self.name))?;
        Ok(value.trim().to_string())
    }

    /// Reads a file under `/proc/thread-self/net/` as seen from inside this namespace.
    pub fn read_proc_net(&self, file: &str) -> Result<String> {
        let path = format!("/proc/thread-self/net/{file}");
        self.run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("[{}] read {path}", self.name))
    }
}
