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
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Operator;
use crate::core::fleet::{DeviceChange, DeviceSpec, GroupChange, check_name};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::openapi::{Binary, Refusals};
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
        .route(
            "/api/v1/products/{product}/devices/import",
            post(import_devices),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/api/v1/openapi.json", get(crate::openapi::document))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/server", get(server_status))
        .route("/api/v1/tokens", get(list_tokens))
        .route(
            "/api/v1/tokens/{token}",
            axum::routing::delete(revoke_token),
        )
        .route("/api/v1/users", get(list_operators).post(create_operator))
        .route(
            "/api/v1/users/{user}",
            axum::routing::patch(change_operator).delete(delete_operator),
        )
        .route("/api/v1/products", get(list_products).post(create_product))
        .route(
            "/api/v1/products/{product}",
            get(get_product).patch(patch_product).delete(delete_product),
        )
        .route("/api/v1/products/{product}/rotate-key", post(rotate_key))
        .route(
            "/api/v1/products/{product}/artifact-keys",
            axum::routing::put(set_artifact_keys),
        )
        .route(
            "/api/v1/products/{product}/firmware-keys",
            axum::routing::put(set_firmware_keys),
        )
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
            "/api/v1/products/{product}/devices/bulk",
            post(bulk_devices),
        )
        .route(
            "/api/v1/products/{product}/devices/export",
            get(export_devices),
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

fn created<T: Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ---- auth ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Login {
    username: String,
    password: String,
    /// Days the token lives (default 30, at most 365).
    #[schema(minimum = 1, maximum = 365)]
    expires_in_days: Option<i64>,
}

/// A new bearer token, shown once.
#[derive(Serialize, ToSchema)]
pub struct LoginAnswer {
    token: String,
    username: String,
    expires_at: Millis,
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "tokens", request_body = Login,
    responses((status = 201, body = LoginAnswer), Refusals))]
pub async fn login(
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
    Ok(created(LoginAnswer {
        token,
        username: user.username,
        expires_at,
    }))
}

#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = [TokenInfo]), Refusals))]
pub async fn list_tokens(
    State(state): State<AppState>,
    op: Operator,
) -> ApiResult<Json<Vec<TokenInfo>>> {
    Ok(Json(state.list_tokens(&op.0).await?))
}

#[utoipa::path(delete, path = "/api/v1/tokens/{token}", tag = "tokens", security(("bearer" = [])),
    params(("token" = String, Path, description = "the token's id from the list")),
    responses((status = 204, description = "revoked"), Refusals))]
pub async fn revoke_token(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Response> {
    state.revoke_token(&op.0, op.1, &id).await?;
    Ok(no_content())
}

// ---- operator accounts ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOperatorBody {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$"
    )]
    username: String,
    #[schema(min_length = 1, max_length = 128)]
    password: String,
    /// admin, operator (default) or viewer.
    role: Option<Role>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperatorPatch {
    role: Option<Role>,
    /// A new password; the account's browser sessions end.
    #[schema(min_length = 1, max_length = 128)]
    password: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/users", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, body = [User]), Refusals))]
pub async fn list_operators(
    State(state): State<AppState>,
    _op: Operator,
) -> ApiResult<Json<Vec<User>>> {
    Ok(Json(state.list_operators().await?))
}

#[utoipa::path(post, path = "/api/v1/users", tag = "accounts", security(("bearer" = [])),
    request_body = NewOperatorBody, responses((status = 201, body = User), Refusals))]
pub async fn create_operator(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(body): ApiJson<NewOperatorBody>,
) -> ApiResult<Response> {
    let user = state
        .create_operator(
            &op.actor()?,
            &body.username,
            &body.password,
            body.role.unwrap_or(Role::Operator),
        )
        .await?;
    Ok(created(user))
}

#[utoipa::path(patch, path = "/api/v1/users/{user}", tag = "accounts", security(("bearer" = [])),
    params(("user" = i64, Path)), request_body = OperatorPatch,
    responses((status = 200, body = User), Refusals))]
pub async fn change_operator(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(user): ApiPath<Id>,
    ApiJson(body): ApiJson<OperatorPatch>,
) -> ApiResult<Json<User>> {
    Ok(Json(
        state
            .change_operator(&op.actor()?, user, body.role, body.password.as_deref())
            .await?,
    ))
}

