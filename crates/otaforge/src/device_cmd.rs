//! `otaforge agent` (a Linux device with a file as its flash) and `otaforge sim` (a fleet of
//! virtual devices), over the `otaforge-agent` crate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use otaforge_agent::agent::{Agent, AgentChip, AgentConfig, init_flash_file, init_w800_flash_file};
use otaforge_agent::client::Endpoint;
use otaforge_agent::device::{demo_image, demo_w800_image, demo_w800_ota};
use otaforge_agent::http::Url;
use otaforge_agent::sim::{self, SimConfig, SimDialect};
use otaforge_device::esp::Layout;
use otaforge_formats::esp::Chip;

#[derive(Clone, Copy, ValueEnum)]
pub enum ChipArg {
    Esp32,
    Esp32s2,
    Esp32s3,
    Esp32c3,
    Esp32c6,
}

impl ChipArg {
    fn chip(self) -> Chip {
        match self {
            ChipArg::Esp32 => Chip::Esp32,
            ChipArg::Esp32s2 => Chip::Esp32S2,
            ChipArg::Esp32s3 => Chip::Esp32S3,
            ChipArg::Esp32c3 => Chip::Esp32C3,
            ChipArg::Esp32c6 => Chip::Esp32C6,
        }
    }
}

/// The chips the agent can play: the ESP32 family and the W800.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum AgentChipArg {
    Esp32,
    Esp32s2,
    Esp32s3,
    Esp32c3,
    Esp32c6,
    W800,
}

impl AgentChipArg {
    fn chip(self) -> AgentChip {
        let esp = |c| AgentChip::Esp(c);
        match self {
            AgentChipArg::Esp32 => esp(Chip::Esp32),
            AgentChipArg::Esp32s2 => esp(Chip::Esp32S2),
            AgentChipArg::Esp32s3 => esp(Chip::Esp32S3),
            AgentChipArg::Esp32c3 => esp(Chip::Esp32C3),
            AgentChipArg::Esp32c6 => esp(Chip::Esp32C6),
            AgentChipArg::W800 => AgentChip::W800,
        }
    }
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Make a 4 MB flash file laid out like an ESP32's (two OTA slots), with a first image,
    /// or with --chip w800 a 2 MB one laid out like a W800's (app, app_ota).
    InitFlash {
        file: PathBuf,
        /// The image flashed by wire into the first app slot (a W800 needs its .img).
        #[arg(long)]
        image: Option<PathBuf>,
        /// No factory partition: the first image goes to ota_0.
        #[arg(long)]
        no_factory: bool,
        /// esp32 (any ESP32 chip: the layout is the same) or w800.
        #[arg(long, value_enum, default_value = "esp32")]
        chip: AgentChipArg,
    },
    /// Poll the server and install updates into the flash file.
    Run(AgentRunArgs),
}

#[derive(Args)]
pub struct AgentRunArgs {
    #[arg(long)]
    flash: PathBuf,
    /// This device's serial number.
    #[arg(long)]
    serial: String,
    /// OTAdrive dialect: the server's base URL (with --api-key).
    #[arg(long, requires = "api_key", conflicts_with = "link")]
    server: Option<String>,
    #[arg(long, env = "OTAFORGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Static-link dialect: the device's firmware_url (with --password).
    #[arg(long, requires = "password")]
    link: Option<String>,
    #[arg(long, env = "OTAFORGE_DEVICE_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// The chip the flash file is for (w800: the OTAdrive dialect, naming the chip).
    #[arg(long, value_enum, default_value = "esp32c3")]
    chip: AgentChipArg,
    /// Seconds between polls.
    #[arg(long, default_value_t = 60)]
    interval: u64,
    /// Shell command run after an update boots; exit 0 = healthy.
    #[arg(long)]
    health_cmd: Option<String>,
    /// One poll, then exit.
    #[arg(long)]
    once: bool,
}

