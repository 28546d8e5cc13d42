//! conntrack-trace: see, live, every packet netfilter conntrack marks INVALID, and why.

use std::{io::IsTerminal as _, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::Parser as _;

use conntrack_trace::{
    check,
    cli::{Cli, Command, VerdictProbe},
    cri, filter, metrics,
    output::{Output, Tee, json::Json, pcap::Pcap, text::Text},
    plan::{Mode, Want},
    record, stats, trace,
};

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

/// `schema`: the --json lines' JSON Schema on stdout; a closed stdout ends quietly.
fn schema() -> Result<bool> {
    use std::io::Write as _;
    let text = serde_json::to_string_pretty(&conntrack_trace::schema::schema())?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(true),
        written => Ok(written.map(|()| true)?),
    }
}

fn trace(cli: &Cli) -> Result<bool> {
    let mut filter = filter::build(&filter::Flags {
        host: cli.host.as_deref(),
        src: cli.src.as_deref(),
        dst: cli.dst.as_deref(),
        proto: cli.proto.as_deref(),
        port: cli.port,
        sport: cli.sport,
        dport: cli.dport,
        netns: cli.netns,
    })?;
    let netns_set = pod_netns(cli)?;
    if !netns_set.is_empty() {
        filter.netns_set = 1;
    }
    let mut opts = trace::Options {
        count: cli.count,
        duration: cli.duration,
        filter,
        ring_bytes: cli.ring_size,
        verbose: cli.verbose > 0,
        resets: cli.resets,
        record: cli.record.clone(),
        want: match (cli.verdict_probe, cli.exact) {
            (Some(VerdictProbe::Fexit), _) => Want::Force(Mode::Fexit),
            (Some(VerdictProbe::KprobePair), _) => Want::Force(Mode::KprobePair),
            (Some(VerdictProbe::None), _) => Want::Force(Mode::Cold),
            (None, true) => Want::Exact,
            (None, false) => Want::Default,
        },
        metrics: None,
        netns_set,
        cri_socket: cli.cri_socket.clone(),
    };
    let mut out = output(cli);
    if let Some(addr) = cli.metrics {
        let listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("--metrics {addr}: cannot listen there"))?;
        let m = metrics::Metrics::new();
        metrics::http::spawn(listener, m.clone())?;
        opts.metrics = Some(m);
    }
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

/// `--pod`/`--k8s-namespace`: the network namespaces the runtime's matching pods own now.
fn pod_netns(cli: &Cli) -> Result<Vec<u32>> {
    if cli.pod.is_none() && cli.k8s_namespace.is_none() {
        return Ok(Vec::new());
    }
    let pods = cri::Pods::new(cli.cri_socket.clone())
        .require()
        .context("--pod/--k8s-namespace")?;
    let inodes = cri::select(&pods, cli.pod.as_deref(), cli.k8s_namespace.as_deref())?;
    let max = conntrack_trace_common::filter::NETNS_FILTER_MAX as usize;
    if inodes.len() > max {
        anyhow::bail!(
            "--pod/--k8s-namespace select {} network namespaces, more than the {max} the kernel filter holds",
            inodes.len()
        );
    }
    let list: Vec<String> = inodes.iter().map(u32::to_string).collect();
    eprintln!(
        "conntrack-trace: tracing {} pod network namespace(s): {}",
        inodes.len(),
        list.join(" ")
    );
    Ok(inodes)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|a| a == conntrack_trace::cli::GENERATE_DOCS)
    {
        let (Some(dir), None) = (args.next(), args.next()) else {
            eprintln!(
                "usage: conntrack-trace {} DIR",
                conntrack_trace::cli::GENERATE_DOCS
            );
            // 2, as clap exits on every other usage error.
            return ExitCode::from(2);
        };
        return match conntrack_trace::cli::generate_docs(dir.as_ref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("conntrack-trace: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
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
        Some(Command::Schema) => schema(),
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
