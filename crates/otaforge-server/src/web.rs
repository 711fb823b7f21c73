//! Server-rendered pages: sign-in (operators and bots), product dashboards, the device
//! workspace (editor, compile, build log, Wi-Fi form, setup firmware). Sessions live in an
//! HttpOnly SameSite=Strict cookie; every form carries the session's CSRF token; failed
//! sign-ins are rate limited. Every control is a plain form: JS only enhances.

// Handlers answer refusals with a whole page, so `Result<_, Response>` is the natural shape.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use askama::Template;
use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Multipart, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use otaforge_store::model::*;
use serde::Deserialize;

use crate::auth::{digest, random_secret};
use crate::core::accounts::SignInRefusal;
use crate::core::passwords::Refused;
use crate::core::sketch::{Author, BOARDS, EXAMPLES};
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::{AppState, compile};

const COOKIE: &str = "otaforge_session";
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{name}", get(asset))
        .route("/products", post(create_product))
        .route("/products/{product}", get(product_page))
        .route("/products/{product}/rotate-key", post(rotate_key))
        .route("/products/{product}/rename", post(rename_product))
        .route("/products/{product}/firmware-keys", post(set_firmware_keys))
        .route("/products/{product}/devices/bulk", post(bulk_devices))
        .route("/products/{product}/delete", post(delete_product))
        .route("/products/{product}/firmware/delete", post(delete_firmware))
        .route("/products/{product}/groups", post(create_group))
        .route("/products/{product}/groups/{group}/assign", post(assign))
        .route("/products/{product}/groups/{group}", get(group_page))
        .route(
            "/products/{product}/groups/{group}/resources",
            post(upload_resource).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/products/{product}/groups/{group}/resources/{resource}/delete",
            post(delete_resource),
        )
        .route(
            "/products/{product}/groups/{group}/{action}",
            post(group_action),
        )
        .route("/products/{product}/devices", post(create_device))
        .route(
            "/products/{product}/devices/{serial}/status",
            post(set_status),
        )
        .route(
            "/products/{product}/devices/{serial}/{action}",
            post(device_action),
        )
        .route(
            "/products/{product}/firmware",
            post(upload_firmware).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/products/{product}/rollouts/new", get(new_rollout))
        .route("/products/{product}/rollouts/start", post(start_rollout))
        .route("/products/{product}/rollouts/{rollout}", get(rollout_page))
        .route(
            "/products/{product}/rollouts/{rollout}/{action}",
            post(rollout_action),
        )
        .route("/audit", get(audit_page))
        .route("/accounts", get(accounts_page).post(create_account))
        .route("/accounts/tokens", post(make_token))
        .route("/accounts/tokens/{token}/revoke", post(revoke_token))
        .route("/accounts/{user}/{action}", post(account_action))
        .route("/workspace/{product}/{serial}", get(workspace))
        .route("/workspace/{product}/{serial}/save", post(save))
        .route(
            "/workspace/{product}/{serial}/sketch/{action}",
            post(sketch_action),
        )
        .route("/workspace/{product}/{serial}/wifi", post(save_wifi))
        .route("/workspace/{product}/{serial}/setup", post(setup_firmware))
        .route(
            "/workspace/{product}/{serial}/builds/{file}",
            get(build_status),
        )
        .route(
            "/workspace/{product}/{serial}/builds/{id}/{name}",
            get(build_image),
        )
        // A page handler that panics answers with a page too (logged; the server goes on).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| panic_page(),
        ))
        .layer(axum::middleware::map_response(page_headers))
}

/// The page for a page handler that panicked.
fn panic_page() -> Response {
    tracing::error!("a page handler panicked");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "the server hit an error it did not expect; it was logged. Try again, or go back.",
        "/",
    )
}

// ---- pages as values ----

fn page(t: impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::internal("rendering a page", e).into_response(),
    }
}

#[derive(Template)]
#[template(path = "message.html")]
struct Message<'a> {
    title: &'a str,
    paragraphs: Vec<String>,
    back: &'a str,
}

fn message(status: StatusCode, title: &str, text: impl Into<String>, back: &str) -> Response {
    let mut r = page(Message {
        title,
        paragraphs: vec![text.into()],
        back,
    });
    *r.status_mut() = status;
    r
}

/// An error as a page: the same kinds and messages as the API's, in HTML. Internal errors
/// were logged where they were made and say only that.
fn error_page(e: impl Into<ApiError>, back: &str) -> Response {
    let e = e.into();
    let title = match e.status {
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => "Not allowed",
        StatusCode::CONFLICT => "Conflict",
        s if s.is_server_error() => "Something went wrong",
        _ => "Not done",
    };
    titled_error(e, title, back)
}

/// An error of an operation as a page with its own title (logged like every error).
fn titled_error(e: ApiError, title: &str, back: &str) -> Response {
    e.log();
    message(e.status, title, e.message, back)
}

/// Unknown pages: a page for browsers, the API's JSON for everyone else.
pub async fn not_found(headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if wants_html {
        page_headers(error_page(
            ApiError::not_found("there is no page at this address"),
            "/",
        ))
        .await
    } else {
        ApiError::not_found("no such route").into_response()
    }
}

// ---- sessions ----

/// Who is looking at a page.
pub enum Viewer {
    Operator(User),
    Bot(Box<Device>),
}

pub struct Web {
    pub viewer: Viewer,
    pub csrf: String,
    pub address: Option<std::net::IpAddr>,
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, COOKIE)
}

/// The value of the cookie `name`, if the request carries it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    CookieJar::from_headers(headers)
        .get(name)
        .map(|c| c.value().to_string())
}

/// The sign-in form's CSRF cookie (double submit: the form carries the same value).
const LOGIN_COOKIE: &str = "otaforge_login";

/// A cookie as every cookie of the pages is set: HttpOnly and SameSite=Strict always,
/// Secure when the server is reached over https; `max_age` 0 removes it.
fn set_cookie(
    state: &AppState,
    response: &mut Response,
    name: &'static str,
    value: String,
    path: impl Into<std::borrow::Cow<'static, str>>,
    max_age: Duration,
) {
    let cookie = Cookie::build((name, value))
        .path(path)
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.config().public_url().starts_with("https://"))
        .max_age(cookie::time::Duration::seconds(max_age.as_secs() as i64))
        .build();
    if let Ok(v) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Headers every page carries: no framing, no sniffing, no referrer beyond the origin,
/// and scripts, styles and images only from the server itself (inline styles allowed:
/// the editor injects its theme as a `<style>` element; scripts never run inline).
async fn page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

impl Web {
    async fn from_headers(state: &AppState, headers: &HeaderMap) -> Option<Web> {
        let token = session_cookie(headers)?;
        let session = state.store().session(&digest(&token)).await.ok()??;
        let viewer = match (session.user_id, session.device_id) {
            (Some(user), _) => {
                let users = state.store().user_by_id(user).await.ok()??;
                Viewer::Operator(users)
            }
            (None, Some(device)) => {
                let device = state.store().device_by_id(device).await.ok()?;
                // Re-checked on every request: a blocked or disabled device's bot is out.
                if matches!(
                    device.status,
                    DeviceStatus::Blocked | DeviceStatus::Disabled
                ) {
                    return None;
                }
                Viewer::Bot(Box::new(device))
            }
            _ => return None,
        };
        Some(Web {
            viewer,
            csrf: session.csrf,
            address: None,
        })
    }

    fn name(&self) -> String {
        match &self.viewer {
            Viewer::Operator(u) => u.username.clone(),
            Viewer::Bot(d) => format!("bot {}", d.serial),
        }
    }

    /// The signed-in operator as the actor of a fleet operation.
    fn actor(&self) -> Result<crate::core::fleet::Actor, Response> {
        let user = self.operator()?;
        crate::core::fleet::Actor::of(user, self.address).map_err(|e| error_page(e, "/"))
    }

    fn operator(&self) -> Result<&User, Response> {
        match &self.viewer {
            Viewer::Operator(u) => Ok(u),
            Viewer::Bot(d) => Err(message(
                StatusCode::FORBIDDEN,
                "Not allowed",
                "a bot login opens only its own device's workspace",
                &format!("/workspace/{}/{}", d.product_id, d.serial),
            )),
        }
    }

    /// May this viewer open the device's workspace?
    fn may_open(&self, device: &Device) -> bool {
        match &self.viewer {
            Viewer::Operator(_) => true,
            Viewer::Bot(d) => d.id == device.id,
        }
    }

    /// An operator's form with its CSRF token.
    fn operator_form(&self, csrf: &str) -> Result<(), Response> {
        self.operator()?;
        self.check_csrf(csrf)
    }

    fn check_csrf(&self, token: &str) -> Result<(), Response> {
        if !token.is_empty()
            && crate::auth::constant_time_eq(token.as_bytes(), self.csrf.as_bytes())
        {
            Ok(())
        } else {
            Err(message(
                StatusCode::FORBIDDEN,
                "Form expired",
                "the form's security token did not match your session; reload the page and try again",
                "/",
            ))
        }
    }
}

impl FromRequestParts<AppState> for Web {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        match Web::from_headers(state, &parts.headers).await {
            Some(mut web) => {
                web.address = parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip());
                Ok(web)
            }
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

async fn start_session(
    state: &AppState,
    user: Option<Id>,
    device: Option<Id>,
    to: &str,
) -> Response {
    let (token, csrf) = match (random_secret(), random_secret()) {
        (Ok(t), Ok(c)) => (t, c),
        (Err(e), _) | (_, Err(e)) => return error_page(e, "/login"),
    };
    let session = Session {
        user_id: user,
        device_id: device,
        csrf,
        expires_at: now_millis() + SESSION_TTL.as_millis() as i64,
    };
    if let Err(e) = state
        .store()
        .create_session(&digest(&token), &session)
        .await
    {
        return error_page(e, "/login");
    }
    let mut response = Redirect::to(to).into_response();
    set_cookie(state, &mut response, COOKIE, token, "/", SESSION_TTL);
    response
}

// ---- sign-in ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
    kind: String,
    username: String,
    csrf: String,
}

async fn login_page(State(state): State<AppState>) -> Response {
    let token = match random_secret() {
        Ok(t) => t,
        Err(e) => return error_page(e, "/login"),
    };
    let mut response = page(LoginPage {
        error: None,
        kind: "operator".into(),
        username: String::new(),
        csrf: token.clone(),
    });
    set_cookie(
        &state,
        &mut response,
        LOGIN_COOKIE,
        token,
        "/login",
        Duration::from_secs(3600),
    );
    response
}

