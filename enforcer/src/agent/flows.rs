//! Flow records on the agent's side (docs/flow-log.md): the hub the processor's records are
//! drained into, and what it feeds: JSON lines to a file or stdout (`--flow-log`, written on a
//! thread of its own behind a bounded queue), a ring of the last [`RING_RECORDS`] records, and
//! the followers of `GET /flows` (each behind a bounded buffer; a client that falls behind it is
//! dropped and counted). The filters of `tessera flows` are here too, shared by the endpoint
//! (which applies them) and the command (which sends them).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use datapath::Processor;
use datapath::flowlog::{self, FlowRecord, FlowVerdict};
use policy::Protocol;
use tokio::sync::{broadcast, watch};

use super::lock;

/// Records the ring keeps for `GET /flows`.
pub const RING_RECORDS: usize = 10_000;
/// Records a follower may fall behind before it is dropped.
pub const CLIENT_BUFFER: usize = 2048;
/// Followers at once; more are refused (503).
pub const MAX_FOLLOWERS: usize = 32;
/// Batches the file writer may have queued; more are dropped and counted.
const FILE_QUEUE_BATCHES: usize = 256;
/// How often the processor's records are drained.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// One published record and its JSON line (newline included).
#[derive(Debug)]
pub struct Entry {
    pub record: FlowRecord,
    pub line: String,
}

/// Where `--flow-log` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowSink {
    Stdout,
    File(PathBuf),
}

impl FlowSink {
    /// `-` is stdout; anything else a file path.
    pub fn parse(s: &str) -> FlowSink {
        if s == "-" {
            FlowSink::Stdout
        } else {
            FlowSink::File(PathBuf::from(s))
        }
    }
}

/// Counters of the hub, for /metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    pub published: AtomicU64,
    pub followers: AtomicUsize,
    pub followers_dropped: AtomicU64,
    pub followers_refused: AtomicU64,
    pub file_written: AtomicU64,
    pub file_dropped: AtomicU64,
    pub file_errors: AtomicU64,
}

struct Ring {
    entries: VecDeque<Arc<Entry>>,
    capacity: usize,
}

/// Where drained records go (see the module documentation).
pub struct FlowHub {
    ring: Mutex<Ring>,
    tx: broadcast::Sender<Arc<Entry>>,
    file: Option<std::sync::mpsc::SyncSender<Vec<Arc<Entry>>>>,
    pub stats: Arc<HubStats>,
}

impl FlowHub {
    /// A hub keeping `capacity` records, its followers `client_buffer` behind at most, writing
    /// to `sink` if given (a file is opened, for appending, here: an error names it).
    pub fn new(capacity: usize, client_buffer: usize, sink: Option<&FlowSink>) -> Result<FlowHub> {
        let stats = Arc::new(HubStats::default());
        let file = match sink {
            None => None,
            Some(sink) => Some(spawn_writer(sink, stats.clone())?),
        };
        let (tx, _) = broadcast::channel(client_buffer.max(1));
        Ok(FlowHub {
            ring: Mutex::new(Ring {
                entries: VecDeque::with_capacity(capacity.min(RING_RECORDS)),
                capacity,
            }),
            tx,
            file,
            stats,
        })
    }