#[utoipa::path(delete, path = "/api/v1/users/{user}", tag = "accounts", security(("bearer" = [])),
    params(("user" = i64, Path)), responses((status = 204, description = "deleted"), Refusals))]
pub async fn delete_operator(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(user): ApiPath<Id>,
) -> ApiResult<Response> {
    state.delete_operator(&op.actor()?, user).await?;
    Ok(no_content())
}

// ---- products ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProductBody {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$"
    )]
    name: String,
}

/// A product; `api_key` only in the answer that made it (creation, key rotation).
#[derive(Serialize, ToSchema)]
pub struct ProductBody {
    id: Id,
    name: String,
    default_group_id: Id,
    created_at: Millis,
    /// Public keys (PEM) its Linux artifacts must be signed with; empty: not required.
    artifact_keys: Vec<String>,
    /// Key digests its firmware must be signed with (Secure Boot V2); empty: not required.
    firmware_keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<String>,
}

impl ProductBody {
    fn new(product: Product, api_key: Option<String>) -> Self {
        ProductBody {
            id: product.id,
            name: product.name,
            default_group_id: product.default_group_id,
            created_at: product.created_at,
            artifact_keys: product.artifact_keys,
            firmware_keys: product.firmware_keys,
            api_key,
        }
    }
}

#[utoipa::path(post, path = "/api/v1/products", tag = "products", security(("bearer" = [])),
    request_body = NewProductBody, responses((status = 201, body = ProductBody), Refusals))]
pub async fn create_product(
    State(state): State<AppState>,
    op: Operator,
    ApiJson(body): ApiJson<NewProductBody>,
) -> ApiResult<Response> {
    let (product, key) = state.create_product(&op.actor()?, &body.name).await?;
    Ok(created(ProductBody::new(product, Some(key))))
}

#[utoipa::path(get, path = "/api/v1/products", tag = "products", security(("bearer" = [])),
    responses((status = 200, body = [ProductBody]), Refusals))]
pub async fn list_products(
    State(state): State<AppState>,
    _op: Operator,
) -> ApiResult<Json<Vec<ProductBody>>> {
    let products = state.store().list_products().await?;
    Ok(Json(
        products
            .into_iter()
            .map(|p| ProductBody::new(p, None))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/v1/products/{product}", tag = "products", security(("bearer" = [])),
    params(("product" = i64, Path)), responses((status = 200, body = ProductBody), Refusals))]
pub async fn get_product(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<ProductBody>> {
    Ok(Json(ProductBody::new(
        state.store().get_product(product).await?,
        None,
    )))
}

/// Renames the product (its name is the body's, as at creation).
#[utoipa::path(patch, path = "/api/v1/products/{product}", tag = "products",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = NewProductBody,
    responses((status = 200, body = ProductBody), Refusals))]
pub async fn patch_product(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewProductBody>,
) -> ApiResult<Json<ProductBody>> {
    let product = state
        .rename_product(&op.actor()?, product, &body.name)
        .await?;
    Ok(Json(ProductBody::new(product, None)))
}

#[utoipa::path(post, path = "/api/v1/products/{product}/rotate-key", tag = "products",
    security(("bearer" = [])), params(("product" = i64, Path)),
    responses((status = 200, body = ProductBody), Refusals))]
pub async fn rotate_key(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<ProductBody>> {
    let (product, key) = state.rotate_product_key(&op.actor()?, product).await?;
    Ok(Json(ProductBody::new(product, Some(key))))
}

/// The keys a product's Mender artifacts must be signed with (`manifest.sig`).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactKeysBody {
    /// RSA, ECDSA P-256 or Ed25519 public keys in PEM; empty: signatures are reported, not
    /// required.
    #[schema(max_items = 16)]
    keys: Vec<String>,
}

#[utoipa::path(put, path = "/api/v1/products/{product}/artifact-keys", tag = "products",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = ArtifactKeysBody,
    responses((status = 200, body = ProductBody), Refusals))]
pub async fn set_artifact_keys(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<ArtifactKeysBody>,
) -> ApiResult<Json<ProductBody>> {
    let product = state
        .set_artifact_keys(&op.actor()?, product, body.keys)
        .await?;
    Ok(Json(ProductBody::new(product, None)))
}