#[derive(Deserialize)]
struct LoginForm {
    kind: Option<String>,
    username: String,
    password: String,
    #[serde(default)]
    csrf: String,
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let kind = form.kind.unwrap_or_else(|| "operator".into());
    let refuse = |status: StatusCode, msg: &str| {
        let mut r = page(LoginPage {
            error: Some(msg.to_string()),
            kind: kind.clone(),
            username: form.username.clone(),
            csrf: form.csrf.clone(),
        });
        *r.status_mut() = status;
        r
    };
    // The form must come from our own sign-in page (its cookie and field match).
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if form.csrf.is_empty()
        || !crate::auth::constant_time_eq(form.csrf.as_bytes(), expected.as_bytes())
    {
        return message(
            StatusCode::FORBIDDEN,
            "Form expired",
            "the sign-in form's security token did not match; reload the sign-in page and try again",
            "/login",
        );
    }
    let status_of = |refusal: SignInRefusal| match refusal {
        SignInRefusal::Wrong => StatusCode::UNAUTHORIZED,
        SignInRefusal::Refused(Refused::RateLimited) => StatusCode::TOO_MANY_REQUESTS,
        SignInRefusal::Refused(Refused::Busy) => StatusCode::SERVICE_UNAVAILABLE,
        SignInRefusal::DeviceLocked(_) => StatusCode::FORBIDDEN,
    };
    if kind == "bot" {
        match state
            .sign_in_bot(&form.username, &form.password, peer.ip())
            .await
        {
            Ok(Ok(device)) => {
                let to = format!("/workspace/{}/{}", device.product_id, device.serial);
                start_session(&state, None, Some(device.id), &to).await
            }
            Ok(Err(refusal)) => refuse(status_of(refusal), refusal.message()),
            Err(e) => error_page(e, "/login"),
        }
    } else {
        match state
            .sign_in_operator(&form.username, &form.password, peer.ip())
            .await
        {
            Ok(Ok(user)) => start_session(&state, Some(user.id), None, "/").await,
            Ok(Err(refusal)) => refuse(status_of(refusal), refusal.message()),
            Err(e) => error_page(e, "/login"),
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(state): State<AppState>,
    web: Web,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Err(r) = web.check_csrf(&form.csrf) {
        return r;
    }
    if let Some(token) = session_cookie(&headers) {
        let _ = state.store().delete_session(&digest(&token)).await;
    }
    let mut r = Redirect::to("/login").into_response();
    set_cookie(&state, &mut r, COOKIE, String::new(), "/", Duration::ZERO);
    r
}

// ---- assets ----

async fn asset(ApiPath(name): ApiPath<String>) -> Response {
    let (body, kind): (&'static [u8], &str) = match name.as_str() {
        "editor.js" => (include_bytes!("../assets/editor.js"), "text/javascript"),
        "app.css" => (include_bytes!("../assets/app.css"), "text/css"),
        "copy.js" => (include_bytes!("../assets/copy.js"), "text/javascript"),
        "live.js" => (include_bytes!("../assets/live.js"), "text/javascript"),
        "upload.js" => (include_bytes!("../assets/upload.js"), "text/javascript"),
        "webtools.js" => (include_bytes!("../assets/webtools.js"), "text/javascript"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

// ---- dashboards ----

fn when(ms: Option<i64>) -> String {
    match ms {
        None => "never".into(),
        Some(ms) => {
            let ago = (now_millis() - ms).max(0) / 1000;
            match ago {
                0..=59 => format!("{ago} s ago"),
                60..=3599 => format!("{} min ago", ago / 60),
                3600..=86399 => format!("{} h ago", ago / 3600),
                _ => format!("{} days ago", ago / 86400),
            }
        }
    }
}

struct ProductRow {
    id: Id,
    name: String,
    devices: usize,
    firmware: usize,
    created: String,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Dashboard {
    username: String,
    csrf: String,
    notice: Option<String>,
    products: Vec<ProductRow>,
}

#[derive(Deserialize, Default)]
struct Notice {
    notice: Option<String>,
}

async fn home(State(state): State<AppState>, web: Web, Query(q): Query<Notice>) -> Response {
    if let Viewer::Bot(d) = &web.viewer {
        return Redirect::to(&format!("/workspace/{}/{}", d.product_id, d.serial)).into_response();
    }
    let store = state.store();
    let mut products = Vec::new();
    for p in store.list_products().await.unwrap_or_default() {
        products.push(ProductRow {
            devices: store
                .count_devices(p.id, &DeviceQuery::default())
                .await
                .unwrap_or(0) as usize,
            firmware: store
                .list_firmware(p.id)
                .await
                .map(|f| f.len())
                .unwrap_or(0),
            created: when(Some(p.created_at)),
            id: p.id,
            name: p.name,
        });
    }
    page(Dashboard {
        username: web.name(),
        csrf: web.csrf,
        notice: q.notice,
        products,
    })
}

#[derive(Deserialize)]
struct NameForm {
    csrf: String,
    name: String,
}

/// Text as a query value: whatever it holds (line feeds included), the URL stays valid.
fn query_value(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn notice_url(path: &str, notice: &str) -> String {
    format!("{path}?notice={}", query_value(notice))
}

/// A new secret (a product's API key, an operator's API token) on its way to the page it is
/// shown on, once: sealed with the server's key together with that page's path and the
/// session's form token (so that only this session's next view of that page opens it, on
/// whichever node), in a cookie for that path that lives two minutes. Never in a URL, never
/// stored in clear.
const SECRET_COOKIE: &str = "otaforge_new_secret";

/// A form whose confirmation box was left unticked (the browser requires it; a script
/// might not): nothing was done.
fn unconfirmed(title: &str, back: &str) -> Response {
    message(
        StatusCode::UNPROCESSABLE_ENTITY,
        title,
        "nothing was done: tick the box that confirms it, then send the form again",
        back,
    )
}

/// Redirects to `page`, which shows `secret` once (`secret_shown_once`).
fn show_once(state: &AppState, web: &Web, page: &str, secret: &str, notice: &str) -> Response {
    let mut response = Redirect::to(&notice_url(page, notice)).into_response();
    match state
        .inner
        .sealer
        .seal(format!("{page}\n{}\n{secret}", web.csrf).as_bytes())
    {
        Ok(sealed) => set_cookie(
            state,
            &mut response,
            SECRET_COOKIE,
            sealed,
            page.to_string(),
            Duration::from_secs(120),
        ),
        Err(e) => return ApiError::internal("sealing a new secret", e).into_response(),
    }
    response
}

/// The secret `show_once` sealed for this page and session, if the request carries it.
fn secret_shown_once(
    state: &AppState,
    web: &Web,
    headers: &HeaderMap,
    page: &str,
) -> Option<String> {
    let plain = state.inner.sealer.open(&cookie(headers, SECRET_COOKIE)?)?;
    let text = String::from_utf8(plain).ok()?;
    let mut parts = text.splitn(3, '\n');
    let (for_page, for_session, secret) = (parts.next()?, parts.next()?, parts.next()?);
    (for_page == page && for_session == web.csrf).then(|| secret.to_string())
}

/// After a page showed its secret: the browser forgets it.
fn forget_secret(state: &AppState, response: &mut Response, page: &str) {
    set_cookie(
        state,
        response,
        SECRET_COOKIE,
        String::new(),
        page.to_string(),
        Duration::ZERO,
    );
}

async fn create_product(
    State(state): State<AppState>,
    web: Web,
    axum::Form(form): axum::Form<NameForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match state.create_product(&actor, form.name.trim()).await {
        Ok((p, key)) => show_once(
            &state,
            &web,
            &format!("/products/{}", p.id),
            &key,
            &format!("product {} created", p.name),
        ),
        Err(e) => titled_error(e, "Not created", "/"),
    }
}

#[derive(Deserialize)]
struct DeleteProductForm {
    csrf: String,
    /// The product's name, typed again.
    confirm_name: String,
}

/// Deletes the product with everything in it, once its name was typed again.
async fn delete_product(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<DeleteProductForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    let Ok(found) = state.store().get_product(product).await else {
        return message(StatusCode::NOT_FOUND, "Not found", "no such product", "/");
    };
    if form.confirm_name.trim() != found.name {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not deleted",
            format!("type the product's name, {}, to delete it", found.name),
            &back,
        );
    }
    match state.delete_product(&actor, product).await {
        Ok(()) => Redirect::to(&notice_url("/", &format!("product {} deleted", found.name)))
            .into_response(),
        Err(e) => titled_error(e, "Not deleted", &back),
    }
}

#[derive(Deserialize)]
struct DeleteFirmwareForm {
    csrf: String,
    firmware_id: Id,
    confirm: Option<String>,
}

/// Deletes one firmware of the product (refused while a group, device or rollout uses it).
async fn delete_firmware(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<DeleteFirmwareForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    if form.confirm.is_none() {
        return unconfirmed("Not deleted", &back);
    }
    match state
        .delete_firmware(&actor, product, form.firmware_id)
        .await
    {
        Ok(()) => Redirect::to(&notice_url(&back, "firmware deleted")).into_response(),
        Err(e) => titled_error(e, "Not deleted", &back),
    }
}

#[derive(Deserialize)]
struct RotateForm {
    csrf: String,
    /// The box that says the old key stops working.
    confirm: Option<String>,
}

/// A new API key for the product (the old one stops working at once).
#[derive(Deserialize)]
struct FirmwareKeysForm {
    csrf: String,
    /// One key digest per line.
    #[serde(default)]
    digests: String,
}

/// Sets the key digests the product's firmware must be signed with.
async fn set_firmware_keys(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<FirmwareKeysForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    // One digest a line; blank lines and the spaces around a digest are not part of it.
    let digests = form
        .digests
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    match state.set_firmware_keys(&actor, product, digests).await {
        Ok(p) if p.firmware_keys.is_empty() => {
            Redirect::to(&notice_url(&back, "signed firmware is no longer required"))
                .into_response()
        }
        Ok(p) => Redirect::to(&notice_url(
            &back,
            &format!(
                "firmware must now be signed with one of {} key(s)",
                p.firmware_keys.len()
            ),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Not saved", &back),
    }
}

/// Renames the product.
async fn rename_product(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<NameForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    match state
        .rename_product(&actor, product, form.name.trim())
        .await
    {
        Ok(p) => {
            Redirect::to(&notice_url(&back, &format!("renamed to {}", p.name))).into_response()
        }
        Err(e) => titled_error(e, "Not renamed", &back),
    }
}

#[derive(Deserialize)]
struct BulkForm {
    csrf: String,
    /// The product page's filter the change applies to.
    #[serde(default)]
    q: String,
    #[serde(default)]
    status: String,
    action: String,
    #[serde(default, deserialize_with = "empty_as_none")]
    group_id: Option<Id>,
    confirm: Option<String>,
}

/// A change to every device the product page's filter shows (all its pages), through the
/// core's bulk operation, behind the confirmation box.
async fn bulk_devices(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<BulkForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut back = format!("/products/{product}");
    let search = form.q.trim();
    let status = match form.status.as_str() {
        "" => None,
        s => match DeviceStatus::parse(s) {
            Some(s) => Some(s),
            None => {
                return titled_error(
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("{s:?} is not a device status"),
                    ),
                    "Not changed",
                    &back,
                );
            }
        },
    };
    if !search.is_empty() || status.is_some() {
        back = format!(
            "{back}?q={}&status={}",
            query_value(search),
            query_value(&form.status)
        );
    }
    if form.confirm.is_none() {
        return unconfirmed("Not changed", &back);
    }
    let change = match crate::core::bulk::bulk_change(&form.action, form.group_id) {
        Ok(c) => c,
        Err(e) => return titled_error(e, "Not changed", &back),
    };
    let filter = DeviceQuery {
        search: (!search.is_empty()).then(|| search.to_string()),
        status,
        ..DeviceQuery::default()
    };
    match state
        .bulk_devices(&actor, product, &filter, true, change)
        .await
    {
        Ok(n) => {
            let said = format!("{} {n} devices", form.action);
            let sep = if back.contains('?') { '&' } else { '?' };
            Redirect::to(&format!("{back}{sep}notice={}", query_value(&said))).into_response()
        }
        Err(e) => titled_error(e, "Not changed", &back),
    }
}

async fn rotate_key(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<RotateForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    if form.confirm.is_none() {
        return message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not rotated",
            "tick the box that says devices with the old key stop updating, then rotate again",
            &back,
        );
    }
    match state.rotate_product_key(&actor, product).await {
        Ok((p, key)) => show_once(
            &state,
            &web,
            &format!("/products/{}", p.id),
            &key,
            "a new API key was made; the old one no longer works",
        ),
        Err(e) => titled_error(e, "Not rotated", &back),
    }
}

struct GroupRow {
    id: Id,
    name: String,
    devices: usize,
    firmware: String,
    /// (firmware id, version, assigned here)
    options: Vec<(Id, String, bool)>,
    /// (firmware id, version, one of the group's images for other families)
    others: Vec<(Id, String, bool)>,
}

struct DeviceRow {
    serial: String,
    status: &'static str,
    statuses: Vec<(&'static str, bool)>,
    group: String,
    version: String,
    last_seen: String,
}

#[derive(Template)]
#[template(path = "product.html")]
struct ProductPage {
    id: Id,
    name: String,
    /// Key digests its firmware must be signed with.
    firmware_keys: Vec<String>,
    username: String,
    csrf: String,
    notice: Option<String>,
    /// A key just made (the product created or its key rotated), shown this once.
    new_key: Option<String>,
    groups: Vec<GroupRow>,
    /// The device list's filters, how many devices they take, how many there are.
    search: String,
    /// (status, the list shows only it)
    status_options: Vec<(&'static str, bool)>,
    matching: i64,
    total_devices: i64,
    next_page: Option<String>,
    devices: Vec<DeviceRow>,
    /// The newest firmware (a page of it), and the link to the older.
    firmware: Vec<Firmware>,
    older_firmware: Option<String>,
    versions_chart: String,
    /// The newest rollouts (a page): (id, firmware version, state, stage "n of m"), and the
    /// link to the older.
    rollouts: Vec<(Id, String, String, String)>,
    older_rollouts: Option<String>,
}

/// The product page's query: a notice, and which devices its list shows.
#[derive(Deserialize)]
struct ProductQuery {
    notice: Option<String>,
    /// Serials containing this.
    q: Option<String>,
    status: Option<String>,
    cursor: Option<String>,
    /// Where the firmware and rollout lists continue (their older pages).
    firmware_cursor: Option<String>,
    rollouts_cursor: Option<String>,
}

/// Devices shown per page of the product page.
const DEVICES_PER_PAGE: i64 = 100;
/// Firmware and rollouts shown per page of the product page.
const LISTED_PER_PAGE: i64 = 20;
/// The newest firmware a group's choice offers (with whatever the group has now).
const FIRMWARE_CHOICES: i64 = 100;

async fn product_page(
    State(state): State<AppState>,
    web: Web,
    headers: HeaderMap,
    ApiPath(product): ApiPath<Id>,
    Query(q): Query<ProductQuery>,
) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    let store = state.store();
    let _ = state.flush_telemetry().await;
    let Ok(p) = store.get_product(product).await else {
        return message(StatusCode::NOT_FOUND, "Not found", "no such product", "/");
    };
    let groups = store.list_groups(product).await.unwrap_or_default();
    let search = q.q.as_deref().map(str::trim).filter(|t| !t.is_empty());
    let status = q
        .status
        .as_deref()
        .and_then(otaforge_store::model::DeviceStatus::parse);
    let back = format!("/products/{product}");
    let query = DeviceQuery {
        search: search.map(|t| t.chars().take(64).collect()),
        status,
        after: match crate::page::decode(q.cursor.as_deref()) {
            Ok(after) => after,
            Err(e) => return titled_error(e, "Invalid page", &back),
        },
        limit: DEVICES_PER_PAGE + 1,
        ..DeviceQuery::default()
    };
    // The charts and counts come from the database's tally, read beside the one page of the
    // list; the page counts what it matched only when filtered (else the tally's sum says).
    let filtered = search.is_some() || status.is_some();
    let (tally, shown) = tokio::join!(
        store.device_tally(product),
        state.device_page(product, &query, DEVICES_PER_PAGE, filtered)
    );
    let tally = tally.unwrap_or_default();
    let shown = match shown {
        Ok(page) => page,
        Err(e) => return titled_error(e, "Not listed", &back),
    };
    let total_devices: i64 = tally.iter().map(|t| t.count).sum();
    let matching = shown.total.unwrap_or(total_devices);
    let next_page = shown.next.as_ref().map(|cursor| {
        let mut url = form_urlencoded::Serializer::new(String::new());
        if let Some(t) = search {
            url.append_pair("q", t);
        }
        if let Some(s) = status {
            url.append_pair("status", s.as_str());
        }
        url.append_pair("cursor", cursor);
        format!("/products/{product}?{}", url.finish())
    });
    let devices = shown.items;
    let (firmware_before, rollouts_before) = match (
        crate::page::decode::<Id>(q.firmware_cursor.as_deref()),
        crate::page::decode::<Id>(q.rollouts_cursor.as_deref()),
    ) {
        (Ok(f), Ok(r)) => (f, r),
        (Err(e), _) | (_, Err(e)) => return titled_error(e, "Invalid page", &back),
    };
    let every = otaforge_store::model::FirmwareFilter::default();
    let newest =
        |before: Option<Id>, limit: i64| store.firmware_page(product, &every, before, limit);
    let (listed, choices, rollout_rows) = tokio::join!(
        newest(firmware_before, LISTED_PER_PAGE + 1),
        newest(None, FIRMWARE_CHOICES),
        store.rollout_page(product, None, rollouts_before, LISTED_PER_PAGE + 1)
    );
    // Pages as the API cuts them (one more row than shown says there is an older page).
    let listed = crate::page::of(listed.unwrap_or_default(), LISTED_PER_PAGE, |f| f.id, |f| f);
    let rollout_rows = crate::page::of(
        rollout_rows.unwrap_or_default(),
        LISTED_PER_PAGE,
        |r| r.id,
        |r| r,
    );
    let older = |name: &str, cursor: Option<String>| {
        cursor.map(|c| format!("/products/{product}?{name}={c}"))
    };
    let older_firmware = older("firmware_cursor", listed.next);
    let older_rollouts = older("rollouts_cursor", rollout_rows.next);
    let (listed, rollout_rows) = (listed.items, rollout_rows.items);
    // What the page names: the choices, and whatever older firmware a group or a listed
    // rollout has.
    let mut firmware = choices.unwrap_or_default();
    let named = groups
        .iter()
        .flat_map(|g| g.firmware_id.iter().chain(&g.other_firmware_ids))
        .chain(rollout_rows.iter().map(|r| &r.firmware_id))
        .copied()
        .collect::<std::collections::BTreeSet<Id>>();
    for id in named {
        if !firmware.iter().any(|f| f.id == id)
            && let Ok(f) = store.get_firmware(product, id).await
        {
            firmware.push(f);
        }
    }
    let versions_chart = {
        use crate::svg::{Bar, stacked_bars};
        const COLORS: [&str; 6] = [
            "#2563eb", "#16a34a", "#f59e0b", "#9333ea", "#dc2626", "#64748b",
        ];
        // The six versions most devices run.
        let mut by_version: std::collections::BTreeMap<String, i64> = Default::default();
        for t in &tally {
            let v = t.version.clone().unwrap_or_else(|| "unknown".into());
            *by_version.entry(v).or_default() += t.count;
        }
        let mut versions: Vec<(String, i64)> = by_version.into_iter().collect();
        versions.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut versions: Vec<String> = versions.into_iter().take(6).map(|(v, _)| v).collect();
        versions.sort();
        let names: Vec<&String> = versions.iter().take(6).collect();
        let bars: Vec<Bar> = groups
            .iter()
            .map(|g| Bar {
                label: g.name.clone(),
                segments: names
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let n = tally
                            .iter()
                            .filter(|t| {
                                t.group_id == g.id
                                    && t.version.as_deref().unwrap_or("unknown") == v.as_str()
                            })
                            .map(|t| t.count.max(0) as u64)
                            .sum();
                        (n, COLORS[i % COLORS.len()], (*v).clone())
                    })
                    .collect(),
            })
            .collect();
        stacked_bars("devices per running version", &bars)
    };
    let rollouts = rollout_rows
        .into_iter()
        .map(|r| {
            let fw = firmware
                .iter()
                .find(|f| f.id == r.firmware_id)
                .map(|f| f.version.clone())
                .unwrap_or_default();
            (
                r.id,
                fw,
                r.state.as_str().to_string(),
                format!("{} of {}", r.current_stage + 1, r.stages.len()),
            )
        })
        .collect();
    let version_of = |id: Option<Id>| {
        id.and_then(|id| firmware.iter().find(|f| f.id == id))
            .map(|f| f.version.clone())
            .unwrap_or_else(|| "none".into())
    };
    let new_key = secret_shown_once(&state, &web, &headers, &format!("/products/{product}"));
    let mut response = page(ProductPage {
        id: p.id,
        firmware_keys: p.firmware_keys,
        name: p.name,
        username: web.name(),
        csrf: web.csrf.clone(),
        notice: q.notice,
        new_key: new_key.clone(),
        search: search.unwrap_or_default().to_string(),
        status_options: ["new", "verified", "blocked", "disabled"]
            .into_iter()
            .map(|s| (s, status.is_some_and(|f| f.as_str() == s)))
            .collect(),
        matching,
        total_devices,
        next_page,
        groups: groups
            .iter()
            .map(|g| GroupRow {
                id: g.id,
                name: g.name.clone(),
                devices: tally
                    .iter()
                    .filter(|t| t.group_id == g.id)
                    .map(|t| t.count.max(0) as usize)
                    .sum(),
                firmware: std::iter::once(version_of(g.firmware_id))
                    .chain(g.other_firmware_ids.iter().map(|id| version_of(Some(*id))))
                    .collect::<Vec<_>>()
                    .join(" + "),
                options: firmware
                    .iter()
                    .map(|f| (f.id, f.version.clone(), Some(f.id) == g.firmware_id))
                    .collect(),
                others: firmware
                    .iter()
                    .map(|f| {
                        let chosen = g.other_firmware_ids.contains(&f.id);
                        (f.id, f.version.clone(), chosen)
                    })
                    .collect(),
            })
            .collect(),
        devices: devices
            .iter()
            .map(|d| DeviceRow {
                serial: d.serial.clone(),
                status: d.status.as_str(),
                statuses: ["new", "verified", "blocked", "disabled"]
                    .into_iter()
                    .map(|s| (s, s == d.status.as_str()))
                    .collect(),
                group: groups
                    .iter()
                    .find(|g| g.id == d.group_id)
                    .map(|g| g.name.clone())
                    .unwrap_or_default(),
                version: d.telemetry.version.clone().unwrap_or_else(|| "-".into()),
                last_seen: when(d.telemetry.last_seen),
            })
            .collect(),
        firmware: listed,
        older_firmware,
        versions_chart,
        rollouts,
        older_rollouts,
    });
    if new_key.is_some() {
        forget_secret(&state, &mut response, &format!("/products/{product}"));
    }
    response
}

#[derive(Template)]
#[template(path = "group.html")]
struct GroupPage {
    product_id: Id,
    product_name: String,
    id: Id,
    name: String,
    is_default: bool,
    /// The configuration as shown in the editor (pretty JSON, or what was typed when it
    /// was refused).
    config: String,
    /// The files devices of the group fetch by their key (`fk`).
    resources: Vec<Resource>,
    username: String,
    csrf: String,
    notice: Option<String>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct NoticeQuery {
    notice: Option<String>,
}

/// A group's page: rename, its configuration, delete. `typed`: a refused configuration,
/// shown again as it was typed with `error`.
async fn render_group(
    state: &AppState,
    web: &Web,
    product: Id,
    group: Id,
    notice: Option<String>,
    refused: Option<(String, String)>,
) -> Response {
    let back = format!("/products/{product}");
    let (Ok(p), Ok(g)) = (
        state.store().get_product(product).await,
        state.store().get_group(product, group).await,
    ) else {
        return message(StatusCode::NOT_FOUND, "Not found", "no such group", &back);
    };
    let status = if refused.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let (config, error) = match refused {
        Some((typed, why)) => (typed, Some(why)),
        None => (
            serde_json::to_string_pretty(&g.config).unwrap_or_default(),
            None,
        ),
    };
    let resources = state
        .store()
        .list_resources(group)
        .await
        .unwrap_or_default();
    let mut response = page(GroupPage {
        resources,
        product_id: product,
        product_name: p.name,
        id: g.id,
        name: g.name,
        is_default: g.is_default,
        config,
        username: web.name(),
        csrf: web.csrf.clone(),
        notice,
        error,
    });
    *response.status_mut() = status;
    response
}

/// Adds a resource to the group: the uploaded file, under the typed name or its own.
async fn upload_resource(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    multipart: Multipart,
) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    let here = format!("/products/{product}/groups/{group}");
    let form = match UploadForm::read(&state, &web, multipart, &here).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let typed = form
        .text("name")
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let Some((filename, bytes)) = form.file else {
        return message(StatusCode::BAD_REQUEST, "No file", "choose a file", &here);
    };
    let name = if typed.is_empty() { filename } else { typed };
    let actor = match web.actor() {
        Ok(a) => a,
        Err(r) => return r,
    };
    match state
        .add_resource(&actor, product, group, &name, bytes.into())
        .await
    {
        Ok(r) => Redirect::to(&notice_url(
            &here,
            &format!("resource {} added ({} bytes)", r.name, r.size),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Not added", &here),
    }
}

/// Deletes one of the group's resources, behind its confirmation box.
async fn delete_resource(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, group, resource)): ApiPath<(Id, Id, Id)>,
    axum::Form(form): axum::Form<ConfirmForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let here = format!("/products/{product}/groups/{group}");
    if form.confirm.is_none() {
        return unconfirmed("Not deleted", &here);
    }
    match state
        .delete_resource(&actor, product, group, resource)
        .await
    {
        Ok(()) => Redirect::to(&notice_url(&here, "resource deleted")).into_response(),
        Err(e) => titled_error(e, "Not deleted", &here),
    }
}

async fn group_page(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    Query(q): Query<NoticeQuery>,
) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    render_group(&state, &web, product, group, q.notice, None).await
}

#[derive(Deserialize)]
struct GroupForm {
    csrf: String,
    name: Option<String>,
    config: Option<String>,
    confirm: Option<String>,
}

/// `rename`, `config` (a JSON object; a refused one is shown again as typed) or `delete`
/// (with the confirmation box), through the core's group operations.
async fn group_action(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, group, action)): ApiPath<(Id, Id, String)>,
    axum::Form(form): axum::Form<GroupForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let here = format!("/products/{product}/groups/{group}");
    // A configuration as typed, shown again if the core refuses it.
    let mut typed_config = None;
    let change = match action.as_str() {
        "rename" => crate::core::fleet::GroupChange {
            name: Some(form.name.unwrap_or_default()),
            ..Default::default()
        },
        "config" => {
            let typed = form.config.unwrap_or_default();
            match serde_json::from_str::<serde_json::Value>(&typed) {
                Ok(config) => {
                    typed_config = Some(typed);
                    crate::core::fleet::GroupChange {
                        config: Some(config),
                        ..Default::default()
                    }
                }
                Err(e) => {
                    let why = format!("not saved: the configuration is not valid JSON ({e})");
                    return render_group(&state, &web, product, group, None, Some((typed, why)))
                        .await;
                }
            }
        }
        "delete" => {
            if form.confirm.is_none() {
                return unconfirmed("Not deleted", &here);
            }
            return match state.delete_group(&actor, product, group).await {
                Ok(()) => Redirect::to(&notice_url(
                    &format!("/products/{product}"),
                    "group deleted; its devices are in the default group now",
                ))
                .into_response(),
                Err(e) => titled_error(e, "Not deleted", &here),
            };
        }
        _ => {
            return message(
                StatusCode::NOT_FOUND,
                "Not found",
                "no such group action",
                &here,
            );
        }
    };
    match (
        state.change_group(&actor, product, group, change).await,
        typed_config,
    ) {
        (Ok(_), _) => Redirect::to(&notice_url(&here, "saved")).into_response(),
        (Err(e), Some(typed)) if e.status.is_client_error() => {
            let why = format!("not saved: {}", e.message);
            render_group(&state, &web, product, group, None, Some((typed, why))).await
        }
        (Err(e), _) => titled_error(e, "Not changed", &here),
    }
}

/// The rollout form's fields, as typed (a GET for the dry run, the same fields posted to
/// start it).
#[derive(Deserialize, Default, Clone)]
struct RolloutForm {
    #[serde(default, deserialize_with = "empty_as_none")]
    firmware_id: Option<Id>,
    #[serde(default, deserialize_with = "empty_as_none")]
    group_id: Option<Id>,
    #[serde(default)]
    stages: String,
    #[serde(default)]
    success: String,
    #[serde(default)]
    failure: String,
    #[serde(default)]
    window: String,
    #[serde(default)]
    rate: String,
    approval: Option<String>,
    rollback: Option<String>,
    confirm: Option<String>,
    csrf: Option<String>,
}

fn empty_as_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Id>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(t) => t.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

impl RolloutForm {
    /// The REST body these fields stand for (the core checks the values).
    fn body(&self, dry_run: bool) -> Result<crate::rollouts::NewRolloutBody, String> {
        let firmware_id = self.firmware_id.ok_or("choose the firmware to roll out")?;
        let share = |text: &str, default: f64, what: &str| -> Result<f64, String> {
            match text.trim() {
                "" => Ok(default),
                t => t
                    .parse::<f64>()
                    .map(|p| p / 100.0)
                    .map_err(|_| format!("{what} is a percentage, not {t:?}")),
            }
        };
        let success = share(
            &self.success,
            StageSpec::DEFAULT_SUCCESS,
            "the share that passes a stage",
        )?;
        let failure = share(
            &self.failure,
            StageSpec::DEFAULT_FAILURE,
            "the share that halts it",
        )?;
        let window_secs = match self.window.trim() {
            "" => 0,
            t => t
                .parse::<u64>()
                .map_err(|_| format!("a stage's time is whole minutes, not {t:?}"))?
                .saturating_mul(60),
        };
        let rate_per_minute = match self.rate.trim() {
            "" => None,
            t => Some(
                t.parse::<i64>()
                    .map_err(|_| format!("the rate is devices a minute, not {t:?}"))?,
            ),
        };
        let stages = self
            .stages
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                Ok(StageSpec {
                    size: s.parse()?,
                    success_threshold: success,
                    failure_threshold: failure,
                    window_secs,
                    auto_advance: self.approval.is_none(),
                    auto_rollback: self.rollback.is_some(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(crate::rollouts::NewRolloutBody {
            firmware_id,
            other_firmware_ids: Vec::new(),
            target: otaforge_store::model::RolloutTarget {
                group_id: self.group_id,
                ..Default::default()
            },
            stages,
            rate_per_minute,
            dry_run,
            seed: None,
            preview: Some(5),
        })
    }
}

use otaforge_store::model::StageSpec;

#[derive(Template)]
#[template(path = "rollout_new.html")]
struct NewRolloutPage {
    product_id: Id,
    product_name: String,
    username: String,
    csrf: String,
    /// (id, version, chosen)
    firmware: Vec<(Id, String, bool)>,
    /// (id, name, chosen)
    groups: Vec<(Id, String, bool)>,
    form: RolloutForm,
    preview: Option<crate::rollouts::DryRun>,
    error: Option<String>,
}

/// The rollout form, and once it names a firmware, the dry run of what it asks for (the
/// core's own plan: the same devices the start will pick).
async fn new_rollout(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    Query(mut form): Query<RolloutForm>,
) -> Response {
    let actor = match web.operator().and_then(|_| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let store = state.store();
    let Ok(p) = store.get_product(product).await else {
        return message(StatusCode::NOT_FOUND, "Not found", "no such product", "/");
    };
    if form.stages.trim().is_empty() {
        form.stages = "10, 300, rest".into();
    }
    for (field, default) in [
        (&mut form.success, StageSpec::DEFAULT_SUCCESS),
        (&mut form.failure, StageSpec::DEFAULT_FAILURE),
    ] {
        if field.trim().is_empty() {
            *field = (default * 100.0).to_string();
        }
    }
    if form.window.trim().is_empty() {
        form.window = "0".into();
    }
    let every = otaforge_store::model::FirmwareFilter::default();
    let listed = store
        .firmware_page(product, &every, None, 50)
        .await
        .unwrap_or_default();
    let groups = store.list_groups(product).await.unwrap_or_default();
    let (mut preview, mut error, mut status) = (None, None, StatusCode::OK);
    if form.firmware_id.is_some() {
        match form.body(true) {
            Err(why) => (error, status) = (Some(why), StatusCode::UNPROCESSABLE_ENTITY),
            Ok(body) => match state.start_rollout(&actor, product, body).await {
                Ok(crate::rollouts::Planned::DryRun(dry)) => preview = Some(dry),
                Ok(crate::rollouts::Planned::Started { .. }) => {}
                Err(e) => (error, status) = (Some(e.message), e.status),
            },
        }
    }
    let mut response = page(NewRolloutPage {
        product_id: product,
        product_name: p.name,
        username: web.name(),
        csrf: web.csrf.clone(),
        firmware: listed
            .iter()
            .map(|f| (f.id, f.version.clone(), Some(f.id) == form.firmware_id))
            .collect(),
        groups: groups
            .iter()
            .map(|g| {
                let chosen = form.group_id.map_or(g.is_default, |id| id == g.id);
                (g.id, g.name.clone(), chosen)
            })
            .collect(),
        form,
        preview,
        error,
    });
    *response.status_mut() = status;
    response
}

/// Starts the rollout the dry run showed, behind its confirmation box.
async fn start_rollout(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<RolloutForm>,
) -> Response {
    let actor = match web
        .operator_form(form.csrf.as_deref().unwrap_or(""))
        .and_then(|()| web.actor())
    {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}/rollouts/new");
    if form.confirm.is_none() {
        return unconfirmed("Not started", &back);
    }
    let body = match form.body(false) {
        Ok(body) => body,
        Err(why) => return message(StatusCode::UNPROCESSABLE_ENTITY, "Not started", why, &back),
    };
    match state.start_rollout(&actor, product, body).await {
        Ok(crate::rollouts::Planned::Started { rollout, .. }) => Redirect::to(&notice_url(
            &format!("/products/{product}/rollouts/{}", rollout.id),
            "rollout started",
        ))
        .into_response(),
        Ok(crate::rollouts::Planned::DryRun(_)) => Redirect::to(&back).into_response(),
        Err(e) => titled_error(e, "Not started", &back),
    }
}

#[derive(Template)]
#[template(path = "rollout.html")]
struct RolloutPage {
    id: Id,
    product_id: Id,
    product_name: String,
    username: String,
    csrf: String,
    firmware: String,
    state: String,
    message: String,
    current_stage: i64,
    stage_count: usize,
    rate: Option<i64>,
    created_by: String,
    created: String,
    chart: String,
    stages: Vec<(usize, crate::rollout_plan::StageCounts, String)>,
    actions: Vec<&'static str>,
}

async fn rollout_page(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, rollout)): ApiPath<(Id, Id)>,
) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    let store = state.store();
    let back = format!("/products/{product}");
    let r = match store.get_rollout(rollout).await {
        Ok(r) if r.product_id == product => r,
        _ => return message(StatusCode::NOT_FOUND, "Not found", "no such rollout", &back),
    };
    let counts = crate::rollout_plan::tally(store.member_counts(r.id).await.unwrap_or_default());
    let firmware = store
        .get_firmware(product, r.firmware_id)
        .await
        .map(|f| f.version)
        .unwrap_or_default();
    let mut bars = Vec::new();
    let mut stages = Vec::new();
    for (i, spec) in r.stages.iter().enumerate() {
        let c = counts.get(&(i as i64)).copied().unwrap_or_default();
        bars.push(crate::svg::Bar {
            label: format!("stage {}", i + 1),
            segments: vec![
                (c.succeeded, "#16a34a", "succeeded".into()),
                (c.downloaded, "#22d3ee", "downloaded".into()),
                (c.offered, "#2563eb", "offered".into()),
                (c.pending, "#cbd5e1", "pending".into()),
                (c.rolled_back, "#dc2626", "rolled back".into()),
                (c.failed, "#f59e0b", "failed".into()),
            ],
        });
        let gates = format!(
            "succeed {:.0}%, halt at {:.0}%{}{}{}",
            spec.success_threshold * 100.0,
            spec.failure_threshold * 100.0,
            if spec.window_secs > 0 {
                format!(", soak {} s", spec.window_secs)
            } else {
                String::new()
            },
            if spec.auto_advance {
                ""
            } else {
                ", needs approval"
            },
            if r.rolled_back_stages.contains(&(i as i64)) {
                ", rolled back"
            } else if spec.auto_rollback {
                ", auto-rollback"
            } else {
                ""
            },
        );
        stages.push((i + 1, c, gates));
    }
    use RolloutState::*;
    let actions = match r.state {
        Running => vec!["pause", "cancel"],
        AwaitingApproval => vec!["approve", "pause", "cancel"],
        Paused | Halted => vec!["resume", "cancel"],
        Cancelled | Completed => vec![],
    };
    page(RolloutPage {
        id: r.id,
        product_id: product,
        product_name: store
            .get_product(product)
            .await
            .map(|p| p.name)
            .unwrap_or_default(),
        username: web.name(),
        csrf: web.csrf.clone(),
        firmware,
        state: r.state.as_str().into(),
        message: r.message.clone(),
        current_stage: r.current_stage + 1,
        stage_count: r.stages.len(),
        rate: r.rate_per_minute,
        created_by: r.created_by.clone(),
        created: when(Some(r.created_at)),
        chart: crate::svg::stacked_bars("devices per stage", &bars),
        stages,
        actions,
    })
}

#[derive(Deserialize)]
struct ConfirmForm {
    csrf: String,
    confirm: Option<String>,
}

/// Pause, resume, approve or cancel, behind the rollout page's confirmation box.
async fn rollout_action(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, rollout, action)): ApiPath<(Id, Id, String)>,
    axum::Form(form): axum::Form<ConfirmForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}/rollouts/{rollout}");
    if form.confirm.is_none() {
        return unconfirmed("Not done", &back);
    }
    match crate::rollouts::apply_action(&state, &actor, product, rollout, &action).await {
        Ok(_) => Redirect::to(&back).into_response(),
        Err(e) => titled_error(e, "Not done", &back),
    }
}

