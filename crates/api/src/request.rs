//! Parsing and validating image requests: wire fields in, domain requests out.
//!
//! Two stages, because the rules depend on the model and the model depends on routing (aliases, the
//! config): [`RawRequest::parse`] checks the names and types of the fields; after the caller has found the
//! model's [`ModelFamily`], [`RawRequest::validate`] applies that family's rules and yields
//! [`ImageOptions`]. Every rejection is an [`ApiError`] naming the field and the allowed values.

use std::str::FromStr;

use domain::{
    Background, Decoder, ImageOptions, InputFidelity, JobKind, ModelFamily, Moderation, OutputFormat, Quality,
    ResponseFormat, ServiceTier, Size, SizeChoice, Style,
};

use crate::{ApiError, Fields};

/// The fields of a generation or edit, type-checked but not yet checked against a model's rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub n: Option<i64>,
    pub size: Option<String>,
    pub quality: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    pub output_compression: Option<i64>,
    pub background: Option<String>,
    pub moderation: Option<String>,
    pub stream: Option<bool>,
    pub partial_images: Option<i64>,
    pub style: Option<String>,
    pub user: Option<String>,
    pub input_fidelity: Option<String>,
    pub service_tier: Option<String>,
    pub seed: Option<u64>,
    /// Extension for local models: denoising steps instead of the quality's.
    pub steps: Option<i64>,
    /// Extension for local models: `full` or `tiny` decoder instead of the quality's.
    pub decoder: Option<String>,
}

/// The fields each endpoint accepts besides files.
const GENERATION_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "quality",
    "response_format",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "size",
    "moderation",
    "background",
    "style",
    "user",
    "service_tier",
    "seed",
    "steps",
    "decoder",
];
const EDIT_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "quality",
    "response_format",
    "output_format",
    "output_compression",
    "stream",
    "partial_images",
    "size",
    "moderation",
    "background",
    "user",
    "input_fidelity",
    "service_tier",
    "seed",
    "steps",
    "decoder",
];

/// OpenAI's variation fields (dall-e-2), and the local models' extensions.
const VARIATION_FIELDS: &[&str] = &["model", "n", "response_format", "size", "user", "seed", "steps", "decoder"];

/// The most denoising steps a request may ask a local model for.
const MAX_STEPS: i64 = 150;

/// Prompt length limits, in characters.
pub(crate) const GPT_PROMPT_MAX: usize = 32_000;
const DALL_E_3_PROMPT_MAX: usize = 4_000;
const DALL_E_2_PROMPT_MAX: usize = 1_000;

const GPT_SIZES: &[&str] = &["1024x1024", "1024x1536", "1536x1024", "auto"];
const DALL_E_3_SIZES: &[&str] = &["1024x1024", "1792x1024", "1024x1792"];
const DALL_E_2_SIZES: &[&str] = &["256x256", "512x512", "1024x1024"];

impl RawRequest {
    /// Reads the fields of a generation (`kind = Generate`) or an edit. `extra` names fields the caller
    /// reads itself (the JSON edit's `images` and `mask`), so they are not unknown.
    pub fn parse(fields: &Fields<'_>, kind: JobKind, extra: &[&str]) -> Result<RawRequest, ApiError> {
        let known = match kind {
            JobKind::Generate => GENERATION_FIELDS,
            JobKind::Edit => EDIT_FIELDS,
            JobKind::Variation => VARIATION_FIELDS,
        };
        if let Some(unknown) = fields.names().into_iter().find(|n| !known.contains(n) && !extra.contains(n)) {
            return Err(ApiError::unknown_parameter(unknown));
        }
        Ok(RawRequest {
            model: fields.string("model")?,
            prompt: fields.string("prompt")?,
            n: fields.integer("n")?,
            size: fields.string("size")?,
            quality: fields.string("quality")?,
            response_format: fields.string("response_format")?,
            output_format: fields.string("output_format")?,
            output_compression: fields.integer("output_compression")?,
            background: fields.string("background")?,
            moderation: fields.string("moderation")?,
            stream: fields.boolean("stream")?,
            partial_images: fields.integer("partial_images")?,
            style: fields.string("style")?,
            user: fields.string("user")?,
            input_fidelity: fields.string("input_fidelity")?,
            service_tier: fields.string("service_tier")?,
            seed: fields.unsigned("seed")?,
            steps: fields.integer("steps")?,
            decoder: fields.string("decoder")?,
        })
    }

