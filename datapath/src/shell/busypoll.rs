//! Adaptive busy polling of the queue sockets before the agent's thread sleeps.
//!
//! A connection's handshake puts a packet on a queue every few tens of microseconds, and each
//! time the agent's thread has gone to sleep in between. On a virtual machine whose idle vCPU
//! halts at once, every such wake-up is an exit to the hypervisor and back: the bench measured
//! each microsecond spent in user space costing about two (bench/README.md). [`BusyPoll`] lets
//! the thread look at the queues for a short while before it sleeps, but only while packets
//! are coming (one in the last [`BusyPoll::window`]), and yielding the CPU at every turn, so a
//! runnable workload on the same CPU always goes first: it spins where the CPU would otherwise
//! halt, as the guest kernel's halt polling does.
//!
//! Spins that do not pay are not repeated: after [`MISSES_TO_BACK_OFF`] spins in a row found
//! nothing, the next [`BACK_OFF_PARKS`] sleeps are taken at once (one probe spin after them),
//! so a steady trickle of packets that always arrive too late costs at most one spin in 64.
//!
//! It is a separate level-triggered epoll set over the same sockets tokio watches: when a spin
//! sees a socket readable, it returns and tokio's own (edge-triggered) poll finds the event
//! without sleeping.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::ShellError;

/// Busy polling of the registered queue sockets (see the module documentation).
#[derive(Debug)]
pub struct BusyPoll {
    epoll: Epoll,
    /// The longest one spin lasts.
    budget: Duration,
    /// Spin only if a packet was handled this recently.
    window: Duration,
    start: Instant,
    /// Nanoseconds after `start` of the last [`BusyPoll::touch`].
    last_ns: AtomicU64,
    spins: AtomicU64,
    hits: AtomicU64,
    /// Spins in a row that found nothing.
    misses: AtomicU64,
    /// Sleeps still to take without spinning (backing off).
    skip: AtomicU64,
}

/// Spins in a row that find nothing before [`BusyPoll`] backs off.
pub const MISSES_TO_BACK_OFF: u64 = 4;
/// Sleeps taken without spinning when backing off.
pub const BACK_OFF_PARKS: u64 = 64;

/// What a [`BusyPoll`] did: spins started, and those that found a packet before their budget
/// ran out (the sleeps and wake-ups they saved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BusyPollStats {
    pub spins: u64,
    pub hits: u64,
}

impl BusyPoll {
    /// Spins of at most `budget`, while a packet came in the last `window`.
    pub fn new(budget: Duration, window: Duration) -> Result<BusyPoll, ShellError> {
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| ShellError::Queue(e.into()))?;
        Ok(BusyPoll {
            epoll,
            budget,
            window,
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
            spins: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            skip: AtomicU64::new(0),
        })
    }

    /// Watch a queue socket (level-triggered: readable means a packet waits).
    pub fn add(&self, fd: BorrowedFd<'_>) -> Result<(), ShellError> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0))
            .map_err(|e| ShellError::Queue(e.into()))
    }

    /// Stop watching a queue socket (closing its last descriptor does it too).
    pub fn remove(&self, fd: BorrowedFd<'_>) {
        let _ = self.epoll.delete(fd);
    }

    /// A packet was handled now.
    pub fn touch(&self) {
        self.last_ns.store(self.elapsed_ns(), Ordering::Relaxed);
    }

    fn elapsed_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Called just before the thread sleeps: if packets are coming, look at the queues until
    /// one is readable or the budget is spent, yielding the CPU between looks.
    pub fn spin(&self) {
        let now = self.elapsed_ns();
        let last = self.last_ns.load(Ordering::Relaxed);
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        if self.budget.is_zero() || now.saturating_sub(last) > window {
            return;
        }
        // One thread parks at a time (the agent's runtime has one): plain loads and stores.
        let skip = self.skip.load(Ordering::Relaxed);
        if skip > 0 {
            self.skip.store(skip - 1, Ordering::Relaxed);
            return;
        }
        self.spins.fetch_add(1, Ordering::Relaxed);
        if self.poll_until(Instant::now() + self.budget) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            self.misses.store(0, Ordering::Relaxed);
        } else {
            let misses = self.misses.load(Ordering::Relaxed) + 1;
            if misses >= MISSES_TO_BACK_OFF {
                self.misses.store(0, Ordering::Relaxed);
                self.skip.store(BACK_OFF_PARKS, Ordering::Relaxed);
            } else {
                self.misses.store(misses, Ordering::Relaxed);
            }
        }
    }

    /// Whether a socket became readable before `until`.
    fn poll_until(&self, until: Instant) -> bool {
        let mut events = [EpollEvent::empty(); 1];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
                Ok(n) if n > 0 => return true,
                Ok(_) => {}
                // EINTR or a closed set: sleep as usual.
                Err(_) => return false,
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::yield_now();
        }
    }

    pub fn stats(&self) -> BusyPollStats {
        BusyPollStats {
            spins: self.spins.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    /// No spin without recent packets; a spin ends at once when a socket is readable, and at
    /// its budget when none is.
    #[test]
    fn spins_only_while_packets_come_and_ends_on_a_readable_socket() {
        let bp = BusyPoll::new(Duration::from_millis(2), Duration::from_millis(50)).unwrap();
        let (a, b) = UnixDatagram::pair().unwrap();
        bp.add(b.as_fd()).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        bp.spin();
        assert_eq!(bp.stats(), BusyPollStats::default(), "idle: no spin");
        bp.touch();
        let t = Instant::now();
        bp.spin();
        assert!(t.elapsed() >= Duration::from_millis(2));
        assert_eq!(bp.stats(), BusyPollStats { spins: 1, hits: 0 });
        a.send(b"x").unwrap();
        bp.touch();
        bp.spin();
        assert_eq!(bp.stats(), BusyPollStats { spins: 2, hits: 1 });
        bp.remove(b.as_fd());
        let t = Instant::now();
        bp.spin();
        assert!(t.elapsed() >= Duration::from_millis(2), "removed: not seen");
    }

    /// Spins that keep missing stop for a while, then one probes again.
    #[test]
    fn spins_that_do_not_pay_back_off() {
        let bp = BusyPoll::new(Duration::from_micros(100), Duration::from_secs(60)).unwrap();
        bp.touch();
        for _ in 0..MISSES_TO_BACK_OFF + BACK_OFF_PARKS {
            bp.spin();
        }
        assert_eq!(bp.stats().spins, MISSES_TO_BACK_OFF, "backed off");
        bp.spin();
        assert_eq!(bp.stats().spins, MISSES_TO_BACK_OFF + 1, "probed again");
    }
}
