//! Signing identities: a configured certificate chain and private key (PEM), or the local one a
//! server makes for itself in its data dir when none is configured.

use std::path::{Path, PathBuf};

use c2pa::SigningAlg;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::ProvenanceError;

/// id-kp-documentSigning (RFC 9336), one of the extended key usages C2PA accepts for a signer.
const DOCUMENT_SIGNING: [u64; 9] = [1, 3, 6, 1, 5, 5, 7, 3, 36];

/// The file names of a local identity inside its directory.
pub const CHAIN_FILE: &str = "signer-chain.pem";
pub const KEY_FILE: &str = "signer-key.pem";

/// A certificate chain (the signer's certificate first, then its issuers) and the signer's private key.
#[derive(Clone)]
pub struct Identity {
    pub(crate) chain_pem: String,
    pub(crate) key: Key,
    pub(crate) alg: SigningAlg,
    /// Made by imagegate itself: validators show it as untrusted.
    pub self_made: bool,
}

/// Where the signing key is.
#[derive(Clone)]
pub(crate) enum Key {
    /// A PKCS#8 PEM private key, here.
    Pem(String),
    /// A signing service: the bytes to sign are POSTed to this URL, the answer is the signature.
    Remote(String),
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Identity").field("alg", &self.alg).field("self_made", &self.self_made).finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads a configured chain and key (PEM). The algorithm comes from the key: ECDSA on P-256,
    /// P-384 or P-521 (ES256/384/512), Ed25519, or RSA (PS256).
    pub fn from_files(chain: &Path, key: &Path) -> Result<Identity, ProvenanceError> {
        let read = |what: &str, p: &Path| {
            std::fs::read_to_string(p).map_err(|e| ProvenanceError::Identity(format!("{what} {}: {e}", p.display())))
        };
        Identity::from_pem(read("cert_chain", chain)?, read("private_key", key)?, false)
    }

