//! The fleet simulator: N virtual devices in one process, each with its own simulated NOR
//! flash and OTA engine, talking real HTTP to a server with the same client the agent uses.
//! Scenario knobs: poll interval and jitter, the share of devices whose new firmware fails
//! its health check (and rolls back), the share that lose power mid-update, network drops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use otaforge_device::esp::{EspConfig, EspOta, Layout, init_flash};
use otaforge_device::flash::{SectorPool, SimFlash};
use otaforge_device::w800::{self, UpdateAction, W800Config, W800Layout, W800Ota};
use otaforge_formats::esp::Chip;
use sha2::{Digest, Sha256};

use crate::client::{Check, DeviceInfo, Endpoint, Faults, Offer, Outcome, Policy, Updater};
use crate::device::{EspSink, W800Sink, refresh_info};
use crate::http::Url;

/// How the virtual devices reach the server.
#[derive(Debug, Clone)]
pub enum SimDialect {
    /// OTAdrive API with the product's key.
    OtaDrive { api_key: String },
    /// Static links `/ota/{product}/{serial}`, every device with this password.
    StaticLink { product_id: i64, password: String },
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The servers (nodes) devices talk to: each poll goes to the next one in turn, so a
    /// fleet behind several nodes reaches every one of them, and a dead node costs a
    /// device one failed poll.
    pub servers: Vec<String>,
    pub dialect: SimDialect,
    /// Device serials; their number is the fleet size.
    pub serials: Vec<String>,
    /// The image every device runs at the start (flashed by wire).
    pub initial_image: Vec<u8>,
    pub chip: Chip,
    /// OTA slot size of the simulated flash.
    pub slot_size: u32,
    pub poll: Duration,
    /// Each wait is `poll * (1 ± jitter)`.
    pub jitter: f64,
    /// Share of devices whose health check fails on any firmware other than the initial one
    /// (they roll back).
    pub fail_health: f64,
    /// Share of devices that lose power once, during their first update.
    pub power_loss: f64,
    /// Share of downloaded ranges whose connection drops midway.
    pub drop_rate: f64,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or as soon as every device runs this version or has rolled back from it (build
    /// metadata aside: a W800 running `2.0.0+w800` runs `2.0.0`).
    pub until_version: Option<String>,
    pub seed: u64,
    /// Set from outside to end the run early.
    pub stop: Option<Arc<AtomicBool>>,
    /// Share of the devices that are W800s instead (`wm_ota_ops` and the bootloader copy
    /// over the same kind of flash, xz OTA images), on the OTAdrive dialect with
    /// `x-otaforge-chip: w800`. They cannot roll back (the bootloader copies the update over
    /// the app), so `fail_health` and `power_loss` are the ESP devices' only.
    pub w800_share: f64,
    /// The `.img` every W800 runs at the start, made for [`w800_layout`] (needed when
    /// `w800_share` > 0).
    pub w800_image: Option<Vec<u8>>,
}

/// The flash layout of a simulated W800 with OTA slots of `slot_size` bytes: images it runs
/// or is sent must be made for it (their headers name its addresses).
pub fn w800_layout(slot_size: u32) -> W800Layout {
    W800Layout::small(slot_size, slot_size)
}

/// Whether `version` is `until_version`, build metadata aside (SemVer: `2.0.0+w800` is
/// `2.0.0` built for another chip; one product holds each version string once).
fn reached(config: &SimConfig, version: &str) -> bool {
    let core = |v: &str| v.split('+').next().unwrap_or(v).to_string();
    config
        .until_version
        .as_deref()
        .is_some_and(|until| core(until) == core(version))
}

fn is_w800(config: &SimConfig, serial: &str) -> bool {
    config.w800_share > 0.0 && draw(config.seed, serial, "w800") < config.w800_share
}

/// What happened, in numbers.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub devices: usize,
    pub versions: BTreeMap<String, usize>,
    pub installs: u64,
    /// The installs by what they moved from and to (`"1.0.0 -> 2.0.0"`).
    pub moves: BTreeMap<String, u64>,
    pub rollbacks: u64,
    pub power_losses: u64,
    pub failed_downloads: u64,
    pub bytes: u64,
    pub requests: u64,
    pub retries: u64,
    pub elapsed: Duration,
    /// Whether `until_version` was reached (always false without one).
    pub converged: bool,
}

