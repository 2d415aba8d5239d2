//! `labelSelector` and `fieldSelector` query parameters, parsed once per request.

use serde_json::Value;

use crate::EmuError;

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector: every requirement must hold (AND).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    /// Parses the text syntax of `?labelSelector=`: `a=b`, `a==b`, `a!=b`, `a`, `!a`,
    /// `a in (x,y)`, `a notin (x,y)`, separated by commas.
    pub fn parse(text: &str) -> Result<Self, EmuError> {
        let bad = |why: &str| EmuError::BadRequest(format!("labelSelector {text:?}: {why}"));
        let mut reqs = Vec::new();
        for term in split_top_level(text) {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            if let Some(key) = term.strip_prefix('!') {
                reqs.push(LabelReq::NotExists(key.trim().to_string()));
            } else if let Some((key, value)) = term.split_once("!=") {
                reqs.push(LabelReq::NotEq(key.trim().into(), value.trim().into()));
            } else if let Some((key, value)) = term.split_once('=') {
                let value = value.strip_prefix('=').unwrap_or(value);
                reqs.push(LabelReq::Eq(key.trim().into(), value.trim().into()));
            } else if let Some(open) = term.find('(') {
                let close = term
                    .rfind(')')
                    .filter(|c| *c > open)
                    .ok_or_else(|| bad("unclosed '('"))?;
                let mut head = term[..open].split_whitespace();
                let (Some(key), Some(op), None) = (head.next(), head.next(), head.next()) else {
                    return Err(bad("expected `key in (...)` or `key notin (...)`"));
                };
                let values = term[open + 1..close]
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .collect();
                reqs.push(match op {
                    "in" => LabelReq::In(key.into(), values),
                    "notin" => LabelReq::NotIn(key.into(), values),
                    other => return Err(bad(&format!("unknown operator {other:?}"))),
                });
            } else if term.contains(char::is_whitespace) {
                return Err(bad(&format!("cannot parse term {term:?}")));
            } else {
                reqs.push(LabelReq::Exists(term.to_string()));
            }
        }
        Ok(Self(reqs))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|v| vs.iter().any(|x| x == v)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|v| vs.iter().all(|x| x != v)),
        })
    }
}

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0usize, 0usize, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// A parsed field selector: `path=value`, `path==value`, `path!=value`, comma-separated.
///
/// Unlike the real API server, which accepts only a few fields per resource, any dotted path
/// into the object is accepted; a missing field compares as the empty string (as an unscheduled
/// pod's `spec.nodeName` does upstream).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    /// Parses `?fieldSelector=`.
    pub fn parse(text: &str) -> Result<Self, EmuError> {
        let mut reqs = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v.strip_prefix('=').unwrap_or(v))
            } else {
                return Err(EmuError::BadRequest(format!(
                    "fieldSelector {text:?}: term {term:?} has no '=' or '!='"
                )));
            };
            let path = path.trim().split('.').map(str::to_string).collect();
            reqs.push((path, equal, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    /// Whether every term holds for the object.
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, equal, want)| {
            let found = path.iter().try_fold(obj, |v, key| v.get(key));
            let text = match found {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (text == *want) == *equal
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selector_forms() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&pod);
        assert!(ok("app=web,tier!=back"));
        assert!(ok("app==web"));
        assert!(ok("app,!missing"));
        assert!(ok("tier in (front, mid),app notin (db)"));
        assert!(!ok("app=db"));
        assert!(!ok("!app"));
        assert!(!ok("tier notin (front)"));
        assert!(ok(""));
        assert!(LabelSelector::parse("app in (x").is_err());
        assert!(LabelSelector::parse("app = b c").is_ok());
        assert!(LabelSelector::parse("app like (x)").is_err());
    }

    #[test]
    fn field_selector_forms() {
        let pod = json!({"metadata": {"name": "a", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let ok = |s: &str| FieldSelector::parse(s).unwrap().matches(&pod);
        assert!(ok("spec.nodeName=n1,metadata.namespace==ns"));
        assert!(ok("metadata.name!=b"));
        assert!(!ok("spec.nodeName=n2"));
        assert!(ok("spec.missing="));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }
}
