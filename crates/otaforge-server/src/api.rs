//! The management REST API (`/api/v1`), JSON in and out, bearer-token auth on every route
//! but login and the OpenAPI document.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use otaforge_store::model::*;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{Operator, digest, hash_password, random_secret, verify_password};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::{AppState, delivery, upload};

pub fn routes() -> Router<AppState> {
    let uploads = Router::new()
        .route(
            "/api/v1/products/{product}/firmware",
            get(list_firmware).post(upload_firmware),
        )
        .route(
            "/api/v1/products/{product}/groups/{group}/resources",
            get(list_resources).post(upload_resource),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/api/v1/openapi.json", get(crate::openapi::document))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/products", get(list_products).post(create_product))
        .route(
            "/api/v1/products/{product}",
            get(get_product).delete(delete_product),
        )
        .route("/api/v1/products/{product}/rotate-key", post(rotate_key))
        .route(
            "/api/v1/products/{product}/groups",
            get(list_groups).post(create_group),
        )
        .route(
            "/api/v1/products/{product}/groups/{group}",
            get(get_group).patch(patch_group).delete(delete_group),
        )
        .route(
            "/api/v1/products/{product}/groups/{group}/resources/{resource}",
            axum::routing::delete(delete_resource),
        )
        .route(
            "/api/v1/products/{product}/devices",
            get(list_devices).post(create_device),
        )
        .route(
            "/api/v1/products/{product}/devices/{serial}",
            get(get_device).patch(patch_device).delete(delete_device),
        )
        .route(
            "/api/v1/products/{product}/firmware/{firmware}",
            get(get_firmware).delete(delete_firmware),
        )
        .route(
            "/api/v1/products/{product}/firmware/{firmware}/download",
            get(download_firmware),
        )
        .merge(uploads)
        .layer(DefaultBodyLimit::max(1024 * 1024))
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// Names must be non-empty, at most 100 characters, with no control characters.
fn check_name(what: &str, name: &str) -> ApiResult<String> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{what} must be 1 to 100 printable characters"),
        ));
    }
    Ok(name.to_string())
}

/// Serials are what devices send: printable ASCII without spaces or `/`, at most 64 bytes.
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

// ---- auth ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Login>,
) -> ApiResult<Response> {
    let store = state.store();
    let user = store.user_by_name(&body.username).await?;
    let ok = match &user {
        Some(user) => {
            let (password, phc) = (body.password.clone(), user.password_hash.clone());
            tokio::task::spawn_blocking(move || verify_password(&password, &phc))
                .await
                .unwrap_or(false)
        }
        None => false,
    };
    let user = match (ok, user) {
        (true, Some(user)) => user,
        _ => return Err(ApiError::unauthorized("wrong username or password")),
    };
    let token = random_secret()?;
    store.create_token(&digest(&token), user.id).await?;
    Ok(created(
        json!({ "token": token, "username": user.username }),
    ))
}

// ---- products ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProductBody {
    name: String,
}

fn product_json(product: &Product, api_key: Option<&str>) -> Value {
    let mut v = json!({
        "id": product.id,
        "name": product.name,
        "default_group_id": product.default_group_id,
        "created_at": product.created_at,
    });
    if let Some(key) = api_key {
        v["api_key"] = json!(key);
    }
    v
}

async fn create_product(
    State(state): State<AppState>,
    _op: Operator,
    ApiJson(body): ApiJson<NewProductBody>,
) -> ApiResult<Response> {
    let name = check_name("name", &body.name)?;
    let key = random_secret()?;
    let product = state.store().create_product(&name, &digest(&key)).await?;
    state.inner.catalog.invalidate();
    let _ = state
        .store()
        .audit(&_op.0.username, "created product", &name, "")
        .await;
    Ok(created(product_json(&product, Some(&key))))
}

async fn list_products(State(state): State<AppState>, _op: Operator) -> ApiResult<Json<Value>> {
    let products = state.store().list_products().await?;
    Ok(Json(Value::Array(
        products.iter().map(|p| product_json(p, None)).collect(),
    )))
}

async fn get_product(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    Ok(Json(product_json(
        &state.store().get_product(product).await?,
        None,
    )))
}

async fn rotate_key(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    let key = random_secret()?;
    let product = state
        .store()
        .set_product_key(product, &digest(&key))
        .await?;
    state.inner.catalog.invalidate();
    Ok(Json(product_json(&product, Some(&key))))
}

