//! Encoding generated images as PNG, JPEG or WebP, with OpenAI's `output_compression` (0-100, where 100
//! keeps the most quality) as the JPEG and WebP quality.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::{ImageFormat, RgbImage};

use crate::EngineError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
    Webp,
}

/// Encodes `img`; `compression` is ignored for PNG (lossless) and defaults to 100 for the others.
pub fn encode(img: &RgbImage, format: Format, compression: Option<u8>) -> Result<Vec<u8>, EngineError> {
    let quality = compression.unwrap_or(100).clamp(1, 100);
    let failed = |e: &dyn std::fmt::Display| EngineError::Encode(e.to_string());
    match format {
        Format::Png => {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, ImageFormat::Png).map_err(|e| failed(&e))?;
            Ok(out.into_inner())
        }
        Format::Jpeg => {
            let mut out = Vec::new();
            JpegEncoder::new_with_quality(&mut out, quality).encode_image(img).map_err(|e| failed(&e))?;
            Ok(out)
        }
        Format::Webp => {
            let encoder = webp::Encoder::from_rgb(img.as_raw(), img.width(), img.height());
            let encoded = if quality >= 100 { encoder.encode_lossless() } else { encoder.encode(f32::from(quality)) };
            Ok(encoded.to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7 + y * 3) as u8, (x * y) as u8, (x ^ y) as u8]))
    }

    #[test]
    fn formats_decode_back_and_compression_changes_size() {
        let img = noisy(64, 48);
        for (format, expect) in
            [(Format::Png, ImageFormat::Png), (Format::Jpeg, ImageFormat::Jpeg), (Format::Webp, ImageFormat::WebP)]
        {
            let bytes = encode(&img, format, None).unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), expect);
            let back = image::load_from_memory(&bytes).unwrap();
            assert_eq!((back.width(), back.height()), (64, 48));
        }
        for format in [Format::Jpeg, Format::Webp] {
            let high = encode(&img, format, Some(95)).unwrap().len();
            let low = encode(&img, format, Some(10)).unwrap().len();
            assert!(low < high, "{format:?}: {low} >= {high}");
        }
        // PNG is lossless: the bytes decode to the same pixels.
        let png = encode(&img, Format::Png, Some(10)).unwrap();
        assert_eq!(image::load_from_memory(&png).unwrap().to_rgb8(), img);
    }
}
