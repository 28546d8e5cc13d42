//! conntrack-trace: see, live, every packet netfilter conntrack marks INVALID, and why.

use std::{io::IsTerminal as _, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use conntrack_trace::{
    check, filter,
    output::{Output, Tee, json::Json, pcap::Pcap, text::Text},
    plan::{Mode, Want},
    record, stats, trace,
};

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print one JSON object per line (stable keys, see README) instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Stop after N events.
    #[arg(long, value_name = "N", global = true)]
    count: Option<u64>,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, value_name = "D", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Only packets from or to this address or CIDR.
    #[arg(long, value_name = "CIDR")]
    host: Option<String>,
    /// Only packets from this address or CIDR.
    #[arg(long, value_name = "CIDR")]
    src: Option<String>,
    /// Only packets to this address or CIDR.
    #[arg(long, value_name = "CIDR")]
    dst: Option<String>,
    /// Only packets with this source or destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Only packets with this source port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    sport: Option<u16>,
    /// Only packets with this destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    dport: Option<u16>,
    /// Only this protocol: tcp, udp, icmp, icmpv6, sctp, or a number.
    #[arg(long)]
    proto: Option<String>,
    /// Only this network namespace (its inode, as `ls -L -i /proc/PID/ns/net` shows).
    #[arg(long, value_name = "INODE", value_parser = clap::value_parser!(u32).range(1..))]
    netns: Option<u32>,
    /// Also print RSTs sent for packets with no socket that no INVALID packet explains
    /// (those that answer an INVALID packet are always shown, as incidents).
    #[arg(long, global = true)]
    resets: bool,
    /// Also write the reported packets to this pcapng file, each with its reason as a comment.
    #[arg(long, value_name = "FILE")]
    pcap: Option<std::path::PathBuf>,
    /// Bytes of each packet (from the IP header) kept in the pcapng file.
    #[arg(long, default_value_t = conntrack_trace_common::SNAP_LEN as u16, value_parser = clap::value_parser!(u16).range(20..=conntrack_trace_common::SNAP_LEN as i64))]
    snaplen: u16,
    /// See every verdict even where fexit cannot attach to nf_conntrack_in (no module BTF,
    /// e.g. Linux 5.10), with a kprobe pair on every packet (measurable cost, BENCHMARKS.md).
    /// Where fexit attaches, the default already sees every verdict.
    #[arg(long, conflicts_with = "cold")]
    exact: bool,
    /// No probe on the per-packet path at all: report only what the kernel logs as invalid
    /// (and table-full drops by namespace), missing INVALIDs it does not log.
    #[arg(long)]
    cold: bool,
    /// Which probe decides each packet's verdict, failing where it cannot attach: fexit,
    /// kprobe-pair, or none (as --cold). Default: fexit where it loads, else none (with
    /// --exact: kprobe-pair). For comparing their cost and output on one kernel.
    #[arg(long, value_name = "PROBE", conflicts_with_all = ["exact", "cold"])]
    verdict_probe: Option<VerdictProbe>,
    /// Also save the raw events to this file, for `conntrack-trace replay`.
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Ring buffer size in bytes (a power of two, at least one page).
    #[arg(long, default_value_t = 8 << 20, value_parser = ring_size)]
    ring_size: u32,
    /// Print the attach plan (-v) and debug logs (-vv).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VerdictProbe {
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
enum Command {
    /// Load every program into the running kernel without attaching: report the verifier's
    /// verdict per program and which attach points this kernel offers.
    Check,
    /// Decode a file saved with --record and print it like the live tracer would.
    Replay { file: std::path::PathBuf },
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

/// The terminal output the flags ask for: JSON lines, or text (coloured on a terminal).
fn output(cli: &Cli) -> Box<dyn Output> {
    let stdout = std::io::stdout();
    let colour = stdout.is_terminal();
    // Buffered (Json buffers itself): the tracer flushes once per batch read from the kernel.
    if cli.json {
        Box::new(Json::new(stdout.lock()))
    } else {
        let out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
        Box::new(Text::new(out, colour))
    }
}

fn trace(cli: &Cli) -> Result<bool> {
    let filter = filter::build(&filter::Flags {
        host: cli.host.as_deref(),
        src: cli.src.as_deref(),
        dst: cli.dst.as_deref(),
        proto: cli.proto.as_deref(),
        port: cli.port,
        sport: cli.sport,
        dport: cli.dport,
        netns: cli.netns,
    })?;
    let opts = trace::Options {
        count: cli.count,
        duration: cli.duration,
        filter,
        ring_bytes: cli.ring_size,
        verbose: cli.verbose > 0,
        resets: cli.resets,
        record: cli.record.clone(),
        want: match (cli.verdict_probe, cli.exact, cli.cold) {
            (Some(VerdictProbe::Fexit), ..) => Want::Force(Mode::Fexit),
            (Some(VerdictProbe::KprobePair), ..) => Want::Force(Mode::KprobePair),
            (Some(VerdictProbe::None), ..) => Want::Force(Mode::Cold),
            (None, true, _) => Want::Exact,
            (None, _, true) => Want::Cold,
            (None, false, false) => Want::Default,
        },
    };
    let mut out = output(cli);
    let mut pcap = match &cli.pcap {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            Some(
                Pcap::new(std::io::BufWriter::new(file), cli.snaplen.into())
                    .with_context(|| format!("writing {}", path.display()))?,
            )
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match pcap.as_mut() {
        Some(p) => rt.block_on(trace::run(opts, &mut Tee(out.as_mut(), p)))?,
        None => rt.block_on(trace::run(opts, out.as_mut()))?,
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(match cli.verbose {
            0 | 1 => log::LevelFilter::Warn,
            _ => log::LevelFilter::Debug,
        })
        .parse_env("RUST_LOG")
        .init();
    let result = match &cli.command {
        Some(Command::Check) => check::run(&mut std::io::stdout().lock()),
        Some(Command::Replay { file }) => {
            let mut out = output(&cli);
            record::replay(file, out.as_mut(), cli.resets, cli.count)
        }
        Some(Command::Stats { watch }) => {
            stats::run(&mut std::io::stdout().lock(), cli.json, *watch)
        }
        None => trace(&cli),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("conntrack-trace: {e:#}");
            ExitCode::FAILURE
        }
    }
}
