//! One conformance suite for every `Store` backend: each method of the trait is exercised
//! once, with its refusals, on SQLite and on a fresh PostgreSQL database. A backend that
//! answers differently from the other fails here, not in a server story.

use std::collections::BTreeMap;
use std::sync::Arc;

use otaforge_store::model::*;
use otaforge_store::{Store, StoreError};

fn unique() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}_{nanos:x}", std::process::id())
}

async fn sqlite() -> (Arc<dyn Store>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("otaforge-conformance-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("store.db").display());
    (otaforge_store::open(&url).await.unwrap(), dir)
}

fn pg_admin_url() -> String {
    std::env::var("OTAFORGE_TEST_PG")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

async fn postgres() -> (Arc<dyn Store>, String) {
    use sqlx::Executor;
    let admin = pg_admin_url();
    let name = format!("otaforge_conf_{}", unique());
    let pool = sqlx::PgPool::connect(&admin).await.unwrap_or_else(|e| {
        panic!("PostgreSQL at {admin} is not reachable ({e}); start it or set OTAFORGE_TEST_PG")
    });
    pool.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
    let store = otaforge_store::open(&format!("{base}/{name}"))
        .await
        .unwrap();
    (store, name)
}

async fn drop_pg(name: &str) {
    use sqlx::Executor;
    if let Ok(pool) = sqlx::PgPool::connect(&pg_admin_url()).await {
        let _ = pool
            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
            .await;
        pool.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_conforms() {
    let (store, dir) = sqlite().await;
    assert_eq!(store.backend(), "sqlite");
    suite(&*store).await;
    paging(&*store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_conforms() {
    let (store, name) = postgres().await;
    assert_eq!(store.backend(), "postgres");
    suite(&*store).await;
    paging(&*store).await;
    drop(store);
    drop_pg(&name).await;
}

#[tokio::test]
async fn unknown_schemes_are_refused() {
    for url in ["mysql://x/y", "sqlite://", "file.db", ""] {
        assert!(
            matches!(
                otaforge_store::open(url).await,
                Err(StoreError::UnsupportedUrl(_))
            ),
            "{url}"
        );
    }
}

fn conflict<T: std::fmt::Debug>(r: otaforge_store::Result<T>) -> String {
    match r {
        Err(StoreError::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn not_found<T: std::fmt::Debug>(r: otaforge_store::Result<T>) {
    assert!(
        matches!(r, Err(StoreError::NotFound(_))),
        "expected not found, got {r:?}"
    );
}

async fn suite(store: &dyn Store) {
    let now = now_millis();

    // ---- several nodes: leases and shared counting windows ----
    assert!(store.hold_lease("gates", "one", 60_000).await.unwrap());
    assert!(
        store.hold_lease("gates", "one", 60_000).await.unwrap(),
        "renewed"
    );
    assert!(
        !store.hold_lease("gates", "two", 60_000).await.unwrap(),
        "held by one"
    );
    assert!(
        store.hold_lease("other", "two", 60_000).await.unwrap(),
        "leases are by name"
    );
    store.release_lease("gates", "two").await.unwrap();
    assert!(
        !store.hold_lease("gates", "two", 60_000).await.unwrap(),
        "not two's to give"
    );
    store.release_lease("gates", "one").await.unwrap();
    assert!(
        store.hold_lease("gates", "two", 1).await.unwrap(),
        "given up"
    );
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(
        store.hold_lease("gates", "one", 60_000).await.unwrap(),
        "run out"
    );
    for _ in 0..3 {
        assert!(store.take_slot("k", 60_000, 3).await.unwrap());
    }
    assert!(!store.take_slot("k", 60_000, 3).await.unwrap(), "full");
    store.give_back_slot("k", false).await.unwrap();
    assert!(
        store.take_slot("k", 60_000, 3).await.unwrap(),
        "one given back"
    );
    assert!(!store.take_slot("k", 60_000, 3).await.unwrap());
    assert!(
        store.take_slot("k2", 60_000, 1).await.unwrap(),
        "keys are apart"
    );
    assert!(
        !store.take_slot("k3", 60_000, 0).await.unwrap(),
        "a cap of 0 takes none"
    );
    store.give_back_slot("k", true).await.unwrap();
    assert!(store.take_slot("k", 60_000, 3).await.unwrap(), "forgotten");
    assert!(store.take_slot("short", 1, 1).await.unwrap());
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(
        store.take_slot("short", 1, 1).await.unwrap(),
        "a new window"
    );
    assert_eq!(store.prune_slots(now_millis() + 1).await.unwrap(), 3);
    assert!(store.take_slot("k2", 60_000, 1).await.unwrap(), "pruned");

    // ---- users and tokens ----
    assert_eq!(store.count_users().await.unwrap(), 0);
    let ann = store
        .create_user("ann", "$argon2id$x", otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    conflict(
        store
            .create_user("ann", "$argon2id$y", otaforge_store::model::Role::Operator)
            .await,
    );
    let bob = store
        .create_user("bob", "$argon2id$z", otaforge_store::model::Role::Operator)
        .await
        .unwrap();
    assert_eq!(store.count_users().await.unwrap(), 2);
    assert_eq!(store.user_by_name("ann").await.unwrap().unwrap().id, ann.id);
    assert!(store.user_by_name("nobody").await.unwrap().is_none());
    assert_eq!(
        store.user_by_id(bob.id).await.unwrap().unwrap().username,
        "bob"
    );
    assert!(store.user_by_id(9_999).await.unwrap().is_none());
    // Roles: listed by name, changed, and a deleted account takes its tokens along.
    let names: Vec<(String, Role)> = store
        .list_users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| (u.username, u.role))
        .collect();
    assert_eq!(
        names,
        [
            ("ann".to_string(), Role::Admin),
            ("bob".to_string(), Role::Operator)
        ]
    );
    let cy = store
        .create_user("cy", "$argon2id$c", Role::Viewer)
        .await
        .unwrap();
    assert_eq!(
        store
            .set_user_role(cy.id, Role::Operator)
            .await
            .unwrap()
            .role,
        Role::Operator
    );
    store.set_user_password(cy.id, "$argon2id$d").await.unwrap();
    assert_eq!(
        store
            .user_by_id(cy.id)
            .await
            .unwrap()
            .unwrap()
            .password_hash,
        "$argon2id$d"
    );
    store
        .create_token(&"c".repeat(64), cy.id, now + 60_000)
        .await
        .unwrap();
    store.delete_user(cy.id).await.unwrap();
    assert!(
        store
            .user_by_token(&"c".repeat(64))
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.delete_user(cy.id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.set_user_role(cy.id, Role::Admin).await,
        Err(StoreError::NotFound(_))
    ));
    let (live, dead) = ("a".repeat(64), "b".repeat(64));
    store
        .create_token(&live, ann.id, now + 60_000)
        .await
        .unwrap();
    store.create_token(&dead, bob.id, now - 1).await.unwrap();
    assert_eq!(
        store.user_by_token(&live).await.unwrap().unwrap().id,
        ann.id
    );
    assert!(
        store.user_by_token(&dead).await.unwrap().is_none(),
        "expired"
    );
    let all = store.list_tokens(None).await.unwrap();
    assert_eq!(all.len(), 2);
    let mine = store.list_tokens(Some(ann.id)).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].id, &live[..TOKEN_ID_LEN]);
    assert!(
        !store.revoke_token(&mine[0].id, Some(bob.id)).await.unwrap(),
        "not bob's"
    );
    assert!(
        !store.revoke_token("%", None).await.unwrap(),
        "no wildcards"
    );
    assert!(store.revoke_token(&mine[0].id, Some(ann.id)).await.unwrap());
    assert!(store.user_by_token(&live).await.unwrap().is_none());

    // ---- products and groups ----
    let p = store.create_product("thermo", "key1").await.unwrap();
    conflict(store.create_product("thermo", "key2").await);
    assert_eq!(store.list_products().await.unwrap().len(), 1);
    assert_eq!(store.get_product(p.id).await.unwrap().name, "thermo");
    not_found(store.get_product(9_999).await);
    assert_eq!(
        store
            .product_by_key_digest("key1")
            .await
            .unwrap()
            .unwrap()
            .id,
        p.id
    );
    let p = store.set_product_key(p.id, "key3").await.unwrap();
    assert!(store.product_by_key_digest("key1").await.unwrap().is_none());
    assert!(store.product_by_key_digest("key3").await.unwrap().is_some());
    let groups = store.list_groups(p.id).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert!(groups[0].is_default && groups[0].id == p.default_group_id);
    let lab = store.create_group(p.id, "lab").await.unwrap();
    conflict(store.create_group(p.id, "lab").await);
    assert_eq!(store.get_group(p.id, lab.id).await.unwrap().name, "lab");
    not_found(store.get_group(p.id, 9_999).await);

    // ---- firmware ----
    let fw = |version: &str, sha: char| NewFirmware {
        product_id: p.id,
        version: version.into(),
        size: 3,
        md5: "0".repeat(32),
        sha256: sha.to_string().repeat(64),
        format: "raw".into(),
        metadata: serde_json::json!({"chip": "esp32"}),
    };
    let f1 = store.create_firmware(fw("1.0.0", 'c')).await.unwrap();
    conflict(store.create_firmware(fw("1.0.0", 'd')).await);
    let f2 = store.create_firmware(fw("2.0.0", 'd')).await.unwrap();
    assert_eq!(store.list_firmware(p.id).await.unwrap().len(), 2);
    let got = store.get_firmware(p.id, f1.id).await.unwrap();
    assert_eq!(got.metadata["chip"], "esp32");
    not_found(store.get_firmware(p.id, 9_999).await);
    assert!(store.blob_in_use(&"c".repeat(64)).await.unwrap());
    assert!(!store.blob_in_use(&"e".repeat(64)).await.unwrap());
    let patch = GroupPatch {
        name: Some("lab-2".into()),
        firmware_id: Some(Some(f1.id)),
        config: Some(serde_json::json!({"alarm": {"number": 1}})),
        ..GroupPatch::default()
    };
    let lab = store.update_group(p.id, lab.id, patch).await.unwrap();
    assert_eq!((lab.name.as_str(), lab.firmware_id), ("lab-2", Some(f1.id)));
    assert_eq!(lab.config["alarm"]["number"], 1);
    assert!(lab.other_firmware_ids.is_empty());
    let msg = conflict(store.delete_firmware(p.id, f1.id).await);
    assert!(msg.contains("group"), "{msg}");
    // A release: the group holds a Linux artifact beside its ESP32 image.
    let linux = store
        .create_firmware(NewFirmware {
            metadata: serde_json::json!({"chip": "mender"}),
            ..fw("1.0.0-linux", 'f')
        })
        .await
        .unwrap();
    let others = |ids: Vec<Id>| GroupPatch {
        other_firmware_ids: Some(ids),
        ..GroupPatch::default()
    };
    not_found(store.update_group(p.id, lab.id, others(vec![9_999])).await);
    let lab = store
        .update_group(p.id, lab.id, others(vec![linux.id]))
        .await
        .unwrap();
    assert_eq!(lab.other_firmware_ids, vec![linux.id]);
    assert_eq!(lab.firmware_id, Some(f1.id), "the patch leaves the rest");
    assert_eq!(
        store
            .get_group(p.id, lab.id)
            .await
            .unwrap()
            .other_firmware_ids,
        vec![linux.id]
    );
    let msg = conflict(store.delete_firmware(p.id, linux.id).await);
    assert!(msg.contains("lab-2"), "{msg}");
    let lab = store
        .update_group(p.id, lab.id, others(vec![]))
        .await
        .unwrap();
    assert!(lab.other_firmware_ids.is_empty());

    // ---- devices and telemetry ----
    let d1 = store
        .create_device(NewDevice {
            product_id: p.id,
            group_id: Some(lab.id),
            serial: "dev-1".into(),
            status: DeviceStatus::Verified,
            password_hash: Some("$argon2id$d".into()),
        })
        .await
        .unwrap();
    conflict(
        store
            .create_device(NewDevice {
                product_id: p.id,
                group_id: None,
                serial: "dev-1".into(),
                status: DeviceStatus::New,
                password_hash: None,
            })
            .await,
    );
    let d2 = store.register_device(p.id, "dev-2").await.unwrap();
    assert_eq!(
        (d2.status, d2.group_id),
        (DeviceStatus::New, p.default_group_id)
    );
    assert_eq!(
        store.register_device(p.id, "dev-2").await.unwrap().id,
        d2.id
    );
    assert_eq!(store.list_devices(p.id).await.unwrap().len(), 2);
    assert!(store.find_device(p.id, "dev-9").await.unwrap().is_none());
    not_found(store.get_device(p.id, "dev-9").await);
    assert_eq!(store.device_by_id(d1.id).await.unwrap().serial, "dev-1");
    assert_eq!(store.devices_by_serial("dev-1").await.unwrap().len(), 1);
    let report = Telemetry {
        last_seen: Some(now),
        version: Some("1.0.0".into()),
        sketch_md5: Some("1".repeat(32)),
        free_space: Some(1_000),
        ..Telemetry::default()
    };
    store
        .record_telemetry(&[(d1.id, report), (9_999, Telemetry::default())])
        .await
        .unwrap();
    let d1 = store.get_device(p.id, "dev-1").await.unwrap();
    assert_eq!(d1.telemetry.version.as_deref(), Some("1.0.0"));
    assert_eq!(d1.telemetry.free_space, Some(1_000));
    // A later report with less in it keeps what it does not say.
    let seen = Telemetry {
        last_seen: Some(5),
        ..Telemetry::default()
    };
    store.record_telemetry(&[(d1.id, seen)]).await.unwrap();
    let d1 = store.get_device(p.id, "dev-1").await.unwrap();
    assert_eq!(d1.telemetry.last_seen, Some(5));
    assert_eq!(d1.telemetry.version.as_deref(), Some("1.0.0"));
    assert_eq!(d1.telemetry.free_space, Some(1_000));
    // A large batch: a row inside it (SQLite sends 64 rows a statement batch: row 100 is
    // the 37th of the second) and its last row (one of the rows left over) are written with
    // every field in its place, the unknown ids around them skipped.
    let mut big: Vec<(Id, Telemetry)> = (0..1_201)
        .map(|i| {
            let seen = Telemetry {
                last_seen: Some(7),
                ..Telemetry::default()
            };
            (10_000_000 + i, seen)
        })
        .collect();
    big[100] = (
        d2.id,
        Telemetry {
            last_seen: Some(6),
            version: Some("2.0.0".into()),
            sketch_md5: Some("2".repeat(32)),
            sta_mac: Some("AA:BB:CC:DD:EE:01".into()),
            ap_mac: Some("AA:BB:CC:DD:EE:02".into()),
            free_space: Some(2_000),
            chip_size: Some(4_194_304),
            sdk_version: Some("v4.4".into()),
            chip: Some("esp32c3".into()),
        },
    );
    big[1_200] = (
        d1.id,
        Telemetry {
            last_seen: Some(8),
            sdk_version: Some("v5.1".into()),
            ..Telemetry::default()
        },
    );
    store.record_telemetry(&big).await.unwrap();
    let d1 = store.get_device(p.id, "dev-1").await.unwrap();
    assert_eq!(d1.telemetry.last_seen, Some(8));
    assert_eq!(d1.telemetry.sdk_version.as_deref(), Some("v5.1"));
    assert_eq!(d1.telemetry.version.as_deref(), Some("1.0.0"));
    let d2 = store.get_device(p.id, "dev-2").await.unwrap();
    assert_eq!(d2.telemetry.last_seen, Some(6));
    assert_eq!(d2.telemetry.version.as_deref(), Some("2.0.0"));
    assert_eq!(d2.telemetry.sketch_md5, Some("2".repeat(32)));
    assert_eq!(d2.telemetry.sta_mac.as_deref(), Some("AA:BB:CC:DD:EE:01"));
    assert_eq!(d2.telemetry.ap_mac.as_deref(), Some("AA:BB:CC:DD:EE:02"));
    assert_eq!(d2.telemetry.free_space, Some(2_000));
    assert_eq!(d2.telemetry.chip_size, Some(4_194_304));
    assert_eq!(d2.telemetry.sdk_version.as_deref(), Some("v4.4"));
    assert_eq!(d2.telemetry.chip.as_deref(), Some("esp32c3"));
    // The same report again, seen later: the time moves, every field stays; then one field
    // alone changes.
    let mut again = d2.telemetry.clone();
    again.last_seen = Some(9);
    store
        .record_telemetry(&[(d2.id, again.clone())])
        .await
        .unwrap();
    let d2 = store.get_device(p.id, "dev-2").await.unwrap();
    assert_eq!(d2.telemetry, again);
    again.chip = Some("esp32s3".into());
    again.last_seen = None;
    store.record_telemetry(&[(d2.id, again)]).await.unwrap();
    let d2 = store.get_device(p.id, "dev-2").await.unwrap();
    assert_eq!(d2.telemetry.chip.as_deref(), Some("esp32s3"));
    assert_eq!(d2.telemetry.last_seen, Some(9));
    assert_eq!(d2.telemetry.version.as_deref(), Some("2.0.0"));
    let patch = DevicePatch {
        status: Some(DeviceStatus::Blocked),
        group_id: Some(p.default_group_id),
        password_hash: Some(None),
    };
    let changed = store.update_device(p.id, "dev-2", patch).await.unwrap();
    assert_eq!(changed.status, DeviceStatus::Blocked);
    assert!(changed.password_hash.is_none());
    store.set_device_firmware(d1.id, Some(f2.id)).await.unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().firmware_id,
        Some(f2.id)
    );
    let msg = conflict(store.delete_firmware(p.id, f2.id).await);
    assert!(msg.contains("dev-1"), "{msg}");
    store.set_device_firmware(d1.id, None).await.unwrap();
    store
        .set_device_secrets(d1.id, Some("sealed"))
        .await
        .unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().secrets.as_deref(),
        Some("sealed")
    );
    assert_eq!(store.device_by_id(d1.id).await.unwrap().attributes, None);
    let attributes = serde_json::json!({"board": "ci", "hwrevision": "1.0"});
    store
        .set_device_attributes(d1.id, &attributes)
        .await
        .unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().attributes,
        Some(attributes.clone())
    );
    not_found(store.set_device_attributes(9_999, &attributes).await);
    store
        .set_device_closed_firmware(d1.id, Some(f2.id))
        .await
        .unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().closed_firmware_id,
        Some(f2.id)
    );
    store.set_device_closed_firmware(d1.id, None).await.unwrap();
    store
        .set_device_open_firmware(d1.id, Some(f2.id))
        .await
        .unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().open_firmware_id,
        Some(f2.id)
    );
    store.set_device_open_firmware(d1.id, None).await.unwrap();
    assert!(store.bind_device_key(d1.id, "PEM-1").await.unwrap());
    assert!(
        !store.bind_device_key(d1.id, "PEM-2").await.unwrap(),
        "a bound key is never replaced"
    );
    assert_eq!(
        store
            .device_by_id(d1.id)
            .await
            .unwrap()
            .public_key
            .as_deref(),
        Some("PEM-1")
    );
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().closed_firmware_id,
        None
    );

    // ---- resources ----
    let r = store
        .create_resource(NewResource {
            group_id: lab.id,
            name: "cert.pem".into(),
            fk: "fk1".into(),
            size: 5,
            md5: "2".repeat(32),
            sha256: "f".repeat(64),
        })
        .await
        .unwrap();
    assert_eq!(store.list_resources(lab.id).await.unwrap().len(), 1);
    assert_eq!(
        store.resource_by_fk(p.id, "fk1").await.unwrap().unwrap().id,
        r.id
    );
    assert!(store.resource_by_fk(p.id, "nope").await.unwrap().is_none());
    assert!(store.blob_in_use(&"f".repeat(64)).await.unwrap());
    assert_eq!(
        store.delete_resource(lab.id, r.id).await.unwrap().name,
        "cert.pem"
    );
    not_found(store.delete_resource(lab.id, r.id).await);

    // ---- sessions ----
    let session = |user: Option<Id>, device: Option<Id>, expires_at| Session {
        user_id: user,
        device_id: device,
        csrf: "c".repeat(32),
        expires_at,
    };
    store
        .create_session("s-user", &session(Some(ann.id), None, now + 60_000))
        .await
        .unwrap();
    store
        .create_session("s-bot", &session(None, Some(d1.id), now + 60_000))
        .await
        .unwrap();
    store
        .create_session("s-old", &session(Some(ann.id), None, now - 1))
        .await
        .unwrap();
    assert_eq!(
        store.session("s-user").await.unwrap().unwrap().user_id,
        Some(ann.id)
    );
    assert!(store.session("s-old").await.unwrap().is_none(), "expired");
    assert_eq!(
        store.delete_sessions_of(None, Some(d1.id)).await.unwrap(),
        1
    );
    assert!(store.session("s-bot").await.unwrap().is_none());
    store.delete_session("s-user").await.unwrap();
    assert!(store.session("s-user").await.unwrap().is_none());

    // ---- sketches and builds ----
    let files = BTreeMap::from([("main.ino".to_string(), "void setup(){}".to_string())]);
    let rev = store
        .save_revision(d1.id, "arduino:avr:uno", &files, "ann")
        .await
        .unwrap();
    store
        .save_revision(d1.id, "arduino:avr:uno", &files, "ann")
        .await
        .unwrap();
    assert_eq!(store.list_revisions(d1.id, 1).await.unwrap().len(), 1);
    assert_eq!(
        store.get_revision(d1.id, rev.id).await.unwrap().files,
        files
    );
    not_found(store.get_revision(d1.id, 9_999).await);
    let new_build = || NewBuild {
        product_id: Some(p.id),
        device_id: Some(d1.id),
        fqbn: "arduino:avr:uno".into(),
        files: files.clone(),
        requested_by: "ann".into(),
    };
    let b1 = store.create_build(new_build()).await.unwrap();
    let b2 = store.create_build(new_build()).await.unwrap();
    assert_eq!(
        store.get_build(b1.id).await.unwrap().status,
        BuildStatus::Queued
    );
    assert_eq!(store.list_builds(d1.id, 10).await.unwrap().len(), 2);
    assert_eq!(
        store.count_pending_builds(Some(d1.id), "x").await.unwrap(),
        2
    );
    assert_eq!(store.count_pending_builds(None, "ann").await.unwrap(), 2);
    assert_eq!(store.count_pending_builds(None, "x").await.unwrap(), 0);
    let claimed = store.claim_build("w1").await.unwrap().unwrap();
    assert_eq!(claimed.id, b1.id, "oldest first");
    assert_eq!(claimed.status, BuildStatus::Running);
    store.append_build_log(b1.id, "one ").await.unwrap();
    store.append_build_log(b1.id, "two").await.unwrap();
    let diag = Diagnostic {
        file: "main.ino".into(),
        line: 5,
        column: 1,
        severity: "error".into(),
        message: "boom".into(),
    };
    store
        .finish_build(
            b1.id,
            BuildStatus::Failed,
            std::slice::from_ref(&diag),
            None,
        )
        .await
        .unwrap();
    let done = store.get_build(b1.id).await.unwrap();
    assert_eq!(
        (done.status, done.log.as_str()),
        (BuildStatus::Failed, "one two")
    );
    assert_eq!(done.diagnostics, vec![diag]);
    let image = |name: &str, sha: &str| BuildImage {
        name: name.into(),
        sha256: sha.into(),
        size: 4,
    };
    assert!(store.list_build_images(b1.id).await.unwrap().is_empty());
    store
        .add_build_image(b1.id, &image("partitions.bin", "aa"))
        .await
        .unwrap();
    store
        .add_build_image(b1.id, &image("merged.bin", "bb"))
        .await
        .unwrap();
    store
        .add_build_image(b1.id, &image("merged.bin", "cc"))
        .await
        .unwrap();
    assert_eq!(
        store.list_build_images(b1.id).await.unwrap(),
        vec![image("merged.bin", "cc"), image("partitions.bin", "aa")],
        "by name, the second image of a name replacing the first"
    );
    assert!(
        store.blob_in_use("aa").await.unwrap(),
        "a kept image holds its blob"
    );
    assert!(!store.blob_in_use("bb").await.unwrap());
    let running = store.claim_build("w2").await.unwrap().unwrap();
    assert_eq!(running.id, b2.id);
    assert!(store.claim_build("w3").await.unwrap().is_none());
    assert_eq!(store.fail_stale_builds(now_millis() + 1).await.unwrap(), 1);
    assert_eq!(
        store.get_build(b2.id).await.unwrap().status,
        BuildStatus::Failed
    );

    // ---- rollouts ----
    let stages = vec![StageSpec {
        size: StageSize::Rest,
        success_threshold: 1.0,
        failure_threshold: 0.5,
        window_secs: 0,
        auto_advance: true,
        auto_rollback: false,
    }];
    let mut rollout = store
        .create_rollout(
            NewRollout {
                product_id: p.id,
                firmware_id: f2.id,
                other_firmware_ids: vec![linux.id],
                target: RolloutTarget {
                    group_id: Some(lab.id),
                    ..RolloutTarget::default()
                },
                stages,
                rate_per_minute: Some(10),
                created_by: "ann".into(),
            },
            &[(d1.id, 0, Some("1.0.0".into())), (d2.id, 0, None)],
        )
        .await
        .unwrap();
    assert_eq!(rollout.state, RolloutState::Running);
    assert_eq!(
        store.get_rollout(rollout.id).await.unwrap().rate_per_minute,
        Some(10)
    );
    not_found(store.get_rollout(9_999).await);
    assert_eq!(store.list_rollouts(p.id).await.unwrap().len(), 1);
    assert_eq!(
        store
            .get_rollout(rollout.id)
            .await
            .unwrap()
            .other_firmware_ids,
        vec![linux.id]
    );
    let msg = conflict(store.delete_firmware(p.id, linux.id).await);
    assert!(msg.contains("rollout"), "{msg}");
    assert_eq!(store.live_rollouts().await.unwrap().len(), 1);
    assert!(
        store
            .move_member(
                rollout.id,
                d1.id,
                &[MemberState::Pending],
                MemberState::Offered,
                ""
            )
            .await
            .unwrap()
    );
    assert!(
        !store
            .move_member(
                rollout.id,
                d1.id,
                &[MemberState::Pending],
                MemberState::Offered,
                ""
            )
            .await
            .unwrap(),
        "counted once"
    );
    let members = store.rollout_members(rollout.id).await.unwrap();
    let m1 = members.iter().find(|m| m.device_id == d1.id).unwrap();
    assert_eq!(m1.state, MemberState::Offered);
    let row = store
        .rollout_member(rollout.id, d1.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((row.device_id, row.state), (d1.id, MemberState::Offered));
    assert!(
        store
            .rollout_member(rollout.id, 9_999)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(m1.from_version.as_deref(), Some("1.0.0"));
    assert!(m1.offered_at.is_some());
    assert_eq!(store.offers_since(rollout.id, now - 1).await.unwrap(), 1);
    assert_eq!(
        store
            .offers_since(rollout.id, now_millis() + 60_000)
            .await
            .unwrap(),
        0
    );
    rollout.state = RolloutState::Halted;
    rollout.rolled_back_stages = vec![0];
    rollout.message = "too many failures".into();
    store.update_rollout(&rollout).await.unwrap();
    let back = store.get_rollout(rollout.id).await.unwrap();
    assert_eq!(
        (
            back.state,
            back.rolled_back_stages.clone(),
            back.message.as_str()
        ),
        (RolloutState::Halted, vec![0], "too many failures")
    );
    let msg = conflict(store.delete_firmware(p.id, f2.id).await);
    assert!(msg.contains("rollout"), "{msg}");

    // ---- events and audit ----
    store
        .add_device_event(d1.id, "offered", "2.0.0")
        .await
        .unwrap();
    store
        .add_device_event(d1.id, "installed", "2.0.0")
        .await
        .unwrap();
    let events = store.device_events(d1.id, None, 10).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, "installed", "newest first");
    store
        .audit("ann", "created product", "thermo", "")
        .await
        .unwrap();
    store
        .audit("ann", "deleted group", "lab", "from 127.0.0.1")
        .await
        .unwrap();
    let log = store.audit_log(None, 1).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].action, "deleted group", "newest first");

    // ---- deletes ----
    let msg = conflict(store.delete_group(p.id, p.default_group_id).await);
    assert!(!msg.is_empty());
    store
        .update_group(
            p.id,
            lab.id,
            GroupPatch {
                firmware_id: Some(None),
                ..GroupPatch::default()
            },
        )
        .await
        .unwrap();
    store.delete_group(p.id, lab.id).await.unwrap();
    assert_eq!(
        store.device_by_id(d1.id).await.unwrap().group_id,
        p.default_group_id,
        "devices move to Default"
    );
    store.delete_device(p.id, "dev-2").await.unwrap();
    not_found(store.delete_device(p.id, "dev-2").await);
    // The product goes with everything that belongs to it, its rollout included.
    store.delete_product(p.id).await.unwrap();
    not_found(store.get_product(p.id).await);
    not_found(store.get_rollout(rollout.id).await);
    assert!(!store.blob_in_use(&"c".repeat(64)).await.unwrap());
    assert!(
        !store.blob_in_use("aa").await.unwrap(),
        "a build's images go with its product"
    );
    not_found(store.delete_product(p.id).await);
}

