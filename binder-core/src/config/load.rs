use std::path::{Path, PathBuf};
use std::sync::Arc;

use config::{FileFormat, Map, Source, Value, ValueKind};
use serde::de::DeserializeOwned;

use super::ConfigError;

/// Where the base configuration comes from.
#[derive(Clone, Default)]
pub enum ConfigSource {
    /// `BINDERY_CONFIG` if set, else `application.toml` in the working directory if present.
    #[default]
    Default,
    /// This file, which must exist (`BINDERY_CONFIG` still wins when set).
    File(PathBuf),
    /// TOML text, named in errors by `name`.
    Text {
        /// How errors refer to this text.
        name: String,
        /// The TOML.
        toml: String,
    },
}

impl std::fmt::Debug for ConfigSource {
    /// Names the source, never its text (which may hold passwords).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Default => f.write_str("Default"),
            ConfigSource::File(path) => f.debug_tuple("File").field(path).finish(),
            ConfigSource::Text { name, .. } => f
                .debug_struct("Text")
                .field("name", name)
                .finish_non_exhaustive(),
        }
    }
}

#[derive(Clone, Default)]
pub(crate) struct LoadOptions {
    pub(crate) source: ConfigSource,
    /// Profiles chosen in code; `None` reads `BINDERY_PROFILE`.
    pub(crate) profiles: Option<Vec<String>>,
    /// Environment variables to read; `None` reads the process environment.
    pub(crate) environment: Option<Vec<(String, String)>>,
}

impl std::fmt::Debug for LoadOptions {
    /// Environment variables by name only: their values may be secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Option<Vec<&str>> = self
            .environment
            .as_ref()
            .map(|vars| vars.iter().map(|(name, _)| name.as_str()).collect());
        f.debug_struct("LoadOptions")
            .field("source", &self.source)
            .field("profiles", &self.profiles)
            .field("environment", &names)
            .finish()
    }
}

const ENV_PREFIX: &str = "BINDERY_";
const ENV_CONFIG: &str = "BINDERY_CONFIG";
const ENV_PROFILE: &str = "BINDERY_PROFILE";

/// The process's environment variables that are text. One that is not (any program can set
/// such a variable) is skipped, unless it is bindery's, which is an error naming it.
fn process_environment() -> Result<Vec<(String, String)>, ConfigError> {
    text_variables(std::env::vars_os())
}

fn text_variables(
    variables: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut environment = Vec::new();
    for (name, value) in variables {
        let ours = name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes());
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => environment.push((name, value)),
            (name, _) if ours => {
                let name = name.unwrap_or_else(|name| name.to_string_lossy().into_owned());
                return Err(ConfigError::Invalid(vec![super::ConfigProblem {
                    origin: format!("environment variable {name}"),
                    key: name,
                    message: "its name or value is not UTF-8 text; set it as text".to_owned(),
                }]));
            }
            _ => {}
        }
    }
    Ok(environment)
}

