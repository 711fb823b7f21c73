//! Sign-ins: operators by name and password, bots by device ID and password. The web form
//! and the REST login both call these, so the password guard (rate limit, bounded hashing,
//! equal cost for unknown names) and the audit entry cannot be skipped by either.

use std::net::IpAddr;

use axum::http::StatusCode;
use otaforge_store::model::{Device, DeviceStatus, Id, Millis, Role, TokenInfo, User, now_millis};

use crate::AppState;
use crate::auth::{digest, random_secret};
use crate::core::fleet::{Actor, check_name, hash_off_thread};
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

    /// The account's own tokens; an admin sees everyone's. (Any role: a viewer manages its
    /// own credentials too.)
    pub async fn list_tokens(&self, user: &User) -> ApiResult<Vec<TokenInfo>> {
        let whose = if user.is_admin() { None } else { Some(user.id) };
        Ok(self.store().list_tokens(whose).await?)
    }

    /// Revokes one of the account's tokens (an admin: anyone's).
    pub async fn revoke_token(
        &self,
        user: &User,
        address: Option<IpAddr>,
        id: &str,
    ) -> ApiResult<()> {
        let whose = if user.is_admin() { None } else { Some(user.id) };
        if !self.store().revoke_token(id.trim(), whose).await? {
            return Err(ApiError::not_found("no such token"));
        }
        self.audit_event(&user.username, address, "revoked token", id.trim(), "")
            .await;
        Ok(())
    }

    // ---- operator accounts ----

    /// Every operator account (any signed-in operator may look).
    pub async fn list_operators(&self) -> ApiResult<Vec<User>> {
        Ok(self.store().list_users().await?)
    }

    /// A new operator account (admins only), with its first password.
    pub async fn create_operator(
        &self,
        actor: &Actor,
        username: &str,
        password: &str,
        role: Role,
    ) -> ApiResult<User> {
        actor.require_admin()?;
        let username = check_name("username", username)?;
        let hash = hash_off_thread(password.to_string()).await?;
        let user = self.store().create_user(&username, &hash, role).await?;
        self.audited(
            actor,
            "created account",
            &format!("user {username}"),
            role.as_str(),
        )
        .await;
        Ok(user)
    }

    /// Changes an account's role or password (admins only). An admin cannot take away its
    /// own admin role, so the server always keeps one.
    pub async fn change_operator(
        &self,
        actor: &Actor,
        id: Id,
        role: Option<Role>,
        password: Option<&str>,
    ) -> ApiResult<User> {
        actor.require_admin()?;
        let mut user = self
            .store()
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::not_found("no such account"))?;
        if let Some(role) = role
            && role != user.role
        {
            if actor.user_id == Some(id) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "an admin cannot change its own role; another admin can",
                ));
            }
            user = self.store().set_user_role(id, role).await?;
            self.audited(
                actor,
                "changed role",
                &format!("user {}", user.username),
                role.as_str(),
            )
            .await;
        }
        if let Some(password) = password {
            let hash = hash_off_thread(password.to_string()).await?;
            self.store().set_user_password(id, &hash).await?;
            self.audited(
                actor,
                "password set",
                &format!("user {}", user.username),
                "",
            )
            .await;
        }
        Ok(user)
    }

    /// Deletes an account with its tokens and sessions (admins only; not one's own).
    pub async fn delete_operator(&self, actor: &Actor, id: Id) -> ApiResult<()> {
        actor.require_admin()?;
        if actor.user_id == Some(id) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "an admin cannot delete its own account; another admin can",
            ));
        }
        let user = self
            .store()
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::not_found("no such account"))?;
        self.store().delete_user(id).await?;
        self.audited(
            actor,
            "deleted account",
            &format!("user {}", user.username),
            "",
        )
        .await;
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
