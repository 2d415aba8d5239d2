//! Workload claims: what a node vouches for about one of its workloads, in canonical form.
//!
//! Canonical means: label maps are sorted by key with no duplicates (a `BTreeMap` guarantees it),
//! every string follows Kubernetes syntax, and the encoding is unique (the decoder rejects
//! anything out of order), so two nodes always encode the same identity to the same bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::ClaimsError;
use crate::wire::Reader;

/// Maximum size of encoded claims in bytes. With the largest node name (253) and port name (15)
/// a SYN-ACK token is then at most [`crate::MAX_TOKEN_LEN`] = 1361 bytes.
pub const MAX_CLAIMS_LEN: usize = 1024;

/// A workload's identity as vouched for by its node: namespace, workload name, pod labels and
/// the labels of its namespace.
///
/// Cheap to clone (shared, immutable). The canonical encoding is made once, when the claims are
/// built or decoded; equality and hashing use it (the encoding is canonical, so equal bytes
/// mean equal claims).
#[derive(Clone)]
pub struct Claims(Arc<Inner>);

struct Inner {
    namespace: String,
    workload: String,
    labels: BTreeMap<String, String>,
    namespace_labels: BTreeMap<String, String>,
    encoded: Box<[u8]>,
}

impl Inner {
    fn new(
        namespace: String,
        workload: String,
        labels: BTreeMap<String, String>,
        namespace_labels: BTreeMap<String, String>,
    ) -> Inner {
        let mut encoded = Vec::new();
        // Lengths fit one or two bytes for valid claims (namespace <= 63, workload <= 253,
        // keys <= 317, values <= 63, maps <= 255 entries); `Claims::new` validates right
        // after, `Claims::decode` before.
        encoded.push(namespace.len() as u8);
        encoded.extend_from_slice(namespace.as_bytes());
        encoded.push(workload.len() as u8);
        encoded.extend_from_slice(workload.as_bytes());
        for map in [&labels, &namespace_labels] {
            encoded.push(map.len() as u8);
            for (k, v) in map {
                encoded.extend_from_slice(&(k.len() as u16).to_be_bytes());
                encoded.extend_from_slice(k.as_bytes());
                encoded.push(v.len() as u8);
                encoded.extend_from_slice(v.as_bytes());
            }
        }
        Inner {
            namespace,
            workload,
            labels,
            namespace_labels,
            encoded: encoded.into_boxed_slice(),
        }
    }
}

impl PartialEq for Claims {
    fn eq(&self, other: &Claims) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.encoded == other.0.encoded
    }
}

impl Eq for Claims {}

impl std::hash::Hash for Claims {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.encoded.hash(state);
    }
}

impl std::fmt::Debug for Claims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claims")
            .field("namespace", &self.0.namespace)
            .field("workload", &self.0.workload)
            .field("labels", &self.0.labels)
            .field("namespace_labels", &self.0.namespace_labels)
            .finish()
    }
}

impl Claims {
    /// Validate and build claims. Errors name the field and rule; claims whose encoding would
    /// exceed [`MAX_CLAIMS_LEN`] are refused (never truncated).
    pub fn new(
        namespace: impl Into<String>,
        workload: impl Into<String>,
        labels: BTreeMap<String, String>,
        namespace_labels: BTreeMap<String, String>,
    ) -> Result<Self, ClaimsError> {
        let claims = Claims(Arc::new(Inner::new(
            namespace.into(),
            workload.into(),
            labels,
            namespace_labels,
        )));
        claims.validate()?;
        let size = claims.encoded_len();
        if size > MAX_CLAIMS_LEN {
            return Err(ClaimsError::TooLarge {
                size,
                max: MAX_CLAIMS_LEN,
            });
        }
        Ok(claims)
    }

