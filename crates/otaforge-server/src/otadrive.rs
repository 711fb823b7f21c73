//! The OTAdrive device dialect (`/deviceapi/...`), byte-compatible with the OTAdrive
//! Arduino and ESP-IDF libraries: every call carries `k` (product API key), `v` (running
//! version) and `s` (serial).

use std::collections::HashMap;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use otaforge_store::model::{Device, DeviceStatus, Product};
use serde_json::Value;

use crate::auth::digest;
use crate::checkin::DeviceHeaders;
use crate::decision::{Decision, Running, decide};
use crate::error::ApiError;
use crate::extract::ApiQuery;
use crate::{AppState, delivery};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/deviceapi/update", get(update))
        .route("/deviceapi/getconfig", get(config))
        .route("/deviceapi/config", get(config))
        .route("/deviceapi/resource/list", get(resource_list))
        .route("/deviceapi/resource/get", get(resource_get))
        .route("/deviceapi/alive", get(alive).post(alive))
}

type Params = HashMap<String, String>;

fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("{body}\n"),
    )
        .into_response()
}

/// A device that passed the API key check, with what it reported folded into telemetry.
struct Caller {
    product: Product,
    device: Device,
}

/// Checks `k` and `s`, registers unknown serials as New, and records the check-in.
/// Unknown key → 401; device not verified → 401 (after registering it).
async fn identify(
    state: &AppState,
    params: &Params,
    headers: &HeaderMap,
) -> Result<Caller, Response> {
    let device_headers = DeviceHeaders::new(headers).map_err(IntoResponse::into_response)?;
    let key = params.get("k").map(|k| k.trim()).unwrap_or("");
    let serial = params.get("s").map(|s| s.trim()).unwrap_or("");
    if key.is_empty() {
        return Err(text(StatusCode::UNAUTHORIZED, "missing API key (k)"));
    }
    if serial.is_empty() {
        return Err(text(StatusCode::BAD_REQUEST, "missing serial number (s)"));
    }
    let serial =
        crate::api::check_serial(serial).map_err(|e| text(StatusCode::BAD_REQUEST, &e.message))?;
    let catalog = &state.inner.catalog;
    let store = state.store();
    let product = catalog
        .product_by_key_digest(store, &digest(key))
        .await
        .map_err(|e| ApiError::from(e).into_response())?
        .ok_or_else(|| text(StatusCode::UNAUTHORIZED, "unknown API key"))?;
    let device = catalog
        .device_or_register(store, product.id, &serial)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let version = params
        .get("v")
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    state
        .inner
        .telemetry
        .record(device.id, device_headers.telemetry(version));
    match device.status {
        DeviceStatus::Verified => Ok(Caller { product, device }),
        other => Err(text(
            StatusCode::UNAUTHORIZED,
            &format!("device is {}; an operator must verify it", other.as_str()),
        )),
    }
}

async fn update(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = identify(&state, &params, &headers).await?;
    let device_headers = DeviceHeaders::new(&headers).map_err(IntoResponse::into_response)?;
    let assigned = state
        .target_firmware(&caller.device)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    let by_md5 = device_headers.get("x-check-sketch-md5") == Some("1");
    let running = Running {
        version: params.get("v").map(String::as_str),
        sketch_md5: device_headers.sketch_md5(),
        by_md5,
    };
    state
        .observe(
            &caller.device,
            &running,
            device_headers.get("x-otaforge-update-result"),
        )
        .await;
    match decide(caller.device.status, assigned.as_ref(), &running) {
        Decision::NotAllowed(status) => Err(text(
            StatusCode::UNAUTHORIZED,
            &format!("device is {}", status.as_str()),
        )),
        Decision::NoFirmware => Err(text(
            StatusCode::NOT_FOUND,
            "no firmware assigned to the device's group",
        )),
        Decision::UpToDate => Ok(StatusCode::NOT_MODIFIED.into_response()),
        Decision::Update => {
            let firmware = assigned.expect("decide returns Update only with a firmware");
            let bytes = state
                .inner
                .blob_cache
                .get(&state.inner.blobs, &firmware.sha256)
                .await
                .map_err(IntoResponse::into_response)?;
            if method != axum::http::Method::HEAD
                && delivery::serves_last_byte(&headers, bytes.len() as u64)
            {
                state.served_whole(&caller.device, &firmware).await;
            }
            delivery::respond(
                &headers,
                bytes,
                &delivery::Delivery {
                    md5: &firmware.md5,
                    version: &firmware.version,
                    sha256: &firmware.sha256,
                    filename: &format!("{}-{}.bin", caller.product.name, firmware.version),
                },
            )
            .map_err(IntoResponse::into_response)
        }
    }
}

/// Flattens nested objects to dotted keys: `{"alarm":{"number":1}}` → `alarm.number=1`.
fn flatten(prefix: &str, value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        Value::String(s) => {
            out.push_str(&format!("{prefix}={}\n", s.replace(['\n', '\r'], " ")));
        }
        Value::Null => out.push_str(&format!("{prefix}=\n")),
        other => out.push_str(&format!("{prefix}={other}\n")),
    }
}

async fn config(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = identify(&state, &params, &headers).await?;
    let group = state
        .inner
        .catalog
        .group(state.store(), caller.product.id, caller.device.group_id)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    if params.contains_key("plain") {
        let mut out = String::new();
        flatten("", &group.config, &mut out);
        Ok(text_raw(out))
    } else {
        Ok(axum::Json(group.config).into_response())
    }
}

fn text_raw(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn resource_list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = identify(&state, &params, &headers).await?;
    let resources = state
        .store()
        .list_resources(caller.device.group_id)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    if params.contains_key("plain") {
        let mut out = String::new();
        for r in &resources {
            out.push_str(&format!("{}\n{}\n{}\n", r.name, r.fk, r.md5));
        }
        Ok(text_raw(out))
    } else {
        let list: Vec<Value> = resources
            .iter()
            .map(
                |r| serde_json::json!({ "name": r.name, "fk": r.fk, "md5": r.md5, "size": r.size }),
            )
            .collect();
        Ok(axum::Json(list).into_response())
    }
}

async fn resource_get(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = identify(&state, &params, &headers).await?;
    let fk = params.get("fk").map(String::as_str).unwrap_or("");
    if fk.is_empty() {
        return Err(text(StatusCode::BAD_REQUEST, "missing file key (fk)"));
    }
    let resource = state
        .store()
        .resource_by_fk(caller.product.id, fk)
        .await
        .map_err(|e| ApiError::from(e).into_response())?
        .filter(|r| r.group_id == caller.device.group_id)
        .ok_or_else(|| text(StatusCode::NOT_FOUND, "no such resource for this device"))?;
    let bytes = state
        .inner
        .blob_cache
        .get(&state.inner.blobs, &resource.sha256)
        .await
        .map_err(IntoResponse::into_response)?;
    delivery::respond(
        &headers,
        bytes,
        &delivery::Delivery {
            md5: &resource.md5,
            version: "",
            sha256: &resource.sha256,
            filename: &resource.name,
        },
    )
    .map_err(IntoResponse::into_response)
}

async fn alive(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = identify(&state, &params, &headers).await?;
    let device_headers = DeviceHeaders::new(&headers).map_err(IntoResponse::into_response)?;
    let running = Running {
        version: params.get("v").map(String::as_str),
        sketch_md5: device_headers.sketch_md5(),
        by_md5: false,
    };
    state
        .observe(
            &caller.device,
            &running,
            device_headers.get("x-otaforge-update-result"),
        )
        .await;
    Ok(text(StatusCode::OK, "ok"))
}