    /// The model OpenAI would pick when the request names none: for generations dall-e-2, unless a field
    /// only the GPT image models take is present (then gpt-image-1); for edits gpt-image-1.5; for
    /// variations dall-e-2 (the only model OpenAI makes them with).
    pub fn openai_default_model(&self, kind: JobKind) -> &'static str {
        match kind {
            JobKind::Edit => return "gpt-image-1.5",
            JobKind::Variation => return "dall-e-2",
            JobKind::Generate => {}
        }
        let gpt_quality = matches!(self.quality.as_deref(), Some("low" | "medium" | "high"));
        let gpt_only = self.output_format.is_some()
            || self.output_compression.is_some()
            || self.background.is_some()
            || self.moderation.is_some()
            || self.stream == Some(true)
            || self.partial_images.is_some()
            || gpt_quality;
        if gpt_only { "gpt-image-1" } else { "dall-e-2" }
    }

    /// Applies the rules of `family` (the model's, as named by the client in `model`) and returns the
    /// prompt, the options and the edit's input fidelity.
    pub fn validate(
        &self,
        model: &str,
        family: ModelFamily,
        kind: JobKind,
    ) -> Result<(String, ImageOptions, Option<InputFidelity>), ApiError> {
        let gpt = family.has_gpt_options();
        let only_gpt = |param: &str| ApiError::unsupported_parameter(param, model, "the GPT image models");

        if kind == JobKind::Edit && family == ModelFamily::DallE3 {
            return Err(ApiError::invalid_value_msg(
                "model",
                format!("Model '{model}' does not support edits: use a GPT image model or dall-e-2."),
            ));
        }

        if kind == JobKind::Variation && !matches!(family, ModelFamily::DallE2 | ModelFamily::Local) {
            return Err(ApiError::invalid_value_msg(
                "model",
                format!("Model '{model}' does not make variations: use dall-e-2 or a local model."),
            ));
        }

        // A variation has no prompt (its fields have none to give).
        let prompt = match kind {
            JobKind::Variation => String::new(),
            _ => self.prompt.clone().ok_or_else(|| ApiError::missing("prompt"))?,
        };
        if prompt.is_empty() && kind != JobKind::Variation {
            return Err(ApiError::empty_string("prompt"));
        }
        let max = match family {
            ModelFamily::GptImage | ModelFamily::GptImageMini | ModelFamily::GptImage2 | ModelFamily::Local => {
                GPT_PROMPT_MAX
            }
            ModelFamily::DallE3 => DALL_E_3_PROMPT_MAX,
            ModelFamily::DallE2 => DALL_E_2_PROMPT_MAX,
        };
        let chars = prompt.chars().count();
        if chars > max {
            return Err(ApiError::string_too_long("prompt", max, chars));
        }

        let n = match self.n {
            None => 1,
            Some(n) if n < 1 => return Err(ApiError::below_min("n", 1, n)),
            Some(n) if n > 10 => return Err(ApiError::above_max("n", 10, n)),
            Some(n) => n as u8,
        };
        if family == ModelFamily::DallE3 && n != 1 {
            return Err(ApiError::invalid_value_msg(
                "n",
                format!("Invalid 'n': model '{model}' supports only n=1, but got {n}."),
            ));
        }

        let size = self.size.as_deref().map(|s| parse_size(s, family, kind)).transpose()?;

        let quality = parse_enum::<Quality>("quality", self.quality.as_deref())?;
        if let Some(q) = quality {
            let allowed: &[Quality] = match family {
                ModelFamily::GptImage | ModelFamily::GptImageMini | ModelFamily::GptImage2 | ModelFamily::Local => {
                    &[Quality::Low, Quality::Medium, Quality::High, Quality::Auto]
                }
                ModelFamily::DallE3 => &[Quality::Standard, Quality::Hd, Quality::Auto],
                ModelFamily::DallE2 => &[Quality::Standard, Quality::Auto],
            };
            if !allowed.contains(&q) {
                return Err(ApiError::invalid_value("quality", q.as_str(), allowed));
            }
        }

        // Every model answers with URLs when asked (a superset of OpenAI, which refuses 'url' for GPT
        // image models): the server stores the images and serves them (`server::links`).
        let response_format = parse_enum::<ResponseFormat>("response_format", self.response_format.as_deref())?;

        let output_format = parse_enum::<OutputFormat>("output_format", self.output_format.as_deref())?;
        let background = parse_enum::<Background>("background", self.background.as_deref())?;
        let moderation = parse_enum::<Moderation>("moderation", self.moderation.as_deref())?;
        let stream = self.stream.unwrap_or(false);
        if !gpt {
            for (param, present) in [
                ("output_format", output_format.is_some()),
                ("output_compression", self.output_compression.is_some()),
                ("background", background.is_some()),
                ("moderation", moderation.is_some()),
                ("stream", stream),
            ] {
                if present {
                    return Err(only_gpt(param));
                }
            }
        }

        let output_compression = match self.output_compression {
            None => None,
            Some(c) if c < 0 => return Err(ApiError::below_min("output_compression", 0, c)),
            Some(c) if c > 100 => return Err(ApiError::above_max("output_compression", 100, c)),
            Some(c) => Some(c as u8),
        };
        let format = output_format.unwrap_or(OutputFormat::Png);
        if format == OutputFormat::Png && output_compression.is_some_and(|c| c < 100) {
            return Err(ApiError::invalid_value_msg(
                "output_compression",
                "Invalid 'output_compression': compression is only supported with output_format 'jpeg' or 'webp', and the output format is 'png'.".to_owned(),
            ));
        }
        if background == Some(Background::Transparent) && format == OutputFormat::Jpeg {
            return Err(ApiError::invalid_value_msg(
                "background",
                "Invalid value: 'transparent'. A transparent background needs output_format 'png' or 'webp', and the output format is 'jpeg'.".to_owned(),
            ));
        }

        if family == ModelFamily::GptImage2 && background == Some(Background::Transparent) {
            return Err(ApiError::invalid_value_msg(
                "background",
                format!(
                    "Invalid value: 'transparent'. Model '{model}' does not support transparent backgrounds: use 'opaque' or 'auto'."
                ),
            ));
        }
        if family == ModelFamily::Local && background == Some(Background::Transparent) {
            return Err(ApiError::invalid_value_msg(
                "background",
                format!(
                    "Invalid value: 'transparent'. The local model '{model}' cannot produce a transparent background: use 'opaque' or 'auto'."
                ),
            ));
        }

        let partial_images = match self.partial_images {
            None => 0,
            Some(p) if p < 0 => return Err(ApiError::below_min("partial_images", 0, p)),
            Some(p) if p > 3 => return Err(ApiError::above_max("partial_images", 3, p)),
            Some(_) if !gpt => return Err(only_gpt("partial_images")),
            // Partial images only exist in a stream; without one they are not produced or billed.
            Some(p) if stream => p as u8,
            Some(_) => 0,
        };

        let style = parse_enum::<Style>("style", self.style.as_deref())?;
        if style.is_some() && family != ModelFamily::DallE3 {
            return Err(ApiError::unsupported_parameter("style", model, "dall-e-3"));
        }

        let input_fidelity = parse_enum::<InputFidelity>("input_fidelity", self.input_fidelity.as_deref())?;
        if input_fidelity.is_some() && family == ModelFamily::GptImage2 {
            return Err(ApiError::invalid_value_msg(
                "input_fidelity",
                format!("Model '{model}' processes every input image at high fidelity: leave out 'input_fidelity'."),
            ));
        }
        if input_fidelity.is_some() && !matches!(family, ModelFamily::GptImage | ModelFamily::Local) {
            return Err(ApiError::unsupported_parameter(
                "input_fidelity",
                model,
                "gpt-image-1, gpt-image-1.5 and local models (not gpt-image-1-mini)",
            ));
        }

        let service_tier = parse_enum::<ServiceTier>("service_tier", self.service_tier.as_deref())?;

        let steps = match self.steps {
            None => None,
            Some(_) if family != ModelFamily::Local => {
                return Err(ApiError::unsupported_parameter("steps", model, "local models"));
            }
            Some(s) if s < 1 => return Err(ApiError::below_min("steps", 1, s)),
            Some(s) if s > MAX_STEPS => return Err(ApiError::above_max("steps", MAX_STEPS, s)),
            Some(s) => Some(s as u16),
        };

        let decoder = parse_enum::<Decoder>("decoder", self.decoder.as_deref())?;
        if decoder.is_some() && family != ModelFamily::Local {
            return Err(ApiError::unsupported_parameter("decoder", model, "local models"));
        }

        let options = ImageOptions {
            n,
            size,
            quality,
            output_format,
            output_compression,
            background,
            moderation,
            style,
            response_format,
            user: self.user.clone(),
            stream,
            partial_images,
            service_tier,
            seed: self.seed,
            steps,
            decoder,
        };
        Ok((prompt, options, input_fidelity))
    }
}

