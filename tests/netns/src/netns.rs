//! Running code inside a named network namespace: a thread that `setns`es into
//! `/run/netns/NAME` (only that thread moves; sockets it creates stay in that netns).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};

fn enter(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// Runs `f` on a new thread inside netns `ns` and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_netns(ns, f).join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Starts `f` on a new thread inside netns `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
}

/// Connects from inside netns `ns` to `addr` with a connect timeout. The stream is usable from
/// any thread. Read/write timeouts are set to `timeout` too.
pub fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_netns(ns, move || {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(s)
    })
}

/// Sends one byte and reads the echo back; returns an error if the echo does not come.
pub fn echo_once(s: &mut TcpStream, byte: u8) -> io::Result<()> {
    s.write_all(&[byte])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != byte {
        return Err(io::Error::other(format!(
            "echo returned {:#x}, sent {byte:#x}",
            b[0]
        )));
    }
    Ok(())
}

/// How an [`EchoServer`] serves its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// A thread per connection: echoes everything until EOF (tests; many at once).
    Threaded,
    /// On the accept thread, one connection after the other: echoes until EOF (benchmark loop,
    /// one client: no thread creation per connection).
    Inline,
    /// `n` accept threads on one listener, each serving like [`Serve::Inline`] (benchmark loop
    /// with `n` concurrent clients).
    Pool(usize),
    /// On the accept thread: reads and discards until EOF, then writes one byte (throughput).
    Sink,
}

/// A TCP echo server listening on `0.0.0.0:port` (or `[::]:port`, dual-stack) inside a netns;
/// counts accepted connections (`accept()` returned in the application). Stopped on drop.
pub struct EchoServer {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    port: u16,
}

impl EchoServer {
    /// Starts listening on `0.0.0.0:port` inside `ns` (the listener exists when this returns).
    pub fn start(ns: &str, port: u16, serve: Serve) -> EchoServer {
        let listener = in_netns(ns, move || {
            TcpListener::bind(("0.0.0.0", port))
                .unwrap_or_else(|e| panic!("bind 0.0.0.0:{port} in netns: {e}"))
        });
        Self::serve_on(listener, port, serve)
    }

    /// Starts listening on `[::]:port` with `IPV6_V6ONLY` off inside `ns`: one listener for
    /// IPv6 and IPv4 (seen as v4-mapped) clients.
    pub fn start_dual(ns: &str, port: u16, serve: Serve) -> EchoServer {
        let listener = in_netns(ns, move || {
            bind_dual(port).unwrap_or_else(|e| panic!("bind [::]:{port} (dual) in netns: {e}"))
        });
        Self::serve_on(listener, port, serve)
    }

    fn serve_on(listener: TcpListener, port: u16, serve: Serve) -> EchoServer {
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = match serve {
            Serve::Pool(n) => n.max(1),
            _ => 1,
        };
        for _ in 0..threads {
            let l = listener.try_clone().expect("clone listener");
            let (a, st) = (accepted.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(l, a, st, serve));
        }
        EchoServer {
            accepted,
            stop,
            listener,
            port,
        }
    }

    /// How many connections the application has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutdown() of a listening socket wakes a blocked accept() with EINVAL.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
    }
}

/// A listening TCP socket on `[::]:port` that accepts IPv4 too (v6only off, whatever the
/// netns's `net.ipv6.bindv6only` says).
fn bind_dual(port: u16) -> nix::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    let addr = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(addr))?;
    listen(&fd, Backlog::new(1024)?)?;
    Ok(TcpListener::from(fd))
}

fn accept_loop(l: TcpListener, accepted: Arc<AtomicUsize>, stop: Arc<AtomicBool>, serve: Serve) {
    loop {
        let conn = l.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((s, _)) = conn else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        accepted.fetch_add(1, Ordering::SeqCst);
        let _ = s.set_nodelay(true);
        match serve {
            Serve::Threaded => {
                std::thread::spawn(move || echo(s));
            }
            Serve::Inline | Serve::Pool(_) => echo(s),
            Serve::Sink => sink(s),
        }
    }
}

fn echo(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

fn sink(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = vec![0u8; 1 << 18];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.write_all(&[1]);
                break;
            }
            Err(_) => break,
            Ok(_) => {}
        }
    }
}
