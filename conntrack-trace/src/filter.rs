//! Parsing the filter flags into the kernel-side `Filter`.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use conntrack_trace_common::filter::{Cidr, Filter};

/// "10.0.0.0/8", "10.1.2.3", "fd00::/64".
pub fn parse_cidr(s: &str) -> Result<Cidr> {
    let (a, p) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = a
        .parse()
        .with_context(|| format!("{s:?} is not an IP address or CIDR"))?;
    let (family, max, bytes) = match addr {
        IpAddr::V4(v) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&v.octets());
            (4, 32, b)
        }
        IpAddr::V6(v) => (6, 128, v.octets()),
    };
    let prefix = match p {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max)
            .with_context(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        None => max,
    };
    Ok(Cidr {
        family,
        prefix,
        _pad: [0; 2],
        addr: bytes,
    })
}

pub fn parse_proto(s: &str) -> Result<u8> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" | "ipv6-icmp" => 58,
        "sctp" => 132,
        "udplite" => 136,
        "dccp" => 33,
        n => match n.parse::<u8>() {
            Ok(0) | Err(_) => {
                bail!("unknown protocol {s:?} (tcp, udp, icmp, icmpv6, sctp, or a number 1-255)")
            }
            Ok(v) => v,
        },
    })
}

/// `--host`/`--src`/`--dst` checked while the command line is parsed, so a bad value is a
/// usage error (exit status 2) like every other bad flag; the text is kept for `build`.
pub fn cidr_arg(s: &str) -> Result<String, String> {
    parse_cidr(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

/// `--proto`, checked while the command line is parsed (see `cidr_arg`).
pub fn proto_arg(s: &str) -> Result<String, String> {
    parse_proto(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

pub struct Flags<'a> {
    pub host: Option<&'a str>,
    pub src: Option<&'a str>,
    pub dst: Option<&'a str>,
    pub proto: Option<&'a str>,
    pub port: Option<u16>,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub netns: Option<u32>,
}

pub fn build(f: &Flags) -> Result<Filter> {
    let mut out = Filter::any();
    let cidr = |s: Option<&str>| s.map(parse_cidr).transpose().map(Option::unwrap_or_default);
    out.host = cidr(f.host).context("--host")?;
    out.src = cidr(f.src).context("--src")?;
    out.dst = cidr(f.dst).context("--dst")?;
    out.proto = f
        .proto
        .map(parse_proto)
        .transpose()
        .context("--proto")?
        .unwrap_or(0);
    out.port = f.port.unwrap_or(0);
    out.sport = f.sport.unwrap_or(0);
    out.dport = f.dport.unwrap_or(0);
    out.netns = f.netns.unwrap_or(0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.96.0.0/12").unwrap();
        assert_eq!(
            (c.family, c.prefix, &c.addr[..4]),
            (4, 12, &[10, 96, 0, 0][..])
        );
        assert_eq!(parse_cidr("10.0.0.1").unwrap().prefix, 32);
        assert_eq!(parse_cidr("fd00::/64").unwrap().family, 6);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("example.com").is_err());
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_proto("TCP").unwrap(), 6);
        assert_eq!(parse_proto("47").unwrap(), 47);
        assert!(parse_proto("0").is_err());
        assert!(parse_proto("tcpp").is_err());
    }
}
