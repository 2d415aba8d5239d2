//! The raw sockets through which the agent sends its own datagrams from a workload's netns:
//! UDP control datagrams (with the control mark, which the rules let pass) and the
//! application datagrams it held during a UDP handshake (with the AUTH mark, which the rules
//! save into the connmark). Created inside the netns by a short-lived thread, like the queue's
//! socket, so they send from that netns for as long as they live.

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto,
    setsockopt, socket, sockopt,
};

use super::ShellError;
use crate::packet::IpDatagram;
use crate::udp::EmitMark;

/// An IPv4 and an IPv6 raw socket (`IPPROTO_RAW`: the packet carries its own IP header) in one
/// workload's netns.
#[derive(Debug)]
pub struct Injector {
    v4: OwnedFd,
    v6: OwnedFd,
    auth_mark: u32,
    control_mark: u32,
}

impl Injector {
    /// Open the sockets from a thread inside the workload's namespace (where they stay).
    /// `auth_mark` is the AUTH bit of the rules.
    pub fn open_here(auth_mark: u32) -> Result<Injector, ShellError> {
        let raw = |family| {
            socket(
                family,
                SockType::Raw,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                SockProtocol::Raw,
            )
            .map_err(|e| ShellError::RawOpen(e.into()))
        };
        Ok(Injector {
            v4: raw(AddressFamily::Inet)?,
            v6: raw(AddressFamily::Inet6)?,
            auth_mark,
            control_mark: crate::control_mark(auth_mark),
        })
    }

    /// Send one whole IP packet with the mark `mark` asks for, routed by its destination. A
    /// full socket buffer (EAGAIN) is an error the caller counts: the packet is lost, as on a
    /// congested link, and the handshake's retransmissions recover.
    pub fn send(&self, packet: &[u8], mark: EmitMark) -> Result<(), ShellError> {
        let d = IpDatagram::parse(packet).map_err(|e| {
            ShellError::Raw(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        let mark = match mark {
            EmitMark::Control => self.control_mark,
            EmitMark::Authorized => self.auth_mark,
        };
        let sent = match d.dst {
            IpAddr::V4(dst) => {
                setsockopt(&self.v4, sockopt::Mark, &mark)
                    .map_err(|e| ShellError::Raw(e.into()))?;
                sendto(
                    self.v4.as_raw_fd(),
                    packet,
                    &SockaddrIn::from(SocketAddrV4::new(dst, 0)),
                    MsgFlags::MSG_DONTWAIT,
                )
            }
            IpAddr::V6(dst) => {
                setsockopt(&self.v6, sockopt::Mark, &mark)
                    .map_err(|e| ShellError::Raw(e.into()))?;
                sendto(
                    self.v6.as_raw_fd(),
                    packet,
                    &SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, 0)),
                    MsgFlags::MSG_DONTWAIT,
                )
            }
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
