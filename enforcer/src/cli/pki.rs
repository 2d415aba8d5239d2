//! `tessera pki init-ca|issue-node|show`: the cluster CA and node certificates for PKI mode,
//! without openssl. Private keys are created with mode 0600 and never overwritten without
//! `--force`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use identity::pki::{self, CertificateAuthority, NodeCertificate, TrustAnchor};
use identity::rand_core::UnwrapErr;

const DAY_MS: u64 = 86_400_000;
/// Certificates start this much before "now" to tolerate clock skew between nodes.
const BACKDATE_MS: u64 = 5 * 60 * 1000;

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the cluster CA (Ed25519): DIR/ca.crt (public) and DIR/ca.key (secret, 0600).
    InitCa {
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// CA name (DNS-1123 subdomain), used as the certificate's CN.
        #[arg(long, default_value = "tessera-ca")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate (the node's X25519 key, certified by the CA):
    /// OUT/NODE.crt (public: publish it, e.g. as a node annotation) and OUT/NODE.key (0600).
    IssueNode {
        /// Directory holding ca.crt and ca.key (from `init-ca`).
        #[arg(long)]
        ca: PathBuf,
        /// Kubernetes node name (DNS-1123 subdomain); goes in the CN and SAN dNSName.
        #[arg(long)]
        node: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Print a certificate's names, validity and fingerprints.
    Show {
        /// Certificate PEM file (CA or node).
        file: PathBuf,
        /// Also verify the certificate against this CA certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

pub fn run(cmd: PkiCommand) -> Result<ExitCode> {
    match cmd {
        PkiCommand::InitCa {
            out,
            name,
            days,
            force,
        } => init_ca(&out, &name, days, force),
        PkiCommand::IssueNode {
            ca,
            node,
            days,
            out,
            force,
        } => issue_node(&ca, &node, days, &out, force),
        PkiCommand::Show { file, ca } => show(&file, ca.as_deref()),
    }
}

fn now_ms() -> Result<u64> {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("system clock is before 1970")?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn validity(days: u32) -> Result<(u64, u64)> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let now = now_ms()?;
    Ok((
        now.saturating_sub(BACKDATE_MS),
        now.saturating_add(u64::from(days) * DAY_MS),
    ))
}

/// Refuse to clobber any of `paths` unless `force`; checked before anything is written.
fn check_targets(paths: &[&Path], force: bool) -> Result<()> {
    for p in paths {
        if p.exists() && !force {
            bail!(
                "refusing to overwrite {} (pass --force to replace it)",
                p.display()
            );
        }
    }
    Ok(())
}

/// Create `path` with `mode` from the start (never chmod afterwards). With `force`, an existing
/// file is removed first so the new one is created with the right mode.
fn write_new(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    if force && path.exists() {
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

fn init_ca(out: &Path, name: &str, days: u32, force: bool) -> Result<ExitCode> {
    let (nb, na) = validity(days)?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let crt = out.join("ca.crt");
    let key = out.join("ca.key");
    check_targets(&[&crt, &key], force)?;
    let mut rng = UnwrapErr(getrandom::SysRng);
    let ca = CertificateAuthority::generate(&mut rng, name, nb, na)
        .with_context(|| format!("creating CA {name:?}"))?;
    let key_pem = ca.private_key_pem()?;
    write_new(&key, key_pem.as_bytes(), 0o600, force)?;
    write_new(&crt, ca.certificate_pem().as_bytes(), 0o644, force)?;
    let fp = pki::summarize_pem(&ca.certificate_pem())?;
    println!("wrote {} and {} (0600)", crt.display(), key.display());
    println!("CA {name}: sha256 {}", fp.fingerprint_hex);
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn issue_node(ca_dir: &Path, node: &str, days: u32, out: &Path, force: bool) -> Result<ExitCode> {
    let (nb, na) = validity(days)?;
    let ca_crt = ca_dir.join("ca.crt");
    let ca_key = ca_dir.join("ca.key");
    let ca =
        CertificateAuthority::from_pem(&read(&ca_crt)?, &read(&ca_key)?).with_context(|| {
            format!(
                "loading the CA from {} and {}",
                ca_crt.display(),
                ca_key.display()
            )
        })?;
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let crt = out.join(format!("{node}.crt"));
    let key = out.join(format!("{node}.key"));
    check_targets(&[&crt, &key], force)?;
    let mut rng = UnwrapErr(getrandom::SysRng);
    let creds = ca
        .issue_node(&mut rng, node, nb, na)
        .with_context(|| format!("issuing a certificate for node {node:?}"))?;
    let key_pem = creds.private_key_pem()?;
    write_new(&key, key_pem.as_bytes(), 0o600, force)?;
    write_new(&crt, creds.certificate().to_pem().as_bytes(), 0o644, force)?;
    println!("wrote {} and {} (0600)", crt.display(), key.display());
    println!(
        "node {node}: key id {}, valid until {}",
        creds.certificate().key_id(),
        pki::format_time(na)
    );
    Ok(ExitCode::SUCCESS)
}

fn show(file: &Path, ca: Option<&Path>) -> Result<ExitCode> {
    let pem = read(file)?;
    let s = pki::summarize_pem(&pem).with_context(|| format!("parsing {}", file.display()))?;
    let now = now_ms()?;
    println!("file:        {}", file.display());
    println!("subject:     CN={}", s.subject_cn);
    if !s.is_ca {
        println!("node name:   {}", s.dns_names.join(", "));
    }
    println!("issuer:      CN={}", s.issuer_cn);
    println!("serial:      {}", s.serial_hex);
    println!("not before:  {}", pki::format_time(s.not_before_ms));
    println!("not after:   {}", pki::format_time(s.not_after_ms));
    let status = if now < s.not_before_ms {
        "not yet valid"
    } else if now > s.not_after_ms {
        "EXPIRED"
    } else {
        "valid now"
    };
    println!("status:      {status}");
    println!(
        "key:         {}{}",
        s.key_algorithm,
        if s.is_ca {
            " (cluster CA)"
        } else {
            " (node key agreement)"
        }
    );
    println!("sha256:      {}", s.fingerprint_hex);
    println!("key id:      {}", s.key_id_hex);
    let Some(ca_path) = ca else {
        return Ok(ExitCode::SUCCESS);
    };
    let anchor = TrustAnchor::from_pem(&read(ca_path)?)
        .with_context(|| format!("parsing CA certificate {}", ca_path.display()))?;
    let cert = NodeCertificate::from_pem(&pem)
        .with_context(|| format!("{} is not a node certificate", file.display()))?;
    match anchor.verify(&cert, None, now) {
        Ok(()) => {
            println!("verified:    yes, by {}", ca_path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("verified:    NO ({}): {e}", e.as_str());
            Ok(ExitCode::from(1))
        }
    }
}
