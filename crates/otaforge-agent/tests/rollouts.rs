//! Staged rollouts proven with the fleet simulator over real HTTP: a healthy firmware goes
//! through every stage to 1,000 devices; a firmware with which 30% of devices roll back halts
//! in its first stage, never reaches a device outside it, and auto-rollback returns that stage
//! to the previous firmware.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use otaforge_agent::device::demo_image;
use otaforge_agent::sim::{self, SimConfig, SimDialect};
use otaforge_formats::esp::Chip;
use otaforge_server::{AppState, Config, Secret};
use otaforge_store::model::*;
use serde_json::json;

const CHIP: Chip = Chip::Esp32C3;

struct Fleet {
    base: String,
    state: AppState,
    product: i64,
    group: i64,
    key: String,
    v2: i64,
    serials: Vec<String>,
    v1_image: Vec<u8>,
    _stop: tokio::sync::oneshot::Sender<()>,
    dir: std::path::PathBuf,
}

/// A fresh PostgreSQL database (the test fails loudly when PostgreSQL is not reachable).
async fn pg_database(tag: &str) -> String {
    use sqlx::Executor;
    let admin = std::env::var("OTAFORGE_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into());
    let name = format!("otaforge_ro_{tag}_{}", std::process::id());
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

async fn fleet(tag: &str, devices: usize) -> Fleet {
    fleet_on(tag, devices, None).await
}

async fn fleet_on(tag: &str, devices: usize, database_url: Option<String>) -> Fleet {
    let dir = std::env::temp_dir().join(format!("otaforge-rollout-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = Config {
        listen: addr,
        data_dir: dir.clone(),
        admin_token: Some(Secret::new("t")),
        telemetry_flush_interval: Duration::from_millis(100),
        rollout_tick: Duration::from_millis(200),
        database_url,
        ..Config::default()
    };
    let state = AppState::open(config).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(otaforge_server::serve(
        state.clone(),
        listener,
        async move {
            let _ = rx.await;
        },
    ));
    let store = state.store();
    let key = otaforge_server::auth::random_secret().unwrap();
    let product = store
        .create_product("fleet", &otaforge_server::auth::digest(&key))
        .await
        .unwrap();
    let v1_image = demo_image(CHIP, "fleet", "1.0.0", 16_000);
    let v1 = state
        .store_firmware(product.id, v1_image.clone().into(), None)
        .await
        .unwrap();
    let v2 = state
        .store_firmware(
            product.id,
            demo_image(CHIP, "fleet", "2.0.0", 20_000).into(),
            None,
        )
        .await
        .unwrap();
    // Everyone runs 1.0.0, which is also what the group has assigned.
    store
        .update_group(
            product.id,
            product.default_group_id,
            GroupPatch {
                firmware_id: Some(Some(v1.id)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let serials: Vec<String> = (0..devices).map(|i| format!("{tag}{i:05}")).collect();
    for s in &serials {
        store
            .create_device(NewDevice {
                product_id: product.id,
                group_id: None,
                serial: s.clone(),
                status: DeviceStatus::Verified,
                password_hash: None,
            })
            .await
            .unwrap();
    }
    Fleet {
        base: format!("http://{addr}"),
        state,
        product: product.id,
        group: product.default_group_id,
        key,
        v2: v2.id,
        serials,
        v1_image,
        _stop: tx,
        dir,
    }
}

impl Fleet {
    async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth("t");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    fn sim(&self, fail_health: f64, until: Option<&str>, stop: Arc<AtomicBool>) -> SimConfig {
        SimConfig {
            servers: vec![self.base.clone()],
            dialect: SimDialect::OtaDrive {
                api_key: self.key.clone(),
            },
            serials: self.serials.clone(),
            initial_image: self.v1_image.clone(),
            chip: CHIP,
            slot_size: 64 * 1024,
            poll: Duration::from_millis(500),
            jitter: 0.3,
            fail_health,
            power_loss: 0.0,
            drop_rate: 0.0,
            duration: Duration::from_secs(150),
            until_version: until.map(str::to_string),
            seed: 11,
            stop: Some(stop),
            w800_share: 0.0,
            w800_image: None,
        }
    }
}

fn stage(size: StageSize, success_threshold: f64, failure_threshold: f64) -> serde_json::Value {
    json!({"size": size, "success_threshold": success_threshold, "failure_threshold": failure_threshold,
           "window_secs": 0, "auto_advance": true, "auto_rollback": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_firmware_goes_through_every_stage_to_1000_devices() {
    healthy(fleet("ok", 1000).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_firmware_goes_through_every_stage_on_postgres() {
    healthy(fleet_on("okpg", 1000, Some(pg_database("ok").await)).await).await;
}

async fn healthy(fleet: Fleet) {
    // Every device of a stage must succeed before the next starts.
    let stages = json!([
        stage(StageSize::Count(10), 1.0, 0.1),
        stage(StageSize::Count(300), 1.0, 0.1),
        stage(StageSize::Rest, 1.0, 0.1)
    ]);
    let path = format!("/api/v1/products/{}/rollouts", fleet.product);
    // The dry run shows who is in each stage and how many bytes will move.
    let (status, dry) = fleet
        .api(reqwest::Method::POST, &path, Some(json!({"firmware_id": fleet.v2, "target": {"group_id": fleet.group}, "stages": stages, "dry_run": true})))
        .await;
    assert_eq!(status, 200, "{dry}");
    let counts: Vec<i64> = dry["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [10, 300, 690]);
    assert_eq!(dry["stages"][0]["devices"].as_array().unwrap().len(), 10);
    let (status, rollout) = fleet
        .api(reqwest::Method::POST, &path, Some(json!({"firmware_id": fleet.v2, "target": {"group_id": fleet.group}, "stages": stages})))
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().unwrap();
    let summary = sim::run(
        fleet.sim(0.0, Some("2.0.0"), Arc::new(AtomicBool::new(false))),
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(summary.converged, "{summary}");
    assert_eq!(
        (summary.installs, summary.rollbacks),
        (1000, 0),
        "{summary}"
    );
    let start = Instant::now();
    let done = loop {
        let (_, r) = fleet
            .api(reqwest::Method::GET, &format!("{path}/{id}"), None)
            .await;
        if r["state"] == "completed" {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not completed: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let succeeded: Vec<i64> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["succeeded"].as_i64().unwrap())
        .collect();
    assert_eq!(succeeded, [10, 300, 690], "{done}");
    // The group now carries the new firmware; the audit log tells the story.
    let group = fleet
        .state
        .store()
        .get_group(fleet.product, fleet.group)
        .await
        .unwrap();
    assert_eq!(group.firmware_id, Some(fleet.v2));
    let audit = fleet.state.store().audit_log(None, 50).await.unwrap();
    let actions: Vec<&str> = audit.iter().rev().map(|a| a.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "started rollout",
            "advanced to stage 2",
            "advanced to stage 3",
            "completed"
        ]
    );

    // Each device's timeline: offered, downloaded, installed (and its own feedback).
    let (_, events) = fleet
        .api(
            reqwest::Method::GET,
            &format!(
                "/api/v1/products/{}/devices/{}/events",
                fleet.product, fleet.serials[0]
            ),
            None,
        )
        .await;
    let kinds: Vec<&str> = events
        .get("items")
        .and_then(|i| i.as_array())
        .unwrap()
        .iter()
        .rev()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.starts_with(&["offered", "downloaded", "installed"])
            || kinds.starts_with(&["offered", "downloaded", "feedback", "installed"]),
        "{kinds:?}"
    );

    // The pages: progress per stage as a server-drawn SVG chart, versions per group, audit log.
    let hash = otaforge_server::auth::hash_password("pw").unwrap();
    fleet
        .state
        .store()
        .create_user("op", &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let web = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The sign-in page first, for its CSRF cookie and token, as a browser does.
    let form = web
        .get(format!("{}/login", fleet.base))
        .send()
        .await
        .unwrap();
    let first_cookie = |r: &reqwest::Response| {
        r.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string()
    };
    let login_cookie = first_cookie(&form);
    let html = form.text().await.unwrap();
    let token = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let login = web
        .post(format!("{}/login", fleet.base))
        .header("cookie", login_cookie)
        .form(&[
            ("csrf", token.as_str()),
            ("kind", "operator"),
            ("username", "op"),
            ("password", "pw"),
        ])
        .send()
        .await
        .unwrap();
    let cookie = first_cookie(&login);
    let page = |path: String| {
        let (web, cookie) = (web.clone(), cookie.clone());
        async move {
            web.get(path)
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let html = page(format!(
        "{}/products/{}/rollouts/{id}",
        fleet.base, fleet.product
    ))
    .await;
    assert!(
        html.contains("<svg") && html.contains("<title>succeeded: 690</title>"),
        "{html}"
    );
    assert!(html.contains("completed"));
    let html = page(format!("{}/products/{}", fleet.base, fleet.product)).await;
    assert!(
        html.contains("devices per running version") && html.contains("<title>2.0.0: 1000</title>"),
        "{html}"
    );
    let html = page(format!("{}/audit", fleet.base)).await;
    assert!(html.contains("advanced to stage 3"));
    let html = page(format!(
        "{}/workspace/{}/{}",
        fleet.base, fleet.product, fleet.serials[0]
    ))
    .await;
    assert!(html.contains("id=\"timeline\"") && html.contains("installed"));
    let _ = std::fs::remove_dir_all(&fleet.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firmware_that_30_percent_roll_back_halts_in_stage_one_and_is_rolled_back() {
    failing(fleet("bad", 1000).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_firmware_halts_and_rolls_back_on_postgres() {
    failing(fleet_on("badpg", 1000, Some(pg_database("bad").await)).await).await;
}

async fn failing(fleet: Fleet) {
    let stages = json!([
        stage(StageSize::Count(50), 0.95, 0.15),
        stage(StageSize::Count(300), 0.95, 0.15),
        stage(StageSize::Rest, 0.95, 0.15)
    ]);
    let path = format!("/api/v1/products/{}/rollouts", fleet.product);
    let (status, rollout) = fleet
        .api(
            reqwest::Method::POST,
            &path,
            Some(json!({"firmware_id": fleet.v2, "target": {"group_id": fleet.group}, "stages": stages, "rate_per_minute": 1000})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sim_task = tokio::spawn(sim::run(fleet.sim(0.3, None, stop.clone()), |_, _| {}));

    // Halted in stage 1, with that stage rolled back.
    let start = Instant::now();
    let halted = loop {
        let (_, r) = fleet
            .api(reqwest::Method::GET, &format!("{path}/{id}"), None)
            .await;
        if r["state"] == "halted" {
            break r;
        }
        assert!(r["state"] == "running" && r["current_stage"] == 1, "{r}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never halted: {r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(halted["current_stage"], 1);
    assert_eq!(halted["stages"][0]["rolled_back_to_previous"], true);
    assert!(
        halted["message"]
            .as_str()
            .unwrap()
            .contains("rolled back or failed"),
        "{halted}"
    );

    // Stage 1 returns to 1.0.0: devices that had installed 2.0.0 are offered 1.0.0 again.
    let members = fleet.state.store().rollout_members(id).await.unwrap();
    let stage_one: HashMap<i64, MemberState> = members
        .iter()
        .filter(|m| m.stage == 0)
        .map(|m| (m.device_id, m.state))
        .collect();
    assert_eq!(stage_one.len(), 50);
    let start = Instant::now();
    loop {
        fleet.state.flush_telemetry().await.unwrap();
        let devices = fleet
            .state
            .store()
            .list_devices(fleet.product)
            .await
            .unwrap();
        let on_v2: Vec<&str> = devices
            .iter()
            .filter(|d| d.telemetry.version.as_deref() == Some("2.0.0"))
            .map(|d| d.serial.as_str())
            .collect();
        if on_v2.is_empty()
            && devices
                .iter()
                .all(|d| d.telemetry.version.as_deref() == Some("1.0.0"))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "still on 2.0.0: {on_v2:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let summary = sim_task.await.unwrap().unwrap();

    // Nobody outside stage 1 was ever offered the firmware.
    let members = fleet.state.store().rollout_members(id).await.unwrap();
    for m in members.iter().filter(|m| m.stage > 0) {
        assert_eq!(
            m.state,
            MemberState::Pending,
            "device {} in stage {} moved",
            m.device_id,
            m.stage + 1
        );
        assert!(m.offered_at.is_none());
        assert!(
            fleet
                .state
                .store()
                .device_events(m.device_id, None, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }
    let rolled_back = members
        .iter()
        .filter(|m| m.state == MemberState::RolledBack)
        .count();
    assert!(
        rolled_back >= 8,
        "stage 1 rollbacks recorded: {rolled_back}; {summary}"
    );
    // Devices of stage 1 that had installed 2.0.0 were taken back to 1.0.0 (all run 1.0.0 now).
    let installed = members
        .iter()
        .filter(|m| m.stage == 0 && m.state == MemberState::Succeeded)
        .count();
    assert!(
        installed > 0,
        "some stage 1 devices had installed 2.0.0 before the halt; {summary}"
    );
    let (_, r) = fleet
        .api(reqwest::Method::GET, &format!("{path}/{id}"), None)
        .await;
    assert_eq!(r["state"], "halted");
    let group = fleet
        .state
        .store()
        .get_group(fleet.product, fleet.group)
        .await
        .unwrap();
    assert_ne!(
        group.firmware_id,
        Some(fleet.v2),
        "the group keeps the previous firmware"
    );
    let _ = std::fs::remove_dir_all(&fleet.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_steer_static_link_devices_too() {
    let fleet = fleet("sl", 0).await;
    let store = fleet.state.store();
    let hash = otaforge_server::auth::hash_password("shared-pw").unwrap();
    let serials: Vec<String> = (0..100).map(|i| format!("sl{i:04}")).collect();
    for s in &serials {
        store
            .create_device(NewDevice {
                product_id: fleet.product,
                group_id: None,
                serial: s.clone(),
                status: DeviceStatus::Verified,
                password_hash: Some(hash.clone()),
            })
            .await
            .unwrap();
    }
    let stages = json!([
        stage(StageSize::Percent(10.0), 1.0, 0.2),
        stage(StageSize::Rest, 1.0, 0.2)
    ]);
    let (status, rollout) = fleet
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/products/{}/rollouts", fleet.product),
            Some(json!({"firmware_id": fleet.v2, "target": {"group_id": fleet.group}, "stages": stages})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    // Static-link devices have no "alive" call: the server learns of the install from the
    // version header of their next check-in.
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = fleet.sim(0.0, None, stop.clone());
    config.serials = serials;
    config.dialect = SimDialect::StaticLink {
        product_id: fleet.product,
        password: "shared-pw".into(),
    };
    let running = tokio::spawn(sim::run(config, |_, _| {}));
    let start = Instant::now();
    let r = loop {
        let (_, r) = fleet
            .api(
                reqwest::Method::GET,
                &format!(
                    "/api/v1/products/{}/rollouts/{}",
                    fleet.product, rollout["id"]
                ),
                None,
            )
            .await;
        if r["state"] == "completed" {
            break r;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not completed: {r}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let summary = running.await.unwrap().unwrap();
    assert_eq!(summary.installs, 100, "{summary}");
    let succeeded: Vec<i64> = r["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["succeeded"].as_i64().unwrap())
        .collect();
    assert_eq!(succeeded, [10, 90], "{r}");
    let _ = std::fs::remove_dir_all(&fleet.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_cap_holds_and_operators_pause_resume_and_cancel() {
    let fleet = fleet("cap", 50).await;
    let path = format!("/api/v1/products/{}/rollouts", fleet.product);
    let (status, rollout) = fleet
        .api(
            reqwest::Method::POST,
            &path,
            Some(json!({"firmware_id": fleet.v2, "stages": [stage(StageSize::Rest, 1.0, 0.5)], "rate_per_minute": 5})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().unwrap();
    // A second rollout over the same devices is refused while this one lives.
    let (status, _) = fleet
        .api(
            reqwest::Method::POST,
            &path,
            Some(json!({"firmware_id": fleet.v2, "stages": [stage(StageSize::Rest, 1.0, 0.5)]})),
        )
        .await;
    assert_eq!(status, 409);
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(sim::run(fleet.sim(0.0, None, stop.clone()), |_, _| {}));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let members = fleet.state.store().rollout_members(id).await.unwrap();
    let offered = members.iter().filter(|m| m.offered_at.is_some()).count();
    assert_eq!(offered, 5, "five first offers in the first minute, no more");

    for (action, expect) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("cancel", "cancelled"),
    ] {
        let (status, r) = fleet
            .api(
                reqwest::Method::POST,
                &format!("{path}/{id}/{action}"),
                None,
            )
            .await;
        assert_eq!((status, r["state"].as_str()), (200, Some(expect)), "{r}");
    }
    let (status, r) = fleet
        .api(reqwest::Method::POST, &format!("{path}/{id}/resume"), None)
        .await;
    assert_eq!(status, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"));
    let (status, _) = fleet
        .api(reqwest::Method::POST, &format!("{path}/{id}/explode"), None)
        .await;
    assert_eq!(status, 404);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = running.await;
    // After the cancel nobody new is offered anything: still five.
    let members = fleet.state.store().rollout_members(id).await.unwrap();
    assert_eq!(members.iter().filter(|m| m.offered_at.is_some()).count(), 5);
    let audit: Vec<String> = fleet
        .state
        .store()
        .audit_log(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.action)
        .collect();
    assert_eq!(
        audit[..3],
        [
            "cancel".to_string(),
            "resume".to_string(),
            "pause".to_string()
        ]
    );
    let _ = std::fs::remove_dir_all(&fleet.dir);
}
