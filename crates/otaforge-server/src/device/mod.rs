//! The device dialects. Each adapter only translates: wire request → `core::checkin::CheckIn`,
//! `Answer` → wire response, through one status table of its own (see ARCHITECTURE.md).
//! No adapter decides anything.

pub mod hawkbit;
pub mod headers;
pub mod mender;
pub mod otadrive;
pub mod static_link;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::core::checkin::Offer;
use crate::core::passwords::Refused;
use crate::decision::Family;
use crate::delivery;
use crate::error::ApiError;

/// A plain-text answer: device libraries print the body of a refusal.
pub fn text(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("{body}\n"),
    )
        .into_response()
}

/// An error of the request itself, as plain text (devices do not read JSON).
pub fn error_text(e: ApiError) -> Response {
    e.log();
    text(e.status, &e.message)
}

/// A refusal of the password guard: 429 (too many failures) or 503 (hashing busy).
pub fn refused(r: Refused) -> Response {
    let status = match r {
        Refused::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        Refused::Busy => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, r.message())
}

/// 409: the picked image is for another chip family than the device's headers announce.
pub fn wrong_chip(image: Family, device: Family) -> Response {
    text(
        StatusCode::CONFLICT,
        &format!(
            "the assigned firmware is built for {}; this device is an {}",
            image.as_str(),
            device.as_str()
        ),
    )
}

/// `200` with `x-version` and no body: the answer to "which version is available?".
pub fn version_only(version: &str) -> Response {
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(
        "x-version",
        HeaderValue::from_str(version).unwrap_or(HeaderValue::from_static("")),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    response
}

/// The bytes of an offer with `Content-Length`, `Range`, `x-MD5` and `X-Version`.
pub fn offer(offer: Offer) -> Response {
    let Offer {
        firmware,
        part,
        filename,
        ..
    } = offer;
    delivery::render(
        part,
        firmware.size.max(0) as u64,
        &delivery::Delivery::of(&firmware, &filename),
    )
}
