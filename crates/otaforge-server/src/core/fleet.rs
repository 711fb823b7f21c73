//! Fleet operations: products, groups, devices, resources and firmware, for the REST API,
//! the pages and the CLI alike. Each one validates its input, requires an `Actor` (only an
//! authenticated operator is one), writes, clears the check-in caches and writes its audit
//! entry: no edge can skip any of it.

use std::net::IpAddr;

use bytes::Bytes;
use otaforge_store::model::*;

use crate::AppState;
use crate::auth::{digest, hash_password, random_secret};
use axum::http::StatusCode;

use crate::error::{ApiError, ApiResult};

/// Names are 1 to 100 characters, none of them control characters, and do not start or end
/// with white space (forms trim what people type; the API takes names as they are). The
/// OpenAPI document states the same rule as a pattern.
pub fn check_name(what: &str, name: &str) -> ApiResult<String> {
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} must be 1 to 100 printable characters"),
        ));
    }
    if name.trim() != name {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} must not start or end with white space"),
        ));
    }
    Ok(name.to_string())
}

/// Serials are what devices send: printable ASCII without spaces or `/`, at most 64 bytes.
/// A device list's or bulk change's query: search texts of at most 64 characters, and a
/// cursor from a list in the query's own order.
pub fn check_device_query(query: &DeviceQuery) -> ApiResult<()> {
    for (name, text) in [
        ("serial_prefix", &query.serial_prefix),
        ("q", &query.search),
    ] {
        if text.as_ref().is_some_and(|t| t.chars().count() > 64) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{name} is longer than 64 characters"),
            ));
        }
    }
    if let Some(chip) = &query.chip
        && crate::decision::Family::of_chip(chip).is_none_or(|f| f.as_str() != chip)
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("chip must be esp32, esp8266, w800, swupdate or mender, not {chip:?}"),
        ));
    }
    if !query.cursor_fits() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "cursor comes from a list in another order (sort)",
        ));
    }
    Ok(())
}

pub fn check_serial(serial: &str) -> ApiResult<String> {
    if serial.is_empty()
        || serial.len() > 64
        || !serial.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "serial must be 1 to 64 printable ASCII characters without spaces or '/'",
        ));
    }
    Ok(serial.to_string())
}

/// Passwords: 1 to 128 characters.
pub fn check_password(password: &str) -> ApiResult<()> {
    if password.is_empty() || password.chars().count() > 128 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "password must be 1 to 128 characters",
        ));
    }
    Ok(())
}

/// Who performs a management operation. `Actor::of` is the one way to make one: only an
/// authenticated operator account whose role may change things (admin or operator; never a
/// viewer), so holding an `Actor` is the authorization every change below requires.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub user_id: Option<Id>,
    pub address: Option<IpAddr>,
    /// Private, so that no `Actor` is made anywhere but `Actor::of`.
    role: Role,
}

impl Actor {
    /// The signed-in account as the actor of a change; a viewer account is refused (403):
    /// it changes nothing, anywhere. `user.id` 0 is the server's admin token.
    pub fn of(user: &User, address: Option<IpAddr>) -> ApiResult<Actor> {
        if user.role == Role::Viewer {
            return Err(ApiError::forbidden(format!(
                "{} is a viewer account: it can look at everything and change nothing",
                user.username
            )));
        }
        Ok(Actor {
            name: user.username.clone(),
            user_id: (user.id != 0).then_some(user.id),
            role: user.role,
            address,
        })
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Accounts are managed by admins only.
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{} is an operator account: only an admin manages accounts",
                self.name
            )))
        }
    }
}

/// What may change on a group; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct GroupChange {
    pub name: Option<String>,
    /// `Some(None)` unassigns.
    pub firmware_id: Option<Option<Id>>,
    /// The firmware for devices of other families (replaces the list).
    pub other_firmware_ids: Option<Vec<Id>>,
    pub config: Option<serde_json::Value>,
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub serial: String,
    pub group_id: Option<Id>,
    pub password: Option<String>,
    pub status: DeviceStatus,
}

/// What may change on a device; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct DeviceChange {
    pub status: Option<DeviceStatus>,
    pub group_id: Option<Id>,
    /// `Some(None)` removes the password.
    pub password: Option<Option<String>>,
}