pub async fn agent(command: AgentCommand) -> anyhow::Result<()> {
    match command {
        AgentCommand::InitFlash {
            file,
            image,
            no_factory,
            chip,
        } => {
            let image = image
                .map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
                .transpose()?;
            if let AgentChip::W800 = chip.chip() {
                let image = image.context("a W800 flash needs --image (its .img)")?;
                init_w800_flash_file(&file, &image)?;
                println!(
                    "{} made: 2 MB, app at 0xf000 (0x122000 bytes), app_ota at 0x131000 (0xaf000 bytes)",
                    file.display()
                );
                return Ok(());
            }
            let mut layout = Layout::default_4mb();
            if no_factory {
                layout.factory = None;
            }
            init_flash_file(&file, &layout, image.as_deref())?;
            println!(
                "{} made: partition table at 0x8000, otadata at 0xd000, ota_0 0x110000, ota_1 0x210000",
                file.display()
            );
            Ok(())
        }
        AgentCommand::Run(args) => {
            let endpoint = match (args.server, args.api_key, args.link, args.password) {
                (Some(server), Some(api_key), None, _) => Endpoint::OtaDrive {
                    server: Url::parse(&server)?,
                    api_key,
                },
                (None, _, Some(link), Some(password)) => Endpoint::StaticLink {
                    url: Url::parse(&link)?,
                    password,
                },
                _ => bail!(
                    "give --server URL --api-key KEY (OTAdrive) or --link URL --password P (static link)"
                ),
            };
            if matches!(args.chip, AgentChipArg::W800)
                && matches!(endpoint, Endpoint::StaticLink { .. })
            {
                bail!("a W800 talks the OTAdrive dialect: give --server URL --api-key KEY");
            }
            let agent = Agent::start(AgentConfig {
                flash: args.flash,
                endpoint,
                serial: args.serial,
                chip: args.chip.chip(),
                interval: Duration::from_secs(args.interval.max(1)),
                health_cmd: args.health_cmd,
                once: args.once,
            })
            .await?;
            agent.run().await
        }
    }
}

#[derive(Args)]
pub struct SimArgs {
    /// Number of virtual devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// A running server to talk to (with --api-key); without it the simulator starts its own
    /// server on a temporary SQLite database, registers the devices and assigns --target.
    /// Give it more than once for several nodes: each poll goes to the next one in turn.
    #[arg(long, requires = "api_key")]
    server: Vec<String>,
    #[arg(long, env = "OTAFORGE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Serial prefix of the virtual devices (serials are PREFIX000000, PREFIX000001, ...).
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// The image every device starts with (default: a generated 1.0.0 image).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The image rolled out in embedded mode (default: a generated 2.0.0 image).
    #[arg(long)]
    target: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "esp32c3")]
    chip: ChipArg,
    /// Seconds between polls.
    #[arg(long, default_value_t = 5.0)]
    poll: f64,
    /// Poll jitter, as a share of the interval.
    #[arg(long, default_value_t = 0.2)]
    jitter: f64,
    /// Share of devices whose health check fails on the new firmware.
    #[arg(long, default_value_t = 0.0)]
    fail_health: f64,
    /// Share of devices that lose power during their first update.
    #[arg(long, default_value_t = 0.0)]
    power_loss: f64,
    /// Share of downloaded ranges whose connection drops.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Stop after this many seconds at the latest.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Stop when every device runs (or rolled back) this version (embedded mode: the target's).
    #[arg(long)]
    until_version: Option<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of the devices that are W800s (xz OTA images through the bootloader copy, on
    /// the OTAdrive dialect with `x-otaforge-chip: w800`); the rest are --chip.
    #[arg(long, default_value_t = 0.0)]
    w800_share: f64,
    /// The .img the W800s start with (default: a generated 1.0.0 image for the simulator's
    /// W800 layout).
    #[arg(long)]
    w800_image: Option<PathBuf>,
    /// The xz OTA image rolled out to the W800s in embedded mode (default: a generated
    /// 2.0.0+w800: one product holds each version once).
    #[arg(long)]
    w800_target: Option<PathBuf>,
}

fn read_or(path: &Option<PathBuf>, make: impl FnOnce() -> Vec<u8>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
        None => Ok(make()),
    }
}