    /// Publish drained records, in order: ring, followers, file. Never waits.
    pub fn publish(&self, records: Vec<FlowRecord>) {
        if records.is_empty() {
            return;
        }
        let entries: Vec<Arc<Entry>> = records
            .into_iter()
            .filter_map(|record| match serde_json::to_string(&record) {
                Ok(mut line) => {
                    line.push('\n');
                    Some(Arc::new(Entry { record, line }))
                }
                Err(e) => {
                    tracing::debug!("flow record not serializable: {e}");
                    None
                }
            })
            .collect();
        self.stats
            .published
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        {
            // Followers subscribe under this lock too: each record is in a follower's backlog
            // or in its live stream, never both, never neither.
            let mut ring = lock(&self.ring);
            for e in &entries {
                if ring.entries.len() >= ring.capacity {
                    ring.entries.pop_front();
                }
                if ring.capacity > 0 {
                    ring.entries.push_back(e.clone());
                }
                // No follower: nothing to do.
                let _ = self.tx.send(e.clone());
            }
        }
        if let Some(file) = &self.file {
            let n = entries.len() as u64;
            if file.try_send(entries).is_err() {
                self.stats.file_dropped.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The ring's records that `query` selects (its `since`, its filter, its last N).
    pub fn recent(&self, query: &FlowQuery, now_ms: u64) -> Vec<Arc<Entry>> {
        let ring = lock(&self.ring);
        select(&ring.entries, query, now_ms)
    }

    /// [`FlowHub::recent`] and, from the same instant, the live records.
    pub fn follow(
        &self,
        query: &FlowQuery,
        now_ms: u64,
    ) -> (Vec<Arc<Entry>>, broadcast::Receiver<Arc<Entry>>) {
        let ring = lock(&self.ring);
        let rx = self.tx.subscribe();
        (select(&ring.entries, query, now_ms), rx)
    }

    /// Records in the ring.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.ring).entries.len()
    }

    /// Append the hub's counters in the Prometheus text format.
    pub fn render_prometheus(&self, out: &mut String) {
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = (|| -> std::fmt::Result {
            writeln!(
                out,
                "# HELP tessera_flow_stream_followers Clients following GET /flows."
            )?;
            writeln!(out, "# TYPE tessera_flow_stream_followers gauge")?;
            writeln!(
                out,
                "tessera_flow_stream_followers {}",
                s.followers.load(Ordering::Relaxed)
            )?;
            writeln!(
                out,
                "# HELP tessera_flow_stream_followers_dropped_total Followers of GET /flows dropped: they fell more than {CLIENT_BUFFER} records behind (reason=slow), or {MAX_FOLLOWERS} already followed (reason=refused)."
            )?;
            writeln!(
                out,
                "# TYPE tessera_flow_stream_followers_dropped_total counter"
            )?;
            writeln!(
                out,
                "tessera_flow_stream_followers_dropped_total{{reason=\"slow\"}} {}",
                load(&s.followers_dropped)
            )?;
            writeln!(
                out,
                "tessera_flow_stream_followers_dropped_total{{reason=\"refused\"}} {}",
                load(&s.followers_refused)
            )?;
            writeln!(
                out,
                "# HELP tessera_flow_log_records_total Flow records the agent published (result=published), wrote to --flow-log (written), could not queue for it (dropped: the writer is behind) or failed to write (error)."
            )?;
            writeln!(out, "# TYPE tessera_flow_log_records_total counter")?;
            for (what, n) in [
                ("published", load(&s.published)),
                ("written", load(&s.file_written)),
                ("dropped", load(&s.file_dropped)),
                ("error", load(&s.file_errors)),
            ] {
                writeln!(
                    out,
                    "tessera_flow_log_records_total{{result=\"{what}\"}} {n}"
                )?;
            }
            Ok(())
        })();
    }
}

/// Every [`DRAIN_INTERVAL`], move the processor's flow records into the hub (the processor's
/// lock is held only to take them). Ends, after a last drain, when `stop` turns true.
pub async fn drain(
    processor: Arc<Mutex<Processor>>,
    hub: Arc<FlowHub>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.changed() => true,
        };
        let mut records = Vec::new();
        let overflow = {
            let mut p = lock(&processor);
            p.drain_flow_records(&mut records);
            p.flow_log().stats().overflow
        };
        if overflow > 0 && !warned {
            warned = true;
            tracing::warn!(
                max_series = processor_max_series(&processor),
                "tessera_policy_verdicts_total reached its series cap: decisions of further policies are counted under policy=\"other\""
            );
        }
        hub.publish(records);
        if stopping || *stop.borrow() {
            return;
        }
    }
}

fn processor_max_series(processor: &Mutex<Processor>) -> usize {
    lock(processor).flow_log().config().max_series
}

fn select(entries: &VecDeque<Arc<Entry>>, query: &FlowQuery, now_ms: u64) -> Vec<Arc<Entry>> {
    let since = query.since.map(|s| s.resolve(now_ms));
    let mut out: Vec<Arc<Entry>> = entries
        .iter()
        .filter(|e| since.is_none_or(|t| e.record.time >= t) && query.filter.matches(&e.record))
        .cloned()
        .collect();
    if let Some(last) = query.last
        && out.len() > last
    {
        out.drain(..out.len() - last);
    }
    out
}

