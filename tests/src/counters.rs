//! The kernel's own conntrack statistics, `/proc/net/stat/nf_conntrack`: the ground truth
//! the tracer's counts are compared with. One row per CPU, hex values, a header naming the
//! columns (the set differs between kernel versions, so columns are looked up by name).

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

#[derive(Clone, Debug)]
pub struct Counters {
    /// Name of the namespace the numbers belong to (for messages).
    pub netns: String,
    pub inode: u64,
    /// Column name -> value summed over all CPU rows.
    sums: HashMap<String, u64>,
}

impl Counters {
    pub fn read(ns: &Netns) -> Result<Counters> {
        let text = ns.read_proc_net("stat/nf_conntrack")?;
        let sums =
            parse(&text).with_context(|| format!("parse nf_conntrack stats of {}", ns.name()))?;
        Ok(Counters {
            netns: ns.name().to_string(),
            inode: ns.inode(),
            sums,
        })
    }

    pub fn get(&self, column: &str) -> u64 {
        self.sums.get(column).copied().unwrap_or(0)
    }

    /// How much `column` grew since `before` (per-CPU counters are 32 bit and only grow).
    pub fn delta(&self, before: &Counters, column: &str) -> u64 {
        self.get(column).saturating_sub(before.get(column))
    }
}

/// The TCP stack's `TcpExt` counters (`/proc/net/netstat`) of a namespace: they say what
/// the stacks did (timeouts, fast retransmits, old duplicates received), which conntrack's
/// verdicts are then compared against.
pub fn tcp_ext(ns: &Netns) -> Result<HashMap<String, u64>> {
    stack_counters(ns, "netstat", "TcpExt:")
}

/// The TCP MIB (`Tcp:` lines of `/proc/net/snmp`): `OutRsts` counts the RSTs a stack sent.
pub fn tcp_mib(ns: &Netns) -> Result<HashMap<String, u64>> {
    stack_counters(ns, "snmp", "Tcp:")
}

/// A `Prefix: names...` line followed by a `Prefix: values...` line.
fn stack_counters(ns: &Netns, file: &str, prefix: &str) -> Result<HashMap<String, u64>> {
    let text = ns.read_proc_net(file)?;
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = lines
        .next()
        .zip(lines.next())
        .with_context(|| format!("no {prefix} lines in {file}"))?;
    Ok(names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect())
}

fn parse(text: &str) -> Result<HashMap<String, u64>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .context("empty file")?
        .split_whitespace()
        .collect();
    if !header.contains(&"invalid") {
        bail!("no `invalid` column in header {header:?}");
    }
    let mut sums: HashMap<String, u64> = header.iter().map(|h| (h.to_string(), 0)).collect();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let values: Vec<&str> = line.split_whitespace().collect();
        if values.len() != header.len() {
            bail!(
                "row has {} values, header {}: {line:?}",
                values.len(),
                header.len()
            );
        }
        for (name, value) in header.iter().zip(values) {
            let v = u64::from_str_radix(value, 16).with_context(|| format!("{name}={value}"))?;
            *sums.get_mut(*name).expect("header column") += v;
        }
    }
    Ok(sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_hex_columns_over_cpus() {
        let text = "entries  clashres found new invalid ignore delete\n\
                    00000003  00000000 00000000 00000000 0000000a 00000001 00000000\n\
                    00000003  00000000 00000000 00000000 00000006 00000000 00000000\n";
        let sums = parse(text).unwrap();
        assert_eq!(sums["invalid"], 16);
        assert_eq!(sums["ignore"], 1);
    }
}
