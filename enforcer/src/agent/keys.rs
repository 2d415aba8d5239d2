//! The node's identity: a pre-shared key, or a CA-signed certificate plus the peers'; and, in
//! PKI mode, the files watched after start (credentials rotated in place, peer certificates
//! added, changed and removed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use identity::{Config, Node, NodeCertificate, NodeCredentials, Psk, TrustAnchor};

use crate::runtime::Event;

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Psk(PathBuf),
    Pki {
        ca_cert: PathBuf,
        node_cert: PathBuf,
        node_key: PathBuf,
        /// Peer certificates; `None` in Kubernetes mode, where peers come from Node annotations.
        peer_certs: Option<PathBuf>,
    },
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The PSK file's bytes without trailing whitespace (a newline left by an editor or `echo`).
pub fn psk_bytes(raw: &[u8]) -> &[u8] {
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &raw[..end]
}

/// Build the node. PKI: the node's own certificate must chain to the CA; each `*.crt` / `*.pem`
/// of the peer directory is a peer node's certificate (its node name comes from the certificate;
/// our own is skipped). Returns the node and the number of peers trusted.
pub fn load(node_name: &str, source: &KeySource, now_ms: u64) -> Result<(Node, usize)> {
    load_watched(node_name, source, now_ms).map(|(node, peers, _)| (node, peers))
}

/// [`load`], and what [`KeyWatch`] needs to go on from exactly the files loaded (PKI mode;
/// `None` in PSK mode).
pub fn load_watched(
    node_name: &str,
    source: &KeySource,
    now_ms: u64,
) -> Result<(Node, usize, Option<KeyWatch>)> {
    match source {
        KeySource::Psk(path) => {
            let raw = read(path)?;
            let psk = Psk::new(psk_bytes(&raw)).with_context(|| format!("{}", path.display()))?;
            let node = Node::new_psk(node_name, psk, Config::default())
                .with_context(|| format!("--node-name {node_name:?}"))?;
            Ok((node, 0, None))
        }
        KeySource::Pki {
            ca_cert,
            node_cert,
            node_key,
            peer_certs,
        } => {
            let trust = TrustAnchor::from_pem(&read_text(ca_cert)?)
                .with_context(|| format!("{}", ca_cert.display()))?;
            let (cert_raw, key_raw) = (read(node_cert)?, read(node_key)?);
            let creds =
                NodeCredentials::from_pem(&text(node_cert, &cert_raw)?, &text(node_key, &key_raw)?)
                    .with_context(|| format!("{} / {}", node_cert.display(), node_key.display()))?;
            let own = creds.certificate().node_name().to_owned();
            if own != node_name {
                bail!(
                    "{}: certificate is for node {own:?}, not --node-name {node_name:?}",
                    node_cert.display()
                );
            }
            let mut node = Node::new_pki(creds, trust.clone(), Config::default(), now_ms)
                .with_context(|| format!("{}", node_cert.display()))?;
            let mut watch = KeyWatch {
                node_name: node_name.to_owned(),
                trust,
                node_cert: node_cert.clone(),
                node_key: node_key.clone(),
                own_seen: Some(digest(&[&cert_raw, &key_raw])),
                peer_dir: None,
            };
            let Some(peer_certs) = peer_certs else {
                return Ok((node, 0, Some(watch)));
            };
            let mut dir = PeerDir::new(peer_certs.clone(), node_name);
            // At start a bad file stops the agent (later, it is logged and skipped).
            for (path, raw) in dir.list()? {
                let raw = raw?;
                let cert = NodeCertificate::from_pem(&text(&path, &raw)?)
                    .with_context(|| format!("{}", path.display()))?;
                let name = cert.node_name().to_owned();
                let good = if name == node_name {
                    None
                } else {
                    node.add_peer_certificate(&name, cert.clone(), now_ms)
                        .with_context(|| format!("{}: peer {name:?}", path.display()))?;
                    Some((name, cert.to_pem()))
                };
                dir.files.insert(
                    path,
                    PeerFile {
                        seen: Some(digest(&[&raw])),
                        good,
                    },
                );
            }
            dir.sent = dir.wanted();
            let peers = dir.files.values().filter(|f| f.good.is_some()).count();
            watch.peer_dir = Some(dir);
            Ok((node, peers, Some(watch)))
        }
    }
}

fn text(path: &Path, raw: &[u8]) -> Result<String> {
    String::from_utf8(raw.to_vec()).with_context(|| format!("{}: not UTF-8 text", path.display()))
}

