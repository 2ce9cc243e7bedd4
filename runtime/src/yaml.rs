//! The one place that knows which YAML crate we use (`serde_norway`, the maintained fork of
//! `serde_yaml`). Errors name the file, the key path, and the line and column.

use serde::de::DeserializeOwned;

/// A YAML document that did not parse into what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}{location}: {path_prefix}{message}")]
pub struct YamlError {
    /// The file (or a label such as `--config`).
    pub file: String,
    /// `:line:column`, when the parser knows it.
    pub location: String,
    /// ``at `a.b`: `` when the key path is known.
    pub path_prefix: String,
    /// What was wrong.
    pub message: String,
}

/// Parses `text` (from `file`) into `T`.
pub fn from_str<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, YamlError> {
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let location = inner
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        let mut message = inner.to_string();
        // serde_norway appends " at line L column C", which `location` already says.
        if let Some(i) = message.find(" at line ") {
            message.truncate(i);
        }
        // serde_norway often starts its message with the key path, which `path_prefix` says.
        if let Some(rest) = message.strip_prefix(&format!("{path}: ")) {
            message = rest.to_string();
        }
        YamlError {
            file: file.to_string(),
            location,
            path_prefix: if path == "." || path.is_empty() {
                String::new()
            } else {
                format!("at `{path}`: ")
            },
            message,
        }
    })
}

/// Parses YAML (or JSON, which is YAML) into a JSON value, keeping key order: how a step's
/// `config:` block is handed to its plugin.
pub fn to_json(text: &str, file: &str) -> Result<serde_json::Value, YamlError> {
    from_str::<serde_json::Value>(text, file)
}
