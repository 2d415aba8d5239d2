//! Arbitrary bytes as a DNS answer: the decoder, the processor's learning path (the bytes as a
//! UDP payload from port 53, and as a whole packet) and the name cache. Nothing may panic, an
//! answer gives a bounded number of (address, name) pairs, the answer always passes unchanged,
//! and the cache stays within its bounds.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use datapath::dns::{self, CacheConfig, MAX_CNAME_CHAIN, MAX_ANSWER_RECORDS, NameCache};
use datapath::{Processor, ProcessorConfig, Verdict, WorkloadId};
use identity::{Claims, Config, Node, Psk};
use libfuzzer_sys::fuzz_target;
use policy::{Engine, PodKey, Workload};

const NOW: u64 = 1_780_000_000_000;
const PSK: &[u8] = b"Zq3v9Lx2Rk7Wm1Tn5Yb8Hc4Jd6Gf0Ps_E";
const ID: WorkloadId = WorkloadId(1);

fn processor() -> Option<Processor> {
    let key = PodKey {
        namespace: "shop".into(),
        name: "web-1".into(),
    };
    let labels: policy::Labels = [("app".to_string(), "web".to_string())].into();
    let mut engine = Engine::new();
    engine
        .apply_workload(Workload {
            key: key.clone(),
            labels: labels.clone(),
            ports: vec![],
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2))],
            host_network: false,
        })
        .ok()?;
    let claims = Claims::new(
        "shop",
        "web-1",
        labels,
        engine.namespace_labels_or_default("shop"),
    )
    .ok()?;
    let node = Node::new_psk("node-a", Psk::new(PSK).ok()?, Config::default()).ok()?;
    let config = ProcessorConfig {
        dns: CacheConfig {
            max_entries: 64,
            max_entries_per_workload: 32,
            ..CacheConfig::default()
        },
        ..ProcessorConfig::default()
    };
    let mut p = Processor::new(node, engine, config);
    p.add_workload(ID, key, claims);
    Some(p)
}

/// An IPv4 UDP datagram from 10.96.0.10:53 to the workload carrying `payload`.
fn udp(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0, 10, 96, 0, 10, 10, 0, 1, 2];
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p
}

fuzz_target!(|data: &[u8]| {
    let parsed = dns::parse_answer(data);
    if let Ok(a) = &parsed {
        assert!(a.resolved.len() <= usize::from(MAX_ANSWER_RECORDS) * (MAX_CNAME_CHAIN + 1));
        assert!(a.resolved.iter().all(|r| r.name < a.names.len()));
        let mut cache = NameCache::new(CacheConfig {
            max_entries: 8,
            max_entries_per_workload: 4,
            ..CacheConfig::default()
        });
        let names: Vec<std::sync::Arc<str>> =
            a.names.iter().map(|n| std::sync::Arc::from(n.as_str())).collect();
        for (i, r) in a.resolved.iter().enumerate() {
            cache.insert(WorkloadId(i as u32 % 3), r.ip, &names[r.name], r.ttl_s, NOW);
            assert!(cache.len() <= 8);
        }
        cache.expire(NOW + 86_400_000);
        assert!(cache.is_empty());
    }
    let Some(mut p) = processor() else {
        return;
    };
    let v = p.learn_dns_answer(ID, &udp(data), NOW);
    assert_eq!(v, Verdict::accept(false));
    // Learnt only what the decoder gave.
    if parsed.is_err() {
        assert_eq!(p.dns_cache_len(), 0);
    }
    let v = p.learn_dns_answer(ID, data, NOW);
    assert_eq!(v, Verdict::accept(false));
    assert!(p.dns_cache_len() <= 64);
});
