//! A rollout survives its server being killed with SIGKILL mid-stage: the restarted server
//! picks it up from the database, the devices carry on, and at the end every device is
//! counted exactly once.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use otaforge_agent::device::demo_image;
use otaforge_agent::sim::{self, SimConfig, SimDialect};
use otaforge_formats::esp::Chip;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_otaforge");
const TOKEN: &str = "restart-token";

fn serve(data: &std::path::Path, port: u16) -> std::process::Child {
    let child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .env("OTAFORGE_ADMIN_TOKEN", TOKEN)
        .env("OTAFORGE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

async fn api(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_kill_minus_9() {
    let data = std::env::temp_dir().join(format!("otaforge-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = serve(&data, port);

    let chip = Chip::Esp32C3;
    let v1 = demo_image(chip, "restart", "1.0.0", 12_000);
    let v2 = demo_image(chip, "restart", "2.0.0", 14_000);
    let product = api(
        &base,
        reqwest::Method::POST,
        "/api/v1/products",
        Some(json!({"name": "restart"})),
    )
    .await;
    let pid = product["id"].as_i64().unwrap();
    let group = product["default_group_id"].as_i64().unwrap();
    let key = product["api_key"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for image in [&v1, &v2] {
        let fw: Value = http
            .post(format!("{base}/api/v1/products/{pid}/firmware"))
            .bearer_auth(TOKEN)
            .body(image.clone())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(fw["id"].as_i64().unwrap());
    }
    api(
        &base,
        reqwest::Method::PATCH,
        &format!("/api/v1/products/{pid}/groups/{group}"),
        Some(json!({"firmware_id": ids[0]})),
    )
    .await;
    let serials: Vec<String> = (0..300).map(|i| format!("r{i:04}")).collect();
    for s in &serials {
        api(
            &base,
            reqwest::Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": s})),
        )
        .await;
    }
    let stage = |size: Value| json!({"size": size, "success_threshold": 1.0, "failure_threshold": 0.5, "window_secs": 3});
    let rollout = api(
        &base,
        reqwest::Method::POST,
        &format!("/api/v1/products/{pid}/rollouts"),
        Some(json!({"firmware_id": ids[1], "target": {"group_id": group},
                    "stages": [stage(json!({"count": 100})), stage(json!("rest"))]})),
    )
    .await;
    let rid = rollout["id"].as_i64().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let config = SimConfig {
        servers: vec![base.clone()],
        dialect: SimDialect::OtaDrive { api_key: key },
        serials: serials.clone(),
        initial_image: v1,
        chip,
        slot_size: 64 * 1024,
        poll: Duration::from_millis(300),
        jitter: 0.3,
        fail_health: 0.0,
        power_loss: 0.0,
        drop_rate: 0.0,
        duration: Duration::from_secs(120),
        until_version: Some("2.0.0".into()),
        seed: 3,
        stop: Some(stop.clone()),
        w800_share: 0.0,
        w800_image: None,
    };
    let fleet = tokio::spawn(sim::run(config, |_, _| {}));

    // Mid-stage 1: some devices updated, not all. Then SIGKILL, no goodbye.
    let start = Instant::now();
    loop {
        let r = api(
            &base,
            reqwest::Method::GET,
            &format!("/api/v1/products/{pid}/rollouts/{rid}"),
            None,
        )
        .await;
        if r["stages"][0]["succeeded"].as_i64().unwrap() >= 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stage 1 did not start: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut server = serve(&data, port);

    let summary = fleet.await.unwrap().unwrap();
    assert!(summary.converged, "{summary}");
    let start = Instant::now();
    let done = loop {
        let r = api(
            &base,
            reqwest::Method::GET,
            &format!("/api/v1/products/{pid}/rollouts/{rid}"),
            None,
        )
        .await;
        if r["state"] == "completed" {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not completed after the restart: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Every device counted once: 100 + 200 members, all succeeded, none twice, none lost.
    let stages: Vec<(i64, i64)> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["devices"].as_i64().unwrap(),
                s["succeeded"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(stages, [(100, 100), (200, 200)], "{done}");
    let members = api(
        &base,
        reqwest::Method::GET,
        &format!("/api/v1/products/{pid}/rollouts/{rid}/devices?limit=1000"),
        None,
    )
    .await;
    assert!(members["next"].is_null(), "one page holds the 300");
    let mut seen: Vec<&str> = members["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["serial"].as_str().unwrap())
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 300);
    assert_eq!(summary.installs, 300, "{summary}");
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
