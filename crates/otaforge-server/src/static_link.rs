//! The static link of seed 000: `/ota/{product}/{serial}` never changes for a device and
//! serves whatever firmware is assigned to it now, to the stock `HTTPUpdate` (ESP32) and
//! `ESP8266httpUpdate` clients exactly as they behave (HTTP Basic auth with serial and
//! password, 304 when the running sketch is current, never chunked).

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use otaforge_store::model::{DeviceStatus, Id};

use crate::auth::basic_credentials;
use crate::checkin::DeviceHeaders;
use crate::decision::{Running, runs};
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::{AppState, delivery};

pub fn routes() -> Router<AppState> {
    Router::new().route("/ota/{product}/{serial}", get(fetch))
}

fn plain(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("{body}\n"),
    )
        .into_response()
}

fn challenge(message: &str) -> Response {
    let mut response = plain(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"otaforge\""),
    );
    response
}

async fn fetch(
    State(state): State<AppState>,
    method: axum::http::Method,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    headers: HeaderMap,
) -> Result<Response, Response> {
    let device_headers = DeviceHeaders::new(&headers).map_err(IntoResponse::into_response)?;
    let Some(credentials) = basic_credentials(&headers) else {
        return Err(challenge(
            "this link needs HTTP Basic credentials: the device's serial and password",
        ));
    };
    let store = state.store();
    let device = state
        .inner
        .catalog
        .device(store, product, &serial)
        .await
        .map_err(|e| ApiError::from(e).into_response())?;
    // Same answer for an unknown device and a wrong password: no probing for serials.
    let refused = || challenge("wrong device credentials");
    let Some(device) = device else {
        return Err(refused());
    };
    let password = credentials
        .strip_prefix(device.serial.as_str())
        .and_then(|rest| rest.strip_prefix(':'))
        .ok_or_else(refused)?;
    let Some(phc) = device.password_hash.as_deref() else {
        return Err(refused());
    };
    if !state.inner.verified.verify(password, phc).await {
        return Err(refused());
    }
    state
        .inner
        .telemetry
        .record(device.id, device_headers.telemetry(None));
    if device.status != DeviceStatus::Verified {
        return Err(plain(
            StatusCode::FORBIDDEN,
            &format!("device is {}; updates are refused", device.status.as_str()),
        ));
    }
    if device_headers.mode() == Some("spiffs") {
        return Err(plain(
            StatusCode::NOT_FOUND,
            "no filesystem image is assigned",
        ));
    }
    let running = Running {
        version: device_headers.esp("version"),
        sketch_md5: device_headers.sketch_md5(),
        by_md5: false,
    };
    state
        .observe(
            &device,
            &running,
            device_headers.get("x-otaforge-update-result"),
        )
        .await;
    let firmware = state
        .target_firmware(&device)
        .await
        .map_err(|e| ApiError::from(e).into_response())?
        .ok_or_else(|| {
            plain(
                StatusCode::NOT_FOUND,
                "no firmware assigned to this device's group",
            )
        })?;
    if device_headers.mode() == Some("version") {
        let mut response = plain(StatusCode::OK, "");
        response.headers_mut().insert(
            "x-version",
            HeaderValue::from_str(&firmware.version).unwrap_or(HeaderValue::from_static("")),
        );
        *response.body_mut() = axum::body::Body::empty();
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        return Ok(response);
    }
    if runs(&firmware, &running) {
        return Ok(StatusCode::NOT_MODIFIED.into_response());
    }
    let bytes = state
        .inner
        .blob_cache
        .get(&state.inner.blobs, &firmware.sha256)
        .await
        .map_err(IntoResponse::into_response)?;
    if method != axum::http::Method::HEAD
        && delivery::serves_last_byte(&headers, bytes.len() as u64)
    {
        state.served_whole(&device, &firmware).await;
    }
    delivery::respond(
        &headers,
        bytes,
        &delivery::Delivery {
            md5: &firmware.md5,
            version: &firmware.version,
            sha256: &firmware.sha256,
            filename: &format!("{}.bin", device.serial),
        },
    )
    .map_err(IntoResponse::into_response)
}
