//! The OTAForge HTTP server: the management API, the device dialects (OTAdrive and the
//! static link of the stock Arduino clients) and the plumbing that serves them.
//! Only this crate knows HTTP.

#![forbid(unsafe_code)]
// The OpenAPI document is one large json! literal.
#![recursion_limit = "512"]

mod api;
pub mod auth;
pub mod builds;
mod catalog;
pub mod compile;
mod config;
pub mod core;
pub use otaforge_domain::decision;
mod delivery;
pub mod delta;
mod device;
mod diagnostics;
mod error;
mod extract;
mod openapi;
mod page;
pub mod range;
pub use otaforge_domain::rollout_plan;
mod rollouts;
mod secrets;
mod setup;
mod svg;
mod telemetry;
mod upload;
mod web;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::Uri;
use hyper_util::rt::TokioIo;
use otaforge_store::{BlobStore, Store};
use tokio::net::TcpListener;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use config::{Config, Secret};
pub use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    store: Arc<dyn Store>,
    blobs: BlobStore,
    blob_cache: delivery::BlobCache,
    catalog: catalog::Catalog,
    telemetry: telemetry::TelemetryBuffer,
    passwords: core::passwords::PasswordGuard,
    sealer: secrets::Sealer,
    compile: compile::CompileConfig,
    /// Woken when a build is queued.
    builds_ready: tokio::sync::Notify,
    /// One build at a time per board: builds of a board share its cache folder.
    board_locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    rollouts: rollouts::RolloutBook,
    /// This process among the nodes sharing the database (for leases).
    node: String,
    /// Whether this node holds the gates lease now.
    gates_held: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn board_lock(&self, fqbn: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.board_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(fqbn.to_string())
            .or_default()
            .clone()
    }
}

impl AppState {
    pub fn new(
        config: Config,
        store: Arc<dyn Store>,
        blobs: BlobStore,
        sealer: secrets::Sealer,
    ) -> Self {
        let blob_cache = delivery::BlobCache::new(config.blob_cache_bytes);
        let compile = config.compile.clone();
        let passwords = core::passwords::PasswordGuard::new(store.clone());
        AppState {
            inner: Arc::new(Inner {
                config,
                store,
                blobs,
                blob_cache,
                catalog: catalog::Catalog::default(),
                telemetry: telemetry::TelemetryBuffer::default(),
                passwords,
                sealer,
                compile,
                builds_ready: tokio::sync::Notify::new(),
                board_locks: Default::default(),
                rollouts: rollouts::RolloutBook::default(),
                node: node_name(),
                gates_held: Default::default(),
            }),
        }
    }

    /// Opens the store and blob folder named by the configuration.
    pub async fn open(config: Config) -> anyhow::Result<Self> {
        use anyhow::Context;
        // The data folder holds secrets (sealing key, database, personal firmware): only
        // its owner may enter it, and its files are the owner's alone.
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        otaforge_store::owner_only(&config.data_dir, 0o700)
            .with_context(|| format!("restricting {}", config.data_dir.display()))?;
        let url = config.database_url();
        let store = otaforge_store::open(&url)
            .await
            .with_context(|| format!("opening the database {}", redact_url(&url)))?;
        for suffix in ["", "-wal", "-shm"] {
            let file = config.data_dir.join(format!("otaforge.db{suffix}"));
            if file.exists() {
                otaforge_store::owner_only(&file, 0o600)
                    .with_context(|| format!("restricting {}", file.display()))?;
            }
        }
        let blobs = match &config.blob_url {
            Some(url) => BlobStore::open_url(url)
                .with_context(|| format!("opening the blob store {}", redact_url(url)))?,
            None => BlobStore::local(&config.blob_dir()).with_context(|| {
                format!("opening the blob folder {}", config.blob_dir().display())
            })?,
        };
        let sealer = secrets::Sealer::load(&config.data_dir)?;
        let state = Self::new(config, store, blobs, sealer);
        state
            .refresh_rollouts()
            .await
            .context("loading the live rollouts")?;
        Ok(state)
    }

