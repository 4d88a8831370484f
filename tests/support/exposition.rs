//! A minimal reader of the Prometheus text exposition format (version 0.0.4),
//! enough to check what an instance's `/metrics` says: `# TYPE` lines and
//! samples `name{label="value",...} value [timestamp]`. Anything it does not
//! understand is an error, so a malformed exposition fails the test that read it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::app::TestServer;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// True when every `(label, value)` pair of `filter` is on this sample.
    pub fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter
            .iter()
            .all(|(k, v)| self.labels.get(*k).is_some_and(|actual| actual == v))
    }
}

/// A whole scrape: its samples in order and the declared type of each family.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name → `counter` | `gauge` | `histogram` | `summary` | `untyped`.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// Parses an exposition; the error names the offending line.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut scrape = Scrape::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            let fail = |why: &str| format!("line {}: {why}: {line:?}", number + 1);
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind), None) = (words.next(), words.next(), words.next())
                    else {
                        return Err(fail("malformed TYPE line"));
                    };
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(fail("unknown metric type"));
                    }
                    if scrape
                        .types
                        .insert(name.to_owned(), kind.to_owned())
                        .is_some()
                    {
                        return Err(fail("second TYPE line for the family"));
                    }
                }
                continue;
            }
            scrape
                .samples
                .push(parse_sample(line).map_err(|why| fail(&why))?);
        }
        Ok(scrape)
    }

    /// All samples named exactly `name` carrying the `filter` labels.
    pub fn select<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.matches(filter))
    }

    /// The sum over [`Scrape::select`]; 0 when nothing matches (a counter that
    /// has not been created yet counts as zero).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.select(name, filter).map(|s| s.value).sum()
    }

    /// The one sample named `name` with exactly the labels `labels`.
    pub fn exact(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Every value the label `label` takes on samples named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| s.labels.get(label).cloned())
            .collect()
    }

    /// The family a sample belongs to: its name, less `_bucket`/`_sum`/`_count`
    /// when that names a declared histogram or summary.
    pub fn family_of<'a>(&self, sample_name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample_name.strip_suffix(suffix)
                && matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return base;
            }
        }
        sample_name
    }

    /// Checks one histogram family's shape: per label set, `_bucket` lines with
    /// a `+Inf` bucket, cumulative (non-decreasing) counts, `+Inf` equal to
    /// `_count`, and a `_sum`. Returns the number of label sets checked.
    pub fn check_histogram(&self, family: &str) -> Result<usize, String> {
        if self.types.get(family).map(String::as_str) != Some("histogram") {
            return Err(format!(
                "{family}: not declared as a histogram (TYPE {:?})",
                self.types.get(family)
            ));
        }
        let bucket_name = format!("{family}_bucket");
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == bucket_name) {
            let mut labels = s.labels.clone();
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{bucket_name} sample without le: {s:?}"))?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>()
                    .map_err(|_| format!("{bucket_name}: bad le {le:?}"))?
            };
            series.entry(labels).or_default().push((bound, s.value));
        }
        if series.is_empty() {
            return Err(format!("{family}: no _bucket lines"));
        }
        for (labels, mut buckets) in series.clone() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if buckets.last().map(|b| b.0) != Some(f64::INFINITY) {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(format!(
                    "{family}{labels:?}: bucket counts decrease: {buckets:?}"
                ));
            }
            let count = self
                .exact(&format!("{family}_count"), &pairs)
                .ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
            let inf = buckets.last().map(|b| b.1).unwrap_or_default();
            if inf != count {
                return Err(format!(
                    "{family}{labels:?}: +Inf bucket {inf} != _count {count}"
                ));
            }
            if self.exact(&format!("{family}_sum"), &pairs).is_none() {
                return Err(format!("{family}{labels:?}: no _sum"));
            }
        }
        Ok(series.len())
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let label = rest[..eq].trim();
            if !valid_name(label) || label.contains(':') {
                return Err(format!("invalid label name {label:?}"));
            }
            let quoted = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or_else(|| format!("label {label} has no quoted value"))?;
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let close = loop {
                match chars.next() {
                    None => return Err(format!("unterminated value of label {label}")),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("bad escape {other:?} in label {label}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.insert(label.to_owned(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            rest = &quoted[close + 1..];
            if !rest.starts_with([',', '}']) {
                return Err(format!("expected ',' or '}}' after label {label}"));
            }
        }
    }
    if !rest.starts_with(' ') {
        return Err("no space before the value".into());
    }
    let mut fields = rest.split_whitespace();
    let raw = fields.next().ok_or("no value")?;
    let value = match raw {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        raw => raw
            .parse::<f64>()
            .map_err(|_| format!("bad value {raw:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `GET /metrics` on one instance, parsed; panics on a non-200 reply or a parse error.
pub async fn scrape(server: &TestServer) -> Scrape {
    let reply = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(reply.status().as_u16(), 200, "GET /metrics");
    let content_type = reply
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "/metrics content type is {content_type:?}"
    );
    let text = reply.text().await.expect("/metrics body");
    Scrape::parse(&text).unwrap_or_else(|e| panic!("/metrics is not valid exposition text: {e}"))
}
