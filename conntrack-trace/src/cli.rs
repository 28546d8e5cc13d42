//! The command line's definition, apart from `main.rs` so the man page and the shell
//! completions are generated from the same clap definition that parses the arguments.

use std::{fs, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, Subcommand};
use clap_complete::Shell;

/// What `--version` prints: the release, the commit it was built from and the hash of the
/// embedded eBPF object, so a binary found on a node names exactly what it runs.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CONNTRACK_TRACE_COMMIT"),
    ", eBPF object sha256 ",
    env!("CONNTRACK_TRACE_EBPF_SHA256"),
    ")"
);

#[derive(Parser)]
#[command(version = VERSION, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print one JSON object per line (stable keys, see README) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N", global = true)]
    pub count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Only packets from or to this address or CIDR.
    #[arg(long, value_name = "CIDR", value_parser = crate::filter::cidr_arg)]
    pub host: Option<String>,
    /// Only packets from this address or CIDR.
    #[arg(long, value_name = "CIDR", value_parser = crate::filter::cidr_arg)]
    pub src: Option<String>,
    /// Only packets to this address or CIDR.
    #[arg(long, value_name = "CIDR", value_parser = crate::filter::cidr_arg)]
    pub dst: Option<String>,
    /// Only packets with this source or destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only packets with this source port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub sport: Option<u16>,
    /// Only packets with this destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub dport: Option<u16>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, or a number.
    #[arg(long, value_parser = crate::filter::proto_arg)]
    pub proto: Option<String>,
    /// Only this network namespace (its inode, as `ls -L -i /proc/PID/ns/net` shows).
    #[arg(long, value_name = "INODE", value_parser = clap::value_parser!(u32).range(1..))]
    pub netns: Option<u32>,
    /// Only the network namespaces of the pods of this name (in every Kubernetes namespace,
    /// unless --k8s-namespace names one), as the container runtime at --cri-socket lists them
    /// at start-up. Exits 1 when there is no such socket or no such pod.
    #[arg(long, value_name = "NAME", conflicts_with = "netns")]
    pub pod: Option<String>,
    /// Only the network namespaces of this Kubernetes namespace's pods (with --pod: of that
    /// pod), from the container runtime at --cri-socket at start-up.
    #[arg(long, value_name = "NS", conflicts_with = "netns")]
    pub k8s_namespace: Option<String>,
    /// The container runtime's CRI socket, where the pod, Kubernetes namespace and container
    /// names of each network namespace are read (e.g. /var/run/crio/crio.sock for CRI-O).
    /// A node without it is normal: pods are then named from cgroups alone.
    #[arg(long, value_name = "PATH", default_value = crate::cri::DEFAULT_SOCKET)]
    pub cri_socket: std::path::PathBuf,
    /// Also print RSTs sent for packets with no socket that no INVALID packet explains
    /// (those that answer an INVALID packet are always shown, as incidents).
    #[arg(long, global = true)]
    pub resets: bool,
    /// Also write the reported packets to this pcapng file, each with its reason as a comment.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<std::path::PathBuf>,
    /// Bytes of each packet (from the IP header) kept in the pcapng file.
    #[arg(long, default_value_t = conntrack_trace_common::SNAP_LEN as u16, value_parser = clap::value_parser!(u16).range(20..=conntrack_trace_common::SNAP_LEN as i64))]
    pub snaplen: u16,
    /// See every verdict, including INVALIDs the kernel does not log and the packet of each
    /// table-full drop, also where fexit cannot load (no module BTF, e.g. Debian 5.10): there
    /// it adds a kprobe pair on nf_conntrack_in, which runs for every packet. Elsewhere the
    /// default already does, with fexit.
    #[arg(long)]
    pub exact: bool,
    /// Which probe decides each packet's verdict, failing where it cannot attach: fexit (the
    /// default where it loads), kprobe-pair, or none (no per-packet cost: only what the kernel
    /// logs is reported; the default where fexit cannot load).
    #[arg(long, value_name = "PROBE", conflicts_with = "exact")]
    pub verdict_probe: Option<VerdictProbe>,
    /// Also save the raw events to this file, for `conntrack-trace replay`.
    #[arg(long, value_name = "FILE")]
    pub record: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz) while tracing, e.g.
    /// 0.0.0.0:9477. Where the programs cannot attach, the kernel's counters and
    /// conntrack_trace_attached 0 with the reason are served until stopped, instead of exiting.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Ring buffer size in bytes (a power of two, at least one page).
    #[arg(long, default_value_t = 8 << 20, value_parser = ring_size)]
    pub ring_size: u32,
    /// Print the attach plan (-v) and debug logs (-vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum VerdictProbe {
    Fexit,
    KprobePair,
    None,
}

