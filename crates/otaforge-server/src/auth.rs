//! Secrets: argon2id password hashes, SHA-256 digests of random tokens and API keys,
//! the bearer-token extractor for the management API, and HTTP Basic credentials.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
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

/// Checks a password against an argon2 PHC string (a malformed stored hash never matches),
/// in a caller-kept work area: the hashing threads reuse one buffer each instead of
/// allocating 19 MiB a check (the allocator would keep every one).
pub fn verify_password_in(memory: &mut Vec<argon2::Block>, password: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm) else {
        return false;
    };
    let version = match hash.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let Ok(params) = argon2::Params::try_from(&hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    let Some(work) = memory.get_mut(..blocks) else {
        return false;
    };
    argon
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, work)
        .is_ok()
        && constant_time_eq(&out, expected.as_bytes())
}

/// A random secret of 128 bits as 32 lowercase hex characters (API keys, tokens, passwords).
pub fn random_secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal("random secret", e))?;
    Ok(hex(&bytes))
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// SHA-256 (hex) of a high-entropy secret: how API keys and bearer tokens are stored and
/// looked up. Argon2 is kept for passwords, which a person may pick badly.
pub fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// An operator authenticated by `Authorization: Bearer <token>`: a token issued by
/// `POST /api/v1/auth/login`, or the `OTAFORGE_ADMIN_TOKEN` of the server's environment.
pub struct Operator(pub User, pub Option<std::net::IpAddr>);

impl Operator {
    /// The operator as the actor of a fleet operation (refused for a viewer account).
    pub fn actor(&self) -> crate::error::ApiResult<crate::core::fleet::Actor> {
        crate::core::fleet::Actor::of(&self.0, self.1)
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let address = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
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
            return Ok(Operator(
                User {
                    id: 0,
                    username: "admin-token".into(),
                    password_hash: String::new(),
                    role: otaforge_store::model::Role::Admin,
                    created_at: 0,
                },
                address,
            ));
        }
        match state.inner.store.user_by_token(&digest(token)).await? {
            Some(user) => Ok(Operator(user, address)),
            None => Err(ApiError::unauthorized("invalid or revoked token")),
        }
    }
}

/// Equal in constant time (for equal lengths).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
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
        let verify_password = |p: &str, phc: &str| verify_password_in(&mut Vec::new(), p, phc);
        assert!(verify_password("12345", &phc));
        assert!(!verify_password("12346", &phc));
        assert!(!verify_password("12345", "not a hash"));
        // The same answers with a reused work area.
        let mut memory = Vec::new();
        assert!(verify_password_in(&mut memory, "12345", &phc));
        assert!(!verify_password_in(&mut memory, "12346", &phc));
        assert!(!verify_password_in(&mut memory, "12345", "not a hash"));
        assert!(verify_password_in(&mut memory, "12345", &phc));
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
