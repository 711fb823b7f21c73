//! hawkBit's Direct Device Integration API under `/{tenant}/controller/v1/{controller}`, as
//! SWUpdate's suricatta uses it (and anything else that speaks DDI). The tenant names the
//! product (its name or id), the controller id is the device's serial. `GatewayToken` is the
//! product's API key (an unknown controller is registered as New, like an OTAdrive device);
//! `TargetToken` is the device's own password. An action is the firmware offered: its id is
//! the firmware id. SWUpdate does not say what it runs on a poll, so the pipeline goes by the
//! version the device last reported installed (`remembered_running`).
//!
//! Status table (`Answer` → wire; SWUpdate takes only 200, 206 and 226 as success):
//! no or wrong token 401 · rate limited 429 · busy 503 · not verified, blocked or disabled: the
//! poll answers 200 with the polling interval and no links, every other call 403 ·
//! nothing assigned, up to date, another family's image: 200, the poll with no deployment ·
//! offer: the poll links `deploymentBase/{firmware id}`, which lists one chunk with one `.swu`
//! artifact (size, sha1, md5, sha256, `download-http`), served with `Range` · a deployment or
//! artifact that is no longer the device's offer 404 · up to date: the poll links
//! `installedBase/{firmware id}` · feedback and configData 200, empty ·
//! an open action no longer offered (its rollout cancelled, its stage rolled back): the poll
//! links `cancelAction/{firmware id}`, whose feedback closes it.

// Handlers answer refusals with a whole response, so `Result<_, Response>` is the natural shape.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use otaforge_protocol::UpdateResult;
use otaforge_store::model::{Firmware, Id, Product, Telemetry};
use serde::Deserialize;
use serde_json::json;

use super::{error_text, text};
use crate::AppState;
use crate::core::checkin::{Admitted, Answer, CheckIn, Identity, Unauthorized, Want, cancellation};
use crate::decision::{Family, Mode, Running};
use crate::delivery;
use crate::error::ApiError;
use crate::extract::ApiPath;

const BASE: &str = "/{tenant}/controller/v1/{controller}";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(BASE, get(poll))
        .route(
            &format!("{BASE}/deploymentBase/{{action}}"),
            get(deployment),
        )
        .route(
            &format!("{BASE}/deploymentBase/{{action}}/feedback"),
            post(feedback),
        )
        .route(&format!("{BASE}/configData"), put(config_data))
        .route(
            &format!("{BASE}/installedBase/{{action}}"),
            get(installed_base),
        )
        .route(
            &format!("{BASE}/cancelAction/{{action}}"),
            get(cancel_action),
        )
        .route(
            &format!("{BASE}/cancelAction/{{action}}/feedback"),
            post(cancel_feedback),
        )
        .route(
            &format!("{BASE}/softwaremodules/{{action}}/artifacts/{{file}}"),
            get(artifact),
        )
}

/// Feedback and configData bodies larger than this are refused.
const MAX_BODY: u64 = 256 * 1024;

/// What a request names and how it proves it.
struct Caller<'a> {
    product: Product,
    controller: &'a str,
    token: Token<'a>,
}

enum Token<'a> {
    Gateway(&'a str),
    Target(&'a str),
    None,
}

/// The tenant's product (by name, or by id), or 404.
async fn tenant(state: &AppState, tenant: &str) -> Result<Product, Response> {
    let catalog = &state.inner.catalog;
    let found = match catalog.product_by_name(state.store(), tenant).await {
        Ok(Some(product)) => Ok(Some(product)),
        Ok(None) => match tenant.parse::<Id>() {
            Ok(id) => match catalog.product(state.store(), id).await {
                Ok(product) => Ok(Some(product)),
                Err(otaforge_store::StoreError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            },
            Err(_) => Ok(None),
        },
        Err(e) => Err(e),
    };
    found
        .map_err(|e| error_text(e.into()))?
        .ok_or_else(|| text(StatusCode::NOT_FOUND, "no product is named by this tenant"))
}

/// The caller of a request to `{tenant}/controller/v1/{controller}/…`.
async fn caller_of<'a>(
    state: &AppState,
    tenant_name: &str,
    controller: &'a str,
    headers: &'a HeaderMap,
) -> Result<Caller<'a>, Response> {
    Ok(caller(
        tenant(state, tenant_name).await?,
        controller,
        headers,
    ))
}

