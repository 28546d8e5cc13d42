//! conntrack-trace: see, live, every packet netfilter conntrack marks INVALID, and why.

mod btf;
mod check;
mod ebpf;
mod plan;
mod privs;
mod symbols;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Print the attach plan and debug logs.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(Subcommand)]
enum Command {
    /// Load every program into the running kernel without attaching: report the verifier's
    /// verdict per program and which attach points this kernel offers.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .filter_level(match cli.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            _ => log::LevelFilter::Debug,
        })
        .parse_env("RUST_LOG")
        .init();
    let result = match cli.command {
        Some(Command::Check) => check::run(&mut std::io::stdout().lock()),
        None => todo!(),
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
