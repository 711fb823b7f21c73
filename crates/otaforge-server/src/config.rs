//! Server configuration: one struct, filled by the binary from defaults, environment and flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A secret string whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Where the server listens (used by the binary to bind, and for the default public URL).
    pub listen: SocketAddr,
    /// The local data folder: the SQLite database and the blob folder live here by default.
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://...`; `None` means SQLite in `data_dir`.
    pub database_url: Option<String>,
    /// Where firmware and resource blobs live: `s3://BUCKET?endpoint=URL` (shared by
    /// several nodes) or `file:///FOLDER`; `None` means the `blobs` folder in `data_dir`.
    pub blob_url: Option<String>,
    /// The base URL devices reach the server at, for static links. Default `http://{listen}`.
    pub public_url: Option<String>,
    /// A bearer token that is always a valid admin token (`OTAFORGE_ADMIN_TOKEN`).
    pub admin_token: Option<Secret>,
    /// Largest firmware or resource upload accepted, in bytes.
    pub max_upload_bytes: u64,
    /// How often buffered device check-in reports are written to the database.
    pub telemetry_flush_interval: Duration,
    /// Bytes of firmware kept in memory for serving.
    pub blob_cache_bytes: usize,
    /// Compilers, sandbox and build workers.
    pub compile: crate::compile::CompileConfig,
    /// How often rollout gates are evaluated.
    pub rollout_tick: Duration,
    /// How often this process applies what other processes changed (caches, live rollouts).
    pub sync_interval: Duration,
    /// The polling interval hawkBit DDI clients are told (`config.polling.sleep`).
    pub ddi_poll: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./otaforge-data"),
            database_url: None,
            blob_url: None,
            public_url: None,
            admin_token: None,
            max_upload_bytes: 32 * 1024 * 1024,
            telemetry_flush_interval: Duration::from_secs(2),
            blob_cache_bytes: 256 * 1024 * 1024,
            compile: crate::compile::CompileConfig::default(),
            rollout_tick: Duration::from_secs(2),
            sync_interval: Duration::from_millis(500),
            ddi_poll: Duration::from_secs(300),
        }
    }
}

impl Config {
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("otaforge.db").display()))
    }

    pub fn public_url(&self) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
            .trim_end_matches('/')
            .to_string()
    }

    pub fn blob_dir(&self) -> PathBuf {
        self.data_dir.join("blobs")
    }
}