fn token(headers: &HeaderMap) -> Token<'_> {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Token::None;
    };
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    match scheme {
        s if s.eq_ignore_ascii_case("GatewayToken") => Token::Gateway(rest.trim()),
        s if s.eq_ignore_ascii_case("TargetToken") => Token::Target(rest.trim()),
        _ => Token::None,
    }
}

/// One check-in for this dialect. `running`: what the request says the device now runs
/// (only feedback does); otherwise the pipeline goes by what it last installed.
async fn check_in(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller<'_>,
    want: Want<'_>,
    running: Option<&str>,
    feedback: Option<&str>,
    ends: Ends,
) -> Result<Answer, Response> {
    let (closes, ends_action) = match ends {
        Ends::No => (None, None),
        Ends::Closes(id) => (Some(id), None),
        Ends::Cancelled(id) => (None, Some(id)),
    };
    let identity = match caller.token {
        // A gateway token of another product than the tenant's is no token for this tenant.
        Token::Gateway(key) => Identity::ProductKey {
            key,
            serial: caller.controller,
            product: Some(caller.product.id),
        },
        Token::Target(password) => Identity::DevicePassword {
            product: caller.product.id,
            serial: caller.controller,
            password: Some(password),
        },
        Token::None => Identity::DevicePassword {
            product: caller.product.id,
            serial: caller.controller,
            password: None,
        },
    };
    let req = CheckIn {
        identity,
        peer: peer.ip(),
        running: Running {
            version: running,
            sketch_md5: None,
            by_md5: false,
        },
        remembered_running: true,
        closes,
        tracks_actions: true,
        ends_action,
        device_type: None,
        mode: Mode::App,
        chip: Some(Family::SwUpdate),
        report: Telemetry {
            version: running.map(str::to_string),
            ..Telemetry::default()
        },
        feedback,
        want,
    };
    state.check_in(req).await.map_err(error_text)
}

/// What the pipeline offers the controller now (a poll, a look at an action), reporting
/// nothing.
async fn what_now(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller<'_>,
) -> Result<Answer, Response> {
    check_in(
        state,
        peer,
        caller,
        Want::FirmwareHead,
        None,
        None,
        Ends::No,
    )
    .await
}

/// How a request ends the device's action, if it does.
#[derive(Clone, Copy)]
enum Ends {
    No,
    /// Closed without installing (failure, rejected, cancelled by the device).
    Closes(Id),
    /// The device answered our cancel.
    Cancelled(Id),
}

/// This dialect's refusals; `None` for answers that are not refusals.
fn refusal_of(answer: &Answer) -> Option<Response> {
    match answer {
        Answer::Unauthorized(Unauthorized::Refused(r)) => Some(super::refused(*r)),
        Answer::Unauthorized(_) => Some(text(
            StatusCode::UNAUTHORIZED,
            "this controller needs `Authorization: TargetToken <device password>` or \
             `GatewayToken <product API key>`",
        )),
        Answer::NotAllowed(status) => Some(text(
            StatusCode::FORBIDDEN,
            &format!(
                "device is {}; updates are refused until an operator verifies it",
                status.as_str()
            ),
        )),
        _ => None,
    }
}

