//! A real TCP connection through the Service DNAT, and the exact sequence numbers of both
//! ends, read with TCP_REPAIR so forged segments can be placed precisely relative to the
//! live window.

use std::io::{self, Read, Write};
use std::net::{SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::topology::{Service, Topology};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Client receive buffer. Small on purpose: conntrack's lower window bound is
/// `td_end - receiver.td_maxwin`, so with a ~16 KiB window a few hundred KiB of traffic
/// leave early bytes far enough behind to count as "already ACKed data retransmitted".
pub const SMALL_RCVBUF: i32 = 8 * 1024;

pub struct Flow {
    pub service: Service,
    /// The client's own address (10.0.0.1:ephemeral).
    pub client_addr: SocketAddrV4,
    pub client: TcpStream,
    pub server: TcpStream,
}

/// Both ends' next sequence numbers at a quiet moment (nothing in flight).
#[derive(Clone, Copy, Debug)]
pub struct Seqs {
    /// Next byte the backend will send (= what the client expects next).
    pub server_next: u32,
    /// Next byte the client will send (= what the backend expects next).
    pub client_next: u32,
}

impl Flow {
    pub fn open(topo: &Topology, service: Service) -> Result<Flow> {
        let listener = topo
            .server
            .run(|| TcpListener::bind(service.backend))?
            .with_context(|| format!("listen on {}", service.backend))?;
        let client = topo
            .client
            .run(|| connect(service.vip, SMALL_RCVBUF))?
            .with_context(|| {
                format!(
                    "connect to Service {} (DNAT to {})",
                    service.vip, service.backend
                )
            })?;
        let server = accept(&listener)?;
        for s in [&client, &server] {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
        }
        let client_addr = match client.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => bail!("client bound to non-IPv4 {other}"),
        };
        Ok(Flow {
            service,
            client_addr,
            client,
            server,
        })
    }

    /// Request/response of `n` bytes each way, content verified: proves the connection
    /// (and its DNAT) still works.
    pub fn exchange(&mut self, n: usize) -> Result<()> {
        let request = pattern(n, 7);
        self.client.write_all(&request).context("client write")?;
        let mut got = vec![0; n];
        self.server.read_exact(&mut got).context("server read")?;
        ensure!(got == request, "request corrupted in transit");
        let response = pattern(n, 13);
        self.server.write_all(&response).context("server write")?;
        self.client.read_exact(&mut got).context("client read")?;
        ensure!(got == response, "response corrupted in transit");
        Ok(())
    }

    /// The backend streams `n` bytes to the client, which reads and verifies them.
    pub fn bulk_to_client(&mut self, n: usize) -> Result<()> {
        let data = pattern(n, 3);
        let server = &mut self.server;
        let client = &mut self.client;
        std::thread::scope(|s| -> Result<()> {
            let writer = s.spawn(|| server.write_all(&data));
            let mut got = vec![0; n];
            let read = client.read_exact(&mut got).context("client bulk read");
            writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))?
                .context("server bulk write")?;
            read?;
            ensure!(got == data, "bulk data corrupted in transit");
            Ok(())
        })
    }

    /// Waits until neither end has unacknowledged data, then reads both ends' sequence
    /// numbers and cross-checks them (the client's next byte is what the server expects).
    pub fn seqs(&self) -> Result<Seqs> {
        quiet_seqs(&self.client, &self.server)
    }

    /// Segments the backend's stack retransmitted over the connection's life.
    pub fn server_retransmits(&self) -> Result<u32> {
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: info/len describe a valid writable buffer.
        let rc = unsafe {
            libc::getsockopt(
                self.server.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("TCP_INFO");
        }
        Ok(info.tcpi_total_retrans)
    }
}

/// `Flow::seqs` for any connection, given both of its ends.
pub fn quiet_seqs(client: &TcpStream, server: &TcpStream) -> Result<Seqs> {
    let [(client_next, client_expects), (server_next, server_expects)] =
        quiet_ends(client, server)?;
    ensure!(
        server_next == client_expects && client_next == server_expects,
        "ends disagree: server snd {server_next} rcv {server_expects}, client snd {client_next} rcv {client_expects}"
    );
    Ok(Seqs {
        server_next,
        client_next,
    })
}

