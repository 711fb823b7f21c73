//! The one check-in pipeline. Every device dialect turns its wire request into a `CheckIn`
//! and renders the `Answer` back; in between, and only here, the server identifies the
//! device, checks its credentials, records what it reports, moves its rollout membership,
//! picks its firmware (rollout, device assignment, group), decides, and prepares the bytes.

use std::net::IpAddr;

use otaforge_store::model::{Device, DeviceStatus, Firmware, Id, Product, Resource, Telemetry};

use crate::AppState;
use crate::auth::digest;
use crate::core::passwords::Refused;
use crate::decision::{self, Decision, Family, Mode, Running};
use crate::delivery::Part;
use crate::error::ApiResult;

/// Who the device says it is, and how it proves it.
#[derive(Debug, Clone, Copy)]
pub enum Identity<'a> {
    /// The product's API key and the device's serial (OTAdrive). A serial the product has
    /// not seen is registered as New.
    /// `product`: the key must be this product's (the dialect named the product too, as a
    /// hawkBit tenant does).
    ProductKey {
        key: &'a str,
        serial: &'a str,
        product: Option<Id>,
    },
    /// The product, the serial and the device's own password (the static link's Basic auth);
    /// `None` when the request carried no credentials.
    DevicePassword {
        product: Id,
        serial: &'a str,
        password: Option<&'a str>,
    },
    /// A device token the server issued (Mender's JWT); `None` when the request had none.
    DeviceToken(Option<&'a str>),
}

/// What the device wants from this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want<'a> {
    /// The firmware decision with the bytes (`range`: the `Range` header, if any).
    Firmware { range: Option<&'a str> },
    /// The firmware decision, no body (`HEAD`).
    FirmwareHead,
    /// Nothing to download: a report (`alive`) or a call that needs only the identity.
    Report,
}

/// A device request in no dialect's terms.
#[derive(Debug, Clone)]
pub struct CheckIn<'a> {
    pub identity: Identity<'a>,
    pub peer: IpAddr,
    pub running: Running<'a>,
    /// The dialect does not say what the device runs on every request (hawkBit's DDI): the
    /// server goes by the version the device last reported installed.
    pub remembered_running: bool,
    /// The device closed the offer of this firmware without installing it (a hawkBit action
    /// closed with failure, cancelled or rejected): it is not offered to the device again.
    pub closes: Option<Id>,
    /// The dialect has actions the device must be told to cancel (hawkBit): the firmware
    /// offered is remembered as the device's open action until it reports the end of it.
    pub tracks_actions: bool,
    /// The device answered the cancel of this open action: the action ends, and the
    /// firmware is not closed to it (a later rollout may offer it again).
    pub ends_action: Option<Id>,
    pub mode: Mode,
    /// The family the device announces (its header set), if it does.
    pub chip: Option<Family>,
    pub report: Telemetry,
    /// The device type it declares (Mender); an image that names its device types is offered
    /// only to those.
    pub device_type: Option<&'a str>,
    /// The outcome of its last update, in the device's words (`x-OTAForge-Update-Result`).
    pub feedback: Option<&'a str>,
    pub want: Want<'a>,
}

/// Why a device is not who it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unauthorized {
    MissingCredentials,
    /// Unknown product key.
    UnknownKey,
    /// Unknown device or wrong password: the same answer, so serials cannot be probed.
    WrongCredentials,
    Refused(Refused),
}

#[derive(Debug, Clone)]
pub struct Offer {
    /// The device it is for.
    pub device: Id,
    pub firmware: Firmware,
    pub part: Part,
    /// A name for the file (`Content-Disposition`).
    pub filename: String,
}

/// The pipeline's answer, in no dialect's terms.
#[derive(Debug, Clone)]
pub enum Answer {
    Unauthorized(Unauthorized),
    /// Known and authenticated, but not allowed to update (new, blocked, disabled).
    NotAllowed(DeviceStatus),
    NothingAssigned(Mode),
    WrongChip {
        image: Family,
        device: Family,
    },
    UpToDate(Firmware),
    VersionOnly(Firmware),
    Offer(Box<Offer>),
    /// A report was taken (`Want::Report`).
    Recorded(Box<Admitted>),
}

