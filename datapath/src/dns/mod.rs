//! The names a workload resolves, learnt from the DNS answers it receives (for admin
//! `domainNames` egress peers).
//!
//! The rules queue the UDP answers from port 53 that arrive on a flow the workload itself opened
//! (conntrack's reply direction) and that its agent already authorized; [`parse_answer`] takes
//! what a decision needs from one answer (the addresses, the names they were resolved for, the
//! TTLs) and [`NameCache`] keeps it, per workload, until the TTL runs out. The DNS message
//! itself is decoded by the `simple-dns` crate; this module only bounds the work and follows
//! the CNAME chain of the question.
//!
//! What an answer gives: for each A/AAAA record whose owner is on the CNAME chain that starts at
//! the question's name, the address with every name of the chain up to that owner, each with
//! the smallest TTL of the links between the name and the address (`www.example.com CNAME
//! edge.cdn.net` (TTL 300), `edge.cdn.net A 192.0.2.7` (TTL 60): 192.0.2.7 is
//! `www.example.com` for 60 s and `edge.cdn.net` for 60 s). Records off the chain are ignored:
//! extra records a resolver (or an attacker in its path) adds about other names are exactly
//! what cache poisoning uses.

mod cache;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use simple_dns::rdata::RData;
use simple_dns::{CLASS, Name, OPCODE, Packet, PacketFlag, QCLASS, RCODE, header_buffer};

pub use cache::{CacheConfig, MAX_NAMES_PER_ADDRESS, NameCache};

/// Largest DNS message looked at, bytes. Answers over UDP are at most 1,232 bytes with the
/// EDNS buffer size resolvers use since 2020 (512 without EDNS); 4,096 is the largest buffer
/// any common resolver advertises. A larger answer is not learnt (`dns_too_large`).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Records at most in the answer section. A name with more addresses than this is rare (a
/// 1,232-byte answer holds about 70 A records); such an answer is not learnt.
pub const MAX_ANSWER_RECORDS: u16 = 128;

/// Records at most in the whole message (answer, authority and additional sections). Checked
/// on the header before the message is decoded, so a hostile count costs nothing.
pub const MAX_RECORDS: u32 = 256;

/// CNAME links followed from the question's name at most (resolvers stop at 8 to 16).
pub const MAX_CNAME_CHAIN: usize = 8;

/// Why an answer was not learnt from (metric label [`DnsError::as_str`], counted in
/// `tessera_dns_answers_total{result}`). None of these changes what happens to the packet:
/// the answer reaches the workload as before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// Longer than [`MAX_MESSAGE_LEN`].
    #[error("DNS message longer than {MAX_MESSAGE_LEN} bytes")]
    TooLarge,
    /// Not a DNS message (shorter than its header, or does not decode).
    #[error("malformed DNS message")]
    Malformed,
    /// QR = 0: a query, not an answer.
    #[error("DNS message is not a response")]
    NotResponse,
    /// An opcode other than QUERY.
    #[error("DNS opcode is not QUERY")]
    Opcode,
    /// TC = 1: the resolver truncated the answer; the client retries over TCP, which is not
    /// learnt.
    #[error("DNS answer truncated")]
    Truncated,
    /// A response code other than NOERROR (NXDOMAIN, SERVFAIL, ...): nothing to learn.
    #[error("DNS response code is not NOERROR")]
    Rcode,
    /// Not exactly one question, or a question of another class than IN.
    #[error("DNS answer without exactly one IN question")]
    Question,
    /// More records than [`MAX_ANSWER_RECORDS`] / [`MAX_RECORDS`].
    #[error("too many DNS records")]
    TooManyRecords,
    /// A CNAME chain longer than [`MAX_CNAME_CHAIN`].
    #[error("CNAME chain longer than {MAX_CNAME_CHAIN}")]
    ChainTooLong,
    /// A CNAME chain that comes back to one of its names.
    #[error("CNAME loop")]
    CnameLoop,
}

impl DnsError {
    /// Stable metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsError::TooLarge => "too_large",
            DnsError::Malformed => "malformed",
            DnsError::NotResponse => "not_response",
            DnsError::Opcode => "opcode",
            DnsError::Truncated => "truncated",
            DnsError::Rcode => "rcode",
            DnsError::Question => "question",
            DnsError::TooManyRecords => "too_many_records",
            DnsError::ChainTooLong => "cname_chain_too_long",
            DnsError::CnameLoop => "cname_loop",
        }
    }

    /// Every error, in label order (for metrics and tests).
    pub const ALL: [DnsError; 10] = [
        DnsError::TooLarge,
        DnsError::Malformed,
        DnsError::NotResponse,
        DnsError::Opcode,
        DnsError::Truncated,
        DnsError::Rcode,
        DnsError::Question,
        DnsError::TooManyRecords,
        DnsError::ChainTooLong,
        DnsError::CnameLoop,
    ];
}

/// One address the answer resolved, for one name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// The address (an A or AAAA record).
    pub ip: IpAddr,
    /// Index of the name in [`Answer::names`].
    pub name: usize,
    /// Seconds the association is valid: the smallest TTL of the CNAME links from the name to
    /// the record and of the record itself (a TTL with the top bit set counts as 0, RFC 2181).
    pub ttl_s: u32,
}

