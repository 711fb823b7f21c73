//! The static link of seed 000: `/ota/{product}/{serial}` never changes for a device and
//! serves whatever the check-in pipeline picks for it now, to the stock `HTTPUpdate` (ESP32)
//! and `ESP8266httpUpdate` clients exactly as they behave (HTTP Basic auth with serial and
//! password, one HTTP/1.0 GET, never chunked).
//!
//! Status table (`Answer` → wire):
//! no or wrong credentials 401 + `WWW-Authenticate: Basic` (unknown serial answers the same)
//! · rate limited 429 · busy 503 · not verified, blocked or disabled 403 (the credentials were
//! right; the device is not allowed) · nothing assigned 404 · wrong chip 409 · up to date 304 ·
//! version only 200 + `x-version`, no body · offer 200/206/416 with the bytes.

// Handlers answer refusals with a whole response, so `Result<_, Response>` is the natural shape.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use otaforge_store::model::Id;

use super::headers::DeviceHeaders;
use super::{error_text, text};
use crate::AppState;
use crate::auth::basic_credentials;
use crate::core::checkin::{Answer, CheckIn, Identity, Unauthorized, Want};
use crate::decision::Mode;
use crate::delivery;
use crate::extract::ApiPath;

pub fn routes() -> Router<AppState> {
    Router::new().route("/ota/{product}/{serial}", get(fetch))
}

fn challenge(message: &str) -> Response {
    let mut response = text(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"otaforge\""),
    );
    response
}

/// This dialect's status table.
fn render(answer: Answer) -> Response {
    match answer {
        Answer::Unauthorized(Unauthorized::MissingCredentials) => {
            challenge("this link needs HTTP Basic credentials: the device's serial and password")
        }
        Answer::Unauthorized(Unauthorized::UnknownKey | Unauthorized::WrongCredentials) => {
            challenge("wrong device credentials")
        }
        Answer::Unauthorized(Unauthorized::Refused(r)) => super::refused(r),
        Answer::NotAllowed(status) => text(
            StatusCode::FORBIDDEN,
            &format!(
                "device is {}; updates are refused until an operator verifies it",
                status.as_str()
            ),
        ),
        Answer::NothingAssigned(Mode::Filesystem) => {
            text(StatusCode::NOT_FOUND, "no filesystem image is assigned")
        }
        Answer::NothingAssigned(_) => text(
            StatusCode::NOT_FOUND,
            "no firmware assigned to this device's group",
        ),
        Answer::WrongChip { image, device } => super::wrong_chip(image, device),
        Answer::UpToDate(_) => StatusCode::NOT_MODIFIED.into_response(),
        Answer::VersionOnly(firmware) => super::version_only(&firmware.version),
        Answer::Offer(offer) => super::offer(*offer),
        Answer::Recorded(_) => text(StatusCode::OK, "ok"),
    }
}

async fn fetch(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    headers: HeaderMap,
) -> Response {
    let device_headers = match DeviceHeaders::new(&headers) {
        Ok(h) => h,
        Err(e) => return error_text(e),
    };
    let want = if method == Method::HEAD {
        Want::FirmwareHead
    } else {
        match delivery::range_header(&headers) {
            Ok(range) => Want::Firmware { range },
            Err(e) => return error_text(e),
        }
    };
    // The user part must be this link's serial; a serial may itself contain ':'.
    let credentials = basic_credentials(&headers);
    let password = credentials.as_deref().map(|c| {
        c.strip_prefix(serial.as_str())
            .and_then(|rest| rest.strip_prefix(':'))
    });
    let password = match password {
        None => None,
        // Credentials for another user never match; checked like a wrong password.
        Some(p) => Some(p.unwrap_or("\u{0}")),
    };
    let req = CheckIn {
        identity: Identity::DevicePassword {
            product,
            serial: &serial,
            password,
        },
        peer: peer.ip(),
        remembered_running: false,
        closes: None,
        tracks_actions: false,
        ends_action: None,
        device_type: None,
        running: device_headers.running(None, false),
        mode: device_headers.mode(),
        chip: device_headers.family(),
        report: device_headers.telemetry(None),
        feedback: device_headers.feedback(),
        want,
    };
    match state.check_in(req).await {
        Ok(answer) => render(answer),
        Err(e) => error_text(e),
    }
}
