//! tcpdump on one interface of a network namespace: what crossed a link, as the frames of a
//! pcap file (the encryption tests look for plaintext markers on the link between the nodes).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running tcpdump writing `path`; stopped by [`Tcpdump::stop`] (killed, and the file
/// removed, on drop).
pub struct Tcpdump {
    child: Option<Child>,
    path: PathBuf,
}

impl Tcpdump {
    /// Starts tcpdump on `iface` in netns `ns`, writing `path`; the capture runs when this
    /// returns (tcpdump said "listening on"). Immediate mode: without it packets wait in the
    /// kernel's ring block (up to a second) and those of the last block are lost at the stop.
    pub fn start(ns: &str, iface: &str, path: &Path) -> Tcpdump {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "tcpdump", "-i", iface, "-n", "-U"])
            .args(["--immediate-mode", "-s", "0", "-Z", "root", "-w"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (Debian package tcpdump)");
        let mut stderr = child.stderr.take().expect("tcpdump's stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("listening on") {
                    let _ = tx.send(());
                }
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("tcpdump did not start listening within 5 s");
        Tcpdump {
            child: Some(child),
            path: path.to_owned(),
        }
    }

    /// Stops tcpdump (SIGINT: it flushes the file) and returns the frames it captured.
    pub fn stop(mut self) -> Vec<Vec<u8>> {
        let mut child = self.child.take().expect("running");
        // Let the last packets reach the capture.
        std::thread::sleep(Duration::from_millis(200));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        let status = child.wait().expect("tcpdump");
        assert!(status.success(), "tcpdump: {status}");
        read_pcap(&std::fs::read(&self.path).expect("the pcap file"))
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The frames of a pcap file (microsecond or nanosecond timestamps, little-endian, Ethernet,
/// as tcpdump writes on a veth).
pub fn read_pcap(b: &[u8]) -> Vec<Vec<u8>> {
    assert!(b.len() >= 24, "pcap too short: {} bytes", b.len());
    let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    let magic = word(0);
    assert!(
        matches!(magic, 0xa1b2_c3d4 | 0xa1b2_3c4d),
        "pcap magic {magic:#x}"
    );
    assert_eq!(word(20), 1, "link type: Ethernet");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let len = word(at + 8) as usize;
        at += 16;
        frames.push(b[at..(at + len).min(b.len())].to_vec());
        at += len;
    }
    frames
}

/// Whether any frame holds `needle`.
pub fn contains(frames: &[Vec<u8>], needle: &[u8]) -> bool {
    frames
        .iter()
        .any(|f| f.windows(needle.len()).any(|w| w == needle))
}
