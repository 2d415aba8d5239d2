//! The bench's side of the flood cases: the flooder itself is `testbed::flood`; here, the
//! agents' memory while it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

pub use testbed::flood::{Flooder, Kind, Sent};

/// VmRSS of process `pid` in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Samples the VmRSS of `pids` every 100 ms until `stop`: the largest value seen of each.
pub fn sample_rss(pids: Vec<u32>, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Option<u64>>> {
    std::thread::spawn(move || {
        let mut max: Vec<Option<u64>> = vec![None; pids.len()];
        loop {
            for (m, pid) in max.iter_mut().zip(&pids) {
                if let Some(v) = rss_kib(*pid) {
                    *m = Some(m.map_or(v, |m| m.max(v)));
                }
            }
            if stop.load(Ordering::SeqCst) {
                return max;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}