    /// A chain and key given as PEM text.
    pub fn from_pem(chain_pem: String, key_pem: String, self_made: bool) -> Result<Identity, ProvenanceError> {
        if !chain_pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(ProvenanceError::Identity("cert_chain: no PEM certificate in it".into()));
        }
        // The first algorithm whose signer accepts the key is the key's own: each parses only its kind.
        let alg = [SigningAlg::Es256, SigningAlg::Es384, SigningAlg::Es512, SigningAlg::Ed25519, SigningAlg::Ps256]
            .into_iter()
            .find(|alg| c2pa::create_signer::from_keys(chain_pem.as_bytes(), key_pem.as_bytes(), *alg, None).is_ok())
            .ok_or_else(|| {
                ProvenanceError::Identity(
                    "private_key: not a PKCS#8 PEM key of a kind C2PA signs with (ECDSA P-256/P-384/P-521, Ed25519 or RSA), or it does not go with cert_chain"
                        .into(),
                )
            })?;
        Ok(Identity { chain_pem, key: Key::Pem(key_pem), alg, self_made })
    }

    /// A configured chain (PEM) whose key is held by a signing service at `url` (the c2pa SDK's
    /// remote-signer protocol: the bytes to sign are POSTed, the response body is the signature), with
    /// `algorithm` (es256, es384, es512, ps256, ps384, ps512, ed25519) the key's.
    pub fn remote(chain: &Path, url: &str, algorithm: &str) -> Result<Identity, ProvenanceError> {
        let chain_pem = std::fs::read_to_string(chain)
            .map_err(|e| ProvenanceError::Identity(format!("cert_chain {}: {e}", chain.display())))?;
        let alg: SigningAlg = algorithm.parse().map_err(|_| {
            ProvenanceError::Identity(format!(
                "algorithm: '{algorithm}' is not one of es256, es384, es512, ps256, ps384, ps512, ed25519"
            ))
        })?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(ProvenanceError::Identity("remote_signer_url: not an http:// or https:// URL".into()));
        }
        Ok(Identity { chain_pem, key: Key::Remote(url.to_owned()), alg, self_made: false })
    }

    /// The local identity kept in `dir` ([`CHAIN_FILE`], [`KEY_FILE`]), made there first when it does not
    /// exist yet (the key readable by its owner only). Returns it and whether it was just made.
    pub fn local(dir: &Path) -> Result<(Identity, bool), ProvenanceError> {
        let chain = dir.join(CHAIN_FILE);
        let key = dir.join(KEY_FILE);
        if chain.exists() && key.exists() {
            let mut identity = Identity::from_files(&chain, &key)?;
            identity.self_made = true;
            return Ok((identity, false));
        }
        let identity = Identity::generate("imagegate")?;
        let io = |p: &PathBuf, e: std::io::Error| ProvenanceError::Identity(format!("{}: {e}", p.display()));
        std::fs::create_dir_all(dir).map_err(|e| io(&dir.to_path_buf(), e))?;
        // Each file appears whole (written aside, then renamed), the key before the chain: a server
        // starting beside this one reads both or makes its own.
        let aside = |p: &Path| p.with_extension(format!("pem.{}", std::process::id()));
        let Key::Pem(key_pem) = &identity.key else {
            return Err(ProvenanceError::Identity("a made identity has its key here".into()));
        };
        write_private(&aside(&key), key_pem.as_bytes()).map_err(|e| io(&key, e))?;
        std::fs::rename(aside(&key), &key).map_err(|e| io(&key, e))?;
        std::fs::write(aside(&chain), identity.chain_pem.as_bytes()).map_err(|e| io(&chain, e))?;
        std::fs::rename(aside(&chain), &chain).map_err(|e| io(&chain, e))?;
        Ok((identity, true))
    }

    /// A new self-made identity: a root certificate and, signed by it, a signer certificate with the
    /// profile C2PA asks of one (a v3 end-entity certificate, digitalSignature, documentSigning, an
    /// authority key identifier), both ECDSA P-256, valid for ten years from yesterday.
    pub fn generate(organization: &str) -> Result<Identity, ProvenanceError> {
        let failed = |e: rcgen::Error| ProvenanceError::Identity(format!("cannot make a signing identity: {e}"));
        let now = std::time::SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let validity = |p: &mut CertificateParams| {
            p.not_before = (now - day).into();
            p.not_after = (now + 3653 * day).into();
        };
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
        let mut root = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        root.distinguished_name.push(DnType::CommonName, format!("{organization} local root (self-signed, untrusted)"));
        root.distinguished_name.push(DnType::OrganizationName, organization);
        root.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut root);
        let root_cert = root.self_signed(&root_key).map_err(failed)?;

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(failed)?;
        let mut signer = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        signer.distinguished_name.push(DnType::CommonName, format!("{organization} local signer"));
        signer.distinguished_name.push(DnType::OrganizationName, organization);
        signer.is_ca = IsCa::ExplicitNoCa;
        signer.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Both: C2PA's validators accept emailProtection everywhere; documentSigning is the purpose.
        signer.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::EmailProtection, ExtendedKeyUsagePurpose::Other(DOCUMENT_SIGNING.to_vec())];
        signer.use_authority_key_identifier_extension = true;
        validity(&mut signer);
        let cert = signer.signed_by(&key, &Issuer::new(root, root_key)).map_err(failed)?;
        Identity::from_pem(format!("{}{}", cert.pem(), root_cert.pem()), key.serialize_pem(), true)
    }

    /// The chain's certificates as PEM (the signer's first).
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// The last certificate of the chain: the root a validator must trust for this identity's
    /// signatures to show as trusted.
    pub fn root_pem(&self) -> Option<String> {
        let start = self.chain_pem.rfind("-----BEGIN CERTIFICATE-----")?;
        Some(self.chain_pem[start..].trim_end().to_owned() + "\n")
    }

    pub fn algorithm(&self) -> String {
        self.alg.to_string()
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
