//! Raw layer-2 access to one interface through an AF_PACKET socket: every frame the
//! interface receives (ARP, IPv4, IPv6 alike), and frames written out of it unchanged.
//! This is the only module with `unsafe`: the socket calls have no safe wrapper in std,
//! and each block below is one libc call on buffers and structs owned right there.

use std::ffi::CString;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

// From <linux/if_packet.h>; libc does not export these two.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_OUTGOING: u8 = 4;

pub struct PacketSocket {
    fd: OwnedFd,
    pub name: String,
}

/// What `recv` found.
pub enum Recv {
    Frame(usize),
    /// Nothing left to read now.
    Empty,
    /// A frame this socket sent itself, or one larger than the buffer: skip it.
    Skip,
}

impl PacketSocket {
    /// Opens a socket bound to interface `name`, non-blocking, with a large receive
    /// buffer so bursts wait in the kernel rather than being dropped there.
    pub fn open(name: &str) -> io::Result<Self> {
        let cname = CString::new(name).map_err(|_| invalid(name))?;
        // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface {name:?} in this network namespace"),
            ));
        }
        // Protocol 0 at creation receives nothing; bind below sets ETH_P_ALL for this
        // interface only, so no frame of another interface is ever queued here.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a socket we just opened and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = PacketSocket {
            fd,
            name: name.to_string(),
        };
        // Our own writes must not come back to us as input.
        sock.setsockopt(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)?;
        sock.setsockopt(libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20)?;
        sock.setsockopt(libc::SOL_SOCKET, libc::SO_SNDBUF, 8 << 20)?;

        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: addr lives across the call and the length is its size.
        let rc = unsafe {
            libc::bind(
                sock.raw(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sock)
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn fd(&self) -> RawFd {
        self.raw()
    }

    fn setsockopt(
        &self,
        level: libc::c_int,
        opt: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: value lives across the call and the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.raw(),
                level,
                opt,
                &value as *const libc::c_int as *const libc::c_void,
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame into `buf`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Recv> {
        // SAFETY: as above, zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // MSG_TRUNC makes the result the frame's real length, so an oversized frame is
        // seen as such instead of being forwarded cut short.
        // SAFETY: buf and from are valid for writes of the lengths given.
        let n = unsafe {
            libc::recvfrom(
                self.raw(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_TRUNC,
                &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(Recv::Empty),
                io::ErrorKind::Interrupted => Ok(Recv::Skip),
                _ => Err(err),
            };
        }
        let n = n as usize;
        // Kernels before 4.20 ignore PACKET_IGNORE_OUTGOING; check the packet type too.
        if from.sll_pkttype == PACKET_OUTGOING || n > buf.len() {
            return Ok(Recv::Skip);
        }
        Ok(Recv::Frame(n))
    }

    /// Writes one frame out of the interface, unchanged.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.raw(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Frames the kernel dropped for this socket since the last call (its receive
    /// buffer was full): reported so an overloaded wire cannot pass for a lossy link.
    pub fn kernel_drops(&self) -> u64 {
        // SAFETY: tpacket_stats is plain old data; zero is valid.
        let mut stats: libc::tpacket_stats = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: stats and len are valid for writes of the lengths given.
        let rc = unsafe {
            libc::getsockopt(
                self.raw(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut stats as *mut libc::tpacket_stats as *mut libc::c_void,
                &mut len,
            )
        };
        if rc < 0 {
            0
        } else {
            u64::from(stats.tp_drops)
        }
    }
}

fn invalid(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("bad interface name {name:?}"),
    )
}

/// Waits until one of `fds` is readable or `timeout_ms` passes (-1: forever). Returns
/// the readiness of each; an interrupted wait (a signal) returns all false.
pub fn poll(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: pfds is a valid array of its length for the duration of the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}