    pub fn store(&self) -> &dyn Store {
        &*self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Keeps this process's caches coherent with the others sharing the database: every
    /// half second, publishes its writes and applies theirs (`Catalog::sync`).
    /// `warm`: also keep every device in memory (`serve`; a build worker needs none).
    pub fn spawn_cache_sync(&self, warm: bool) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let mut warming: Option<tokio::task::JoinHandle<()>> = None;
            let mut tick = tokio::time::interval(state.inner.config.sync_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut cold_since: Option<std::time::Instant> = None;
            loop {
                tick.tick().await;
                if let Err(e) = state.inner.catalog.sync(&*state.inner.store).await {
                    tracing::warn!(error = %e, "syncing the caches failed; will retry");
                }
                if !warm {
                    continue;
                }
                // Rollouts another node created, moved on or ended.
                if let Err(e) = state.refresh_rollouts().await {
                    tracing::warn!(error = %e, "refreshing the live rollouts failed; will retry")
                }
                // Devices forgotten all at once are loaded again once writes settle (2 s
                // without another such forgetting), so polls keep reading nothing.
                if state.inner.catalog.take_cold() {
                    cold_since = Some(std::time::Instant::now());
                } else if cold_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(2))
                    && warming.as_ref().is_none_or(|w| w.is_finished())
                {
                    cold_since = None;
                    let state = state.clone();
                    warming = Some(tokio::spawn(async move {
                        let started = std::time::Instant::now();
                        match state.inner.catalog.warm(&*state.inner.store).await {
                            Ok(n) => tracing::info!(
                                devices = n,
                                seconds = started.elapsed().as_secs_f64(),
                                "devices loaded into memory"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "loading devices into memory failed")
                            }
                        }
                    }));
                }
            }
        })
    }

    /// Publishes this process's cache changes and applies the others' now.
    pub async fn sync_caches(&self) -> otaforge_store::Result<()> {
        self.inner.catalog.sync(&*self.inner.store).await
    }

    /// Writes buffered device reports now.
    pub async fn flush_telemetry(&self) -> otaforge_store::Result<usize> {
        self.inner.telemetry.flush(&*self.inner.store).await
    }

    /// If the database has no user yet, creates `admin` with a random password and returns
    /// that password (shown once).
    pub async fn ensure_admin(&self) -> anyhow::Result<Option<String>> {
        if self.inner.store.count_users().await? > 0 {
            return Ok(None);
        }
        let password = auth::random_secret().map_err(|e| anyhow::anyhow!(e.into_message()))?;
        let hash = auth::hash_password(&password).map_err(|e| anyhow::anyhow!(e.into_message()))?;
        match self
            .inner
            .store
            .create_user("admin", &hash, otaforge_store::model::Role::Admin)
            .await
        {
            Ok(_) => Ok(Some(password)),
            // Another process created it first.
            Err(otaforge_store::StoreError::Conflict(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The lease of the node that evaluates rollout gates.
const GATES_LEASE: &str = "rollout gates";

/// This process's name among the nodes: host, process id and a random tag.
fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    let mut tag = [0u8; 3];
    let _ = getrandom::fill(&mut tag);
    format!("{host}-{}-{}", std::process::id(), auth::hex(&tag))
}

impl AppState {
    /// How long a node holds the gates without renewing: another node takes over at most
    /// this long (plus one renewal period) after the holder dies.
    const GATES_LEASE_TTL: Duration = Duration::from_secs(6);

    /// Runs forever: holds (or waits for) the gates lease, and while this node holds it,
    /// evaluates the rollout gates every `rollout_tick` and prunes spent counting windows.
    /// Exactly one node of those sharing the database does this at a time.
    async fn hold_the_gates(self) {
        let renew = self.inner.config.rollout_tick.min(Duration::from_secs(1));
        let mut tick = tokio::time::interval(renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = false;
        let mut last_pass: Option<std::time::Instant> = None;
        loop {
            tick.tick().await;
            let ttl = Self::GATES_LEASE_TTL.as_millis() as i64;
            let now_held = match self
                .store()
                .hold_lease(GATES_LEASE, &self.inner.node, ttl)
                .await
            {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the gates lease failed; will retry");
                    false
                }
            };
            if now_held != held {
                held = now_held;
                self.inner
                    .gates_held
                    .store(held, std::sync::atomic::Ordering::Relaxed);
                if held {
                    tracing::info!(node = %self.inner.node, "this node now evaluates the rollout gates");
                } else {
                    tracing::info!(node = %self.inner.node, "another node evaluates the rollout gates");
                }
            }
            if !held || last_pass.is_some_and(|t| t.elapsed() < self.inner.config.rollout_tick) {
                continue;
            }
            last_pass = Some(std::time::Instant::now());
            // Reports first: the gates judge what devices said.
            let _ = self.flush_telemetry().await;
            if let Err(e) = self.evaluate_rollouts().await {
                tracing::warn!(error = %e, "evaluating rollouts failed; will retry");
            }
            let spent = otaforge_store::model::now_millis() - 600_000;
            if let Err(e) = self.store().prune_slots(spent).await {
                tracing::warn!(error = %e, "pruning counting windows failed");
            }
        }
    }
}

/// Hides the password of a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Every route of the server. Pure: no I/O happens until a request arrives.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(builds::routes())
        .merge(rollouts::routes())
        .merge(web::routes())
        .merge(device::otadrive::routes())
        .merge(device::static_link::routes())
        .merge(device::hawkbit::routes())
        .merge(device::mender::routes())
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .fallback(web::not_found)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("handler", "a handler panicked").into_response_boxed()
        }))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(120),
        ))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map(MatchedPath::as_str)
                .unwrap_or("-");
            tracing::debug_span!("request", method = %req.method(), path)
        }))
        .with_state(state)
}