impl Summary {
    pub fn requests_per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "devices": self.devices, "versions": self.versions, "installs": self.installs,
            "moves": self.moves,
            "rollbacks": self.rollbacks, "power_losses": self.power_losses,
            "failed_downloads": self.failed_downloads, "bytes": self.bytes,
            "requests": self.requests, "retries": self.retries,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_second": self.requests_per_second(), "converged": self.converged,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} devices, {:.1} s",
            self.devices,
            self.elapsed.as_secs_f64()
        )?;
        for (version, n) in &self.versions {
            writeln!(f, "  running {version:<16} {n}")?;
        }
        writeln!(
            f,
            "  installs {}  rollbacks {}  power losses {}  failed downloads {}",
            self.installs, self.rollbacks, self.power_losses, self.failed_downloads
        )?;
        for (pair, n) in &self.moves {
            writeln!(f, "  installed {pair:<22} {n}")?;
        }
        write!(
            f,
            "  {:.1} MiB moved in {} requests ({} retries), {:.0} requests/s",
            self.bytes as f64 / (1024.0 * 1024.0),
            self.requests,
            self.retries,
            self.requests_per_second()
        )
    }
}

/// Live counters, readable while the simulation runs.
#[derive(Default)]
pub struct Counters {
    pub installs: AtomicU64,
    pub rollbacks: AtomicU64,
    pub power_losses: AtomicU64,
    pub failed_downloads: AtomicU64,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    /// Devices running `until_version`, or done with it (rolled back).
    pub settled: AtomicU64,
    versions: Mutex<BTreeMap<String, usize>>,
    moves: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn moved(&self, from: &str, to: &str) {
        let mut v = self.versions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = v.get_mut(from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                v.remove(from);
            }
        }
        *v.entry(to.to_string()).or_default() += 1;
    }

    /// One install, from `old` to `new`.
    fn install(&self, old: &str, new: &str) {
        self.installs.fetch_add(1, Ordering::Relaxed);
        *self
            .moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(format!("{old} -> {new}"))
            .or_default() += 1;
        self.moved(old, new);
    }

    pub fn versions(&self) -> BTreeMap<String, usize> {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A deterministic draw in [0, 1) from a serial and a purpose: the same device makes the
/// same choice in every run with the same seed.
pub fn draw(seed: u64, serial: &str, purpose: &str) -> f64 {
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(serial.as_bytes())
        .chain_update([0])
        .chain_update(purpose.as_bytes())
        .finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(n) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs the fleet; `progress` is called about once a second with the live counters.
pub async fn run(
    config: SimConfig,
    progress: impl Fn(&Counters, Duration) + Send + 'static,
) -> anyhow::Result<Summary> {
    if config.servers.is_empty() {
        anyhow::bail!("the simulator needs at least one server URL");
    }
    let servers = config
        .servers
        .iter()
        .map(|s| Url::parse(s).map_err(|e| anyhow::anyhow!("server URL {s:?}: {e}")))
        .collect::<anyhow::Result<Vec<Url>>>()?;
    let servers = Arc::new(servers);
    // Devices running the same images keep those images' sectors once.
    let pool = Arc::new(std::sync::Mutex::new(SectorPool::default()));
    let config = Arc::new(config);
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let initial_version = {
        let layout = Layout::small(config.slot_size);
        let mut flash = SimFlash::new(layout.flash_size)?;
        init_flash(&mut flash, &layout, Some(&config.initial_image))?;
        let mut ota = EspOta::open(flash, esp_config(&config))?;
        ota.boot()?;
        crate::device::running_identity(&mut ota)?.0
    };
    let w800s = config
        .serials
        .iter()
        .filter(|s| is_w800(&config, s))
        .count();
    {
        let mut versions = counters.versions.lock().unwrap_or_else(|e| e.into_inner());
        if w800s < config.serials.len() {
            versions.insert(initial_version, config.serials.len() - w800s);
        }
        if w800s > 0 {
            let image = config
                .w800_image
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("W800 devices need a first image (w800_image)"))?;
            let version = otaforge_formats::w800::parse_image(image)
                .map_err(|e| anyhow::anyhow!("the W800 image: {e}"))?
                .header
                .version;
            *versions.entry(version).or_default() += w800s;
        }
    }

    let mut tasks = Vec::with_capacity(config.serials.len());
    for (i, serial) in config.serials.iter().enumerate() {
        let (config, counters, stop, servers, pool) = (
            config.clone(),
            counters.clone(),
            stop.clone(),
            servers.clone(),
            pool.clone(),
        );
        let serial = serial.clone();
        tasks.push(tokio::spawn(async move {
            let life = if is_w800(&config, &serial) {
                w800_life(i, &serial, &config, &servers, &pool, &counters, &stop).await
            } else {
                device_life(i, &serial, &config, &servers, &pool, &counters, &stop).await
            };
            if let Err(e) = life {
                tracing::warn!(serial, error = %e, "a simulated device stopped");
            }
        }));
    }

    let total = config.serials.len() as u64;
    let ticker = {
        let (counters, stop) = (counters.clone(), stop.clone());
        let config = config.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                progress(&counters, start.elapsed());
                let done = config.until_version.is_some()
                    && counters.settled.load(Ordering::Relaxed) >= total;
                let told = config
                    .stop
                    .as_ref()
                    .is_some_and(|s| s.load(Ordering::Relaxed));
                if done || told || start.elapsed() >= config.duration {
                    stop.store(true, Ordering::Relaxed);
                    return done;
                }
            }
        })
    };
    let converged = ticker.await.unwrap_or(false);
    for task in tasks {
        let _ = task.await;
    }
    Ok(Summary {
        devices: config.serials.len(),
        versions: counters.versions(),
        installs: counters.installs.load(Ordering::Relaxed),
        moves: counters
            .moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        rollbacks: counters.rollbacks.load(Ordering::Relaxed),
        power_losses: counters.power_losses.load(Ordering::Relaxed),
        failed_downloads: counters.failed_downloads.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        requests: counters.requests.load(Ordering::Relaxed),
        retries: counters.retries.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
        converged,
    })
}

