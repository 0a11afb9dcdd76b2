//! The vocabulary of imagegate: validated image requests and their results.
//!
//! These types are what the providers (upstream HTTP, later the local engine), the pricing rules and the
//! ledger talk about. They know nothing of JSON, HTTP or SQL: the `api` crate turns wire requests into
//! these types (validating them on the way) and these results back into wire responses.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// The rule book a model follows: which sizes, qualities and options it accepts.
///
/// Every model imagegate serves behaves like one of OpenAI's families, so that an SDK user gets the same
/// validation they would get from OpenAI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// gpt-image-1-mini: the GPT image rules, without `input_fidelity`.
    GptImageMini,
    /// gpt-image-1, gpt-image-1.5 and compatible models.
    GptImage,
    /// gpt-image-2 and its snapshots: any size whose sides are multiples of 16 (longest side up to
    /// 3840, 655,360 to 8,294,400 pixels, aspect ratio up to 3:1), no transparent background, input
    /// fidelity always high (the parameter is refused).
    GptImage2,
    DallE3,
    DallE2,
    /// A model of the local engine: GPT-image-style options, any size the model supports, no
    /// transparency.
    Local,
}

impl ModelFamily {
    /// The family of one of OpenAI's image models, by its exact name.
    pub fn of_openai_model(name: &str) -> Option<ModelFamily> {
        Some(match name {
            "gpt-image-1-mini" => ModelFamily::GptImageMini,
            "gpt-image-1" | "gpt-image-1.5" | "gpt-image-1.5-2025-12-16" => ModelFamily::GptImage,
            "gpt-image-2" | "gpt-image-2-2026-04-21" => ModelFamily::GptImage2,
            "dall-e-3" => ModelFamily::DallE3,
            "dall-e-2" => ModelFamily::DallE2,
            _ => return None,
        })
    }

    pub fn is_gpt_image(self) -> bool {
        matches!(self, ModelFamily::GptImage | ModelFamily::GptImageMini | ModelFamily::GptImage2)
    }

    /// Whether the GPT image options (output format, compression, background, streaming, partial
    /// images, quality low/medium/high) apply.
    pub fn has_gpt_options(self) -> bool {
        self.is_gpt_image() || self == ModelFamily::Local
    }
}

/// OpenAI's image models, live or shut down (the price catalog says which, and until when): the
/// zero-config upstream provider serves those not yet shut down.
pub const OPENAI_IMAGE_MODELS: [&str; 8] = [
    "gpt-image-2",
    "gpt-image-2-2026-04-21",
    "gpt-image-1-mini",
    "gpt-image-1",
    "gpt-image-1.5",
    "gpt-image-1.5-2025-12-16",
    "dall-e-3",
    "dall-e-2",
];

/// gpt-image-2's size rule, as OpenAI's image generation guide states it.
pub mod gpt_image_2 {
    /// Both sides are multiples of this many pixels.
    pub const SIDE_MULTIPLE: u32 = 16;
    /// The longest side, in pixels.
    pub const MAX_SIDE: u32 = 3840;
    /// The fewest and the most pixels an image may have.
    pub const MIN_PIXELS: u64 = 655_360;
    pub const MAX_PIXELS: u64 = 8_294_400;
    /// The longest side is at most this many times the shortest.
    pub const MAX_ASPECT: u32 = 3;

    /// What is wrong with `width` x `height` for gpt-image-2, or `None` when it is allowed.
    pub fn size_problem(width: u32, height: u32) -> Option<String> {
        let (long, short) = (width.max(height), width.min(height));
        let pixels = u64::from(width) * u64::from(height);
        if !width.is_multiple_of(SIDE_MULTIPLE) || !height.is_multiple_of(SIDE_MULTIPLE) {
            Some(format!("both sides must be multiples of {SIDE_MULTIPLE} pixels"))
        } else if long > MAX_SIDE {
            Some(format!("the longest side must be at most {MAX_SIDE} pixels"))
        } else if u64::from(long) > u64::from(short) * u64::from(MAX_ASPECT) {
            Some(format!("the longest side must be at most {MAX_ASPECT} times the shortest (3:1)"))
        } else if pixels < MIN_PIXELS {
            Some(format!("the image must have at least {MIN_PIXELS} pixels (1024x640)"))
        } else if pixels > MAX_PIXELS {
            Some(format!("the image must have at most {MAX_PIXELS} pixels (3840x2160)"))
        } else {
            None
        }
    }
}

/// Width and height in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