fn ring_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} is not a power of two of at least 4096"));
    }
    Ok(v)
}

#[derive(Subcommand)]
pub enum Command {
    /// Load every program into the running kernel without attaching (but for an instant the
    /// fexit program, to learn whether this kernel can attach it): report the verifier's
    /// verdict per program and which attach points this kernel offers.
    Check,
    /// Decode a file saved with --record and print it like the live tracer would.
    Replay { file: std::path::PathBuf },
    /// Print the JSON Schema (2020-12) every --json line follows: every key, every line
    /// type, each closed set's values with what they mean. Lines name it by schema_version.
    Schema,
    /// The kernel's conntrack counters (per CPU and summed), table fill and the sysctls that
    /// decide what is INVALID. Needs no BPF and no root.
    Stats {
        /// Print again every SECONDS with per-interval rates, until interrupted.
        #[arg(long, value_name = "SECONDS", value_parser = watch_secs)]
        watch: Option<Duration>,
    },
}

fn watch_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.1 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a number of seconds >= 0.1")),
    }
}

/// `conntrack-trace __generate-docs DIR`, for packaging (`cargo xtask dist`): kept out of the
/// clap definition, so neither the help, the man pages nor the completions offer it.
pub const GENERATE_DOCS: &str = "__generate-docs";

/// Man pages into `DIR/man` (one per subcommand) and completions into `DIR/completions`.
pub fn generate_docs(dir: &Path) -> Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man)
        .with_context(|| format!("writing man pages to {}", man.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "conntrack-trace", &completions)
            .with_context(|| format!("writing {shell} completions to {}", completions.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_commit_and_ebpf_hash() {
        let v = Cli::command().render_version();
        assert!(
            v.starts_with(&format!("conntrack-trace {}", env!("CARGO_PKG_VERSION"))),
            "{v}"
        );
        assert!(v.contains(" (commit "), "{v}");
        let hash = v
            .split("eBPF object sha256 ")
            .nth(1)
            .expect(&v)
            .trim_end()
            .trim_end_matches(')');
        assert!(
            hash == "none" || (hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())),
            "{v}"
        );
    }

    #[test]
    fn docs_cover_every_subcommand_and_flag() {
        let dir = std::env::temp_dir().join(format!("ct-docs-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        generate_docs(&dir).unwrap();
        let read = |p: &str| fs::read_to_string(dir.join(p)).unwrap();
        let man = read("man/conntrack-trace.1");
        for flag in [
            "verdict\\-probe",
            "exact",
            "ring\\-size",
            "metrics",
            "cri\\-socket",
            "k8s\\-namespace",
        ] {
            assert!(man.contains(flag), "man page lacks --{flag}");
        }
        for sub in ["check", "stats", "replay"] {
            assert!(dir.join(format!("man/conntrack-trace-{sub}.1")).exists());
            for c in [
                "completions/conntrack-trace.bash",
                "completions/_conntrack-trace",
                "completions/conntrack-trace.fish",
            ] {
                let text = read(c);
                assert!(text.contains(sub), "{c} lacks {sub}");
                assert!(
                    !text.contains(GENERATE_DOCS),
                    "{c} offers the packaging entry"
                );
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