    /// Namespace (DNS-1123 label).
    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }
    /// Workload (pod) name (DNS-1123 subdomain).
    pub fn workload(&self) -> &str {
        &self.0.workload
    }
    /// Pod labels, sorted by key.
    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0.labels
    }
    /// Namespace labels, sorted by key.
    pub fn namespace_labels(&self) -> &BTreeMap<String, String> {
        &self.0.namespace_labels
    }

    fn validate(&self) -> Result<(), ClaimsError> {
        check_dns_label("namespace", &self.0.namespace)?;
        check_dns_subdomain("workload", &self.0.workload)?;
        for (field, map) in [
            ("labels", &self.0.labels),
            ("namespace_labels", &self.0.namespace_labels),
        ] {
            if map.len() > 255 {
                return Err(ClaimsError::TooManyLabels {
                    field,
                    count: map.len(),
                });
            }
            for (k, v) in map {
                check_label_key(k)?;
                check_label_value(v)?;
            }
        }
        Ok(())
    }

    /// Size of [`Claims::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.0.encoded.len()
    }

    /// Append the canonical encoding (see docs/wire-format.md, "Claims").
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.encoded);
    }

    /// Decode canonical claims from the reader. Rejects invalid syntax, unsorted or duplicate
    /// keys, and anything over the maxima. Allocation is bounded by the input length.
    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeClaimsError> {
        let start = r.position();
        let namespace = r.str_u8().ok_or(DecodeClaimsError::Truncated)?;
        check_dns_label("namespace", namespace)?;
        let workload = r.str_u8().ok_or(DecodeClaimsError::Truncated)?;
        check_dns_subdomain("workload", workload)?;
        let labels = decode_map(r)?;
        let namespace_labels = decode_map(r)?;
        if r.position() - start > MAX_CLAIMS_LEN {
            return Err(DecodeClaimsError::Invalid(ClaimsError::TooLarge {
                size: r.position() - start,
                max: MAX_CLAIMS_LEN,
            }));
        }
        Ok(Claims(Arc::new(Inner::new(
            namespace.to_owned(),
            workload.to_owned(),
            labels,
            namespace_labels,
        ))))
    }
}

/// Entries kept by a [`ClaimsCache`] before it starts over.
pub const CLAIMS_CACHE_ENTRIES: usize = 4096;

/// Decoded claims by their encoded bytes, so a peer workload seen again is not re-validated
/// and re-allocated. Only a performance device: a hit returns exactly what decoding those bytes
/// gives (the bytes passed the same checks when they were first decoded), and every check on
/// the token around the claims (MAC, transcript, replay, time) runs on the raw bytes as before.
/// Bounded: at most [`CLAIMS_CACHE_ENTRIES`] entries of at most [`MAX_CLAIMS_LEN`] bytes;
/// when full it is cleared (a flood of distinct claims only costs the decoding saved).
#[derive(Debug, Default)]
pub(crate) struct ClaimsCache {
    map: ahash::HashMap<Box<[u8]>, Claims>,
}

impl ClaimsCache {
    /// Decode the claims at the reader's position, from the cache when these exact bytes were
    /// decoded before.
    pub(crate) fn decode(&mut self, r: &mut Reader<'_>) -> Result<Claims, DecodeClaimsError> {
        let Some(bytes) = claims_extent(r.clone()) else {
            // Malformed: the full decoder says how.
            return Claims::decode(r);
        };
        if let Some(claims) = self.map.get(bytes) {
            let claims = claims.clone();
            r.bytes(bytes.len()).ok_or(DecodeClaimsError::Truncated)?;
            return Ok(claims);
        }
        let claims = Claims::decode(r)?;
        if self.map.len() >= CLAIMS_CACHE_ENTRIES {
            self.map.clear();
        }
        self.map.insert(bytes.into(), claims.clone());
        Ok(claims)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The bytes the encoded claims at the reader's position span (lengths only, nothing
/// validated), if they fit the input and [`MAX_CLAIMS_LEN`].
fn claims_extent<'a>(mut r: Reader<'a>) -> Option<&'a [u8]> {
    let start = r.clone();
    let begin = r.position();
    for _ in 0..2 {
        let n = r.u8()?;
        r.bytes(n as usize)?;
    }
    for _ in 0..2 {
        let count = r.u8()?;
        for _ in 0..count {
            let k = r.u16()?;
            r.bytes(k as usize)?;
            let v = r.u8()?;
            r.bytes(v as usize)?;
        }
    }
    let len = r.position() - begin;
    if len > MAX_CLAIMS_LEN {
        return None;
    }
    let mut start = start;
    start.bytes(len)
}

pub(crate) enum DecodeClaimsError {
    Truncated,
    Invalid(ClaimsError),
}

impl From<ClaimsError> for DecodeClaimsError {
    fn from(e: ClaimsError) -> Self {
        DecodeClaimsError::Invalid(e)
    }
}

