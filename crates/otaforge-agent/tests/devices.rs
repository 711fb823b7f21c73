//! The device side against a real server on a real port: the fleet simulator with power
//! losses, failing health checks and dropped connections; the Linux agent on a flash file;
//! and bad bytes refused without touching the running image.

use std::time::Duration;

use otaforge_agent::agent::{
    Agent, AgentChip, AgentConfig, Pass, init_flash_file, init_w800_flash_file,
};
use otaforge_agent::client::Endpoint;
use otaforge_agent::device::{demo_image, demo_w800_image, demo_w800_ota};
use otaforge_agent::http::Url;
use otaforge_agent::sim::{self, SimConfig, SimDialect, draw};
use otaforge_device::esp::Layout;
use otaforge_formats::esp::Chip;
use otaforge_server::{AppState, Config, Secret};
use otaforge_store::model::{DeviceStatus, GroupPatch, NewDevice};

struct Server {
    base: String,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    dir: std::path::PathBuf,
}

impl Server {
    async fn start(tag: &str) -> Server {
        let dir = std::env::temp_dir().join(format!("otaforge-dev-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config {
            listen: addr,
            data_dir: dir.clone(),
            admin_token: Some(Secret::new("t")),
            telemetry_flush_interval: Duration::from_millis(100),
            rollout_tick: Duration::from_millis(200),
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
        Server {
            base: format!("http://{addr}"),
            state,
            stop: Some(tx),
            dir,
        }
    }

    /// A product whose Default group has `image` assigned; returns (product id, API key).
    async fn product_with(&self, image: Vec<u8>, version: Option<&str>) -> (i64, String) {
        let key = otaforge_server::auth::random_secret().unwrap();
        let store = self.state.store();
        let product = store
            .create_product("fleet", &otaforge_server::auth::digest(&key))
            .await
            .unwrap();
        let fw = self
            .state
            .store_firmware(product.id, image.into(), version.map(str::to_string))
            .await
            .unwrap();
        store
            .update_group(
                product.id,
                product.default_group_id,
                GroupPatch {
                    firmware_id: Some(Some(fw.id)),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        (product.id, key)
    }

    async fn add_device(&self, product: i64, serial: &str, password_hash: Option<String>) {
        self.state
            .store()
            .create_device(NewDevice {
                product_id: product,
                group_id: None,
                serial: serial.to_string(),
                status: DeviceStatus::Verified,
                password_hash,
            })
            .await
            .unwrap();
    }

    async fn finish(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const CHIP: Chip = Chip::Esp32C3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_updates_through_power_loss_rollbacks_and_drops() {
    let server = Server::start("sim").await;
    let v1 = demo_image(CHIP, "fleet", "1.0.0", 20_000);
    let v2 = demo_image(CHIP, "fleet", "2.0.0", 30_000);
    let (product, key) = server.product_with(v2, None).await;
    let serials: Vec<String> = (0..200).map(|i| format!("dev{i:04}")).collect();
    for s in &serials {
        server.add_device(product, s, None).await;
    }
    let config = SimConfig {
        servers: vec![server.base.clone()],
        dialect: SimDialect::OtaDrive { api_key: key },
        serials: serials.clone(),
        initial_image: v1,
        chip: CHIP,
        slot_size: 64 * 1024,
        poll: Duration::from_millis(300),
        jitter: 0.3,
        fail_health: 0.15,
        power_loss: 0.2,
        drop_rate: 0.1,
        duration: Duration::from_secs(90),
        until_version: Some("2.0.0".into()),
        seed: 7,
        stop: None,
        w800_share: 0.0,
        w800_image: None,
    };
    let summary = sim::run(config, |_, _| {}).await.unwrap();
    let failing: Vec<&String> = serials
        .iter()
        .filter(|s| draw(7, s, "health") < 0.15)
        .collect();
    assert!(summary.converged, "{summary}");
    assert_eq!(summary.rollbacks as usize, failing.len(), "{summary}");
    assert_eq!(
        summary.installs as usize,
        serials.len() - failing.len(),
        "{summary}"
    );
    assert_eq!(
        summary.versions.get("2.0.0").copied().unwrap_or(0),
        serials.len() - failing.len()
    );
    assert_eq!(
        summary.versions.get("1.0.0").copied().unwrap_or(0),
        failing.len()
    );
    assert!(
        summary.power_losses > 0,
        "some updates were cut by power loss: {summary}"
    );
    assert!(
        summary.retries > 0,
        "dropped connections were resumed: {summary}"
    );
    assert_eq!(summary.failed_downloads, 0, "{summary}");

    // The server heard every device's final version.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.state.flush_telemetry().await.unwrap();
    let devices = server.state.store().list_devices(product).await.unwrap();
    for d in devices {
        let expected = if failing.contains(&&d.serial) {
            "1.0.0"
        } else {
            "2.0.0"
        };
        assert_eq!(
            d.telemetry.version.as_deref(),
            Some(expected),
            "{}",
            d.serial
        );
    }
    server.finish().await;
}

fn temp_flash(tag: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("otaforge-flash-{tag}-{}.bin", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// One release (an ESP32-C3 image and a W800 xz OTA image) assigned to one group reaches a
/// fleet of both: each device gets its own family's image (an ESP image would not pass the
/// W800 bootloader, nor the other way round), the W800s through `wm_ota_ops` and the
/// bootloader's xz unpacking, and the fleet converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_of_esp32s_and_w800s_takes_one_release() {
    let server = Server::start("mixed").await;
    let slot = 64 * 1024;
    let layout = sim::w800_layout(slot);
    let esp_v2 = demo_image(CHIP, "mixed", "2.0.0", 30_000);
    // One product holds each version once: the W800 build says so in its build metadata.
    let w800_v2 = demo_w800_ota(&layout, "2.0.0+w800", 30_000);
    assert!(
        otaforge_formats::w800::parse_image(&w800_v2)
            .unwrap()
            .is_xz(),
        "the W800 target is an xz OTA image"
    );
    let (product, key) = server.product_with(esp_v2, None).await;
    let w800_fw = server
        .state
        .store_firmware(product, w800_v2.into(), None)
        .await
        .unwrap();
    assert_eq!(w800_fw.metadata["chip"], "w800");
    let group = server.state.store().list_groups(product).await.unwrap()[0].id;
    server
        .state
        .store()
        .update_group(
            product,
            group,
            GroupPatch {
                other_firmware_ids: Some(vec![w800_fw.id]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let serials: Vec<String> = (0..60).map(|i| format!("mix{i:03}")).collect();
    for s in &serials {
        server.add_device(product, s, None).await;
    }
    let w800s: Vec<&String> = serials
        .iter()
        .filter(|s| draw(5, s, "w800") < 0.5)
        .collect();
    assert!(
        (10..50).contains(&w800s.len()),
        "both kinds in the fleet: {}",
        w800s.len()
    );
    let config = SimConfig {
        servers: vec![server.base.clone()],
        dialect: SimDialect::OtaDrive { api_key: key },
        serials: serials.clone(),
        initial_image: demo_image(CHIP, "mixed", "1.0.0", 20_000),
        chip: CHIP,
        slot_size: slot,
        poll: Duration::from_millis(300),
        jitter: 0.3,
        fail_health: 0.0,
        power_loss: 0.0,
        drop_rate: 0.05,
        duration: Duration::from_secs(60),
        until_version: Some("2.0.0".into()),
        seed: 5,
        stop: None,
        w800_share: 0.5,
        w800_image: Some(demo_w800_image(&layout, "1.0.0", 20_000)),
    };
    let summary = sim::run(config, |_, _| {}).await.unwrap();
    assert!(summary.converged, "{summary}");
    assert_eq!(summary.installs, 60, "{summary}");
    assert_eq!(
        summary.versions.get("2.0.0").copied(),
        Some(60 - w800s.len()),
        "{summary}"
    );
    assert_eq!(
        summary.versions.get("2.0.0+w800").copied(),
        Some(w800s.len()),
        "{summary}"
    );
    // The server heard each W800 say what it runs.
    server.state.flush_telemetry().await.unwrap();
    for serial in w800s {
        let d = server
            .state
            .store()
            .get_device(product, serial)
            .await
            .unwrap();
        assert_eq!(
            d.telemetry.version.as_deref(),
            Some("2.0.0+w800"),
            "{serial}"
        );
    }
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_agent_installs_and_rolls_back_on_a_flash_file() {
    let server = Server::start("agent").await;
    let v1 = demo_image(CHIP, "agent", "1.0.0", 10_000);
    let v2 = demo_image(CHIP, "agent", "2.0.0", 12_000);
    let (product, _) = server.product_with(v2.clone(), None).await;
    let hash = otaforge_server::auth::hash_password("12345").unwrap();
    server.add_device(product, "bot_001", Some(hash)).await;
    let flash = temp_flash("agent");
    init_flash_file(&flash, &Layout::default_4mb(), Some(&v1)).unwrap();
    let config = AgentConfig {
        flash: flash.clone(),
        endpoint: Endpoint::StaticLink {
            url: Url::parse(&format!("{}/ota/{product}/bot_001", server.base)).unwrap(),
            password: "12345".into(),
        },
        serial: "bot_001".into(),
        chip: AgentChip::Esp(CHIP),
        interval: Duration::from_secs(1),
        health_cmd: Some("test \"$OTAFORGE_VERSION\" != 2.0.0".into()),
        once: true,
    };

    // The new firmware fails its health check: the agent rolls back to 1.0.0.
    let mut agent = Agent::start(config.clone()).await.unwrap();
    assert_eq!(agent.version(), "1.0.0");
    let pass = agent.pass().await.unwrap();
    assert_eq!(
        pass,
        Pass::RolledBack {
            tried: "2.0.0".into(),
            running: "1.0.0".into()
        }
    );
    drop(agent);

    // A healthy run installs it, and the flash file reads like an ESP32's.
    let healthy = AgentConfig {
        health_cmd: Some("true".into()),
        ..config.clone()
    };
    let mut agent = Agent::start(healthy.clone()).await.unwrap();
    let pass = agent.pass().await.unwrap();
    assert_eq!(
        pass,
        Pass::Installed {
            from: "1.0.0".into(),
            to: "2.0.0".into()
        }
    );
    assert_eq!(agent.pass().await.unwrap(), Pass::UpToDate("2.0.0".into()));
    drop(agent);
    let bytes = std::fs::read(&flash).unwrap();
    assert_eq!(bytes.len(), 4 * 1024 * 1024);
    let table = otaforge_formats::partition::PartitionTable::parse(&bytes[0x8000..0x8C00]).unwrap();
    let ota_0 = table.find("ota_0").unwrap();
    assert_eq!(ota_0.offset, 0x11_0000);
    let slot = &bytes[ota_0.offset as usize..ota_0.offset as usize + v2.len()];
    assert_eq!(
        slot,
        v2.as_slice(),
        "the new image sits in ota_0 byte for byte"
    );

    // Restarting the agent boots the confirmed image again.
    let agent = Agent::start(healthy).await.unwrap();
    assert_eq!(agent.version(), "2.0.0");
    let _ = std::fs::remove_file(&flash);
    server.finish().await;
}

/// `otaforge agent --chip w800`: a W800 flash file (the SDK's 2 MB layout) takes an xz OTA
/// image through `wm_ota_ops` and the bootloader's unpacking, over the OTAdrive dialect
/// naming its chip; a restart runs the new app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_agent_plays_a_w800() {
    let server = Server::start("w800-agent").await;
    let layout = otaforge_device::w800::W800Layout::default_2mb();
    let v1 = demo_w800_image(&layout, "1.0.0", 30_000);
    let v2 = demo_w800_ota(&layout, "2.0.0", 40_000);
    let v2_app = demo_w800_image(&layout, "2.0.0", 40_000);
    let (product, key) = server.product_with(v2, None).await;
    server.add_device(product, "w800-1", None).await;
    let flash = temp_flash("w800");
    init_w800_flash_file(&flash, &v1).unwrap();
    let config = AgentConfig {
        flash: flash.clone(),
        endpoint: Endpoint::OtaDrive {
            server: Url::parse(&server.base).unwrap(),
            api_key: key,
        },
        serial: "w800-1".into(),
        chip: AgentChip::W800,
        interval: Duration::from_secs(1),
        health_cmd: Some("true".into()),
        once: true,
    };
    let mut agent = Agent::start(config.clone()).await.unwrap();
    assert_eq!(agent.version(), "1.0.0");
    let pass = agent.pass().await.unwrap();
    assert_eq!(
        pass,
        Pass::Installed {
            from: "1.0.0".into(),
            to: "2.0.0".into()
        }
    );
    assert_eq!(agent.pass().await.unwrap(), Pass::UpToDate("2.0.0".into()));
    drop(agent);
    // The bootloader unpacked the xz image into app, byte for byte.
    let bytes = std::fs::read(&flash).unwrap();
    assert_eq!(bytes.len(), 2 * 1024 * 1024);
    let app = layout.app.offset as usize;
    assert_eq!(&bytes[app..app + v2_app.len()], v2_app.as_slice());
    let agent = Agent::start(config).await.unwrap();
    assert_eq!(agent.version(), "2.0.0");
    let _ = std::fs::remove_file(&flash);
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_leave_the_running_image_and_otadata_untouched() {
    let server = Server::start("bad").await;
    let v1 = demo_image(CHIP, "bad", "1.0.0", 10_000);
    // Served as a raw binary: an image for another chip.
    let wrong_chip = demo_image(Chip::Esp32S3, "bad", "3.0.0", 10_000);
    let (product, _) = server.product_with(wrong_chip, Some("3.0.0")).await;
    let hash = otaforge_server::auth::hash_password("pw").unwrap();
    server.add_device(product, "d1", Some(hash)).await;
    let flash = temp_flash("bad");
    init_flash_file(&flash, &Layout::default_4mb(), Some(&v1)).unwrap();
    let config = AgentConfig {
        flash: flash.clone(),
        endpoint: Endpoint::StaticLink {
            url: Url::parse(&format!("{}/ota/{product}/d1", server.base)).unwrap(),
            password: "pw".into(),
        },
        serial: "d1".into(),
        chip: AgentChip::Esp(CHIP),
        interval: Duration::from_secs(1),
        health_cmd: None,
        once: true,
    };
    let mut agent = Agent::start(config.clone()).await.unwrap();
    let before = std::fs::read(&flash).unwrap();
    let pass = agent.pass().await.unwrap();
    let Pass::Failed(message) = pass else {
        panic!("expected a refusal, got {pass:?}")
    };
    assert!(message.contains("built for esp32s3"), "{message}");
    drop(agent);
    let after = std::fs::read(&flash).unwrap();
    assert_eq!(
        &before[0xD000..0xF000],
        &after[0xD000..0xF000],
        "otadata untouched"
    );
    assert_eq!(
        &before[0x1_0000..0x11_0000],
        &after[0x1_0000..0x11_0000],
        "running image untouched"
    );
    let agent = Agent::start(config).await.unwrap();
    assert_eq!(agent.version(), "1.0.0");
    let _ = std::fs::remove_file(&flash);
    server.finish().await;
}