pub(crate) async fn hash_off_thread(password: String) -> ApiResult<String> {
    check_password(&password)?;
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("hashing", e))?
}

impl AppState {
    /// Writes the audit entry of a done operation. A failure to write it is logged; the
    /// operation itself already happened.
    pub(crate) async fn audited(&self, actor: &Actor, action: &str, subject: &str, detail: &str) {
        self.audit_event(&actor.name, actor.address, action, subject, detail)
            .await;
    }

    /// An audit entry for anyone (a bot's workspace changes too): who, what, from where.
    pub(crate) async fn audit_event(
        &self,
        who: &str,
        address: Option<IpAddr>,
        action: &str,
        subject: &str,
        detail: &str,
    ) {
        let detail = match (detail.is_empty(), address) {
            (_, None) => detail.to_string(),
            (true, Some(a)) => format!("from {a}"),
            (false, Some(a)) => format!("{detail} (from {a})"),
        };
        if let Err(e) = self.store().audit(who, action, subject, &detail).await {
            tracing::warn!(error = %e, "writing the audit log failed");
        }
    }

    /// After every write the check-in path reads: the caches forget the products, groups
    /// and firmware.
    fn changed(&self) {
        self.inner.catalog.invalidate_settings();
    }

    /// After a write that changed one device's row: the caches forget it (and the rest of
    /// `changed`).
    pub(crate) fn changed_device(&self, product: Id, serial: &str) {
        self.changed();
        self.inner.catalog.forget_device(product, serial);
    }

    /// After a write that changed many device rows at once (a group's devices moved, a
    /// product's deleted, firmware they were assigned deleted): the caches forget every
    /// device too.
    fn changed_devices(&self) {
        self.inner.catalog.invalidate();
    }

    // ---- products ----

    /// The new product and its API key (shown once; stored only as a digest).
    pub async fn create_product(&self, actor: &Actor, name: &str) -> ApiResult<(Product, String)> {
        let name = check_name("name", name)?;
        let key = random_secret()?;
        let product = self.store().create_product(&name, &digest(&key)).await?;
        self.changed();
        self.audited(actor, "created product", &name, "").await;
        Ok((product, key))
    }

    pub async fn rename_product(
        &self,
        actor: &Actor,
        product: Id,
        name: &str,
    ) -> ApiResult<Product> {
        let name = check_name("name", name)?;
        let old = self.store().get_product(product).await?;
        let renamed = self.store().rename_product(product, &name).await?;
        self.changed();
        self.audited(
            actor,
            "renamed product",
            &format!("product {}", old.name),
            &format!("to {name}"),
        )
        .await;
        Ok(renamed)
    }

    pub async fn rotate_product_key(
        &self,
        actor: &Actor,
        product: Id,
    ) -> ApiResult<(Product, String)> {
        let key = random_secret()?;
        let product = self.store().set_product_key(product, &digest(&key)).await?;
        self.changed();
        self.audited(
            actor,
            "rotated the API key",
            &format!("product {}", product.name),
            "",
        )
        .await;
        Ok((product, key))
    }