struct AccountRow {
    id: Id,
    username: String,
    role: Role,
    since: String,
    is_me: bool,
}

#[derive(Template)]
#[template(path = "accounts.html")]
struct AccountsPage {
    username: String,
    csrf: String,
    notice: Option<String>,
    role: &'static str,
    is_admin: bool,
    /// The server's admin token has no account, so no tokens of its own.
    can_have_tokens: bool,
    new_token: Option<String>,
    /// (id, account, made, expires)
    tokens: Vec<(String, String, String, String)>,
    accounts: Vec<AccountRow>,
    roles: Vec<&'static str>,
}

const ACCOUNTS: &str = "/accounts";

/// Operator accounts and API tokens: everyone sees the accounts and their own tokens (an
/// admin: everyone's), makes and revokes tokens; admins add accounts, change roles and
/// passwords, delete accounts. Every change goes through the core's account operations.
async fn accounts_page(
    State(state): State<AppState>,
    web: Web,
    headers: HeaderMap,
    Query(q): Query<NoticeQuery>,
) -> Response {
    let user = match web.operator() {
        Ok(u) => u.clone(),
        Err(r) => return r,
    };
    let (tokens, accounts) =
        match tokio::try_join!(state.list_tokens(&user), state.list_operators()) {
            Ok(both) => both,
            Err(e) => return error_page(e, "/"),
        };
    let new_token = secret_shown_once(&state, &web, &headers, ACCOUNTS);
    let mut response = page(AccountsPage {
        username: user.username.clone(),
        csrf: web.csrf.clone(),
        notice: q.notice,
        role: user.role.as_str(),
        is_admin: user.is_admin(),
        can_have_tokens: user.id != 0,
        tokens: tokens
            .into_iter()
            .map(|t| {
                (
                    t.id,
                    t.username,
                    when(Some(t.created_at)),
                    until(t.expires_at),
                )
            })
            .collect(),
        accounts: accounts
            .into_iter()
            .map(|a| AccountRow {
                is_me: a.id == user.id,
                id: a.id,
                username: a.username,
                role: a.role,
                since: when(Some(a.created_at)),
            })
            .collect(),
        roles: Role::ALL.iter().map(|r| r.as_str()).collect(),
        new_token: new_token.clone(),
    });
    if new_token.is_some() {
        forget_secret(&state, &mut response, ACCOUNTS);
    }
    response
}