async fn delete_product(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Response> {
    let store = state.store();
    let firmware = store.list_firmware(product).await?;
    let mut resources = Vec::new();
    for group in store.list_groups(product).await? {
        resources.extend(store.list_resources(group.id).await?);
    }
    store.delete_product(product).await?;
    state.inner.catalog.invalidate();
    for sha in firmware
        .iter()
        .map(|f| &f.sha256)
        .chain(resources.iter().map(|r| &r.sha256))
    {
        release_blob(&state, sha).await;
    }
    Ok(no_content())
}

/// Deletes a blob no row refers to any more. Failures only leave garbage, never break data.
async fn release_blob(state: &AppState, sha256: &str) {
    match state.store().blob_in_use(sha256).await {
        Ok(false) => {
            if let Err(e) = state.inner.blobs.delete(sha256).await {
                tracing::warn!(error = %e, sha256, "could not delete an unused blob");
            }
        }
        Ok(true) => {}
        Err(e) => tracing::warn!(error = %e, sha256, "could not check whether a blob is in use"),
    }
}

// ---- groups ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroupBody {
    name: String,
}

async fn create_group(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewGroupBody>,
) -> ApiResult<Response> {
    let name = check_name("name", &body.name)?;
    let group = state.store().create_group(product, &name).await?;
    state.inner.catalog.invalidate();
    Ok(created(json!(group)))
}

async fn list_groups(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    state.store().get_product(product).await?;
    Ok(Json(json!(state.store().list_groups(product).await?)))
}

async fn get_group(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.store().get_group(product, group).await?)))
}

/// `{"firmware_id": null}` unassigns; an absent field leaves the value as it is.
fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupPatchBody {
    name: Option<String>,
    #[serde(default, deserialize_with = "double_option")]
    firmware_id: Option<Option<Id>>,
    config: Option<Value>,
}

async fn patch_group(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    ApiJson(body): ApiJson<GroupPatchBody>,
) -> ApiResult<Json<Value>> {
    let name = body
        .name
        .as_deref()
        .map(|n| check_name("name", n))
        .transpose()?;
    if let Some(config) = &body.config
        && !config.is_object()
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "config must be a JSON object",
        ));
    }
    let patch = GroupPatch {
        name,
        firmware_id: body.firmware_id,
        config: body.config,
    };
    let group = state.store().update_group(product, group, patch).await?;
    state.inner.catalog.invalidate();
    let _ = state
        .store()
        .audit(
            &_op.0.username,
            "changed group",
            &format!("group {}", group.name),
            &format!("firmware {:?}", group.firmware_id),
        )
        .await;
    Ok(Json(json!(group)))
}

async fn delete_group(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    let resources = state
        .store()
        .list_resources(group)
        .await
        .unwrap_or_default();
    state.store().delete_group(product, group).await?;
    state.inner.catalog.invalidate();
    for r in resources {
        release_blob(&state, &r.sha256).await;
    }
    Ok(no_content())
}

// ---- resources ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceQuery {
    name: String,
}

async fn upload_resource(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    ApiQuery(query): ApiQuery<ResourceQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let name = check_name("name", &query.name)?;
    if name.contains('/') || name.contains('\\') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "a resource name is a file name, without '/' or '\\'",
        ));
    }
    state.store().get_group(product, group).await?;
    let bytes = upload::read_limited(&headers, body, state.config().max_upload_bytes).await?;
    let sums = upload::digests(&bytes);
    state
        .inner
        .blobs
        .put(&sums.sha256, bytes.clone())
        .await
        .map_err(|e| ApiError::internal("storing a resource", e))?;
    let result = state
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
            state.inner.catalog.invalidate();
            Ok(created(json!(resource)))
        }
        Err(e) => {
            release_blob(&state, &sums.sha256).await;
            Err(e.into())
        }
    }
}

async fn list_resources(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Value>> {
    state.store().get_group(product, group).await?;
    Ok(Json(json!(state.store().list_resources(group).await?)))
}

async fn delete_resource(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group, resource)): ApiPath<(Id, Id, Id)>,
) -> ApiResult<Response> {
    state.store().get_group(product, group).await?;
    let gone = state.store().delete_resource(group, resource).await?;
    release_blob(&state, &gone.sha256).await;
    Ok(no_content())
}

// ---- devices ----

pub fn static_link(state: &AppState, device: &Device) -> String {
    format!(
        "{}/ota/{}/{}",
        state.config().public_url(),
        device.product_id,
        device.serial
    )
}

fn device_json(state: &AppState, device: &Device) -> Value {
    let mut v = json!(device);
    v["firmware_url"] = json!(static_link(state, device));
    v["has_password"] = json!(device.password_hash.is_some());
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDeviceBody {
    serial: String,
    group_id: Option<Id>,
    password: Option<String>,
    status: Option<DeviceStatus>,
}

fn check_password(password: &str) -> ApiResult<()> {
    if password.is_empty() || password.len() > 128 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "password must be 1 to 128 bytes",
        ));
    }
    Ok(())
}

async fn hash_off_thread(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| ApiError::internal("hashing", e))?
}