/// Each end's (next byte it sends, next byte it expects), client first, once neither has
/// unacknowledged data. Not cross-checked: behind a NAT helper that changed a payload's
/// length the two ends count in sequence spaces that differ by that change.
pub fn quiet_ends(client: &TcpStream, server: &TcpStream) -> Result<[(u32, u32); 2]> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while outq(client)? + outq(server)? > 0 {
        ensure!(
            Instant::now() < deadline,
            "connection did not go quiet within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok([repair_seqs(client)?, repair_seqs(server)?])
}

/// A recognisable byte pattern, so corruption or misordering shows.
fn pattern(n: usize, salt: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * salt + i / 251) % 251) as u8).collect()
}

/// connect(2) with the receive buffer set before the handshake (it fixes the window scale)
/// and a bounded wait (SO_SNDTIMEO also bounds a blocking connect).
fn connect(to: SocketAddrV4, rcvbuf: i32) -> io::Result<TcpStream> {
    // SAFETY: plain socket(2); ownership moves into TcpStream right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf)?;
    let timeout = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &timeout)?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// The connection is established once connect() returned, but the backend's stack may
/// still be processing the handshake's last ACK: poll the accept queue briefly.
pub fn accept(listener: &TcpListener) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn getsockopt_u32(fd: i32, level: i32, name: i32) -> io::Result<u32> {
    let mut value = 0u32;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: value/len describe a valid writable u32.
    let rc =
        unsafe { libc::getsockopt(fd, level, name, (&mut value as *mut u32).cast(), &mut len) };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(value)
    }
}

/// Bytes written but not yet acknowledged by the peer (SIOCOUTQ).
fn outq(stream: &TcpStream) -> Result<u32> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
        return Err(io::Error::last_os_error()).context("SIOCOUTQ");
    }
    Ok(n as u32)
}

/// `struct tcp_repair_window` (linux/tcp.h), what TCP_REPAIR_WINDOW reads.
#[repr(C)]
#[derive(Default)]
struct RepairWindow {
    snd_wl1: u32,
    snd_wnd: u32,
    max_window: u32,
    rcv_wnd: u32,
    rcv_wup: u32,
}

impl Flow {
    /// The right edge of the receive window the client last advertised: the ACK it sent
    /// (`rcv_wup`) plus that window (`rcv_wnd`, already a multiple of the scale). Linux never
    /// shrinks an advertised window, so on a quiet connection this is the furthest any
    /// backend byte may reach.
    pub fn client_window_end(&self) -> Result<u32> {
        let w = in_repair(&self.client, |fd| {
            let mut w = RepairWindow::default();
            let mut len = std::mem::size_of::<RepairWindow>() as libc::socklen_t;
            // SAFETY: w/len describe a valid writable tcp_repair_window.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_REPAIR_WINDOW,
                    (&mut w as *mut RepairWindow).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(w)
        })
        .context("TCP_REPAIR_WINDOW")?;
        Ok(w.rcv_wup.wrapping_add(w.rcv_wnd))
    }
}

/// (write_seq, rcv_nxt) of a quiet socket. TCP_REPAIR is the only interface that exposes
/// them.
fn repair_seqs(stream: &TcpStream) -> Result<(u32, u32)> {
    const TCP_RECV_QUEUE: i32 = 1;
    const TCP_SEND_QUEUE: i32 = 2;
    in_repair(stream, |fd| {
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_QUEUE,
            &TCP_SEND_QUEUE,
        )?;
        let snd = getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
        setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_QUEUE,
            &TCP_RECV_QUEUE,
        )?;
        let rcv = getsockopt_u32(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
        Ok((snd, rcv))
    })
    .context("TCP_QUEUE_SEQ")
}

/// Runs `read` on the socket in repair mode, left again with TCP_REPAIR_OFF_NO_WP so no
/// window probe goes out.
fn in_repair<T>(stream: &TcpStream, read: impl FnOnce(i32) -> io::Result<T>) -> Result<T> {
    const TCP_REPAIR_ON: i32 = 1;
    const TCP_REPAIR_OFF_NO_WP: i32 = -1;
    let fd = stream.as_raw_fd();
    setsockopt(fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &TCP_REPAIR_ON).context("TCP_REPAIR on")?;
    let read = read(fd);
    setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR,
        &TCP_REPAIR_OFF_NO_WP,
    )
    .context("TCP_REPAIR off")?;
    Ok(read?)
}
