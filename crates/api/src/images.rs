//! Checking input images and masks for edits before anything is spent on them.
//!
//! An input must be a PNG, JPEG or WebP that really decodes; its pixel count is checked from the header
//! before decoding, so a small file that claims a gigantic canvas (a decompression bomb) is refused
//! without allocating it. Decoding is CPU work: call these from a blocking thread, not the async runtime.

use std::io::Cursor;

use bytes::Bytes;
use domain::{InputFormat, InputImage, ModelFamily, Size};
use image::{ImageFormat, ImageReader, Limits};

use crate::ApiError;

/// Per-image limits for the GPT image models (OpenAI: each image under 50 MB).
pub const GPT_MAX_IMAGE_BYTES: usize = 50 * 1024 * 1024;
/// dall-e-2 inputs and every mask: under 4 MB.
pub const SMALL_MAX_IMAGE_BYTES: usize = 4 * 1024 * 1024;
/// At most this many input images.
pub const MAX_INPUT_IMAGES: usize = 16;

/// Decodes `bytes` far enough to prove they are an acceptable image, and describes them.
/// `param` names the field in errors (`image`, `image[1]`, `mask`).
pub fn inspect_image(
    param: &str,
    bytes: Bytes,
    filename: Option<String>,
    max_pixels: u64,
) -> Result<InputImage, ApiError> {
    let format = match image::guess_format(&bytes) {
        Ok(ImageFormat::Png) => InputFormat::Png,
        Ok(ImageFormat::Jpeg) => InputFormat::Jpeg,
        Ok(ImageFormat::WebP) => InputFormat::Webp,
        Ok(other) => {
            return Err(ApiError::invalid_image(
                param,
                format!(
                    "Invalid input image '{param}': format '{}' is not supported. Supported formats are: 'png', 'jpeg', and 'webp'.",
                    other.extensions_str().first().copied().unwrap_or("unknown")
                ),
            ));
        }
        Err(_) => {
            return Err(ApiError::invalid_image(
                param,
                format!(
                    "Invalid input image '{param}': the file is not a recognised image. Supported formats are: 'png', 'jpeg', and 'webp'."
                ),
            ));
        }
    };
    let image_format = match format {
        InputFormat::Png => ImageFormat::Png,
        InputFormat::Jpeg => ImageFormat::Jpeg,
        InputFormat::Webp => ImageFormat::WebP,
    };
    let undecodable = |e: image::ImageError| {
        ApiError::invalid_image(param, format!("Invalid input image '{param}': it does not decode ({e})."))
    };

    let (width, height) =
        ImageReader::with_format(Cursor::new(&bytes[..]), image_format).into_dimensions().map_err(undecodable)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ApiError::invalid_image(
            param,
            format!(
                "Invalid input image '{param}': {width}x{height} is {pixels} pixels, more than this server's limit of {max_pixels}."
            ),
        ));
    }

    let mut reader = ImageReader::with_format(Cursor::new(&bytes[..]), image_format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // RGBA at 16 bits per channel is the largest buffer a decoder may need, plus slack for its own tables.
    limits.max_alloc = Some(pixels.saturating_mul(8).saturating_add(64 * 1024 * 1024));
    reader.limits(limits);
    let decoded = reader.decode().map_err(undecodable)?;

    Ok(InputImage { has_alpha: decoded.color().has_alpha(), bytes, format, size: Size::new(width, height), filename })
}

/// Checks the edit's input images against the model's rules: count, byte size, and for dall-e-2 one
/// square PNG.
pub fn check_inputs(images: &[InputImage], family: ModelFamily, model: &str) -> Result<(), ApiError> {
    if images.is_empty() {
        return Err(ApiError::missing("image"));
    }
    if images.len() > MAX_INPUT_IMAGES {
        return Err(ApiError::invalid_value_msg(
            "image",
            format!("Too many input images: {} were sent, and at most {MAX_INPUT_IMAGES} are allowed.", images.len()),
        ));
    }
    let dall_e_2 = family == ModelFamily::DallE2;
    if dall_e_2 && images.len() > 1 {
        return Err(ApiError::invalid_value_msg(
            "image",
            format!("Model '{model}' edits exactly one image, and {} were sent.", images.len()),
        ));
    }
    let limit = if dall_e_2 { SMALL_MAX_IMAGE_BYTES } else { GPT_MAX_IMAGE_BYTES };
    for (i, img) in images.iter().enumerate() {
        let param = image_param(i, images.len());
        if img.bytes.len() >= limit {
            return Err(ApiError::invalid_image(
                &param,
                format!(
                    "Invalid input image '{param}': {} bytes, and model '{model}' takes images under {limit} bytes.",
                    img.bytes.len()
                ),
            ));
        }
        if dall_e_2 && (img.format != InputFormat::Png || img.size.width != img.size.height) {
            return Err(ApiError::invalid_image(
                &param,
                format!(
                    "Invalid input image '{param}': model '{model}' needs a square PNG, and this is a {} {}x{}.",
                    img.format.extension(),
                    img.size.width,
                    img.size.height
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a mask: a PNG with an alpha channel, under 4 MB, the size of the first image.
pub fn check_mask(mask: &InputImage, first: &InputImage) -> Result<(), ApiError> {
    if mask.format != InputFormat::Png {
        return Err(ApiError::invalid_image(
            "mask",
            format!("Invalid mask: it must be a PNG, and this is a {}.", mask.format.extension()),
        ));
    }
    if !mask.has_alpha {
        return Err(ApiError::invalid_image(
            "mask",
            "Invalid mask: it must have an alpha channel (fully transparent pixels mark where to edit), and this PNG has none.".to_owned(),
        ));
    }
    if mask.bytes.len() >= SMALL_MAX_IMAGE_BYTES {
        return Err(ApiError::invalid_image(
            "mask",
            format!("Invalid mask: {} bytes, and masks must be under {SMALL_MAX_IMAGE_BYTES} bytes.", mask.bytes.len()),
        ));
    }
    if mask.size != first.size {
        return Err(ApiError::invalid_image(
            "mask",
            format!(
                "Invalid mask: it is {}, and it must have the same dimensions as the (first) image, {}.",
                mask.size, first.size
            ),
        ));
    }
    Ok(())
}

/// The name of the i-th image field in errors: `image` for a single image, `image[i]` otherwise.
pub fn image_param(i: usize, count: usize) -> String {
    if count == 1 { "image".to_owned() } else { format!("image[{i}]") }
}
