//! `otaforge agent`: a real Linux device agent. Its flash is a plain file laid out
//! byte-for-byte like an ESP32's (partition table at 0x8000, otadata, ota_0, ota_1), so
//! esptool and other standard tools can read it, or like a W800's (`app` at 0xF000,
//! `app_ota` at 0x131000 on 2 MB). It polls the server, installs into the spare slot (ESP)
//! or `app_ota` (W800), reboots through the bootloader model, runs a health check, marks the
//! app valid or rolls back (ESP; a W800's bootloader copies the update over the app, so it
//! keeps no image to go back to), and reports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use otaforge_device::esp::{BootSlot, EspConfig, EspOta, Layout, init_flash};
use otaforge_device::flash::{FileFlash, Flash};
use otaforge_device::w800::{UpdateAction, W800Boot, W800Config, W800Layout, W800Ota};
use otaforge_formats::esp::Chip;
use otaforge_formats::otadata::OtaState;

use crate::client::{Check, DeviceInfo, Endpoint, Outcome, Policy, UpdateSink, Updater};
use crate::device::{EspSink, W800Sink, describe_boot, running_identity};

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

/// Makes a W800 flash file (2 MB, the SDK's OTA partition table) with its first `.img` in
/// `app`.
pub fn init_w800_flash_file(path: &Path, image: &[u8]) -> anyhow::Result<()> {
    if path.exists() {
        anyhow::bail!(
            "{} exists; remove it first to make a new flash",
            path.display()
        );
    }
    let layout = W800Layout::default_2mb();
    let mut flash = FileFlash::create(path, layout.flash_size)
        .with_context(|| format!("creating {}", path.display()))?;
    otaforge_device::w800::init_flash(&mut flash, &layout, Some(image))
        .context("writing the first image")?;
    Ok(())
}

/// The device the agent plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentChip {
    /// An ESP32 of this chip: the ESP-IDF OTA engine, two slots, rollback.
    Esp(Chip),
    /// A W800: `wm_ota_ops` and the bootloader's copy (xz images), on the W800's 2 MB layout.
    W800,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub flash: PathBuf,
    pub endpoint: Endpoint,
    pub serial: String,
    pub chip: AgentChip,
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
    engine: Engine,
    updater: Updater,
    info: DeviceInfo,
}

/// The update engine over the flash file.
enum Engine {
    Esp(EspOta<FileFlash>),
    W800(W800Ota<FileFlash>),
}

impl Engine {
    fn open(config: &AgentConfig) -> anyhow::Result<Engine> {
        let flash = FileFlash::open(&config.flash)
            .with_context(|| format!("opening the flash file {}", config.flash.display()))?;
        Ok(match config.chip {
            AgentChip::Esp(chip) => Engine::Esp(
                EspOta::open(
                    flash,
                    EspConfig {
                        expected_chip: chip,
                        rollback: true,
                    },
                )
                .context("reading the partition table")?,
            ),
            AgentChip::W800 => Engine::W800(
                W800Ota::new(flash, W800Layout::default_2mb(), W800Config::default())
                    .context("a W800 flash file is 2 MB")?,
            ),
        })
    }

    /// Boots through the bootloader model; says what happened, and whether a bootloader
    /// that applies updates itself (W800) refused or found none, so the old image runs.
    fn boot(&mut self) -> anyhow::Result<(String, bool)> {
        Ok(match self {
            Engine::Esp(ota) => (describe_boot(&ota.boot().context("booting")?), false),
            Engine::W800(ota) => {
                let boot = ota.boot().context("booting")?;
                let kept = matches!(boot.action, UpdateAction::None | UpdateAction::Rejected(_));
                (describe_w800_boot(&boot), kept)
            }
        })
    }

    /// The version and (ESP) MD5 of the running image.
    fn identity(&mut self) -> anyhow::Result<(String, Option<String>)> {
        Ok(match self {
            Engine::Esp(ota) => running_identity(ota)?,
            Engine::W800(ota) => (ota.get_version().unwrap_or("unknown").to_string(), None),
        })
    }