/// A key digest: the SHA-256 of a public key, 64 hex digits.
#[derive(Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, pattern = r"^[0-9A-Fa-f]{64}$")]
pub struct KeyDigest(String);

/// The key digests a product's firmware must be signed with.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FirmwareKeysBody {
    /// Hex SHA-256 digests of the public keys (`espsecure digest-sbv2-public-key`); empty:
    /// signatures are checked when present, not required.
    #[schema(max_items = 16)]
    digests: Vec<KeyDigest>,
}

#[utoipa::path(put, path = "/api/v1/products/{product}/firmware-keys", tag = "products",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = FirmwareKeysBody,
    responses((status = 200, body = ProductBody), Refusals))]
pub async fn set_firmware_keys(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<FirmwareKeysBody>,
) -> ApiResult<Json<ProductBody>> {
    let product = state
        .set_firmware_keys(
            &op.actor()?,
            product,
            body.digests.into_iter().map(|d| d.0).collect(),
        )
        .await?;
    Ok(Json(ProductBody::new(product, None)))
}

#[utoipa::path(delete, path = "/api/v1/products/{product}", tag = "products",
    security(("bearer" = [])), params(("product" = i64, Path)),
    responses((status = 204, description = "deleted with everything that belongs to it"), Refusals))]
pub async fn delete_product(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Response> {
    state.delete_product(&op.actor()?, product).await?;
    Ok(no_content())
}

// ---- groups ----

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGroupBody {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$"
    )]
    name: String,
}

#[utoipa::path(post, path = "/api/v1/products/{product}/groups", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = NewGroupBody,
    responses((status = 201, body = Group), Refusals))]
pub async fn create_group(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<NewGroupBody>,
) -> ApiResult<Response> {
    let group = state
        .create_group(&op.actor()?, product, &body.name)
        .await?;
    Ok(created(group))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/groups", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path)),
    responses((status = 200, body = [Group]), Refusals))]
pub async fn list_groups(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Json<Vec<Group>>> {
    state.store().get_product(product).await?;
    Ok(Json(state.store().list_groups(product).await?))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/groups/{group}", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path), ("group" = i64, Path)),
    responses((status = 200, body = Group), Refusals))]
pub async fn get_group(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Group>> {
    Ok(Json(state.store().get_group(product, group).await?))
}

/// `{"firmware_id": null}` unassigns; an absent field leaves the value as it is.
fn double_option<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// A change to a group; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupPatchBody {
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\s\u0000-\u001f\u007f-\u009f]([^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f])?$"
    )]
    name: Option<String>,
    /// `null` unassigns the firmware.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<i64>)]
    firmware_id: Option<Option<Id>>,
    /// The firmware for the group's devices of other chip families than `firmware_id`'s,
    /// one image per family (replaces the list): one release for ESP32, ESP8266 and Linux
    /// devices in one group.
    #[schema(max_items = 8)]
    other_firmware_ids: Option<Vec<Id>>,
    /// A JSON object, served to the group's devices by `/deviceapi/getconfig`.
    #[schema(value_type = Option<Object>)]
    config: Option<serde_json::Value>,
}

#[utoipa::path(patch, path = "/api/v1/products/{product}/groups/{group}", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path), ("group" = i64, Path)),
    request_body = GroupPatchBody, responses((status = 200, body = Group), Refusals))]
pub async fn patch_group(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    ApiJson(body): ApiJson<GroupPatchBody>,
) -> ApiResult<Json<Group>> {
    let change = GroupChange {
        name: body.name,
        firmware_id: body.firmware_id,
        other_firmware_ids: body.other_firmware_ids,
        config: body.config,
    };
    let group = state
        .change_group(&op.actor()?, product, group, change)
        .await?;
    Ok(Json(group))
}

#[utoipa::path(delete, path = "/api/v1/products/{product}/groups/{group}", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path), ("group" = i64, Path)),
    responses((status = 204, description = "deleted; its devices moved to Default"), Refusals))]
pub async fn delete_group(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    state.delete_group(&op.actor()?, product, group).await?;
    Ok(no_content())
}

// ---- resources ----

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ResourceQuery {
    /// The file name devices see.
    #[param(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\s/\\\u0000-\u001f\u007f-\u009f]([^/\\\u0000-\u001f\u007f-\u009f]*[^\s/\\\u0000-\u001f\u007f-\u009f])?$"
    )]
    name: String,
}

