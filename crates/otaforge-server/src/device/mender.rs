//! The Mender device API under `/api/devices/`, as mender-client 3.4 uses it. The tenant
//! token is the product's API key; a device signs its authentication request with its key
//! (bound on the first request), waits as New until an operator verifies it, then gets a
//! device token (JWT) it sends as `Bearer` on every other call. A deployment is the firmware
//! offered (its id); the artifact is downloaded from a signed, expiring link. The device says
//! what it runs (`artifact_name`) and its `device_type` on every `next`.
//!
//! Status table (`Answer` → wire): authentication: token 200 (text), pending or refused 401 ·
//! `next`: no or bad token 401 · not verified, blocked or disabled 401 (the client
//! authenticates again and waits) · nothing assigned, up to date, another family's or device
//! type's image 204 · offer 200 with the deployment · `status`, `log` 204 · inventory 200 ·
//! download 200 / 206 / 416 with `Content-Length`, a bad or expired link 403.

// Handlers answer refusals with a whole response, so `Result<_, Response>` is the natural shape.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use otaforge_protocol::UpdateResult;
use otaforge_store::model::{Id, Telemetry};
use serde::Deserialize;
use serde_json::json;

use super::{error_text, text};
use crate::AppState;
use crate::core::checkin::{Admitted, Answer, CheckIn, Identity, Offer, Unauthorized, Want};
use crate::core::device_auth::DeviceAuth;
use crate::decision::{Family, Mode, Running};
use crate::delivery;
use crate::extract::ApiPath;

const DEPLOYMENTS: &str = "/api/devices/v1/deployments/device/deployments";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/devices/v1/authentication/auth_requests",
            post(authenticate),
        )
        .route(
            "/api/devices/v2/deployments/device/deployments/next",
            post(next_v2),
        )
        .route(&format!("{DEPLOYMENTS}/next"), get(next_v1).post(next_v2))
        .route(&format!("{DEPLOYMENTS}/{{id}}/status"), put(status))
        .route(&format!("{DEPLOYMENTS}/{{id}}/log"), put(log))
        .route(
            "/api/devices/v1/inventory/device/attributes",
            put(inventory).patch(inventory),
        )
        .route(
            "/api/devices/v1/download/{device}/{firmware}",
            get(download),
        )
}

/// Bodies larger than this are refused.
const MAX_BODY: u64 = 256 * 1024;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

async fn body_bytes(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, Response> {
    crate::upload::read_limited(headers, body, MAX_BODY)
        .await
        .map_err(error_text)
}

fn json_of<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("the body is not the JSON this call takes: {e}"),
        )
    })
}

/// A JSON body of at most `MAX_BODY` bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    json_of(&body_bytes(headers, body).await?)
}

/// `POST /api/devices/v1/authentication/auth_requests`.
async fn authenticate(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let body = match body_bytes(&headers, body).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    #[derive(Deserialize)]
    struct TenantOnly {
        #[serde(default)]
        tenant_token: String,
    }
    let in_body: TenantOnly = match json_of(&body) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let tenant = bearer(&headers).unwrap_or(in_body.tenant_token.as_str());
    let Some(signature) = headers.get("x-men-signature").and_then(|v| v.to_str().ok()) else {
        return text(StatusCode::BAD_REQUEST, "X-MEN-Signature is missing");
    };
    match state
        .authenticate_device_key(tenant, &body, signature)
        .await
    {
        Ok(DeviceAuth::Token(token)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain")],
            token,
        )
            .into_response(),
        Ok(DeviceAuth::Pending) => text(
            StatusCode::UNAUTHORIZED,
            "the device is pending: an operator accepts it by verifying it",
        ),
        Ok(DeviceAuth::Refused(why)) => text(StatusCode::UNAUTHORIZED, &why),
        Err(e) => error_text(e),
    }
}