    /// The public keys the product's Linux artifacts must be signed with (none: signatures
    /// are reported, not required).
    pub async fn set_artifact_keys(
        &self,
        actor: &Actor,
        product: Id,
        keys: Vec<String>,
    ) -> ApiResult<Product> {
        if keys.len() > 16 {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "at most 16 artifact keys",
            ));
        }
        let keys: Vec<String> = keys.iter().map(|k| k.trim().to_string()).collect();
        if let Some(i) = keys
            .iter()
            .position(|k| k.len() > 16 * 1024 || !crate::core::device_auth::is_public_key(k))
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "key {} is not an RSA, ECDSA P-256 or Ed25519 public key in PEM",
                    i + 1
                ),
            ));
        }
        let product = self
            .store()
            .set_product_artifact_keys(product, &keys)
            .await?;
        self.changed();
        self.audited(
            actor,
            "set artifact keys",
            &format!("product {}", product.name),
            &format!("{} key(s)", keys.len()),
        )
        .await;
        Ok(product)
    }

    /// The key digests the product's firmware must be signed with (none: signatures are
    /// checked when present, not required).
    pub async fn set_firmware_keys(
        &self,
        actor: &Actor,
        product: Id,
        keys: Vec<String>,
    ) -> ApiResult<Product> {
        let keys = crate::core::signatures::check_firmware_keys(keys)?;
        let product = self
            .store()
            .set_product_firmware_keys(product, &keys)
            .await?;
        self.changed();
        self.audited(
            actor,
            "set firmware keys",
            &format!("product {}", product.name),
            &keys.join(", "),
        )
        .await;
        Ok(product)
    }

    /// Deletes the product with everything that belongs to it (groups, devices, firmware,
    /// resources, rollouts, builds).
    pub async fn delete_product(&self, actor: &Actor, product: Id) -> ApiResult<()> {
        let store = self.store();
        let found = store.get_product(product).await?;
        let firmware = store.list_firmware(product).await?;
        let mut resources = Vec::new();
        for group in store.list_groups(product).await? {
            resources.extend(store.list_resources(group.id).await?);
        }
        store.delete_product(product).await?;
        self.changed_devices();
        self.refresh_rollouts().await?;
        for sha in firmware
            .iter()
            .map(|f| &f.sha256)
            .chain(resources.iter().map(|r| &r.sha256))
        {
            self.release_blob(sha).await;
        }
        self.audited(actor, "deleted product", &found.name, "")
            .await;
        Ok(())
    }

    // ---- groups ----

    pub async fn create_group(&self, actor: &Actor, product: Id, name: &str) -> ApiResult<Group> {
        let name = check_name("name", name)?;
        let group = self.store().create_group(product, &name).await?;
        self.changed();
        self.audited(actor, "created group", &format!("group {}", group.name), "")
            .await;
        Ok(group)
    }

    pub async fn change_group(
        &self,
        actor: &Actor,
        product: Id,
        group: Id,
        change: GroupChange,
    ) -> ApiResult<Group> {
        let name = change
            .name
            .as_deref()
            .map(|n| check_name("name", n))
            .transpose()?;
        if let Some(config) = &change.config
            && !config.is_object()
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "config must be a JSON object",
            ));
        }
        if change.firmware_id.is_some() || change.other_firmware_ids.is_some() {
            let current = self.store().get_group(product, group).await?;
            let primary = change.firmware_id.unwrap_or(current.firmware_id);
            let others = change
                .other_firmware_ids
                .as_deref()
                .unwrap_or(&current.other_firmware_ids);
            if primary.is_none() && !others.is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "other_firmware_ids need a firmware_id: the group's release starts with it",
                ));
            }
            let release = self.release(product, primary, others).await?;
            for firmware in &release {
                if let Some(device) = crate::decision::personal_to(firmware) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        format!(
                            "firmware {} embeds the secrets of device {device}; it is served to that device only",
                            firmware.version
                        ),
                    ));
                }
            }
        }
        let patch = GroupPatch {
            name,
            firmware_id: change.firmware_id,
            other_firmware_ids: change.other_firmware_ids.clone(),
            config: change.config.clone(),
        };
        let group = self.store().update_group(product, group, patch).await?;
        self.changed();
        let mut detail = Vec::new();
        if change.name.is_some() {
            detail.push(format!("name {}", group.name));
        }
        if let Some(f) = change.firmware_id {
            detail.push(match f {
                Some(id) => format!("firmware {id}"),
                None => "firmware unassigned".into(),
            });
        }
        if let Some(others) = &change.other_firmware_ids {
            detail.push(format!("other families' firmware {others:?}"));
        }
        if change.config.is_some() {
            detail.push("config".into());
        }
        self.audited(
            actor,
            "changed group",
            &format!("group {}", group.name),
            &detail.join(", "),
        )
        .await;
        Ok(group)
    }

    /// A release by its firmware ids (the first standing for the rest), checked: every
    /// image is the product's (404), and no two are for one family (422).
    pub async fn release(
        &self,
        product: Id,
        first: Option<Id>,
        others: &[Id],
    ) -> ApiResult<Vec<Firmware>> {
        let mut release = Vec::with_capacity(others.len() + 1);
        for id in first.into_iter().chain(others.iter().copied()) {
            if release.iter().any(|f: &Firmware| f.id == id) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("firmware {id} is named twice"),
                ));
            }
            release.push(self.store().get_firmware(product, id).await?);
        }
        crate::decision::check_release(&release)
            .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m))?;
        Ok(release)
    }

    pub async fn delete_group(&self, actor: &Actor, product: Id, group: Id) -> ApiResult<()> {
        let found = self.store().get_group(product, group).await?;
        let resources = self.store().list_resources(group).await?;
        self.store().delete_group(product, group).await?;
        self.changed_devices();
        for r in resources {
            self.release_blob(&r.sha256).await;
        }
        self.audited(actor, "deleted group", &format!("group {}", found.name), "")
            .await;
        Ok(())
    }

    // ---- resources ----

    pub async fn add_resource(
        &self,
        actor: &Actor,
        product: Id,
        group: Id,
        name: &str,
        bytes: Bytes,
    ) -> ApiResult<Resource> {
        let name = check_name("name", name)?;
        if name.contains('/') || name.contains('\\') {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "a resource name is a file name, without '/' or '\\'",
            ));
        }
        self.store().get_group(product, group).await?;
        let sums = crate::upload::digests(&bytes);
        self.inner
            .blobs
            .put(&sums.sha256, bytes.clone())
            .await
            .map_err(|e| ApiError::internal("storing a resource", e))?;
        let result = self
            .store()
            .create_resource(NewResource {
                group_id: group,
                name,
                fk: random_secret()?,
                size: bytes.len() as i64,
                md5: sums.md5,
                sha256: sums.sha256.clone(),
            })
            .await;
        match result {
            Ok(resource) => {
                self.changed();
                self.audited(
                    actor,
                    "added resource",
                    &format!("resource {}", resource.name),
                    &format!("group {group}"),
                )
                .await;
                Ok(resource)
            }
            Err(e) => {
                self.release_blob(&sums.sha256).await;
                Err(e.into())
            }
        }
    }

    pub async fn delete_resource(
        &self,
        actor: &Actor,
        product: Id,
        group: Id,
        resource: Id,
    ) -> ApiResult<()> {
        self.store().get_group(product, group).await?;
        let gone = self.store().delete_resource(group, resource).await?;
        self.changed();
        self.release_blob(&gone.sha256).await;
        self.audited(
            actor,
            "deleted resource",
            &format!("resource {}", gone.name),
            &format!("group {group}"),
        )
        .await;
        Ok(())
    }

    // ---- devices ----

    /// One page of a product's devices (`query.limit` is `limit + 1`), with the count of
    /// all the filters take when `count`. The API, the pages and the CLI list through it.
    pub async fn device_page(
        &self,
        product: Id,
        query: &DeviceQuery,
        limit: i64,
        count: bool,
    ) -> ApiResult<crate::page::Page<Device>> {
        check_device_query(query)?;
        self.inner.catalog.product(self.store(), product).await?;
        // Reports still in the buffer are part of what the server knows.
        self.flush_telemetry().await?;
        let rows = self.store().device_page(product, query).await?;
        let mut page = crate::page::of(rows, limit, |d| query.cursor_after(d), |d| d);
        if count {
            // A first page that is the whole list is its own count (no second pass).
            page.total = Some(if page.next.is_none() && query.after.is_none() {
                page.items.len() as i64
            } else {
                self.store().count_devices(product, query).await?
            });
        }
        Ok(page)
    }

    pub async fn register_device(
        &self,
        actor: &Actor,
        product: Id,
        spec: DeviceSpec,
    ) -> ApiResult<Device> {
        let serial = check_serial(&spec.serial)?;
        let password_hash = match spec.password {
            Some(p) => Some(hash_off_thread(p).await?),
            None => None,
        };
        let device = self
            .store()
            .create_device(NewDevice {
                product_id: product,
                group_id: spec.group_id,
                serial,
                status: spec.status,
                password_hash,
            })
            .await?;
        self.changed_device(product, &device.serial);
        self.audited(
            actor,
            "registered device",
            &format!("device {}", device.serial),
            device.status.as_str(),
        )
        .await;
        Ok(device)
    }

    /// Changes a device. Blocking or disabling it, or changing its password, ends its bot
    /// sessions: a session never outlives the reason it was opened.
    pub async fn change_device(
        &self,
        actor: &Actor,
        product: Id,
        serial: &str,
        change: DeviceChange,
    ) -> ApiResult<Device> {
        let password_hash = match change.password.clone() {
            Some(Some(p)) => Some(Some(hash_off_thread(p).await?)),
            Some(None) => Some(None),
            None => None,
        };
        let patch = DevicePatch {
            status: change.status,
            group_id: change.group_id,
            password_hash,
        };
        let device = self.store().update_device(product, serial, patch).await?;
        self.changed_device(product, serial);
        let locked = matches!(
            change.status,
            Some(DeviceStatus::Blocked | DeviceStatus::Disabled)
        );
        if locked || change.password.is_some() {
            self.store()
                .delete_sessions_of(None, Some(device.id))
                .await?;
        }
        let mut detail = Vec::new();
        if let Some(s) = change.status {
            detail.push(format!("status {}", s.as_str()));
        }
        if let Some(g) = change.group_id {
            detail.push(format!("group {g}"));
        }
        match change.password {
            Some(Some(_)) => detail.push("password set".into()),
            Some(None) => detail.push("password removed".into()),
            None => {}
        }
        self.audited(
            actor,
            "changed device",
            &format!("device {serial}"),
            &detail.join(", "),
        )
        .await;
        Ok(device)
    }

    /// Seals and keeps a device's Wi-Fi secrets (what its setup firmware is built from).
    pub async fn save_wifi(
        &self,
        who: &str,
        address: Option<IpAddr>,
        device: &Device,
        secrets: &crate::setup::DeviceSecrets,
    ) -> ApiResult<()> {
        let refuse = |m: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m.to_string());
        // An empty network: the board is given it when installed over USB (Improv Wi-Fi).
        if secrets.wifi_ssid.len() > 32 || secrets.wifi_password.len() > 64 {
            return Err(refuse(
                "an SSID has at most 32 bytes and a Wi-Fi password at most 64",
            ));
        }
        if secrets
            .wifi_ssid
            .chars()
            .chain(secrets.wifi_password.chars())
            .chain(secrets.device_password.chars())
            .any(char::is_control)
        {
            return Err(refuse("control characters are not allowed"));
        }
        // The device password built into the firmware must be the one the server knows.
        let ok = self
            .inner
            .passwords
            .check(
                &device.serial,
                address.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
                &secrets.device_password,
                device.password_hash.as_deref(),
            )
            .await;
        match ok {
            Err(refused) => {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    refused.message(),
                ));
            }
            Ok(false) => {
                return Err(refuse(
                    "that is not this device's password (an operator sets it when registering the device)",
                ));
            }
            Ok(true) => {}
        }
        let sealed = crate::setup::seal_secrets(self, secrets)
            .map_err(|e| ApiError::internal("sealing", e))?;
        self.store()
            .set_device_secrets(device.id, Some(&sealed))
            .await?;
        self.inner
            .catalog
            .forget_device(device.product_id, &device.serial);
        self.audit_event(
            who,
            address,
            "saved Wi-Fi",
            &format!("device {}", device.serial),
            "sealed",
        )
        .await;
        Ok(())
    }

    pub async fn delete_device(&self, actor: &Actor, product: Id, serial: &str) -> ApiResult<()> {
        let device = self.store().get_device(product, serial).await?;
        self.store()
            .delete_sessions_of(None, Some(device.id))
            .await?;
        self.store().delete_device(product, serial).await?;
        self.changed_device(product, serial);
        self.inner.rollouts.forget_device(device.id);
        self.audited(actor, "deleted device", &format!("device {serial}"), "")
            .await;
        Ok(())
    }

    // ---- firmware ----

    pub async fn upload_firmware(
        &self,
        actor: &Actor,
        product: Id,
        bytes: Bytes,
        version: Option<String>,
    ) -> ApiResult<Firmware> {
        self.store().get_product(product).await?;
        let firmware = self.store_firmware(product, bytes, version).await?;
        self.audited(
            actor,
            "uploaded firmware",
            &format!("firmware {}", firmware.version),
            &format!("{} bytes, {}", firmware.size, firmware.format),
        )
        .await;
        Ok(firmware)
    }

    pub async fn delete_firmware(&self, actor: &Actor, product: Id, firmware: Id) -> ApiResult<()> {
        let found = self.store().get_firmware(product, firmware).await?;
        self.store().delete_firmware(product, firmware).await?;
        self.changed_devices();
        self.release_blob(&found.sha256).await;
        self.audited(
            actor,
            "deleted firmware",
            &format!("firmware {}", found.version),
            "",
        )
        .await;
        Ok(())
    }
}