fn esp_config(config: &SimConfig) -> EspConfig {
    EspConfig {
        expected_chip: config.chip,
        rollback: true,
    }
}

/// Sleeps up to `d`, waking early when the simulation stops. Returns false on stop.
async fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        tokio::time::sleep((until - Instant::now()).min(Duration::from_millis(250))).await;
    }
    !stop.load(Ordering::Relaxed)
}

async fn device_life(
    index: usize,
    serial: &str,
    config: &SimConfig,
    servers: &[Url],
    pool: &std::sync::Mutex<SectorPool>,
    counters: &Counters,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let layout = Layout::small(config.slot_size);
    let mut flash = SimFlash::new(layout.flash_size)?;
    init_flash(&mut flash, &layout, Some(&config.initial_image))?;
    let mut ota = EspOta::open(flash, esp_config(config))?;
    ota.boot()?;
    let initial_version = crate::device::running_identity(&mut ota)?.0;
    let share = |ota: &mut EspOta<SimFlash>| {
        ota.flash_mut()
            .share_sectors(&mut pool.lock().unwrap_or_else(|e| e.into_inner()));
    };
    share(&mut ota);
    let mut info = DeviceInfo {
        serial: serial.to_string(),
        version: String::new(),
        sketch_md5: None,
        sta_mac: format!(
            "02:00:{:02X}:{:02X}:{:02X}:{:02X}",
            (index >> 24) & 255,
            (index >> 16) & 255,
            (index >> 8) & 255,
            index & 255
        ),
        free_space: u64::from(config.slot_size),
        chip_size: u64::from(layout.flash_size),
        chip: None,
    };
    refresh_info(&mut ota, &mut info)?;
    let endpoints: Vec<Endpoint> = servers
        .iter()
        .map(|server| match &config.dialect {
            SimDialect::OtaDrive { api_key } => Endpoint::OtaDrive {
                server: server.clone(),
                api_key: api_key.clone(),
            },
            SimDialect::StaticLink {
                product_id,
                password,
            } => Endpoint::StaticLink {
                url: server.with_path(&format!(
                    "{}/ota/{product_id}/{serial}",
                    server.path.trim_end_matches('/')
                )),
                password: password.clone(),
            },
        })
        .collect();
    let mut life = Rhythm::new(index, serial, config, endpoints, counters, stop);
    let mut updater = life.updater();
    let fails_health = draw(config.seed, serial, "health") < config.fail_health;
    let mut loses_power = draw(config.seed, serial, "power") < config.power_loss;
    let mut rejected: Option<String> = None;
    life.settle(&info.version);
    while let Some(offer) = life.next_offer(&mut updater, &info).await {
        let Some(offer) = offer else { continue };
        if offer.version.is_some() && offer.version == rejected {
            // This device already rolled this version back: it does not take it again.
            continue;
        }
        let before = updater.stats;
        if loses_power {
            // Cut somewhere inside the update's flash work (erases and writes).
            let ops = offer.size / 4096 * 2 + 8;
            let at = (draw(config.seed, serial, "cut-at") * ops as f64) as u64 + 1;
            ota.flash_mut().set_power_cut(Some(at));
        }
        let result = {
            let mut sink = Sharing::new(EspSink::new(&mut ota), pool, EspSink::flash_mut);
            updater.download(&info, &offer, &mut sink).await
        };
        account(counters, before, updater.stats);
        if loses_power {
            loses_power = false;
            let cut = !ota.flash().is_powered();
            ota.flash_mut().set_power_cut(None);
            ota.flash_mut().restore_power();
            if cut {
                counters.power_losses.fetch_add(1, Ordering::Relaxed);
                // Power comes back: the bootloader picks whatever is valid.
                let old = info.version.clone();
                ota.boot()?;
                refresh_info(&mut ota, &mut info)?;
                counters.moved(&old, &info.version);
                updater.report(Outcome::Failed {
                    reason: "power lost during the update".into(),
                });
                continue;
            }
        }
        if let Err(e) = result {
            life.failed(&mut updater, e.to_string());
            continue;
        }
        // The whole image is in: share it before the reboot, health check and report.
        share(&mut ota);
        // Reboot into the new image, then the health check decides.
        let old = info.version.clone();
        ota.boot()?;
        refresh_info(&mut ota, &mut info)?;
        if fails_health && info.version != initial_version {
            let tried = info.version.clone();
            ota.mark_app_invalid_rollback_and_reboot()?;
            refresh_info(&mut ota, &mut info)?;
            counters.rollbacks.fetch_add(1, Ordering::Relaxed);
            updater.report(Outcome::RolledBack {
                version: tried.clone(),
            });
            life.settle(&tried);
            rejected = Some(tried);
            if info.version != old {
                counters.moved(&old, &info.version);
            }
        } else {
            ota.mark_app_valid_cancel_rollback()?;
            life.installed(&mut updater, &info, &old).await;
        }
        // Whole images only: a broken download's sectors are its own, and short-lived.
        share(&mut ota);
    }
    Ok(())
}

