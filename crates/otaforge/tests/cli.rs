//! The binary as an operator uses it: `otaforge serve` prints the first admin password,
//! the CLI logs in, creates a product, uploads firmware, and SIGTERM stops the server.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_otaforge");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    let root = workspace_root();
    let out = root.join("target/fixtures");
    let status = Command::new("bash")
        .arg(root.join("scripts/fixtures.sh"))
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("running scripts/fixtures.sh");
    assert!(status.success(), "scripts/fixtures.sh failed");
    out.join(name)
}

use support::free_port;

fn wait_for_port(port: u16) {
    support::wait_for_port(port, "otaforge serve");
}

fn cli(server: &str, token: Option<&str>, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("OTAFORGE_URL", server)
        .env_remove("OTAFORGE_ADMIN_TOKEN");
    match token {
        Some(t) => cmd.env("OTAFORGE_TOKEN", t),
        None => cmd.env_remove("OTAFORGE_TOKEN"),
    };
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "otaforge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// A list the CLI prints one JSON object a line (fetched page by page), as an array.
fn cli_lines(server: &str, token: Option<&str>, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("OTAFORGE_URL", server)
        .env_remove("OTAFORGE_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("OTAFORGE_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "otaforge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or(serde_json::Value::Null))
        .collect()
}

fn start(
    data: &Path,
    port: u16,
    admin_token: Option<&str>,
) -> (std::process::Child, Option<String>) {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
    ])
    .arg(data)
    .env("OTAFORGE_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some(t) = admin_token {
        cmd.env("OTAFORGE_ADMIN_TOKEN", t);
    }
    let mut child = cmd.spawn().unwrap();
    wait_for_port(port);
    // The banner (if any) is printed before the server listens.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(p) = line.trim().strip_prefix("password: ") {
                let _ = tx.send(p.to_string());
            }
        }
    });
    let password = rx.recv_timeout(Duration::from_millis(500)).ok();
    (child, password)
}