/// One check-in for this dialect.
#[allow(clippy::too_many_arguments)]
async fn check_in(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    want: Want<'_>,
    running: Option<&str>,
    device_type: Option<&str>,
    feedback: Option<&str>,
    closes: Option<Id>,
) -> Result<Answer, Response> {
    let req = CheckIn {
        identity: Identity::DeviceToken(bearer(headers)),
        peer: peer.ip(),
        running: Running {
            version: running,
            sketch_md5: None,
            by_md5: false,
        },
        remembered_running: running.is_none(),
        closes,
        tracks_actions: false,
        ends_action: None,
        mode: Mode::App,
        chip: Some(Family::Mender),
        device_type,
        report: Telemetry {
            version: running.map(str::to_string),
            ..Telemetry::default()
        },
        feedback,
        want,
    };
    state.check_in(req).await.map_err(error_text)
}

fn refusal(answer: &Answer) -> Option<Response> {
    match answer {
        Answer::Unauthorized(Unauthorized::Refused(r)) => Some(super::refused(*r)),
        Answer::Unauthorized(_) => Some(text(
            StatusCode::UNAUTHORIZED,
            "authenticate first: the device token is missing, expired or not this server's",
        )),
        Answer::NotAllowed(status) => Some(text(
            StatusCode::UNAUTHORIZED,
            &format!("device is {}; it may not update", status.as_str()),
        )),
        _ => None,
    }
}

fn deployment(state: &AppState, offer: &Offer) -> Response {
    let (firmware, device) = (&offer.firmware, offer.device);
    let uri = format!(
        "{}/api/devices/v1/download/{device}/{}?{}",
        state.config().public_url(),
        firmware.id,
        state.download_query(device, firmware.id)
    );
    let types = firmware
        .metadata
        .get("device_types")
        .cloned()
        .unwrap_or_else(|| json!([]));
    axum::Json(json!({
        "id": firmware.id.to_string(),
        "artifact": {
            "artifact_name": firmware.version,
            "device_types_compatible": types,
            "source": {"uri": uri},
        },
    }))
    .into_response()
}