fn refusal(answer: Answer) -> Response {
    refusal_of(&answer).unwrap_or_else(|| text(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

fn caller<'a>(product: Product, controller: &'a str, headers: &'a HeaderMap) -> Caller<'a> {
    Caller {
        product,
        controller,
        token: token(headers),
    }
}

fn controller_url(state: &AppState, product: &Product, controller: &str) -> String {
    format!(
        "{}/{}/controller/v1/{}",
        state.config().public_url(),
        product.name,
        controller
    )
}

/// `HH:MM:SS`, as `config.polling.sleep` is written.
fn sleep_text(seconds: u64) -> String {
    let s = seconds.clamp(1, 24 * 3600 - 1);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// `GET {tenant}/controller/v1/{controller}`: the poll.
async fn poll(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&state, &tenant_name, &controller, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let answer = match what_now(&state, peer, &caller).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // A device not allowed to update still hears the polling interval, so that it asks
    // again soon after an operator verifies it (a 403 would leave it on its own, longer
    // interval); it gets no links.
    if let Answer::NotAllowed(_) = answer {
        return poll_body(&state, serde_json::Map::new());
    }
    if let Some(r) = refusal_of(&answer) {
        return r;
    }
    let base = controller_url(&state, &caller.product, &controller);
    let device = state
        .inner
        .catalog
        .device(state.store(), caller.product.id, &controller)
        .await
        .ok()
        .flatten();
    let mut links = serde_json::Map::new();
    // An open action that is no longer offered is cancelled first; as on hawkBit, the next
    // action is linked only once the client has closed that one.
    let cancel = cancellation(device.as_ref().and_then(|d| d.open_firmware_id), &answer);
    if let Some(open) = cancel {
        links.insert(
            "cancelAction".into(),
            json!({"href": format!("{base}/cancelAction/{open}")}),
        );
    } else if let Answer::Offer(offer) = &answer {
        links.insert(
            "deploymentBase".into(),
            json!({"href": format!("{base}/deploymentBase/{}", offer.firmware.id)}),
        );
    }
    if let Answer::UpToDate(firmware) = &answer {
        links.insert(
            "installedBase".into(),
            json!({"href": format!("{base}/installedBase/{}", firmware.id)}),
        );
    }
    // configData is asked for until the device has sent its attributes once (a client that
    // sees the link sends them instead of installing).
    if device.is_some_and(|d| d.attributes.is_none()) {
        links.insert(
            "configData".into(),
            json!({"href": format!("{base}/configData")}),
        );
    }
    poll_body(&state, links)
}

fn poll_body(state: &AppState, links: serde_json::Map<String, serde_json::Value>) -> Response {
    axum::Json(json!({
        "config": {"polling": {"sleep": sleep_text(state.config().ddi_poll.as_secs())}},
        "_links": links,
    }))
    .into_response()
}

/// The firmware of `action` when it is what the pipeline offers this device now.
async fn offered(
    state: &AppState,
    peer: SocketAddr,
    caller: &Caller<'_>,
    action: Id,
    want: Want<'_>,
) -> Result<crate::core::checkin::Offer, Response> {
    match check_in(state, peer, caller, want, None, None, Ends::No).await? {
        Answer::Offer(offer) if offer.firmware.id == action => Ok(*offer),
        answer => Err(refusal_of(&answer).unwrap_or_else(|| {
            text(
                StatusCode::NOT_FOUND,
                "this action is not open for the device (it is up to date or another firmware is assigned)",
            )
        })),
    }
}

fn artifact_name(product: &Product, firmware: &Firmware) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}-{}.swu", clean(&product.name), clean(&firmware.version))
}

/// `GET …/deploymentBase/{action}`: one chunk with one artifact.
async fn deployment(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller, action)): ApiPath<(String, String, Id)>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&state, &tenant_name, &controller, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let offer = match offered(&state, peer, &caller, action, Want::FirmwareHead).await {
        Ok(o) => o,
        Err(r) => return r,
    };
    axum::Json(deployment_body(&state, &caller, &offer.firmware)).into_response()
}

/// One chunk with one `.swu` artifact, as `deploymentBase` and `installedBase` describe it.
fn deployment_body(
    state: &AppState,
    caller: &Caller<'_>,
    firmware: &Firmware,
) -> serde_json::Value {
    let name = artifact_name(&caller.product, firmware);
    let href = format!(
        "{}/softwaremodules/{}/artifacts/{name}",
        controller_url(state, &caller.product, caller.controller),
        firmware.id
    );
    let sha1 = firmware
        .metadata
        .get("sha1")
        .and_then(|s| s.as_str())
        .unwrap_or_default();
    json!({
        "id": firmware.id.to_string(),
        "deployment": {
            "download": "forced",
            "update": "forced",
            "chunks": [{
                "part": "os",
                "version": firmware.version,
                "name": caller.product.name,
                "artifacts": [{
                    "filename": name,
                    "hashes": {"sha1": sha1, "md5": firmware.md5, "sha256": firmware.sha256},
                    "size": firmware.size,
                    "_links": {"download-http": {"href": href}},
                }],
            }],
        },
    })
}

