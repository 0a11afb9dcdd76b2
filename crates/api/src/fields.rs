//! One reader for request fields, whether they came as a JSON object or as multipart text parts.
//!
//! Generations arrive as JSON, edits as multipart or JSON; the rules are the same, so the parser reads
//! every field through this type and reports type errors in OpenAI's words ("expected an integer, but
//! got a string instead"). JSON `null` means the field was not sent, as in OpenAI's spec (every
//! optional field is nullable).

use serde_json::{Map, Value};

use crate::ApiError;

/// The non-file fields of one request.
pub enum Fields<'a> {
    Json(&'a Map<String, Value>),
    /// Multipart text parts, in arrival order; a repeated name keeps its last value.
    Text(&'a [(String, String)]),
}

impl Fields<'_> {
    /// The names of every field present, for the unknown-parameter check.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Fields::Json(map) => map.keys().map(String::as_str).collect(),
            Fields::Text(parts) => parts.iter().map(|(k, _)| k.as_str()).collect(),
        }
    }

    fn text(&self, name: &str) -> Option<&str> {
        match self {
            Fields::Json(_) => None,
            Fields::Text(parts) => parts.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str()),
        }
    }

    fn json(&self, name: &str) -> Option<&Value> {
        match self {
            Fields::Json(map) => map.get(name).filter(|v| !v.is_null()),
            Fields::Text(_) => None,
        }
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        if let Some(t) = self.text(name) {
            return Ok(Some(t.to_owned()));
        }
        match self.json(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::invalid_type(name, "a string", json_kind(other))),
        }
    }

    /// An integer, as a JSON number without fraction or as decimal text in a multipart part.
    pub fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        if let Some(t) = self.text(name) {
            return t
                .trim()
                .parse::<i64>()
                .map(Some)
                .map_err(|_| ApiError::invalid_type(name, "an integer", &format!("'{t}'")));
        }
        match self.json(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                // Larger than i64 still counts as an integer for range errors; a fraction does not.
                None if n.as_u64().is_some() => Ok(Some(i64::MAX)),
                None => Err(ApiError::invalid_type(name, "an integer", "a decimal number")),
            },
            Some(other) => Err(ApiError::invalid_type(name, "an integer", json_kind(other))),
        }
    }

    /// A non-negative integer up to `u64::MAX` (the `seed`).
    pub fn unsigned(&self, name: &str) -> Result<Option<u64>, ApiError> {
        let parsed = if let Some(t) = self.text(name) {
            t.trim().parse::<u64>().ok()
        } else {
            match self.json(name) {
                None => return Ok(None),
                Some(Value::Number(n)) => n.as_u64(),
                Some(other) => {
                    return Err(ApiError::invalid_type(name, "an integer", json_kind(other)));
                }
            }
        };
        parsed.map(Some).ok_or_else(|| {
            ApiError::invalid_value_msg(
                name,
                format!("Invalid '{name}': expected an integer between 0 and {}.", u64::MAX),
            )
        })
    }

    /// A boolean, as JSON or as the text `true`/`false` that the SDKs send in multipart forms.
    pub fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        if let Some(t) = self.text(name) {
            return match t.trim() {
                "true" | "True" | "1" => Ok(Some(true)),
                "false" | "False" | "0" => Ok(Some(false)),
                other => Err(ApiError::invalid_type(name, "a boolean", &format!("'{other}'"))),
            };
        }
        match self.json(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(ApiError::invalid_type(name, "a boolean", json_kind(other))),
        }
    }
}

/// How OpenAI names a JSON value's type in its error messages.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_and_text_read_alike() {
        let obj = json!({"n": 2, "stream": true, "size": "1024x1024", "user": null});
        let map = obj.as_object().unwrap();
        let parts = vec![
            ("n".to_owned(), "2".to_owned()),
            ("stream".to_owned(), "true".to_owned()),
            ("size".to_owned(), "1024x1024".to_owned()),
        ];
        for f in [Fields::Json(map), Fields::Text(&parts)] {
            assert_eq!(f.integer("n").unwrap(), Some(2));
            assert_eq!(f.boolean("stream").unwrap(), Some(true));
            assert_eq!(f.string("size").unwrap().as_deref(), Some("1024x1024"));
            assert_eq!(f.string("user").unwrap(), None);
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let obj = json!({"n": "two", "stream": "yes", "prompt": 5, "seed": -1, "m": 1.5});
        let f = Fields::Json(obj.as_object().unwrap());
        let e = f.integer("n").unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("n"));
        assert_eq!(e.body.message, "Invalid type for 'n': expected an integer, but got a string instead.");
        assert_eq!(f.boolean("stream").unwrap_err().body.code.as_deref(), Some("invalid_type"));
        assert_eq!(f.string("prompt").unwrap_err().body.param.as_deref(), Some("prompt"));
        assert_eq!(f.unsigned("seed").unwrap_err().body.param.as_deref(), Some("seed"));
        assert_eq!(f.integer("m").unwrap_err().body.code.as_deref(), Some("invalid_type"));
    }
}
