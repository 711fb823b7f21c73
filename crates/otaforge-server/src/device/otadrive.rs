//! The OTAdrive device dialect (`/deviceapi/...`), byte-compatible with the OTAdrive
//! Arduino and ESP-IDF libraries: every call carries `k` (product API key), `v` (running
//! version) and `s` (serial). Paths are matched case-insensitively by `lib::serve`.
//!
//! Status table (`Answer` → wire):
//! unauthorized (no or unknown key) 401 · rate limited 429 · busy 503 · not verified, blocked
//! or disabled 401 (what the library expects) · nothing assigned 404 · wrong chip 409 ·
//! up to date 304 · version only 200 + `x-version`, no body · offer 200/206/416 with the bytes.

// Handlers answer refusals with a whole response, so `Result<_, Response>` is the natural shape.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::Value;

use super::headers::DeviceHeaders;
use super::{error_text, text};
use crate::AppState;
use crate::core::checkin::{Admitted, Answer, CheckIn, Identity, Unauthorized, Want};
use crate::decision::Mode;
use crate::delivery;
use crate::extract::ApiQuery;

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

/// The wire request as a `CheckIn`.
fn check_in<'a>(
    params: &'a Params,
    headers: &'a DeviceHeaders<'a>,
    peer: SocketAddr,
    want: Want<'a>,
) -> Result<CheckIn<'a>, Response> {
    let param = |k: &str| params.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let key = param("k").unwrap_or("");
    let Some(serial) = param("s") else {
        return Err(text(StatusCode::BAD_REQUEST, "missing serial number (s)"));
    };
    let version = param("v");
    Ok(CheckIn {
        identity: Identity::ProductKey {
            key,
            serial,
            product: None,
        },
        peer: peer.ip(),
        remembered_running: false,
        closes: None,
        tracks_actions: false,
        ends_action: None,
        device_type: None,
        running: headers.running(version, headers.get("x-check-sketch-md5") == Some("1")),
        mode: headers.mode(),
        chip: headers.family(),
        report: headers.telemetry(version),
        feedback: headers.feedback(),
        want,
    })
}

/// This dialect's status table.
fn render(answer: Answer) -> Response {
    match answer {
        Answer::Unauthorized(Unauthorized::MissingCredentials) => {
            text(StatusCode::UNAUTHORIZED, "missing API key (k)")
        }
        Answer::Unauthorized(Unauthorized::UnknownKey | Unauthorized::WrongCredentials) => {
            text(StatusCode::UNAUTHORIZED, "unknown API key")
        }
        Answer::Unauthorized(Unauthorized::Refused(r)) => super::refused(r),
        Answer::NotAllowed(status) => text(
            StatusCode::UNAUTHORIZED,
            &format!("device is {}; an operator must verify it", status.as_str()),
        ),
        Answer::NothingAssigned(Mode::Filesystem) => text(
            StatusCode::NOT_FOUND,
            "no filesystem image is assigned to the device's group",
        ),
        Answer::NothingAssigned(_) => text(
            StatusCode::NOT_FOUND,
            "no firmware assigned to the device's group",
        ),
        Answer::WrongChip { image, device } => super::wrong_chip(image, device),
        Answer::UpToDate(_) => StatusCode::NOT_MODIFIED.into_response(),
        Answer::VersionOnly(firmware) => super::version_only(&firmware.version),
        Answer::Offer(offer) => super::offer(*offer),
        Answer::Recorded(_) => text(StatusCode::OK, "ok"),
    }
}

async fn run(
    state: &AppState,
    params: &Params,
    headers: &HeaderMap,
    peer: SocketAddr,
    want: Want<'_>,
) -> Result<Answer, Response> {
    let device_headers = DeviceHeaders::new(headers).map_err(error_text)?;
    let req = check_in(params, &device_headers, peer, want)?;
    state.check_in(req).await.map_err(error_text)
}

async fn update(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Response {
    let want = if method == Method::HEAD {
        Want::FirmwareHead
    } else {
        match delivery::range_header(&headers) {
            Ok(range) => Want::Firmware { range },
            Err(e) => return error_text(e),
        }
    };
    match run(&state, &params, &headers, peer, want).await {
        Ok(answer) => render(answer),
        Err(response) => response,
    }
}

/// The device, for the calls that need only who it is (config, resources).
async fn admitted(
    state: &AppState,
    params: &Params,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Admitted, Response> {
    match run(state, params, headers, peer, Want::Report).await? {
        Answer::Recorded(admitted) => Ok(*admitted),
        other => Err(render(other)),
    }
}

async fn alive(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Response {
    match run(&state, &params, &headers, peer, Want::Report).await {
        Ok(answer) => render(answer),
        Err(response) => response,
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

fn text_raw(body: String) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain")], body).into_response()
}

async fn config(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = admitted(&state, &params, &headers, peer).await?;
    let config = state.device_config(&caller).await.map_err(error_text)?;
    if params.contains_key("plain") {
        let mut out = String::new();
        flatten("", &config, &mut out);
        Ok(text_raw(out))
    } else {
        Ok(axum::Json(config).into_response())
    }
}

async fn resource_list(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = admitted(&state, &params, &headers, peer).await?;
    let resources = state.device_resources(&caller).await.map_err(error_text)?;
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
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiQuery(params): ApiQuery<Params>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let caller = admitted(&state, &params, &headers, peer).await?;
    let fk = params.get("fk").map(String::as_str).unwrap_or("");
    if fk.is_empty() {
        return Err(text(StatusCode::BAD_REQUEST, "missing file key (fk)"));
    }
    let range = delivery::range_header(&headers).map_err(error_text)?;
    let (resource, part) = state
        .device_resource(&caller, fk, range)
        .await
        .map_err(error_text)?
        .ok_or_else(|| text(StatusCode::NOT_FOUND, "no such resource for this device"))?;
    Ok(delivery::render(
        part,
        resource.size.max(0) as u64,
        &delivery::Delivery {
            md5: &resource.md5,
            version: "",
            sha256: &resource.sha256,
            filename: &resource.name,
        },
    ))
}
