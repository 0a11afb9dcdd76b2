//! Input images by URL (`image_url: "https://..."` in JSON edits), fetched only when the operator allows
//! it (`[remote_images]` in the config), and then only from the hosts it lists. A fetch is guarded
//! against reaching what the client could not (SSRF): https only; the host must be on the allowlist;
//! every address it resolves to must be public (no loopback, private, link-local, unique-local, CGNAT,
//! multicast or unspecified address), and the connection goes to the address that was checked (no
//! second lookup to rebind); redirects are not followed; the body is capped at `max_bytes` and the whole
//! fetch at `timeout`. What arrives then goes through the same checks as an upload.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use api::ApiError;
use bytes::{Bytes, BytesMut};

/// `[remote_images]`: which image URLs the server fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteImages {
    /// Hosts fetched from: an exact name (`images.example.com`), or a leading dot for a domain's
    /// subdomains (`.cdn.example.com`).
    pub allow_hosts: Vec<String>,
    pub max_bytes: usize,
    pub timeout: Duration,
    /// Also `http://` URLs and private addresses: for tests and trusted networks only.
    pub allow_insecure: bool,
}

impl RemoteImages {
    fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow_hosts.iter().any(|entry| {
            let entry = entry.to_ascii_lowercase();
            match entry.strip_prefix('.') {
                Some(domain) => host.ends_with(&entry) && host.len() > domain.len(),
                None => host == entry,
            }
        })
    }
}

/// Fetches the image at `url` for request field `param`, or says why not (400, naming the field).
pub async fn fetch(config: Option<&RemoteImages>, param: &str, url: &str) -> Result<Bytes, ApiError> {
    let refuse = |why: String| ApiError::invalid_value_msg(param, format!("Invalid image URL '{url}': {why}"));
    let Some(config) = config else {
        return Err(refuse(
            "this server does not fetch image URLs: send the image as a data: URL or use the multipart form \
             (an operator can allow hosts under [remote_images])"
                .into(),
        ));
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| refuse(format!("not a URL ({e})")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if config.allow_insecure => {}
        other => return Err(refuse(format!("'{other}://' URLs are not fetched: use https://"))),
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refuse("URLs with credentials are not fetched".into()));
    }
    let host = parsed.host_str().ok_or_else(|| refuse("it names no host".into()))?.to_owned();
    if !config.allows(&host) {
        return Err(refuse(format!("'{host}' is not a host this server fetches images from")));
    }
    let port = parsed.port_or_known_default().unwrap_or(443);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let addrs: Vec<SocketAddr> = tokio::time::timeout(config.timeout, tokio::net::lookup_host((lookup_host, port)))
        .await
        .map_err(|_| refuse(format!("'{host}' did not resolve in time")))?
        .map_err(|_| refuse(format!("'{host}' does not resolve")))?
        .collect();
    let Some(first) = addrs.first().copied() else { return Err(refuse(format!("'{host}' does not resolve"))) };
    if !config.allow_insecure && addrs.iter().any(|a| !is_public(a.ip())) {
        return Err(refuse(format!("'{host}' resolves to a private or reserved address")));
    }
    // Connect to the address checked above, never to a second answer of the resolver.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, first)
        .timeout(config.timeout)
        .build()
        .map_err(|_| refuse("the fetch could not be set up".into()))?;
    let mut response = client.get(parsed).send().await.map_err(|e| match e.is_timeout() {
        true => refuse(format!("no answer within {} s", config.timeout.as_secs())),
        false => refuse("the host could not be reached".into()),
    })?;
    let status = response.status();
    if status.is_redirection() {
        return Err(refuse(format!("it answered a redirect (HTTP {}), which is not followed", status.as_u16())));
    }
    if !status.is_success() {
        return Err(refuse(format!("it answered HTTP {}", status.as_u16())));
    }
    let too_large = || refuse(format!("the image is larger than {} bytes", config.max_bytes));
    if response.content_length().is_some_and(|n| n > config.max_bytes as u64) {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > config.max_bytes {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(_) => return Err(refuse("the download broke off".into())),
        }
    }
    Ok(body.freeze())
}

/// Whether `ip` is an address on the public internet.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // CGNAT
                || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
                || a >= 240) // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn hosts_are_allowed_exactly_or_by_subdomain() {
        let config = RemoteImages {
            allow_hosts: vec!["images.example.com".into(), ".cdn.example.org".into()],
            max_bytes: 1,
            timeout: Duration::from_secs(1),
            allow_insecure: false,
        };
        assert!(config.allows("images.example.com") && config.allows("IMAGES.example.com."));
        assert!(config.allows("a.cdn.example.org") && config.allows("x.y.cdn.example.org"));
        assert!(!config.allows("cdn.example.org") && !config.allows("evilcdn.example.org"));
        assert!(!config.allows("images.example.com.evil.net") && !config.allows("example.com"));
    }
}