impl Size {
    pub const fn new(width: u32, height: u32) -> Size {
        Size { width, height }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Size {
    type Err = ();
    /// Parses `WIDTHxHEIGHT` with positive decimal numbers, as OpenAI writes sizes.
    fn from_str(s: &str) -> Result<Size, ()> {
        let (w, h) = s.split_once('x').ok_or(())?;
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        if !digits(w) || !digits(h) {
            return Err(());
        }
        let width: u32 = w.parse().map_err(|_| ())?;
        let height: u32 = h.parse().map_err(|_| ())?;
        if width == 0 || height == 0 {
            return Err(());
        }
        Ok(Size { width, height })
    }
}

/// A requested size: a fixed one or `auto` (the provider chooses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChoice {
    Auto,
    Exact(Size),
}

/// Declares a closed set of string values with its wire spelling, parsing and listing in one place.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in the order OpenAI's documentation lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as it is spelled on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = ();
            fn from_str(s: &str) -> Result<Self, ()> {
                match s { $($text => Ok($name::$variant),)+ _ => Err(()) }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(
    /// Image quality. `Low`/`Medium`/`High` are the GPT image models', `Standard`/`Hd` DALL-E's.
    Quality { Standard => "standard", Hd => "hd", Low => "low", Medium => "medium", High => "high", Auto => "auto" }
);
wire_enum!(OutputFormat { Png => "png", Jpeg => "jpeg", Webp => "webp" });
wire_enum!(Background { Transparent => "transparent", Opaque => "opaque", Auto => "auto" });
wire_enum!(Moderation { Low => "low", Auto => "auto" });
wire_enum!(Style { Vivid => "vivid", Natural => "natural" });
wire_enum!(ResponseFormat { Url => "url", B64Json => "b64_json" });
wire_enum!(InputFidelity { High => "high", Low => "low" });
wire_enum!(
    /// imagegate's extension for local models: which VAE decoder makes the final images. `Tiny` is a
    /// TAESD, far cheaper and softer than the model's own (`Full`).
    Decoder { Full => "full", Tiny => "tiny" }
);
wire_enum!(
    /// imagegate's extension: which capacity a request runs on. `Flex` is half price and may be refused.
    ServiceTier { Auto => "auto", Default => "default", Flex => "flex" }
);
wire_enum!(
    /// The tier a request ran and was billed at (the catalog's `[tiers]` multipliers): `Default` runs at
    /// once, `Flex` (asked for with `service_tier`) and `Batch` (a line of a batch) when capacity is free.
    Tier { Default => "default", Flex => "flex", Batch => "batch" }
);

impl Tier {
    /// Whether the tier's work waits for capacity that interactive work leaves.
    pub fn is_background(self) -> bool {
        self != Tier::Default
    }
}

impl OutputFormat {
    pub fn mime_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// Options shared by generations and edits. `None` means the client did not send the field: providers
/// forward only what was sent, so that an upstream applies its own defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOptions {
    pub n: u8,
    pub size: Option<SizeChoice>,
    pub quality: Option<Quality>,
    pub output_format: Option<OutputFormat>,
    pub output_compression: Option<u8>,
    pub background: Option<Background>,
    pub moderation: Option<Moderation>,
    pub style: Option<Style>,
    pub response_format: Option<ResponseFormat>,
    pub user: Option<String>,
    pub stream: bool,
    /// Partial images requested while streaming (0..=3); always 0 when not streaming.
    pub partial_images: u8,
    pub service_tier: Option<ServiceTier>,
    pub seed: Option<u64>,
    /// Denoising steps instead of the quality's (local models only).
    pub steps: Option<u16>,
    /// The decoder instead of the quality's (local models only).
    pub decoder: Option<Decoder>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            n: 1,
            size: None,
            quality: None,
            output_format: None,
            output_compression: None,
            background: None,
            moderation: None,
            style: None,
            response_format: None,
            user: None,
            stream: false,
            partial_images: 0,
            service_tier: None,
            seed: None,
            steps: None,
            decoder: None,
        }
    }
}

/// A validated `POST /v1/images/generations`.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    pub options: ImageOptions,
}

/// A validated `POST /v1/images/edits`.
#[derive(Debug, Clone, PartialEq)]
pub struct EditRequest {
    pub prompt: String,
    /// One to sixteen input images; the mask applies to the first.
    pub images: Vec<InputImage>,
    pub mask: Option<InputImage>,
    pub input_fidelity: Option<InputFidelity>,
    pub options: ImageOptions,
}

/// A validated `POST /v1/images/variations`: new images like the input, without a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct VariationRequest {
    pub image: InputImage,
    pub options: ImageOptions,
}

/// What a request asks a provider to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageJob {
    Generate(GenerateRequest),
    Edit(EditRequest),
    Variation(VariationRequest),
}

impl ImageJob {
    pub fn options(&self) -> &ImageOptions {
        match self {
            ImageJob::Generate(r) => &r.options,
            ImageJob::Edit(r) => &r.options,
            ImageJob::Variation(r) => &r.options,
        }
    }

    /// The prompt; a variation has none (empty).
    pub fn prompt(&self) -> &str {
        match self {
            ImageJob::Generate(r) => &r.prompt,
            ImageJob::Edit(r) => &r.prompt,
            ImageJob::Variation(_) => "",
        }
    }

