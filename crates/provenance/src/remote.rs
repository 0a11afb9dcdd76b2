//! A signer whose key stays elsewhere: the bytes to sign are POSTed to a URL and the response body is
//! the signature, the protocol of the c2pa SDK's own remote signer (`[signer.remote]` in its settings).
//! The certificate chain is configured here; only the key is remote.

use std::io::Read;
use std::time::Duration;

use base64::Engine as _;
use c2pa::SigningAlg;

/// How long one signing request may take.
const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct RemoteSigner {
    url: String,
    alg: SigningAlg,
    certs: Vec<Vec<u8>>,
    agent: ureq::Agent,
}

impl RemoteSigner {
    pub(crate) fn new(url: &str, alg: SigningAlg, chain_pem: &str) -> Result<RemoteSigner, String> {
        let certs = certificates(chain_pem)?;
        let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).build();
        Ok(RemoteSigner { url: url.to_owned(), alg, certs, agent })
    }

    /// Room for the signature: what the SDK's own remote signer reserves.
    fn reserve(&self) -> usize {
        10_000 + self.certs.iter().map(Vec::len).sum::<usize>()
    }
}

impl c2pa::Signer for RemoteSigner {
    fn sign(&self, data: &[u8]) -> c2pa::Result<Vec<u8>> {
        let failed = |why: String| {
            // The SDK's error names no cause: the log does (never the URL, which may carry a token).
            tracing::error!("the remote signer failed: {why}");
            c2pa::Error::FailedToRemoteSign
        };
        let response = self
            .agent
            .post(&self.url)
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data)
            .map_err(|e| failed(e.kind().to_string()))?;
        let mut signature = Vec::new();
        response
            .into_reader()
            .take(self.reserve() as u64)
            .read_to_end(&mut signature)
            .map_err(|e| failed(e.to_string()))?;
        if signature.is_empty() {
            return Err(failed("it answered no signature".into()));
        }
        Ok(signature)
    }

    fn alg(&self) -> SigningAlg {
        self.alg
    }

    fn certs(&self) -> c2pa::Result<Vec<Vec<u8>>> {
        Ok(self.certs.clone())
    }

    fn reserve_size(&self) -> usize {
        self.reserve()
    }
}

/// The DER of every `CERTIFICATE` block of a PEM text, in order.
fn certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut block: Option<String> = None;
    for line in pem.lines().map(str::trim) {
        match (&mut block, line) {
            (None, "-----BEGIN CERTIFICATE-----") => block = Some(String::new()),
            (Some(b64), "-----END CERTIFICATE-----") => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| format!("cert_chain: a certificate is not valid base64: {e}"))?;
                out.push(der);
                block = None;
            }
            (Some(b64), l) => b64.push_str(l),
            (None, _) => {}
        }
    }
    if out.is_empty() || block.is_some() {
        return Err("cert_chain: no complete PEM certificate in it".into());
    }
    Ok(out)
}
