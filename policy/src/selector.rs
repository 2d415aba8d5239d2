//! Label selector evaluation: `matchLabels` and `matchExpressions`, parsed once, matched without
//! allocating.

use compact_str::CompactString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use smallvec::SmallVec;

use crate::model::Labels;

/// What a requirement asks of one label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// `matchLabels` entry: the key is present with exactly this value.
    Equals(CompactString),
    /// The key is present and its value is one of these (sorted, unique).
    In(Vec<CompactString>),
    /// The key is absent, or its value is none of these (sorted, unique).
    NotIn(Vec<CompactString>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Requirement {
    key: CompactString,
    op: Op,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = label(labels, self.key.as_str());
        match (&self.op, value) {
            (Op::Equals(want), Some(v)) => want == v,
            (Op::In(values), Some(v)) => values.binary_search_by(|x| x.as_str().cmp(v)).is_ok(),
            (Op::NotIn(values), Some(v)) => values.binary_search_by(|x| x.as_str().cmp(v)).is_err(),
            (Op::NotIn(_), None) => true,
            (Op::Exists, v) => v.is_some(),
            (Op::DoesNotExist, v) => v.is_none(),
            (Op::Equals(_) | Op::In(_), None) => false,
        }
    }
}

/// `labels[key]`. Label sets are small: up to 8 entries a scan comparing lengths first (most
/// keys differ in length, and then no bytes are compared) beats the map's ordered search, which
/// calls `memcmp` for every key it passes.
#[inline]
fn label<'a>(labels: &'a Labels, key: &str) -> Option<&'a String> {
    if labels.len() <= 8 {
        labels
            .iter()
            .find_map(|(k, v)| (k.len() == key.len() && k == key).then_some(v))
    } else {
        labels.get(key)
    }
}

/// A compiled label selector. The empty selector (`{}`) matches every label set.
///
/// Laid out for decisions: up to two requirements, and keys and values of up to 24 bytes, are
/// stored inline (no pointer to follow, so no cache miss, per requirement or string).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub(crate) struct Selector {
    requirements: SmallVec<[Requirement; 2]>,
}

/// A selector that failed validation: the field path below the selector and a message.
#[derive(Debug)]
pub(crate) struct SelectorError {
    pub field: String,
    pub message: String,
}

impl Selector {
    /// Validates (label syntax, operators and their values) and compiles a selector.
    pub(crate) fn compile(sel: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = SmallVec::new();
        if let Some(match_labels) = &sel.match_labels {
            for (k, v) in match_labels {
                check_key(k).map_err(|m| SelectorError {
                    field: format!("matchLabels[{k}]"),
                    message: m,
                })?;
                check_value(v).map_err(|m| SelectorError {
                    field: format!("matchLabels[{k}]"),
                    message: m,
                })?;
                requirements.push(Requirement {
                    key: k.into(),
                    op: Op::Equals(v.into()),
                });
            }
        }
        for (i, expr) in sel.match_expressions.iter().flatten().enumerate() {
            let at = |sub: &str| format!("matchExpressions[{i}].{sub}");
            check_key(&expr.key).map_err(|m| SelectorError {
                field: at("key"),
                message: m,
            })?;
            let values = expr.values.as_deref().unwrap_or(&[]);
            for (j, v) in values.iter().enumerate() {
                check_value(v).map_err(|m| SelectorError {
                    field: at(&format!("values[{j}]")),
                    message: m,
                })?;
            }
            let mut sorted: Vec<CompactString> = values.iter().map(CompactString::from).collect();
            sorted.sort();
            sorted.dedup();
            let op = match expr.operator.as_str() {
                "In" | "NotIn" => {
                    if sorted.is_empty() {
                        return Err(SelectorError {
                            field: at("values"),
                            message: format!(
                                "must be specified when `operator` is '{}'",
                                expr.operator
                            ),
                        });
                    }
                    if expr.operator == "In" {
                        Op::In(sorted)
                    } else {
                        Op::NotIn(sorted)
                    }
                }
                "Exists" | "DoesNotExist" => {
                    if !values.is_empty() {
                        return Err(SelectorError {
                            field: at("values"),
                            message: format!(
                                "may not be specified when `operator` is '{}'",
                                expr.operator
                            ),
                        });
                    }
                    if expr.operator == "Exists" {
                        Op::Exists
                    } else {
                        Op::DoesNotExist
                    }
                }
                other => {
                    return Err(SelectorError {
                        field: at("operator"),
                        message: format!(
                            "unsupported operator {other:?}: must be one of In, NotIn, Exists, DoesNotExist"
                        ),
                    });
                }
            };
            requirements.push(Requirement {
                key: expr.key.as_str().into(),
                op,
            });
        }
        Ok(Self { requirements })
    }

    /// The selector that matches everything (`{}`).
    pub(crate) fn everything() -> Self {
        Self::default()
    }

    /// All requirements hold (ANDed); `{}` matches everything.
    #[inline]
    pub(crate) fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of 1-63 characters
/// (alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric).
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Err(format!(
                "invalid label key {key:?}: prefix part must be non-empty"
            ));
        }
        if !is_dns1123_subdomain(p) {
            return Err(format!(
                "invalid label key {key:?}: prefix part must be a lowercase DNS subdomain of at most 253 characters"
            ));
        }
    }
    if name.is_empty() {
        return Err(format!(
            "invalid label key {key:?}: name part must be non-empty"
        ));
    }
    if !is_label_name(name) {
        return Err(format!(
            "invalid label key {key:?}: name part must be at most 63 characters of alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or 1-63 characters like a key's name part.
pub(crate) fn check_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "invalid label value {value:?}: must be empty or at most 63 characters of alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
        && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn keys_and_values_follow_label_syntax() {
        assert!(check_key("app").is_ok());
        assert!(check_key("kubernetes.io/metadata.name").is_ok());
        assert!(check_key("a/b/c").is_err());
        assert!(check_key("/x").is_err());
        assert!(check_key("-x").is_err());
        assert!(check_key(&"x".repeat(64)).is_err());
        assert!(check_value("").is_ok());
        assert!(check_value("v1.2_3-x").is_ok());
        assert!(check_value("bad value").is_err());
    }

    #[test]
    fn not_in_and_does_not_exist_match_a_missing_key() {
        let sel = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![
                expr("tier", "NotIn", &["db"]),
                expr("legacy", "DoesNotExist", &[]),
            ]),
            match_labels: None,
        })
        .unwrap();
        assert!(sel.matches(&labels(&[])));
        assert!(sel.matches(&labels(&[("tier", "web")])));
        assert!(!sel.matches(&labels(&[("tier", "db")])));
        assert!(!sel.matches(&labels(&[("legacy", "")])));
    }

    #[test]
    fn operators_check_their_values() {
        let bad = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![expr("a", "In", &[])]),
            match_labels: None,
        })
        .unwrap_err();
        assert_eq!(bad.field, "matchExpressions[0].values");
        let bad = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![expr("a", "Exists", &["x"])]),
            match_labels: None,
        })
        .unwrap_err();
        assert_eq!(bad.field, "matchExpressions[0].values");
        let bad = Selector::compile(&LabelSelector {
            match_expressions: Some(vec![expr("a", "Equals", &["x"])]),
            match_labels: None,
        })
        .unwrap_err();
        assert_eq!(bad.field, "matchExpressions[0].operator");
    }
}
