//! Signed firmware, checked once for every path that stores firmware (uploads from the API and
//! the pages, builds): ESP-IDF Secure Boot V2 signature blocks (RSA-3072 PSS and ECDSA
//! P-256, up to three, in the 4 KiB sector after the padded image) are verified against the
//! digest of the bytes before the sector, and a product that lists firmware keys (their key
//! digests, as eFuse and `espsecure` name them) takes only images one of its keys signed.

use axum::http::StatusCode;
use otaforge_formats::sbv2::{self, Block, Key, Signed};
use serde::Serialize;

use crate::error::{ApiError, ApiResult};

/// At most this many key digests per product.
pub const MAX_FIRMWARE_KEYS: usize = 16;

/// One signature block as checked: what the firmware page and the API show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockCheck {
    pub block: usize,
    pub scheme: &'static str,
    /// SHA-256 of the block's public key (hex), as `espsecure signature-info-v2` prints it.
    pub key_digest: String,
    pub verified: bool,
    /// Why it did not verify.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

fn verify(signed: &Signed, block: &Block) -> Result<(), String> {
    if block.image_digest != signed.sha256 {
        return Err(
            "it signs other bytes than the image carries (the image was changed after signing)"
                .into(),
        );
    }
    match &block.key {
        Key::Rsa3072 {
            modulus,
            exponent,
            signature,
        } => {
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(modulus),
                rsa::BigUint::from(*exponent),
            )
            .map_err(|e| format!("its RSA key is not usable: {e}"))?;
            key.verify(
                rsa::Pss::new_with_salt::<sha2::Sha256>(32),
                &signed.sha256,
                signature,
            )
            .map_err(|_| "its RSA-PSS signature does not match its key".to_string())
        }
        Key::Ecdsa {
            curve: 2,
            x,
            y,
            r,
            s,
        } => {
            use p256::ecdsa::signature::hazmat::PrehashVerifier;
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(x);
            point.extend_from_slice(y);
            let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)
                .map_err(|_| "its P-256 key is not a point of the curve".to_string())?;
            let mut rs = Vec::with_capacity(64);
            rs.extend_from_slice(r);
            rs.extend_from_slice(s);
            let sig = p256::ecdsa::Signature::from_slice(&rs)
                .map_err(|_| "its ECDSA signature is out of range".to_string())?;
            key.verify_prehash(&signed.sha256, &sig)
                .map_err(|_| "its ECDSA signature does not match its key".to_string())
        }
        Key::Ecdsa { .. } => Err(format!(
            "{} signatures are not checked by this server (RSA-3072 and ECDSA P-256 are)",
            block.key.scheme()
        )),
    }
}

/// The Secure Boot V2 blocks of a file, each verified; `None` when the file carries none.
pub fn check_sbv2(file: &[u8]) -> Option<Vec<BlockCheck>> {
    let signed = sbv2::signature_sector(file)?;
    Some(
        signed
            .blocks
            .iter()
            .map(|block| {
                let outcome = verify(&signed, block);
                BlockCheck {
                    block: block.index,
                    scheme: block.key.scheme(),
                    key_digest: hex::encode(block.key_digest),
                    verified: outcome.is_ok(),
                    problem: outcome.err(),
                }
            })
            .collect(),
    )
}

/// The rule of what signed firmware a product takes: a block that does not verify is
/// refused whatever the product says (a board with secure boot would refuse it too); a
/// product with firmware keys takes only images with a verified block of one of them.
pub fn admit(required: &[String], checks: Option<&[BlockCheck]>) -> ApiResult<()> {
    let refuse = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    if let Some(bad) = checks.into_iter().flatten().find(|c| !c.verified) {
        return Err(refuse(format!(
            "Secure Boot V2 signature block {} ({}, key digest {}) does not verify: {}",
            bad.block,
            bad.scheme,
            bad.key_digest,
            bad.problem.as_deref().unwrap_or("unknown")
        )));
    }
    if required.is_empty() {
        return Ok(());
    }
    let Some(checks) = checks else {
        return Err(refuse(
            "this product takes only firmware signed with one of its keys (ESP-IDF Secure Boot V2); \
             the image carries no signature block"
                .into(),
        ));
    };
    if checks.iter().any(|c| required.contains(&c.key_digest)) {
        return Ok(());
    }
    let digests: Vec<&str> = checks.iter().map(|c| c.key_digest.as_str()).collect();
    Err(refuse(format!(
        "the image is signed with key digest {}, which is not one of this product's firmware keys",
        digests.join(" and ")
    )))
}

/// A signature the Arduino cores' own updaters check, appended to the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arduino {
    /// The ESP8266 core's `Updater`: payload, signature, its length as a u32 LE; RSA PKCS#1
    /// v1.5 with SHA-256 over the payload (`tools/signing.py`). `payload_len` bytes signed.
    Esp8266 { payload_len: usize },
    /// arduino-esp32's `UPDATE_SIGN`: the firmware, then its signature zero-padded to 512
    /// bytes; RSA-PSS (SHA-256, MGF1, the largest salt) or ECDSA P-256 (DER) over SHA-256 of
    /// the firmware (`Updater_Signing.cpp`).
    Esp32,
}