#[utoipa::path(post, path = "/api/v1/products/{product}/groups/{group}/resources", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path), ("group" = i64, Path), ResourceQuery),
    request_body(content = Binary, content_type = "application/octet-stream"),
    responses((status = 201, body = Resource), Refusals))]
pub async fn upload_resource(
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
        .add_resource(&op.actor()?, product, group, &query.name, bytes)
        .await?;
    Ok(created(resource))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/groups/{group}/resources", tag = "groups",
    security(("bearer" = [])), params(("product" = i64, Path), ("group" = i64, Path)),
    responses((status = 200, body = [Resource]), Refusals))]
pub async fn list_resources(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Vec<Resource>>> {
    state.store().get_group(product, group).await?;
    Ok(Json(state.store().list_resources(group).await?))
}

#[utoipa::path(delete, path = "/api/v1/products/{product}/groups/{group}/resources/{resource}",
    tag = "groups", security(("bearer" = [])),
    params(("product" = i64, Path), ("group" = i64, Path), ("resource" = i64, Path)),
    responses((status = 204, description = "deleted"), Refusals))]
pub async fn delete_resource(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, group, resource)): ApiPath<(Id, Id, Id)>,
) -> ApiResult<Response> {
    state
        .delete_resource(&op.actor()?, product, group, resource)
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

/// A device with its static firmware link.
#[derive(Serialize, ToSchema)]
pub struct DeviceBody {
    #[serde(flatten)]
    device: Device,
    /// The link that always serves the device's current firmware (HTTP Basic auth).
    firmware_url: String,
    has_password: bool,
}

impl DeviceBody {
    fn new(state: &AppState, device: Device) -> Self {
        DeviceBody {
            firmware_url: static_link(state, &device),
            has_password: device.password_hash.is_some(),
            device,
        }
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDeviceBody {
    #[schema(min_length = 1, max_length = 64, pattern = r"^[!-.0-~]+$")]
    serial: String,
    group_id: Option<Id>,
    /// The password of its static link.
    #[schema(min_length = 1, max_length = 128)]
    password: Option<String>,
    /// Default `verified`.
    status: Option<DeviceStatus>,
}

#[utoipa::path(post, path = "/api/v1/products/{product}/devices", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = NewDeviceBody,
    responses((status = 201, body = DeviceBody), Refusals))]
pub async fn create_device(
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
    let device = state.register_device(&op.actor()?, product, spec).await?;
    Ok(created(DeviceBody::new(&state, device)))
}

/// Which devices a list takes and in which order.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeviceListQuery {
    /// Items per page (1 to 1000; 100 unless given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    status: Option<DeviceStatus>,
    /// A group id.
    group: Option<Id>,
    /// Exactly this reported version.
    version: Option<String>,
    /// The chip family its check-ins announce: esp32, esp8266, w800, swupdate or mender.
    chip: Option<String>,
    /// Last check-in before this time (ms since 1970; never seen counts as before).
    seen_before: Option<Millis>,
    /// Last check-in at or after this time (ms since 1970).
    seen_after: Option<Millis>,
    /// Serials starting with this.
    #[param(max_length = 64)]
    serial_prefix: Option<String>,
    /// Serials containing this, any case.
    #[param(max_length = 64)]
    q: Option<String>,
    sort: Option<DeviceSort>,
    /// `desc` for the reverse order.
    #[param(pattern = "^(asc|desc)$")]
    order: Option<String>,
    /// Also count every device the filters take (`total`).
    count: Option<bool>,
}

impl DeviceListQuery {
    /// The store's query for one page (`limit + 1` rows, to see whether another follows).
    pub fn to_store(&self) -> ApiResult<(DeviceQuery, i64)> {
        let limit = crate::page::limit(self.limit)?;
        let descending = match self.order.as_deref() {
            None | Some("asc") => false,
            Some("desc") => true,
            Some(other) => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("order must be asc or desc, not {other:?}"),
                ));
            }
        };
        let query = DeviceQuery {
            status: self.status,
            group_id: self.group,
            version: self.version.clone(),
            chip: self.chip.clone(),
            seen_before: self.seen_before,
            seen_after: self.seen_after,
            serial_prefix: self.serial_prefix.clone(),
            search: self.q.clone(),
            sort: self.sort.unwrap_or_default(),
            descending,
            after: crate::page::decode(self.cursor.as_deref())?,
            limit: limit + 1,
        };
        Ok((query, limit))
    }
}

