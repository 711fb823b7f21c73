//! The build queue: `POST /api/v1/builds` and `GET /api/v1/builds/{id}`, and the workers
//! (inside `otaforge serve`, or `otaforge worker` processes sharing the database) that claim
//! queued builds, compile them in the sandbox, stream the log into the database, store the
//! binary as firmware and assign it to the build's device.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use otaforge_store::model::*;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::Operator;
use crate::compile::{self, Job};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/builds", post(create))
        .route("/api/v1/builds/{id}", get(show))
        .route("/api/v1/builds/{id}/images/{name}", get(image))
        .route(
            "/api/v1/products/{product}/devices/{serial}/builds",
            get(list),
        )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBuildBody {
    fqbn: String,
    files: BTreeMap<String, String>,
    /// The device the result is assigned to (its serial), with `product_id`.
    device: Option<String>,
    product_id: Option<Id>,
}

/// A queued build.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    id: Id,
    status: BuildStatus,
}

/// A build: its state, log and diagnostics.
#[derive(Serialize, ToSchema)]
pub struct BuildBody {
    id: Id,
    status: BuildStatus,
    fqbn: String,
    log: String,
    diagnostics: Vec<Diagnostic>,
    firmware_id: Option<Id>,
    /// Images kept for flashing by wire (setup builds for ESP32 boards): `merged.bin`,
    /// `bootloader.bin`, `partitions.bin`.
    images: Vec<BuildImage>,
    created_at: Millis,
    started_at: Option<Millis>,
    finished_at: Option<Millis>,
}

#[utoipa::path(post, path = "/api/v1/builds", tag = "builds", security(("bearer" = [])),
    request_body = NewBuildBody,
    responses((status = 202, body = Queued), crate::openapi::Refusals))]
pub async fn create(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(body): ApiJson<NewBuildBody>,
) -> ApiResult<Response> {
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    // A build stores firmware and may assign it: a change, so a viewer may not.
    let actor = op.actor()?;
    let device = match (&body.device, body.product_id) {
        (Some(serial), Some(product)) => Some(state.store().get_device(product, serial).await?),
        (Some(_), None) => return Err(unprocessable("device needs product_id".into())),
        (None, Some(product)) => {
            state.store().get_product(product).await?;
            None
        }
        (None, None) => None,
    };
    let build = state
        .queue_build(
            NewBuild {
                product_id: body.product_id,
                device_id: device.as_ref().map(|d| d.id),
                fqbn: body.fqbn,
                files: body.files,
                requested_by: actor.name.clone(),
            },
            actor.address,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(Queued {
            id: build.id,
            status: build.status,
        }),
    )
        .into_response())
}

/// A build in a list: its state, not its log.
#[derive(Serialize, ToSchema)]
pub struct BuildSummary {
    id: Id,
    status: BuildStatus,
    fqbn: String,
    firmware_id: Option<Id>,
    requested_by: String,
    created_at: Millis,
    started_at: Option<Millis>,
    finished_at: Option<Millis>,
}

/// A page of a device's builds, newest first.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BuildListQuery {
    /// Items per page (1 to 1000; 100 unless given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// Only builds in this state.
    status: Option<BuildStatus>,
}

#[utoipa::path(get, path = "/api/v1/products/{product}/devices/{serial}/builds", tag = "builds",
    security(("bearer" = [])), params(("product" = i64, Path), ("serial" = String, Path), BuildListQuery),
    responses((status = 200, body = crate::page::Page<BuildSummary>), crate::openapi::Refusals))]
pub async fn list(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    crate::extract::ApiQuery(query): crate::extract::ApiQuery<BuildListQuery>,
) -> ApiResult<axum::Json<crate::page::Page<BuildSummary>>> {
    let device = state.store().get_device(product, &serial).await?;
    let limit = crate::page::limit(query.limit)?;
    let before = crate::page::decode::<Id>(query.cursor.as_deref())?;
    let rows = state
        .store()
        .build_page(device.id, query.status, before, limit + 1)
        .await?;
    Ok(axum::Json(crate::page::of(
        rows,
        limit,
        |b| b.id,
        |b| BuildSummary {
            id: b.id,
            status: b.status,
            fqbn: b.fqbn,
            firmware_id: b.firmware_id,
            requested_by: b.requested_by,
            created_at: b.created_at,
            started_at: b.started_at,
            finished_at: b.finished_at,
        },
    )))
}

