//! `imagegate verify FILE`: the C2PA manifest an image carries and whether it validates (signature,
//! hash binding to the image's bytes, trust in the signer).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// A PNG, JPEG or WebP image.
    file: PathBuf,
    /// Trust anchors (PEM certificates): a signer that chains to one shows as trusted. The local
    /// identity's root is the last certificate of DATA_DIR/provenance/signer-chain.pem.
    #[arg(long, value_name = "PEM")]
    trust: Option<PathBuf>,
    /// The SDK's whole report (manifests, assertions, ingredients, validation results) as JSON.
    #[arg(long)]
    json: bool,
}

/// Prints the manifest; fails (exit 1) when the file has none or it does not validate. Trust is
/// reported, not required: a self-made identity is untrusted but valid.
pub fn run(args: VerifyArgs) -> Result<(), String> {
    let path = args.file.display();
    let bytes = std::fs::read(&args.file).map_err(|e| format!("{path}: {e}"))?;
    let media = provenance::MediaType::sniff(&bytes).ok_or_else(|| format!("{path}: not a PNG, JPEG or WebP image"))?;
    let anchors = match &args.trust {
        Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("--trust {}: {e}", p.display()))?),
        None => None,
    };
    let found = provenance::verify(&bytes, media, anchors.as_deref()).map_err(|e| format!("{path}: {e}"))?;
    let Some(v) = found else {
        return Err(format!("{path}: no C2PA manifest (no Content Credentials)"));
    };
    let text = if args.json {
        serde_json::to_string_pretty(&v.report).map_err(|e| e.to_string())?
    } else {
        format!("{path} ({})\n{}", media.mime(), v.summary())
    };
    writeln!(std::io::stdout().lock(), "{text}").map_err(|e| e.to_string())?;
    if v.valid { Ok(()) } else { Err(format!("{path}: the manifest does not validate")) }
}
