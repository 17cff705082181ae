use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use config::{Value, ValueKind};

use crate::redact::display_value;

/// The longest duration a setting takes: longer ones are surely mistakes, and would overflow
/// the arithmetic of deadlines.
const LONGEST_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// One problem found in the configuration, with where it came from and the key it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file (or environment variable) the offending value came from.
    pub origin: String,
    /// The full key, such as `stream.bindings.bill-in-0.consumer.max-attempts`.
    pub key: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: `{}`: {}", self.origin, self.key, self.message)
    }
}

/// Problems collected while reading the configuration, reported all at once.
#[derive(Debug, Default)]
pub struct Problems {
    found: Vec<ConfigProblem>,
}

impl Problems {
    /// Records a problem with `node`.
    pub fn at(&mut self, node: &ConfigNode, message: impl Into<String>) {
        self.found.push(ConfigProblem {
            origin: node.origin(),
            key: node.key.clone(),
            message: message.into(),
        });
    }

    /// Records a problem with a key that has no node, such as a missing required key.
    pub fn at_key(
        &mut self,
        origin: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.found.push(ConfigProblem {
            origin: origin.into(),
            key: key.into(),
            message: message.into(),
        });
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub(crate) fn into_result(self) -> Result<(), ConfigError> {
        if self.found.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(self.found))
        }
    }
}

/// The configuration could not be read or is invalid.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A configuration file could not be read or parsed.
    #[error("cannot read configuration file {path}: {message}")]
    Unreadable {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// One or more keys are wrong.
    #[error("invalid configuration:{}", list(.0))]
    Invalid(Vec<ConfigProblem>),
}

impl ConfigError {
    /// Every problem found, for an [`ConfigError::Invalid`] configuration.
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            ConfigError::Invalid(problems) => problems,
            ConfigError::Unreadable { .. } => &[],
        }
    }
}

fn list(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

/// Suggests the closest of `candidates` to a misspelled `name`, when one is close.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// ` did you mean `x`?` when a candidate is close, else nothing.
pub(crate) fn suggestion<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    did_you_mean(name, candidates)
        .map(|c| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}

/// A value in the merged configuration, with its full key and its origin.
///
/// Binders read their own sections through it, so their errors name the file and key too.
/// Its `Debug` shows secrets as `***` and URIs without their password.
#[derive(Clone)]
pub struct ConfigNode {
    key: String,
    value: Value,
}

impl std::fmt::Debug for ConfigNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {}", self.key, redacted(&self.key, &self.value))
    }
}

/// `value` as text, each secret (by its key) shown as `***` and each URI without its password.
pub(crate) fn redacted(key: &str, value: &Value) -> String {
    match &value.kind {
        ValueKind::Table(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let entries: Vec<String> = keys
                .into_iter()
                .map(|name| {
                    let child = match key.is_empty() {
                        true => name.clone(),
                        false => format!("{key}.{name}"),
                    };
                    format!("{name} = {}", redacted(&child, &map[name]))
                })
                .collect();
            format!("{{ {} }}", entries.join(", "))
        }
        ValueKind::Array(items) => {
            let items: Vec<String> = items.iter().map(|item| redacted(key, item)).collect();
            format!("[{}]", items.join(", "))
        }
        ValueKind::String(text) => format!("\"{}\"", display_value(key, text)),
        other => display_value(key, &other.to_string()),
    }
}

/// The entries of a configuration table, by key.
pub type ConfigTable = BTreeMap<String, ConfigNode>;

impl ConfigNode {
    pub(crate) fn new(key: impl Into<String>, value: Value) -> Self {
        ConfigNode {
            key: key.into(),
            value,
        }
    }

    /// The full key, such as `stream.binders.kafka.brokers`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The last part of the key.
    pub fn name(&self) -> &str {
        self.key.rsplit('.').next().unwrap_or(&self.key)
    }

    /// Where the value came from: a file path or an environment variable.
    pub fn origin(&self) -> String {
        fn first_origin(value: &Value) -> Option<String> {
            if let Some(origin) = value.origin() {
                return Some(origin.to_owned());
            }
            match &value.kind {
                ValueKind::Table(map) => {
                    let mut keys: Vec<_> = map.keys().collect();
                    keys.sort();
                    keys.into_iter().find_map(|k| first_origin(&map[k]))
                }
                ValueKind::Array(items) => items.iter().find_map(first_origin),
                _ => None,
            }
        }
        first_origin(&self.value).unwrap_or_else(|| "the configuration".to_owned())
    }

    /// The value, shown for an error message with secrets hidden.
    pub fn shown(&self) -> String {
        let text = match &self.value.kind {
            ValueKind::String(s) => format!("\"{s}\""),
            ValueKind::Table(_) => "a table".to_owned(),
            ValueKind::Array(_) => "a list".to_owned(),
            other => other.to_string(),
        };
        display_value(&self.key, &text)
    }

    fn child(&self, name: &str, value: &Value) -> ConfigNode {
        let key = match (self.key.is_empty(), name.contains('.')) {
            (true, _) => name.to_owned(),
            (false, true) => format!("{}.\"{name}\"", self.key),
            (false, false) => format!("{}.{name}", self.key),
        };
        ConfigNode::new(key, value.clone())
    }

    /// The entries of a table whose keys are free (binding names, binder names, passthrough maps).
    pub fn entries(&self, problems: &mut Problems) -> Option<ConfigTable> {
        match &self.value.kind {
            ValueKind::Table(map) => Some(
                map.iter()
                    .map(|(name, value)| (name.clone(), self.child(name, value)))
                    .collect(),
            ),
            _ => {
                problems.at(self, format!("expected a table, found {}", self.shown()));
                None
            }
        }
    }

