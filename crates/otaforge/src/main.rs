//! `otaforge`: the server (`serve`) and a command-line client of its management API.

#![forbid(unsafe_code)]

mod bench;
mod bench_fleet;
mod client;
mod device_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use otaforge_server::{AppState, Config, Secret};

/// mimalloc: the check-in path allocates small, short-lived buffers on every request, and
/// glibc's malloc and free were a sixth of the server's CPU under a fleet's load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "otaforge",
    version,
    about = "Over-the-air firmware updates for ESP32, ESP8266 and W800 fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (SQLite and ./otaforge-data unless told otherwise).
    Serve(ServeArgs),
    /// Measure check-ins and downloads against this server and, if installed, nginx.
    Bench(bench::BenchArgs),
    /// A Linux device agent whose flash is a file laid out like an ESP32's.
    Agent {
        #[command(subcommand)]
        command: device_cmd::AgentCommand,
    },
    /// Simulate a fleet of devices updating over real HTTP.
    Sim(device_cmd::SimArgs),
    /// Compile queued builds (a worker process sharing the server's database and data folder).
    Worker(ServeArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "OTAFORGE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data folder: the SQLite database and the blobs live here.
    #[arg(long, env = "OTAFORGE_DATA_DIR", default_value = "./otaforge-data")]
    data_dir: PathBuf,
    /// sqlite://PATH or postgres://USER@HOST/DB (default: SQLite in the data folder).
    #[arg(long, env = "OTAFORGE_DATABASE_URL")]
    database_url: Option<String>,
    /// Where firmware blobs live: s3://BUCKET?endpoint=URL (shared by several nodes; keys
    /// from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) or file:///FOLDER (default: the
    /// blobs folder in the data folder).
    #[arg(long, env = "OTAFORGE_BLOB_URL")]
    blob_url: Option<String>,
    /// The URL devices reach this server at, used in static firmware links.
    #[arg(long, env = "OTAFORGE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Largest accepted upload, in MiB.
    #[arg(long, env = "OTAFORGE_MAX_UPLOAD_MB", default_value_t = 32)]
    max_upload_mb: u64,
    /// The polling interval hawkBit DDI clients (SWUpdate) are told, in seconds.
    #[arg(long, env = "OTAFORGE_DDI_POLL_SECONDS", default_value_t = 300)]
    ddi_poll_seconds: u64,
    /// How often rollout gates are evaluated (by the one node holding the gates), in
    /// milliseconds.
    #[arg(long, env = "OTAFORGE_GATE_INTERVAL_MS", default_value_t = 2000)]
    gate_interval_ms: u64,
    #[command(flatten)]
    compile: CompileArgs,
}

#[derive(clap::Args, Clone)]
struct CompileArgs {
    /// Builds compiled at once by this process (0: leave them to `otaforge worker`).
    #[arg(long, env = "OTAFORGE_BUILD_WORKERS", default_value_t = 1)]
    build_workers: usize,
    /// arduino-cli to use (default: found on PATH).
    #[arg(long, env = "OTAFORGE_ARDUINO_CLI")]
    arduino_cli: Option<PathBuf>,
    /// arduino-cli's data folder (its cores and tools); default: what its configuration
    /// file says, else ~/.arduino15.
    #[arg(long, env = "ARDUINO_DIRECTORIES_DATA")]
    arduino_data_dir: Option<PathBuf>,
    /// arduino-cli's downloads folder; default: its configuration, else DATA/staging.
    #[arg(long, env = "ARDUINO_DIRECTORIES_DOWNLOADS")]
    arduino_downloads_dir: Option<PathBuf>,
    /// arduino-cli's user folder (sketchbook libraries); default: its configuration, else ~/Arduino.
    #[arg(long, env = "ARDUINO_DIRECTORIES_USER")]
    arduino_user_dir: Option<PathBuf>,
    /// arduino-builder to use for arduino:avr boards (default: found on PATH).
    #[arg(long, env = "OTAFORGE_ARDUINO_BUILDER")]
    arduino_builder: Option<PathBuf>,
    /// Run builds without the bubblewrap sandbox when bwrap is missing (not recommended).
    #[arg(long, env = "OTAFORGE_ALLOW_UNSANDBOXED_BUILDS")]
    allow_unsandboxed_builds: bool,
    /// Wall-time cap of one build, in seconds.
    #[arg(long, env = "OTAFORGE_BUILD_TIMEOUT", default_value_t = 600)]
    build_timeout: u64,
}