/// The `--flow-log` writer: a thread of its own (a slow disk never holds up the event loop),
/// fed batches through a bounded queue.
fn spawn_writer(
    sink: &FlowSink,
    stats: Arc<HubStats>,
) -> Result<std::sync::mpsc::SyncSender<Vec<Arc<Entry>>>> {
    let (out, name): (Box<dyn std::io::Write + Send>, String) = match sink {
        FlowSink::Stdout => (Box::new(std::io::stdout()), "stdout".into()),
        FlowSink::File(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--flow-log {}", path.display()))?;
            (Box::new(f), path.display().to_string())
        }
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Arc<Entry>>>(FILE_QUEUE_BATCHES);
    std::thread::Builder::new()
        .name("flow-log".into())
        .spawn(move || {
            let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
            let mut failing = false;
            while let Ok(batch) = rx.recv() {
                let mut batches = vec![batch];
                batches.extend(rx.try_iter());
                let mut result = Ok(());
                let mut n = 0u64;
                for e in batches.iter().flatten() {
                    result = out.write_all(e.line.as_bytes());
                    if result.is_err() {
                        break;
                    }
                    n += 1;
                }
                let result = result.and_then(|()| out.flush());
                let total: u64 = batches.iter().map(|b| b.len() as u64).sum();
                match result {
                    Ok(()) => {
                        stats.file_written.fetch_add(n, Ordering::Relaxed);
                        if failing {
                            tracing::info!(flow_log = %name, "flow log writable again");
                            failing = false;
                        }
                    }
                    Err(e) => {
                        stats.file_written.fetch_add(n, Ordering::Relaxed);
                        stats
                            .file_errors
                            .fetch_add(total.saturating_sub(n), Ordering::Relaxed);
                        if !failing {
                            tracing::warn!(flow_log = %name, "writing flow records: {e} (counted in tessera_flow_log_records_total{{result=\"error\"}})");
                            failing = true;
                        }
                        // Whatever the buffer held is lost with the error; start clean.
                        out = std::io::BufWriter::with_capacity(64 * 1024, out.into_parts().0);
                    }
                }
            }
            let _ = out.flush();
        })
        .context("starting the flow log writer thread")?;
    Ok(tx)
}

/// Which records: the filters of `tessera flows`, each matching either end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Either end in one of these namespaces.
    pub namespaces: Vec<String>,
    /// Either end is one of these workloads: `namespace/name`, or `name` in any namespace.
    pub pods: Vec<String>,
    /// Either end carries every one of these labels (`key=value`, or `key` for any value).
    pub labels: Vec<(String, Option<String>)>,
    pub verdict: Option<FlowVerdict>,
    pub protocol: Option<Protocol>,
    /// Either end's port.
    pub port: Option<u16>,
    /// Only decisions the staged policies would flip.
    pub staged: bool,
}

impl FlowFilter {
    /// Whether `r` passes every filter given.
    pub fn matches(&self, r: &FlowRecord) -> bool {
        let ends = [&r.source, &r.destination];
        (self.namespaces.is_empty()
            || ends.iter().any(|e| {
                e.namespace
                    .as_ref()
                    .is_some_and(|ns| self.namespaces.contains(ns))
            }))
            && (self.pods.is_empty()
                || ends.iter().any(|e| {
                    self.pods.iter().any(|p| match p.split_once('/') {
                        Some((ns, name)) => {
                            e.namespace.as_deref() == Some(ns)
                                && e.workload.as_deref() == Some(name)
                        }
                        None => e.workload.as_deref() == Some(p),
                    })
                }))
            && (self.labels.is_empty()
                || ends.iter().any(|e| {
                    self.labels.iter().all(|(k, v)| match v {
                        Some(v) => e.labels.get(k) == Some(v),
                        None => e.labels.contains_key(k),
                    })
                }))
            && self.verdict.is_none_or(|v| r.verdict == v)
            && self.protocol.is_none_or(|p| r.protocol == p)
            && self
                .port
                .is_none_or(|p| ends.iter().any(|e| e.port == Some(p)))
            && (!self.staged || r.staged.as_ref().is_some_and(|s| s.verdict != r.verdict))
    }
}

/// From when: an instant, or a time ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Unix milliseconds.
    At(u64),
    /// Milliseconds before the moment of the request (the agent's clock).
    Ago(u64),
}

