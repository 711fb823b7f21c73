//! What the binary's tests share: ports, child processes that end with the test, the API
//! over real HTTP, and the simulated fleet the rollout tests drive.

#![allow(dead_code)]

use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use otaforge_agent::sim::{SimConfig, SimDialect};
use otaforge_formats::esp::Chip;
use serde_json::Value;

/// A child process killed when the test ends, however it ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (up to 30 s) until something listens on the port.
pub fn wait_for_port(port: u16, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what} did not start listening on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One API call with a bearer token; the status and the JSON answer (null if none).
pub async fn call(
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An API call that must succeed.
pub async fn api(
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let (status, v) = call(base, token, method, path, body).await;
    assert!(status.is_success(), "{path}: {status} {v}");
    v
}

/// Uploads a firmware image; returns its id.
pub async fn upload(base: &str, token: &str, product: i64, image: &[u8]) -> i64 {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/v1/products/{product}/firmware"))
        .bearer_auth(token)
        .body(image.to_vec())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let fw: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "upload: {fw}");
    fw["id"].as_i64().unwrap()
}

/// ESP32-C3 devices polling every 300 ms until they all run 2.0.0 (150 s at most).
pub fn fleet(
    servers: Vec<String>,
    api_key: String,
    serials: Vec<String>,
    initial_image: Vec<u8>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> SimConfig {
    SimConfig {
        servers,
        dialect: SimDialect::OtaDrive { api_key },
        serials,
        initial_image,
        chip: Chip::Esp32C3,
        slot_size: 64 * 1024,
        poll: Duration::from_millis(300),
        jitter: 0.3,
        fail_health: 0.0,
        power_loss: 0.0,
        drop_rate: 0.0,
        duration: Duration::from_secs(150),
        until_version: Some("2.0.0".into()),
        seed,
        stop: Some(stop),
        w800_share: 0.0,
        w800_image: None,
    }
}

/// Polls the rollout until it completes (30 s at most); returns its last body.
pub async fn completed_rollout(base: &str, token: &str, product: i64, rollout: i64) -> Value {
    let start = Instant::now();
    loop {
        let r = api(
            base,
            token,
            reqwest::Method::GET,
            &format!("/api/v1/products/{product}/rollouts/{rollout}"),
            None,
        )
        .await;
        if r["state"] == "completed" {
            return r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the rollout did not complete: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each stage's (devices, succeeded, failed).
pub fn stage_counts(rollout: &Value) -> Vec<(i64, i64, i64)> {
    rollout["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["devices"].as_i64().unwrap(),
                s["succeeded"].as_i64().unwrap(),
                s["failed"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// How many distinct devices the rollout's member list holds (one page of up to 1,000).
pub async fn distinct_members(base: &str, token: &str, product: i64, rollout: i64) -> usize {
    let members = api(
        base,
        token,
        reqwest::Method::GET,
        &format!("/api/v1/products/{product}/rollouts/{rollout}/devices?limit=1000"),
        None,
    )
    .await;
    assert!(members["next"].is_null(), "one page holds every member");
    let mut seen: Vec<&str> = members["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["serial"].as_str().unwrap())
        .collect();
    seen.sort();
    seen.dedup();
    seen.len()
}
