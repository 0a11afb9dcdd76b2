//! Reading a manifest back and validating it: the signature, the hash binding to the image's bytes,
//! and trust in the signer.

use std::io::Cursor;

use c2pa::{Context, Reader};
use serde_json::{Value, json};

use crate::{GENERATION_ASSERTION, MediaType, ProvenanceError};

/// The status code C2PA gives a signature by a certificate no trust anchor vouches for.
const UNTRUSTED: &str = "signingCredential.untrusted";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The signer's chain ends at one of the trust anchors given.
    Trusted,
    /// Valid, but no trust anchor given vouches for the signer (a self-made identity always is).
    Untrusted,
}

/// What [`verify`] found.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The signature verifies and the manifest's hashes match the image's bytes and the assertions.
    pub valid: bool,
    pub trust: Trust,
    /// The failed checks, as C2PA status codes with their explanations (an untrusted signer aside).
    pub failures: Vec<(String, String)>,
    /// The SDK's report of the manifest store: manifests, assertions, ingredients, signature info and
    /// validation results.
    pub report: Value,
}

/// Validates the manifest embedded in `bytes`; `None` when there is none. `trust_anchors` (PEM
/// certificates) are the roots to trust; without them every signer is reported untrusted.
pub fn verify(
    bytes: &[u8],
    media_type: MediaType,
    trust_anchors: Option<&str>,
) -> Result<Option<Verification>, ProvenanceError> {
    let mut settings = json!({
        "verify": { "verify_trust": true, "remote_manifest_fetch": false },
        // Reading makes no thumbnails; said so the SDK does not warn that it cannot.
        "builder": { "thumbnail": { "enabled": false } }
    });
    if let Some(pem) = trust_anchors {
        settings["trust"] = json!({ "user_anchors": pem });
    }
    let context = Context::new()
        .with_settings(settings.to_string().as_str())
        .map_err(|e| ProvenanceError::Read(e.to_string()))?
        .into_shared();
    let reader = match Reader::from_shared_context(&context).with_stream(media_type.mime(), Cursor::new(bytes)) {
        Ok(r) => r,
        Err(c2pa::Error::JumbfNotFound) => return Ok(None),
        Err(e) => return Err(ProvenanceError::Read(e.to_string())),
    };
    let report: Value = serde_json::from_str(&reader.json()).map_err(|e| ProvenanceError::Read(e.to_string()))?;
    let statuses = reader.validation_results().and_then(|r| r.active_manifest()).map(|codes| codes.failure().clone());
    let mut untrusted = false;
    let mut failures = Vec::new();
    for status in statuses.unwrap_or_default() {
        if status.code() == UNTRUSTED {
            untrusted = true;
        } else {
            failures.push((status.code().to_owned(), status.explanation().unwrap_or_default().to_owned()));
        }
    }
    Ok(Some(Verification {
        valid: failures.is_empty(),
        trust: if untrusted { Trust::Untrusted } else { Trust::Trusted },
        failures,
        report,
    }))
}

impl Verification {
    /// The active manifest's JSON, as in [`Verification::report`].
    pub fn active_manifest(&self) -> Option<&Value> {
        let label = self.report.get("active_manifest")?.as_str()?;
        self.report.get("manifests")?.get(label)
    }

    /// The data of the active manifest's assertion `label`.
    pub fn assertion(&self, label: &str) -> Option<&Value> {
        self.active_manifest()?
            .get("assertions")?
            .as_array()?
            .iter()
            .find(|a| a.get("label").and_then(Value::as_str) == Some(label))?
            .get("data")
    }

    /// The active manifest's actions (from `c2pa.actions.v2` or `c2pa.actions`).
    pub fn actions(&self) -> Vec<&Value> {
        ["c2pa.actions.v2", "c2pa.actions"]
            .into_iter()
            .filter_map(|l| self.assertion(l)?.get("actions")?.as_array())
            .flatten()
            .collect()
    }

    /// A few lines for people: who signed, what made the image, and the validation result.
    pub fn summary(&self) -> String {
        let mut lines = Vec::new();
        let Some(m) = self.active_manifest() else {
            return "no active manifest".to_owned();
        };
        let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("?").to_owned();
        if let Some(sig) = m.get("signature_info") {
            lines.push(format!(
                "signed by:   {} (issuer: {}), {}, {}",
                s(sig.get("common_name")),
                s(sig.get("issuer")),
                s(sig.get("alg")),
                sig.get("time").and_then(Value::as_str).unwrap_or("no time stamp")
            ));
        }
        if let Some(g) = m.get("claim_generator_info").and_then(Value::as_array).and_then(|a| a.first()) {
            lines.push(format!("generator:   {} {}", s(g.get("name")), s(g.get("version"))));
        }
        for a in self.actions() {
            let source = a.get("digitalSourceType").and_then(Value::as_str).map(|t| t.rsplit('/').next().unwrap_or(t));
            lines.push(format!(
                "action:      {}{}",
                s(a.get("action")),
                source.map(|t| format!(" ({t})")).unwrap_or_default()
            ));
        }
        if let Some(g) = self.assertion(GENERATION_ASSERTION) {
            lines.push(format!("model:       {}", s(g.get("model"))));
            if let Some(c) = g.get("checkpoint") {
                let text = match (c.get("hub_repo"), c.get("revision"), c.get("files_sha256")) {
                    (Some(r), Some(rev), _) => format!("{}@{}", s(Some(r)), s(Some(rev))),
                    (_, _, Some(d)) => format!("files sha256:{}", s(Some(d))),
                    _ => c.to_string(),
                };
                lines.push(format!("checkpoint:  {text}"));
            }
            if let Some(p) = g.get("prompt").and_then(Value::as_str) {
                lines.push(format!("prompt:      {p}"));
            }
            if let Some(i) = g.get("partial_image") {
                lines.push(format!("partial:     image {i}"));
            }
        }
        if let Some(ings) = m.get("ingredients").and_then(Value::as_array) {
            for i in ings {
                lines.push(format!("ingredient:  {} ({})", s(i.get("title")), s(i.get("relationship"))));
            }
        }
        lines.push(if self.valid {
            "validation:  valid (signature and hash binding verified)".to_owned()
        } else {
            let codes: Vec<_> = self.failures.iter().map(|(c, e)| format!("{c}: {e}")).collect();
            format!("validation:  INVALID ({})", codes.join("; "))
        });
        lines.push(match self.trust {
            Trust::Trusted => "trust:       trusted (the signer chains to a given trust anchor)".to_owned(),
            Trust::Untrusted => "trust:       untrusted (no trust anchor given vouches for the signer; a self-made identity always shows so)".to_owned(),
        });
        lines.join("\n")
    }
}
