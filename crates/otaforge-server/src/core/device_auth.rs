//! Devices that prove themselves with a key pair (Mender): the signed authentication request,
//! the key bound to the device on its first request, the device token (a JWT, HS256 under the
//! server's key, with an expiry), and signed, expiring download links.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use otaforge_store::model::{Device, DeviceStatus, Id, Product};

use crate::AppState;
use crate::auth::digest;
use crate::error::{ApiError, ApiResult};

/// How long a device token is valid.
pub const TOKEN_SECONDS: i64 = 7 * 24 * 3600;
/// How long a download link is valid.
pub const LINK_SECONDS: i64 = 24 * 3600;

fn now_secs() -> i64 {
    otaforge_store::model::now_millis() / 1000
}

/// Who a valid device token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    pub product: Id,
    pub device: Id,
    pub serial: String,
}

/// Checks `signature` (base64) over `body` with a PEM public key: RSA (PKCS#1 v1.5, SHA-256),
/// ECDSA P-256 (DER signature, SHA-256) or Ed25519.
pub fn verify_signature(public_key_pem: &str, body: &[u8], signature: &str) -> Result<(), String> {
    let signature = STANDARD
        .decode(signature.trim())
        .map_err(|_| "X-MEN-Signature is not base64".to_string())?;
    verify_bytes(public_key_pem, body, &signature, Ecdsa::Der)
}

/// How an ECDSA P-256 signature is written: DER (Mender's authentication requests) or raw
/// r||s, 64 bytes (`manifest.sig` of Mender artifacts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecdsa {
    Der,
    Raw,
}

/// Checks `signature` over `message` with a PEM public key: RSA (PKCS#1 v1.5, SHA-256),
/// ECDSA P-256 (SHA-256, written as `ecdsa` says) or Ed25519.
pub fn verify_bytes(
    public_key_pem: &str,
    message: &[u8],
    signature: &[u8],
    ecdsa: Ecdsa,
) -> Result<(), String> {
    use rsa::pkcs8::DecodePublicKey;
    let mismatch = |_| "the signature does not match the body and key".to_string();
    if let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(public_key_pem) {
        use rsa::signature::Verifier;
        let key = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(key);
        let sig = rsa::pkcs1v15::Signature::try_from(signature)
            .map_err(|_| "the RSA signature is malformed".to_string())?;
        return key.verify(message, &sig).map_err(mismatch);
    }
    if let Ok(key) = p256::ecdsa::VerifyingKey::from_public_key_pem(public_key_pem) {
        use p256::ecdsa::signature::Verifier;
        let sig = match ecdsa {
            Ecdsa::Der => p256::ecdsa::DerSignature::try_from(signature)
                .and_then(|der| p256::ecdsa::Signature::from_der(der.as_bytes())),
            Ecdsa::Raw => p256::ecdsa::Signature::from_slice(signature),
        }
        .map_err(|_| "the ECDSA signature is malformed".to_string())?;
        return key.verify(message, &sig).map_err(mismatch);
    }
    if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(public_key_pem) {
        use ed25519_dalek::Verifier;
        let sig = ed25519_dalek::Signature::from_slice(signature)
            .map_err(|_| "the Ed25519 signature is malformed".to_string())?;
        return key.verify(message, &sig).map_err(mismatch);
    }
    Err("the public key is not an RSA, ECDSA P-256 or Ed25519 key in PEM".into())
}

/// Whether `pem` is a public key signatures can be checked with.
pub fn is_public_key(pem: &str) -> bool {
    use rsa::pkcs8::DecodePublicKey;
    rsa::RsaPublicKey::from_public_key_pem(pem).is_ok()
        || p256::ecdsa::VerifyingKey::from_public_key_pem(pem).is_ok()
        || ed25519_dalek::VerifyingKey::from_public_key_pem(pem).is_ok()
}