impl Since {
    /// `5m`, `30s`, `1h30m`, `2d`, `500ms` (ago), an RFC 3339 time, or unix milliseconds.
    pub fn parse(s: &str) -> Result<Since> {
        let s = s.trim();
        if let Some(ms) = flowlog::rfc3339::parse(s) {
            return Ok(Since::At(ms));
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(Since::At(s.parse().context("--since: unix milliseconds")?));
        }
        parse_duration(s)
            .map(Since::Ago)
            .with_context(|| format!("--since {s:?}: expected a duration (30s, 5m, 1h30m, 2d), an RFC 3339 time or unix milliseconds"))
    }

    /// Unix milliseconds, relative to `now_ms`.
    pub fn resolve(self, now_ms: u64) -> u64 {
        match self {
            Since::At(t) => t,
            Since::Ago(d) => now_ms.saturating_sub(d),
        }
    }

    /// The query parameter form.
    fn to_param(self) -> String {
        match self {
            Since::At(t) => t.to_string(),
            Since::Ago(d) => format!("{d}ms"),
        }
    }
}

/// `1h30m`, `5m`, `30s`, `500ms`, `2d` in milliseconds.
fn parse_duration(s: &str) -> Result<u64> {
    if s.is_empty() {
        bail!("empty duration");
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            bail!("expected a number in {s:?}");
        }
        let (n, tail) = rest.split_at(digits);
        let n: u64 = n.parse().context("number too large")?;
        let unit_len = tail.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let (unit, tail) = tail.split_at(unit_len);
        let per = match unit {
            "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => bail!("a unit is missing after {n} (ms, s, m, h, d)"),
            u => bail!("unknown unit {u:?} (ms, s, m, h, d)"),
        };
        total = n
            .checked_mul(per)
            .and_then(|v| total.checked_add(v))
            .context("duration too large")?;
        rest = tail;
    }
    Ok(total)
}

/// A `GET /flows` request: `?follow=1&since=5m&last=20&namespace=..&pod=..&label=k=v&verdict=..&protocol=..&port=..`
/// (`namespace`, `pod` and `label` repeatable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowQuery {
    pub filter: FlowFilter,
    pub follow: bool,
    pub since: Option<Since>,
    /// Only the last N matching records of the ring.
    pub last: Option<usize>,
}

impl FlowQuery {
    /// Parse the query string (without `?`); an unknown parameter or a bad value is an error.
    pub fn parse(query: &str) -> Result<FlowQuery> {
        let mut q = FlowQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k)?, percent_decode(v)?);
            match k.as_str() {
                "follow" => {
                    q.follow = match v.as_str() {
                        "" | "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => bail!("follow={v:?}: expected 1 or 0"),
                    }
                }
                "since" => q.since = Some(Since::parse(&v)?),
                "last" => q.last = Some(v.parse().with_context(|| format!("last={v:?}"))?),
                "namespace" => q.filter.namespaces.push(v),
                "pod" => q.filter.pods.push(v),
                "label" => q.filter.labels.push(parse_label(&v)?),
                "verdict" => q.filter.verdict = Some(parse_verdict(&v)?),
                "protocol" => {
                    q.filter.protocol = Some(flowlog::parse_protocol(&v).with_context(|| {
                        format!("protocol={v:?}: TCP, UDP, SCTP, ICMP, ICMPv6 or a protocol number")
                    })?)
                }
                "port" => q.filter.port = Some(v.parse().with_context(|| format!("port={v:?}"))?),
                "staged" => {
                    q.filter.staged = match v.as_str() {
                        "" | "1" | "true" | "yes" => true,
                        "0" | "false" | "no" => false,
                        _ => bail!("staged={v:?}: expected 1 or 0"),
                    }
                }
                other => bail!("unknown parameter {other:?}"),
            }
        }
        Ok(q)
    }

    /// The query string [`FlowQuery::parse`] reads back.
    pub fn to_query(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        if self.follow {
            pairs.push(("follow", "1".into()));
        }
        if let Some(s) = self.since {
            pairs.push(("since", s.to_param()));
        }
        if let Some(n) = self.last {
            pairs.push(("last", n.to_string()));
        }
        let f = &self.filter;
        pairs.extend(f.namespaces.iter().map(|n| ("namespace", n.clone())));
        pairs.extend(f.pods.iter().map(|p| ("pod", p.clone())));
        pairs.extend(f.labels.iter().map(|(k, v)| {
            (
                "label",
                match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.clone(),
                },
            )
        }));
        if let Some(v) = f.verdict {
            pairs.push(("verdict", v.as_str().into()));
        }
        if let Some(p) = f.protocol {
            pairs.push(("protocol", p.to_string()));
        }
        if let Some(p) = f.port {
            pairs.push(("port", p.to_string()));
        }
        if f.staged {
            pairs.push(("staged", "1".into()));
        }
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", percent_encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }
}

