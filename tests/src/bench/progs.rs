//! The tracer's BPF programs and what each costs, read without bpftool.
//!
//! With `kernel.bpf_stats_enabled=1` the kernel times every program run and shows the totals
//! in the program fd's fdinfo (`run_time_ns`, `run_cnt`). The tracer's programs are the fds of
//! its process whose fdinfo has a `prog_type` line. fdinfo names a program only by tag, and
//! the 16-byte program name is ambiguous here (`nf_conntrack_in` and `nf_conntrack_in_ret`
//! both truncate to `nf_conntrack_in`), so the name comes from /proc/kallsyms, where a JITed
//! program appears as `bpf_prog_<tag>_<full BTF function name>` once
//! `net.core.bpf_jit_kallsyms=1`.

use std::collections::HashMap;

use anyhow::{Context, Result};

/// Totals of one loaded program at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct Prog {
    pub id: u32,
    pub tag: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// Turns on run-time statistics and program symbols. Statistics cost a clock read per run
/// (that is in every number we report, which is what bpftool's `prog profile` users see too).
pub fn enable() -> Result<()> {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("kernel.bpf_stats_enabled=1")?;
    // Without it programs keep their tag as only name; the report then says so.
    if let Err(e) = std::fs::write("/proc/sys/net/core/bpf_jit_kallsyms", "1") {
        println!("bench: net.core.bpf_jit_kallsyms=1 failed ({e}); programs are named by tag");
    }
    Ok(())
}

/// Every BPF program `pid` holds an fd of, by program id (a program held twice counts once).
pub fn snapshot(pid: u32) -> Result<HashMap<u32, Prog>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut progs = HashMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        // An fd closed between listing and reading is simply not a program we hold.
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some(p) = parse_fdinfo(&text) {
            progs.insert(p.id, p);
        }
    }
    Ok(progs)
}

pub fn parse_fdinfo(text: &str) -> Option<Prog> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .map(str::trim)
    };
    field("prog_type")?;
    Some(Prog {
        id: field("prog_id")?.parse().ok()?,
        tag: field("prog_tag")?.to_string(),
        // Absent when the kernel predates bpf stats: reported as zero runs.
        run_time_ns: field("run_time_ns")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        run_cnt: field("run_cnt").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// Program tag -> function name, from the `[bpf]` symbols in /proc/kallsyms.
pub fn names() -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string("/proc/kallsyms").context("read /proc/kallsyms")?;
    Ok(parse_kallsyms(&text))
}

fn parse_kallsyms(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter(|l| l.ends_with("[bpf]"))
        .filter_map(|l| l.split_whitespace().nth(2)?.strip_prefix("bpf_prog_"))
        .filter_map(|s| s.split_once('_'))
        .map(|(tag, name)| (tag.to_string(), name.to_string()))
        .collect()
}

/// What each program did between two snapshots of the same process.
pub struct Delta {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub fn delta(
    before: &HashMap<u32, Prog>,
    after: &HashMap<u32, Prog>,
    name: impl Fn(&Prog) -> Option<String>,
) -> Vec<Delta> {
    let mut out: Vec<Delta> = after
        .values()
        .map(|a| {
            let b = before.get(&a.id);
            Delta {
                name: name(a).unwrap_or_else(|| format!("prog {} (tag {})", a.id, a.tag)),
                run_time_ns: a.run_time_ns - b.map_or(0, |b| b.run_time_ns),
                run_cnt: a.run_cnt - b.map_or(0, |b| b.run_cnt),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_fdinfo_is_parsed_other_fds_are_not() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nprog_type:\t2\n\
                    prog_jited:\t1\nprog_tag:\t6deef7357e7b4530\nmemlock:\t4096\nprog_id:\t42\n\
                    run_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t0\n";
        assert_eq!(
            parse_fdinfo(prog),
            Some(Prog {
                id: 42,
                tag: "6deef7357e7b4530".into(),
                run_time_ns: 123456,
                run_cnt: 789
            })
        );
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t27\nkey_size:\t0\nmap_id:\t7\n";
        assert_eq!(parse_fdinfo(map), None);
    }

    #[test]
    fn kallsyms_gives_full_names_by_tag() {
        let text = "ffffffffc0201000 t bpf_prog_6deef7357e7b4530_nf_conntrack_in_ret\t[bpf]\n\
                    ffffffffc0202000 t bpf_prog_0123456789abcdef_nf_conntrack_in\t[bpf]\n\
                    ffffffff81000000 T _stext\n";
        let names = parse_kallsyms(text);
        assert_eq!(names["6deef7357e7b4530"], "nf_conntrack_in_ret");
        assert_eq!(names["0123456789abcdef"], "nf_conntrack_in");
        assert_eq!(names.len(), 2);
    }
}