/// "in 3 days", from a time ahead.
fn until(ms: Millis) -> String {
    let left = (ms - now_millis()).max(0) / 1000;
    match left {
        0..=3599 => format!("in {} min", left / 60),
        3600..=86399 => format!("in {} h", left / 3600),
        _ => format!("in {} days", left / 86400),
    }
}

#[derive(Deserialize)]
struct AccountForm {
    csrf: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    role: String,
    days: Option<i64>,
    confirm: Option<String>,
}

fn role_of(text: &str) -> Result<Role, ApiError> {
    Role::parse(text).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{text:?} is not a role: admin, operator or viewer"),
        )
    })
}

/// `POST /accounts`: an admin adds an account.
async fn create_account(
    State(state): State<AppState>,
    web: Web,
    axum::Form(form): axum::Form<AccountForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let made = match role_of(&form.role) {
        Ok(role) => {
            state
                .create_operator(&actor, form.username.trim(), &form.password, role)
                .await
        }
        Err(e) => Err(e),
    };
    match made {
        Ok(u) => Redirect::to(&notice_url(
            ACCOUNTS,
            &format!("account {} added ({})", u.username, u.role.as_str()),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Not added", ACCOUNTS),
    }
}

/// `POST /accounts/{id}/change` (role, and a password when one is typed) or
/// `/accounts/{id}/delete` (behind its box): admins only, as the core decides.
async fn account_action(
    State(state): State<AppState>,
    web: Web,
    ApiPath((id, action)): ApiPath<(Id, String)>,
    axum::Form(form): axum::Form<AccountForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let done = match action.as_str() {
        "change" => match role_of(&form.role) {
            Ok(role) => {
                let password = Some(form.password.as_str()).filter(|p| !p.is_empty());
                state
                    .change_operator(&actor, id, Some(role), password)
                    .await
                    .map(|u| format!("account {} saved ({})", u.username, u.role.as_str()))
            }
            Err(e) => Err(e),
        },
        "delete" => {
            if form.confirm.is_none() {
                return unconfirmed("Not deleted", ACCOUNTS);
            }
            state
                .delete_operator(&actor, id)
                .await
                .map(|()| "account deleted".to_string())
        }
        _ => return not_found(HeaderMap::new()).await,
    };
    match done {
        Ok(said) => Redirect::to(&notice_url(ACCOUNTS, &said)).into_response(),
        Err(e) => titled_error(e, "Not done", ACCOUNTS),
    }
}

/// `POST /accounts/tokens`: a new API token for the signed-in account, shown once.
async fn make_token(
    State(state): State<AppState>,
    web: Web,
    axum::Form(form): axum::Form<AccountForm>,
) -> Response {
    if let Err(r) = web.operator_form(&form.csrf) {
        return r;
    }
    let user = match web.operator() {
        Ok(u) => u.clone(),
        Err(r) => return r,
    };
    match state.issue_token(&user, form.days).await {
        Ok((token, _)) => show_once(&state, &web, ACCOUNTS, &token, "a new API token was made"),
        Err(e) => titled_error(e, "Not made", ACCOUNTS),
    }
}

/// `POST /accounts/tokens/{id}/revoke`.
async fn revoke_token(
    State(state): State<AppState>,
    web: Web,
    ApiPath(id): ApiPath<String>,
    axum::Form(form): axum::Form<AccountForm>,
) -> Response {
    if let Err(r) = web.operator_form(&form.csrf) {
        return r;
    }
    let user = match web.operator() {
        Ok(u) => u.clone(),
        Err(r) => return r,
    };
    match state.revoke_token(&user, web.address, &id).await {
        Ok(()) => Redirect::to(&notice_url(ACCOUNTS, "token revoked")).into_response(),
        Err(e) => titled_error(e, "Not revoked", ACCOUNTS),
    }
}

#[derive(Template)]
#[template(path = "audit.html")]
struct AuditPage {
    username: String,
    csrf: String,
    entries: Vec<(String, String, String, String, String)>,
}

async fn audit_page(State(state): State<AppState>, web: Web) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    let entries = state
        .store()
        .audit_log(None, 500)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|a| (when(Some(a.at)), a.actor, a.action, a.subject, a.detail))
        .collect();
    page(AuditPage {
        username: web.name(),
        csrf: web.csrf.clone(),
        entries,
    })
}

