//! `${VAR}` and `${VAR:-default}` in pipeline files, replaced before parsing so line and column
//! numbers in later errors still point into the file (a substitution stays on its line).

use std::collections::HashMap;

/// Replaces `${VAR}` and `${VAR:-default}` with values from `lookup`; a default may itself hold
/// references (`${LAKE:-${DATA_DIR:-../data}}`). `$${` writes a literal `${`. A variable that is
/// unset and has no default is an error naming it and its line.
pub fn interpolate(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut missing = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        out.push_str(&expand(line, n + 1, lookup, &mut missing)?);
    }
    if !missing.is_empty() {
        return Err(format!(
            "environment variable {} is not set and has no default (write `${{NAME:-default}}`)",
            missing.join(", ")
        ));
    }
    Ok(out)
}

/// The index in `s` (the text after a `${`) of the `}` that closes it, past nested `${…}`.
fn closing(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut j = 0;
    while j < bytes.len() {
        if bytes[j] == b'$' && bytes.get(j + 1) == Some(&b'{') {
            depth += 1;
            j += 2;
            continue;
        }
        if bytes[j] == b'}' {
            if depth == 0 {
                return Some(j);
            }
            depth -= 1;
        }
        j += 1;
    }
    None
}

/// [`interpolate`] for one line (`n`, 1-based), collecting unset names into `missing`.
fn expand(
    line: &str,
    n: usize,
    lookup: &dyn Fn(&str) -> Option<String>,
    missing: &mut Vec<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        out.push_str(&rest[..i]);
        let Some(end) = closing(&rest[i + 2..]) else {
            return Err(format!("line {n}: `${{` without a closing `}}`"));
        };
        let inner = &rest[i + 2..i + 2 + end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "line {n}: `${{{inner}}}` is not a variable reference (use `${{NAME}}` or `${{NAME:-default}}`)"
            ));
        }
        match (lookup(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(&expand(default, n, lookup, missing)?),
            (None, None) => missing.push(format!("`{name}` (line {n})")),
        }
        rest = &rest[i + 2 + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Looks names up in the process environment, with `--set`-style overrides first.
pub fn env_lookup(overrides: &HashMap<String, String>) -> impl Fn(&str) -> Option<String> + '_ {
    move |name| {
        overrides
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        (name == "BROKERS").then(|| "k1:9092".to_string())
    }

    #[test]
    fn substitutes_and_defaults() {
        let text = "a: ${BROKERS}\nb: ${GROUP:-flowgate}\nc: $${LITERAL}\n";
        assert_eq!(
            interpolate(text, &vars).unwrap(),
            "a: k1:9092\nb: flowgate\nc: ${LITERAL}\n"
        );
    }

    #[test]
    fn a_default_may_hold_references() {
        let text =
            "a: ${LAKE:-${BROKERS}/x}\nb: ${LAKE:-${DATA:-../data}}/bars\nc: ${BROKERS:-${NOPE}}\n";
        assert_eq!(
            interpolate(text, &vars).unwrap(),
            "a: k1:9092/x\nb: ../data/bars\nc: k1:9092\n"
        );
        let err = interpolate("a: ${LAKE:-${NOPE}}\n", &vars).unwrap_err();
        assert!(err.contains("`NOPE` (line 1)"), "{err}");
    }

    #[test]
    fn missing_variables_are_named_with_their_line() {
        let err = interpolate("a: 1\nb: ${NOPE}\n", &vars).unwrap_err();
        assert!(err.contains("`NOPE` (line 2)"), "{err}");
        assert!(interpolate("a: ${BAD NAME}", &vars).is_err());
        assert!(interpolate("a: ${OPEN", &vars).is_err());
    }
}
