//! Certificate chains for tests, made on the spot as an operator's would be issued.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SignatureAlgorithm,
};

/// A signer's chain (its certificate, then the intermediate when there is one), its key, and the root
/// that issued them, all PEM.
pub struct IssuedChain {
    pub chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
}

/// A root CA ("Example Root CA"), optionally an intermediate, and a signer certificate named
/// `common_name` with the profile C2PA asks of a signer (digitalSignature, emailProtection, an
/// authority key identifier), every key on `alg`; the subject names `organization` only when given.
pub fn issued_chain(
    alg: &'static SignatureAlgorithm,
    common_name: &str,
    organization: Option<&str>,
    intermediate: bool,
) -> Result<IssuedChain, rcgen::Error> {
    let ca = |name: &str| -> Result<CertificateParams, rcgen::Error> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ok(p)
    };
    let root_key = KeyPair::generate_for(alg)?;
    let root = ca("Example Root CA")?;
    let root_pem = root.self_signed(&root_key)?.pem();
    let mut issuer = Issuer::new(root, root_key);
    let mut middle = String::new();
    if intermediate {
        let key = KeyPair::generate_for(alg)?;
        let mut params = ca("Example Intermediate CA")?;
        params.use_authority_key_identifier_extension = true;
        middle = params.signed_by(&key, &issuer)?.pem();
        issuer = Issuer::new(params, key);
    }
    let key = KeyPair::generate_for(alg)?;
    let mut leaf = CertificateParams::new(Vec::<String>::new())?;
    leaf.distinguished_name.push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        leaf.distinguished_name.push(DnType::OrganizationName, o);
    }
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    leaf.use_authority_key_identifier_extension = true;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok(IssuedChain { chain_pem: format!("{}{middle}", cert.pem()), key_pem: key.serialize_pem(), root_pem })
}
