//! The command-line client of the management API: `otaforge product create`, `otaforge
//! firmware upload FILE` (with a progress bar), and the rest.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

#[derive(Args, Clone)]
pub struct Remote {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "OTAFORGE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Bearer token (from `otaforge login`, or the server's OTAFORGE_ADMIN_TOKEN).
    #[arg(long, global = true, env = "OTAFORGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Exchange a username and password for a token (password from OTAFORGE_PASSWORD or stdin).
    Login {
        #[arg(long, default_value = "admin")]
        username: String,
        /// Days the token lives (the server's default is 30, at most 365).
        #[arg(long)]
        days: Option<i64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Bearer tokens: list yours (an admin sees all), revoke one by its id.
    Token {
        #[command(subcommand)]
        action: TokenAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Products: create, list, show, delete, rotate-key.
    Product {
        #[command(subcommand)]
        action: ProductAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Device groups: create, list, assign firmware, set config, delete.
    Group {
        #[command(subcommand)]
        action: GroupAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Devices: add, list, show, set status/group/password, delete.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
        #[command(flatten)]
        remote: Remote,
    },
    /// Firmware: upload, list, delete.
    Firmware {
        #[command(subcommand)]
        action: FirmwareAction,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
pub enum TokenAction {
    List,
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum ProductAction {
    Create {
        name: String,
    },
    List,
    Show {
        id: i64,
    },
    Delete {
        id: i64,
    },
    RotateKey {
        id: i64,
    },
    /// Set the key digests the product's firmware must be signed with (Secure Boot V2;
    /// `espsecure digest-sbv2-public-key` prints one); none: signatures are not required.
    FirmwareKeys {
        id: i64,
        digests: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum GroupAction {
    Create {
        #[arg(long)]
        product: i64,
        name: String,
    },
    List {
        #[arg(long)]
        product: i64,
    },
    /// Assign a firmware to the group (`--firmware none` unassigns).
    Assign {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        group: i64,
        #[arg(long)]
        firmware: String,
    },
    /// Set the group's configuration from a JSON file.
    Config {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        group: i64,
        file: PathBuf,
    },
    Delete {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        group: i64,
    },
}

#[derive(Subcommand)]
pub enum DeviceAction {
    Add {
        #[arg(long)]
        product: i64,
        serial: String,
        #[arg(long)]
        group: Option<i64>,
        /// Password for the device's static link.
        #[arg(long)]
        password: Option<String>,
    },
    /// Every device the filters take, one JSON object a line, fetched a page at a time.
    List {
        #[arg(long)]
        product: i64,
        /// new, verified, blocked or disabled.
        #[arg(long)]
        status: Option<String>,
        /// A group id.
        #[arg(long)]
        group: Option<i64>,
        /// Exactly this reported version.
        #[arg(long)]
        version: Option<String>,
        /// The chip its check-ins announce: esp32, esp8266, w800, swupdate or mender.
        #[arg(long)]
        chip: Option<String>,
        /// Serials containing this.
        #[arg(long)]
        search: Option<String>,
        /// serial, last_seen or created.
        #[arg(long)]
        sort: Option<String>,
    },
    Show {
        #[arg(long)]
        product: i64,
        serial: String,
    },
    /// Create or update devices from a CSV file (a header naming the columns: serial, and any
    /// of group, status, password or token, password_hash, public_key); a file with a bad row
    /// is refused whole, the faults listed by line.
    Import {
        #[arg(long)]
        product: i64,
        file: std::path::PathBuf,
    },
    /// Every device as CSV (serial, group, status, version, last_seen, created_at).
    Export {
        #[arg(long)]
        product: i64,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// One change to every device the filters take: verify, block, disable, unverify, move
    /// (with --to-group) or delete.
    Bulk {
        #[arg(long)]
        product: i64,
        action: String,
        #[arg(long)]
        to_group: Option<i64>,
        /// Only devices with this status.
        #[arg(long)]
        status: Option<String>,
        /// Only devices of this group.
        #[arg(long)]
        group: Option<i64>,
        #[arg(long)]
        version: Option<String>,
        /// Only devices whose check-ins announce this chip (esp32, esp8266, w800, ...).
        #[arg(long)]
        chip: Option<String>,
        #[arg(long)]
        serial_prefix: Option<String>,
        /// Serials containing this.
        #[arg(long)]
        search: Option<String>,
        /// Needed when no filter is given: every device of the product.
        #[arg(long)]
        all: bool,
    },
    Set {
        #[arg(long)]
        product: i64,
        serial: String,
        /// new, verified, blocked or disabled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        group: Option<i64>,
        #[arg(long)]
        password: Option<String>,
    },
    Delete {
        #[arg(long)]
        product: i64,
        serial: String,
    },
}

#[derive(Subcommand)]
pub enum FirmwareAction {
    /// Upload a firmware file; the version is read from the image unless given.
    Upload {
        #[arg(long)]
        product: i64,
        file: PathBuf,
        #[arg(long)]
        version: Option<String>,
    },
    /// Every firmware, newest first, one JSON object a line.
    List {
        #[arg(long)]
        product: i64,
        #[arg(long)]
        version: Option<String>,
        /// Only images for this chip (esp32, esp32c3, esp8266, ...).
        #[arg(long)]
        chip: Option<String>,
        /// Only this image format (esp32-app, esp8266-app, w800-xz, swu, mender, ...).
        #[arg(long)]
        format: Option<String>,
    },
    Delete {
        #[arg(long)]
        product: i64,
        id: i64,
    },
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    fn new(remote: &Remote) -> anyhow::Result<Self> {
        Ok(Api {
            http: reqwest::Client::builder().build()?,
            base: remote.server.trim_end_matches('/').to_string(),
            token: remote
                .token
                .clone()
                .or_else(|| std::env::var("OTAFORGE_ADMIN_TOKEN").ok()),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            if status == reqwest::StatusCode::UNAUTHORIZED {
                bail!("{status}: {message} (log in with `otaforge login` and set OTAFORGE_TOKEN)");
            }
            bail!("{status}: {message}");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).context("the server answered something other than JSON")
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.send(req).await
    }
}

fn print(value: &Value) {
    if !value.is_null() {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    }
}

pub async fn run(command: ClientCommand) -> anyhow::Result<()> {
    use reqwest::Method as M;
    match command {
        ClientCommand::Login {
            username,
            days,
            remote,
        } => {
            let password = match std::env::var("OTAFORGE_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    eprint!("password for {username}: ");
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            let api = Api::new(&remote)?;
            let answer = api
                .json(
                    M::POST,
                    "/api/v1/auth/login",
                    Some(match days {
                        Some(days) => json!({
                            "username": username, "password": password, "expires_in_days": days
                        }),
                        None => json!({ "username": username, "password": password }),
                    }),
                )
                .await?;
            println!("{}", answer["token"].as_str().unwrap_or_default());
            eprintln!("export OTAFORGE_TOKEN=<the token above> to use it");
        }
        ClientCommand::Token { action, remote } => {
            let api = Api::new(&remote)?;
            match action {
                TokenAction::List => print(&api.json(M::GET, "/api/v1/tokens", None).await?),
                TokenAction::Revoke { id } => {
                    api.json(
                        M::DELETE,
                        &format!("/api/v1/tokens/{}", urlencode(&id)),
                        None,
                    )
                    .await?;
                    eprintln!("token {id} revoked");
                }
            }
        }
        ClientCommand::Product { action, remote } => {
            let api = Api::new(&remote)?;
            let answer = match action {
                ProductAction::Create { name } => {
                    api.json(M::POST, "/api/v1/products", Some(json!({ "name": name })))
                        .await?
                }
                ProductAction::List => api.json(M::GET, "/api/v1/products", None).await?,
                ProductAction::Show { id } => {
                    api.json(M::GET, &format!("/api/v1/products/{id}"), None)
                        .await?
                }
                ProductAction::Delete { id } => {
                    api.json(M::DELETE, &format!("/api/v1/products/{id}"), None)
                        .await?
                }
                ProductAction::RotateKey { id } => {
                    api.json(M::POST, &format!("/api/v1/products/{id}/rotate-key"), None)
                        .await?
                }
                ProductAction::FirmwareKeys { id, digests } => {
                    api.json(
                        M::PUT,
                        &format!("/api/v1/products/{id}/firmware-keys"),
                        Some(serde_json::json!({ "digests": digests })),
                    )
                    .await?
                }
            };
            print(&answer);
        }
        ClientCommand::Group { action, remote } => {
            let api = Api::new(&remote)?;
            let answer = match action {
                GroupAction::Create { product, name } => {
                    api.json(
                        M::POST,
                        &format!("/api/v1/products/{product}/groups"),
                        Some(json!({ "name": name })),
                    )
                    .await?
                }
                GroupAction::List { product } => {
                    api.json(M::GET, &format!("/api/v1/products/{product}/groups"), None)
                        .await?
                }
                GroupAction::Assign {
                    product,
                    group,
                    firmware,
                } => {
                    let firmware = match firmware.as_str() {
                        "none" => Value::Null,
                        id => json!(
                            id.parse::<i64>()
                                .context("--firmware takes a firmware id or none")?
                        ),
                    };
                    api.json(
                        M::PATCH,
                        &format!("/api/v1/products/{product}/groups/{group}"),
                        Some(json!({ "firmware_id": firmware })),
                    )
                    .await?
                }
                GroupAction::Config {
                    product,
                    group,
                    file,
                } => {
                    let text = std::fs::read_to_string(&file)
                        .with_context(|| format!("reading {}", file.display()))?;
                    let config: Value = serde_json::from_str(&text)
                        .with_context(|| format!("{} is not valid JSON", file.display()))?;
                    api.json(
                        M::PATCH,
                        &format!("/api/v1/products/{product}/groups/{group}"),
                        Some(json!({ "config": config })),
                    )
                    .await?
                }
                GroupAction::Delete { product, group } => {
                    api.json(
                        M::DELETE,
                        &format!("/api/v1/products/{product}/groups/{group}"),
                        None,
                    )
                    .await?
                }
            };
            print(&answer);
        }
        ClientCommand::Device { action, remote } => {
            let api = Api::new(&remote)?;
            let answer = match action {
                DeviceAction::Add {
                    product,
                    serial,
                    group,
                    password,
                } => {
                    let mut body = json!({ "serial": serial });
                    if let Some(g) = group {
                        body["group_id"] = json!(g);
                    }
                    if let Some(p) = password {
                        body["password"] = json!(p);
                    }
                    api.json(
                        M::POST,
                        &format!("/api/v1/products/{product}/devices"),
                        Some(body),
                    )
                    .await?
                }
                DeviceAction::List {
                    product,
                    status,
                    group,
                    version,
                    chip,
                    search,
                    sort,
                } => {
                    let mut filters = form_urlencoded::Serializer::new(String::new());
                    filters.append_pair("limit", "1000");
                    let pairs = [
                        ("status", status),
                        ("group", group.map(|g| g.to_string())),
                        ("version", version),
                        ("chip", chip),
                        ("q", search),
                        ("sort", sort),
                    ];
                    for (name, value) in pairs {
                        if let Some(v) = value {
                            filters.append_pair(name, &v);
                        }
                    }
                    let filters = filters.finish();
                    print_every_page(
                        &api,
                        &format!("/api/v1/products/{product}/devices?{filters}"),
                    )
                    .await?
                }
                DeviceAction::Import { product, file } => {
                    upload(
                        &api,
                        &format!("/api/v1/products/{product}/devices/import"),
                        &file,
                        "text/csv",
                    )
                    .await?
                }
                DeviceAction::Export { product, out } => {
                    use std::io::Write;
                    let response = api
                        .request(
                            M::GET,
                            &format!("/api/v1/products/{product}/devices/export"),
                        )
                        .send()
                        .await
                        .with_context(|| format!("cannot reach the server at {}", api.base))?;
                    if !response.status().is_success() {
                        let status = response.status();
                        bail!("{status}: {}", response.text().await.unwrap_or_default());
                    }
                    let mut sink: Box<dyn Write> = match &out {
                        Some(path) => Box::new(std::io::BufWriter::new(
                            std::fs::File::create(path)
                                .with_context(|| format!("creating {}", path.display()))?,
                        )),
                        None => Box::new(std::io::stdout().lock()),
                    };
                    let mut body = response.bytes_stream();
                    while let Some(chunk) = body.next().await {
                        sink.write_all(&chunk?)?;
                    }
                    sink.flush()?;
                    Value::Null
                }
                DeviceAction::Bulk {
                    product,
                    action,
                    to_group,
                    status,
                    group,
                    version,
                    chip,
                    serial_prefix,
                    search,
                    all,
                } => {
                    let filter = json!({
                        "status": status, "group": group, "version": version, "chip": chip,
                        "serial_prefix": serial_prefix, "q": search,
                    });
                    let mut body = json!({ "action": action, "filter": filter, "all": all });
                    if let Some(g) = to_group {
                        body["group_id"] = json!(g);
                    }
                    api.json(
                        M::POST,
                        &format!("/api/v1/products/{product}/devices/bulk"),
                        Some(body),
                    )
                    .await?
                }
                DeviceAction::Show { product, serial } => {
                    api.json(
                        M::GET,
                        &format!("/api/v1/products/{product}/devices/{serial}"),
                        None,
                    )
                    .await?
                }
                DeviceAction::Set {
                    product,
                    serial,
                    status,
                    group,
                    password,
                } => {
                    let mut body = json!({});
                    if let Some(s) = status {
                        body["status"] = json!(s.to_ascii_lowercase());
                    }
                    if let Some(g) = group {
                        body["group_id"] = json!(g);
                    }
                    if let Some(p) = password {
                        body["password"] = json!(p);
                    }
                    api.json(
                        M::PATCH,
                        &format!("/api/v1/products/{product}/devices/{serial}"),
                        Some(body),
                    )
                    .await?
                }
                DeviceAction::Delete { product, serial } => {
                    api.json(
                        M::DELETE,
                        &format!("/api/v1/products/{product}/devices/{serial}"),
                        None,
                    )
                    .await?
                }
            };
            print(&answer);
        }
        ClientCommand::Firmware { action, remote } => {
            let api = Api::new(&remote)?;
            let answer = match action {
                FirmwareAction::Upload {
                    product,
                    file,
                    version,
                } => {
                    let mut path = format!("/api/v1/products/{product}/firmware");
                    if let Some(v) = version {
                        path.push_str(&format!("?version={}", urlencode(&v)));
                    }
                    upload(&api, &path, &file, "application/octet-stream").await?
                }
                FirmwareAction::List {
                    product,
                    version,
                    chip,
                    format,
                } => {
                    let mut filters = form_urlencoded::Serializer::new(String::new());
                    filters.append_pair("limit", "1000");
                    for (name, value) in [("version", version), ("chip", chip), ("format", format)]
                    {
                        if let Some(v) = value {
                            filters.append_pair(name, &v);
                        }
                    }
                    let filters = filters.finish();
                    print_every_page(
                        &api,
                        &format!("/api/v1/products/{product}/firmware?{filters}"),
                    )
                    .await?
                }
                FirmwareAction::Delete { product, id } => {
                    api.json(
                        M::DELETE,
                        &format!("/api/v1/products/{product}/firmware/{id}"),
                        None,
                    )
                    .await?
                }
            };
            print(&answer);
        }
    }
    Ok(())
}

/// Walks a paged list (`path` with its query) to its end, printing one item a line as each
/// page arrives.
async fn print_every_page(api: &Api, path: &str) -> anyhow::Result<Value> {
    let mut cursor: Option<String> = None;
    loop {
        let mut page_path = path.to_string();
        if let Some(c) = &cursor {
            page_path.push_str("&cursor=");
            page_path.push_str(c);
        }
        let page = api.json(reqwest::Method::GET, &page_path, None).await?;
        for item in page["items"].as_array().into_iter().flatten() {
            println!("{item}");
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return Ok(Value::Null),
        }
    }
}

/// Streams the file to the server with a progress bar on stderr (and says so while the
/// server works on it after the last byte).
async fn upload(
    api: &Api,
    path: &str,
    file: &std::path::Path,
    content_type: &str,
) -> anyhow::Result<Value> {
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let size = handle.metadata().await?.len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("uploading {}", file.display()));
    let progress = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(handle).inspect(move |chunk| {
        if let Ok(chunk) = chunk {
            progress.inc(chunk.len() as u64);
            if progress.position() >= size {
                progress.set_message("sent; the server is working on it");
            }
        }
    });
    let req = api
        .request(reqwest::Method::POST, path)
        .header("content-type", content_type)
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(stream));
    let result = api.send(req).await;
    bar.finish_and_clear();
    result
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