/// Runs schema files the way the store did before it used sqlx's migrator, recording
/// versions in `schema_version`.
async fn legacy_schema<DB>(pool: &sqlx::Pool<DB>, files: &[&str])
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
{
    use sqlx::Executor;
    pool.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
        .await
        .unwrap();
    for (i, file) in files.iter().enumerate() {
        for statement in file.split(';') {
            let statement: String = statement
                .lines()
                .filter(|l| !l.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n");
            if !statement.trim().is_empty() {
                pool.execute(statement.as_str()).await.unwrap();
            }
        }
        pool.execute(format!("INSERT INTO schema_version (version) VALUES ({})", i + 1).as_str())
            .await
            .unwrap();
    }
}

/// A database made before the store used sqlx's migrator (versions 1 to 3 in
/// `schema_version`, with data) is adopted: nothing is re-applied, version 4 runs, the data
/// is there, and a second open changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn databases_from_before_the_migrator_are_adopted() {
    let dir = std::env::temp_dir().join(format!("otaforge-legacy-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("old.db");
    let url = format!("sqlite://{}", file.display());
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&file)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        legacy_schema(
            &pool,
            &[
                include_str!("../migrations/sqlite.sql"),
                include_str!("../migrations/sqlite_2.sql"),
                include_str!("../migrations/sqlite_3.sql"),
            ],
        )
        .await;
        sqlx::query("INSERT INTO users (username, password_hash, is_admin, created_at) VALUES ('old', 'h', 1, 0)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO api_tokens (digest, user_id, created_at) VALUES ('d', 1, $1)")
            .bind(now_millis())
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    for _ in 0..2 {
        let store = otaforge_store::open(&url).await.unwrap();
        let old = store.user_by_name("old").await.unwrap().unwrap();
        assert_eq!(
            (old.id, old.role),
            (1, Role::Admin),
            "is_admin became the admin role"
        );
        // Version 4 gave the old token 30 days.
        assert_eq!(
            store.user_by_token("d").await.unwrap().unwrap().username,
            "old"
        );
        // The schema takes new rows after the adoption.
        store
            .create_user(&format!("new-{}", unique()), "h", Role::Operator)
            .await
            .unwrap();
    }
    // A version this build does not know (a newer server wrote it): refused, not guessed.
    {
        let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (99, 'future', 1, x'00', 0)",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let refused = otaforge_store::open(&url).await.err().expect("refused");
    assert!(refused.to_string().contains("99"), "{refused}");
    let _ = std::fs::remove_dir_all(dir);

    let (name, admin) = {
        use sqlx::Executor;
        let admin = pg_admin_url();
        let name = format!("otaforge_legacy_{}", unique());
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        pool.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        pool.close().await;
        (name, admin)
    };
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    {
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        legacy_schema(
            &pool,
            &[
                include_str!("../migrations/postgres.sql"),
                include_str!("../migrations/postgres_2.sql"),
                include_str!("../migrations/postgres_3.sql"),
            ],
        )
        .await;
        sqlx::query("INSERT INTO users (username, password_hash, is_admin, created_at) VALUES ('old', 'h', 1, 0)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    for _ in 0..2 {
        let store = otaforge_store::open(&url).await.unwrap();
        assert!(store.user_by_name("old").await.unwrap().is_some());
    }
    drop_pg(&name).await;
}

/// Every page of `query`, fetched `size` at a time as the API does (one row more than it
/// shows, to know whether another page follows).
async fn all_pages(store: &dyn Store, product: Id, query: &DeviceQuery, size: i64) -> Vec<String> {
    let mut query = query.clone();
    let mut out = Vec::new();
    loop {
        query.limit = size + 1;
        let rows = store.device_page(product, &query).await.unwrap();
        let more = rows.len() as i64 > size;
        for d in rows.iter().take(size as usize) {
            out.push(d.serial.clone());
        }
        if !more {
            return out;
        }
        query.after = Some(query.cursor_after(&rows[size as usize - 1]));
    }
}

/// Paged, filtered, sorted and counted lists, as the database does them.
async fn paging(store: &dyn Store) {
    let p = store.create_product("paging", "paging-key").await.unwrap();
    let other = store.create_group(p.id, "other").await.unwrap();
    let mut ids = Vec::new();
    for i in 0..25 {
        let d = store
            .create_device(NewDevice {
                product_id: p.id,
                group_id: (i % 5 == 0).then_some(other.id),
                serial: format!("pg-{i:02}"),
                status: if i % 2 == 0 {
                    DeviceStatus::Verified
                } else {
                    DeviceStatus::New
                },
                password_hash: None,
            })
            .await
            .unwrap();
        ids.push(d.id);
    }
    // Ten devices seen, in pairs at the same moment (ties across page ends); the rest never.
    let batch: Vec<(Id, Telemetry)> = (0..10)
        .map(|i| {
            (
                ids[i],
                Telemetry {
                    last_seen: Some(1_000 + (i as i64 / 2) * 10),
                    version: Some(if i < 4 { "1.0" } else { "2.0" }.into()),
                    ..Telemetry::default()
                },
            )
        })
        .collect();
    store.record_telemetry(&batch).await.unwrap();
    let all: Vec<String> = (0..25).map(|i| format!("pg-{i:02}")).collect();
    let base = DeviceQuery::default();
    assert_eq!(all_pages(store, p.id, &base, 10).await, all);
    assert_eq!(all_pages(store, p.id, &base, 1).await, all);
    let desc = DeviceQuery {
        descending: true,
        ..base.clone()
    };
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(all_pages(store, p.id, &desc, 7).await, reversed);
    // By last check-in: never seen first, ties in id order, no row twice or lost.
    let seen = DeviceQuery {
        sort: DeviceSort::LastSeen,
        ..base.clone()
    };
    let by_seen = all_pages(store, p.id, &seen, 3).await;
    let mut expected: Vec<String> = all[10..].to_vec();
    expected.extend(all[..10].iter().cloned());
    assert_eq!(by_seen, expected);
    let seen_desc = DeviceQuery {
        descending: true,
        ..seen.clone()
    };
    let mut back = expected.clone();
    back.reverse();
    assert_eq!(all_pages(store, p.id, &seen_desc, 4).await, back);
    let created = DeviceQuery {
        sort: DeviceSort::Created,
        ..base.clone()
    };
    assert_eq!(all_pages(store, p.id, &created, 6).await, all);
    // Filters, and counts that agree with them.
    let cases: Vec<(DeviceQuery, Vec<String>)> = vec![
        (
            DeviceQuery {
                status: Some(DeviceStatus::New),
                ..base.clone()
            },
            all.iter().skip(1).step_by(2).cloned().collect(),
        ),
        (
            DeviceQuery {
                group_id: Some(other.id),
                ..base.clone()
            },
            all.iter().step_by(5).cloned().collect(),
        ),
        (
            DeviceQuery {
                version: Some("1.0".into()),
                ..base.clone()
            },
            all[..4].to_vec(),
        ),
        (
            DeviceQuery {
                serial_prefix: Some("pg-1".into()),
                ..base.clone()
            },
            all[10..20].to_vec(),
        ),
        (
            DeviceQuery {
                search: Some("G-2".into()),
                ..base.clone()
            },
            all[20..].to_vec(),
        ),
        (
            DeviceQuery {
                search: Some("%".into()),
                ..base.clone()
            },
            vec![],
        ),
        (
            DeviceQuery {
                seen_after: Some(1_020),
                ..base.clone()
            },
            all[4..10].to_vec(),
        ),
        (
            DeviceQuery {
                seen_before: Some(1_010),
                ..base.clone()
            },
            all[..2].iter().chain(&all[10..]).cloned().collect(),
        ),
    ];
    for (query, want) in cases {
        assert_eq!(all_pages(store, p.id, &query, 4).await, want, "{query:?}");
        assert_eq!(
            store.count_devices(p.id, &query).await.unwrap(),
            want.len() as i64,
            "{query:?}"
        );
    }
    let mixed = DeviceQuery {
        sort: DeviceSort::Created,
        after: Some(DeviceCursor::Serial("pg-03".into())),
        ..base.clone()
    };
    assert!(matches!(
        store.device_page(p.id, &mixed).await,
        Err(StoreError::Invalid(_))
    ));
    let tally = store.device_tally(p.id).await.unwrap();
    assert_eq!(tally.iter().map(|t| t.count).sum::<i64>(), 25);
    let on_two: i64 = tally
        .iter()
        .filter(|t| t.version.as_deref() == Some("2.0"))
        .map(|t| t.count)
        .sum();
    assert_eq!(on_two, 6);

    // Rollout members in pages, counted by the database.
    let fw = store
        .create_firmware(NewFirmware {
            product_id: p.id,
            version: "9.0".into(),
            size: 1,
            md5: "0".repeat(32),
            sha256: "9".repeat(64),
            format: "raw".into(),
            metadata: serde_json::json!({}),
        })
        .await
        .unwrap();
    let members: Vec<(Id, i64, Option<String>)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, (i % 2) as i64, None))
        .collect();
    let rollout = store
        .create_rollout(
            NewRollout {
                product_id: p.id,
                firmware_id: fw.id,
                other_firmware_ids: vec![],
                target: RolloutTarget::default(),
                stages: vec![],
                rate_per_minute: None,
                created_by: "ann".into(),
            },
            &members,
        )
        .await
        .unwrap();
    assert!(
        store
            .move_member(
                rollout.id,
                ids[3],
                &[MemberState::Pending],
                MemberState::Offered,
                ""
            )
            .await
            .unwrap()
    );
    let mut seen_members = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .rollout_members_page(rollout.id, after, 4)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|m| (m.stage, m.device_id));
        seen_members.extend(page.into_iter().map(|m| (m.stage, m.device_id)));
    }
    let mut want: Vec<(i64, Id)> = members.iter().map(|(d, s, _)| (*s, *d)).collect();
    want.sort();
    assert_eq!(seen_members, want);
    let mut counts = store.member_counts(rollout.id).await.unwrap();
    counts.sort_by_key(|(stage, state, _)| (*stage, state.as_str()));
    assert_eq!(
        counts,
        vec![
            (0, MemberState::Pending, 13),
            (1, MemberState::Offered, 1),
            (1, MemberState::Pending, 11),
        ]
    );

    // A rollout planned by the database picks exactly the devices the reference plan does.
    let specs: Vec<StageSpec> = [
        StageSize::Count(3),
        StageSize::Percent(40.0),
        StageSize::Rest,
    ]
    .into_iter()
    .map(|size| StageSpec {
        size,
        success_threshold: 1.0,
        failure_threshold: 0.5,
        window_secs: 0,
        auto_advance: true,
        auto_rollback: false,
    })
    .collect();
    let order = otaforge_domain::rollout_plan::FleetOrder::of_seed("seed-1");
    let verified = DeviceQuery {
        status: Some(DeviceStatus::Verified),
        ..DeviceQuery::default()
    };
    let taken = store.count_devices(p.id, &verified).await.unwrap();
    assert_eq!(taken, 13);
    let sizes = otaforge_domain::rollout_plan::stage_sizes(taken as u64, &specs);
    assert_eq!(sizes, [3, 6, 4]);
    let pairs: Vec<(Id, String)> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, id)| (*id, format!("pg-{i:02}")))
        .collect();
    let reference = otaforge_domain::rollout_plan::plan("seed-1", &pairs, &specs);
    let preview = store
        .preview_plan(p.id, &verified, order, &sizes, "1.0", 2)
        .await
        .unwrap();
    let serial_of = |id: &Id| pairs.iter().find(|(i, _)| i == id).unwrap().1.clone();
    for (stage, planned) in preview.iter().enumerate() {
        assert_eq!(planned.count as usize, reference[stage].len());
        let first: Vec<String> = reference[stage].iter().take(2).map(serial_of).collect();
        assert_eq!(planned.serials, first, "stage {stage}");
    }
    // Devices 0, 2 run 1.0: they need no bytes.
    let updating: i64 = preview.iter().map(|s| s.updating).sum();
    assert_eq!(updating, 11);
    store.delete_firmware(p.id, fw.id).await.ok();
    let planned = store
        .create_planned_rollout(
            NewRollout {
                product_id: p.id,
                firmware_id: fw.id,
                other_firmware_ids: vec![],
                target: RolloutTarget::default(),
                stages: specs.clone(),
                rate_per_minute: None,
                created_by: "ann".into(),
            },
            &verified,
            order,
            &sizes,
        )
        .await
        .unwrap();
    let members = store.rollout_members(planned.id).await.unwrap();
    for (stage, want) in reference.iter().enumerate() {
        let mut got: Vec<Id> = members
            .iter()
            .filter(|m| m.stage == stage as i64)
            .map(|m| m.device_id)
            .collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "stage {stage}");
    }
    let first = members.iter().find(|m| m.device_id == ids[0]).unwrap();
    assert_eq!(first.from_version.as_deref(), Some("1.0"));
    assert_eq!(first.state, MemberState::Pending);
    let (busy, one) = store
        .busy_devices(p.id, &DeviceQuery::default())
        .await
        .unwrap();
    assert_eq!(busy, 25, "in the first rollout or this one");
    assert!(one.is_some());

    // Events and the audit log, newest first, page by page.
    for i in 0..5 {
        store
            .add_device_event(ids[0], "note", &format!("e{i}"))
            .await
            .unwrap();
    }
    let first = store.device_events(ids[0], None, 2).await.unwrap();
    let second = store
        .device_events(ids[0], first.last().map(|e| e.id), 2)
        .await
        .unwrap();
    let details: Vec<&str> = first
        .iter()
        .chain(&second)
        .map(|e| e.detail.as_str())
        .collect();
    assert_eq!(details, ["e4", "e3", "e2", "e1"]);
    let newest = store.audit_log(None, 1).await.unwrap();
    if let Some(top) = newest.first() {
        let older = store.audit_log(Some(top.id), 3).await.unwrap();
        assert!(older.iter().all(|a| a.id < top.id));
    }
    // What keeps caches of several processes coherent.
    use otaforge_store::model::CacheScope;
    let g = store.cache_generation(CacheScope::Settings).await.unwrap();
    let d = store.cache_generation(CacheScope::Devices).await.unwrap();
    assert_eq!(
        store
            .bump_cache_generation(CacheScope::Settings)
            .await
            .unwrap(),
        g + 1
    );
    assert_eq!(
        store.cache_generation(CacheScope::Settings).await.unwrap(),
        g + 1
    );
    // The two scopes count apart.
    assert_eq!(
        store.cache_generation(CacheScope::Devices).await.unwrap(),
        d
    );
    assert_eq!(
        store
            .bump_cache_generation(CacheScope::Devices)
            .await
            .unwrap(),
        d + 1
    );
    assert_eq!(
        store.cache_generation(CacheScope::Settings).await.unwrap(),
        g + 1
    );
    let since = store.last_device_change().await.unwrap();
    store
        .add_device_changes(&[(p.id, "pg-01".into()), (p.id, "pg-02".into())])
        .await
        .unwrap();
    let changes = store.device_changes_since(since).await.unwrap();
    let serials: Vec<&str> = changes.iter().map(|(_, _, s)| s.as_str()).collect();
    assert_eq!(serials, ["pg-01", "pg-02"]);
    assert!(changes[0].0 > since && changes[1].0 > changes[0].0);
    assert_eq!(store.last_device_change().await.unwrap(), changes[1].0);
    assert!(
        store
            .device_changes_since(changes[1].0)
            .await
            .unwrap()
            .is_empty()
    );
    store.delete_product(p.id).await.unwrap();
}