/// The open action a device must be told to cancel: one it was offered, has not finished
/// with, and is no longer offered (its rollout was cancelled or its stage rolled back, or
/// another firmware was assigned).
pub fn cancellation(open: Option<Id>, answer: &Answer) -> Option<Id> {
    let open = open?;
    match answer {
        Answer::Offer(offer) if offer.firmware.id == open => None,
        Answer::Unauthorized(_) | Answer::NotAllowed(_) => None,
        _ => Some(open),
    }
}

/// A device the pipeline let in, for calls that need only who it is (config, resources).
#[derive(Debug, Clone)]
pub struct Admitted {
    pub product: Product,
    pub device: Device,
}

impl AppState {
    /// The check-in: identify, authenticate, record, observe, pick, decide, prepare.
    pub async fn check_in(&self, mut req: CheckIn<'_>) -> ApiResult<Answer> {
        let (product, mut device, by_password) = match self.identify(&req).await? {
            Ok(found) => found,
            Err(refusal) => return Ok(Answer::Unauthorized(refusal)),
        };
        let mut report = std::mem::take(&mut req.report);
        // The family the dialect or the header set announced, for lists by chip.
        report.chip = req.chip.map(|family| family.as_str().to_string());
        let installed = req
            .feedback
            .and_then(|f| f.parse::<otaforge_protocol::UpdateResult>().ok())
            .is_some_and(|r| matches!(r, otaforge_protocol::UpdateResult::Installed { .. }));
        if installed {
            // What a device installed is stored at once: a dialect that does not report its
            // version on every poll is judged by it on the next one.
            device.telemetry.merge(report.clone());
            self.store()
                .record_telemetry(&[(device.id, report.clone())])
                .await?;
            // Older reports still buffered must not overwrite it when they are flushed.
            self.inner.telemetry.record(device.id, report);
            self.inner
                .catalog
                .forget_device(device.product_id, &device.serial);
        } else {
            self.inner.telemetry.record(device.id, report);
        }
        if let Some(firmware) = req.closes
            && device.closed_firmware_id != Some(firmware)
        {
            self.store()
                .set_device_closed_firmware(device.id, Some(firmware))
                .await?;
            self.inner
                .catalog
                .forget_device(device.product_id, &device.serial);
            device.closed_firmware_id = Some(firmware);
        }
        if req.tracks_actions
            && device.open_firmware_id.is_some()
            && (installed || req.closes.is_some() || req.ends_action == device.open_firmware_id)
        {
            self.set_open_action(&mut device, None).await?;
        }
        let remembered;
        let told = !(req.remembered_running && req.running.version.is_none()) || installed;
        if req.remembered_running && req.running.version.is_none() {
            remembered = device.telemetry.version.clone();
            req.running = Running {
                version: remembered.as_deref(),
                sketch_md5: None,
                by_md5: false,
            };
        }
        if device.status != DeviceStatus::Verified {
            return Ok(Answer::NotAllowed(device.status));
        }
        // What the device runs now moves its rollout membership before its target is picked,
        // so a device that just installed is not offered the same image again.
        self.observe(&device, &req.running, told, req.feedback, req.chip)
            .await;
        if req.want == Want::Report {
            return Ok(Answer::Recorded(Box::new(Admitted { product, device })));
        }
        // An offer the device closed without installing is not made again.
        let target = self
            .target_firmware(&device, by_password, req.chip, &req.running)
            .await?
            .filter(|firmware| device.closed_firmware_id != Some(firmware.id));
        // An image that names its device types or hardware revisions goes to those alone.
        let hw_revision = device
            .attributes
            .as_ref()
            .and_then(|a| a.get("hw_revision"))
            .and_then(|v| v.as_str());
        if let Some(firmware) = &target
            && let Some(why) = decision::not_for_device(firmware, req.device_type, hw_revision)
        {
            if self.inner.catalog.first_refusal(device.id, firmware.id) {
                let _ = self
                    .store()
                    .add_device_event(device.id, "refused", &why)
                    .await;
            }
            return Ok(Answer::NothingAssigned(req.mode));
        }
        let firmware =
            match decision::decide(device.status, target, &req.running, req.mode, req.chip) {
                Decision::NotAllowed(status) => return Ok(Answer::NotAllowed(status)),
                Decision::NothingAssigned(mode) => return Ok(Answer::NothingAssigned(mode)),
                Decision::WrongChip {
                    firmware,
                    image,
                    device: announced,
                } => {
                    self.note_wrong_chip(&device, &firmware, image, announced)
                        .await;
                    return Ok(Answer::WrongChip {
                        image,
                        device: announced,
                    });
                }
                Decision::VersionOnly(firmware) => return Ok(Answer::VersionOnly(firmware)),
                Decision::UpToDate(firmware) => return Ok(Answer::UpToDate(firmware)),
                Decision::Update(firmware) => firmware,
            };
        let part = match req.want {
            Want::FirmwareHead | Want::Report => Part::Head,
            Want::Firmware { range } => {
                let bytes = self
                    .inner
                    .blob_cache
                    .get(&self.inner.blobs, &firmware.sha256)
                    .await?;
                Part::cut(range, bytes)?
            }
        };
        if part.ends_file(firmware.size.max(0) as u64) {
            self.served_whole(&device, &firmware).await;
        }
        // An offer opens an action; while another one is open, the device is first told to
        // cancel that (`cancellation`), and this one opens once it has.
        if req.tracks_actions && device.open_firmware_id.is_none() {
            self.set_open_action(&mut device, Some(firmware.id)).await?;
        }
        Ok(Answer::Offer(Box::new(Offer {
            device: device.id,
            filename: format!("{}-{}.bin", product.name, firmware.version),
            firmware,
            part,
        })))
    }