async fn create_group(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<NameForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    match state.create_group(&actor, product, form.name.trim()).await {
        Ok(g) => {
            Redirect::to(&notice_url(&back, &format!("group {} created", g.name))).into_response()
        }
        Err(e) => titled_error(e, "Not created", &back),
    }
}

/// The assign form: `csrf`, `firmware_id` (empty: none) and any number of
/// `other_firmware_id` (the group's images for other families).
async fn assign(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, group)): ApiPath<(Id, Id)>,
    axum::Form(form): axum::Form<Vec<(String, String)>>,
) -> Response {
    fn field<'a>(form: &'a [(String, String)], name: &'a str) -> impl Iterator<Item = &'a str> {
        form.iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.trim())
    }
    let csrf = field(&form, "csrf").next().unwrap_or_default();
    let actor = match web.operator_form(csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    let invalid = || {
        message(
            StatusCode::BAD_REQUEST,
            "Invalid firmware",
            "pick a firmware from the list",
            &back,
        )
    };
    let firmware_id = match field(&form, "firmware_id").next().unwrap_or_default() {
        "" => None,
        id => match id.parse() {
            Ok(id) => Some(id),
            Err(_) => return invalid(),
        },
    };
    let Ok(others) = field(&form, "other_firmware_id")
        .filter(|v| !v.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Id>, _>>()
    else {
        return invalid();
    };
    let change = crate::core::fleet::GroupChange {
        firmware_id: Some(firmware_id),
        other_firmware_ids: Some(others),
        ..Default::default()
    };
    match state.change_group(&actor, product, group, change).await {
        Ok(_) => Redirect::to(&notice_url(&back, "firmware assigned")).into_response(),
        Err(e) => titled_error(e, "Not assigned", &back),
    }
}

#[derive(Deserialize)]
struct DeviceForm {
    csrf: String,
    serial: String,
    password: Option<String>,
}

async fn create_device(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    axum::Form(form): axum::Form<DeviceForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    let spec = crate::core::fleet::DeviceSpec {
        serial: form.serial.trim().to_string(),
        group_id: None,
        password: form.password.filter(|p| !p.is_empty()),
        status: DeviceStatus::Verified,
    };
    match state.register_device(&actor, product, spec).await {
        Ok(d) => Redirect::to(&notice_url(
            &back,
            &format!("device {} registered", d.serial),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Not registered", &back),
    }
}

#[derive(Deserialize)]
struct StatusForm {
    csrf: String,
    status: String,
}

async fn set_status(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    axum::Form(form): axum::Form<StatusForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/products/{product}");
    let Some(status) = DeviceStatus::parse(&form.status) else {
        return message(
            StatusCode::BAD_REQUEST,
            "Invalid status",
            "new, verified, blocked or disabled",
            &back,
        );
    };
    let change = crate::core::fleet::DeviceChange {
        status: Some(status),
        ..Default::default()
    };
    match state.change_device(&actor, product, &serial, change).await {
        Ok(_) => Redirect::to(&notice_url(
            &back,
            &format!("{serial} is now {}", status.as_str()),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Not changed", &back),
    }
}

#[derive(Deserialize)]
struct DeviceActionForm {
    csrf: String,
    group_id: Option<Id>,
    password: Option<String>,
    /// The box that confirms a deletion.
    confirm: Option<String>,
}

/// An operator's change to one device from its workspace: `move` (to `group_id`),
/// `password` (sets it; its bot sessions end) or `delete` (with the confirmation box).
async fn device_action(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial, action)): ApiPath<(Id, String, String)>,
    axum::Form(form): axum::Form<DeviceActionForm>,
) -> Response {
    let actor = match web.operator_form(&form.csrf).and_then(|()| web.actor()) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let back = format!("/workspace/{product}/{}", query_value(&serial));
    let refuse = |why: &str| message(StatusCode::UNPROCESSABLE_ENTITY, "Not changed", why, &back);
    let change = match action.as_str() {
        "move" => match form.group_id {
            Some(group) => crate::core::fleet::DeviceChange {
                group_id: Some(group),
                ..Default::default()
            },
            None => return refuse("choose the group to move the device to"),
        },
        "password" => match form.password.filter(|p| !p.is_empty()) {
            Some(password) => crate::core::fleet::DeviceChange {
                password: Some(Some(password)),
                ..Default::default()
            },
            None => return refuse("type the new password"),
        },
        "delete" => {
            if form.confirm.is_none() {
                return unconfirmed("Not deleted", &back);
            }
            return match state.delete_device(&actor, product, &serial).await {
                Ok(()) => Redirect::to(&notice_url(
                    &format!("/products/{product}"),
                    &format!("{serial} deleted"),
                ))
                .into_response(),
                Err(e) => titled_error(e, "Not deleted", &back),
            };
        }
        _ => {
            return message(
                StatusCode::NOT_FOUND,
                "Not found",
                "no such device action",
                &back,
            );
        }
    };
    let said = if change.group_id.is_some() {
        format!("{serial} moved")
    } else {
        format!("{serial}'s password set; its bot signs in with the new one")
    };
    match state.change_device(&actor, product, &serial, change).await {
        Ok(_) => Redirect::to(&notice_url(&back, &said)).into_response(),
        Err(e) => titled_error(e, "Not changed", &back),
    }
}

/// The longest text field an upload form takes.
const MAX_TEXT_FIELD: usize = 4096;

/// A multipart form with one file (field `file`, at most the server's upload limit) and
/// text fields (at most `MAX_TEXT_FIELD` bytes each), its CSRF token checked.
struct UploadForm {
    fields: Vec<(String, String)>,
    /// The file's name as the browser gave it, and its bytes (never empty).
    file: Option<(String, Vec<u8>)>,
}

impl UploadForm {
    async fn read(
        state: &AppState,
        web: &Web,
        mut multipart: Multipart,
        back: &str,
    ) -> Result<UploadForm, Response> {
        let failed = |e: axum::extract::multipart::MultipartError| {
            message(
                StatusCode::BAD_REQUEST,
                "Upload failed",
                e.body_text(),
                back,
            )
        };
        let limit = state.config().max_upload_bytes as usize;
        let mut form = UploadForm {
            fields: Vec::new(),
            file: None,
        };
        while let Some(mut field) = multipart.next_field().await.map_err(failed)? {
            let name = field.name().unwrap_or_default().to_string();
            if name != "file" {
                // A form's text fields are short (a token, a version, a name): read at most
                // 4 KiB of each, whatever the request says.
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(failed)? {
                    if text.len() + chunk.len() > MAX_TEXT_FIELD {
                        return Err(message(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "Too large",
                            format!(
                                "the form field {name:?} is longer than {MAX_TEXT_FIELD} bytes"
                            ),
                            back,
                        ));
                    }
                    text.extend_from_slice(&chunk);
                }
                form.fields
                    .push((name, String::from_utf8_lossy(&text).into_owned()));
                continue;
            }
            let filename = field.file_name().unwrap_or_default().to_string();
            let mut buf = Vec::new();
            while let Some(chunk) = field.chunk().await.map_err(failed)? {
                if buf.len() + chunk.len() > limit {
                    return Err(message(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Too large",
                        format!("the limit is {limit} bytes"),
                        back,
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            if !buf.is_empty() {
                form.file = Some((filename, buf));
            }
        }
        web.check_csrf(form.text("csrf").unwrap_or_default())?;
        Ok(form)
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

async fn upload_firmware(
    State(state): State<AppState>,
    web: Web,
    ApiPath(product): ApiPath<Id>,
    multipart: Multipart,
) -> Response {
    if let Err(r) = web.operator() {
        return r;
    }
    let back = format!("/products/{product}");
    let form = match UploadForm::read(&state, &web, multipart, &back).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let version = form
        .text("version")
        .filter(|v| !v.trim().is_empty())
        .map(str::to_string);
    let Some((_, bytes)) = form.file else {
        return message(
            StatusCode::BAD_REQUEST,
            "No file",
            "choose a firmware file",
            &back,
        );
    };
    let actor = match web.actor() {
        Ok(a) => a,
        Err(r) => return r,
    };
    match state
        .upload_firmware(&actor, product, bytes.into(), version)
        .await
    {
        Ok(f) => Redirect::to(&notice_url(
            &back,
            &format!("firmware {} uploaded", f.version),
        ))
        .into_response(),
        Err(e) => titled_error(e, "Upload refused", &back),
    }
}

// ---- the workspace ----

struct HistoryRow {
    id: Id,
    when: String,
    author: String,
}

#[derive(Template)]
#[template(path = "workspace.html")]
struct WorkspacePage {
    /// The shown build was made from the code the editor holds (its diagnostics belong there).
    build_matches: bool,
    product_id: Id,
    product_name: String,
    serial: String,
    who: String,
    operator: bool,
    csrf: String,
    notice: Option<String>,
    error: Option<String>,
    has_compiler: bool,
    /// (name, shown now)
    files: Vec<(String, bool)>,
    current_file: String,
    content: String,
    /// (fqbn, label, chosen)
    boards: Vec<(String, String, bool)>,
    /// What this server can build, for the boards offered: (board, buildable, with what or
    /// what its administrator would install). Empty before the toolchain was checked.
    toolchain: Vec<(String, bool, String)>,
    /// The boards (FQBNs) this server is known not to build, marked in the board choice.
    unbuildable: Vec<String>,
    /// Some offered board cannot be built here.
    toolchain_missing: bool,
    firmware_url: String,
    assigned: String,
    build: Option<Build>,
    /// Images the shown build kept for flashing by wire.
    build_images: Vec<BuildImage>,
    builds: Vec<Build>,
    history: Vec<HistoryRow>,
    wifi_summary: String,
    /// (when, kind, detail), newest first
    timeline: Vec<(String, String, String)>,
    /// What a Linux client reports about itself (hawkBit configData, Mender inventory).
    attributes: Vec<(String, String)>,
    /// For an operator: the product's groups (id, name, the device's own).
    groups: Vec<(Id, String, bool)>,
    /// Every file of the sketch as JSON (name -> content) for the editor's tabs, with `<`
    /// escaped so that it cannot end its script element.
    files_json: String,
    /// The Examples menu: (id, title).
    examples: Vec<(&'static str, &'static str)>,
    /// The install manifest of the shown build, when it can be installed from the browser.
    install: Option<String>,
}

/// The device, if the viewer may open its workspace; else the page to show instead.
async fn open_device(
    state: &AppState,
    web: &Web,
    product: Id,
    serial: &str,
) -> Result<Device, Response> {
    match state.store().find_device(product, serial).await {
        Ok(Some(d)) if web.may_open(&d) => Ok(d),
        Ok(Some(_)) => Err(message(
            StatusCode::FORBIDDEN,
            "Not your device",
            "a bot login opens only its own device's workspace",
            "/",
        )),
        _ => Err(message(
            StatusCode::NOT_FOUND,
            "Not found",
            "no such device",
            "/",
        )),
    }
}

/// A workspace form: the CSRF token checked, the device opened for this viewer, and the
/// workspace URL to send the browser back to.
async fn workspace_form(
    state: &AppState,
    web: &Web,
    product: Id,
    serial: &str,
    csrf: &str,
) -> Result<(Device, String), Response> {
    web.check_csrf(csrf)?;
    let device = open_device(state, web, product, serial).await?;
    // An operator changes a workspace as an actor (never a viewer); a bot its own.
    if matches!(web.viewer, Viewer::Operator(_)) {
        web.actor()?;
    }
    Ok((device, format!("/workspace/{product}/{serial}")))
}

/// Back to `path` with an error line shown.
fn redirect_error(path: &str, error: &str) -> Response {
    Redirect::to(&notice_url(path, error).replacen("?notice=", "?error=", 1)).into_response()
}

/// The device's sketch as (board, files); a store error is logged and shows the starter
/// sketch's board with no files, which the page says it cannot open.
async fn current_sketch(state: &AppState, device: &Device) -> (String, BTreeMap<String, String>) {
    match state.current_sketch(device).await {
        Ok(s) => (s.fqbn, s.files),
        Err(e) => {
            e.log();
            (BOARDS[0].0.to_string(), BTreeMap::new())
        }
    }
}

#[derive(Deserialize, Default)]
struct WorkspaceQuery {
    file: Option<String>,
    build: Option<Id>,
    notice: Option<String>,
    error: Option<String>,
}

async fn workspace(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    Query(q): Query<WorkspaceQuery>,
) -> Response {
    let device = match open_device(&state, &web, product, &serial).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let store = state.store();
    let product_name = store
        .get_product(product)
        .await
        .map(|p| p.name)
        .unwrap_or_default();
    let (fqbn, files) = current_sketch(&state, &device).await;
    let current_file = q
        .file
        .filter(|f| files.contains_key(f))
        .or_else(|| compile::main_file(&files).ok().map(str::to_string))
        .unwrap_or_else(|| "sketch.ino".into());
    let builds = store.list_builds(device.id, 10).await.unwrap_or_default();
    let build = match q.build {
        Some(id) => store
            .get_build(id)
            .await
            .ok()
            .filter(|b| b.device_id == Some(device.id)),
        None => builds.first().cloned(),
    };
    let build_images = match &build {
        Some(b) => store.list_build_images(b.id).await.unwrap_or_default(),
        None => Vec::new(),
    };
    let assigned = match state.link_serves(&device).await {
        Ok(Some((f, None))) => format!("{} ({} bytes)", f.version, f.size),
        Ok(Some((f, Some(rollout)))) => {
            format!("{} ({} bytes), from rollout {rollout}", f.version, f.size)
        }
        Ok(None) => "nothing yet".into(),
        Err(e) => {
            ApiError::from(e).log();
            "not known right now".into()
        }
    };
    let wifi_summary = match device
        .secrets
        .as_deref()
        .and_then(|s| crate::setup::open_secrets(&state, s))
    {
        Some(s) if s.wifi_ssid.is_empty() => {
            "Saved: no network built in; it is given over Improv Wi-Fi when the board is installed over USB".into()
        }
        Some(s) => format!(
            "Saved: network {} , password {}",
            mask(&s.wifi_ssid),
            if s.wifi_password.is_empty() {
                "none"
            } else {
                "********"
            }
        ),
        None => "No Wi-Fi saved yet.".into(),
    };
    let mut boards: Vec<(String, String, bool)> = BOARDS
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string(), *a == fqbn))
        .collect();
    if !boards.iter().any(|(_, _, chosen)| *chosen) {
        boards.push((fqbn.clone(), fqbn.clone(), true));
    }
    let status = state.inner.compile.status();
    let mut unbuildable = Vec::new();
    let toolchain: Vec<(String, bool, String)> = boards
        .iter()
        .filter_map(|(value, label, _)| match status.board(value) {
            compile::BoardState::Ready(with) => Some((label.clone(), true, with)),
            compile::BoardState::Missing(why) => {
                unbuildable.push(value.clone());
                Some((label.clone(), false, why))
            }
            compile::BoardState::Unknown => None,
        })
        .collect();
    let history = store
        .list_revisions(device.id, 10)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|r| HistoryRow {
            id: r.id,
            when: when(Some(r.created_at)),
            author: r.author,
        })
        .collect();
    let timeline = store
        .device_events(device.id, None, 30)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|e| (when(Some(e.at)), e.kind, e.detail))
        .collect();
    let attributes = match &device.attributes {
        Some(serde_json::Value::Object(map)) => map
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string());
                (k.clone(), v)
            })
            .collect(),
        _ => Vec::new(),
    };
    let groups = if matches!(web.viewer, Viewer::Operator(_)) {
        state
            .store()
            .list_groups(product)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|g| (g.id, g.name, g.id == device.group_id))
            .collect()
    } else {
        Vec::new()
    };
    let content = files.get(&current_file).cloned().unwrap_or_default();
    let build_matches = build
        .as_ref()
        .is_some_and(|b| b.files.get(&current_file) == Some(&content));
    let install = build
        .as_ref()
        .filter(|b| crate::setup::install_parts(b, &build_images).is_some())
        .map(|b| {
            format!(
                "/workspace/{product}/{}/builds/{}/manifest.json",
                device.serial, b.id
            )
        });
    let files_json = serde_json::to_string(&files)
        .unwrap_or_else(|_| "{}".into())
        .replace('<', "\\u003c");
    page(WorkspacePage {
        install,
        files_json,
        examples: EXAMPLES
            .iter()
            .map(|(id, title, _)| (*id, *title))
            .collect(),
        build_matches,
        groups,
        timeline,
        attributes,
        product_id: product,
        product_name,
        firmware_url: crate::api::static_link(&state, &device),
        serial: device.serial.clone(),
        who: web.name(),
        operator: matches!(web.viewer, Viewer::Operator(_)),
        csrf: web.csrf.clone(),
        notice: q.notice,
        error: q.error,
        has_compiler: state.inner.compile.has_compiler(),
        content,
        files: files
            .keys()
            .map(|f| (f.clone(), *f == current_file))
            .collect(),
        current_file,
        boards,
        toolchain_missing: toolchain.iter().any(|(_, ready, _)| !ready),
        toolchain,
        unbuildable,
        assigned,
        build,
        build_images,
        builds,
        history,
        wifi_summary,
    })
}

/// Shows the first and last character only.
fn mask(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    match chars.len() {
        0 => String::new(),
        1 | 2 => "*".repeat(chars.len()),
        n => format!("{}{}{}", chars[0], "*".repeat(n - 2), chars[n - 1]),
    }
}

/// The workspace's Save, Verify and Deploy: `file` and `sketch` are the editor's current
/// file; `other:NAME` fields carry the unsaved edits of its other tabs.
struct SaveForm {
    csrf: String,
    file: String,
    fqbn: String,
    action: String,
    edits: BTreeMap<String, String>,
}

impl SaveForm {
    fn read(fields: Vec<(String, String)>) -> Result<Self, String> {
        let (mut csrf, mut file, mut sketch, mut fqbn, mut action) =
            (None, None, None, None, String::from("save"));
        let mut edits = BTreeMap::new();
        for (key, value) in fields {
            match key.as_str() {
                "csrf" => csrf = Some(value),
                "file" => file = Some(value),
                "sketch" => sketch = Some(value),
                "fqbn" => fqbn = Some(value),
                "action" => action = value,
                _ => match key.strip_prefix("other:") {
                    Some(name) => {
                        edits.insert(name.to_string(), value);
                    }
                    None => return Err(format!("unknown form field {key:?}")),
                },
            }
        }
        let missing = |what: &str| format!("the form lacks its {what} field");
        let file = file.ok_or_else(|| missing("file"))?;
        edits.insert(file.clone(), sketch.ok_or_else(|| missing("sketch"))?);
        Ok(SaveForm {
            csrf: csrf.ok_or_else(|| missing("csrf"))?,
            file,
            fqbn: fqbn.ok_or_else(|| missing("fqbn"))?,
            action,
            edits,
        })
    }
}

async fn save(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    axum::Form(fields): axum::Form<Vec<(String, String)>>,
) -> Response {
    let form = match SaveForm::read(fields) {
        Ok(f) => f,
        Err(e) => return error_page(ApiError::bad_request(e), "/"),
    };
    let (device, back) = match workspace_form(&state, &web, product, &serial, &form.csrf).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let with = |key: &str, text: &str| {
        notice_url(&back, text).replacen(
            "?notice=",
            &format!("?file={}&{key}=", query_value(&form.file)),
            1,
        )
    };
    let name = web.name();
    let author = Author {
        name: &name,
        address: web.address,
    };
    let sketch = match state
        .save_sketch(&author, &device, &form.fqbn, form.edits)
        .await
    {
        Ok(s) => s,
        Err(e) if e.status.is_client_error() => {
            return Redirect::to(&with("error", &e.message)).into_response();
        }
        Err(e) => return error_page(e, &back),
    };
    // Verify compiles only; Deploy stores the image as the device's firmware too.
    let product_id = match form.action.as_str() {
        "save" => return Redirect::to(&with("notice", "saved")).into_response(),
        "verify" => None,
        "deploy" | "compile" => Some(product),
        other => {
            return Redirect::to(&with("error", &format!("unknown action {other:?}")))
                .into_response();
        }
    };
    let build = state
        .queue_build(
            NewBuild {
                product_id,
                device_id: Some(device.id),
                fqbn: sketch.fqbn,
                files: sketch.files,
                requested_by: name.clone(),
            },
            web.address,
        )
        .await;
    match build {
        Ok(b) => Redirect::to(&format!(
            "{back}?file={}&build={}",
            query_value(&form.file),
            b.id
        ))
        .into_response(),
        Err(e) => Redirect::to(&with("error", &e.into_message())).into_response(),
    }
}

#[derive(Deserialize)]
struct SketchFileForm {
    csrf: String,
    /// The file added, renamed or deleted.
    name: String,
    /// A rename's new name.
    to: Option<String>,
    /// The box that confirms a deletion.
    confirm: Option<String>,
    /// An example's id, a revision's id.
    example: Option<String>,
    revision: Option<Id>,
}

/// The sketch's other changes, through the core's sketch operations: `files` (add `name`),
/// `rename` (`name` to `to`), `delete` (`name`, with the confirmation box), `example` (open
/// one) and `restore` (a revision).
async fn sketch_action(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial, action)): ApiPath<(Id, String, String)>,
    axum::Form(form): axum::Form<SketchFileForm>,
) -> Response {
    let (device, back) = match workspace_form(&state, &web, product, &serial, &form.csrf).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let name = web.name();
    let author = Author {
        name: &name,
        address: web.address,
    };
    let file = form.name.trim();
    let (done, shown) = match action.as_str() {
        "files" => (
            state.add_sketch_file(&author, &device, file).await,
            Some(file.to_string()),
        ),
        "rename" => {
            let to = form.to.as_deref().unwrap_or_default().trim().to_string();
            (
                state.rename_sketch_file(&author, &device, file, &to).await,
                Some(to),
            )
        }
        "delete" => {
            if form.confirm.is_none() {
                return unconfirmed("Not deleted", &back);
            }
            (state.delete_sketch_file(&author, &device, file).await, None)
        }
        "example" => (
            state
                .open_example(
                    &author,
                    &device,
                    form.example.as_deref().unwrap_or_default(),
                )
                .await,
            Some("sketch.ino".to_string()),
        ),
        "restore" => match form.revision {
            Some(id) => (state.restore_revision(&author, &device, id).await, None),
            None => return redirect_error(&back, "pick the revision to restore"),
        },
        _ => return not_found(HeaderMap::new()).await,
    };
    match done {
        Ok(_) => match shown {
            Some(f) => Redirect::to(&format!("{back}?file={}", query_value(&f))).into_response(),
            None => Redirect::to(&back).into_response(),
        },
        Err(e) if e.status.is_client_error() => redirect_error(&back, &e.message),
        Err(e) => error_page(e, &back),
    }
}