/// `GET …/installedBase/{action}`: the action the device finished installing, when it still
/// runs it.
async fn installed_base(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller, action)): ApiPath<(String, String, Id)>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&state, &tenant_name, &controller, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match what_now(&state, peer, &caller).await {
        Ok(Answer::UpToDate(firmware)) if firmware.id == action => {
            let mut body = deployment_body(&state, &caller, &firmware);
            body["actionHistory"] = json!({"status": "finished", "messages": []});
            axum::Json(body).into_response()
        }
        Ok(answer) => refusal_of(&answer)
            .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "the device does not run this action")),
        Err(r) => r,
    }
}

/// `GET`/`HEAD …/softwaremodules/{action}/artifacts/{file}`: the `.swu`, with `Range`.
async fn artifact(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    ApiPath((tenant_name, controller, action, _file)): ApiPath<(String, String, Id, String)>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&state, &tenant_name, &controller, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let want = if method == Method::HEAD {
        Want::FirmwareHead
    } else {
        match delivery::range_header(&headers) {
            Ok(range) => Want::Firmware { range },
            Err(e) => return error_text(e),
        }
    };
    match offered(&state, peer, &caller, action, want).await {
        Ok(offer) => super::offer(offer),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct Feedback {
    status: FeedbackStatus,
}

#[derive(Deserialize)]
struct FeedbackStatus {
    execution: String,
    #[serde(default)]
    result: FeedbackResult,
    #[serde(default)]
    details: Vec<String>,
}

#[derive(Deserialize, Default)]
struct FeedbackResult {
    #[serde(default)]
    finished: String,
    #[serde(default)]
    progress: Option<Progress>,
}

#[derive(Deserialize)]
struct Progress {
    #[serde(default)]
    cnt: u64,
    #[serde(default)]
    of: u64,
}

async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, Response> {
    let bytes = crate::upload::read_limited(headers, body, MAX_BODY)
        .await
        .map_err(error_text)?;
    serde_json::from_slice(&bytes).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("the body is not the JSON this call takes: {e}"),
        )
    })
}

/// The tenant's product and the request's JSON body.
async fn tenant_and_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    tenant_name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Product, T), Response> {
    let product = tenant(state, tenant_name).await?;
    Ok((product, json_body(headers, body).await?))
}

/// The tenant's product, a feedback body and the firmware of the action it is about.
async fn feedback_of(
    state: &AppState,
    tenant_name: &str,
    action: Id,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Product, Feedback, Firmware), Response> {
    let (product, body): (_, Feedback) = tenant_and_body(state, tenant_name, headers, body).await?;
    let firmware = state
        .store()
        .get_firmware(product.id, action)
        .await
        .map_err(|e| error_text(ApiError::from(e)))?;
    Ok((product, body, firmware))
}

/// `POST …/deploymentBase/{action}/feedback`: progress, and the action's end.
async fn feedback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller, action)): ApiPath<(String, String, Id)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (product, body, firmware) =
        match feedback_of(&state, &tenant_name, action, &headers, body).await {
            Ok(found) => found,
            Err(r) => return r,
        };
    let status = &body.status;
    let detail = status
        .details
        .first()
        .map(|d| d.trim())
        .filter(|d| !d.is_empty());
    let (running, said, closes) = match (status.execution.as_str(), status.result.finished.as_str())
    {
        ("closed", "success") => (
            Some(firmware.version.as_str()),
            Some(
                UpdateResult::Installed {
                    version: firmware.version.clone(),
                }
                .to_string(),
            ),
            None,
        ),
        ("closed", "failure") | ("rejected", _) | ("canceled", _) => (
            None,
            Some(
                UpdateResult::Failed {
                    reason: format!(
                        "{} {}: {}",
                        firmware.version,
                        status.execution,
                        detail.unwrap_or("no reason given")
                    ),
                }
                .to_string(),
            ),
            Some(firmware.id),
        ),
        // Steps of the install (`of` > 0) are shown on the timeline; log lines are not.
        (execution, _) => {
            let step = status.result.progress.as_ref().filter(|p| p.of > 0);
            let said = step.map(|p| {
                format!(
                    "{} {execution} {}/{}: {}",
                    firmware.version,
                    p.cnt,
                    p.of,
                    detail.unwrap_or("")
                )
            });
            (None, said, None)
        }
    };
    let caller = caller(product, &controller, &headers);
    match check_in(
        &state,
        peer,
        &caller,
        Want::Report,
        running,
        said.as_deref(),
        closes.map_or(Ends::No, Ends::Closes),
    )
    .await
    {
        Ok(Answer::Recorded(_)) => StatusCode::OK.into_response(),
        Ok(answer) => refusal(answer),
        Err(r) => r,
    }
}

