//! `kube-emulator [--addr 127.0.0.1:PORT] [--kubeconfig PATH] [MANIFEST.yaml ...]`
//!
//! Serves the emulator until killed, after applying every object of the given YAML (or JSON)
//! manifests, and prints its URL; with `--kubeconfig` it also writes a kubeconfig there.

use std::net::SocketAddr;
use std::path::PathBuf;

use kube_emulator::Emulator;
use serde::Deserialize;

fn main() {
    if let Err(message) = run() {
        eprintln!("kube-emulator: {message}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut builder = Emulator::builder();
    let mut kubeconfig = None;
    let mut manifests = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                let text = args.next().ok_or("--addr needs an address")?;
                let addr: SocketAddr = text.parse().map_err(|e| format!("--addr {text:?}: {e}"))?;
                builder = builder.bind(addr);
            }
            "--kubeconfig" => {
                kubeconfig = Some(PathBuf::from(
                    args.next().ok_or("--kubeconfig needs a path")?,
                ))
            }
            "-h" | "--help" => {
                println!(
                    "usage: kube-emulator [--addr 127.0.0.1:PORT] [--kubeconfig PATH] [MANIFEST.yaml ...]"
                );
                return Ok(());
            }
            _ => manifests.push(PathBuf::from(arg)),
        }
    }
    let emu = builder
        .start_blocking()
        .map_err(|e| format!("cannot start: {e}"))?;
    for path in &manifests {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for (index, doc) in serde_norway::Deserializer::from_str(&text).enumerate() {
            let obj = serde_json::Value::deserialize(doc)
                .map_err(|e| format!("{} document {index}: {e}", path.display()))?;
            if obj.is_null() {
                continue;
            }
            emu.apply(obj)
                .map_err(|e| format!("{} document {index}: {e}", path.display()))?;
        }
    }
    if let Some(path) = &kubeconfig {
        emu.write_kubeconfig(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("{}", emu.url());
    loop {
        std::thread::park();
    }
}
