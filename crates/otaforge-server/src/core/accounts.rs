//! Sign-ins: operators by name and password, bots by device ID and password. The web form
//! and the REST login both call these, so the password guard (rate limit, bounded hashing,
//! equal cost for unknown names) and the audit entry cannot be skipped by either.

use std::net::IpAddr;

use axum::http::StatusCode;
use otaforge_store::model::{Device, DeviceStatus, Millis, TokenInfo, User, now_millis};

use crate::AppState;
use crate::auth::{digest, random_secret};
use crate::core::fleet::Actor;
use crate::core::passwords::Refused;
use crate::error::{ApiError, ApiResult};

/// Days a bearer token lives unless the login asks otherwise, and the most it may ask.
pub const DEFAULT_TOKEN_DAYS: i64 = 30;
pub const MAX_TOKEN_DAYS: i64 = 365;

/// Why a sign-in did not open a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignInRefusal {
    /// Unknown name or wrong password: one answer for both.
    Wrong,
    Refused(Refused),
    /// The device is blocked or disabled.
    DeviceLocked(DeviceStatus),
}

impl SignInRefusal {
    pub fn message(self) -> &'static str {
        match self {
            SignInRefusal::Wrong => "wrong name or password",
            SignInRefusal::Refused(r) => r.message(),
            SignInRefusal::DeviceLocked(_) => "this device is blocked or disabled",
        }
    }
}

impl AppState {
    pub async fn sign_in_operator(
        &self,
        name: &str,
        password: &str,
        peer: IpAddr,
    ) -> ApiResult<Result<User, SignInRefusal>> {
        let user = self.store().user_by_name(name.trim()).await?;
        let stored = user.as_ref().map(|u| u.password_hash.as_str());
        let outcome = match self
            .inner
            .passwords
            .check(name, peer, password, stored)
            .await
        {
            Err(r) => Err(SignInRefusal::Refused(r)),
            Ok(false) => Err(SignInRefusal::Wrong),
            Ok(true) => user.ok_or(SignInRefusal::Wrong),
        };
        self.audit_sign_in(name, "operator", peer, &outcome.as_ref().map(|_| ()))
            .await;
        Ok(outcome)
    }

    /// A bot signs in with its device ID (serial) and password; a serial may exist in several
    /// products, each with its own password.
    pub async fn sign_in_bot(
        &self,
        serial: &str,
        password: &str,
        peer: IpAddr,
    ) -> ApiResult<Result<Device, SignInRefusal>> {
        let devices = self.store().devices_by_serial(serial.trim()).await?;
        let mut outcome = Err(SignInRefusal::Wrong);
        let with_password: Vec<&Device> = devices
            .iter()
            .filter(|d| d.password_hash.is_some())
            .collect();
        if with_password.is_empty() {
            // Costs what a wrong password costs.
            if let Err(r) = self
                .inner
                .passwords
                .check(serial, peer, password, None)
                .await
            {
                outcome = Err(SignInRefusal::Refused(r));
            }
        }
        for device in with_password {
            match self
                .inner
                .passwords
                .check(serial, peer, password, device.password_hash.as_deref())
                .await
            {
                Err(r) => {
                    outcome = Err(SignInRefusal::Refused(r));
                    break;
                }
                Ok(false) => {}
                Ok(true) => {
                    outcome = match device.status {
                        DeviceStatus::Blocked | DeviceStatus::Disabled => {
                            Err(SignInRefusal::DeviceLocked(device.status))
                        }
                        _ => Ok(device.clone()),
                    };
                    break;
                }
            }
        }
        self.audit_sign_in(serial, "bot", peer, &outcome.as_ref().map(|_| ()))
            .await;
        Ok(outcome)
    }

    /// A new bearer token for a signed-in operator: the token (shown once) and its expiry.
    pub async fn issue_token(&self, user: &User, days: Option<i64>) -> ApiResult<(String, Millis)> {
        let days = days.unwrap_or(DEFAULT_TOKEN_DAYS);
        if !(1..=MAX_TOKEN_DAYS).contains(&days) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("expires_in_days must be 1 to {MAX_TOKEN_DAYS}"),
            ));
        }
        let token = random_secret()?;
        let expires_at = now_millis() + days * 24 * 3600 * 1000;
        self.store()
            .create_token(&digest(&token), user.id, expires_at)
            .await?;
        Ok((token, expires_at))
    }

    /// The actor's own tokens; an administrator sees everyone's.
    pub async fn list_tokens(&self, actor: &Actor) -> ApiResult<Vec<TokenInfo>> {
        let whose = if actor.is_admin { None } else { actor.user_id };
        Ok(self.store().list_tokens(whose).await?)
    }

    /// Revokes one of the actor's tokens (an administrator: anyone's).
    pub async fn revoke_token(&self, actor: &Actor, id: &str) -> ApiResult<()> {
        let whose = if actor.is_admin { None } else { actor.user_id };
        if actor.user_id.is_none() && !actor.is_admin {
            return Err(ApiError::forbidden("this login has no tokens"));
        }
        if !self.store().revoke_token(id.trim(), whose).await? {
            return Err(ApiError::not_found("no such token"));
        }
        if let Err(e) = self
            .store()
            .audit(&actor.name, "revoked token", id.trim(), "")
            .await
        {
            tracing::warn!(error = %e, "writing the audit log failed");
        }
        Ok(())
    }

    async fn audit_sign_in(
        &self,
        name: &str,
        kind: &str,
        peer: IpAddr,
        outcome: &Result<(), &SignInRefusal>,
    ) {
        let name: String = name
            .trim()
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        let action = match outcome {
            Ok(()) => "signed in",
            // Attempts the guard refused ran no check: not written, so a flood writes nothing.
            Err(SignInRefusal::Refused(_)) => return,
            Err(_) => "sign-in failed",
        };
        if let Err(e) = self
            .store()
            .audit(&name, action, kind, &format!("from {peer}"))
            .await
        {
            tracing::warn!(error = %e, "writing the audit log failed");
        }
    }
}
