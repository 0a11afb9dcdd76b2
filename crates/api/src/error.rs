//! OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, and the constructors for
//! every error imagegate answers. Messages follow OpenAI's wording so that users recognise them, and always
//! say what was wrong and what is allowed.

use serde::{Deserialize, Serialize};

/// An error as the client sees it: an HTTP status and OpenAI's envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub body: ErrorBody,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

/// The inside of OpenAI's envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    error: T,
}

impl ApiError {
    pub fn new(status: u16, kind: &str, param: Option<&str>, code: Option<&str>, message: String) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                message,
                kind: kind.to_owned(),
                param: param.map(str::to_owned),
                code: code.map(str::to_owned),
            },
            retry_after: None,
        }
    }

    /// The same error naming another parameter.
    pub fn with_param(mut self, param: &str) -> Self {
        self.body.param = Some(param.to_owned());
        self
    }

    /// The same error with another message.
    pub fn with_message(mut self, message: String) -> Self {
        self.body.message = message;
        self
    }

    fn invalid(param: &str, code: &str, message: String) -> Self {
        ApiError::new(400, "invalid_request_error", Some(param), Some(code), message)
    }

    /// A value outside the allowed set: `Invalid value: 'x'. Supported values are: 'a', 'b', and 'c'.`
    pub fn invalid_value<T: std::fmt::Display>(param: &str, value: &str, allowed: &[T]) -> Self {
        let list: Vec<String> = allowed.iter().map(|v| format!("'{v}'")).collect();
        ApiError::invalid(
            param,
            "invalid_value",
            format!("Invalid value: '{value}'. Supported values are: {}.", english_list(&list)),
        )
    }

    /// Any other invalid value, with a message written for the case.
    pub fn invalid_value_msg(param: &str, message: String) -> Self {
        ApiError::invalid(param, "invalid_value", message)
    }

    pub fn invalid_type(param: &str, expected: &str, got: &str) -> Self {
        ApiError::invalid(
            param,
            "invalid_type",
            format!("Invalid type for '{param}': expected {expected}, but got {got} instead."),
        )
    }

    pub fn missing(param: &str) -> Self {
        ApiError::invalid(param, "missing_required_parameter", format!("Missing required parameter: '{param}'."))
    }

    pub fn unknown_parameter(param: &str) -> Self {
        ApiError::invalid(param, "unknown_parameter", format!("Unknown parameter: '{param}'."))
    }

    /// A parameter that exists but that the chosen model does not take.
    pub fn unsupported_parameter(param: &str, model: &str, supported_by: &str) -> Self {
        ApiError::invalid(
            param,
            "unsupported_parameter",
            format!("'{param}' is not supported with model '{model}': it is only supported for {supported_by}."),
        )
    }

    pub fn below_min(param: &str, min: i64, got: i64) -> Self {
        ApiError::invalid(
            param,
            "integer_below_min_value",
            format!(
                "Invalid '{param}': integer below minimum value. Expected a value >= {min}, but got {got} instead."
            ),
        )
    }

    pub fn above_max(param: &str, max: i64, got: i64) -> Self {
        ApiError::invalid(
            param,
            "integer_above_max_value",
            format!(
                "Invalid '{param}': integer above maximum value. Expected a value <= {max}, but got {got} instead."
            ),
        )
    }

    pub fn string_too_long(param: &str, max: usize, got: usize) -> Self {
        ApiError::invalid(
            param,
            "string_above_max_length",
            format!(
                "Invalid '{param}': string too long. Expected a string with maximum length {max}, but got a string with length {got} instead."
            ),
        )
    }

    pub fn empty_string(param: &str) -> Self {
        ApiError::invalid(
            param,
            "empty_string",
            format!(
                "Invalid '{param}': empty string. Expected a string with minimum length 1, but got an empty string instead."
            ),
        )
    }

    /// An input image or mask that is not acceptable.
    pub fn invalid_image(param: &str, message: String) -> Self {
        ApiError::invalid(param, "invalid_image", message)
    }

    /// A body that is not valid JSON or multipart.
    pub fn malformed_body(message: String) -> Self {
        ApiError::new(400, "invalid_request_error", None, Some("invalid_body"), message)
    }

    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        let hint = if available.is_empty() {
            "This instance serves no image models: configure a provider (see `imagegate serve --help`).".to_owned()
        } else {
            format!("Available models: {}.", available.join(", "))
        };
        ApiError::new(
            404,
            "invalid_request_error",
            Some("model"),
            Some("model_not_found"),
            format!("The model '{model}' does not exist or you do not have access to it. {hint}"),
        )
    }

    pub fn route_not_found(method: &str, path: &str) -> Self {
        ApiError::new(
            404,
            "invalid_request_error",
            None,
            Some("unknown_url"),
            format!("Invalid URL ({method} {path})."),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str, allowed: &str) -> Self {
        ApiError::new(
            405,
            "invalid_request_error",
            None,
            Some("method_not_allowed"),
            format!("Method {method} is not allowed on {path}; use {allowed}."),
        )
    }

    pub fn payload_too_large(limit_bytes: usize) -> Self {
        ApiError::new(
            413,
            "invalid_request_error",
            None,
            Some("payload_too_large"),
            format!("The request body is larger than this server's limit of {limit_bytes} bytes."),
        )
    }

    pub fn unsupported_media_type(got: &str, expected: &str) -> Self {
        ApiError::new(
            415,
            "invalid_request_error",
            None,
            Some("unsupported_media_type"),
            format!("Unsupported Content-Type '{got}': expected {expected}."),
        )
    }

    pub fn missing_api_key() -> Self {
        ApiError::new(
            401,
            "invalid_request_error",
            None,
            None,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).".to_owned(),
        )
    }

    /// A key that is not known. Only a short prefix of it is echoed, never the secret.
    pub fn invalid_api_key(presented: &str) -> Self {
        let shown: String = presented.chars().take(6).collect();
        ApiError::new(
            401,
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            format!("Incorrect API key provided: {shown}***. Check the key this imagegate instance issued you."),
        )
    }

    /// An internal failure. The message is generic on purpose: details go to the log, not the client.
    pub fn internal(request_id: &str) -> Self {
        ApiError::new(
            500,
            "server_error",
            None,
            None,
            format!("The server had an error while processing your request. Request id: {request_id}."),
        )
    }

    /// An upstream that could not be reached or did not answer in time.
    pub fn upstream_unavailable(status: u16, provider: &str, what: &str) -> Self {
        let code = if status == 504 { "upstream_timeout" } else { "upstream_unavailable" };
        ApiError::new(status, "server_error", None, Some(code), format!("The upstream provider '{provider}' {what}."))
    }

    /// The envelope as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(&Envelope { error: &self.body }).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"server_error","param":null,"code":null}}"#.to_owned()
        })
    }
}

