//! `otaforge agent`: a real Linux device agent. Its flash is a plain file laid out
//! byte-for-byte like an ESP32's (partition table at 0x8000, otadata, ota_0, ota_1), so
//! esptool and other standard tools can read it. It polls the server, installs into the
//! spare slot, reboots through the bootloader model, runs a health check, marks the app
//! valid or rolls back, and reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use otaforge_device::esp::{BootSlot, EspConfig, EspOta, Layout, init_flash};
use otaforge_device::flash::{FileFlash, Flash};
use otaforge_formats::esp::Chip;
use otaforge_formats::otadata::OtaState;

use crate::client::{Check, DeviceInfo, Endpoint, Outcome, Policy, Updater};
use crate::device::{EspSink, describe_boot, refresh_info};

/// Makes a flash file: the layout's partition table, erased otadata and, if given, a first
/// image in the first app slot (what flashing by wire does).
pub fn init_flash_file(path: &Path, layout: &Layout, image: Option<&[u8]>) -> anyhow::Result<()> {
    if path.exists() {
        anyhow::bail!(
            "{} exists; remove it first to make a new flash",
            path.display()
        );
    }
    let mut flash = FileFlash::create(path, layout.flash_size)
        .with_context(|| format!("creating {}", path.display()))?;
    init_flash(&mut flash, layout, image).context("writing the partition table and first image")?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub flash: PathBuf,
    pub endpoint: Endpoint,
    pub serial: String,
    pub chip: Chip,
    pub interval: Duration,
    /// Run after an update boots; exit status 0 means healthy. Without one, the new firmware
    /// is healthy when it boots and reaches the server.
    pub health_cmd: Option<String>,
    /// Stop after one check (and the update it brought, if any).
    pub once: bool,
}

/// What one pass of the agent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    UpToDate(String),
    NoFirmware(String),
    NotAllowed(u16),
    Installed { from: String, to: String },
    RolledBack { tried: String, running: String },
    Failed(String),
}

pub struct Agent {
    config: AgentConfig,
    ota: EspOta<FileFlash>,
    updater: Updater,
    info: DeviceInfo,
}

impl Agent {
    /// Opens the flash and boots it through the bootloader model. An image left unconfirmed
    /// by the previous run is health-checked now.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let flash = FileFlash::open(&config.flash)
            .with_context(|| format!("opening the flash file {}", config.flash.display()))?;
        let mut ota = EspOta::open(
            flash,
            EspConfig {
                expected_chip: config.chip,
                rollback: true,
            },
        )
        .context("reading the partition table")?;
        let outcome = ota.boot().context("booting")?;
        tracing::info!("{}", describe_boot(&outcome));
        let mut info = DeviceInfo {
            serial: config.serial.clone(),
            version: String::new(),
            sketch_md5: None,
            sta_mac: mac_of(&config.serial),
            free_space: 0,
            chip_size: u64::from(ota.flash().size()),
            chip: None,
        };
        refresh_info(&mut ota, &mut info)?;
        let seed = config
            .serial
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let updater = Updater::new(config.endpoint.clone(), Policy::default(), seed);
        let mut agent = Agent {
            config,
            ota,
            updater,
            info,
        };
        if agent.pending_verify()? {
            agent.confirm_or_roll_back(None).await?;
        }
        Ok(agent)
    }

    pub fn version(&self) -> &str {
        &self.info.version
    }

    fn pending_verify(&mut self) -> anyhow::Result<bool> {
        Ok(match self.ota.running_slot() {
            Some(BootSlot::Ota(n)) => {
                self.ota.get_state_partition(n)? == Some(OtaState::PendingVerify)
            }
            _ => false,
        })
    }

    async fn healthy(&mut self) -> bool {
        match &self.config.health_cmd {
            Some(cmd) => {
                let status = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .env("OTAFORGE_VERSION", &self.info.version)
                    .env("OTAFORGE_SERIAL", &self.info.serial)
                    .status()
                    .await;
                matches!(status, Ok(s) if s.success())
            }
            // The new firmware booted; it is healthy if it can reach the server.
            None => self.updater.check(&self.info).await.is_ok(),
        }
    }

    /// Health-checks the running, unconfirmed image: mark it valid, or roll back.
    async fn confirm_or_roll_back(&mut self, from: Option<String>) -> anyhow::Result<Pass> {
        let tried = self.info.version.clone();
        if self.healthy().await {
            self.ota.mark_app_valid_cancel_rollback()?;
            tracing::info!(version = %tried, "health check passed; the update is confirmed");
            self.updater.report(Outcome::Installed {
                version: tried.clone(),
            });
            if let Err(e) = self.updater.alive(&self.info).await {
                tracing::warn!(error = %e, "could not report the new version");
            }
            Ok(Pass::Installed {
                from: from.unwrap_or_default(),
                to: tried,
            })
        } else {
            let outcome = self.ota.mark_app_invalid_rollback_and_reboot()?;
            refresh_info(&mut self.ota, &mut self.info)?;
            tracing::warn!(version = %tried, "health check failed; {}", describe_boot(&outcome));
            self.updater.report(Outcome::RolledBack {
                version: tried.clone(),
            });
            Ok(Pass::RolledBack {
                tried,
                running: self.info.version.clone(),
            })
        }
    }

    /// One poll: check, and install what is offered.
    pub async fn pass(&mut self) -> anyhow::Result<Pass> {
        let offer = match self.updater.check(&self.info).await {
            Ok(Check::Offer(offer)) => offer,
            Ok(Check::UpToDate) => return Ok(Pass::UpToDate(self.info.version.clone())),
            Ok(Check::NoFirmware) => return Ok(Pass::NoFirmware(self.info.version.clone())),
            Ok(Check::NotAllowed(status)) => return Ok(Pass::NotAllowed(status)),
            Err(e) => return Ok(Pass::Failed(e.to_string())),
        };
        tracing::info!(size = offer.size, version = ?offer.version, "downloading an update");
        let result = {
            let mut sink = EspSink::new(&mut self.ota);
            self.updater.download(&self.info, &offer, &mut sink).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "the update failed; still running {}", self.info.version);
            self.updater.report(Outcome::Failed {
                reason: e.to_string(),
            });
            return Ok(Pass::Failed(e.to_string()));
        }
        let from = self.info.version.clone();
        let outcome = self.ota.boot().context("rebooting into the update")?;
        tracing::info!("{}", describe_boot(&outcome));
        refresh_info(&mut self.ota, &mut self.info)?;
        self.confirm_or_roll_back(Some(from)).await
    }

    /// Polls forever (or once), with the configured interval.
    pub async fn run(mut self) -> anyhow::Result<()> {
        loop {
            let pass = self.pass().await?;
            tracing::info!(?pass, "poll done");
            if self.config.once {
                return Ok(());
            }
            tokio::time::sleep(self.config.interval).await;
        }
    }
}

/// A stable, locally administered MAC derived from the serial.
fn mac_of(serial: &str) -> String {
    let h = serial
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    format!(
        "02:00:{:02X}:{:02X}:{:02X}:{:02X}",
        (h >> 24) & 255,
        (h >> 16) & 255,
        (h >> 8) & 255,
        h & 255
    )
}