    async fn set_open_action(&self, device: &mut Device, firmware: Option<Id>) -> ApiResult<()> {
        self.store()
            .set_device_open_firmware(device.id, firmware)
            .await?;
        self.inner
            .catalog
            .forget_device(device.product_id, &device.serial);
        device.open_firmware_id = firmware;
        Ok(())
    }

    /// What an admitted device reports about itself (hawkBit configData), kept on its row.
    pub async fn record_attributes(
        &self,
        caller: &Admitted,
        attributes: serde_json::Value,
    ) -> ApiResult<()> {
        self.store()
            .set_device_attributes(caller.device.id, &attributes)
            .await?;
        self.inner
            .catalog
            .forget_device(caller.device.product_id, &caller.device.serial);
        Ok(())
    }

    /// A log an admitted device sent (a Mender deployment's), kept on its timeline (the last
    /// lines, at most 4 KiB).
    pub async fn record_device_log(
        &self,
        caller: &Admitted,
        about: &str,
        lines: &[String],
    ) -> ApiResult<()> {
        let mut text = lines.join("\n");
        if text.len() > 4096 {
            let cut = text.len() - 4096;
            let cut = (cut..text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            text = text.split_off(cut);
        }
        self.store()
            .add_device_event(caller.device.id, "log", &format!("{about}:\n{text}"))
            .await?;
        Ok(())
    }

    /// The group's config for an admitted device.
    pub async fn device_config(&self, caller: &Admitted) -> ApiResult<serde_json::Value> {
        let group = self
            .inner
            .catalog
            .group(self.store(), caller.product.id, caller.device.group_id)
            .await?;
        Ok(group.config)
    }

    /// The group's resources for an admitted device.
    pub async fn device_resources(&self, caller: &Admitted) -> ApiResult<Vec<Resource>> {
        Ok(self.store().list_resources(caller.device.group_id).await?)
    }

    /// One of the group's resources, by file key, cut as the `Range` header asks.
    pub async fn device_resource(
        &self,
        caller: &Admitted,
        fk: &str,
        range: Option<&str>,
    ) -> ApiResult<Option<(Resource, Part)>> {
        let Some(resource) = self
            .store()
            .resource_by_fk(caller.product.id, fk)
            .await?
            .filter(|r| r.group_id == caller.device.group_id)
        else {
            return Ok(None);
        };
        let bytes = self
            .inner
            .blob_cache
            .get(&self.inner.blobs, &resource.sha256)
            .await?;
        let part = Part::cut(range, bytes)?;
        Ok(Some((resource, part)))
    }

    /// The product and device the request names, if its credentials hold; `bool`: the
    /// device proved itself with its own password.
    async fn identify(
        &self,
        req: &CheckIn<'_>,
    ) -> ApiResult<Result<(Product, Device, bool), Unauthorized>> {
        let catalog = &self.inner.catalog;
        let store = self.store();
        match req.identity {
            Identity::ProductKey {
                key,
                serial,
                product: named,
            } => {
                if key.is_empty() {
                    return Ok(Err(Unauthorized::MissingCredentials));
                }
                let serial = crate::core::fleet::check_serial(serial)?;
                let Some(product) = catalog
                    .product_by_key_digest(store, &digest(key))
                    .await?
                    .filter(|p| named.is_none_or(|id| id == p.id))
                else {
                    return Ok(Err(Unauthorized::UnknownKey));
                };
                let device = catalog
                    .device_or_register(store, product.id, &serial)
                    .await?;
                Ok(Ok((product, device, false)))
            }
            Identity::DeviceToken(None) => Ok(Err(Unauthorized::MissingCredentials)),
            Identity::DeviceToken(Some(token)) => {
                let Some(claims) = self.verify_device_token(token) else {
                    return Ok(Err(Unauthorized::WrongCredentials));
                };
                // The token names the device's serial too, so the catalog finds it (a device
                // deleted and registered again under that serial is another device).
                let device = match catalog
                    .device(store, claims.product, &claims.serial)
                    .await?
                {
                    Some(device) if device.id == claims.device => device,
                    _ => return Ok(Err(Unauthorized::WrongCredentials)),
                };
                let product = catalog.product(store, claims.product).await?;
                Ok(Ok((product, device, false)))
            }
            Identity::DevicePassword {
                product,
                serial,
                password,
            } => {
                let Some(password) = password else {
                    return Ok(Err(Unauthorized::MissingCredentials));
                };
                let device = match crate::core::fleet::check_serial(serial) {
                    Ok(serial) => catalog.device(store, product, &serial).await?,
                    Err(_) => None,
                };
                let stored = device.as_ref().and_then(|d| d.password_hash.as_deref());
                match self
                    .inner
                    .passwords
                    .check(serial, req.peer, password, stored)
                    .await
                {
                    Err(refused) => Ok(Err(Unauthorized::Refused(refused))),
                    Ok(false) => Ok(Err(Unauthorized::WrongCredentials)),
                    Ok(true) => {
                        let Some(device) = device else {
                            return Ok(Err(Unauthorized::WrongCredentials));
                        };
                        let product = catalog.product(store, device.product_id).await?;
                        Ok(Ok((product, device, true)))
                    }
                }
            }
        }
    }

    /// A wrong-chip refusal is shown to the operator once per device and firmware (as an
    /// event on the device's timeline), not once per poll.
    async fn note_wrong_chip(
        &self,
        device: &Device,
        firmware: &Firmware,
        image: Family,
        announced: Family,
    ) {
        if !self.inner.catalog.first_refusal(device.id, firmware.id) {
            return;
        }
        let _ = self
            .store()
            .add_device_event(
                device.id,
                "refused",
                &format!(
                    "firmware {} is built for {}; the device announces {}",
                    firmware.version,
                    image.as_str(),
                    announced.as_str()
                ),
            )
            .await;
    }
}