/// An in-process server with a product, the devices registered and `release` (one image
/// per chip family, the first one's version awaited) assigned to their group.
async fn embedded_server(
    serials: &[String],
    release: Vec<Vec<u8>>,
) -> anyhow::Result<(
    String,
    String,
    String,
    tokio::sync::oneshot::Sender<()>,
    tempdir::Dir,
)> {
    use otaforge_store::model::{DeviceStatus, GroupPatch, NewDevice};
    let dir = tempdir::Dir::new("otaforge-sim")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = otaforge_server::Config {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        ..otaforge_server::Config::default()
    };
    let state = otaforge_server::AppState::open(config).await?;
    let store = state.store();
    let key = otaforge_server::auth::random_secret().map_err(|e| anyhow::anyhow!(e.message))?;
    let product = store
        .create_product("sim", &otaforge_server::auth::digest(&key))
        .await?;
    let mut ids = Vec::new();
    let mut version = String::new();
    for image in release {
        let firmware = state
            .store_firmware(product.id, image.into(), None)
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
        if ids.is_empty() {
            version = firmware.version.clone();
        }
        ids.push(firmware.id);
    }
    let mut ids = ids.into_iter();
    store
        .update_group(
            product.id,
            product.default_group_id,
            GroupPatch {
                firmware_id: Some(ids.next()),
                other_firmware_ids: Some(ids.collect()),
                ..GroupPatch::default()
            },
        )
        .await?;
    let bar = indicatif::ProgressBar::new(serials.len() as u64).with_message("registering devices");
    for serial in serials {
        store
            .create_device(NewDevice {
                product_id: product.id,
                group_id: None,
                serial: serial.clone(),
                status: DeviceStatus::Verified,
                password_hash: None,
            })
            .await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server_state = state.clone();
    tokio::spawn(async move {
        let _ = otaforge_server::serve(server_state, listener, async move {
            let _ = rx.await;
        })
        .await;
    });
    Ok((format!("http://{addr}"), key, version, tx, dir))
}

mod tempdir {
    //! A temporary folder removed on drop.
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> std::io::Result<Dir> {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!("{tag}-{}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&path)?;
            Ok(Dir(path))
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub async fn sim(args: SimArgs) -> anyhow::Result<()> {
    let chip = args.chip.chip();
    let initial = read_or(&args.image, || {
        demo_image(chip, "otaforge-sim", "1.0.0", 48 * 1024)
    })?;
    let serials: Vec<String> = (0..args.devices)
        .map(|i| format!("{}{i:06}", args.prefix))
        .collect();
    let slot_size = (initial.len() as u32 * 4).max(256 * 1024);
    let w800_share = args.w800_share.clamp(0.0, 1.0);
    let w800_layout = sim::w800_layout(slot_size);
    let w800_image = if w800_share > 0.0 {
        Some(read_or(&args.w800_image, || {
            demo_w800_image(&w800_layout, "1.0.0", 48 * 1024)
        })?)
    } else {
        None
    };
    let (servers, api_key, until, guard) = match (args.server.is_empty(), &args.api_key) {
        (false, Some(key)) => (
            args.server.clone(),
            key.clone(),
            args.until_version.clone(),
            None,
        ),
        _ => {
            let mut release = vec![read_or(&args.target, || {
                demo_image(chip, "otaforge-sim", "2.0.0", 48 * 1024)
            })?];
            if w800_share > 0.0 {
                release.push(read_or(&args.w800_target, || {
                    demo_w800_ota(&w800_layout, "2.0.0+w800", 48 * 1024)
                })?);
            }
            eprintln!("starting an embedded server with {} devices", serials.len());
            let (server, key, version, stop, dir) = embedded_server(&serials, release).await?;
            (
                vec![server],
                key,
                Some(args.until_version.clone().unwrap_or(version)),
                Some((stop, dir)),
            )
        }
    };
    let config = SimConfig {
        servers,
        dialect: SimDialect::OtaDrive { api_key },
        serials,
        initial_image: initial,
        chip,
        slot_size,
        poll: Duration::from_secs_f64(args.poll.max(0.05)),
        jitter: args.jitter.clamp(0.0, 1.0),
        fail_health: args.fail_health.clamp(0.0, 1.0),
        power_loss: args.power_loss.clamp(0.0, 1.0),
        drop_rate: args.drop_rate.clamp(0.0, 1.0),
        duration: Duration::from_secs(args.duration),
        until_version: until,
        seed: args.seed,
        stop: None,
        w800_share,
        w800_image,
    };
    let total = config.serials.len();
    let summary = sim::run(config, move |c, t| {
        use std::sync::atomic::Ordering::Relaxed;
        let versions: Vec<String> = c.versions().iter().map(|(v, n)| format!("{v}: {n}")).collect();
        eprintln!(
            "[{:>5.0}s] {} | settled {}/{total} | installs {} rollbacks {} power losses {} | {:.1} MiB, {} requests",
            t.as_secs_f64(),
            versions.join(", "),
            c.settled.load(Relaxed),
            c.installs.load(Relaxed),
            c.rollbacks.load(Relaxed),
            c.power_losses.load(Relaxed),
            c.bytes.load(Relaxed) as f64 / 1048576.0,
            c.requests.load(Relaxed),
        );
    })
    .await?;
    println!("{summary}");
    let peak = crate::bench_fleet::peak_mib(std::process::id());
    if guard.is_some() {
        println!("peak RSS of the simulator and its embedded server: {peak:.0} MiB");
    } else {
        println!("peak RSS of the simulator: {peak:.0} MiB");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary.to_json())?)?;
    }
    Ok(())
}
