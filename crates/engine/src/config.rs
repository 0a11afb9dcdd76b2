//! Reading the JSON configs of a diffusers-layout checkpoint.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::EngineError;

pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|_| EngineError::MissingFile(path.to_path_buf()))?;
    serde_json::from_str(&quote_non_finite(&text))
        .map_err(|e| EngineError::InvalidFile { path: path.to_path_buf(), why: e.to_string() })
}

/// diffusers writes configs with Python's `json`, which spells non-finite floats as bare `Infinity`,
/// `-Infinity` and `NaN` (DPM-Solver's `"lambda_min_clipped": -Infinity`); JSON has no such numbers.
/// They become strings of the same spelling, which the keys that hold them compare with.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    const WORDS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    if !WORDS.iter().any(|w| text.contains(w)) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if !in_string && let Some(word) = WORDS.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_non_finite_floats_read_as_strings_and_strings_stay_as_they_are() {
        let text = r#"{"lambda_min_clipped": -Infinity, "a": [Infinity, NaN], "s": "NaN \"-Infinity\"", "b": 1}"#;
        let v: serde_json::Value = serde_json::from_str(&quote_non_finite(text)).unwrap();
        assert_eq!(v["lambda_min_clipped"], "-Infinity");
        assert_eq!(v["a"], serde_json::json!(["Infinity", "NaN"]));
        assert_eq!(v["s"], "NaN \"-Infinity\"");
        assert_eq!(v["b"], 1);
    }
}