fn parse_enum<T: FromStr + Copy + std::fmt::Display + AllValues>(
    param: &str,
    value: Option<&str>,
) -> Result<Option<T>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|_| ApiError::invalid_value(param, v, T::all())),
    }
}

/// The full value list of a wire enum, for error messages.
trait AllValues: Sized + 'static {
    fn all() -> &'static [Self];
}

macro_rules! all_values {
    ($($t:ty),*) => { $(impl AllValues for $t { fn all() -> &'static [Self] { <$t>::ALL } })* };
}
all_values!(Quality, ResponseFormat, OutputFormat, Background, Moderation, Style, InputFidelity, ServiceTier, Decoder);

/// The sizes a family accepts for an operation, as OpenAI lists them.
pub fn allowed_sizes(family: ModelFamily, kind: JobKind) -> &'static [&'static str] {
    match (family, kind) {
        (ModelFamily::GptImage | ModelFamily::GptImageMini | ModelFamily::GptImage2 | ModelFamily::Local, _) => {
            GPT_SIZES
        }
        (ModelFamily::DallE3, _) => DALL_E_3_SIZES,
        (ModelFamily::DallE2, _) => DALL_E_2_SIZES,
    }
}

fn parse_size(value: &str, family: ModelFamily, kind: JobKind) -> Result<SizeChoice, ApiError> {
    let allowed = allowed_sizes(family, kind);
    // `auto` is OpenAI's default for every model, so it is accepted for all (it resolves per model).
    if value == "auto" {
        return Ok(SizeChoice::Auto);
    }
    if family == ModelFamily::GptImage2 {
        return gpt_image_2_size(value).map(SizeChoice::Exact);
    }
    if family == ModelFamily::Local {
        // Any WIDTHxHEIGHT: the model's own rule (a multiple of 8 within bounds) is checked by its
        // provider, which knows the checkpoint.
        return value.parse::<Size>().map(SizeChoice::Exact).map_err(|()| {
            ApiError::invalid_value_msg(
                "size",
                format!("Invalid value: '{value}'. Local models take 'auto' or WIDTHxHEIGHT in pixels, such as '512x512' or '1024x1536'."),
            )
        });
    }
    if !allowed.contains(&value) {
        return Err(ApiError::invalid_value("size", value, allowed));
    }
    value.parse::<Size>().map(SizeChoice::Exact).map_err(|()| ApiError::invalid_value("size", value, allowed))
}

fn gpt_image_2_size(value: &str) -> Result<Size, ApiError> {
    let rule = "Use 'auto' or WIDTHxHEIGHT with both sides multiples of 16, the longest side at most 3840, an aspect ratio of at most 3:1 and 655,360 to 8,294,400 pixels (such as '1024x1024', '2048x1152' or '3840x2160').";
    let size = value
        .parse::<Size>()
        .map_err(|()| ApiError::invalid_value_msg("size", format!("Invalid value: '{value}'. {rule}")))?;
    match domain::gpt_image_2::size_problem(size.width, size.height) {
        None => Ok(size),
        Some(problem) => {
            Err(ApiError::invalid_value_msg("size", format!("Invalid value: '{value}': {problem}. {rule}")))
        }
    }
}