fn terminate(mut child: std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "the server exited with {status} on SIGTERM"
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn operator_session_from_the_terminal() {
    let image = fixture("app-v2.bin");
    let data = std::env::temp_dir().join(format!("otaforge-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");

    let (child, password) = start(&data, port, None);
    let password = password.expect("the first start prints the admin password");
    assert!(
        data.join("otaforge.db").exists(),
        "SQLite database created in the data folder"
    );

    let out = Command::new(BIN)
        .args(["login", "--username", "admin"])
        .env("OTAFORGE_URL", &server)
        .env("OTAFORGE_PASSWORD", &password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.len(), 32);

    let product = cli(&server, Some(&token), &["product", "create", "demo"]);
    assert_eq!(product["name"], "demo");
    assert_eq!(product["api_key"].as_str().unwrap().len(), 32);
    let pid = product["id"].to_string();
    // Firmware keys (Secure Boot V2 key digests) are set and cleared from the CLI.
    let digest = "5e7a94ebe20ddf7f4f5eedf1bddddd429e41db6f19475fe599006a4d41ec3f13";
    let keyed = cli(
        &server,
        Some(&token),
        &["product", "firmware-keys", &pid, digest],
    );
    assert_eq!(keyed["firmware_keys"][0], digest, "{keyed}");
    let cleared = cli(&server, Some(&token), &["product", "firmware-keys", &pid]);
    assert_eq!(cleared["firmware_keys"].as_array().map(Vec::len), Some(0));

    let firmware = cli(
        &server,
        Some(&token),
        &[
            "firmware",
            "upload",
            "--product",
            &pid,
            image.to_str().unwrap(),
        ],
    );
    assert_eq!(firmware["version"], "2.0.0");
    assert_eq!(firmware["size"], std::fs::metadata(&image).unwrap().len());
    let gid = product["default_group_id"].to_string();
    let fid = firmware["id"].to_string();
    let group = cli(
        &server,
        Some(&token),
        &[
            "group",
            "assign",
            "--product",
            &pid,
            "--group",
            &gid,
            "--firmware",
            &fid,
        ],
    );
    assert_eq!(group["firmware_id"], firmware["id"]);
    let device = cli(
        &server,
        Some(&token),
        &[
            "device",
            "add",
            "--product",
            &pid,
            "bot_001",
            "--password",
            "12345",
        ],
    );
    assert_eq!(
        device["firmware_url"],
        format!("{server}/ota/{pid}/bot_001")
    );

    // Without a token the CLI says what to do.
    let out = Command::new(BIN)
        .args(["product", "list"])
        .env("OTAFORGE_URL", &server)
        .env_remove("OTAFORGE_TOKEN")
        .env_remove("OTAFORGE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("otaforge login"));

    // Tokens are listed (never the token itself) and revoked from the terminal.
    let tokens = cli(&server, Some(&token), &["token", "list"]);
    let tokens = tokens.as_array().unwrap();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0]["expires_at"].as_i64().unwrap() > 0);
    assert!(!tokens[0].to_string().contains(&token));
    let id = tokens[0]["id"].as_str().unwrap();
    cli(&server, Some(&token), &["token", "revoke", id]);
    let out = Command::new(BIN)
        .args(["product", "list"])
        .env("OTAFORGE_URL", &server)
        .env("OTAFORGE_TOKEN", &token)
        .env_remove("OTAFORGE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a revoked token no longer works");

    terminate(child);

    // Second start: no new password; OTAFORGE_ADMIN_TOKEN is an admin token; data survived.
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let (child, password) = start(&data, port, Some("automation-token"));
    assert_eq!(password, None);
    let products = cli(&server, Some("automation-token"), &["product", "list"]);
    assert_eq!(products[0]["name"], "demo");
    let devices = cli_lines(
        &server,
        Some("automation-token"),
        &["device", "list", "--product", &pid],
    );
    assert_eq!(devices[0]["serial"], "bot_001");
    // Many devices at once: an import, a filtered list, a bulk change, the export.
    let csv = data.join("fleet.csv");
    std::fs::write(
        &csv,
        "serial,status\nimp-1,new\nimp-2,new\nimp-3,verified\n",
    )
    .unwrap();
    let imported = cli(
        &server,
        Some("automation-token"),
        &["device", "import", "--product", &pid, csv.to_str().unwrap()],
    );
    assert_eq!(imported["created"], 3, "{imported}");
    let listed = cli_lines(
        &server,
        Some("automation-token"),
        &[
            "device",
            "list",
            "--product",
            &pid,
            "--search",
            "imp-",
            "--status",
            "new",
        ],
    );
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    let changed = cli(
        &server,
        Some("automation-token"),
        &[
            "device",
            "bulk",
            "--product",
            &pid,
            "verify",
            "--serial-prefix",
            "imp-",
        ],
    );
    assert_eq!(changed["changed"], 3, "{changed}");
    let exported = data.join("export.csv");
    cli(
        &server,
        Some("automation-token"),
        &[
            "device",
            "export",
            "--product",
            &pid,
            "--out",
            exported.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(&exported).unwrap();
    assert_eq!(text.lines().count(), 5, "a header and four devices: {text}");
    assert!(text.contains("imp-2,Default,verified"), "{text}");
    terminate(child);
    let _ = std::fs::remove_dir_all(&data);
}

/// Peak resident memory (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `HTTPUpdate`'s GET of a static link with Basic credentials.
fn static_link_get(path: &str, user: &str, password: &str) -> Vec<u8> {
    use base64::Engine;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nUser-Agent: ESP32-http-Update\r\n\
         x-ESP32-STA-MAC: 24:0A:C4:01:02:03\r\nx-ESP32-mode: sketch\r\n\
         Authorization: Basic {token}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

async fn status_of(port: u16, request: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(&request).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut buf))
        .await
        .expect("no answer within 30 s")
        .unwrap();
    let head = String::from_utf8_lossy(&buf);
    head.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A flood of 1,000 concurrent wrong static-link passwords (argon2id needs 19 MiB a run)
/// leaves `otaforge serve` under 512 MiB, and a device with the right password is answered
/// within 2 s throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_flood_keeps_the_server_small() {
    let data = std::env::temp_dir().join(format!("otaforge-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let (child, _) = start(&data, port, Some("flood-admin"));
    let product = cli(
        &server,
        Some("flood-admin"),
        &["product", "create", "flood"],
    );
    let pid = product["id"].to_string();
    cli(
        &server,
        Some("flood-admin"),
        &[
            "device",
            "add",
            "--product",
            &pid,
            "good",
            "--password",
            "right-pw",
        ],
    );
    let link = format!("/ota/{pid}/good");
    // Nothing is assigned: the right password gets 404, a wrong one 401.
    assert_eq!(
        status_of(port, static_link_get(&link, "good", "right-pw")).await,
        404
    );

    let flood: Vec<_> = (0..1000)
        .map(|i| {
            let serial = format!("dev{}", i % 200);
            let req = static_link_get(
                &format!("/ota/{pid}/{serial}"),
                &serial,
                &format!("guess-{i}"),
            );
            tokio::spawn(status_of(port, req))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    assert_eq!(
        status_of(port, static_link_get(&link, "good", "right-pw")).await,
        404
    );
    let answered_in = started.elapsed();
    let mut statuses = std::collections::BTreeMap::new();
    for f in flood {
        *statuses.entry(f.await.unwrap()).or_insert(0u32) += 1;
    }
    let peak = peak_rss_kib(child.id());
    terminate(child);
    let _ = std::fs::remove_dir_all(&data);
    assert!(
        answered_in < Duration::from_secs(2),
        "the right password waited {answered_in:?}"
    );
    assert!(
        statuses.keys().all(|s| [401, 429, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(peak < 512 * 1024, "peak RSS of otaforge serve: {peak} KiB");
    eprintln!(
        "flood: {statuses:?}, right password answered in {answered_in:?}, peak RSS {peak} KiB"
    );
}