/// `GET .../builds/{id}.json?file=F`: the build's status, log and the diagnostics of file F.
async fn build_status(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial, file)): ApiPath<(Id, String, String)>,
    Query(q): Query<WorkspaceQuery>,
) -> Response {
    let device = match open_device(&state, &web, product, &serial).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let Some(id) = file
        .strip_suffix(".json")
        .and_then(|s| s.parse::<Id>().ok())
    else {
        return ApiError::not_found("no such build").into_response();
    };
    match state.store().get_build(id).await {
        Ok(b) if b.device_id == Some(device.id) => {
            let diagnostics: Vec<&Diagnostic> = b
                .diagnostics
                .iter()
                .filter(|d| q.file.as_deref().is_none_or(|f| d.file == f))
                .collect();
            axum::Json(serde_json::json!({
                "id": b.id, "status": b.status, "log": b.log, "diagnostics": diagnostics,
                "firmware_id": b.firmware_id,
            }))
            .into_response()
        }
        _ => ApiError::not_found("no such build").into_response(),
    }
}

/// `GET .../builds/{id}/{name}`: an image the build kept for flashing by wire.
async fn build_image(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial, id, name)): ApiPath<(Id, String, Id, String)>,
) -> Response {
    let device = match open_device(&state, &web, product, &serial).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let back = format!("/workspace/{product}/{serial}");
    match state.store().get_build(id).await {
        // What ESP Web Tools installs from this page.
        Ok(b) if b.device_id == Some(device.id) && name == "manifest.json" => {
            match state.install_manifest(&b, &device.serial).await {
                Ok(m) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(m)).into_response(),
                Err(e) => e.into_response(),
            }
        }
        // A deployed build's application, as stored (and served on the device's link).
        Ok(b) if b.device_id == Some(device.id) && name == crate::setup::BUILT_APP => match b
            .firmware_id
        {
            Some(firmware) => match state.firmware_part(product, firmware, None).await {
                Ok((f, part)) => crate::delivery::render(
                    part,
                    f.size.max(0) as u64,
                    &crate::delivery::Delivery::of(&f, &format!("build-{id}.bin")),
                ),
                Err(e) => error_page(e, &back),
            },
            None => error_page(
                ApiError::not_found("this build stored no firmware (a Verify build, or it failed)"),
                &back,
            ),
        },
        Ok(b) if b.device_id == Some(device.id) => match state.build_image(id, &name).await {
            Ok((image, bytes)) => crate::builds::image_response(id, &image, bytes),
            Err(e) => error_page(e, &back),
        },
        _ => error_page(ApiError::not_found("no such build"), &back),
    }
}