/// `GET …/cancelAction/{action}`: the action to stop, when it is still open and no longer
/// offered.
async fn cancel_action(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller, action)): ApiPath<(String, String, Id)>,
    headers: HeaderMap,
) -> Response {
    let caller = match caller_of(&state, &tenant_name, &controller, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let answer = match what_now(&state, peer, &caller).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Some(r) = refusal_of(&answer) {
        return r;
    }
    let device = state
        .inner
        .catalog
        .device(state.store(), caller.product.id, &controller)
        .await
        .ok()
        .flatten();
    match cancellation(device.and_then(|d| d.open_firmware_id), &answer) {
        Some(open) if open == action => axum::Json(json!({
            "id": action.to_string(),
            "cancelAction": {"stopId": action.to_string()},
        }))
        .into_response(),
        _ => text(StatusCode::NOT_FOUND, "this action is not being cancelled"),
    }
}

/// `POST …/cancelAction/{action}/feedback`: the client stopped (or could not stop) it.
async fn cancel_feedback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller, action)): ApiPath<(String, String, Id)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (product, body, firmware) =
        match feedback_of(&state, &tenant_name, action, &headers, body).await {
            Ok(found) => found,
            Err(r) => return r,
        };
    // The action ends either way: whether or not the client could stop it, the server no
    // longer offers it (a cancel linked forever would have the client retry forever). It is
    // no failure of the firmware.
    let said = format!(
        "{} cancelled ({} {})",
        firmware.version, body.status.execution, body.status.result.finished
    );
    let caller = caller(product, &controller, &headers);
    match check_in(
        &state,
        peer,
        &caller,
        Want::Report,
        None,
        Some(&said),
        Ends::Cancelled(action),
    )
    .await
    {
        Ok(Answer::Recorded(_)) => StatusCode::OK.into_response(),
        Ok(answer) => refusal(answer),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ConfigData {
    data: serde_json::Map<String, serde_json::Value>,
}

/// `PUT …/configData`: the attributes the client reports about itself.
async fn config_data(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiPath((tenant_name, controller)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (product, body): (_, ConfigData) =
        match tenant_and_body(&state, &tenant_name, &headers, body).await {
            Ok(found) => found,
            Err(r) => return r,
        };
    let caller = caller(product, &controller, &headers);
    let admitted: Admitted =
        match check_in(&state, peer, &caller, Want::Report, None, None, Ends::No).await {
            Ok(Answer::Recorded(admitted)) => *admitted,
            Ok(answer) => return refusal(answer),
            Err(r) => return r,
        };
    match state
        .record_attributes(&admitted, serde_json::Value::Object(body.data))
        .await
    {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => error_text(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polling_sleep_is_written_as_hawkbit_does() {
        assert_eq!(sleep_text(300), "00:05:00");
        assert_eq!(sleep_text(1), "00:00:01");
        assert_eq!(sleep_text(3725), "01:02:05");
        assert_eq!(sleep_text(0), "00:00:01");
    }

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        assert!(matches!(token(&h), Token::None));
        h.insert(header::AUTHORIZATION, "TargetToken abc".parse().unwrap());
        assert!(matches!(token(&h), Token::Target("abc")));
        h.insert(header::AUTHORIZATION, "gatewaytoken k1".parse().unwrap());
        assert!(matches!(token(&h), Token::Gateway("k1")));
        h.insert(header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(matches!(token(&h), Token::None));
    }
}
