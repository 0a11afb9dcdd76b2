//! Checking input images and masks for edits before anything is spent on them.
//!
//! An input must be a PNG, JPEG or WebP that really decodes. Checking one takes two steps:
//! [`probe_image`] reads the header and checks the pixel count, so a small file that claims a gigantic
//! canvas (a decompression bomb) is refused without allocating it, and says exactly how many bytes
//! decoding will take (for the server's decode budget); [`ProbedImage::decode`] then decodes it, large
//! images into memory mapped for them alone so that it goes back to the OS afterwards. Decoding is CPU
//! work: call these from a blocking thread, not the async runtime.

use std::io::Cursor;

use bytes::Bytes;
use domain::{InputFormat, InputImage, ModelFamily, Size};
use image::{ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::ApiError;

/// Per-image limits for the GPT image models (OpenAI: each image under 50 MB).
pub const GPT_MAX_IMAGE_BYTES: usize = 50 * 1024 * 1024;
/// dall-e-2 inputs and every mask: under 4 MB.
pub const SMALL_MAX_IMAGE_BYTES: usize = 4 * 1024 * 1024;
/// At most this many input images.
pub const MAX_INPUT_IMAGES: usize = 16;

/// The most bytes a pixel takes decoded: RGBA at 16 bits a channel (no PNG, JPEG or WebP decodes wider).
/// One image at `max_pixels` needs `max_pixels * MAX_DECODED_BYTES_PER_PIXEL` bytes to decode.
pub const MAX_DECODED_BYTES_PER_PIXEL: u64 = 8;

/// Decoded images at least this large go into an anonymous memory map, whose pages return to the OS
/// as soon as it is dropped: the process's allocator may keep freed memory for good (the `imagegate`
/// binary's jemalloc does), and one image can take 512 MB. Smaller ones stay on the allocator, for
/// which a map's system calls and page faults would cost more than they save.
pub const MAPPED_DECODE_MIN_BYTES: usize = 8 * 1024 * 1024;

/// An input whose header was read and accepted (format, pixel count): what decoding it will take,
/// known before anything is decoded.
#[derive(Debug, Clone)]
pub struct ProbedImage {
    param: String,
    bytes: Bytes,
    filename: Option<String>,
    format: InputFormat,
    size: Size,
    decoded_bytes: u64,
}

impl ProbedImage {
    /// The exact size of the buffer decoding this image fills, in bytes.
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded_bytes
    }

    /// The field this image came in (`image`, `image[1]`, `mask`).
    pub fn param(&self) -> &str {
        &self.param
    }

    /// Decodes the whole image, to prove that it really decodes, and describes it. Takes
    /// [`ProbedImage::decoded_bytes`] of memory while it runs (mapped from the OS for large images, and
    /// handed back when it returns), plus the decoder's own tables.
    pub fn decode(self) -> Result<InputImage, ApiError> {
        let has_alpha = decode_into_buffer(&self, MAPPED_DECODE_MIN_BYTES)?.0;
        Ok(InputImage { has_alpha, bytes: self.bytes, format: self.format, size: self.size, filename: self.filename })
    }
}

/// Reads the header of `bytes` and checks what can be checked without decoding: a supported format and
/// at most `max_pixels` pixels, so that a small file that claims a gigantic canvas (a decompression bomb)
/// is refused without allocating it. `param` names the field in errors (`image`, `image[1]`, `mask`).
pub fn probe_image(
    param: &str,
    bytes: Bytes,
    filename: Option<String>,
    max_pixels: u64,
) -> Result<ProbedImage, ApiError> {
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
    let (size, decoded_bytes) = {
        let decoder = ImageReader::with_format(Cursor::new(&bytes[..]), image_format(format))
            .into_decoder()
            .map_err(|e| undecodable(param, e))?;
        let (width, height) = decoder.dimensions();
        let pixels = u64::from(width) * u64::from(height);
        if pixels > max_pixels {
            return Err(ApiError::invalid_image(
                param,
                format!(
                    "Invalid input image '{param}': {width}x{height} is {pixels} pixels, more than this server's limit of {max_pixels}."
                ),
            ));
        }
        (Size::new(width, height), decoder.total_bytes())
    };
    Ok(ProbedImage { param: param.to_owned(), bytes, filename, format, size, decoded_bytes })
}