impl ApiError {
    fn into_response_boxed(self) -> axum::response::Response {
        axum::response::IntoResponse::into_response(self)
    }
}

/// Device paths are matched case-insensitively (`/DeviceApi/Update` is seen in the field):
/// lowercase the `/deviceapi/...` path before routing.
fn normalize_device_path(mut req: Request) -> Request {
    let path = req.uri().path();
    if path.len() >= 10
        && path[..10].eq_ignore_ascii_case("/deviceapi")
        && path.bytes().any(|b| b.is_ascii_uppercase())
    {
        let lowered = path.to_ascii_lowercase();
        let new = match req.uri().query() {
            Some(q) => format!("{lowered}?{q}"),
            None => lowered,
        };
        if let Ok(uri) = new.parse::<Uri>() {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// Serves on a bound listener until `shutdown` resolves, then stops accepting, lets
/// requests in flight finish (up to 30 s) and writes buffered device reports.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let flusher = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(state.inner.config.telemetry_flush_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = state.flush_telemetry().await {
                    tracing::warn!(error = %e, "writing device reports failed; will retry");
                }
            }
        })
    };

    let gates = tokio::spawn(state.clone().hold_the_gates());
    let cache_sync = state.spawn_cache_sync(true);
    let (stop_workers, workers_stop) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = (0..state.inner.compile.workers)
        .map(|i| {
            tokio::spawn(builds::worker(
                state.clone(),
                format!("serve-{}-{i}", std::process::id()),
                workers_stop.clone(),
            ))
        })
        .collect();
    let app = router(state.clone());

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Title-case header names (`Content-Length`, `Content-Range`), as nginx and Apache send
    // them: some device parsers compare header names case-sensitively.
    http.title_case_headers(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // Firmware bodies go out as they are (vectored writes), not copied into a buffer.
        .writev(true)
        .max_buf_size(64 * 1024);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let service = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let mut req = normalize_device_path(req.map(axum::body::Body::new));
                        req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                        app.oneshot(req).await
                    }
                });
                let conn = http.serve_connection(
                    TokioIo::new(stream),
                    hyper_util::service::TowerToHyperService::new(service),
                );
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tracing::info!("shutting down: finishing requests in flight");
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after 30 s; closing them");
    }
    flusher.abort();
    gates.abort();
    // Another node takes the gates over at once rather than when the lease runs out.
    let _ = state
        .store()
        .release_lease(GATES_LEASE, &state.inner.node)
        .await;
    let _ = stop_workers.send(true);
    for worker in workers {
        // A build in progress finishes (its compiler is bounded by the wall-time cap).
        let _ = worker.await;
    }
    let written = state.flush_telemetry().await?;
    cache_sync.abort();
    // What this process changed last reaches the others.
    if let Err(e) = state.sync_caches().await {
        tracing::warn!(error = %e, "publishing the last cache changes failed");
    }
    tracing::info!(devices = written, "device reports written; bye");
    Ok(())
}