#[utoipa::path(get, path = "/api/v1/builds/{id}", tag = "builds", security(("bearer" = [])),
    params(("id" = i64, Path)),
    responses((status = 200, body = BuildBody), crate::openapi::Refusals))]
pub async fn show(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(id): ApiPath<Id>,
) -> ApiResult<axum::Json<BuildBody>> {
    let b = state.store().get_build(id).await?;
    let images = state.store().list_build_images(id).await?;
    Ok(axum::Json(BuildBody {
        images,
        id: b.id,
        status: b.status,
        fqbn: b.fqbn,
        log: b.log,
        diagnostics: b.diagnostics,
        firmware_id: b.firmware_id,
        created_at: b.created_at,
        started_at: b.started_at,
        finished_at: b.finished_at,
    }))
}

#[utoipa::path(get, path = "/api/v1/builds/{id}/images/{name}", tag = "builds", security(("bearer" = [])),
    params(("id" = i64, Path), ("name" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), crate::openapi::Refusals))]
pub async fn image(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((id, name)): ApiPath<(Id, String)>,
) -> ApiResult<Response> {
    state.store().get_build(id).await?;
    let (image, bytes) = state.build_image(id, &name).await?;
    Ok(image_response(id, &image, bytes))
}

/// A kept image as a download named after its build.
pub(crate) fn image_response(build: Id, image: &BuildImage, bytes: bytes::Bytes) -> Response {
    use axum::http::header;
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"build-{build}-{}\"", image.name),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        bytes,
    )
        .into_response()
}

impl AppState {
    /// Checks the compilers as builds will run them (in the sandbox) and logs what it found;
    /// the workspace shows the same.
    pub async fn check_toolchain(&self) -> compile::ToolchainStatus {
        let config = self.inner.compile.clone();
        let work = self.config().data_dir.join("builds").join("preflight");
        let status = tokio::task::spawn_blocking(move || config.preflight(&work))
            .await
            .unwrap_or_default();
        if let Some((version, platforms)) = &status.cli {
            let cores: Vec<String> = platforms
                .iter()
                .map(|p| format!("{} {}", p.id, p.version))
                .collect();
            tracing::info!(
                arduino_cli = %version.text,
                cores = %cores.join(", "),
                "arduino-cli builds in the sandbox"
            );
        }
        if status.builder {
            tracing::info!("arduino-builder builds arduino:avr boards");
        }
        for problem in &status.problems {
            tracing::warn!("{problem}");
        }
        status
    }

    /// Queues a build: the one place a build is checked (board, files), capped (at most
    /// `MAX_PENDING_BUILDS` waiting or running per device and per requester, so one bot
    /// cannot hold the workers) and audited.
    pub(crate) async fn queue_build(
        &self,
        new: NewBuild,
        from: Option<std::net::IpAddr>,
    ) -> crate::error::ApiResult<Build> {
        check_sketch(&new.fqbn, &new.files)?;
        if crate::setup::is_ota_board(&new.fqbn)
            && new.device_id.is_none()
            && new.product_id.is_some()
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "an ESP build stored as firmware needs its device: the update code it keeps \
                 carries that device's credentials (give \"device\", or build without \"product_id\")",
            ));
        }
        compile::main_file(&new.files)
            .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m))?;
        let pending = self
            .store()
            .count_pending_builds(new.device_id, &new.requested_by)
            .await?;
        if pending >= MAX_PENDING_BUILDS {
            return Err(crate::error::ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "{pending} builds are already queued or running for this device; wait for one to finish"
                ),
            ));
        }
        let (who, fqbn) = (new.requested_by.clone(), new.fqbn.clone());
        let build = self.store().create_build(new).await?;
        self.inner.builds_ready.notify_one();
        self.audit_event(
            &who,
            from,
            "queued build",
            &format!("build {}", build.id),
            &fqbn,
        )
        .await;
        Ok(build)
    }
}