    pub fn kind(&self) -> JobKind {
        match self {
            ImageJob::Generate(_) => JobKind::Generate,
            ImageJob::Edit(_) => JobKind::Edit,
            ImageJob::Variation(_) => JobKind::Variation,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Generate,
    Edit,
    Variation,
}

impl JobKind {
    /// The operation's name in the ledger: `generation`, `edit` or `variation`.
    pub fn operation(self) -> &'static str {
        match self {
            JobKind::Generate => "generation",
            JobKind::Edit => "edit",
            JobKind::Variation => "variation",
        }
    }
}

/// The image formats accepted as input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    Png,
    Jpeg,
    Webp,
}

impl InputFormat {
    pub fn mime_type(self) -> &'static str {
        match self {
            InputFormat::Png => "image/png",
            InputFormat::Jpeg => "image/jpeg",
            InputFormat::Webp => "image/webp",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            InputFormat::Png => "png",
            InputFormat::Jpeg => "jpg",
            InputFormat::Webp => "webp",
        }
    }
}

/// An input image whose bytes were checked to decode, with what was learnt while checking.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    pub bytes: Bytes,
    pub format: InputFormat,
    pub size: Size,
    pub has_alpha: bool,
    /// The client's file name, kept so that an upstream sees the same upload.
    pub filename: Option<String>,
}

/// One output image, as a provider returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    pub payload: ImagePayload,
    pub revised_prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ImagePayload {
    /// Base64 text, kept as the upstream sent it so that it is never decoded and encoded again.
    Base64(String),
    /// A URL (DALL-E's `response_format=url`).
    Url(String),
}

/// Token usage, OpenAI's `ImagesUsage`. When a provider reports it, it is the billing truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
    pub input_text_tokens: u64,
    pub input_image_tokens: u64,
    /// `output_tokens_details`, when the provider reports it.
    pub output_image_tokens: Option<u64>,
    pub output_text_tokens: Option<u64>,
}

/// The resolved settings of a finished job: never `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resolved {
    pub size: Option<Size>,
    pub quality: Option<Quality>,
    pub background: Option<Background>,
    pub output_format: Option<OutputFormat>,
}

impl Resolved {
    /// Fills what a provider did not report from the request, resolving `auto` the way OpenAI documents
    /// it: size 1024x1024, background opaque, format png; quality `auto` becomes `high` for the GPT image
    /// models (the best quality, and the most expensive: a bill never understates it), `standard` for
    /// DALL-E, and `medium` for local models (whose providers report what they ran).
    pub fn fill_from(self, options: &ImageOptions, family: ModelFamily) -> Resolved {
        let size = self.size.or(match options.size {
            Some(SizeChoice::Exact(s)) => Some(s),
            _ => Some(Size::new(1024, 1024)),
        });
        let quality = self.quality.or(match (options.quality, family) {
            (Some(q), _) if q != Quality::Auto => Some(q),
            (_, ModelFamily::Local) => Some(Quality::Medium),
            (_, f) if f.is_gpt_image() => Some(Quality::High),
            _ => Some(Quality::Standard),
        });
        let background = self.background.or(match options.background {
            Some(Background::Transparent) => Some(Background::Transparent),
            _ => Some(Background::Opaque),
        });
        let output_format = self.output_format.or(Some(options.output_format.unwrap_or(OutputFormat::Png)));
        Resolved { size, quality, background, output_format }
    }

    /// Fills what a provider did not report with what the request asked for, leaving `auto` as asked
    /// (and png where no format was asked, OpenAI's documented default): what a stream event, whose
    /// settings are required fields, says when its provider said nothing. Nothing is guessed.
    pub fn or_as_asked(self, options: &ImageOptions) -> Resolved {
        let size = self.size.or(match options.size {
            Some(SizeChoice::Exact(s)) => Some(s),
            _ => None,
        });
        let quality = self.quality.or(options.quality.filter(|q| *q != Quality::Auto));
        let background = self.background.or(options.background.filter(|b| *b != Background::Auto));
        let output_format = self.output_format.or(Some(options.output_format.unwrap_or(OutputFormat::Png)));
        Resolved { size, quality, background, output_format }
    }
}

/// A finished, non-streamed job.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageResult {
    pub created: i64,
    pub images: Vec<GeneratedImage>,
    pub resolved: Resolved,
    pub usage: Option<Usage>,
    /// Measured device time, for providers that bill it (the local engine).
    pub compute_ms: Option<u64>,
}

/// One event of a streamed job.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Partial { b64_json: String, partial_image_index: u32, created_at: i64, resolved: Resolved },
    Completed { b64_json: String, created_at: i64, resolved: Resolved, usage: Option<Usage>, compute_ms: Option<u64> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_strictly() {
        assert_eq!("1024x1536".parse(), Ok(Size::new(1024, 1536)));
        for bad in ["", "x", "1024", "1024x", "x1024", "0x10", "10x0", "+1x1", "1 x1", "1024X1024"] {
            assert_eq!(bad.parse::<Size>(), Err(()), "{bad:?}");
        }
    }

    #[test]
    fn wire_enums_round_trip() {
        for q in Quality::ALL {
            assert_eq!(q.as_str().parse(), Ok(*q));
        }
        assert_eq!("ultra".parse::<Quality>(), Err(()));
    }
}
