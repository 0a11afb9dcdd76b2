#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Signing and validating every format imagegate writes, generated and edited, with the SDK's own
//! reader (the Python reader checks the same images in tests/conformance).

use std::io::Cursor;

use c2pa::Signer as _;

use image::{ImageFormat, RgbImage, RgbaImage};
use provenance::{Checkpoint, Generation, Identity, Input, MediaType, Origin, Signer, Trust, Verification, verify};
use serde_json::Value;

const FORMATS: [(MediaType, ImageFormat); 3] =
    [(MediaType::Png, ImageFormat::Png), (MediaType::Jpeg, ImageFormat::Jpeg), (MediaType::Webp, ImageFormat::WebP)];

fn image(format: ImageFormat, seed: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(96, 64, |x, y| image::Rgb([(x * 3 + seed) as u8, (y * 5) as u8, (x ^ y) as u8]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn mask() -> Vec<u8> {
    let m = RgbaImage::from_fn(96, 64, |x, _| image::Rgba([0, 0, 0, if x < 48 { 0 } else { 255 }]));
    let mut out = Cursor::new(Vec::new());
    m.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn signer() -> (Signer, Identity) {
    let identity = Identity::generate("imagegate test").unwrap();
    (Signer::new(&identity, ("imagegate", "9.9.9")).unwrap(), identity)
}

fn checkpoint() -> Checkpoint {
    Checkpoint::Hub { repo: "stabilityai/sd-turbo".into(), revision: "0123456789abcdef0123456789abcdef01234567".into() }
}

fn generation<'a>(c: &'a Checkpoint) -> Generation<'a> {
    Generation { model: "sd-turbo", checkpoint: Some(c), prompt: None, partial_image_index: None }
}

fn checked(bytes: &[u8], media: MediaType, anchors: Option<&str>) -> Verification {
    let v = verify(bytes, media, anchors).unwrap().expect("a manifest");
    assert!(v.valid, "{media:?}: {:?}", v.failures);
    v
}

/// The byte `offset` into the image data proper (PNG's IDAT, JPEG's scan, WebP's VP8/VP8L chunk).
fn pixel_byte(bytes: &[u8], media: MediaType) -> usize {
    let find = |needle: &[u8]| bytes.windows(needle.len()).rposition(|w| w == needle).unwrap();
    match media {
        MediaType::Png => find(b"IDAT") + 40,
        MediaType::Jpeg => find(&[0xff, 0xda]) + 40,
        MediaType::Webp => bytes.windows(4).position(|w| w == b"VP8L" || w == b"VP8 ").unwrap() + 40,
    }
}

fn source_type(action: &Value) -> &str {
    action["digitalSourceType"].as_str().unwrap().rsplit('/').next().unwrap()
}

#[test]
fn every_format_is_signed_and_validates_with_the_model_named() {
    let (signer, identity) = signer();
    let c = checkpoint();
    for (media, format) in FORMATS {
        let plain = image(format, 1);
        let signed = signer.sign(&plain, media, Origin::Generated, &generation(&c)).unwrap();
        assert_eq!(MediaType::sniff(&signed), Some(media));
        // The same pixels.
        let (a, b) = (image::load_from_memory(&plain).unwrap(), image::load_from_memory(&signed).unwrap());
        assert_eq!(a.to_rgb8(), b.to_rgb8(), "{media:?}");

        let v = checked(&signed, media, None);
        assert_eq!(v.trust, Trust::Untrusted, "a self-made identity is never trusted by default");
        let actions = v.actions();
        assert_eq!(actions.len(), 1, "{media:?}: {actions:?}");
        assert_eq!(actions[0]["action"], "c2pa.created");
        assert_eq!(source_type(actions[0]), "trainedAlgorithmicMedia");
        assert_eq!(actions[0]["softwareAgent"]["name"], "imagegate");
        let g = v.assertion(provenance::GENERATION_ASSERTION).unwrap();
        assert_eq!(g["model"], "sd-turbo");
        assert_eq!(g["checkpoint"]["hub_repo"], "stabilityai/sd-turbo");
        assert!(g.get("prompt").is_none(), "prompts are private unless configured");
        let m = v.active_manifest().unwrap();
        assert_eq!(m["claim_generator_info"][0]["name"], "imagegate");
        assert_eq!(m["claim_generator_info"][0]["version"], "9.9.9");
        assert!(v.summary().contains("model:       sd-turbo"), "{}", v.summary());

        // Trusted once its root is a trust anchor.
        let trusted = checked(&signed, media, Some(&identity.root_pem().unwrap()));
        assert_eq!(trusted.trust, Trust::Trusted);

        // One flipped pixel byte breaks the hash binding.
        let mut flipped = signed.clone();
        flipped[pixel_byte(&signed, media)] ^= 0x01;
        let v = verify(&flipped, media, None).unwrap().expect("the manifest is still there");
        assert!(!v.valid, "{media:?}: a changed pixel byte still validates");
        assert!(v.failures.iter().any(|(code, _)| code.contains("dataHash.mismatch")), "{media:?}: {:?}", v.failures);
    }
}

#[test]
fn edits_name_their_inputs_as_ingredients() {
    let (signer, _) = signer();
    let c = checkpoint();
    let inputs = [image(ImageFormat::Png, 2), image(ImageFormat::Jpeg, 3), image(ImageFormat::WebP, 4)];
    let images: Vec<Input> = inputs
        .iter()
        .zip([MediaType::Png, MediaType::Jpeg, MediaType::Webp])
        .map(|(b, media_type)| Input { bytes: b, media_type })
        .collect();
    let mask = mask();
    for with_mask in [false, true] {
        let m = with_mask.then_some(Input { bytes: &mask, media_type: MediaType::Png });
        let plain = image(ImageFormat::Jpeg, 5);
        let signed =
            signer.sign(&plain, MediaType::Jpeg, Origin::Edited { images: &images, mask: m }, &generation(&c)).unwrap();
        let v = checked(&signed, MediaType::Jpeg, None);
        let actions = v.actions();
        let names: Vec<_> = actions.iter().map(|a| a["action"].as_str().unwrap()).collect();
        assert_eq!(names, ["c2pa.opened", "c2pa.edited"]);
        let expected = if with_mask { "compositeWithTrainedAlgorithmicMedia" } else { "trainedAlgorithmicMedia" };
        assert_eq!(source_type(actions[1]), expected);
        let ingredients = v.active_manifest().unwrap()["ingredients"].as_array().unwrap().clone();
        let relations: Vec<_> = ingredients.iter().map(|i| i["relationship"].as_str().unwrap()).collect();
        let mut expected = vec!["parentOf", "inputTo", "inputTo"];
        if with_mask {
            expected.push("inputTo");
        }
        assert_eq!(relations, expected);
        assert_eq!(ingredients[1]["format"], "image/jpeg");
    }
}

#[test]
fn an_input_that_carries_a_manifest_keeps_it_in_the_ingredient() {
    let (signer, _) = signer();
    let c = checkpoint();
    let first = signer.sign(&image(ImageFormat::Png, 6), MediaType::Png, Origin::Generated, &generation(&c)).unwrap();
    let images = [Input { bytes: &first, media_type: MediaType::Png }];
    let second = signer
        .sign(
            &image(ImageFormat::Png, 7),
            MediaType::Png,
            Origin::Edited { images: &images, mask: None },
            &generation(&c),
        )
        .unwrap();
    let v = checked(&second, MediaType::Png, None);
    assert_eq!(v.report["manifests"].as_object().unwrap().len(), 2, "the input's own manifest is carried along");
    let parent = &v.active_manifest().unwrap()["ingredients"][0];
    assert!(parent["active_manifest"].is_string(), "{parent}");
}

#[test]
fn the_prompt_and_partial_index_are_written_only_when_given() {
    let (signer, _) = signer();
    let c = checkpoint();
    let g = Generation { prompt: Some("a lighthouse"), partial_image_index: Some(1), ..generation(&c) };
    let signed = signer.sign(&image(ImageFormat::Png, 8), MediaType::Png, Origin::Generated, &g).unwrap();
    let v = checked(&signed, MediaType::Png, None);
    let a = v.assertion(provenance::GENERATION_ASSERTION).unwrap();
    assert_eq!(a["prompt"], "a lighthouse");
    assert_eq!(a["partial_image"], 1);
}

#[test]
fn a_configured_chain_signs_and_its_certificate_is_named() {
    // An intermediate between root and signer, on P-384, as an operator might bring.
    let issued = provenance::testing::issued_chain(
        &rcgen::PKCS_ECDSA_P384_SHA384,
        "Example Images Signer",
        Some("Example Corp"),
        true,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key_file) = (dir.path().join("chain.pem"), dir.path().join("key.pem"));
    std::fs::write(&chain, &issued.chain_pem).unwrap();
    std::fs::write(&key_file, &issued.key_pem).unwrap();
    let identity = Identity::from_files(&chain, &key_file).unwrap();
    assert_eq!(identity.algorithm(), "es384");
    assert!(!identity.self_made);
    let signer = Signer::new(&identity, ("imagegate", "9.9.9")).unwrap();
    let c = checkpoint();
    let signed = signer.sign(&image(ImageFormat::Png, 9), MediaType::Png, Origin::Generated, &generation(&c)).unwrap();
    let v = checked(&signed, MediaType::Png, Some(&issued.root_pem));
    assert_eq!(v.trust, Trust::Trusted);
    let sig = &v.active_manifest().unwrap()["signature_info"];
    assert_eq!(sig["common_name"], "Example Images Signer");
    assert_eq!(sig["issuer"], "Example Corp");

    // What is not a key is refused by name.
    std::fs::write(&key_file, "not a key").unwrap();
    let e = Identity::from_files(&chain, &key_file).unwrap_err().to_string();
    assert!(e.contains("private_key"), "{e}");
}

#[test]
fn an_identity_whose_manifests_would_not_validate_is_refused_before_it_signs() {
    use provenance::testing::issued_chain;
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let good = issued_chain(p256, "Example Images Signer", Some("Example Corp"), false).unwrap();
    let identity = Identity::from_pem(good.chain_pem.clone(), good.key_pem.clone(), false).unwrap();
    assert!(Signer::new(&identity, ("imagegate", "1")).is_ok());

    // Another pair's key: its signatures cannot verify against the certificate.
    let other = issued_chain(p256, "Other", Some("Example Corp"), false).unwrap();
    let mismatched = Identity::from_pem(good.chain_pem, other.key_pem, false).unwrap();
    let e = Signer::new(&mismatched, ("imagegate", "1")).unwrap_err().to_string();
    assert!(e.contains("does not validate") && e.contains("claimSignature"), "{e}");

    // No organization in the subject: c2pa 0.90 does not validate its signatures either.
    let no_org = issued_chain(p256, "Example Images Signer", None, false).unwrap();
    let identity = Identity::from_pem(no_org.chain_pem, no_org.key_pem, false).unwrap();
    let e = Signer::new(&identity, ("imagegate", "1")).unwrap_err().to_string();
    assert!(e.contains("does not validate") && e.contains("(O=)"), "{e}");
}

#[test]
fn a_local_identity_is_made_once_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (first, made) = Identity::local(dir.path()).unwrap();
    assert!(made && first.self_made);
    let (again, made) = Identity::local(dir.path()).unwrap();
    assert!(!made);
    assert_eq!(first.chain_pem(), again.chain_pem());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(provenance::KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the private key is readable by its owner only");
    }
}

#[test]
fn an_image_without_a_manifest_has_none() {
    for (media, format) in FORMATS {
        assert!(verify(&image(format, 10), media, None).unwrap().is_none(), "{media:?}");
    }
}

/// A signing service on 127.0.0.1 speaking the c2pa SDK's remote-signer protocol: each POST's body is
/// signed with `key_pem`, the signature is the response body. Returns its URL and how many it signed.
fn signing_service(chain_pem: String, key_pem: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/sign", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let signed = std::sync::Arc::clone(&count);
    std::thread::spawn(move || {
        let key =
            c2pa::create_signer::from_keys(chain_pem.as_bytes(), key_pem.as_bytes(), c2pa::SigningAlg::Es256, None)
                .unwrap();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).unwrap();
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            assert!(head.starts_with("post /sign "), "{head}");
            let length = head.lines().find_map(|l| l.strip_prefix("content-length:")).unwrap().trim().parse().unwrap();
            let mut body = vec![0u8; length];
            stream.read_exact(&mut body).unwrap();
            let signature = key.sign(&body).unwrap();
            signed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", signature.len())
                .unwrap();
            stream.write_all(&signature).unwrap();
        }
    });
    (url, count)
}