impl CompileArgs {
    fn config(&self) -> otaforge_server::compile::CompileConfig {
        let mut c = otaforge_server::compile::CompileConfig {
            workers: self.build_workers,
            allow_unsandboxed: self.allow_unsandboxed_builds,
            arduino_data: self.arduino_data_dir.clone(),
            arduino_downloads: self.arduino_downloads_dir.clone(),
            arduino_user: self.arduino_user_dir.clone(),
            ..Default::default()
        };
        if let Some(p) = &self.arduino_cli {
            c.arduino_cli = Some(p.clone());
        }
        if let Some(p) = &self.arduino_builder {
            c.arduino_builder = Some(p.clone());
        }
        c.limits.wall = std::time::Duration::from_secs(self.build_timeout.max(10));
        c
    }
}

impl ServeArgs {
    fn config(self) -> Config {
        Config {
            listen: self.listen,
            data_dir: self.data_dir,
            database_url: self.database_url,
            blob_url: self.blob_url,
            public_url: self.public_url,
            admin_token: std::env::var("OTAFORGE_ADMIN_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty())
                .map(Secret::new),
            max_upload_bytes: self.max_upload_mb * 1024 * 1024,
            ddi_poll: std::time::Duration::from_secs(self.ddi_poll_seconds.max(1)),
            rollout_tick: std::time::Duration::from_millis(self.gate_interval_ms.max(100)),
            compile: self.compile.config(),
            ..Config::default()
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OTAFORGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data folder {}", config.data_dir.display()))?;
    let listen = config.listen;
    let state = AppState::open(config).await?;
    if let Some(password) = state.ensure_admin().await? {
        println!("Created the first operator account.");
        println!("  username: admin");
        println!("  password: {password}");
        println!("This password is shown once. Sign in with `otaforge login --username admin`.");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    if state.config().compile.workers > 0 {
        let state = state.clone();
        tokio::spawn(async move { state.check_toolchain().await });
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        database = state.store().backend(),
        public_url = %state.config().public_url(),
        "otaforge is serving"
    );
    otaforge_server::serve(state, listener, shutdown_signal()).await
}

async fn worker(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = args.config();
    config.compile.workers = config.compile.workers.max(1);
    let workers = config.compile.workers;
    let state = AppState::open(config).await?;
    state.check_toolchain().await;
    if !state.config().compile.has_compiler() {
        anyhow::bail!(
            "no compiler found: install arduino-cli (or arduino-builder for arduino:avr boards)"
        );
    }
    tracing::info!(
        workers,
        database = state.store().backend(),
        "otaforge worker is compiling queued builds"
    );
    // What the builds change (a device's assignment) reaches `serve`'s caches.
    let cache_sync = state.spawn_cache_sync(false);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            tokio::spawn(otaforge_server::builds::worker(
                state.clone(),
                format!("worker-{}-{i}", std::process::id()),
                stopped.clone(),
            ))
        })
        .collect();
    shutdown_signal().await;
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
    cache_sync.abort();
    if let Err(e) = state.sync_caches().await {
        tracing::warn!(error = %e, "publishing the last cache changes failed");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Agent { command } => device_cmd::agent(command).await,
            Command::Sim(args) => device_cmd::sim(args).await,
            Command::Worker(args) => worker(args).await,
            Command::Client(cmd) => client::run(cmd).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