/// Reads OpenAI's envelope from an error body, if that is what it is.
pub fn parse_error_body(bytes: &[u8]) -> Option<ErrorBody> {
    serde_json::from_slice::<Envelope<ErrorBody>>(bytes).ok().map(|e| e.error)
}

/// `'a'`, `'a' and 'b'`, `'a', 'b', and 'c'`: the way OpenAI lists supported values.
fn english_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_size_reads_like_openai() {
        let e = ApiError::invalid_value("size", "1254x836", &["1024x1024", "1024x1536", "1536x1024", "auto"]);
        assert_eq!(e.status, 400);
        assert_eq!(
            e.body.message,
            "Invalid value: '1254x836'. Supported values are: '1024x1024', '1024x1536', '1536x1024', and 'auto'."
        );
        let json: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(json["error"]["param"], "size");
        assert_eq!(json["error"]["code"], "invalid_value");
        assert_eq!(json["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn envelope_round_trips() {
        let e = ApiError::missing("prompt");
        assert_eq!(parse_error_body(e.to_json().as_bytes()), Some(e.body));
        assert_eq!(parse_error_body(b"<html>"), None);
    }

    #[test]
    fn api_key_is_never_echoed_whole() {
        let e = ApiError::invalid_api_key("sk-very-secret-key");
        assert!(!e.body.message.contains("secret"));
    }
}
