//! Forged IPv4 packets sent through a raw socket (`IPPROTO_RAW` implies `IP_HDRINCL`; the
//! kernel fills in the IP total length and header checksum, everything else is ours).

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use crate::netns::Netns;

pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub enum Transport {
    Tcp {
        seq: u32,
        ack: u32,
        flags: u8,
        /// Header length in 32-bit words claimed by the header; 5 is the honest value.
        data_offset: u8,
    },
    Udp {
        /// UDP length field; `None` writes the honest length.
        claimed_len: Option<u16>,
    },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub transport: Transport,
    pub payload: Vec<u8>,
    /// Store a wrong L4 checksum (the correct one with all bits flipped).
    pub bad_checksum: bool,
}

impl Packet {
    pub fn tcp(
        src: SocketAddrV4,
        dst: SocketAddrV4,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: Vec<u8>,
    ) -> Packet {
        Packet {
            src,
            dst,
            transport: Transport::Tcp {
                seq,
                ack,
                flags,
                data_offset: 5,
            },
            payload,
            bad_checksum: false,
        }
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>) -> Packet {
        Packet {
            src,
            dst,
            transport: Transport::Udp { claimed_len: None },
            payload,
            bad_checksum: false,
        }
    }

    pub fn protonum(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => libc::IPPROTO_TCP as u8,
            Transport::Udp { .. } => libc::IPPROTO_UDP as u8,
        }
    }

    pub fn seq_ack(&self) -> Option<(u32, u32)> {
        match self.transport {
            Transport::Tcp { seq, ack, .. } => Some((seq, ack)),
            Transport::Udp { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match &self.transport {
            Transport::Tcp {
                seq, ack, flags, ..
            } => format!(
                "tcp {} -> {} [{}] seq {seq} ack {ack} len {}{}",
                self.src,
                self.dst,
                flag_letters(*flags).into_iter().collect::<String>(),
                self.payload.len(),
                if self.bad_checksum { " bad-csum" } else { "" }
            ),
            Transport::Udp { claimed_len } => format!(
                "udp {} -> {} len {}{}{}",
                self.src,
                self.dst,
                self.payload.len(),
                claimed_len
                    .map(|l| format!(" (header claims {})", l.saturating_sub(8)))
                    .unwrap_or_default(),
                if self.bad_checksum { " bad-csum" } else { "" }
            ),
        }
    }

    /// The IP datagram as it goes on the wire (IP length and checksum left to the kernel).
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = match &self.transport {
            Transport::Tcp {
                seq,
                ack,
                flags,
                data_offset,
            } => {
                let mut h = Vec::with_capacity(20 + self.payload.len());
                h.extend_from_slice(&self.src.port().to_be_bytes());
                h.extend_from_slice(&self.dst.port().to_be_bytes());
                h.extend_from_slice(&seq.to_be_bytes());
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(data_offset << 4);
                h.push(*flags);
                h.extend_from_slice(&512u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                h.extend_from_slice(&self.payload);
                self.finish_checksum(h, 16)
            }
            Transport::Udp { claimed_len } => {
                let len = claimed_len.unwrap_or((8 + self.payload.len()) as u16);
                let mut h = Vec::with_capacity(8 + self.payload.len());
                h.extend_from_slice(&self.src.port().to_be_bytes());
                h.extend_from_slice(&self.dst.port().to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
                h.extend_from_slice(&self.payload);
                self.finish_checksum(h, 6)
            }
        };
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, self.protonum(), 0, 0];
        ip.extend_from_slice(&self.src.ip().octets());
        ip.extend_from_slice(&self.dst.ip().octets());
        ip.extend_from_slice(&l4);
        ip
    }

    fn finish_checksum(&self, mut l4: Vec<u8>, at: usize) -> Vec<u8> {
        let mut pseudo = Vec::with_capacity(12 + l4.len());
        pseudo.extend_from_slice(&self.src.ip().octets());
        pseudo.extend_from_slice(&self.dst.ip().octets());
        pseudo.extend_from_slice(&[0, self.protonum()]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(&l4);
        let sum = transport_checksum(&pseudo, self.bad_checksum);
        l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        l4
    }
}

/// The checksum of a transport header over `summed` (its pseudo-header, then the segment),
/// or, when `bad`, one that is wrong on purpose.
pub fn transport_checksum(summed: &[u8], bad: bool) -> u16 {
    match (bad, internet_checksum(summed)) {
        // 0 and 0xffff are the same number in ones' complement: keep away from both.
        (true, 0 | 0xffff) => 0x1234,
        (true, good) => !good,
        // In UDP an all-zero checksum means "none"; send the equivalent 0xffff instead.
        (false, 0) => 0xffff,
        (false, good) => good,
    }
}

/// RFC 1071 ones'-complement sum.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP flags as a set of the letters tcpdump uses (F S R P A U E C), for order-free
/// comparison with the tracer's `tcp.flags` string.
pub fn flag_letters(flags: u8) -> BTreeSet<char> {
    "FSRPAUEC"
        .chars()
        .enumerate()
        .filter(|(bit, _)| flags & (1 << bit) != 0)
        .map(|(_, c)| c)
        .collect()
}

/// A raw IPv4 socket living in one namespace.
pub struct RawSender {
    fd: OwnedFd,
}

impl RawSender {
    pub fn open(ns: &Netns) -> Result<RawSender> {
        let fd = ns
            .run(|| {
                // SAFETY: plain socket(2); the fd is owned right away.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_INET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        libc::IPPROTO_RAW,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })?
            .with_context(|| format!("raw socket in {}", ns.name()))?;
        Ok(RawSender { fd })
    }

    /// Gives every packet sent from now on the firewall mark `mark` (SO_MARK).
    pub fn set_mark(&self, mark: u32) -> Result<()> {
        // SAFETY: setsockopt(2) with a pointer to a live u32 and its size.
        let r = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error()).context("setsockopt SO_MARK");
        }
        Ok(())
    }

    pub fn send(&self, packet: &Packet) -> Result<()> {
        let bytes = packet.bytes();
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(packet.dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: buffer and address are valid for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("send {}", packet.describe()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_valid_tcp_segment_verifies_to_zero() {
        let p = Packet::tcp(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:40000".parse().unwrap(),
            7,
            9,
            ACK | PSH,
            b"hello".to_vec(),
        );
        let bytes = p.bytes();
        let l4 = &bytes[20..];
        let mut pseudo = vec![10, 0, 0, 2, 10, 0, 0, 1, 0, 6];
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(l4);
        assert_eq!(internet_checksum(&pseudo), 0);
    }

    #[test]
    fn flag_letters_are_order_free() {
        assert_eq!(flag_letters(ACK | PSH), "PA".chars().collect());
        assert_eq!(flag_letters(SYN | RST), "RS".chars().collect());
    }
}