async fn next(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    artifact_name: Option<&str>,
    device_type: Option<&str>,
) -> Response {
    let answer = match check_in(
        state,
        peer,
        headers,
        Want::FirmwareHead,
        artifact_name,
        device_type,
        None,
        None,
    )
    .await
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Some(r) = refusal(&answer) {
        return r;
    }
    match answer {
        Answer::Offer(offer) => deployment(state, &offer),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

#[derive(Deserialize)]
struct NextQuery {
    artifact_name: Option<String>,
    device_type: Option<String>,
}

/// `GET …/deployments/next?artifact_name=…&device_type=…` (v1).
async fn next_v1(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    next(
        &state,
        peer,
        &headers,
        q.artifact_name.as_deref(),
        q.device_type.as_deref(),
    )
    .await
}

/// `POST …/deployments/next` with `{"device_provides": {"artifact_name", "device_type"}}`.
async fn next_v2(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(Deserialize)]
    struct Next {
        device_provides: std::collections::HashMap<String, serde_json::Value>,
    }
    let next_body: Next = match read_json(&headers, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let get = |k: &str| next_body.device_provides.get(k).and_then(|v| v.as_str());
    next(
        &state,
        peer,
        &headers,
        get("artifact_name"),
        get("device_type"),
    )
    .await
}

/// `PUT …/deployments/{id}/status`: every state the client passes; `success`, `failure`
/// and `already-installed` end the deployment.
async fn status(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<Id>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(Deserialize)]
    struct Status {
        status: String,
        #[serde(default)]
        substate: Option<String>,
    }
    let status: Status = match read_json(&headers, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(product) = bearer(&headers)
        .and_then(|t| state.verify_device_token(t))
        .map(|c| c.product)
    else {
        return refusal(&Answer::Unauthorized(Unauthorized::WrongCredentials))
            .unwrap_or_else(|| StatusCode::UNAUTHORIZED.into_response());
    };
    let firmware = match state.store().get_firmware(product, id).await {
        Ok(f) => f,
        Err(e) => return error_text(e.into()),
    };
    let (running, said, closes) = match status.status.as_str() {
        "success" | "already-installed" => (
            Some(firmware.version.as_str()),
            UpdateResult::Installed {
                version: firmware.version.clone(),
            }
            .to_string(),
            None,
        ),
        "failure" | "aborted" | "decommissioned" => (
            None,
            UpdateResult::Failed {
                reason: format!("{} {}", firmware.version, status.status),
            }
            .to_string(),
            Some(firmware.id),
        ),
        other => (
            None,
            format!(
                "{} {other}{}",
                firmware.version,
                status
                    .substate
                    .as_deref()
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default()
            ),
            None,
        ),
    };
    match check_in(
        &state,
        peer,
        &headers,
        Want::Report,
        running,
        None,
        Some(&said),
        closes,
    )
    .await
    {
        Ok(Answer::Recorded(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(answer) => refusal(&answer).unwrap_or_else(|| StatusCode::NO_CONTENT.into_response()),
        Err(r) => r,
    }
}

/// The admitted device of a call that only reports.
async fn admitted(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<Admitted, Response> {
    match check_in(state, peer, headers, Want::Report, None, None, None, None).await? {
        Answer::Recorded(a) => Ok(*a),
        answer => Err(refusal(&answer).unwrap_or_else(|| StatusCode::UNAUTHORIZED.into_response())),
    }
}

/// `PUT …/deployments/{id}/log`: the deployment's log, kept on the device's timeline.
async fn log(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath(id): ApiPath<Id>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(Deserialize)]
    struct Log {
        messages: Vec<serde_json::Value>,
    }
    let log: Log = match read_json(&headers, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let caller = match admitted(&state, peer, &headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let lines: Vec<String> = log
        .messages
        .iter()
        .filter_map(|m| m.get("message").and_then(|t| t.as_str()))
        .map(str::to_string)
        .collect();
    match state
        .record_device_log(&caller, &format!("deployment {id}"), &lines)
        .await
    {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_text(e),
    }
}

/// `PUT`/`PATCH /api/devices/v1/inventory/device/attributes`: `[{"name", "value"}, ...]`.
async fn inventory(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(Deserialize)]
    struct Attribute {
        name: String,
        value: serde_json::Value,
    }
    let attributes: Vec<Attribute> = match read_json(&headers, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let caller = match admitted(&state, peer, &headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut merged = match caller.device.attributes.clone() {
        Some(serde_json::Value::Object(map)) => map,
        _ => serde_json::Map::new(),
    };
    for a in attributes {
        merged.insert(a.name, a.value);
    }
    match state
        .record_attributes(&caller, serde_json::Value::Object(merged))
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => error_text(e),
    }
}

#[derive(Deserialize)]
struct DownloadQuery {
    expires: i64,
    signature: String,
}

/// `GET /api/devices/v1/download/{device}/{firmware}?expires=…&signature=…`: no
/// `Authorization` (the client sends none), the link is its own credential.
async fn download(
    State(state): State<AppState>,
    ApiPath((device, firmware)): ApiPath<(Id, Id)>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Response {
    if !state.verify_download(device, firmware, q.expires, &q.signature) {
        return text(
            StatusCode::FORBIDDEN,
            "this download link is not valid (or expired): ask for the deployment again",
        );
    }
    let range = match delivery::range_header(&headers) {
        Ok(r) => r,
        Err(e) => return error_text(e),
    };
    let product = match state.store().device_by_id(device).await {
        Ok(d) => d.product_id,
        Err(e) => return error_text(e.into()),
    };
    match state.firmware_part(product, firmware, range).await {
        Ok((firmware, part)) => super::offer(Offer {
            device,
            filename: format!("{}.mender", firmware.version),
            firmware,
            part,
        }),
        Err(e) => error_text(e),
    }
}