/// Reads the header, checks it ([`probe_image`]), then decodes the image ([`ProbedImage::decode`]).
/// Decoding is CPU work and takes up to 8 bytes a pixel: call this from a blocking thread, and see
/// `server`'s decode budget for bounding how many run at once.
pub fn inspect_image(
    param: &str,
    bytes: Bytes,
    filename: Option<String>,
    max_pixels: u64,
) -> Result<InputImage, ApiError> {
    probe_image(param, bytes, filename, max_pixels)?.decode()
}

/// The answer for a decode that has to wait for memory longer than the server lets it: 503, to retry
/// after `retry_after_secs`.
pub fn decode_busy(retry_after_secs: u64) -> ApiError {
    let mut e = ApiError::new(
        503,
        "server_error",
        None,
        Some("server_busy"),
        "The server is decoding too many large input images at the moment. Please retry your request after a brief wait."
            .to_owned(),
    );
    e.retry_after = Some(retry_after_secs);
    e
}

fn image_format(format: InputFormat) -> ImageFormat {
    match format {
        InputFormat::Png => ImageFormat::Png,
        InputFormat::Jpeg => ImageFormat::Jpeg,
        InputFormat::Webp => ImageFormat::WebP,
    }
}

/// The decoder's error in words a client can use: what kind of problem, never the decoder's own
/// message (which can carry its internal structures).
fn undecodable(param: &str, e: image::ImageError) -> ApiError {
    let why = decode_problem(&e);
    ApiError::invalid_image(param, format!("Invalid input image '{param}': it does not decode ({why})."))
}

fn decode_problem(e: &image::ImageError) -> &'static str {
    match e {
        image::ImageError::Decoding(_) => "its data is corrupt or truncated",
        image::ImageError::Limits(_) => "it needs more memory to decode than this server allows",
        image::ImageError::Unsupported(_) => "it uses a feature of its format that is not supported",
        image::ImageError::IoError(_) => "its data ends early",
        image::ImageError::Parameter(_) | image::ImageError::Encoding(_) => "it is not a valid image",
    }
}

/// Where a decoded image goes: the allocator's memory, or pages mapped for it alone.
enum DecodeBuffer {
    Heap(Vec<u8>),
    Mapped(memmap2::MmapMut),
}

impl DecodeBuffer {
    /// `len` zeroed bytes, mapped from the OS when `len >= mapped_min`.
    fn new(len: usize, mapped_min: usize) -> std::io::Result<DecodeBuffer> {
        if len < mapped_min || len == 0 {
            return Ok(DecodeBuffer::Heap(vec![0; len]));
        }
        let map = memmap2::MmapMut::map_anon(len)?;
        // Huge pages cut the page faults of filling it 512-fold where the kernel only gives them on
        // request (THP `madvise`); a hint, so a kernel without them changes nothing.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(DecodeBuffer::Mapped(map))
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            DecodeBuffer::Heap(v) => v,
            DecodeBuffer::Mapped(m) => m,
        }
    }

    #[cfg(test)]
    fn as_slice(&self) -> &[u8] {
        match self {
            DecodeBuffer::Heap(v) => v,
            DecodeBuffer::Mapped(m) => m,
        }
    }
}