/// A W800's life: polls (each to the next server in turn), downloads an offer into
/// `app_ota` through `wm_ota_ops`, reboots so that the bootloader unpacks it into `app`, and
/// reports what it runs.
async fn w800_life(
    index: usize,
    serial: &str,
    config: &SimConfig,
    servers: &[Url],
    pool: &std::sync::Mutex<SectorPool>,
    counters: &Counters,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let SimDialect::OtaDrive { api_key } = &config.dialect else {
        anyhow::bail!("simulated W800s talk the OTAdrive dialect");
    };
    let layout = w800_layout(config.slot_size);
    let image = config
        .w800_image
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("W800 devices need a first image"))?;
    let mut flash = SimFlash::new(layout.flash_size)?;
    w800::init_flash(&mut flash, &layout, Some(image))?;
    let mut ota = W800Ota::new(flash, layout, W800Config::default())?;
    ota.boot()?;
    let share = |ota: &mut W800Ota<SimFlash>| {
        ota.flash_mut()
            .share_sectors(&mut pool.lock().unwrap_or_else(|e| e.into_inner()));
    };
    share(&mut ota);
    let running = |ota: &W800Ota<SimFlash>| ota.get_version().unwrap_or("unknown").to_string();
    let mut info = DeviceInfo {
        serial: serial.to_string(),
        version: running(&ota),
        sketch_md5: None,
        sta_mac: format!("02:80:{index:08X}"),
        free_space: u64::from(layout.app_ota.size),
        chip_size: u64::from(layout.flash_size),
        chip: Some("w800".into()),
    };
    let endpoints: Vec<Endpoint> = servers
        .iter()
        .map(|server| Endpoint::OtaDrive {
            server: server.clone(),
            api_key: api_key.clone(),
        })
        .collect();
    let mut life = Rhythm::new(index, serial, config, endpoints, counters, stop);
    let mut updater = life.updater();
    life.settle(&info.version);
    while let Some(offer) = life.next_offer(&mut updater, &info).await {
        let Some(offer) = offer else { continue };
        let before = updater.stats;
        let result = {
            let mut sink = Sharing::new(W800Sink::new(&mut ota), pool, W800Sink::flash_mut);
            updater.download(&info, &offer, &mut sink).await
        };
        account(counters, before, updater.stats);
        if let Err(e) = result {
            life.failed(&mut updater, e.to_string());
            continue;
        }
        share(&mut ota);
        // The bootloader unpacks app_ota into app at the reboot.
        let old = info.version.clone();
        let boot = ota.reboot()?;
        info.version = running(&ota);
        match boot.action {
            UpdateAction::Applied { .. } | UpdateAction::Finished => {
                life.installed(&mut updater, &info, &old).await;
            }
            UpdateAction::Rejected(e) => {
                life.failed(
                    &mut updater,
                    format!("the bootloader refused the update: {e}"),
                );
            }
            UpdateAction::None => {
                updater.report(Outcome::Failed {
                    reason: "no update found at the reboot".into(),
                });
            }
        }
        share(&mut ota);
    }
    Ok(())
}

