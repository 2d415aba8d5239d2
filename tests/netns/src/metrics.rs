//! A small reader of the Prometheus text format (what `tessera run` serves on /metrics).

/// One sample: `name{k="v",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// A scrape of /metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    /// Parses the text format; lines that do not parse are skipped.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// Sum of every sample carrying label `key="value"` (whatever the metric name), counters
    /// only: `_bucket`, `_sum`, `_count` series are left out.
    pub fn sum_with_label(&self, key: &str, value: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| !is_histogram_part(&s.name))
            .filter(|s| s.labels.iter().any(|(k, v)| k == key && v == value))
            .map(|s| s.value)
            .sum()
    }

    /// Sum of the samples of metric `name` that carry label `key="value"`.
    pub fn sum_of(&self, name: &str, key: &str, value: &str) -> f64 {
        self.sum_of_labels(name, &[(key, value)])
    }

    /// Sum of the samples of metric `name` that carry every one of `labels` (`key`, `value`).
    pub fn sum_of_labels(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(key, value)| s.labels.iter().any(|(k, v)| k == key && v == value))
            })
            .map(|s| s.value)
            .sum::<f64>()
            + 0.0
    }

    /// Sum of every sample of metric `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Names of metric families seen (deduplicated, in order).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &self.samples {
            if !v.contains(&s.name) {
                v.push(s.name.clone());
            }
        }
        v
    }

    /// The cumulative buckets `(le, count)` of the first histogram whose name contains
    /// `needle`, summed over its label sets, sorted by `le` (`+Inf` last). Also its name.
    pub fn histogram(&self, needle: &str) -> Option<(String, Vec<(f64, f64)>)> {
        let name = self
            .samples
            .iter()
            .find(|s| s.name.ends_with("_bucket") && s.name.contains(needle))?
            .name
            .clone();
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let Some(le) = s.labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v) else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some(b) => b.1 += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some((name.trim_end_matches("_bucket").to_owned(), buckets))
    }
}

/// Quantile `q` (0..1) of the observations between two scrapes of the same cumulative
/// histogram (`after - before`), linearly interpolated inside the bucket, as Prometheus'
/// `histogram_quantile` does. `None` if nothing was observed.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| *l == le)
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            (le, c - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_le = 0.0;
    let mut prev_c = 0.0;
    for &(le, c) in &delta {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            let in_bucket = c - prev_c;
            let frac = if in_bucket > 0.0 {
                (rank - prev_c) / in_bucket
            } else {
                1.0
            };
            return Some(prev_le + (le - prev_le) * frac);
        }
        prev_le = le;
        prev_c = c;
    }
    Some(prev_le)
}

fn is_histogram_part(name: &str) -> bool {
    name.ends_with("_bucket") || name.ends_with("_sum") || name.ends_with("_count")
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (name_labels, rest) = match line.find('{') {
        Some(_) => {
            let close = line.rfind('}')?;
            (&line[..=close], &line[close + 1..])
        }
        None => {
            let sp = line.find(char::is_whitespace)?;
            (&line[..sp], &line[sp..])
        }
    };
    let value: f64 = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match name_labels.find('{') {
        Some(open) => (
            &name_labels[..open],
            parse_labels(&name_labels[open + 1..name_labels.len() - 1])?,
        ),
        None => (name_labels, Vec::new()),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_owned();
        rest = rest[eq + 1..].trim_start().strip_prefix('"')?;
        let mut val = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => val.push('\n'),
                    other => val.push(other),
                },
                '"' => break i,
                c => val.push(c),
            }
        };
        out.push((key, val));
        rest = rest[end + 1..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tessera_rejected_total Rejected packets by reason.
# TYPE tessera_rejected_total counter
tessera_rejected_total{reason="replay",direction="ingress"} 2
tessera_rejected_total{reason="bad_mac"} 1
tessera_other{reason="replay"} 3
tessera_decision_seconds_bucket{le="0.00001"} 5
tessera_decision_seconds_bucket{le="0.00005"} 9
tessera_decision_seconds_bucket{le="+Inf"} 10
tessera_decision_seconds_sum 0.0002
tessera_decision_seconds_count 10
plain 7
"#;

    #[test]
    fn sums_samples_by_label_whatever_the_metric() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.sum_with_label("reason", "replay"), 5.0);
        assert_eq!(m.sum_with_label("reason", "bad_mac"), 1.0);
        assert_eq!(m.sum_with_label("reason", "nothing"), 0.0);
        assert_eq!(m.sum("plain"), 7.0);
        assert_eq!(m.sum_of("tessera_rejected_total", "reason", "replay"), 2.0);
        let both = [("reason", "replay"), ("direction", "ingress")];
        assert_eq!(m.sum_of_labels("tessera_rejected_total", &both), 2.0);
        let other = [("reason", "bad_mac"), ("direction", "ingress")];
        assert_eq!(m.sum_of_labels("tessera_rejected_total", &other), 0.0);
    }

    #[test]
    fn histogram_quantiles_come_from_the_delta_between_scrapes() {
        let m = Metrics::parse(TEXT);
        let (name, after) = m.histogram("decision").unwrap();
        assert_eq!(name, "tessera_decision_seconds");
        assert_eq!(after.len(), 3);
        let before = vec![(0.00001, 0.0), (0.00005, 0.0), (f64::INFINITY, 0.0)];
        let p50 = quantile_between(&before, &after, 0.5).unwrap();
        assert!((p50 - 0.00001).abs() < 1e-9, "{p50}");
        let p90 = quantile_between(&before, &after, 0.9).unwrap();
        assert!((p90 - 0.00005).abs() < 1e-9, "{p90}");
        assert_eq!(quantile_between(&after, &after, 0.5), None);
    }

    #[test]
    fn escaped_label_values_parse() {
        let m = Metrics::parse("x{a=\"q\\\"x\",b=\"y\"} 1\n");
        assert_eq!(m.samples[0].labels[0].1, "q\"x");
        assert_eq!(m.samples[0].labels[1].1, "y");
    }
}
