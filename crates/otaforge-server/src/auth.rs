//! Secrets: argon2id password hashes, SHA-256 digests of random tokens and API keys,
//! the bearer-token extractor for the management API, and HTTP Basic credentials.

use std::collections::HashMap;
use std::sync::Mutex;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine;
use otaforge_store::model::User;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::error::ApiError;

/// Hashes a low-entropy secret (operator or device password) with argon2id.
pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| ApiError::internal("random salt", e))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| ApiError::internal("salt", e))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal("argon2", e))
}

/// Checks a password against an argon2 PHC string. A malformed stored hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A random secret of 128 bits as 32 lowercase hex characters (API keys, tokens, passwords).
pub fn random_secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal("random secret", e))?;
    Ok(hex(&bytes))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// SHA-256 (hex) of a high-entropy secret: how API keys and bearer tokens are stored and
/// looked up. Argon2 is kept for passwords, which a person may pick badly.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Remembers passwords that verified against a given stored hash, so that a device polling
/// every few seconds costs one argon2 run, not one per request. Keyed by a SHA-256 over the
/// stored hash and the password: a changed password (new stored hash) misses.
#[derive(Default)]
pub struct VerifiedCache {
    seen: Mutex<HashMap<[u8; 32], ()>>,
}

impl VerifiedCache {
    const MAX: usize = 100_000;

    fn key(password: &str, phc: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(phc.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    pub async fn verify(&self, password: &str, phc: &str) -> bool {
        let key = Self::key(password, phc);
        if self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&key)
        {
            return true;
        }
        let (password_owned, phc_owned) = (password.to_string(), phc.to_string());
        let ok = tokio::task::spawn_blocking(move || verify_password(&password_owned, &phc_owned))
            .await
            .unwrap_or(false);
        if ok {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() >= Self::MAX {
                seen.clear();
            }
            seen.insert(key, ());
        }
        ok
    }
}

/// An operator authenticated by `Authorization: Bearer <token>`: a token issued by
/// `POST /api/v1/auth/login`, or the `OTAFORGE_ADMIN_TOKEN` of the server's environment.
pub struct Operator(pub User);

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized("missing Authorization: Bearer <token> header")
            })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be Bearer <token>")
            })?;
        if let Some(admin) = &state.inner.config.admin_token
            && constant_time_eq(admin.expose().as_bytes(), token.as_bytes())
        {
            return Ok(Operator(User {
                id: 0,
                username: "admin-token".into(),
                password_hash: String::new(),
                is_admin: true,
                created_at: 0,
            }));
        }
        match state.inner.store.user_by_token(&digest(token)).await? {
            Some(user) => Ok(Operator(user)),
            None => Err(ApiError::unauthorized("invalid or revoked token")),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `Authorization: Basic` decoded to `user:password`, if the header is present and well
/// formed. The caller splits it: a user name may itself contain ':' (MAC-style serials).
pub fn basic_credentials(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        let phc = hash_password("12345").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password("12345", &phc));
        assert!(!verify_password("12346", &phc));
        assert!(!verify_password("12345", "not a hash"));
    }

    #[test]
    fn basic_parsing() {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            "authorization",
            "Basic Ym90XzAwMToxMjM0NQ==".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some("bot_001:12345".to_string())
        );
        headers.insert("authorization", "Basic !!!".parse().unwrap());
        assert_eq!(basic_credentials(&headers), None);
    }
}