fn decode_map(r: &mut Reader<'_>) -> Result<BTreeMap<String, String>, DecodeClaimsError> {
    let count = r.u8().ok_or(DecodeClaimsError::Truncated)?;
    // Bounded: at most 255 entries, each backed by bytes already present in the input.
    let mut entries: Vec<(String, String)> = Vec::with_capacity(count as usize);
    let mut prev: Option<&str> = None;
    for _ in 0..count {
        let klen = r.u16().ok_or(DecodeClaimsError::Truncated)? as usize;
        let key = r.str_n(klen).ok_or(DecodeClaimsError::Truncated)?;
        check_label_key(key)?;
        let value = r.str_u8().ok_or(DecodeClaimsError::Truncated)?;
        check_label_value(value)?;
        if let Some(p) = prev
            && p >= key
        {
            return Err(ClaimsError::syntax(
                "label key",
                key,
                "keys must be strictly increasing (sorted, no duplicates)",
            )
            .into());
        }
        prev = Some(key);
        entries.push((key.to_owned(), value.to_owned()));
    }
    // Already sorted and unique: BTreeMap builds it in bulk.
    Ok(entries.into_iter().collect())
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// RFC 1123 label as Kubernetes uses it: 1..=63 of `[a-z0-9-]`, alphanumeric at both ends.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && is_lower_alnum(b[0])
        && is_lower_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
}

/// RFC 1123 subdomain: dot-separated labels, 1..=253 bytes in all.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn check_dns_label(field: &'static str, s: &str) -> Result<(), ClaimsError> {
    if is_dns_label(s) {
        Ok(())
    } else {
        Err(ClaimsError::syntax(
            field,
            s,
            "DNS-1123 label: 1-63 of [a-z0-9-], alphanumeric at both ends",
        ))
    }
}

fn check_dns_subdomain(field: &'static str, s: &str) -> Result<(), ClaimsError> {
    if is_dns_subdomain(s) {
        Ok(())
    } else {
        Err(ClaimsError::syntax(
            field,
            s,
            "DNS-1123 subdomain: dot-separated DNS labels, at most 253 bytes",
        ))
    }
}

/// Label name part / value: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, at most 63.
fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.')
}

fn check_label_key(k: &str) -> Result<(), ClaimsError> {
    let ok = match k.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(k),
    };
    if ok {
        Ok(())
    } else {
        Err(ClaimsError::syntax(
            "label key",
            k,
            "qualified name: optional DNS-1123 subdomain prefix and '/', then 1-63 of \
             [A-Za-z0-9-_.], alphanumeric at both ends",
        ))
    }
}

fn check_label_value(v: &str) -> Result<(), ClaimsError> {
    if v.is_empty() || is_label_name(v) {
        Ok(())
    } else {
        Err(ClaimsError::syntax(
            "label value",
            v,
            "empty, or 1-63 of [A-Za-z0-9-_.], alphanumeric at both ends",
        ))
    }
}