#[derive(Deserialize)]
struct WifiForm {
    csrf: String,
    ssid: String,
    wifi_password: String,
    device_password: String,
}

async fn save_wifi(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    web: Web,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    axum::Form(form): axum::Form<WifiForm>,
) -> Response {
    let (device, back) = match workspace_form(&state, &web, product, &serial, &form.csrf).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let secrets = crate::setup::DeviceSecrets {
        wifi_ssid: form.ssid,
        wifi_password: form.wifi_password,
        device_password: form.device_password,
    };
    match state
        .save_wifi(&web.name(), Some(peer.ip()), &device, &secrets)
        .await
    {
        Ok(()) => Redirect::to(&notice_url(&back, "Wi-Fi saved (encrypted)")).into_response(),
        Err(e) if e.status.is_client_error() => redirect_error(&back, &e.message),
        Err(e) => error_page(e, &back),
    }
}

#[derive(Deserialize)]
struct SetupForm {
    csrf: String,
    what: String,
}

async fn setup_firmware(
    State(state): State<AppState>,
    web: Web,
    ApiPath((product, serial)): ApiPath<(Id, String)>,
    axum::Form(form): axum::Form<SetupForm>,
) -> Response {
    let (device, back) = match workspace_form(&state, &web, product, &serial, &form.csrf).await {
        Ok(found) => found,
        Err(r) => return r,
    };
    let config = match crate::setup::personal_config(&state, &device, "setup") {
        Ok(c) => c,
        Err(e) => {
            return redirect_error(&back, &e);
        }
    };
    if form.what == "compile" {
        let files = crate::setup::setup_sketch();
        // The setup firmware is built for the board the device's sketch is for (an ESP
        // board); ESP32 Dev Module when it has none yet.
        let (fqbn, _) = current_sketch(&state, &device).await;
        let fqbn = if crate::setup::is_ota_board(&fqbn) {
            fqbn
        } else {
            "esp32:esp32:esp32".to_string()
        };
        let build = state
            .queue_build(
                NewBuild {
                    product_id: Some(product),
                    device_id: Some(device.id),
                    fqbn,
                    files,
                    requested_by: web.name(),
                },
                web.address,
            )
            .await;
        return match build {
            Ok(b) => Redirect::to(&format!("{back}?build={}", b.id)).into_response(),
            Err(e) => redirect_error(&back, &e.into_message()),
        };
    }
    (
        [
            (header::CONTENT_TYPE, "text/x-c; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"otaforge_config.h\"",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        config,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    /// A page handler that panics still answers browsers with a page, not JSON.
    #[tokio::test]
    async fn a_panicking_page_answers_with_a_page() {
        let response = super::panic_page();
        assert_eq!(response.status(), 500);
        assert!(
            response.headers()[axum::http::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let html = String::from_utf8_lossy(&body);
        assert!(
            html.contains("Something went wrong") && html.contains("<nav"),
            "{html}"
        );
    }

    /// Every banner in the templates has a style: an element of class `flash` names one of
    /// the `flash-*` kinds, and the style sheet defines each kind named.
    #[test]
    fn every_banner_has_a_style() {
        let css = include_str!("../assets/app.css");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates");
        let mut banners = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let html = std::fs::read_to_string(&path).unwrap();
            for class in html.split("class=\"").skip(1) {
                let class = class.split('"').next().unwrap();
                let names: Vec<&str> = class.split_whitespace().collect();
                if !names.contains(&"flash") {
                    continue;
                }
                banners += 1;
                let kinds: Vec<&&str> = names.iter().filter(|n| n.starts_with("flash-")).collect();
                assert!(
                    !kinds.is_empty(),
                    "{}: a banner of no kind: {class:?}",
                    path.display()
                );
                for kind in kinds {
                    assert!(
                        css.contains(&format!(".{kind} ")) || css.contains(&format!(".{kind}{{")),
                        "{}: the style sheet has no .{kind}",
                        path.display()
                    );
                }
            }
        }
        assert!(
            banners >= 5,
            "the templates' banners were found ({banners})"
        );
    }
}