    /// Whether the running image waits for its health check (ESP only).
    fn pending_verify(&mut self) -> anyhow::Result<bool> {
        Ok(match self {
            Engine::Esp(ota) => match ota.running_slot() {
                Some(BootSlot::Ota(n)) => {
                    ota.get_state_partition(n)? == Some(OtaState::PendingVerify)
                }
                _ => false,
            },
            Engine::W800(_) => false,
        })
    }

    fn sink(&mut self) -> Box<dyn UpdateSink + '_> {
        match self {
            Engine::Esp(ota) => Box::new(EspSink::new(ota)),
            Engine::W800(ota) => Box::new(W800Sink::new(ota)),
        }
    }

    fn confirm(&mut self) -> anyhow::Result<()> {
        if let Engine::Esp(ota) = self {
            ota.mark_app_valid_cancel_rollback()?;
        }
        Ok(())
    }

    /// Goes back to the previous image; `None` when there is none to go back to (W800).
    fn roll_back(&mut self) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Engine::Esp(ota) => Some(describe_boot(&ota.mark_app_invalid_rollback_and_reboot()?)),
            Engine::W800(_) => None,
        })
    }

    fn flash_size(&self) -> u32 {
        match self {
            Engine::Esp(ota) => ota.flash().size(),
            Engine::W800(ota) => ota.flash().size(),
        }
    }
}

fn describe_w800_boot(boot: &W800Boot) -> String {
    let version = &boot.header.version;
    match &boot.action {
        UpdateAction::None => format!("booted app ({version})"),
        UpdateAction::Applied { xz: true } => {
            format!("unpacked the xz update into app; booted {version}")
        }
        UpdateAction::Applied { xz: false } => {
            format!("copied the update into app; booted {version}")
        }
        UpdateAction::Finished => format!("finished an interrupted update; booted {version}"),
        UpdateAction::Rejected(e) => format!("refused the update ({e}); booted app ({version})"),
    }
}

impl Agent {
    /// Opens the flash and boots it through the bootloader model. An image left unconfirmed
    /// by the previous run is health-checked now.
    pub async fn start(config: AgentConfig) -> anyhow::Result<Agent> {
        let mut engine = Engine::open(&config)?;
        // Booted outside the log macro: its arguments are not evaluated when logging is off.
        let (boot, _) = engine.boot()?;
        tracing::info!("{boot}");
        let (version, sketch_md5) = engine.identity()?;
        let info = DeviceInfo {
            serial: config.serial.clone(),
            version,
            sketch_md5,
            sta_mac: mac_of(&config.serial),
            free_space: 0,
            chip_size: u64::from(engine.flash_size()),
            chip: match config.chip {
                AgentChip::Esp(_) => None,
                AgentChip::W800 => Some("w800".into()),
            },
        };
        let seed = config
            .serial
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let updater = Updater::new(config.endpoint.clone(), Policy::default(), seed);
        let mut agent = Agent {
            config,
            engine,
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
        self.engine.pending_verify()
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        (self.info.version, self.info.sketch_md5) = self.engine.identity()?;
        Ok(())
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
            self.engine.confirm()?;
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
            let Some(boot) = self.engine.roll_back()? else {
                let reason = format!(
                    "{tried} failed its health check and this chip keeps no image to go back to"
                );
                tracing::warn!("{reason}");
                self.updater.report(Outcome::Failed {
                    reason: reason.clone(),
                });
                return Ok(Pass::Failed(reason));
            };
            self.refresh()?;
            tracing::warn!(version = %tried, "health check failed; {boot}");
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
            let mut sink = self.engine.sink();
            self.updater.download(&self.info, &offer, &mut *sink).await
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "the update failed; still running {}", self.info.version);
            self.updater.report(Outcome::Failed {
                reason: e.to_string(),
            });
            return Ok(Pass::Failed(e.to_string()));
        }
        let from = self.info.version.clone();
        let (boot, kept_old) = self.engine.boot().context("rebooting into the update")?;
        tracing::info!("{boot}");
        self.refresh()?;
        if kept_old {
            // The bootloader kept the old image (a W800 refusing a bad update).
            let reason = format!("the update did not boot: {boot}");
            self.updater.report(Outcome::Failed {
                reason: reason.clone(),
            });
            return Ok(Pass::Failed(reason));
        }
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
