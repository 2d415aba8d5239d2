//! The raw sockets through which the agent sends its own datagrams from a workload's netns:
//! UDP control datagrams (with the control mark, which the rules let pass), the application
//! datagrams it held during a UDP handshake (with the AUTH mark, which the rules save into the
//! connmark), and bound SYN-ACK controls (both marks: they pass, and mark their flow). Created
//! inside the netns by a short-lived thread, like the queue's socket, so they send from that
//! netns for as long as they live.

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto,
    setsockopt, socket, sockopt,
};

use super::ShellError;
use crate::packet::IpDatagram;
use crate::udp::EmitMark;

/// Raw sockets (`IPPROTO_RAW`: the packet carries its own IP header) in one workload's netns:
/// for IPv4 and IPv6, one per mark, each with its mark set once when opened, so a send is one
/// system call (setting `SO_MARK` before each send was a second).
#[derive(Debug)]
pub struct Injector {
    control: Family,
    authorized: Family,
    /// Both bits: a bound SYN-ACK control that marks its flow as it leaves.
    control_authorized: Family,
}

/// An IPv4 and an IPv6 raw socket with one mark.
#[derive(Debug)]
struct Family {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl Family {
    fn open(mark: u32) -> Result<Family, ShellError> {
        let raw = |family| -> Result<OwnedFd, ShellError> {
            let fd = socket(
                family,
                SockType::Raw,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                SockProtocol::Raw,
            )
            .map_err(|e| ShellError::RawOpen(e.into()))?;
            setsockopt(&fd, sockopt::Mark, &mark).map_err(|e| ShellError::RawOpen(e.into()))?;
            Ok(fd)
        };
        Ok(Family {
            v4: raw(AddressFamily::Inet)?,
            v6: raw(AddressFamily::Inet6)?,
        })
    }
}

impl Injector {
    /// Open the sockets from a thread inside the workload's namespace (where they stay).
    /// `auth_mark` is the AUTH bit of the rules.
    pub fn open_here(auth_mark: u32) -> Result<Injector, ShellError> {
        Ok(Injector {
            control: Family::open(crate::control_mark(auth_mark))?,
            authorized: Family::open(auth_mark)?,
            control_authorized: Family::open(crate::control_mark(auth_mark) | auth_mark)?,
        })
    }

    /// Send one whole IP packet with the mark `mark` asks for, routed by its destination. A
    /// full socket buffer (EAGAIN) is an error the caller counts: the packet is lost, as on a
    /// congested link, and the handshake's retransmissions recover.
    pub fn send(&self, packet: &[u8], mark: EmitMark) -> Result<(), ShellError> {
        let d = IpDatagram::parse(packet).map_err(|e| {
            ShellError::Raw(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        let family = match mark {
            EmitMark::Control => &self.control,
            EmitMark::Authorized => &self.authorized,
            EmitMark::ControlAuthorized => &self.control_authorized,
        };
        let sent = match d.dst {
            IpAddr::V4(dst) => sendto(
                family.v4.as_raw_fd(),
                packet,
                &SockaddrIn::from(SocketAddrV4::new(dst, 0)),
                MsgFlags::MSG_DONTWAIT,
            ),
            IpAddr::V6(dst) => sendto(
                family.v6.as_raw_fd(),
                packet,
                &SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0)),
                MsgFlags::MSG_DONTWAIT,
            ),
        };
        match sent {
            Ok(n) if n == packet.len() => Ok(()),
            Ok(n) => Err(ShellError::Raw(std::io::Error::other(format!(
                "short raw send: {n} of {} bytes",
                packet.len()
            )))),
            Err(e) => Err(ShellError::Raw(e.into())),
        }
    }
}
