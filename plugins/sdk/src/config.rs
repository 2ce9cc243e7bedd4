//! Config parsing helpers: key paths in errors, durations, ordered maps.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};

use crate::{Error, Result};

/// Parses a step's config (JSON text) into `T`; errors name the key path.
pub fn parse<T: DeserializeOwned>(json: &str) -> Result<T> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    let de = &mut serde_json::Deserializer::from_str(json);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends "at line 1 column 42" of the JSON text, which the user never saw.
        let text = inner.to_string();
        let text = match text.rfind(" at line ") {
            Some(i) => text[..i].to_string(),
            None => text,
        };
        if path == "." {
            Error::config("", text)
        } else {
            Error::config(&path, text)
        }
    })
}

/// A span of time, written `500ms`, `30s`, `5m`, `1h30m`, `7d`, or a number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration {
    millis: i64,
}

impl Duration {
    /// From milliseconds.
    pub const fn from_millis(millis: i64) -> Self {
        Duration { millis }
    }

    /// In milliseconds.
    pub const fn as_millis(self) -> i64 {
        self.millis
    }

    /// Parses `1h30m`-style text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let s = text.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        if let Ok(ms) = s.parse::<i64>() {
            return Ok(Duration { millis: ms });
        }
        let mut total: i64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "`{text}` is not a duration (expected e.g. `500ms`, `30s`, `5m`, `1h`, `7d`)"
                ));
            }
            let n: i64 = rest[..digits]
                .parse()
                .map_err(|_| format!("`{text}`: number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                other => {
                    return Err(format!(
                        "`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"
                    ));
                }
            };
            rest = &rest[unit_len..];
            total = n
                .checked_mul(unit)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("`{text}`: duration too large"))?;
        }
        Ok(Duration { millis: total })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
        ];
        for (size, unit) in units {
            if self.millis != 0 && self.millis % size == 0 {
                return write!(f, "{}{unit}", self.millis / size);
            }
        }
        write!(f, "{}ms", self.millis)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `500ms`, `30s`, `5m`, `1h` or `7d`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Ok(Duration::from_millis(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                i64::try_from(v)
                    .map(Duration::from_millis)
                    .map_err(|_| E::custom("duration too large"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A map that keeps its keys in the order the config wrote them (output columns follow it).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> OrderedMap<V> {
    /// The entries in config order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V2<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate key `{key}`")));
                    }
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(OrderedMap(entries))
            }
        }
        d.deserialize_map(V2(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(Duration::parse("500ms").map(Duration::as_millis), Ok(500));
        assert_eq!(
            Duration::parse("1h30m").map(Duration::as_millis),
            Ok(5_400_000)
        );
        assert_eq!(
            Duration::parse("7d").map(Duration::as_millis),
            Ok(604_800_000)
        );
        assert_eq!(Duration::parse("250").map(Duration::as_millis), Ok(250));
        assert!(Duration::parse("5 minutes").is_err());
        assert!(Duration::parse("m").is_err());
        assert!(Duration::parse("").is_err());
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        size: Duration,
        cols: OrderedMap<i64>,
    }

    #[test]
    fn config_errors_name_the_key() {
        let err = parse::<Cfg>(r#"{"size":"5x","cols":{}}"#).unwrap_err();
        assert!(
            err.message().starts_with("`size`: `5x`: unknown unit `x`"),
            "{err}"
        );
        let err = parse::<Cfg>(r#"{"size":"5m","cols":{"a":"x"}}"#).unwrap_err();
        assert!(err.message().starts_with("`cols.a`: invalid type"), "{err}");
        let err = parse::<Cfg>(r#"{"size":"5m","cols":{},"colz":1}"#).unwrap_err();
        assert!(err.message().contains("unknown field `colz`"), "{err}");
        assert!(!err.message().contains("line 1"), "{err}");
    }

    #[test]
    fn ordered_map_keeps_order() {
        let c: Cfg = parse(r#"{"size":1,"cols":{"z":1,"a":2,"m":3}}"#).unwrap();
        let keys: Vec<_> = c.cols.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["z", "a", "m"]);
        assert!(parse::<Cfg>(r#"{"size":1,"cols":{"a":1,"a":2}}"#).is_err());
    }
}
