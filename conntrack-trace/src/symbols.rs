//! `/proc/kallsyms`: which kernel functions exist as attachable symbols on this kernel.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
};

use anyhow::{Context as _, Result};

pub struct Symbols {
    /// Base name -> the symbol's real name (which may carry a `.isra.0`-style suffix).
    names: HashMap<String, String>,
    /// Base name -> module it lives in (`nf_conntrack`), absent for vmlinux.
    modules: HashMap<String, String>,
}

impl Symbols {
    /// The `wanted` functions of the running kernel. kallsyms has ~10^5 lines: it is streamed
    /// and only the wanted names are kept.
    pub fn from_proc(wanted: &[&str]) -> Result<Self> {
        let f = std::fs::File::open("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let lines = BufReader::new(f).lines().map_while(Result::ok);
        Ok(Self::parse(lines, wanted))
    }

    pub fn parse<S: AsRef<str>>(lines: impl IntoIterator<Item = S>, wanted: &[&str]) -> Self {
        let mut names = HashMap::new();
        let mut modules = HashMap::new();
        for line in lines {
            let line = line.as_ref();
            let mut it = line.split_whitespace();
            let (Some(_addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            if !matches!(kind, "t" | "T") {
                continue;
            }
            // GCC splits functions into `.cold` parts that are not entry points; `.isra.N`,
            // `.constprop.N` and `.part.N` are clones that are.
            if name.contains(".cold") {
                continue;
            }
            let base = name.split('.').next().unwrap_or(name);
            if !wanted.contains(&base) {
                continue;
            }
            // Prefer the exact name when both exist.
            if base == name || !names.contains_key(base) {
                names.insert(base.to_string(), name.to_string());
            }
            if let Some(m) = it.next() {
                modules.insert(base.to_string(), m.trim_matches(['[', ']']).to_string());
            }
        }
        Self { names, modules }
    }

    /// The attachable name of `base`, if the kernel has it.
    pub fn find(&self, base: &str) -> Option<&str> {
        self.names.get(base).map(String::as_str)
    }

    pub fn module_of(&self, base: &str) -> Option<&str> {
        self.modules.get(base).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_cold_parts_and_modules() {
        let s = Symbols::parse(
            "ffffffff81241d10 t nf_conntrack_in.cold\n\
             ffffffff81f910e0 T nf_conntrack_in\n\
             ffffffffc0a01000 t tcp_in_window.isra.0\t[nf_conntrack]\n\
             ffffffffc0a02000 t nf_tcp_log_invalid.cold\t[nf_conntrack]\n\
             ffffffff82000000 D some_data\n\
             ffffffff82000010 T unwanted_function\n"
                .lines(),
            &[
                "nf_conntrack_in",
                "tcp_in_window",
                "nf_tcp_log_invalid",
                "some_data",
            ],
        );
        assert_eq!(
            s.find("unwanted_function"),
            None,
            "only wanted names are kept"
        );
        assert_eq!(s.find("nf_conntrack_in"), Some("nf_conntrack_in"));
        assert_eq!(s.find("tcp_in_window"), Some("tcp_in_window.isra.0"));
        assert_eq!(s.module_of("tcp_in_window"), Some("nf_conntrack"));
        assert_eq!(s.module_of("nf_conntrack_in"), None);
        assert_eq!(
            s.find("nf_tcp_log_invalid"),
            None,
            ".cold alone is not an entry point"
        );
        assert_eq!(s.find("some_data"), None);
    }
}