#[utoipa::path(get, path = "/api/v1/products/{product}/devices", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path), DeviceListQuery),
    responses((status = 200, body = crate::page::Page<DeviceBody>), Refusals))]
pub async fn list_devices(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiQuery(query): ApiQuery<DeviceListQuery>,
) -> ApiResult<Json<crate::page::Page<DeviceBody>>> {
    let count = query.count.unwrap_or(false);
    let (query, limit) = query.to_store()?;
    let page = state.device_page(product, &query, limit, count).await?;
    Ok(Json(page.map(|d| DeviceBody::new(&state, d))))
}

/// What the server holds in memory and how its report buffer keeps up.
#[derive(Serialize, ToSchema)]
pub struct ServerStatus {
    /// This node's name among those sharing the database (host, process id, a random tag).
    node: String,
    /// Whether this node is the one evaluating rollout gates now (exactly one is).
    evaluates_gates: bool,
    /// Devices the check-in path finds without reading the database.
    devices_in_memory: usize,
    /// The last write of buffered device reports.
    telemetry: crate::telemetry::FlushStats,
}

#[utoipa::path(get, path = "/api/v1/server", tag = "tokens", security(("bearer" = [])),
    responses((status = 200, body = ServerStatus), Refusals))]
pub async fn server_status(State(state): State<AppState>, _op: Operator) -> Json<ServerStatus> {
    Json(ServerStatus {
        node: state.inner.node.clone(),
        evaluates_gates: state
            .inner
            .gates_held
            .load(std::sync::atomic::Ordering::Relaxed),
        devices_in_memory: state.inner.catalog.devices_in_memory(),
        telemetry: state.inner.telemetry.stats(),
    })
}

/// The most an import may carry (a million rows with keys fit).
const IMPORT_LIMIT: u64 = 512 * 1024 * 1024;

#[utoipa::path(post, path = "/api/v1/products/{product}/devices/import", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path)),
    request_body(content = String, content_type = "text/csv",
        description = "a header line naming the columns (serial, and any of group, status, \
            password or token, password_hash, public_key), then one device a line; existing \
            serials are updated; any bad row refuses the whole file"),
    responses((status = 200, body = ImportOutcome), Refusals))]
pub async fn import_devices(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<ImportOutcome>> {
    let bytes = upload::read_limited(&headers, body, IMPORT_LIMIT).await?;
    Ok(Json(
        state.import_devices(&op.actor()?, product, &bytes).await?,
    ))
}

/// Which devices a bulk change takes: the filters of the device list.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceFilter {
    status: Option<DeviceStatus>,
    group: Option<Id>,
    version: Option<String>,
    /// esp32, esp8266, w800, swupdate or mender.
    chip: Option<String>,
    seen_before: Option<Millis>,
    seen_after: Option<Millis>,
    #[schema(max_length = 64)]
    serial_prefix: Option<String>,
    #[schema(max_length = 64)]
    q: Option<String>,
}

/// A change to every device a filter takes.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkBody {
    /// verify, block, disable, unverify (back to new), move (needs `group_id`) or delete.
    #[schema(pattern = "^(verify|block|disable|unverify|move|delete)$")]
    action: String,
    group_id: Option<Id>,
    #[serde(default)]
    filter: DeviceFilter,
    /// An empty filter takes every device only with this.
    #[serde(default)]
    all: bool,
}

/// How many devices a bulk change changed.
#[derive(Serialize, ToSchema)]
pub struct BulkOutcome {
    changed: u64,
}

#[utoipa::path(post, path = "/api/v1/products/{product}/devices/bulk", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path)), request_body = BulkBody,
    responses((status = 200, body = BulkOutcome), Refusals))]