/// The length of arduino-esp32's signature trailer.
pub const ESP32_SIGNATURE_LEN: usize = 512;

fn verify_esp32(key_pem: &str, firmware: &[u8], signature: &[u8]) -> Result<(), String> {
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    use sha2::Digest;
    let hashed = sha2::Sha256::digest(firmware);
    if let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(key_pem) {
        let k = key.size();
        let sig = signature.get(..k).ok_or("the RSA signature is short")?;
        let salt = k.saturating_sub(32 + 2);
        return key
            .verify(rsa::Pss::new_with_salt::<sha2::Sha256>(salt), &hashed, sig)
            .map_err(|_| "the RSA-PSS signature does not match".to_string());
    }
    if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_pem(key_pem) {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        // DER: 0x30, the length, then that many bytes; zeros pad it to 512.
        let len = usize::from(*signature.get(1).ok_or("the ECDSA signature is short")?) + 2;
        let der = signature.get(..len).ok_or("the ECDSA signature is short")?;
        let sig = p256::ecdsa::Signature::from_der(der)
            .map_err(|_| "the ECDSA signature is malformed".to_string())?;
        return key
            .verify_prehash(&hashed, &sig)
            .map_err(|_| "the ECDSA signature does not match".to_string());
    }
    Err("the key is not an RSA or ECDSA P-256 public key".into())
}

/// The rule for images the Arduino updaters check, on a product with public keys (its
/// artifact keys): an ESP8266 image must carry a signature, and a signature an ESP8266 or
/// ESP32 image carries must verify with one of the keys. Without keys nothing is checked
/// (the board checks what it was built to).
pub fn admit_arduino(
    keys: &[String],
    file: &[u8],
    esp8266: bool,
    signed: Option<Arduino>,
) -> ApiResult<bool> {
    let refuse = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    if keys.is_empty() {
        return Ok(false);
    }
    let verified = match signed {
        None if esp8266 => {
            return Err(refuse(
                "this product takes only signed ESP8266 images (signed with one of its public                  keys, as the ESP8266 core's signing.py does); the image carries no signature"
                    .into(),
            ));
        }
        None => return Ok(false),
        Some(Arduino::Esp8266 { payload_len }) => {
            let payload = file.get(..payload_len).unwrap_or_default();
            let signature = file
                .get(payload_len..file.len().saturating_sub(4))
                .unwrap_or_default();
            keys.iter().any(|key| {
                crate::core::device_auth::verify_bytes(
                    key,
                    payload,
                    signature,
                    crate::core::device_auth::Ecdsa::Der,
                )
                .is_ok()
            })
        }
        Some(Arduino::Esp32) => {
            let cut = file.len().saturating_sub(ESP32_SIGNATURE_LEN);
            let (firmware, signature) = file.split_at(cut);
            keys.iter()
                .any(|key| verify_esp32(key, firmware, signature).is_ok())
        }
    };
    if verified {
        Ok(true)
    } else {
        Err(refuse(
            "the image's signature does not verify with any of the product's public keys".into(),
        ))
    }
}

/// Firmware keys (hex SHA-256 key digests, 64 hex digits in either case, as the OpenAPI
/// document's pattern says), checked and normalised to lowercase.
pub fn check_firmware_keys(keys: Vec<String>) -> ApiResult<Vec<String>> {
    let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_lowercase()).collect();
    if keys.len() > MAX_FIRMWARE_KEYS {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("at most {MAX_FIRMWARE_KEYS} firmware keys"),
        ));
    }
    if let Some(bad) = keys
        .iter()
        .find(|k| k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{bad:?} is not a key digest: 64 hex digits, the SHA-256 of the public key as \
                 `espsecure digest-sbv2-public-key` prints it"
            ),
        ));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_hex_digests() {
        let d = "AB".repeat(32);
        assert_eq!(check_firmware_keys(vec![d]).unwrap(), vec!["ab".repeat(32)]);
        assert!(check_firmware_keys(vec!["xyz".into()]).is_err());
        assert!(check_firmware_keys(vec![String::new()]).is_err());
        assert!(check_firmware_keys(vec![format!(" {} ", "ab".repeat(32))]).is_err());
        assert!(check_firmware_keys(vec!["0".repeat(64); 17]).is_err());
    }

    #[test]
    fn what_a_product_takes() {
        let ok = BlockCheck {
            block: 0,
            scheme: "rsa3072",
            key_digest: "aa".repeat(32),
            verified: true,
            problem: None,
        };
        let bad = BlockCheck {
            verified: false,
            problem: Some("x".into()),
            ..ok.clone()
        };
        assert!(admit(&[], None).is_ok());
        assert!(admit(&[], Some(std::slice::from_ref(&ok))).is_ok());
        assert!(admit(&[], Some(std::slice::from_ref(&bad))).is_err());
        let want = vec!["aa".repeat(32)];
        assert!(admit(&want, Some(std::slice::from_ref(&ok))).is_ok());
        assert!(
            admit(&want, None)
                .unwrap_err()
                .message
                .contains("no signature")
        );
        let other = vec!["bb".repeat(32)];
        assert!(
            admit(&other, Some(&[ok]))
                .unwrap_err()
                .message
                .contains("not one of this product's")
        );
    }
}