/// `key=value` or `key`.
pub fn parse_label(s: &str) -> Result<(String, Option<String>)> {
    match s.split_once('=') {
        Some(("", _)) => bail!("label {s:?}: empty key"),
        Some((k, v)) => Ok((k.to_owned(), Some(v.to_owned()))),
        None if s.is_empty() => bail!("empty label"),
        None => Ok((s.to_owned(), None)),
    }
}

/// `allowed` / `denied` (any case; `dropped` is `denied`).
pub fn parse_verdict(s: &str) -> Result<FlowVerdict> {
    match s.to_ascii_lowercase().as_str() {
        "allowed" | "allow" | "forwarded" => Ok(FlowVerdict::Allowed),
        "denied" | "deny" | "dropped" => Ok(FlowVerdict::Denied),
        _ => bail!("verdict {s:?}: expected allowed or denied"),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .with_context(|| format!("bad percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).with_context(|| format!("{s:?} is not UTF-8"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use datapath::flowlog::{Endpoint, IdentitySource, PolicyKind, PolicyRef, SCHEMA_VERSION};
    use policy::Direction;

    /// A denied TCP ingress record from `shop/web-1` (app=web, PKI) to `shop/db-0`.
    pub(crate) fn record(time: u64) -> FlowRecord {
        let mut src = Endpoint::address(
            "10.0.1.2".parse().unwrap(),
            Some(40000),
            IdentitySource::Pki,
        );
        src.namespace = Some("shop".into());
        src.workload = Some("web-1".into());
        src.labels.insert("app".into(), "web".into());
        src.node = Some("node-a".into());
        let mut dst = Endpoint::address(
            "10.0.2.2".parse().unwrap(),
            Some(5432),
            IdentitySource::Local,
        );
        dst.namespace = Some("shop".into());
        dst.workload = Some("db-0".into());
        dst.labels.insert("app".into(), "db".into());
        FlowRecord {
            v: SCHEMA_VERSION,
            time,
            node: "node-b".into(),
            direction: Direction::Ingress,
            protocol: Protocol::Tcp,
            source: src,
            destination: dst,
            verdict: FlowVerdict::Denied,
            policy: Some(PolicyRef {
                kind: PolicyKind::NetworkPolicy,
                namespace: Some("shop".into()),
                name: "db".into(),
                tier: None,
                priority: None,
                rule: None,
                action: None,
                fail_closed: false,
                isolated_by: vec!["shop/db".into()],
            }),
            reason: Some("policy_ingress".into()),
            detail: None,
            suppressed: 0,
            sample_rate: None,
            audit: false,
            staged: None,
        }
    }

    fn q(s: &str) -> FlowQuery {
        FlowQuery::parse(s).unwrap()
    }

    #[test]
    fn filters_match_either_end() {
        let r = record(1);
        for yes in [
            "",
            "namespace=shop",
            "namespace=other&namespace=shop",
            "pod=shop/web-1",
            "pod=db-0",
            "label=app=web",
            "label=app",
            "label=app=db",
            "verdict=denied",
            "protocol=tcp",
            "port=5432",
            "port=40000",
            "namespace=shop&pod=db-0&label=app=db&verdict=DENIED&protocol=6&port=5432",
        ] {
            assert!(q(yes).filter.matches(&r), "{yes}");
        }
        for no in [
            "namespace=other",
            "pod=other/db-0",
            "pod=web",
            "label=app=api",
            "label=app=web&label=tier=front",
            "label=tier",
            "verdict=allowed",
            "protocol=UDP",
            "port=80",
            "namespace=shop&verdict=allowed",
        ] {
            assert!(!q(no).filter.matches(&r), "{no}");
        }
    }

    #[test]
    fn queries_round_trip_and_refuse_what_they_do_not_know() {
        let parsed = q(
            "follow=1&since=5m&last=20&namespace=a%20b&pod=ns/p&label=k%3Dv%26w&label=x&verdict=allowed&protocol=ICMPv6&port=53",
        );
        assert!(parsed.follow);
        assert_eq!(parsed.since, Some(Since::Ago(300_000)));
        assert_eq!(parsed.filter.namespaces, ["a b"]);
        assert_eq!(
            parsed.filter.labels,
            [("k".into(), Some("v&w".into())), ("x".into(), None)]
        );
        assert_eq!(FlowQuery::parse(&parsed.to_query()).unwrap(), parsed);
        for bad in [
            "nope=1",
            "port=x",
            "port=70000",
            "verdict=maybe",
            "protocol=tcpx",
            "since=yesterday",
            "label==v",
            "follow=2",
            "namespace=%zz",
        ] {
            assert!(FlowQuery::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn since_takes_durations_times_and_milliseconds() {
        assert_eq!(Since::parse("5m").unwrap(), Since::Ago(300_000));
        assert_eq!(Since::parse("1h30m").unwrap(), Since::Ago(5_400_000));
        assert_eq!(Since::parse("250ms").unwrap(), Since::Ago(250));
        assert_eq!(Since::parse("2d").unwrap(), Since::Ago(172_800_000));
        assert_eq!(
            Since::parse("1970-01-01T00:00:01Z").unwrap(),
            Since::At(1000)
        );
        assert_eq!(Since::parse("1234").unwrap(), Since::At(1234));
        for bad in ["", "m", "5x", "-5m", "99999999999999999999d", "5m3"] {
            assert!(Since::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Since::Ago(100).resolve(1000), 900);
        assert_eq!(Since::Ago(2000).resolve(1000), 0);
    }

    #[test]
    fn the_ring_keeps_the_last_records_and_selects_by_query() {
        let hub = FlowHub::new(5, 16, None).unwrap();
        hub.publish((0..8).map(record).collect());
        assert_eq!(hub.len(), 5);
        let times = |v: Vec<Arc<Entry>>| v.iter().map(|e| e.record.time).collect::<Vec<_>>();
        assert_eq!(times(hub.recent(&q(""), 100)), [3, 4, 5, 6, 7]);
        assert_eq!(times(hub.recent(&q("last=2"), 100)), [6, 7]);
        assert_eq!(times(hub.recent(&q("since=5"), 100)), [5, 6, 7]);
        assert_eq!(times(hub.recent(&q("since=96ms"), 100)), [4, 5, 6, 7]);
        assert!(hub.recent(&q("verdict=allowed"), 100).is_empty());
        let e = &hub.recent(&q("last=1"), 100)[0];
        assert!(e.line.ends_with('\n'));
        let back: FlowRecord = serde_json::from_str(&e.line).unwrap();
        assert_eq!(back, e.record);
        assert_eq!(hub.stats.published.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn followers_see_every_record_once_and_slow_ones_lag() {
        let hub = FlowHub::new(100, 4, None).unwrap();
        hub.publish(vec![record(1), record(2)]);
        let (backlog, mut rx) = hub.follow(&q("follow=1"), 10);
        assert_eq!(backlog.len(), 2);
        hub.publish(vec![record(3)]);
        assert_eq!(rx.try_recv().unwrap().record.time, 3);
        // Five more than the buffer of 4 while nobody reads: the follower lagged.
        hub.publish((4..9).map(record).collect());
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(1))
        ));
    }

    #[test]
    fn the_file_sink_appends_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flows.jsonl");
        std::fs::write(&path, "earlier\n").unwrap();
        let hub = FlowHub::new(10, 4, Some(&FlowSink::File(path.clone()))).unwrap();
        hub.publish(vec![record(1), record(2)]);
        hub.publish(vec![record(3)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while hub.stats.file_written.load(Ordering::Relaxed) < 3 {
            assert!(std::time::Instant::now() < deadline, "not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "earlier");
        let times: Vec<u64> = lines[1..]
            .iter()
            .map(|l| serde_json::from_str::<FlowRecord>(l).unwrap().time)
            .collect();
        assert_eq!(times, [1, 2, 3]);
        let e = FlowHub::new(10, 4, Some(&FlowSink::File(dir.path().join("no/such/dir")))).err();
        assert!(format!("{e:?}").contains("--flow-log"), "{e:?}");
    }
}