pub async fn bulk_devices(
    State(state): State<AppState>,
    op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiJson(body): ApiJson<BulkBody>,
) -> ApiResult<Json<BulkOutcome>> {
    let change = crate::core::bulk::bulk_change(&body.action, body.group_id)?;
    let f = body.filter;
    let filter = DeviceQuery {
        status: f.status,
        group_id: f.group,
        version: f.version,
        chip: f.chip,
        seen_before: f.seen_before,
        seen_after: f.seen_after,
        serial_prefix: f.serial_prefix,
        search: f.q,
        ..DeviceQuery::default()
    };
    let changed = state
        .bulk_devices(&op.actor()?, product, &filter, body.all, change)
        .await?;
    Ok(Json(BulkOutcome { changed }))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/devices/export", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path)),
    responses((status = 200, content_type = "text/csv",
        description = "serial, group, status, version, last_seen, created_at: every device, \
            streamed in registration order", body = String), Refusals))]
pub async fn export_devices(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
) -> ApiResult<Response> {
    let product = state.store().get_product(product).await?;
    state.flush_telemetry().await?;
    let groups: std::collections::HashMap<Id, String> = state
        .store()
        .list_groups(product.id)
        .await?
        .into_iter()
        .map(|g| (g.id, g.name))
        .collect();
    let header = "serial,group,status,version,last_seen,created_at\n".to_string();
    let first = futures_util::stream::once(async move { Ok::<_, std::io::Error>(header) });
    let start = Some(DeviceQuery {
        sort: DeviceSort::Created,
        limit: 1000,
        ..DeviceQuery::default()
    });
    let pages = futures_util::stream::unfold(start, move |query| {
        let state = state.clone();
        let groups = groups.clone();
        async move {
            let mut query = query?;
            let rows = match state.store().device_page(product.id, &query).await {
                Ok(rows) => rows,
                Err(e) => return Some((Err(std::io::Error::other(e.to_string())), None)),
            };
            let mut out = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(Vec::new());
            for d in &rows {
                let _ = out.write_record([
                    d.serial.as_str(),
                    groups.get(&d.group_id).map(String::as_str).unwrap_or(""),
                    d.status.as_str(),
                    d.telemetry.version.as_deref().unwrap_or(""),
                    &d.telemetry
                        .last_seen
                        .map(|t| t.to_string())
                        .unwrap_or_default(),
                    &d.created_at.to_string(),
                ]);
            }
            let text = String::from_utf8(out.into_inner().unwrap_or_default()).unwrap_or_default();
            let next = (rows.len() as i64 == query.limit).then(|| {
                query.after = rows.last().map(|d| query.cursor_after(d));
                query
            });
            Some((Ok(text), next))
        }
    });
    use futures_util::StreamExt;
    let body = Body::from_stream(first.chain(pages));
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/csv; charset=utf-8".to_string(),
            ),
            (
                axum::http::header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}-devices.csv\"", product.name),
            ),
        ],
        body,
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/v1/products/{product}/devices/{serial}", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path), ("serial" = String, Path)),
    responses((status = 200, body = DeviceBody), Refusals))]
pub async fn get_device(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
) -> ApiResult<Json<DeviceBody>> {
    state.flush_telemetry().await?;
    let device = state.store().get_device(product, &serial).await?;
    Ok(Json(DeviceBody::new(&state, device)))
}

/// A change to a device; absent fields stay as they are.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatchBody {
    status: Option<DeviceStatus>,
    group_id: Option<Id>,
    /// `null` removes the password.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 128)]
    password: Option<Option<String>>,
}

#[utoipa::path(patch, path = "/api/v1/products/{product}/devices/{serial}", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path), ("serial" = String, Path)),
    request_body = DevicePatchBody, responses((status = 200, body = DeviceBody), Refusals))]
pub async fn patch_device(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    ApiJson(body): ApiJson<DevicePatchBody>,
) -> ApiResult<Json<DeviceBody>> {
    let change = DeviceChange {
        status: body.status,
        group_id: body.group_id,
        password: body.password,
    };
    let device = state
        .change_device(&op.actor()?, product, &serial, change)
        .await?;
    Ok(Json(DeviceBody::new(&state, device)))
}

#[utoipa::path(delete, path = "/api/v1/products/{product}/devices/{serial}", tag = "devices",
    security(("bearer" = [])), params(("product" = i64, Path), ("serial" = String, Path)),
    responses((status = 204, description = "deleted"), Refusals))]
