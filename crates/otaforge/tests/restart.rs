//! A rollout survives its server being killed with SIGKILL mid-stage: the restarted server
//! picks it up from the database, the devices carry on, and at the end every device is
//! counted exactly once.

mod support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use otaforge_agent::device::demo_image;
use otaforge_agent::sim;
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
    support::wait_for_port(port, "otaforge serve");
    child
}

async fn api(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    support::api(base, TOKEN, method, path, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_kill_minus_9() {
    let data = std::env::temp_dir().join(format!("otaforge-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let port = support::free_port();
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
    let ids = [
        support::upload(&base, TOKEN, pid, &v1).await,
        support::upload(&base, TOKEN, pid, &v2).await,
    ];
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
    let config = support::fleet(
        vec![base.clone()],
        key,
        serials.clone(),
        v1,
        3,
        stop.clone(),
    );
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
    let done = support::completed_rollout(&base, TOKEN, pid, rid).await;
    // Every device counted once: 100 + 200 members, all succeeded, none twice, none lost.
    assert_eq!(
        support::stage_counts(&done),
        [(100, 100, 0), (200, 200, 0)],
        "{done}"
    );
    assert_eq!(support::distinct_members(&base, TOKEN, pid, rid).await, 300);
    assert_eq!(summary.installs, 300, "{summary}");
    server.kill().unwrap();
    server.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);
}
