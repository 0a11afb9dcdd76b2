//! C2PA Content Credentials for the images imagegate makes, on the C2PA project's own SDK (`c2pa`).
//!
//! A [`Signer`] holds a signing [`Identity`] and embeds, in a PNG, JPEG or WebP image, a manifest that
//! says how the image came to be ([`Origin`]): a `c2pa.created` action with IPTC's digital source type
//! `trainedAlgorithmicMedia` for a generated image, or for an edit `c2pa.opened` on the first input
//! image (its parent ingredient), the other inputs and the mask as `inputTo` ingredients, and a
//! `c2pa.edited` action (`compositeWithTrainedAlgorithmicMedia` when a mask kept part of the input);
//! imagegate and its version as the claim generator and the actions' software agent; and an
//! `org.imagegate.generation` assertion naming the model and its [`Checkpoint`] (and the prompt only
//! when the operator asks for it). [`verify`] reads a manifest back and validates it (signature, the
//! hash binding to the image's bytes, trust in the signer).

mod checkpoint;
mod identity;
mod remote;
pub mod testing;
mod verify;

use std::io::Cursor;

use c2pa::{Builder, Context};
use serde_json::{Value, json};

pub use checkpoint::{Checkpoint, DIGEST_CACHE, digest};
pub use identity::{CHAIN_FILE, Identity, KEY_FILE};
pub use verify::{Trust, Verification, verify};

/// The label of imagegate's own assertion: the model, its checkpoint, and the prompt when kept.
pub const GENERATION_ASSERTION: &str = "org.imagegate.generation";

const IPTC: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/";

#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("signing identity: {0}")]
    Identity(String),
    #[error("cannot sign the image: {0}")]
    Sign(String),
    #[error("cannot read the file's manifest: {0}")]
    Read(String),
}

/// An image format C2PA embeds a manifest in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    Png,
    Jpeg,
    Webp,
}

impl MediaType {
    pub fn mime(self) -> &'static str {
        match self {
            MediaType::Png => "image/png",
            MediaType::Jpeg => "image/jpeg",
            MediaType::Webp => "image/webp",
        }
    }

    /// The type of `bytes` by their signature.
    pub fn sniff(bytes: &[u8]) -> Option<MediaType> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(MediaType::Png)
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(MediaType::Jpeg)
        } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(MediaType::Webp)
        } else {
            None
        }
    }
}

/// An input image of an edit, as an ingredient of its result.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub bytes: &'a [u8],
    pub media_type: MediaType,
}

/// How an image came to be.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// Generated from a prompt alone.
    Generated,
    /// Made from input images: the first is the parent; `mask` applied to it and kept its pixels
    /// outside the masked area.
    Edited { images: &'a [Input<'a>], mask: Option<Input<'a>> },
}

/// What a manifest says of an image besides its origin.
#[derive(Debug, Clone)]
pub struct Generation<'a> {
    /// The model that ran, by the name the server serves it under.
    pub model: &'a str,
    pub checkpoint: Option<&'a Checkpoint>,
    /// Written only when the operator turned it on: prompts can be private.
    pub prompt: Option<&'a str>,
    /// A streamed partial image's index (a preview, not the final image).
    pub partial_image_index: Option<u32>,
}

/// Signs images with one identity. Cheap to share (`Arc`) between threads.
pub struct Signer {
    context: std::sync::Arc<Context>,
    signer: Box<dyn c2pa::Signer + Send + Sync>,
    generator: (String, String),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("generator", &self.generator).finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer for `identity`; `generator` (name, version) is the claim generator and the software
    /// agent of every action.
    pub fn new(identity: &Identity, generator: (&str, &str)) -> Result<Signer, ProvenanceError> {
        let signer: Box<dyn c2pa::Signer + Send + Sync> = match &identity.key {
            identity::Key::Pem(key_pem) => {
                c2pa::create_signer::from_keys(identity.chain_pem.as_bytes(), key_pem.as_bytes(), identity.alg, None)
                    .map_err(|e| ProvenanceError::Identity(e.to_string()))?
            }
            identity::Key::Remote(url) => Box::new(
                remote::RemoteSigner::new(url, identity.alg, &identity.chain_pem).map_err(ProvenanceError::Identity)?,
            ),
        };
        let settings = json!({
            // The manifest is read back by tests and validators, not by the signer: no second pass.
            "verify": { "verify_after_sign": false },
            "builder": {
                "claim_generator_info": { "name": generator.0, "version": generator.1 },
                // No thumbnail (the feature that makes them is not built), every action written
                // explicitly.
                "thumbnail": { "enabled": false },
                "actions": {
                    "auto_created_action": { "enabled": false },
                    "auto_opened_action": { "enabled": false },
                    "auto_placed_action": { "enabled": false }
                }
            }
        });
        let context = Context::new()
            .with_settings(settings.to_string().as_str())
            .map_err(|e| ProvenanceError::Identity(e.to_string()))?
            .into_shared();
        let signer = Signer { context, signer, generator: (generator.0.to_owned(), generator.1.to_owned()) };
        signer.check()?;
        Ok(signer)
    }

