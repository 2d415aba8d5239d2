//! The node's identity: a pre-shared key, or a CA-signed certificate plus the peers'.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use identity::{Config, Node, NodeCertificate, NodeCredentials, Psk, TrustAnchor};

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
    match source {
        KeySource::Psk(path) => {
            let raw = read(path)?;
            let psk = Psk::new(psk_bytes(&raw)).with_context(|| format!("{}", path.display()))?;
            let node = Node::new_psk(node_name, psk, Config::default())
                .with_context(|| format!("--node-name {node_name:?}"))?;
            Ok((node, 0))
        }
        KeySource::Pki {
            ca_cert,
            node_cert,
            node_key,
            peer_certs,
        } => {
            let trust = TrustAnchor::from_pem(&read_text(ca_cert)?)
                .with_context(|| format!("{}", ca_cert.display()))?;
            let creds = NodeCredentials::from_pem(&read_text(node_cert)?, &read_text(node_key)?)
                .with_context(|| format!("{} / {}", node_cert.display(), node_key.display()))?;
            let own = creds.certificate().node_name().to_owned();
            if own != node_name {
                bail!(
                    "{}: certificate is for node {own:?}, not --node-name {node_name:?}",
                    node_cert.display()
                );
            }
            let mut node = Node::new_pki(creds, trust, Config::default(), now_ms)
                .with_context(|| format!("{}", node_cert.display()))?;
            let mut peers = 0;
            let Some(peer_certs) = peer_certs else {
                return Ok((node, 0));
            };
            let entries = std::fs::read_dir(peer_certs)
                .with_context(|| format!("reading {}", peer_certs.display()))?;
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "crt" | "pem"))
                })
                .collect();
            paths.sort();
            for path in paths {
                let cert = NodeCertificate::from_pem(&read_text(&path)?)
                    .with_context(|| format!("{}", path.display()))?;
                let name = cert.node_name().to_owned();
                if name == node_name {
                    continue;
                }
                node.add_peer_certificate(&name, cert, now_ms)
                    .with_context(|| format!("{}: peer {name:?}", path.display()))?;
                peers += 1;
            }
            Ok((node, peers))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