/// Decodes `probed` into a buffer of its own (mapped when at least `mapped_min` bytes), under the same
/// limits as `ImageReader::decode`: the image's own dimensions, and at most 8 bytes a pixel plus 64 MB
/// of the decoder's own tables. Returns whether the image has alpha, and the pixels.
fn decode_into_buffer(probed: &ProbedImage, mapped_min: usize) -> Result<(bool, DecodeBuffer), ApiError> {
    let param = probed.param.as_str();
    let (width, height) = (probed.size.width, probed.size.height);
    let pixels = u64::from(width) * u64::from(height);
    let mut reader = ImageReader::with_format(Cursor::new(&probed.bytes[..]), image_format(probed.format));
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // RGBA at 16 bits per channel is the largest buffer a decoder may need, plus slack for its own tables.
    limits.max_alloc = Some(pixels.saturating_mul(MAX_DECODED_BYTES_PER_PIXEL).saturating_add(64 * 1024 * 1024));
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(|e| undecodable(param, e))?;
    // As `ImageReader::decode` does: the output buffer counts against `max_alloc`, and the decoder
    // gets what is left for its own allocations.
    let total = decoder.total_bytes();
    limits.reserve(total).map_err(|e| undecodable(param, e))?;
    decoder.set_limits(limits).map_err(|e| undecodable(param, e))?;
    let has_alpha = decoder.color_type().has_alpha();
    // Both fail only when the machine has no memory for the image: like a full decode budget, a 503.
    let len = usize::try_from(total).map_err(|_| decode_busy(1))?;
    let mut buf = DecodeBuffer::new(len, mapped_min).map_err(|_| decode_busy(1))?;
    decoder.read_image(buf.as_mut_slice()).map_err(|e| undecodable(param, e))?;
    Ok((has_alpha, buf))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use image::{DynamicImage, ImageBuffer, Rgba};

    /// A PNG chunk: length, type, data, CRC-32 (bitwise: the test needs a handful).
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut crc = 0xffff_ffffu32;
        for &b in kind.iter().chain(data) {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
            }
        }
        let mut out = u32::try_from(data.len()).unwrap().to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&(!crc).to_be_bytes());
        out
    }

    /// A PNG whose header says `width`x`height`, 16-bit RGBA, and whose image data is not zlib data.
    fn png_with_garbage_data(width: u32, height: u32) -> Bytes {
        let mut ihdr = width.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[16, 6, 0, 0, 0]);
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend(chunk(b"IHDR", &ihdr));
        png.extend(chunk(b"IDAT", &[0xff; 200]));
        png.extend(chunk(b"IEND", &[]));
        Bytes::from(png)
    }

    #[test]
    fn a_tiny_file_claiming_a_huge_canvas_is_refused_from_its_header() {
        let bomb = png_with_garbage_data(100_000, 100_000);
        assert!(bomb.len() < 400, "{} bytes", bomb.len());
        let e = inspect_image("image", bomb.clone(), None, 64_000_000).unwrap_err();
        assert_eq!(
            (e.status, e.body.param.as_deref(), e.body.code.as_deref()),
            (400, Some("image"), Some("invalid_image"))
        );
        assert_eq!(
            e.body.message,
            "Invalid input image 'image': 100000x100000 is 10000000000 pixels, more than this server's limit of 64000000."
        );
        assert_eq!(probe_image("image", bomb, None, 64_000_000).unwrap_err(), e);

        // The same data under a small header does not decode: had the bomb been decoded before its
        // pixel count was checked, its error would have been this one.
        let small = probe_image("image", png_with_garbage_data(8, 8), None, 64_000_000).unwrap();
        assert_eq!(small.decoded_bytes(), 8 * 8 * 8);
        let e = small.decode().unwrap_err();
        assert_eq!((e.status, e.body.param.as_deref()), (400, Some("image")));
        assert!(e.body.message.starts_with("Invalid input image 'image': it does not decode ("), "{}", e.body.message);
    }

    fn encode(img: &DynamicImage, format: ImageFormat) -> Bytes {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        Bytes::from(out.into_inner())
    }

    /// PNG (8 and 16 bits, with and without alpha), JPEG and WebP (with and without alpha), 67x45.
    fn samples() -> Vec<(&'static str, Bytes)> {
        let rgba16 = ImageBuffer::from_fn(67, 45, |x, y| {
            Rgba([(x * 977) as u16, (y * 1409) as u16, 30_000, if x < 30 { 0 } else { 65_535 }])
        });
        let rgba16 = DynamicImage::ImageRgba16(rgba16);
        let rgb16 = DynamicImage::ImageRgb16(rgba16.to_rgb16());
        let rgba8 = DynamicImage::ImageRgba8(rgba16.to_rgba8());
        let rgb8 = DynamicImage::ImageRgb8(rgba16.to_rgb8());
        vec![
            ("png rgb8", encode(&rgb8, ImageFormat::Png)),
            ("png rgba8", encode(&rgba8, ImageFormat::Png)),
            ("png rgb16", encode(&rgb16, ImageFormat::Png)),
            ("png rgba16", encode(&rgba16, ImageFormat::Png)),
            ("jpeg", encode(&rgb8, ImageFormat::Jpeg)),
            ("webp rgb", encode(&rgb8, ImageFormat::WebP)),
            ("webp rgba", encode(&rgba8, ImageFormat::WebP)),
        ]
    }

    /// Decoding into a map (or the heap) gives what `image::load_from_memory` gives: the same pixels,
    /// size and alpha, and `decoded_bytes` is the buffer's exact size.
    #[test]
    fn mapped_and_heap_decodes_match_the_image_crate() {
        let mut alphas = Vec::new();
        for (name, bytes) in samples() {
            let reference = image::load_from_memory(&bytes).unwrap();
            let probed = probe_image("image", bytes.clone(), Some("x".to_owned()), 67 * 45).unwrap();
            assert_eq!(probed.decoded_bytes(), reference.as_bytes().len() as u64, "{name}");
            for mapped_min in [0, usize::MAX] {
                let (has_alpha, buf) = decode_into_buffer(&probed, mapped_min).unwrap();
                assert_eq!(matches!(buf, DecodeBuffer::Mapped(_)), mapped_min == 0, "{name}");
                assert_eq!(has_alpha, reference.color().has_alpha(), "{name}");
                assert!(buf.as_slice() == reference.as_bytes(), "{name}: the pixels differ (mapped_min {mapped_min})");
            }
            let input = probed.decode().unwrap();
            assert_eq!(
                (input.size, input.has_alpha, input.bytes, input.filename.as_deref()),
                (Size::new(67, 45), reference.color().has_alpha(), bytes, Some("x")),
                "{name}"
            );
            alphas.push((name, input.has_alpha));
        }
        // The samples cover both answers of each format that has alpha.
        assert_eq!(
            alphas,
            [
                ("png rgb8", false),
                ("png rgba8", true),
                ("png rgb16", false),
                ("png rgba16", true),
                ("jpeg", false),
                ("webp rgb", false),
                ("webp rgba", true)
            ]
        );
    }

    /// One pixel over the limit is refused before decoding; at the limit the image decodes.
    #[test]
    fn the_pixel_limit_is_inclusive() {
        let (_, png) = samples().swap_remove(3);
        let e = probe_image("image[2]", png.clone(), None, 67 * 45 - 1).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image[2]"));
        assert!(
            e.body.message.contains("67x45 is 3015 pixels, more than this server's limit of 3014"),
            "{}",
            e.body.message
        );
        assert_eq!(probe_image("image[2]", png, None, 67 * 45).unwrap().decoded_bytes(), 67 * 45 * 8);
    }

    #[test]
    fn decode_busy_is_a_503_to_retry() {
        let e = decode_busy(2);
        assert_eq!((e.status, e.retry_after), (503, Some(2)));
        assert_eq!(
            (e.body.kind.as_str(), e.body.code.as_deref(), e.body.param),
            ("server_error", Some("server_busy"), None)
        );
        assert!(e.body.message.contains("retry"), "{}", e.body.message);
    }

    /// A PNG whose header checksum is wrong: the decoder's message (its chunk structures, checksums)
    /// stays out of the client's error.
    #[test]
    fn a_corrupt_image_is_refused_without_the_decoders_internals() {
        let mut png = Vec::new();
        image::RgbImage::new(8, 8).write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png).unwrap();
        // The IHDR chunk's CRC sits after the 8-byte signature, the chunk's length and type (8) and its
        // 13 bytes of data.
        png[8 + 8 + 13] ^= 0xff;
        let e = inspect_image("image", Bytes::from(png), None, 1_000_000).unwrap_err();
        let message = &e.body.message;
        assert!(message.contains("does not decode"), "{message}");
        for internal in ["ChunkType", "CRC", "critical", "0x"] {
            assert!(!message.contains(internal), "{message}");
        }
    }
}