/// Reads every layer and merges them: base file, profile files in order, then environment.
pub(crate) fn load(options: &LoadOptions) -> Result<Value, ConfigError> {
    let environment: Vec<(String, String)> = match &options.environment {
        Some(vars) => vars.clone(),
        None => process_environment()?,
    };
    let env_value = |name: &str| {
        environment
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.trim().is_empty())
    };

    let mut layers = Vec::new();
    let base_path: Option<PathBuf> = match (env_value(ENV_CONFIG), &options.source) {
        (Some(path), _) => Some(PathBuf::from(path)),
        (None, ConfigSource::File(path)) => Some(path.clone()),
        (None, ConfigSource::Text { name, toml }) => {
            layers.push(parse_text(name, toml)?);
            None
        }
        (None, ConfigSource::Default) => {
            let default = PathBuf::from("application.toml");
            if default.is_file() {
                Some(default)
            } else {
                None
            }
        }
    };
    if let Some(path) = &base_path {
        layers.push(read_file(path)?);
    }

    let profiles: Vec<String> = match &options.profiles {
        Some(profiles) => profiles.clone(),
        None => env_value(ENV_PROFILE)
            .map(|p| {
                p.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for profile in &profiles {
        let path = profile_path(base_path.as_deref(), profile);
        if !path.is_file() {
            return Err(ConfigError::Unreadable {
                path: path.display().to_string(),
                message: format!(
                    "profile `{profile}` is active (BINDERY_PROFILE) but this file does not exist; create it or remove the profile"
                ),
            });
        }
        layers.push(read_file(&path)?);
    }

    let mut merged = Value::new(None, ValueKind::Table(Map::new()));
    for mut layer in layers {
        normalize_binding_names(&mut layer)?;
        merge(&mut merged, layer);
    }
    apply_environment(&mut merged, &environment);
    Ok(merged)
}

/// Binding names are compared with `_` and `-` alike (`send_order-in-0` is `send-order-in-0`):
/// each layer's `[stream.bindings]` and `[stream.<binder type>.bindings]` entries are renamed
/// to the `-` form before the layers are merged. One file naming a binding both ways is an
/// error: which of its settings would win could not be told.
fn normalize_binding_names(layer: &mut Value) -> Result<(), ConfigError> {
    let ValueKind::Table(root) = &mut layer.kind else {
        return Ok(());
    };
    let Some(Value {
        kind: ValueKind::Table(stream),
        ..
    }) = root.get_mut("stream")
    else {
        return Ok(());
    };
    for (section_name, section) in stream.iter_mut() {
        let prefix = match section_name.as_str() {
            "bindings" => "stream.bindings".to_owned(),
            other => format!("stream.{other}.bindings"),
        };
        let bindings = match (section_name.as_str(), &mut section.kind) {
            ("bindings", _) => Some(section),
            (_, ValueKind::Table(extension)) => extension.get_mut("bindings"),
            _ => None,
        };
        let Some(Value {
            kind: ValueKind::Table(bindings),
            ..
        }) = bindings
        else {
            continue;
        };
        let mut names: Vec<String> = bindings.keys().cloned().collect();
        names.sort();
        for name in names {
            let normalized = super::normalize_name(&name);
            if normalized == name {
                continue;
            }
            let Some(value) = bindings.remove(&name) else {
                continue;
            };
            if bindings.contains_key(&normalized) {
                return Err(ConfigError::Invalid(vec![super::ConfigProblem {
                    origin: first_origin(&value).unwrap_or_else(|| "the configuration".to_owned()),
                    key: format!("{prefix}.{name}"),
                    message: format!(
                        "names the same binding as `{prefix}.{normalized}` (in binding names `_` and `-` are alike); keep one of them"
                    ),
                }]));
            }
            bindings.insert(normalized, value);
        }
    }
    Ok(())
}

/// Where the first value of `value` (a leaf, or the first leaf of a table) came from.
fn first_origin(value: &Value) -> Option<String> {
    if let Some(origin) = value.origin() {
        return Some(origin.to_owned());
    }
    match &value.kind {
        ValueKind::Table(map) => map.values().find_map(first_origin),
        _ => None,
    }
}

/// `application-kafka.toml` beside `application.toml`: the base file's stem, a dash, the profile.
fn profile_path(base: Option<&Path>, profile: &str) -> PathBuf {
    let base = base.unwrap_or(Path::new("application.toml"));
    let stem = base
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("application");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("toml");
    base.with_file_name(format!("{stem}-{profile}.{ext}"))
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(ConfigError::Unreadable {
            path: shown,
            message: "no such file; check BINDERY_CONFIG or the path given to the application"
                .to_owned(),
        });
    }
    let map = config::File::from(path.to_path_buf())
        .format(FileFormat::Toml)
        .collect()
        .map_err(|e| ConfigError::Unreadable {
            path: shown.clone(),
            message: without_source_lines(&e.to_string()),
        })?;
    Ok(Value::new(Some(&shown), ValueKind::Table(map)))
}

fn parse_text(name: &str, toml: &str) -> Result<Value, ConfigError> {
    let map = config::File::from_str(toml, FileFormat::Toml)
        .collect()
        .map_err(|e| ConfigError::Unreadable {
            path: name.to_owned(),
            message: without_source_lines(&e.to_string()),
        })?;
    Ok(with_origin(Value::new(None, ValueKind::Table(map)), name))
}

fn with_origin(value: Value, origin: &str) -> Value {
    let origin = origin.to_owned();
    let kind = match value.kind {
        ValueKind::Table(map) => ValueKind::Table(
            map.into_iter()
                .map(|(k, v)| (k, with_origin(v, &origin)))
                .collect(),
        ),
        ValueKind::Array(items) => {
            ValueKind::Array(items.into_iter().map(|v| with_origin(v, &origin)).collect())
        }
        other => other,
    };
    Value::new(Some(&origin), kind)
}

/// Applies `BINDERY_...` variables over the merged files: `__` separates keys, which are
/// lowercased, and a key that exists already is matched with `_` and `-` alike.
/// `BINDERY_STREAM__BINDINGS__BILL_IN_0__GROUP=x` sets `stream.bindings.bill-in-0.group = "x"`;
/// `BINDERY_APP__MAX_SIZE` overrides `app.max_size` or `app.max-size`, whichever the files
/// have. A new key is `-`-separated under `stream`; outside it, where serde's field names have
/// `_` and kebab-case ones `-`, it is set under both spellings.
fn apply_environment(root: &mut Value, environment: &[(String, String)]) {
    let mut vars: Vec<_> = environment
        .iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k != ENV_CONFIG && k != ENV_PROFILE)
        .collect();
    vars.sort();
    for (name, text) in vars {
        let origin = format!("environment variable {name}");
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            continue;
        }
        let in_stream = path[0] == "stream";
        let value = Value::new(Some(&origin), ValueKind::String(text.clone()));
        set_path(root, &path, value, in_stream);
    }
}