    /// The entries of a table whose keys must be among `allowed`; others are reported with
    /// the closest allowed key.
    pub fn table(&self, allowed: &[&str], problems: &mut Problems) -> Option<ConfigTable> {
        let entries = self.entries(problems)?;
        for (name, node) in &entries {
            if !allowed.contains(&name.as_str()) {
                let hint = suggestion(name, allowed.iter().copied());
                let hint = if hint.is_empty() {
                    format!("; expected one of {}", quoted_list(allowed))
                } else {
                    hint
                };
                problems.at(node, format!("unknown key{hint}"));
            }
        }
        Some(entries)
    }

    /// A string.
    pub fn string(&self, problems: &mut Problems) -> Option<String> {
        match &self.value.kind {
            ValueKind::String(s) => Some(s.clone()),
            _ => {
                problems.at(self, format!("expected a string, found {}", self.shown()));
                None
            }
        }
    }

    /// A whole number of at least `min` (strings from environment variables are parsed).
    pub fn integer(&self, min: i64, problems: &mut Problems) -> Option<i64> {
        let number = match &self.value.kind {
            ValueKind::I64(n) => Some(*n),
            ValueKind::U64(n) => i64::try_from(*n).ok(),
            ValueKind::I128(n) => i64::try_from(*n).ok(),
            ValueKind::U128(n) => i64::try_from(*n).ok(),
            ValueKind::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match number {
            Some(n) if n >= min => Some(n),
            Some(n) => {
                problems.at(self, format!("must be at least {min}, found {n}"));
                None
            }
            None => {
                problems.at(
                    self,
                    format!("expected a whole number, found {}", self.shown()),
                );
                None
            }
        }
    }

    /// A whole number from `min` to `max`: one out of range is reported, never clamped.
    pub fn integer_in(&self, min: i64, max: i64, problems: &mut Problems) -> Option<i64> {
        let n = self.integer(min, problems)?;
        if n > max {
            problems.at(self, format!("is too large: at most {max}, found {n}"));
            return None;
        }
        Some(n)
    }

    /// A number of at least `min`.
    pub fn float(&self, min: f64, problems: &mut Problems) -> Option<f64> {
        let number = match &self.value.kind {
            ValueKind::Float(n) => Some(*n),
            ValueKind::I64(n) => Some(*n as f64),
            ValueKind::U64(n) => Some(*n as f64),
            ValueKind::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        match number {
            Some(n) if n >= min && n.is_finite() => Some(n),
            Some(n) => {
                problems.at(
                    self,
                    format!("must be a number of at least {min}, found {n}"),
                );
                None
            }
            None => {
                problems.at(self, format!("expected a number, found {}", self.shown()));
                None
            }
        }
    }

    /// `true` or `false` (also as text, from environment variables).
    pub fn boolean(&self, problems: &mut Problems) -> Option<bool> {
        match &self.value.kind {
            ValueKind::Boolean(b) => Some(*b),
            ValueKind::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
            ValueKind::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
            _ => {
                problems.at(
                    self,
                    format!("expected true or false, found {}", self.shown()),
                );
                None
            }
        }
    }

    /// A positive duration written like `"1s"`, `"250ms"` or `"2m 30s"`.
    pub fn duration(&self, problems: &mut Problems) -> Option<Duration> {
        let parsed = match &self.value.kind {
            ValueKind::String(s) => humantime::parse_duration(s.trim()).map_err(|e| e.to_string()),
            _ => Err("it is not text".to_owned()),
        };
        match parsed {
            Ok(d) if d > LONGEST_DURATION => {
                problems.at(self, "must be at most 365 days");
                None
            }
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                problems.at(self, "must be longer than zero");
                None
            }
            Err(why) => {
                problems.at(
                    self,
                    format!(
                        "expected a duration such as \"1s\", \"250ms\" or \"2m\", found {} ({why})",
                        self.shown()
                    ),
                );
                None
            }
        }
    }

    /// A list of strings: a TOML array, or text separated by `;` or `,`.
    pub fn string_list(&self, problems: &mut Problems) -> Option<Vec<String>> {
        match &self.value.kind {
            ValueKind::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let node = ConfigNode::new(format!("{}[{i}]", self.key), item.clone());
                    out.push(node.string(problems)?);
                }
                Some(out)
            }
            ValueKind::String(s) => Some(
                s.split([';', ','])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => {
                problems.at(
                    self,
                    format!("expected a list of names, found {}", self.shown()),
                );
                None
            }
        }
    }

    /// A scalar rendered as text, for passthrough settings handed to a broker client.
    pub fn scalar_text(&self, problems: &mut Problems) -> Option<String> {
        match &self.value.kind {
            ValueKind::String(s) => Some(s.clone()),
            ValueKind::Boolean(b) => Some(b.to_string()),
            ValueKind::I64(n) => Some(n.to_string()),
            ValueKind::U64(n) => Some(n.to_string()),
            ValueKind::Float(n) => Some(n.to_string()),
            _ => {
                problems.at(
                    self,
                    format!(
                        "expected a string, number or boolean, found {}",
                        self.shown()
                    ),
                );
                None
            }
        }
    }
}

/// `a`, `b` and `c` as "`a`, `b`, `c`".
pub(crate) fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|i| format!("`{i}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