async fn create_device(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewDeviceBody>,
) -> ApiResult<Response> {
    let serial = check_serial(&body.serial)?;
    let password_hash = match body.password {
        Some(p) => {
            check_password(&p)?;
            Some(hash_off_thread(p).await?)
        }
        None => None,
    };
    let device = state
        .store()
        .create_device(NewDevice {
            product_id: product,
            group_id: body.group_id,
            serial,
            status: body.status.unwrap_or(DeviceStatus::Verified),
            password_hash,
        })
        .await?;
    state.inner.catalog.invalidate();
    Ok(created(device_json(&state, &device)))
}

async fn list_devices(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    state.store().get_product(product).await?;
    // Reports still in the buffer are part of what the server knows.
    state.flush_telemetry().await?;
    let devices = state.store().list_devices(product).await?;
    Ok(Json(Value::Array(
        devices.iter().map(|d| device_json(&state, d)).collect(),
    )))
}

async fn get_device(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
) -> ApiResult<Json<Value>> {
    state.flush_telemetry().await?;
    let device = state.store().get_device(product, &serial).await?;
    Ok(Json(device_json(&state, &device)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicePatchBody {
    status: Option<DeviceStatus>,
    group_id: Option<Id>,
    #[serde(default, deserialize_with = "double_option")]
    password: Option<Option<String>>,
}

async fn patch_device(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    ApiJson(body): ApiJson<DevicePatchBody>,
) -> ApiResult<Json<Value>> {
    let password_hash = match body.password {
        Some(Some(p)) => {
            check_password(&p)?;
            Some(Some(hash_off_thread(p).await?))
        }
        Some(None) => Some(None),
        None => None,
    };
    let patch = DevicePatch {
        status: body.status,
        group_id: body.group_id,
        password_hash,
    };
    let device = state.store().update_device(product, &serial, patch).await?;
    state.inner.catalog.invalidate();
    let _ = state
        .store()
        .audit(
            &_op.0.username,
            "changed device",
            &format!("device {serial}"),
            device.status.as_str(),
        )
        .await;
    Ok(Json(device_json(&state, &device)))
}

async fn delete_device(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
) -> ApiResult<Response> {
    state.store().delete_device(product, &serial).await?;
    state.inner.catalog.invalidate();
    Ok(no_content())
}

// ---- firmware ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FirmwareQuery {
    version: Option<String>,
}

async fn upload_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiQuery(query): ApiQuery<FirmwareQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    state.store().get_product(product).await?;
    let bytes = upload::read_limited(&headers, body, state.config().max_upload_bytes).await?;
    let firmware = state.store_firmware(product, bytes, query.version).await?;
    Ok(created(json!(firmware)))
}

impl AppState {
    /// Checks firmware bytes, stores the blob and the row: all of it or nothing. The version
    /// is `version`, or else what the image declares.
    pub async fn store_firmware(
        &self,
        product: Id,
        bytes: bytes::Bytes,
        version: Option<String>,
    ) -> ApiResult<Firmware> {
        let described = upload::describe(&bytes)?;
        let version = match (version, described.version) {
            (Some(v), _) => v,
            (None, Some(v)) => v,
            (None, None) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "the file is a {} image that carries no version; pass ?version=V",
                        described.format
                    ),
                ));
            }
        };
        let version = version.trim().to_string();
        if version.is_empty() || version.len() > 31 || version.chars().any(|c| c.is_control()) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "version must be 1 to 31 printable characters",
            ));
        }
        let sums = upload::digests(&bytes);
        self.inner
            .blobs
            .put(&sums.sha256, bytes.clone())
            .await
            .map_err(|e| ApiError::internal("storing firmware", e))?;
        let result = self
            .store()
            .create_firmware(NewFirmware {
                product_id: product,
                version,
                size: bytes.len() as i64,
                md5: sums.md5,
                sha256: sums.sha256.clone(),
                format: described.format.to_string(),
                metadata: described.metadata,
            })
            .await;
        match result {
            Ok(firmware) => {
                self.inner.blob_cache.insert(&firmware.sha256, bytes);
                Ok(firmware)
            }
            Err(e) => {
                release_blob(self, &sums.sha256).await;
                Err(e.into())
            }
        }
    }
}

async fn list_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    state.store().get_product(product).await?;
    Ok(Json(json!(state.store().list_firmware(product).await?)))
}

async fn get_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(
        state.store().get_firmware(product, firmware).await?
    )))
}

async fn download_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let firmware = state.store().get_firmware(product, firmware).await?;
    let bytes = state
        .inner
        .blob_cache
        .get(&state.inner.blobs, &firmware.sha256)
        .await?;
    delivery::respond(
        &headers,
        bytes,
        &delivery::Delivery {
            md5: &firmware.md5,
            version: &firmware.version,
            sha256: &firmware.sha256,
            filename: &format!("firmware-{}.bin", firmware.version),
        },
    )
}

async fn delete_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    let found = state.store().get_firmware(product, firmware).await?;
    state.store().delete_firmware(product, firmware).await?;
    state.inner.catalog.invalidate();
    release_blob(&state, &found.sha256).await;
    Ok(no_content())
}