pub async fn delete_device(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
) -> ApiResult<Response> {
    state.delete_device(&op.actor()?, product, &serial).await?;
    Ok(no_content())
}

// ---- firmware ----

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FirmwareQuery {
    /// The version, when the image does not carry one (raw and gzip uploads).
    #[param(min_length = 1, max_length = 31, pattern = r"^[!-~]([ -~]*[!-~])?$")]
    version: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/products/{product}/firmware", tag = "firmware",
    security(("bearer" = [])), params(("product" = i64, Path), FirmwareQuery),
    request_body(content = Binary, content_type = "application/octet-stream"),
    responses((status = 201, body = Firmware), Refusals))]
pub async fn upload_firmware(
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
        .upload_firmware(&op.actor()?, product, bytes, query.version)
        .await?;
    Ok(created(firmware))
}

/// A page of firmware, newest first, narrowed by what the images say.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FirmwareListQuery {
    /// Items per page (1 to 1000; 100 unless given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// The `next` of the previous page.
    cursor: Option<String>,
    /// Only this version.
    version: Option<String>,
    /// Only this image format (`esp32-app`, `esp8266-app`, `w800-xz`, `swu`, `mender`, ...).
    format: Option<String>,
    /// Only images for this chip (`esp32`, `esp32c3`, `esp8266`, ...).
    chip: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/products/{product}/firmware", tag = "firmware",
    security(("bearer" = [])), params(("product" = i64, Path), FirmwareListQuery),
    responses((status = 200, body = crate::page::Page<Firmware>), Refusals))]
pub async fn list_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(product): ApiPath<Id>,
    ApiQuery(query): ApiQuery<FirmwareListQuery>,
) -> ApiResult<Json<crate::page::Page<Firmware>>> {
    state.store().get_product(product).await?;
    let limit = crate::page::limit(query.limit)?;
    let before = crate::page::decode::<Id>(query.cursor.as_deref())?;
    let filter = otaforge_store::model::FirmwareFilter {
        version: query.version.filter(|v| !v.is_empty()),
        format: query.format.filter(|v| !v.is_empty()),
        chip: query.chip.filter(|v| !v.is_empty()),
    };
    let rows = state
        .store()
        .firmware_page(product, &filter, before, limit + 1)
        .await?;
    Ok(Json(crate::page::of(rows, limit, |f| f.id, |f| f)))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/firmware/{firmware}", tag = "firmware",
    security(("bearer" = [])), params(("product" = i64, Path), ("firmware" = i64, Path)),
    responses((status = 200, body = Firmware), Refusals))]
pub async fn get_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
) -> ApiResult<Json<Firmware>> {
    Ok(Json(state.store().get_firmware(product, firmware).await?))
}

#[utoipa::path(get, path = "/api/v1/products/{product}/firmware/{firmware}/download",
    tag = "firmware", security(("bearer" = [])),
    params(("product" = i64, Path), ("firmware" = i64, Path),
        ("Range" = Option<String>, Header, pattern = r"^bytes=([0-9]+-[0-9]*|-[0-9]+)$",
            description = "bytes=START-END, bytes=START- or bytes=-LENGTH")),
    responses(
        (status = 200, body = Binary, content_type = "application/octet-stream"),
        (status = 206, body = Binary, content_type = "application/octet-stream"),
        (status = 416, body = String, content_type = "text/plain"),
        Refusals))]
pub async fn download_firmware(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (firmware, part) = state
        .firmware_part(product, firmware, delivery::range_header(&headers)?)
        .await?;
    let filename = format!("firmware-{}.bin", firmware.version);
    Ok(delivery::render(
        part,
        firmware.size.max(0) as u64,
        &delivery::Delivery::of(&firmware, &filename),
    ))
}

#[utoipa::path(delete, path = "/api/v1/products/{product}/firmware/{firmware}", tag = "firmware",
    security(("bearer" = [])), params(("product" = i64, Path), ("firmware" = i64, Path)),
    responses((status = 204, description = "deleted"), Refusals))]
pub async fn delete_firmware(
    State(state): State<AppState>,
    op: Operator,
    ApiPath((product, firmware)): ApiPath<(Id, Id)>,
) -> ApiResult<Response> {
    state
        .delete_firmware(&op.actor()?, product, firmware)
        .await?;
    Ok(no_content())
}