#[test]
fn a_remote_signer_holds_the_key_and_signs_every_manifest() {
    use std::sync::atomic::Ordering;
    let issued = provenance::testing::issued_chain(
        &rcgen::PKCS_ECDSA_P256_SHA256,
        "Example Remote Signer",
        Some("Example Corp"),
        false,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, &issued.chain_pem).unwrap();
    let (url, signed) = signing_service(issued.chain_pem.clone(), issued.key_pem.clone());

    let identity = Identity::remote(&chain, &url, "es256").unwrap();
    let signer = Signer::new(&identity, ("imagegate", "9.9.9")).unwrap();
    assert_eq!(signed.load(Ordering::SeqCst), 1, "the start-up check signed once, remotely");
    let c = checkpoint();
    for (media, format) in FORMATS {
        let out = signer.sign(&image(format, 11), media, Origin::Generated, &generation(&c)).unwrap();
        let v = checked(&out, media, Some(&issued.root_pem));
        assert_eq!(v.trust, Trust::Trusted);
        assert_eq!(v.active_manifest().unwrap()["signature_info"]["common_name"], "Example Remote Signer");
    }
    assert_eq!(signed.load(Ordering::SeqCst), 4);

    // A service that is not there: refused when the signer is made, before any image.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let identity = Identity::remote(&chain, &format!("http://{closed}/sign"), "es256").unwrap();
    assert!(Signer::new(&identity, ("imagegate", "1")).is_err());
    // What is not an algorithm is named.
    let e = Identity::remote(&chain, &url, "es999").unwrap_err().to_string();
    assert!(e.contains("algorithm") && e.contains("es999"), "{e}");
}
