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

/// One step of a key path: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A key in a mapping.
    Key(String),
    /// An item of a sequence.
    Index(usize),
}

/// Parses a key path as errors spell it: `a.b[2].c` (a leading `.` or `[0]` allowed).
pub fn parse_path(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key.to_string()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some((index, after)) = inner.split_once(']') else {
                break;
            };
            if let Ok(i) = index.parse() {
                out.push(Segment::Index(i));
            }
            rest = after;
        }
    }
    out
}

/// A node of a YAML document with where it starts, enough to find a key.
enum Node {
    Leaf,
    Seq(Vec<(Marker, Node)>),
    Map(Vec<(String, Marker, Node)>),
}

/// A place in the text: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

fn marker(span: &saphyr_parser::Span) -> Marker {
    Marker {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

type Events<'a> = saphyr_parser::Parser<'a, saphyr_parser::StrInput<'a>>;

/// Reads the node whose first event is `first` (and its span) from `events`.
fn node(first: saphyr_parser::Event<'_>, events: &mut Events<'_>) -> Option<Node> {
    use saphyr_parser::Event;
    Some(match first {
        Event::SequenceStart(..) => {
            let mut items = Vec::new();
            loop {
                let (event, span) = events.next()?.ok()?;
                if matches!(event, Event::SequenceEnd) {
                    break;
                }
                items.push((marker(&span), node(event, events)?));
            }
            Node::Seq(items)
        }
        Event::MappingStart(..) => {
            let mut entries = Vec::new();
            loop {
                let (event, span) = events.next()?.ok()?;
                let key = match event {
                    Event::MappingEnd => break,
                    Event::Scalar(ref text, ..) => text.to_string(),
                    _ => String::new(),
                };
                // The key's own node (a complex key is skipped whole).
                node(event, events)?;
                let (value, _) = events.next()?.ok()?;
                entries.push((key, marker(&span), node(value, events)?));
            }
            Node::Map(entries)
        }
        _ => Node::Leaf,
    })
}

/// Where the key (or item) at `path` starts in the YAML `text`, or where the deepest part of
/// the path that exists does (`None` if not even the first step does, or the text does not
/// parse).
pub fn locate(text: &str, path: &[Segment]) -> Option<Marker> {
    use saphyr_parser::Event;
    let mut events = saphyr_parser::Parser::new_from_str(text);
    let root = loop {
        let (event, _) = events.next()?.ok()?;
        if matches!(
            event,
            Event::MappingStart(..) | Event::SequenceStart(..) | Event::Scalar(..)
        ) {
            break node(event, &mut events)?;
        }
    };
    let mut here = &root;
    let mut found = None;
    for segment in path {
        let next = match (segment, here) {
            (Segment::Key(k), Node::Map(entries)) => entries
                .iter()
                .find(|(key, ..)| key == k)
                .map(|(_, at, n)| (*at, n)),
            (Segment::Index(i), Node::Seq(items)) => items.get(*i).map(|(at, n)| (*at, n)),
            _ => None,
        };
        match next {
            Some((at, n)) => {
                found = Some(at);
                here = n;
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "name: x\ntransforms:\n  - name: a\n    plugin: a.wasm\n  - name: b\n    plugin: b.wasm\n    config:\n      size: 5x\n      rules:\n        price: { min: 0, max: 1 }\n";

    #[test]
    fn keys_are_found_with_line_and_column() {
        let at = |p: &str| locate(TEXT, &parse_path(p)).map(|m| (m.line, m.column));
        assert_eq!(at("transforms[1].config.size"), Some((8, 7)));
        assert_eq!(at("transforms[1].config.rules.price.max"), Some((10, 26)));
        assert_eq!(at("transforms[1].plugin"), Some((6, 5)));
        assert_eq!(at("transforms[0]"), Some((3, 5)));
        // A key that is not there: the deepest part that is.
        assert_eq!(at("transforms[1].config.nope"), Some((7, 5)));
        assert_eq!(at("nothing"), None);
        // Odd text from an error message never panics.
        assert_eq!(
            parse_path("tags[0]]"),
            vec![Segment::Key("tags".into()), Segment::Index(0)]
        );
        assert_eq!(parse_path("a[é]"), vec![Segment::Key("a".into())]);
        assert_eq!(
            parse_path(".a[2][0].b"),
            vec![
                Segment::Key("a".into()),
                Segment::Index(2),
                Segment::Index(0),
                Segment::Key("b".into())
            ]
        );
    }
}