/// What every simulated device does alike whatever its chip: when it polls (the first poll
/// somewhere in one interval, then the interval with jitter), which server it asks (the
/// next in turn), what it counts, and when it has settled.
struct Rhythm<'a> {
    index: usize,
    serial: &'a str,
    config: &'a SimConfig,
    endpoints: Vec<Endpoint>,
    counters: &'a Counters,
    stop: &'a AtomicBool,
    wait: Duration,
    polls: usize,
    settled: bool,
}

impl<'a> Rhythm<'a> {
    fn new(
        index: usize,
        serial: &'a str,
        config: &'a SimConfig,
        endpoints: Vec<Endpoint>,
        counters: &'a Counters,
        stop: &'a AtomicBool,
    ) -> Self {
        Rhythm {
            index,
            serial,
            config,
            endpoints,
            counters,
            stop,
            wait: config.poll.mul_f64(draw(config.seed, serial, "phase")),
            polls: 0,
            settled: false,
        }
    }

    /// The device's update client, with its own seed.
    fn updater(&self) -> Updater {
        Updater::new(
            self.endpoints[self.index % self.endpoints.len()].clone(),
            sim_policy(self.config),
            self.config.seed ^ (self.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
    }

    /// Waits for the next poll and checks: `None` once the simulation stops, `Some(None)`
    /// when nothing is offered (or the check failed).
    async fn next_offer(
        &mut self,
        updater: &mut Updater,
        info: &DeviceInfo,
    ) -> Option<Option<Offer>> {
        if !nap(self.wait, self.stop).await {
            return None;
        }
        if self.endpoints.len() > 1 {
            updater.set_endpoint(
                self.endpoints[(self.index + self.polls) % self.endpoints.len()].clone(),
            );
        }
        self.polls += 1;
        let j = (draw(
            self.config.seed ^ updater.stats.requests,
            self.serial,
            "jitter",
        ) * 2.0
            - 1.0)
            * self.config.jitter;
        self.wait = self.config.poll.mul_f64((1.0 + j).max(0.05));
        let before = updater.stats;
        let check = updater.check(info).await;
        account(self.counters, before, updater.stats);
        Some(match check {
            Ok(Check::Offer(offer)) => Some(offer),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(serial = self.serial, error = %e, "check failed");
                None
            }
        })
    }

    /// Counts the device settled once it runs (or rolled back) `until_version`.
    fn settle(&mut self, version: &str) {
        if !self.settled && reached(self.config, version) {
            self.settled = true;
            self.counters.settled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An update that went no further than the download (or the bootloader's refusal).
    fn failed(&self, updater: &mut Updater, reason: String) {
        self.counters
            .failed_downloads
            .fetch_add(1, Ordering::Relaxed);
        updater.report(Outcome::Failed { reason });
    }

    /// The new image runs and was confirmed: count it and tell the server at once.
    async fn installed(&mut self, updater: &mut Updater, info: &DeviceInfo, old: &str) {
        self.counters.install(old, &info.version);
        updater.report(Outcome::Installed {
            version: info.version.clone(),
        });
        let before = updater.stats;
        let _ = updater.alive(info).await;
        account(self.counters, before, updater.stats);
        self.settle(&info.version);
    }
}

/// Shares what a download has written every 16 KiB (less the sector it is filling), so a
/// fleet downloading one image at the same time holds it about once, not once a device.
struct Sharing<'p, S> {
    sink: S,
    pool: &'p std::sync::Mutex<SectorPool>,
    flash: fn(&mut S) -> &mut SimFlash,
    unshared: usize,
}

impl<'p, S> Sharing<'p, S> {
    const EVERY: usize = 16 * 1024;

    fn new(
        sink: S,
        pool: &'p std::sync::Mutex<SectorPool>,
        flash: fn(&mut S) -> &mut SimFlash,
    ) -> Self {
        Sharing {
            sink,
            pool,
            flash,
            unshared: 0,
        }
    }
}

impl<S: crate::client::UpdateSink> crate::client::UpdateSink for Sharing<'_, S> {
    fn begin(&mut self, size: u64) -> Result<(), String> {
        self.sink.begin(size)
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.sink.write(data)?;
        self.unshared += data.len();
        if self.unshared >= Self::EVERY {
            self.unshared = 0;
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            (self.flash)(&mut self.sink).share_written_sectors(&mut pool);
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), String> {
        self.sink.finish()
    }

    fn abort(&mut self) {
        self.sink.abort()
    }
}

/// How simulated devices retry: quick backoff, and the configured share of dropped ranges.
fn sim_policy(config: &SimConfig) -> Policy {
    Policy {
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(5),
        faults: Faults {
            drop_rate: config.drop_rate,
        },
        ..Policy::default()
    }
}

fn account(counters: &Counters, before: crate::client::Stats, after: crate::client::Stats) {
    counters
        .requests
        .fetch_add(after.requests - before.requests, Ordering::Relaxed);
    counters
        .bytes
        .fetch_add(after.bytes - before.bytes, Ordering::Relaxed);
    counters
        .retries
        .fetch_add(after.retries - before.retries, Ordering::Relaxed);
}