/// The serial a Mender identity names: its `mac`, `serial` or `id` attribute, else the only one.
pub fn serial_of_identity(id_data: &serde_json::Value) -> Option<String> {
    let object = id_data.as_object()?;
    ["serial", "mac", "id"]
        .iter()
        .find_map(|k| object.get(*k))
        .or_else(|| {
            (object.len() == 1)
                .then(|| object.values().next())
                .flatten()
        })
        .and_then(|v| v.as_str())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// What an authentication request gets.
#[derive(Debug)]
pub enum DeviceAuth {
    /// A token for the device.
    Token(String),
    /// Known (or just registered), its key bound, but not accepted yet.
    Pending,
    /// Not who it says: unknown tenant token, bad signature, or another key than the bound one.
    Refused(String),
}

impl AppState {
    /// A signed authentication request (the body as sent and its signature). Unknown devices
    /// are registered as New with their key; a device's key is bound on its first request and
    /// never replaced.
    pub async fn authenticate_device_key(
        &self,
        tenant_token: &str,
        body: &[u8],
        signature: &str,
    ) -> ApiResult<DeviceAuth> {
        #[derive(serde::Deserialize)]
        struct Request {
            id_data: String,
            pubkey: String,
        }
        let request: Request = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("the authentication request is not its JSON: {e}"))
        })?;
        if let Err(why) = verify_signature(&request.pubkey, body, signature) {
            return Ok(DeviceAuth::Refused(why));
        }
        let Some(product) = self
            .inner
            .catalog
            .product_by_key_digest(self.store(), &digest(tenant_token))
            .await?
        else {
            return Ok(DeviceAuth::Refused("unknown tenant token".into()));
        };
        let id_data: serde_json::Value = serde_json::from_str(&request.id_data)
            .map_err(|_| ApiError::bad_request("id_data is not a JSON object"))?;
        let serial = serial_of_identity(&id_data)
            .ok_or_else(|| ApiError::bad_request("id_data names no serial, mac or id attribute"))?;
        let serial = crate::core::fleet::check_serial(&serial)?;
        let device = self
            .inner
            .catalog
            .device_or_register(self.store(), product.id, &serial)
            .await?;
        let key = request.pubkey.trim();
        match device.public_key.as_deref() {
            Some(bound) if bound.trim() == key => {}
            Some(_) => {
                return Ok(DeviceAuth::Refused(
                    "this device signs with another key than the one it first used".into(),
                ));
            }
            None => {
                if !self.store().bind_device_key(device.id, key).await? {
                    return Ok(DeviceAuth::Refused(
                        "this device signs with another key than the one it first used".into(),
                    ));
                }
                self.inner.catalog.forget_device(product.id, &device.serial);
                let _ = self
                    .store()
                    .add_device_event(device.id, "key", "public key bound on its first request")
                    .await;
            }
        }
        if device.status != DeviceStatus::Verified {
            return Ok(DeviceAuth::Pending);
        }
        Ok(DeviceAuth::Token(self.device_token(&product, &device)))
    }

    /// A JWT (HS256) naming the device, valid for [`TOKEN_SECONDS`].
    pub fn device_token(&self, product: &Product, device: &Device) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let now = now_secs();
        let claims = serde_json::json!({
            "sub": device.id.to_string(),
            "otaforge:product": product.id,
            "otaforge:serial": device.serial,
            "iat": now,
            "exp": now + TOKEN_SECONDS,
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let tag = URL_SAFE_NO_PAD.encode(self.inner.sealer.mac(signed.as_bytes()));
        format!("{signed}.{tag}")
    }

    /// Who a valid, unexpired device token names.
    pub fn verify_device_token(&self, token: &str) -> Option<TokenClaims> {
        let (signed, tag) = token.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        if !self.inner.sealer.verify_mac(signed.as_bytes(), &tag) {
            return None;
        }
        let (_, claims) = signed.split_once('.')?;
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
        if claims["exp"].as_i64()? < now_secs() {
            return None;
        }
        Some(TokenClaims {
            product: claims["otaforge:product"].as_i64()?,
            device: claims["sub"].as_str()?.parse().ok()?,
            serial: claims["otaforge:serial"].as_str()?.to_string(),
        })
    }

    /// `?expires=…&signature=…` for a download of `firmware` by `device`.
    pub fn download_query(&self, device: Id, firmware: Id) -> String {
        let expires = now_secs() + LINK_SECONDS;
        let tag = self
            .inner
            .sealer
            .mac(format!("download {device} {firmware} {expires}").as_bytes());
        format!(
            "expires={expires}&signature={}",
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Whether a download link's query is the server's own and unexpired.
    pub fn verify_download(&self, device: Id, firmware: Id, expires: i64, signature: &str) -> bool {
        let Ok(tag) = URL_SAFE_NO_PAD.decode(signature) else {
            return false;
        };
        expires >= now_secs()
            && self.inner.sealer.verify_mac(
                format!("download {device} {firmware} {expires}").as_bytes(),
                &tag,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        let id = serde_json::json!({"mac": "02:00:00:00:00:01"});
        assert_eq!(
            serial_of_identity(&id).as_deref(),
            Some("02:00:00:00:00:01")
        );
        let id = serde_json::json!({"serial": "s-1", "mac": "m"});
        assert_eq!(serial_of_identity(&id).as_deref(), Some("s-1"));
        let id = serde_json::json!({"cpu": "x"});
        assert_eq!(serial_of_identity(&id).as_deref(), Some("x"));
        assert_eq!(
            serial_of_identity(&serde_json::json!({"a": "1", "b": "2"})),
            None
        );
        assert_eq!(serial_of_identity(&serde_json::json!("x")), None);
    }

    #[test]
    fn signatures_of_each_key_kind() {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let body = br#"{"id_data":"{\"mac\":\"02\"}","tenant_token":"","pubkey":"..."}"#;
        // Ed25519
        let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let pem = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        use ed25519_dalek::Signer;
        let sig = STANDARD.encode(key.sign(body).to_bytes());
        assert_eq!(verify_signature(&pem, body, &sig), Ok(()));
        assert!(verify_signature(&pem, b"other body", &sig).is_err());
        // ECDSA P-256, DER
        let key = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let pem = key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let sig: p256::ecdsa::DerSignature = {
            use p256::ecdsa::signature::Signer;
            let s: p256::ecdsa::Signature = key.sign(body);
            s.to_der()
        };
        let sig = STANDARD.encode(sig.as_bytes());
        assert_eq!(verify_signature(&pem, body, &sig), Ok(()));
        assert!(verify_signature(&pem, b"x", &sig).is_err());
        assert!(verify_signature("not a key", body, &sig).is_err());
        assert!(verify_signature(&pem, body, "%%%").is_err());
    }
}