/// Sets `value` at `path` below `at`, creating tables on the way and replacing what is in the
/// way; see [`apply_environment`] for how a part of the path names a key.
fn set_path(at: &mut Value, path: &[String], value: Value, in_stream: bool) {
    let Some((part, rest)) = path.split_first() else {
        return merge(at, value);
    };
    if !matches!(at.kind, ValueKind::Table(_)) {
        at.kind = ValueKind::Table(Map::new());
    }
    let ValueKind::Table(table) = &mut at.kind else {
        return;
    };
    let dashed = part.replace('_', "-");
    let existing = table
        .keys()
        .find(|k| k.replace('_', "-") == dashed)
        .cloned();
    let keys = match (existing, in_stream) {
        (Some(key), _) => vec![key],
        (None, true) => vec![dashed],
        (None, false) if dashed != *part => vec![part.clone(), dashed],
        (None, false) => vec![part.clone()],
    };
    for key in keys {
        let slot = table
            .entry(key)
            .or_insert_with(|| Value::new(None, ValueKind::Table(Map::new())));
        set_path(slot, rest, value.clone(), in_stream);
    }
}

/// Deep merge: tables merge key by key, anything else replaces what was there.
fn merge(into: &mut Value, from: Value) {
    let origin = from.origin().map(str::to_owned);
    match (&mut into.kind, from.kind) {
        (ValueKind::Table(existing), ValueKind::Table(incoming)) => {
            for (key, value) in incoming {
                match existing.get_mut(&key) {
                    Some(slot) => merge(slot, value),
                    None => {
                        existing.insert(key, value);
                    }
                }
            }
        }
        (_, kind) => *into = Value::new(origin.as_ref(), kind),
    }
}

/// The application's own configuration: everything outside `[stream]`, merged from the same
/// files, profiles and environment variables.
///
/// ```
/// # use bindery_core::AppConfig;
/// # fn demo(config: AppConfig) -> Result<(), bindery_core::Error> {
/// let greeting: String = config.get("greeter.greeting")?;
/// # Ok(()) }
/// ```
///
/// `[stream]` is not part of it, and its `Debug` shows secrets as `***`.
#[derive(Clone)]
pub struct AppConfig {
    inner: Arc<config::Config>,
    tree: Arc<Value>,
}

