//! The binary as an operator uses it: `otaforge serve` prints the first admin password,
//! the CLI logs in, creates a product, uploads firmware, and SIGTERM stops the server.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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

    terminate(child);

    // Second start: no new password; OTAFORGE_ADMIN_TOKEN is an admin token; data survived.
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let (child, password) = start(&data, port, Some("automation-token"));
    assert_eq!(password, None);
    let products = cli(&server, Some("automation-token"), &["product", "list"]);
    assert_eq!(products[0]["name"], "demo");
    let devices = cli(
        &server,
        Some("automation-token"),
        &["device", "list", "--product", &pid],
    );
    assert_eq!(devices[0]["serial"], "bot_001");
    terminate(child);
    let _ = std::fs::remove_dir_all(&data);
}