    /// Signs a small image and validates it: an identity whose manifests would not validate is refused
    /// before it signs anything. (A key that is not the certificate's fails here, and so does, with
    /// c2pa 0.90, a signer certificate whose subject names no organization.)
    fn check(&self) -> Result<(), ProvenanceError> {
        const PNG_1X1: &[u8] = &[
            0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00,
            0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53, 0xde, 0x00, 0x00, 0x00,
            0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0x00, 0x00, 0x03, 0x01, 0x01, 0x00, 0xc9,
            0xfe, 0x92, 0xef, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
        ];
        let generation = Generation { model: "self-check", checkpoint: None, prompt: None, partial_image_index: None };
        let signed = self.sign(PNG_1X1, MediaType::Png, Origin::Generated, &generation)?;
        let refused = |why: String| {
            ProvenanceError::Identity(format!(
                "a manifest signed with it does not validate ({why}): check that the private key belongs to the first certificate of the chain, that this certificate's subject names an organization (O=), and that it has the profile C2PA asks of a signer (digitalSignature; the emailProtection or C2PA claim-signing extended key usage, since validators after c2pa 0.90 refuse documentSigning alone; not a CA)"
            ))
        };
        match verify(&signed, MediaType::Png, None)? {
            Some(v) if v.valid => Ok(()),
            Some(v) => Err(refused(v.failures.iter().map(|(c, e)| format!("{c}: {e}")).collect::<Vec<_>>().join("; "))),
            None => Err(refused("no manifest was written".into())),
        }
    }

    /// `image` (of `media_type`) with a signed manifest embedded: the same pixels, the manifest in
    /// the format's own metadata (a PNG chunk, JPEG APP11 segments, a WebP RIFF chunk).
    pub fn sign(
        &self,
        image: &[u8],
        media_type: MediaType,
        origin: Origin<'_>,
        generation: &Generation<'_>,
    ) -> Result<Vec<u8>, ProvenanceError> {
        let failed = |e: c2pa::Error| ProvenanceError::Sign(e.to_string());
        let title = match generation.partial_image_index {
            Some(i) => format!("partial image {i}"),
            None => "image".to_owned(),
        };
        let mut builder = Builder::from_shared_context(&self.context)
            .with_definition(json!({ "title": title, "format": media_type.mime() }).to_string().as_str())
            .map_err(failed)?;
        let agent = json!({ "name": self.generator.0, "version": self.generator.1 });
        let description = format!("Generated by the model '{}'", generation.model);
        match origin {
            Origin::Generated => {
                builder
                    .add_action(json!({
                        "action": "c2pa.created",
                        "digitalSourceType": format!("{IPTC}trainedAlgorithmicMedia"),
                        "softwareAgent": agent,
                        "description": description,
                    }))
                    .map_err(failed)?;
            }
            Origin::Edited { images, mask } => {
                let mut inputs = Vec::new();
                for (i, input) in images.iter().enumerate() {
                    let (relationship, label) =
                        if i == 0 { ("parentOf", "parent".to_owned()) } else { ("inputTo", format!("image_{i}")) };
                    let title = format!("input image {}", i + 1);
                    add_ingredient(&mut builder, input, &title, relationship, &label)?;
                    if i > 0 {
                        inputs.push(label);
                    }
                }
                if let Some(m) = &mask {
                    add_ingredient(&mut builder, m, "mask", "inputTo", "mask")?;
                    inputs.push("mask".to_owned());
                }
                let source =
                    if mask.is_some() { "compositeWithTrainedAlgorithmicMedia" } else { "trainedAlgorithmicMedia" };
                builder
                    .add_action(json!({ "action": "c2pa.opened", "parameters": { "ingredientIds": ["parent"] } }))
                    .map_err(failed)?;
                let mut edited = json!({
                    "action": "c2pa.edited",
                    "digitalSourceType": format!("{IPTC}{source}"),
                    "softwareAgent": agent,
                    "description": description,
                });
                if !inputs.is_empty() {
                    edited["parameters"] = json!({ "ingredientIds": inputs });
                }
                builder.add_action(edited).map_err(failed)?;
            }
        }
        let mut assertion = json!({ "model": generation.model });
        if let Some(c) = generation.checkpoint {
            assertion["checkpoint"] = c.to_json();
        }
        if let Some(p) = generation.prompt {
            assertion["prompt"] = Value::String(p.to_owned());
        }
        if let Some(i) = generation.partial_image_index {
            assertion["partial_image"] = json!(i);
        }
        builder.add_assertion(GENERATION_ASSERTION, &assertion).map_err(failed)?;
        let mut out = Cursor::new(Vec::with_capacity(image.len() + 16 * 1024));
        builder.sign(self.signer.as_ref(), media_type.mime(), &mut Cursor::new(image), &mut out).map_err(failed)?;
        Ok(out.into_inner())
    }
}

fn add_ingredient(
    builder: &mut Builder,
    input: &Input<'_>,
    title: &str,
    relationship: &str,
    label: &str,
) -> Result<(), ProvenanceError> {
    let definition = json!({ "title": title, "relationship": relationship, "label": label });
    builder
        .add_ingredient_from_stream(definition.to_string(), input.media_type.mime(), &mut Cursor::new(input.bytes))
        .map_err(|e| ProvenanceError::Sign(format!("{title}: {e}")))?;
    Ok(())
}