/// IANA service name as Kubernetes uses for named ports: 1..=15 of `[a-z0-9-]`, at least one
/// letter, no leading, trailing or doubled '-'. The empty string means "unnamed".
pub(crate) fn check_port_name(s: &str) -> Result<(), ClaimsError> {
    if s.is_empty() {
        return Ok(());
    }
    let b = s.as_bytes();
    let ok = b.len() <= 15
        && b.iter().all(|&c| is_lower_alnum(c) || c == b'-')
        && b.iter().any(|c| c.is_ascii_lowercase())
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(ClaimsError::syntax(
            "port name",
            s,
            "IANA service name: 1-15 of [a-z0-9-], at least one letter, no leading, trailing \
             or doubled '-'",
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The processor caches policy views by claims: claims decoded from a token must find the
    /// entry of equal claims built locally (same hash, equal), and any difference must not.
    #[test]
    fn equality_and_hash_follow_the_canonical_encoding() {
        use std::hash::BuildHasher;
        let hasher = std::collections::hash_map::RandomState::new();
        let built = Claims::new(
            "shop",
            "web-1",
            map(&[("role", "web"), ("app", "shop")]),
            map(&[("team", "a")]),
        )
        .unwrap();
        let mut bytes = Vec::new();
        built.encode(&mut bytes);
        let decoded = Claims::decode(&mut Reader::new(&bytes)).ok().unwrap();
        assert!(!Arc::ptr_eq(&built.0, &decoded.0));
        assert_eq!(built, decoded);
        assert_eq!(hasher.hash_one(&built), hasher.hash_one(&decoded));
        for other in [
            Claims::new(
                "shop",
                "web-1",
                map(&[("role", "web")]),
                map(&[("team", "a")]),
            ),
            Claims::new(
                "shop",
                "web-2",
                map(&[("role", "web"), ("app", "shop")]),
                map(&[("team", "a")]),
            ),
            Claims::new(
                "shop",
                "web-1",
                map(&[("role", "web"), ("app", "shop")]),
                map(&[("team", "b")]),
            ),
            Claims::new(
                "shop",
                "web-1",
                map(&[("role", "web"), ("app", "shop")]),
                map(&[]),
            ),
        ] {
            let other = other.unwrap();
            assert_ne!(built, other, "{other:?}");
        }
        assert_eq!(built.encoded_len(), bytes.len());
    }

    #[test]
    fn the_claims_cache_gives_what_decoding_gives_and_still_rejects_bad_bytes() {
        let c = Claims::new(
            "shop",
            "web",
            map(&[("app", "web")]),
            map(&[("kubernetes.io/metadata.name", "shop")]),
        )
        .unwrap();
        let mut buf = Vec::new();
        c.encode(&mut buf);
        buf.push(0xee); // what follows the claims in a token stays unread
        let mut cache = ClaimsCache::default();
        for _ in 0..2 {
            let mut r = Reader::new(&buf);
            assert_eq!(cache.decode(&mut r).ok(), Some(c.clone()));
            assert_eq!(r.position(), buf.len() - 1);
        }
        assert_eq!(cache.len(), 1);
        // Same lengths, an invalid namespace: rejected, and never cached.
        let mut bad = buf.clone();
        bad[1] = b'S';
        for _ in 0..2 {
            assert!(cache.decode(&mut Reader::new(&bad)).is_err());
        }
        assert_eq!(cache.len(), 1);
        // Truncated claims.
        assert!(cache.decode(&mut Reader::new(&buf[..5])).is_err());
        // Bounded: distinct claims beyond the limit start it over.
        for i in 0..CLAIMS_CACHE_ENTRIES + 1 {
            let c = Claims::new("shop", format!("w{i}"), map(&[]), map(&[])).unwrap();
            let mut b = Vec::new();
            c.encode(&mut b);
            assert_eq!(cache.decode(&mut Reader::new(&b)).ok(), Some(c));
        }
        assert!(cache.len() <= CLAIMS_CACHE_ENTRIES);
    }

    #[test]
    fn valid_claims_round_trip_through_the_encoding() {
        let c = Claims::new(
            "shop",
            "web-5f7d8-abcde",
            map(&[
                ("app", "web"),
                ("app.kubernetes.io/tier", "frontend"),
                ("x", ""),
            ]),
            map(&[("kubernetes.io/metadata.name", "shop")]),
        )
        .unwrap();
        let mut buf = Vec::new();
        c.encode(&mut buf);
        assert_eq!(buf.len(), c.encoded_len());
        let mut r = Reader::new(&buf);
        let d = Claims::decode(&mut r).ok().unwrap();
        assert!(r.is_empty());
        assert_eq!(d, c);
    }

    #[test]
    fn kubernetes_syntax_is_enforced_with_the_field_named() {
        let bad = [
            ("Shop", "w", map(&[]), "namespace"),
            ("shop", "w_1", map(&[]), "workload"),
            ("shop", "w", map(&[("-app", "x")]), "label key"),
            ("shop", "w", map(&[("Example.com/app", "x")]), "label key"),
            ("shop", "w", map(&[("a/b/c", "x")]), "label key"),
            ("shop", "w", map(&[("app", "x y")]), "label value"),
            ("shop", "w", map(&[("app", &"v".repeat(64))]), "label value"),
        ];
        for (ns, w, labels, field) in bad {
            match Claims::new(ns, w, labels, BTreeMap::new()) {
                Err(ClaimsError::InvalidSyntax { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected syntax error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_claims_are_refused_not_truncated() {
        let labels: BTreeMap<String, String> = (0..40)
            .map(|i| (format!("label-number-{i:03}"), "v".repeat(20)))
            .collect();
        let err = Claims::new("shop", "w", labels, BTreeMap::new()).unwrap_err();
        assert!(
            matches!(
                err,
                ClaimsError::TooLarge {
                    max: MAX_CLAIMS_LEN,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn port_names_follow_iana_service_name_rules() {
        for ok in ["", "http", "metrics-9090", "a1"] {
            assert!(check_port_name(ok).is_ok(), "{ok}");
        }
        for bad in ["8080", "-http", "http-", "a--b", "HTTP", "sixteen-chars-xx"] {
            assert!(check_port_name(bad).is_err(), "{bad}");
        }
    }
}