/// What a sketch must be to be saved or built: a known board name, 1 to 32 files with sketch
/// file names, each at most 512 KiB.
pub fn check_sketch(fqbn: &str, files: &BTreeMap<String, String>) -> crate::error::ApiResult<()> {
    let unprocessable = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m);
    compile::check_fqbn(fqbn).map_err(unprocessable)?;
    if files.is_empty() || files.len() > 32 {
        return Err(unprocessable("a sketch has 1 to 32 files".into()));
    }
    for (name, content) in files {
        compile::check_file_name(name).map_err(unprocessable)?;
        if content.len() > 512 * 1024 {
            return Err(unprocessable(format!("{name} is larger than 512 KiB")));
        }
    }
    // The main file is compiled as sketch.ino: a second tab of that name would replace it.
    if let Ok(main) = compile::main_file(files)
        && main != "sketch.ino"
        && files.contains_key("sketch.ino")
    {
        return Err(unprocessable(format!(
            "{main} is the main file, so another tab may not be named sketch.ino; rename it"
        )));
    }
    if let Some(scheme) = no_ota_partition_scheme(fqbn) {
        return Err(unprocessable(format!(
            "the partition scheme {scheme} has no second app slot: a board built with it cannot \
             take an update over the air; pick a scheme with OTA"
        )));
    }
    Ok(())
}

/// Whether an image fits the OTA slot the device reported (`x-ESP32-free-space` /
/// `x-ESP8266-free-space`: the free sketch space, which is where an update is written).
/// A device that never reported it is not judged.
pub fn fits_the_slot(image_len: usize, free_space: Option<i64>) -> Result<(), String> {
    match free_space {
        Some(free) if free >= 0 && image_len as u64 > free as u64 => Err(format!(
            "the image is {image_len} bytes, but the device reported {free} bytes of space for \
             an update; it would fail to install (make the sketch smaller or pick a partition \
             scheme with larger app slots)"
        )),
        _ => Ok(()),
    }
}

/// The FQBN's `PartitionScheme` option when it names a layout without OTA slots
/// (arduino-esp32's `huge_app` and its `no_ota`/`noota_*` schemes).
pub fn no_ota_partition_scheme(fqbn: &str) -> Option<&str> {
    let options = fqbn.splitn(4, ':').nth(3)?;
    options
        .split(',')
        .filter_map(|o| o.split_once('='))
        .find(|(k, _)| *k == "PartitionScheme")
        .map(|(_, v)| v)
        .filter(|v| {
            let v = v.to_ascii_lowercase();
            v == "huge_app" || v.contains("no_ota") || v.starts_with("noota")
        })
}

/// Builds that may wait or run at once per device and per requester.
pub const MAX_PENDING_BUILDS: i64 = 3;