impl std::fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppConfig {}", super::node::redacted("", &self.tree))
    }
}

impl AppConfig {
    pub(crate) fn new(merged: &Value) -> Self {
        let mut map = match &merged.kind {
            ValueKind::Table(map) => map.clone(),
            _ => Map::new(),
        };
        // The framework's section is read by the framework; the application gets the rest.
        map.remove("stream");
        map.remove("management");
        let tree = Value::new(None, ValueKind::Table(map.clone()));
        let inner = config::Config::builder()
            .add_source(Collected(map))
            .build()
            .unwrap_or_default();
        AppConfig {
            inner: Arc::new(inner),
            tree: Arc::new(tree),
        }
    }

    /// The value at a dotted key, such as `"greeter.greeting"`, as any deserializable type.
    /// An error names the key and what was expected, never a value: the value may be, or
    /// contain, a secret.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<T, crate::Error> {
        self.inner.get(key).map_err(|e| {
            let message = describe(&e);
            crate::Error::Config(ConfigError::Invalid(vec![super::ConfigProblem {
                origin: "the application configuration".to_owned(),
                key: key.to_owned(),
                message,
            }]))
        })
    }

    /// The value at `key`, or `None` when the key is absent.
    pub fn get_opt<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, crate::Error> {
        match self.inner.get::<Value>(key) {
            Err(config::ConfigError::NotFound(_)) => Ok(None),
            _ => self.get(key).map(Some),
        }
    }
}

/// A parse error without the lines of the file it quotes (they may hold a password): the
/// position and the reason stay.
fn without_source_lines(text: &str) -> String {
    text.lines()
        .filter(|line| {
            let trimmed = line.trim_start();
            let quoted = trimmed
                .trim_start_matches(|c: char| c.is_ascii_digit())
                .trim_start()
                .starts_with('|');
            !quoted
        })
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What went wrong reading a value, without the value: it may be, or contain, a secret.
fn describe(error: &config::ConfigError) -> String {
    use config::ConfigError as E;
    match error {
        E::NotFound(_) => "is not set".to_owned(),
        E::Type {
            unexpected,
            expected,
            ..
        } => {
            // Its text is the kind of value, then the value quoted: the kind only.
            let shown = unexpected.to_string();
            let kind = shown.split(['`', '"']).next().unwrap_or_default().trim();
            format!("expected {expected}, found {kind} (the value is not shown)")
        }
        E::At { error, .. } => describe(error),
        // serde's own: a missing field names the field, never a value.
        E::Message(text) if text.starts_with("missing field") => text.clone(),
        _ => "does not match the type asked for (the value is not shown)".to_owned(),
    }
}

#[derive(Clone, Debug)]
struct Collected(Map<String, Value>);

impl Source for Collected {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn variable(name: &[u8], value: &[u8]) -> (OsString, OsString) {
        (
            OsString::from_vec(name.to_vec()),
            OsString::from_vec(value.to_vec()),
        )
    }

    #[test]
    fn variables_that_are_not_text_are_skipped_unless_they_are_binderys() {
        let others = [
            variable(b"LANG", b"C"),
            variable(b"OLD_PATH", b"/opt/caf\xe9"),
            variable(b"\xff", b"x"),
        ];
        assert_eq!(
            text_variables(others.into_iter()).expect("others are skipped"),
            [("LANG".to_owned(), "C".to_owned())]
        );
        for ours in [
            variable(b"BINDERY_PROFILE", b"caf\xe9"),
            variable(b"BINDERY_STREAM_\xff", b"x"),
        ] {
            let error = text_variables([ours].into_iter()).expect_err("bindery's must be text");
            let text = error.to_string();
            assert!(text.contains("BINDERY_"), "{text}");
            assert!(text.contains("not UTF-8"), "{text}");
        }
    }
}
