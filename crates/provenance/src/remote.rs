//! A signer whose key stays elsewhere: the bytes to sign are POSTed to a URL and the response body is
//! the signature, the protocol of the c2pa SDK's own remote signer (`[signer.remote]` in its settings).
//! The certificate chain is configured here; only the key is remote.

use std::io::Read;
use std::time::Duration;

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
fn certificates(chain_pem: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks = pem::parse_many(chain_pem).map_err(|e| format!("cert_chain: not PEM: {e}"))?;
    let certs: Vec<Vec<u8>> =
        blocks.iter().filter(|b| b.tag() == "CERTIFICATE").map(|b| b.contents().to_vec()).collect();
    if certs.is_empty() {
        return Err("cert_chain: no PEM certificate in it".into());
    }
    Ok(certs)
}