/// Runs queued builds until `stop` fires.
pub async fn worker(state: AppState, name: String, stop: tokio::sync::watch::Receiver<bool>) {
    let mut stop = stop;
    loop {
        if *stop.borrow() {
            return;
        }
        match state.store().claim_build(&name).await {
            Ok(Some(build)) => run(&state, build).await,
            Ok(None) => {
                tokio::select! {
                    _ = state.inner.builds_ready.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a build failed");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Compiles one claimed build and records the outcome.
pub async fn run(state: &AppState, build: Build) {
    let span = tracing::info_span!("build", id = build.id, fqbn = %build.fqbn);
    let _guard = span.enter();
    let (status, diagnostics, firmware_id) = match compile_build(state, &build).await {
        Ok((diagnostics, firmware_id)) => (BuildStatus::Succeeded, diagnostics, firmware_id),
        Err((message, diagnostics)) => {
            let _ = state
                .store()
                .append_build_log(build.id, &format!("\nbuild failed: {message}\n"))
                .await;
            (BuildStatus::Failed, diagnostics, None)
        }
    };
    if let Err(e) = state
        .store()
        .finish_build(build.id, status, &diagnostics, firmware_id)
        .await
    {
        tracing::error!(error = %e, "recording the build result failed");
    }
    tracing::info!(status = status.as_str(), "build done");
}

type Failure = (String, Vec<Diagnostic>);

async fn compile_build(
    state: &AppState,
    build: &Build,
) -> Result<(Vec<Diagnostic>, Option<Id>), Failure> {
    let plain = |m: String| (m, Vec::new());
    let device = match build.device_id {
        Some(id) => Some(
            state
                .store()
                .device_by_id(id)
                .await
                .map_err(|e| plain(crate::error::ApiError::from(e).into_message()))?,
        ),
        None => None,
    };
    // Boards that update over Wi-Fi keep the update code in every build; that code carries
    // the device's secrets, so the firmware is personal to the device. The secrets are
    // opened here, at compile time: build rows hold only the user's own files.
    let mut personal_to = None;
    let (extra_files, build_properties) = match &device {
        Some(device) if build.files.contains_key(crate::setup::SETUP_SKETCH_FILE) => {
            let config = crate::setup::personal_config(state, device, "setup").map_err(plain)?;
            personal_to = Some(device.id);
            (
                BTreeMap::from([("otaforge_config.h".to_string(), config)]),
                Vec::new(),
            )
        }
        Some(device)
            if crate::setup::is_ota_board(&build.fqbn)
                && !build.files.contains_key("otaforge_ota.h") =>
        {
            let config = crate::setup::personal_config(state, device, &format!("b{}", build.id))
                .map_err(plain)?;
            personal_to = Some(device.id);
            crate::setup::keep_update_ability(&build.fqbn, config)
        }
        _ => (BTreeMap::new(), Vec::new()),
    };
    let config = state.inner.compile.clone();
    let data_dir = state.config().data_dir.clone();
    let cache = data_dir
        .join("build-cache")
        .join(build.fqbn.replace([':', '=', ',', '/'], "_"));
    let work = data_dir.join("builds").join(build.id.to_string());
    let fqbn = build.fqbn.clone();
    let files = build.files.clone();
    let lock = state.inner.board_lock(&fqbn);

    // Log chunks go to the database every 300 ms while the compiler runs.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let store_state = state.clone();
    let id = build.id;
    let writer = tokio::spawn(async move {
        let mut pending = String::new();
        loop {
            let closed = tokio::select! {
                chunk = rx.recv() => match chunk {
                    Some(c) => { pending.push_str(&c); false }
                    None => true,
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => false,
            };
            if !pending.is_empty() {
                let _ = store_state.store().append_build_log(id, &pending).await;
                pending.clear();
            }
            if closed {
                return;
            }
        }
    });
    let result = {
        let _board = lock.lock().await;
        let work_dir = work.clone();
        tokio::task::spawn_blocking(move || {
            let job = Job {
                fqbn: &fqbn,
                files: &files,
                extra_files,
                build_properties,
                work: &work_dir,
                cache: &cache,
            };
            let mut log = |s: &str| {
                let _ = tx.send(s.to_string());
            };
            compile::compile(&config, &job, &mut log)
        })
        .await
    };
    let _ = writer.await;
    let _ = std::fs::remove_dir_all(&work);
    let compiled = match result {
        Ok(Ok(c)) => c,
        Ok(Err(f)) => return Err((f.message, f.diagnostics)),
        Err(e) => return Err(plain(format!("the build task failed: {e}"))),
    };
    // An ESP image without the update client would be the last one its board takes over
    // the air: refuse it rather than store it.
    if personal_to.is_some() && !crate::setup::has_update_client(&compiled.binary) {
        return Err(plain(format!(
            "the update client is not in the built image (the wrap of setup()/loop() did not apply for {}); \
             the firmware was not stored, since a board could never update again after installing it",
            build.fqbn
        )));
    }
    if let Some(device) = &device {
        fits_the_slot(compiled.binary.len(), device.telemetry.free_space).map_err(plain)?;
    }
    let Some(product) = build.product_id else {
        let _ = state
            .store()
            .append_build_log(build.id, "compiled only: nothing was stored or assigned\n")
            .await;
        return Ok((compiled.diagnostics, None));
    };
    // Shared, not copied: the merged image below reads the same bytes.
    let binary = bytes::Bytes::from(compiled.binary);
    let firmware = state
        .store_firmware_for(
            product,
            binary.clone(),
            Some(format!("build-{}", build.id)),
            personal_to,
        )
        .await
        .map_err(|e| plain(e.into_message()))?;
    let _ = state
        .store()
        .append_build_log(
            build.id,
            &format!(
                "firmware build-{} stored ({} bytes, md5 {})\n",
                build.id, firmware.size, firmware.md5
            ),
        )
        .await;
    // A setup build is flashed once by wire: its merged image (or bootloader, partition
    // table and application) is kept with the build.
    if build.files.contains_key(crate::setup::SETUP_SKETCH_FILE) && !compiled.images.is_empty() {
        let mut images = compiled.images;
        match crate::setup::merged_image(&images, &binary) {
            Ok(Some(merged)) => {
                images.push(("merged.bin".to_string(), merged));
                let _ = state
                    .store()
                    .append_build_log(
                        build.id,
                        "merged.bin made from the bootloader, the partition table and the application\n",
                    )
                    .await;
            }
            Ok(None) => {}
            Err(e) => {
                let _ = state
                    .store()
                    .append_build_log(build.id, &format!("no merged image: {e}\n"))
                    .await;
            }
        }
        let kept = state
            .keep_build_images(build.id, images)
            .await
            .map_err(|e| plain(e.into_message()))?;
        let names: Vec<String> = kept
            .iter()
            .map(|i| format!("{} ({} bytes)", i.name, i.size))
            .collect();
        let _ = state
            .store()
            .append_build_log(
                build.id,
                &format!("kept for flashing by wire: {}\n", names.join(", ")),
            )
            .await;
    }
    if let Some(device) = &device {
        state
            .store()
            .set_device_firmware(device.id, Some(firmware.id))
            .await
            .map_err(|e| plain(crate::error::ApiError::from(e).into_message()))?;
        state.changed_device(device.product_id, &device.serial);
        let _ = state
            .store()
            .append_build_log(
                build.id,
                &format!(
                    "assigned to {}: served on its firmware link\n",
                    device.serial
                ),
            )
            .await;
    }
    Ok((compiled.diagnostics, Some(firmware.id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_must_fit_the_reported_slot() {
        assert!(fits_the_slot(1000, Some(1000)).is_ok());
        assert!(fits_the_slot(1000, None).is_ok());
        let e = fits_the_slot(1_310_721, Some(1_310_720)).unwrap_err();
        assert!(e.contains("1310721") && e.contains("1310720"), "{e}");
    }

    #[test]
    fn layouts_without_ota_are_refused() {
        assert_eq!(
            no_ota_partition_scheme("esp32:esp32:esp32:PartitionScheme=huge_app"),
            Some("huge_app")
        );
        assert_eq!(
            no_ota_partition_scheme("esp32:esp32:esp32:FlashSize=4M,PartitionScheme=no_ota"),
            Some("no_ota")
        );
        assert_eq!(
            no_ota_partition_scheme("esp32:esp32:esp32s3:PartitionScheme=noota_3g"),
            Some("noota_3g")
        );
        assert_eq!(
            no_ota_partition_scheme("esp32:esp32:esp32:PartitionScheme=default"),
            None
        );
        assert_eq!(no_ota_partition_scheme("esp32:esp32:esp32"), None);
        let files = BTreeMap::from([
            ("blink.ino".to_string(), String::new()),
            ("sketch.ino".to_string(), String::new()),
        ]);
        let e = check_sketch("esp32:esp32:esp32", &files).unwrap_err();
        assert!(e.message.contains("sketch.ino"), "{}", e.message);
        let e = check_sketch(
            "esp32:esp32:esp32:PartitionScheme=huge_app",
            &BTreeMap::from([("a.ino".to_string(), String::new())]),
        )
        .unwrap_err();
        assert!(e.message.contains("huge_app"), "{}", e.message);
    }
}
