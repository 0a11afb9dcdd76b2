//! The OpenAI Images API wire format, and the only crate that knows it (with the upstream client that
//! must speak it too).
//!
//! Requests come in as JSON objects or multipart fields and leave as validated `domain` requests;
//! results come back as `domain` types and leave as OpenAI's JSON and streaming events. Every error a
//! client can see is an [`ApiError`] in OpenAI's envelope.

pub mod batch;
pub mod buffer;
mod error;
pub mod estimates;
mod fields;
pub mod images;
mod request;
mod response;
pub mod upstream;

pub use error::{ApiError, ErrorBody, parse_error_body};
pub use fields::Fields;
pub use request::{RawRequest, allowed_sizes};
pub use response::{
    ModelObject, UpstreamStreamItem, cost_json, images_response_json, model_json, models_json, parse_images_response,
    parse_stream_event, stream_error_json, stream_event_json,
};
