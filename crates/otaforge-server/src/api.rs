//! The management REST API (`/api/v1`), JSON in and out, bearer-token auth on every route
//! but login and the OpenAPI document.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use otaforge_store::model::*;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Operator;
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
        .route("/api/v1/tokens", get(list_tokens))
        .route(
            "/api/v1/tokens/{token}",
            axum::routing::delete(revoke_token),
        )
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

use crate::core::fleet::{DeviceChange, DeviceSpec, GroupChange, check_name};

// ---- auth ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
    /// Days the token lives (default 30, at most 365).
    expires_in_days: Option<i64>,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    ApiJson(body): ApiJson<Login>,
) -> ApiResult<Response> {
    use crate::core::accounts::SignInRefusal;
    use crate::core::passwords::Refused;
    let user = match state
        .sign_in_operator(&body.username, &body.password, peer.ip())
        .await?
    {
        Ok(user) => user,
        Err(refusal) => {
            let status = match refusal {
                SignInRefusal::Refused(Refused::RateLimited) => StatusCode::TOO_MANY_REQUESTS,
                SignInRefusal::Refused(Refused::Busy) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::UNAUTHORIZED,
            };
            return Err(ApiError::new(status, refusal.message()));
        }
    };
    let (token, expires_at) = state.issue_token(&user, body.expires_in_days).await?;
    Ok(created(
        json!({ "token": token, "username": user.username, "expires_at": expires_at }),
    ))
}

async fn list_tokens(State(state): State<AppState>, op: Operator) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.list_tokens(&op.actor()).await?)))
}

async fn revoke_token(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    state.revoke_token(&op.actor(), &id).await?;
    Ok(no_content())
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
    op: Operator,
    ApiJson(body): ApiJson<NewProductBody>,
) -> ApiResult<Response> {
    let (product, key) = state.create_product(&op.actor(), &body.name).await?;
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
    op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Value>> {
    let (product, key) = state.rotate_product_key(&op.actor(), product).await?;
    Ok(Json(product_json(&product, Some(&key))))
}

async fn delete_product(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Response> {
    state.delete_product(&op.actor(), product).await?;
    Ok(no_content())
}

// ---- groups ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroupBody {
    name: String,
}

async fn create_group(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewGroupBody>,
) -> ApiResult<Response> {
    let group = state.create_group(&op.actor(), product, &body.name).await?;
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
    op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    ApiJson(body): ApiJson<GroupPatchBody>,
) -> ApiResult<Json<Value>> {
    let change = GroupChange {
        name: body.name,
        firmware_id: body.firmware_id,
        config: body.config,
    };
    let group = state
        .change_group(&op.actor(), product, group, change)
        .await?;
    Ok(Json(json!(group)))
}

async fn delete_group(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    state.delete_group(&op.actor(), product, group).await?;
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
    op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    ApiQuery(query): ApiQuery<ResourceQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    check_name("name", &query.name)?;
    state.store().get_group(product, group).await?;
    let bytes = upload::read_limited(&headers, body, state.config().max_upload_bytes).await?;
    let resource = state
        .add_resource(&op.actor(), product, group, &query.name, bytes)
        .await?;
    Ok(created(json!(resource)))
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
    op: Operator,
    ApiPath((product, group, resource)): ApiPath<(Id, Id, Id)>,
) -> ApiResult<Response> {
    state
        .delete_resource(&op.actor(), product, group, resource)
        .await?;
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

async fn create_device(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewDeviceBody>,
) -> ApiResult<Response> {
    let spec = DeviceSpec {
        serial: body.serial,
        group_id: body.group_id,
        password: body.password,
        status: body.status.unwrap_or(DeviceStatus::Verified),
    };
    let device = state.register_device(&op.actor(), product, spec).await?;
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
    op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    ApiJson(body): ApiJson<DevicePatchBody>,
) -> ApiResult<Json<Value>> {
    let change = DeviceChange {
        status: body.status,
        group_id: body.group_id,
        password: body.password,
    };
    let device = state
        .change_device(&op.actor(), product, &serial, change)
        .await?;
    Ok(Json(device_json(&state, &device)))
}

async fn delete_device(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
) -> ApiResult<Response> {
    state.delete_device(&op.actor(), product, &serial).await?;
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
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiQuery(query): ApiQuery<FirmwareQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    state.store().get_product(product).await?;
    let bytes = upload::read_limited(&headers, body, state.config().max_upload_bytes).await?;
    let firmware = state
        .upload_firmware(&op.actor(), product, bytes, query.version)
        .await?;
    Ok(created(json!(firmware)))
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
    op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    state
        .delete_firmware(&op.actor(), product, firmware)
        .await?;
    Ok(no_content())
}