/// A digest of file contents, to tell a change (the contents themselves, a private key
/// among them, are not kept).
fn digest(parts: &[&[u8]]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// How often the key files are read again.
pub const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// New own credentials, checked: same node name, chains to the CA, valid now, key matches.
pub struct OwnCredentials {
    pub creds: NodeCredentials,
    /// The certificate (PEM), for publication (Kubernetes).
    pub cert_pem: String,
}

/// The PKI files after start: our own certificate and key (rotated in place when they change
/// to a valid pair) and, in static/docker mode, the peer certificate directory. Polled by
/// [`watch`]; [`KeyWatch::poll`] is one look at the files.
pub struct KeyWatch {
    node_name: String,
    trust: TrustAnchor,
    node_cert: PathBuf,
    node_key: PathBuf,
    /// Digest of the (certificate, key) contents last acted on (`None`: unreadable).
    own_seen: Option<u64>,
    peer_dir: Option<PeerDir>,
}

/// What one look at the key files found.
#[derive(Default)]
pub struct Changes {
    /// Peer certificates that appeared, changed or went (the event path of Kubernetes mode).
    pub peers: Vec<Event>,
    /// Our own credentials changed to a valid pair.
    pub own: Option<OwnCredentials>,
}

impl KeyWatch {
    /// Reads the files again. A pair or certificate that is not valid is logged naming the
    /// file(s), and what is in force stays; it is tried again when its files change.
    pub fn poll(&mut self, now_ms: u64) -> Changes {
        let own = self.poll_own(now_ms);
        let peers = match &mut self.peer_dir {
            Some(dir) => dir.poll(&self.trust, now_ms),
            None => Vec::new(),
        };
        Changes { peers, own }
    }

    fn poll_own(&mut self, now_ms: u64) -> Option<OwnCredentials> {
        let (cert, key) = (&self.node_cert, &self.node_key);
        let files = format!("{} / {}", cert.display(), key.display());
        let raw = std::fs::read(cert)
            .with_context(|| format!("reading {}", cert.display()))
            .and_then(|c| {
                std::fs::read(key)
                    .with_context(|| format!("reading {}", key.display()))
                    .map(|k| (c, k))
            });
        let (cert_raw, key_raw) = match raw {
            Ok(r) => r,
            Err(e) => {
                if self.own_seen.take().is_some() {
                    tracing::error!(
                        "node credentials: {e:#}; the credentials in force stay (checked again every second)"
                    );
                }
                return None;
            }
        };
        let seen = digest(&[&cert_raw, &key_raw]);
        if self.own_seen == Some(seen) {
            return None;
        }
        self.own_seen = Some(seen);
        let checked = (|| -> Result<OwnCredentials> {
            let cert_pem = text(cert, &cert_raw)?;
            let creds = NodeCredentials::from_pem(&cert_pem, &text(key, &key_raw)?)?;
            let c = creds.certificate();
            self.trust.verify(c, Some(&self.node_name), now_ms)?;
            Ok(OwnCredentials {
                cert_pem: c.to_pem(),
                creds,
            })
        })();
        match checked {
            Ok(own) => Some(own),
            Err(e) => {
                // Editors and `cp` write in several steps: the next change is tried again.
                tracing::error!(
                    "{files}: new node credentials refused, the credentials in force stay: {e:#}"
                );
                None
            }
        }
    }
}

/// The peer certificate directory (`--peer-certs`), as last read.
struct PeerDir {
    dir: PathBuf,
    own: String,
    files: BTreeMap<PathBuf, PeerFile>,
    /// Node → certificate (PEM) as the agent was last told.
    sent: BTreeMap<String, String>,
}

/// One certificate file: the digest of what was last read, and the last certificate it held
/// that was valid (node name and PEM; `None`: none yet, or our own).
struct PeerFile {
    seen: Option<u64>,
    good: Option<(String, String)>,
}

impl PeerDir {
    fn new(dir: PathBuf, own: &str) -> PeerDir {
        PeerDir {
            dir,
            own: own.to_owned(),
            files: BTreeMap::new(),
            sent: BTreeMap::new(),
        }
    }

    /// The `*.crt` / `*.pem` files, sorted, with their contents.
    fn list(&self) -> Result<Vec<(PathBuf, Result<Vec<u8>>)>> {
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("reading {}", self.dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "crt" | "pem"))
            })
            .collect();
        paths.sort();
        Ok(paths
            .into_iter()
            .map(|p| {
                let raw = read(&p);
                (p, raw)
            })
            .collect())
    }

    /// Node → certificate from the files (the first file by name for a node named twice).
    fn wanted(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (node, pem) in self.files.values().filter_map(|f| f.good.as_ref()) {
            out.entry(node.clone()).or_insert_with(|| pem.clone());
        }
        out
    }

    fn poll(&mut self, trust: &TrustAnchor, now_ms: u64) -> Vec<Event> {
        let listed = match self.list() {
            Ok(l) => l,
            Err(e) => {
                // Unreadable for now: nothing is revoked for that.
                tracing::warn!("peer certificates: {e:#}");
                return Vec::new();
            }
        };
        let present: std::collections::BTreeSet<&PathBuf> = listed.iter().map(|(p, _)| p).collect();
        self.files.retain(|p, _| present.contains(p));
        for (path, raw) in &listed {
            // A file that vanished between the listing and the read is gone next time.
            let Ok(raw) = raw else { continue };
            let seen = digest(&[raw]);
            let file = self.files.entry(path.clone()).or_insert(PeerFile {
                seen: None,
                good: None,
            });
            if file.seen == Some(seen) {
                continue;
            }
            file.seen = Some(seen);
            let cert = text(path, raw).and_then(|t| {
                let cert = NodeCertificate::from_pem(&t)?;
                let name = cert.node_name().to_owned();
                if name != self.own {
                    trust.verify(&cert, Some(&name), now_ms)?;
                }
                Ok((name, cert.to_pem()))
            });
            match cert {
                Ok((name, _)) if name == self.own => file.good = None,
                Ok(good) => file.good = Some(good),
                Err(e) => {
                    let previous = file.good.as_ref().map(|(n, _)| n.as_str());
                    tracing::error!(
                        file = %path.display(),
                        "peer certificate refused{}: {e:#}",
                        previous
                            .map(|n| format!(" (node {n}'s previous certificate stays in force)"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        let wanted = self.wanted();
        let mut events = Vec::new();
        // As in Kubernetes mode: a changed certificate revokes the node's old key first.
        for (node, pem) in &self.sent {
            if wanted.get(node) != Some(pem) {
                tracing::info!(
                    peer = %node,
                    "peer certificate {} in {}: revoking its key",
                    if wanted.contains_key(node) { "changed" } else { "removed" },
                    self.dir.display()
                );
                events.push(Event::PeerCertificate {
                    node: node.clone(),
                    pem: None,
                });
            }
        }
        for (node, pem) in &wanted {
            if self.sent.get(node) != Some(pem) {
                events.push(Event::PeerCertificate {
                    node: node.clone(),
                    pem: Some(pem.clone()),
                });
            }
        }
        self.sent = wanted;
        events
    }
}

/// Polls the key files every second ([`WATCH_EVERY`]) until `stop`: peer certificate changes
/// go to the agent as [`Event::PeerCertificate`] on `events` (as in Kubernetes mode), our own
/// new credentials on `own`.
pub async fn watch(
    mut keys: KeyWatch,
    events: crate::runtime::Sender,
    own: tokio::sync::mpsc::Sender<OwnCredentials>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let changes = keys.poll(super::now_ms());
        for e in changes.peers {
            if events.send(e).await.is_err() {
                return;
            }
        }
        if let Some(c) = changes.own
            && own.send(c).await.is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use identity::CertificateAuthority;
    use identity::testing::SeededRng;

    const DAY: u64 = 86_400_000;

    fn write_pair(
        dir: &Path,
        ca: &CertificateAuthority,
        rng: &mut SeededRng,
        node: &str,
    ) -> String {
        let now = super::super::now_ms();
        let c = ca.issue_node(rng, node, now - DAY, now + DAY).unwrap();
        let pem = c.certificate().to_pem();
        std::fs::write(dir.join(format!("{node}.crt")), &pem).unwrap();
        std::fs::write(
            dir.join(format!("{node}.key")),
            c.private_key_pem().unwrap().as_bytes(),
        )
        .unwrap();
        pem
    }

    fn cert(node: &str, pem: Option<&str>) -> Event {
        Event::PeerCertificate {
            node: node.into(),
            pem: pem.map(str::to_owned),
        }
    }

    #[test]
    fn watched_key_files_rotate_our_credentials_and_follow_the_peer_directory() {
        let now = super::super::now_ms();
        let mut rng = SeededRng::new(b"keys-watch");
        let ca = CertificateAuthority::generate(&mut rng, "tessera-ca", now - DAY, now + 9 * DAY)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (own_dir, peers) = (dir.path().join("own"), dir.path().join("peers"));
        std::fs::create_dir_all(&own_dir).unwrap();
        std::fs::create_dir_all(&peers).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.certificate_pem()).unwrap();
        write_pair(&own_dir, &ca, &mut rng, "node-a");
        let b1 = write_pair(&peers, &ca, &mut rng, "node-b");
        let source = KeySource::Pki {
            ca_cert: dir.path().join("ca.crt"),
            node_cert: own_dir.join("node-a.crt"),
            node_key: own_dir.join("node-a.key"),
            peer_certs: Some(peers.clone()),
        };
        let (node, n, watch) = load_watched("node-a", &source, now).unwrap();
        assert_eq!(n, 1);
        let mut w = watch.unwrap();
        let first = node.key_id();
        // Nothing changed: nothing to do.
        let c = w.poll(now);
        assert!(c.peers.is_empty() && c.own.is_none());

        // A peer's certificate changes: the old key revoked first, then the new one; a new
        // peer appears; the unchanged files say nothing.
        let b2 = write_pair(&peers, &ca, &mut rng, "node-b");
        let c1 = write_pair(&peers, &ca, &mut rng, "node-c");
        let c = w.poll(now);
        assert_eq!(
            c.peers,
            [
                cert("node-b", None),
                cert("node-b", Some(&b2)),
                cert("node-c", Some(&c1))
            ]
        );
        assert_ne!(b1, b2);
        // A file that does not parse (half written) is refused: node-b's certificate stays.
        std::fs::write(peers.join("node-b.crt"), &b2[..b2.len() / 2]).unwrap();
        assert!(w.poll(now).peers.is_empty());
        // Another CA's certificate is refused too.
        let rogue =
            CertificateAuthority::generate(&mut rng, "tessera-ca", now - DAY, now + DAY).unwrap();
        write_pair(&peers, &rogue, &mut rng, "node-b");
        assert!(w.poll(now).peers.is_empty());
        // Removed: revoked.
        std::fs::remove_file(peers.join("node-c.crt")).unwrap();
        assert_eq!(w.poll(now).peers, [cert("node-c", None)]);

        // Our own pair: a new certificate with the old key is refused (the old stays), the
        // new key with it is taken.
        let fresh = ca
            .issue_node(&mut rng, "node-a", now - DAY, now + DAY)
            .unwrap();
        std::fs::write(own_dir.join("node-a.crt"), fresh.certificate().to_pem()).unwrap();
        assert!(w.poll(now).own.is_none(), "a half-written pair");
        std::fs::write(
            own_dir.join("node-a.key"),
            fresh.private_key_pem().unwrap().as_bytes(),
        )
        .unwrap();
        let own = w.poll(now).own.expect("the new pair");
        assert_eq!(own.creds.certificate(), fresh.certificate());
        assert_eq!(own.cert_pem, fresh.certificate().to_pem());
        assert_ne!(own.creds.certificate().key_id(), first);
        assert!(w.poll(now).own.is_none(), "taken once");
        // Another node's pair in our files is refused.
        write_pair(&own_dir, &ca, &mut rng, "node-x");
        std::fs::rename(own_dir.join("node-x.crt"), own_dir.join("node-a.crt")).unwrap();
        std::fs::rename(own_dir.join("node-x.key"), own_dir.join("node-a.key")).unwrap();
        assert!(w.poll(now).own.is_none());
    }

    #[test]
    fn psk_trailing_whitespace_is_trimmed() {
        assert_eq!(psk_bytes(b"secret-key\n"), b"secret-key");
        assert_eq!(psk_bytes(b"  a b \r\n\t"), b"  a b");
        assert_eq!(psk_bytes(b"\n\n"), b"");
    }

    #[test]
    fn weak_psk_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        std::fs::write(&path, "PSK\n").unwrap();
        let e = format!(
            "{:#}",
            load("node-a", &KeySource::Psk(path), 0).err().unwrap()
        );
        assert!(e.contains("psk"), "{e}");
    }

    #[test]
    fn strong_psk_builds_a_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef-tessera\n").unwrap();
        let (node, peers) = load("node-a", &KeySource::Psk(path), 0).unwrap();
        assert_eq!(node.name(), "node-a");
        assert_eq!(peers, 0);
    }
}
