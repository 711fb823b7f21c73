//! Test harness: a real server on port 0 over SQLite or a fresh PostgreSQL database, a
//! management client, and a raw HTTP client that sends exactly the bytes a device sends.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use otaforge_server::{AppState, Config, Secret};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TOKEN: &str = "test-admin-token";

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Server {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub state: AppState,
    pub http: reqwest::Client,
    pub data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pg_db: Option<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// Images made by real tools (`esptool elf2image` on an ELF from riscv64-unknown-elf-gcc).
/// Runs `scripts/fixtures.sh` once; fails loudly if it cannot.
pub fn fixtures() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("target/fixtures");
        std::fs::create_dir_all(&out).unwrap();
        let status = std::process::Command::new("flock")
            .arg(root.join("target/fixtures.lock"))
            .arg("bash")
            .arg(root.join("scripts/fixtures.sh"))
            .arg(&out)
            .status()
            .expect("running scripts/fixtures.sh (needs bash and flock)");
        assert!(
            status.success(),
            "scripts/fixtures.sh failed: the fixture images could not be made"
        );
        out
    })
    .clone()
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

fn pg_admin_url() -> String {
    std::env::var("OTAFORGE_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

async fn create_pg_database() -> (String, String) {
    use sqlx::Executor;
    let admin = pg_admin_url();
    let mut bytes = [0u8; 6];
    getrandom_fill(&mut bytes);
    let name = format!(
        "otaforge_t_{}_{}",
        std::process::id(),
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let pool = sqlx::PgPool::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {admin} is not reachable ({e}); start it or set OTAFORGE_TEST_PG")
    });
    pool.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
    (name.clone(), format!("{base}/{name}"))
}

async fn drop_pg_database(name: &str) {
    use sqlx::Executor;
    if let Ok(pool) = sqlx::PgPool::connect(&pg_admin_url()).await {
        let _ = pool
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        pool.close().await;
    }
}

fn getrandom_fill(buf: &mut [u8]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u128;
    let mut x = nanos ^ (n << 64) ^ 0x9E37_79B9_7F4A_7C15;
    for b in buf {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (x >> 64) as u8;
    }
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let mut bytes = [0u8; 6];
    getrandom_fill(&mut bytes);
    let dir = std::env::temp_dir().join(format!(
        "otaforge-test-{tag}-{}-{}",
        std::process::id(),
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub struct Options {
    pub max_upload_bytes: u64,
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub telemetry_flush_interval: Duration,
    pub compile: Option<otaforge_server::compile::CompileConfig>,
    /// The hawkBit DDI polling interval told to clients.
    pub ddi_poll: Duration,
    /// The address devices reach the server at (links in answers), when not its own.
    pub public_url: Option<String>,
    /// How often the server applies what other processes changed.
    pub sync_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_upload_bytes: 8 * 1024 * 1024,
            data_dir: None,
            database_url: None,
            telemetry_flush_interval: Duration::from_millis(200),
            compile: None,
            ddi_poll: Duration::from_secs(300),
            public_url: None,
            sync_interval: Duration::from_millis(500),
        }
    }
}

impl Server {
    pub async fn start(backend: Backend) -> Server {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: Backend, options: Options) -> Server {
        let data_dir = options.data_dir.clone().unwrap_or_else(|| temp_dir("data"));
        let (pg_db, database_url) = match (backend, options.database_url) {
            (_, Some(url)) => (None, Some(url)),
            (Backend::Sqlite, None) => (None, None),
            (Backend::Postgres, None) => {
                let (name, url) = create_pg_database().await;
                (Some(name), Some(url))
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            listen: addr,
            data_dir: data_dir.clone(),
            database_url,
            public_url: options.public_url.clone(),
            admin_token: Some(Secret::new(TOKEN)),
            max_upload_bytes: options.max_upload_bytes,
            telemetry_flush_interval: options.telemetry_flush_interval,
            compile: options.compile.clone().unwrap_or_default(),
            ddi_poll: options.ddi_poll,
            sync_interval: options.sync_interval,
            ..Config::default()
        };
        let state = AppState::open(config)
            .await
            .expect("opening the server state");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(otaforge_server::serve(
            state.clone(),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            base: format!("http://{addr}"),
            addr,
            state,
            http: reqwest::Client::new(),
            data_dir,
            shutdown: Some(tx),
            task: Some(task),
            pg_db,
        }
    }

    /// Graceful shutdown, as SIGTERM does; returns the database URL for a reopen.
    pub async fn stop(mut self) -> (PathBuf, Option<String>) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        let url = self.state.config().database_url.clone();
        (self.data_dir.clone(), url)
    }

    pub async fn finish(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(db) = self.pg_db.take() {
            drop_pg_database(&db).await;
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A management call; returns (status, JSON body or Null).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn upload(&self, path: &str, bytes: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a product; returns (product id, api key, default group id).
    pub async fn product(&self, name: &str) -> (i64, String, i64) {
        let (status, p) = self
            .call(
                reqwest::Method::POST,
                "/api/v1/products",
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 201, "{p}");
        (
            p["id"].as_i64().unwrap(),
            p["api_key"].as_str().unwrap().to_string(),
            p["default_group_id"].as_i64().unwrap(),
        )
    }

    /// A new group of the product; its id.
    pub async fn group(&self, product: i64, name: &str) -> i64 {
        let (status, group) = self
            .call(
                reqwest::Method::POST,
                &format!("/api/v1/products/{product}/groups"),
                Some(json!({ "name": name })),
            )
            .await;
        assert_eq!(status, 201, "{group}");
        group["id"].as_i64().unwrap()
    }

    /// Uploads the fixtures app-v1 (1.0.0) and app-v2 (2.0.0) and assigns 1.0.0 to the
    /// group; their firmware ids, in that order.
    pub async fn two_releases(&self, product: i64, group: i64) -> [Value; 2] {
        let mut ids = Vec::new();
        for name in ["app-v1.bin", "app-v2.bin"] {
            let (status, fw) = self
                .upload(
                    &format!("/api/v1/products/{product}/firmware"),
                    fixture(name),
                )
                .await;
            assert_eq!(status, 201, "{fw}");
            ids.push(fw["id"].clone());
        }
        let (status, body) = self
            .call(
                reqwest::Method::PATCH,
                &format!("/api/v1/products/{product}/groups/{group}"),
                Some(json!({"firmware_id": ids[0]})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        [ids[0].clone(), ids[1].clone()]
    }

    /// Sends raw request bytes and reads the whole answer (the connection is closed after).
    /// The sign-in page's CSRF cookie (`name=value`) and form token, as a browser gets them.
    pub async fn login_token(&self) -> (String, String) {
        let r = self
            .raw(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let cookie = r
            .header("set-cookie")
            .expect("the sign-in page sets its CSRF cookie")
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let token = r
            .text()
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .expect("the sign-in form carries a CSRF token")
            .split('"')
            .next()
            .unwrap()
            .to_string();
        (cookie, token)
    }

    pub async fn raw(&self, request: &[u8]) -> RawResponse {
        raw_exchange(self.addr, request).await
    }

    /// A signed-in operator's session cookie (`name=value`), made through the sign-in form.
    pub async fn operator_session(&self, username: &str) -> String {
        let password = format!("pw-{username}-pw");
        let hash = otaforge_server::auth::hash_password(&password).unwrap();
        self.state
            .store()
            .create_user(username, &hash, otaforge_store::model::Role::Admin)
            .await
            .unwrap();
        self.session_of(username, &password).await
    }

    /// The session cookie of an existing operator account, signed in through the form.
    pub async fn session_of(&self, username: &str, password: &str) -> String {
        let (login_cookie, token) = self.login_token().await;
        let body = format!("csrf={token}&kind=operator&username={username}&password={password}");
        let r = self
            .raw(
                format!(
                    "POST /login HTTP/1.1\r\nHost: x\r\nCookie: {login_cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
        r.header("set-cookie")
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    }

    /// `GET path` with a session cookie, as a browser sends it.
    pub async fn get_with_cookie(&self, path: &str, cookie: &str) -> RawResponse {
        self.raw(
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
    }
}

/// A parsed HTTP answer, with the head kept as the exact bytes received.
#[derive(Debug)]
pub struct RawResponse {
    pub head: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    // The request says Connection: close (or is HTTP/1.0), so the server closes.
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf))
        .await
        .expect("the server did not close the connection")
        .unwrap();
    parse_response(buf)
}

/// Sends a head, then body pieces while reading the answer at the same time: the server may
/// answer (and close) before the body is all sent, as it does for a refused upload.
pub async fn raw_streaming(
    addr: std::net::SocketAddr,
    head: Vec<u8>,
    pieces: impl Iterator<Item = Vec<u8>> + Send + 'static,
) -> RawResponse {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        if writer.write_all(&head).await.is_err() {
            return;
        }
        for piece in pieces {
            if writer.write_all(&piece).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let read = async {
        loop {
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("no answer");
    sender.abort();
    parse_response(buf)
}

fn parse_response(buf: Vec<u8>) -> RawResponse {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let body = buf[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_string(), v.to_string())
        })
        .collect();
    RawResponse {
        head,
        status,
        headers,
        body,
    }
}

/// Runs a test body against both backends, each in its own test.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:path) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $body(support::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $body(support::Backend::Postgres).await;
            }
        }
    };
}

// ---- the requests stock MCU clients send ----

pub fn md5_hex(bytes: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The OTAdrive library's request: HTTP/1.1, Host, Connection: close, its own headers.
pub fn otadrive_request(method: &str, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: otadrive.com\r\nUser-Agent: ESP32-http-Update\r\n\
         x-ESP32-STA-MAC: 24:0A:C4:01:02:03\r\nx-ESP32-free-space: 1310720\r\n\
         x-ESP32-chip-size: 4194304\r\nx-ESP32-sdk-version: v4.4.7\r\n{extra}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// `HTTPUpdate` on an ESP32: one HTTP/1.0 GET with its x-ESP32-* headers and Basic auth.
pub fn http_update_request(
    path: &str,
    auth: Option<(&str, &str)>,
    md5: &str,
    version: Option<&str>,
) -> Vec<u8> {
    let mut req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: ESP32-http-Update\r\nConnection: close\r\n\
         x-ESP32-STA-MAC: 24:0A:C4:01:02:03\r\nx-ESP32-AP-MAC: 24:0A:C4:01:02:04\r\n\
         x-ESP32-free-space: 1310720\r\nx-ESP32-sketch-size: 200000\r\nx-ESP32-sketch-md5: {md5}\r\n\
         x-ESP32-chip-size: 4194304\r\nx-ESP32-sdk-version: v4.4.7\r\nx-ESP32-mode: sketch\r\n"
    );
    if let Some(v) = version {
        req.push_str(&format!("x-ESP32-version: {v}\r\n"));
    }
    finish_request(req, auth)
}

/// Ends a stock client's request: Basic credentials when the sketch set them, the blank line.
pub fn finish_request(mut req: String, auth: Option<(&str, &str)>) -> Vec<u8> {
    use base64::Engine;
    if let Some((user, password)) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        req.push_str(&format!("Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// An Arduino ESP8266 `.bin` laid out as the core's `elf2bin.py` writes it.
pub fn esp8266_bin(fill: u8) -> Vec<u8> {
    use otaforge_formats::esp::build::{SegmentSpec, arduino_esp8266_bin, esp8266_image};
    let eboot = esp8266_image(
        0x4010_F000,
        &[SegmentSpec {
            load_addr: 0x4010_F000,
            data: vec![0x11; 256],
        }],
    );
    let sketch = esp8266_image(
        0x4010_0000,
        &[
            SegmentSpec {
                load_addr: 0x4020_1010,
                data: vec![fill; 4096],
            },
            SegmentSpec {
                load_addr: 0x3FFE_8000,
                data: vec![fill ^ 0x5A; 512],
            },
        ],
    );
    arduino_esp8266_bin(&eboot, &sketch)
}

/// `ESP8266httpUpdate`'s request: HTTP/1.0, its x-ESP8266-* header set, Basic auth.
pub fn esp8266_request(path: &str, mode: &str, md5: &str, auth: Option<(&str, &str)>) -> Vec<u8> {
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: ESP8266-http-Update\r\nConnection: close\r\n\
         x-ESP8266-Chip-ID: 10606726\r\nx-ESP8266-STA-MAC: 5C:CF:7F:A1:D8:86\r\n\
         x-ESP8266-AP-MAC: 5E:CF:7F:A1:D8:86\r\nx-ESP8266-free-space: 2822144\r\n\
         x-ESP8266-sketch-size: 319872\r\nx-ESP8266-sketch-md5: {md5}\r\n\
         x-ESP8266-chip-size: 4194304\r\nx-ESP8266-sdk-version: 2.2.2-dev(38a443e)\r\n\
         x-ESP8266-mode: {mode}\r\n"
    );
    finish_request(req, auth)
}