/// What one DNS answer resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// The names of the CNAME chain from the question, question first, lowercase and without
    /// the trailing dot. A name with a label that no policy could name (anything but ASCII
    /// letters, digits, `-` and `_`) is left out; the chain is still followed through it.
    pub names: Vec<String>,
    /// Each (address, name) the answer resolved. Empty for an answer without addresses (a
    /// NODATA answer, or an AAAA question answered only by a CNAME).
    pub resolved: Vec<Resolved>,
}

/// Decode a UDP payload that should be a DNS answer and take what it resolved (see the module
/// documentation). Never panics; the work is bounded by [`MAX_MESSAGE_LEN`] and the record
/// limits, checked on the header before anything is decoded.
pub fn parse_answer(payload: &[u8]) -> Result<Answer, DnsError> {
    if payload.len() > MAX_MESSAGE_LEN {
        return Err(DnsError::TooLarge);
    }
    let header = |r: Result<u16, _>| r.map_err(|_| DnsError::Malformed);
    if !header_buffer::has_flags(payload, PacketFlag::RESPONSE).map_err(|_| DnsError::Malformed)? {
        return Err(DnsError::NotResponse);
    }
    if header_buffer::opcode(payload).map_err(|_| DnsError::Malformed)? != OPCODE::StandardQuery {
        return Err(DnsError::Opcode);
    }
    if header_buffer::has_flags(payload, PacketFlag::TRUNCATION).map_err(|_| DnsError::Malformed)? {
        return Err(DnsError::Truncated);
    }
    // The low four bits of the response code; EDNS can extend it (checked after decoding).
    if header_buffer::rcode(payload).map_err(|_| DnsError::Malformed)? != RCODE::NoError {
        return Err(DnsError::Rcode);
    }
    if header(header_buffer::questions(payload))? != 1 {
        return Err(DnsError::Question);
    }
    let answers = header(header_buffer::answers(payload))?;
    let records = u32::from(answers)
        + u32::from(header(header_buffer::name_servers(payload))?)
        + u32::from(header(header_buffer::additional_records(payload))?);
    if answers > MAX_ANSWER_RECORDS || records > MAX_RECORDS {
        return Err(DnsError::TooManyRecords);
    }
    let packet = Packet::parse(payload).map_err(|_| DnsError::Malformed)?;
    if packet.rcode() != RCODE::NoError {
        return Err(DnsError::Rcode);
    }
    let question = match packet.questions.as_slice() {
        [q] if matches!(q.qclass, QCLASS::CLASS(CLASS::IN)) => q,
        _ => return Err(DnsError::Question),
    };

    // The chain: the question's name, then each CNAME target. `links[i]` is the TTL of the
    // CNAME from chain[i] to chain[i + 1].
    let mut chain: Vec<&Name<'_>> = vec![&question.qname];
    let mut links: Vec<u32> = Vec::new();
    while let Some(current) = chain.last().copied() {
        let next = packet.answers.iter().find_map(|rr| match &rr.rdata {
            RData::CNAME(target) if rr.class == CLASS::IN && rr.name == *current => {
                Some((&target.0, ttl_of(rr.ttl)))
            }
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        if chain.iter().any(|n| **n == *target) {
            return Err(DnsError::CnameLoop);
        }
        if links.len() >= MAX_CNAME_CHAIN {
            return Err(DnsError::ChainTooLong);
        }
        chain.push(target);
        links.push(ttl);
    }

    // Names as policies spell them; `index[i]`: chain[i]'s index in `names`, if it has one.
    let mut names = Vec::with_capacity(chain.len());
    let mut index = Vec::with_capacity(chain.len());
    for name in &chain {
        index.push(host_name(name).map(|s| {
            names.push(s);
            names.len() - 1
        }));
    }

    let mut resolved = Vec::new();
    for rr in &packet.answers {
        if rr.class != CLASS::IN {
            continue;
        }
        let ip = match &rr.rdata {
            RData::A(a) => IpAddr::V4(Ipv4Addr::from(a.address)),
            RData::AAAA(a) => IpAddr::V6(Ipv6Addr::from(a.address)),
            _ => continue,
        };
        let Some(owner) = chain.iter().position(|n| **n == rr.name) else {
            continue; // not about the question: ignored
        };
        // Walk from the owner back to the question, taking the smallest TTL on the way.
        let mut ttl_s = ttl_of(rr.ttl);
        for i in (0..=owner).rev() {
            if i < owner {
                ttl_s = ttl_s.min(links.get(i).copied().unwrap_or(0));
            }
            if let Some(Some(name)) = index.get(i) {
                resolved.push(Resolved {
                    ip,
                    name: *name,
                    ttl_s,
                });
            }
        }
    }
    Ok(Answer { names, resolved })
}

/// A TTL as RFC 2181 section 8 reads it: a value with the top bit set is 0.
fn ttl_of(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 { 0 } else { ttl }
}

/// The name as policies spell it (lowercase labels joined by dots, no trailing dot), if every
/// label is made of ASCII letters, digits, `-` and `_` (anything else, a dot inside a label
/// included, could not be named by a policy, or would read as another name). The root has
/// no name.
fn host_name(name: &Name<'_>) -> Option<String> {
    let labels = name.get_labels();
    if labels.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(labels.iter().map(|l| l.len() + 1).sum());
    for label in labels {
        let bytes: &[u8] = label.as_ref();
        if bytes.is_empty()
            || !bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.extend(bytes.iter().map(|b| char::from(b.to_ascii_lowercase())));
    }
    Some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
