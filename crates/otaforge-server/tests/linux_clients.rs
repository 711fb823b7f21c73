//! Embedded Linux clients against a real server: Debian's SWUpdate (suricatta, hawkBit DDI)
//! installs a signed `.swu` made by Debian's swugenerator. The client runs as a child process
//! with its own TMPDIR, owned by the test, bounded in time and killed at the end.
//! Needs `swupdate`, `swugenerator`, `mender-artifact` and `openssl` (scripts/test.sh installs
//! them).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::{Backend, Server};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?} could not start ({e}): apt-get install swupdate swugenerator openssl")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A folder for one client, with a signing key and certificate.
fn workdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("otaforge-linux-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    run(Command::new("openssl")
        .current_dir(&dir)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "k.pem",
        ])
        .args(["-out", "c.pem", "-subj", "/CN=otaforge-ci", "-days", "30"]));
    dir
}

/// A signed `.swu` that writes `payload` to `target` (a `rawfile` image); `failing`: it also
/// carries a shell script that fails, so the install fails.
fn swu(dir: &Path, version: &str, payload: &[u8], target: &Path, failing: bool) -> Vec<u8> {
    std::fs::write(dir.join("app.bin"), payload).unwrap();
    std::fs::write(
        dir.join("fail.sh"),
        "#!/bin/sh\necho refusing >&2\nexit 3\n",
    )
    .unwrap();
    let scripts = if failing {
        "  scripts: (\n    {\n      filename = \"fail.sh\";\n      type = \"shellscript\";\n      sha256 = \"$swupdate_get_sha256(fail.sh)\";\n    }\n  );\n"
    } else {
        ""
    };
    std::fs::write(
        dir.join("sw-description.in"),
        format!(
            "software =\n{{\n  version = \"{version}\";\n  hardware-compatibility: [ \"1.0\" ];\n{scripts}  images: (\n    {{\n      filename = \"app.bin\";\n      type = \"rawfile\";\n      path = \"{}\";\n      sha256 = \"$swupdate_get_sha256(app.bin)\";\n      properties: {{ create-destination = \"true\"; }};\n    }}\n  );\n}}\n",
            target.display()
        ),
    )
    .unwrap();
    run(Command::new("swugenerator")
        .current_dir(dir)
        .args(["-s", "sw-description.in", "-a", ".", "-o", "a.swu"])
        .args(["-k", "CMS,k.pem,c.pem", "create"]));
    std::fs::read(dir.join("a.swu")).unwrap()
}

/// A client process started in a process group of its own, its output in `dir/{log}`.
struct Client {
    child: Child,
    log: PathBuf,
}

impl Client {
    fn spawn(mut cmd: Command, log: PathBuf, what: &str) -> Client {
        use std::os::unix::process::CommandExt;
        let file = std::fs::File::create(&log).unwrap();
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Client { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The client and everything it started.
        let _ = Command::new("pkill")
            .args(["-KILL", "-g", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SWUpdate in suricatta mode against the server, its output in `dir/swupdate.log`.
struct SwUpdate {
    client: Client,
    dir: PathBuf,
}

impl SwUpdate {
    fn start(dir: &Path, server: &Server, tenant: &str, id: &str, gateway_token: &str) -> SwUpdate {
        std::fs::write(
            dir.join("swupdate.cfg"),
            "globals:\n{\n  public-key-file = \"c.pem\";\n};\nidentify = (\n  { name = \"board\"; value = \"ci\"; }\n);\n",
        )
        .unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args(["--foreground", "120", "swupdate"])
            .current_dir(dir)
            .env("TMPDIR", dir.join("tmp"))
            .args([
                "-H",
                "board:1.0",
                "-f",
                "swupdate.cfg",
                "-k",
                "c.pem",
                "-v",
                "-u",
            ])
            .arg(format!(
                "-t {tenant} -u {} -i {id} -g {gateway_token}",
                server.base
            ));
        SwUpdate {
            client: Client::spawn(
                cmd,
                dir.join("swupdate.log"),
                "swupdate (apt-get install swupdate)",
            ),
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        self.client.log()
    }

    async fn wait_log(&self, text: &str, within: Duration) {
        let start = Instant::now();
        while !self.log().contains(text) {
            assert!(
                start.elapsed() < within,
                "swupdate did not print {text:?} within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The actions SWUpdate installed so far, in order (from its log).
    fn installed_actions(&self) -> Vec<i64> {
        let mut action = None;
        let mut out = Vec::new();
        for line in self.log().lines() {
            if let Some((_, id)) = line.split_once("Associated Action ID for Update Action is ") {
                action = id.trim().parse().ok();
            }
            if line.contains("Update successful, executing post-update actions")
                && let Some(id) = action
            {
                out.push(id);
            }
        }
        out
    }

    /// `swupdate-ipc sendtohawkbit`: what a device's boot script sends after a reboot.
    fn send_to_hawkbit(&self, action: i64, finished: &str, detail: &str) {
        run(Command::new("swupdate-ipc")
            .env("TMPDIR", self.dir.join("tmp"))
            .args([
                "sendtohawkbit",
                &action.to_string(),
                "2",
                finished,
                "closed",
                detail,
            ]));
    }
}

/// Uploads firmware and assigns it to the group: the uploaded firmware's body.
async fn upload_to_group(server: &Server, pid: i64, group: i64, bytes: Vec<u8>) -> Value {
    let (status, fw) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), bytes)
        .await;
    assert_eq!(status, 201, "{fw}");
    let (status, g) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;
    assert_eq!(status, 200, "{g}");
    fw
}

/// A server that tells DDI clients to poll every second.
async fn ddi_server() -> Server {
    Server::start_with(
        Backend::Sqlite,
        support::Options {
            ddi_poll: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
}

async fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<Value>,
) -> Value {
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SWUpdate registers itself by polling with the product's gateway token, is refused until
/// an operator verifies it, sends its attributes once, downloads and installs the group's
/// `.swu`, and reports the action closed; the server then counts it as running the new
/// version and offers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swupdate_installs_a_signed_swu_over_hawkbit_ddi() {
    let server = ddi_server().await;
    let (pid, key, group) = server.product("ci-fleet").await;
    let dir = workdir("swupdate");
    let target = dir.join("target/payload.bin");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let image = swu(&dir, "1.2.3", &payload, &target, false);

    let (status, fw) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), image.clone())
        .await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(
        (fw["format"].as_str(), fw["version"].as_str()),
        (Some("swu"), Some("1.2.3"))
    );
    assert_eq!(fw["metadata"]["chip"], "swupdate");
    assert_eq!(fw["metadata"]["signed"], true);
    assert_eq!(fw["metadata"]["hardware"], json!(["1.0"]));
    let action = fw["id"].as_i64().unwrap();
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": action})),
        )
        .await;
    assert_eq!(status, 200);

    // A broken .swu is refused with the fault named.
    let mut broken = image.clone();
    let at = broken
        .windows(8)
        .position(|w| w == &payload[5000..5008])
        .unwrap();
    broken[at] ^= 0x55;
    let (status, e) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), broken)
        .await;
    assert_eq!(status, 422, "{e}");
    assert!(e["error"].as_str().unwrap().contains("app.bin"), "{e}");

    let client = SwUpdate::start(&dir, &server, "ci-fleet", "dev01", &key);
    let device_path = format!("/api/v1/products/{pid}/devices/dev01");
    let device = wait_for(
        "the controller's registration",
        Duration::from_secs(30),
        async || {
            let (status, d) = server.call(Method::GET, &device_path, None).await;
            (status == 200).then_some(d)
        },
    )
    .await;
    assert_eq!(
        device["status"], "new",
        "unknown controllers are registered as New"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !target.exists(),
        "nothing is installed before the device is verified"
    );

    let (status, _) = server
        .call(
            Method::PATCH,
            &device_path,
            Some(json!({"status": "verified"})),
        )
        .await;
    assert_eq!(status, 200);
    client
        .wait_log(
            "Update successful, executing post-update actions",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        std::fs::read(&target).unwrap(),
        payload,
        "the bytes installed are the artifact's payload"
    );
    let device = wait_for("the attributes", Duration::from_secs(10), async || {
        let (_, d) = server.call(Method::GET, &device_path, None).await;
        (!d["attributes"].is_null()).then_some(d)
    })
    .await;
    assert_eq!(device["attributes"]["board"], "ci", "{device}");

    // After its reboot the device reports the action closed.
    client.send_to_hawkbit(action, "success", "Update Installed.");
    let device = wait_for(
        "the installed version",
        Duration::from_secs(10),
        async || {
            let (_, d) = server.call(Method::GET, &device_path, None).await;
            (d["version"] == "1.2.3").then_some(d)
        },
    )
    .await;
    assert_eq!(device["version"], "1.2.3");

    // The next poll offers nothing; the timeline shows the install's steps.
    let poll = server
        .raw(
            format!(
                "GET /ci-fleet/controller/v1/dev01 HTTP/1.1\r\nHost: x\r\nAuthorization: GatewayToken {key}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(poll.status, 200, "{}", poll.text());
    let body: Value = serde_json::from_slice(&poll.body).unwrap();
    assert_eq!(body["config"]["polling"]["sleep"], "00:00:01");
    assert!(body["_links"].get("deploymentBase").is_none(), "{body}");
    assert!(
        body["_links"].get("configData").is_none(),
        "the link is dropped once sent: {body}"
    );
    let installed = body["_links"]["installedBase"]["href"]
        .as_str()
        .unwrap_or_default();
    assert!(
        installed.ends_with(&format!("/installedBase/{action}")),
        "{body}"
    );
    let base = server
        .raw(
            format!(
                "GET /ci-fleet/controller/v1/dev01/installedBase/{action} HTTP/1.1\r\nHost: x\r\nAuthorization: GatewayToken {key}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(base.status, 200, "{}", base.text());
    let base: Value = serde_json::from_slice(&base.body).unwrap();
    assert_eq!(base["deployment"]["chunks"][0]["version"], "1.2.3");
    assert_eq!(base["actionHistory"]["status"], "finished");
    let (_, events) = server
        .call(Method::GET, &format!("{device_path}/events"), None)
        .await;
    let text = events.to_string();
    assert!(text.contains("All Chunks Installed"), "{text}");
    assert!(text.contains("installed 1.2.3"), "{text}");

    // A wrong gateway token is refused.
    let poll = server
        .raw(b"GET /ci-fleet/controller/v1/dev01 HTTP/1.1\r\nHost: x\r\nAuthorization: GatewayToken nope\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(poll.status, 401);
    // So is another product's key for this tenant.
    let (_, other_key, _) = server.product("ci-other").await;
    let poll = server
        .raw(
            format!(
                "GET /ci-fleet/controller/v1/dev01 HTTP/1.1\r\nHost: x\r\nAuthorization: GatewayToken {other_key}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(poll.status, 401, "{}", poll.text());
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An install that fails (a script of the image exits non-zero) is reported closed with
/// failure: the server shows it on the device's timeline and never offers that firmware to
/// the device again, so the client does not retry it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_swupdate_install_is_reported_and_not_offered_again() {
    let server = ddi_server().await;
    let (pid, key, group) = server.product("ci-fail").await;
    let dir = workdir("swupdate-fail");
    let target = dir.join("target/payload.bin");
    let image = swu(&dir, "2.0.0", b"never installed", &target, true);
    let fw = upload_to_group(&server, pid, group, image).await;
    // Registered ahead by the operator, verified.
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "dev02", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let device_path = format!("/api/v1/products/{pid}/devices/dev02");
    let client = SwUpdate::start(&dir, &server, "ci-fail", "dev02", &key);
    let events = wait_for("the failure report", Duration::from_secs(60), async || {
        let (_, e) = server
            .call(Method::GET, &format!("{device_path}/events"), None)
            .await;
        e.to_string().contains("failed 2.0.0 closed").then_some(e)
    })
    .await;
    let (_, device) = server.call(Method::GET, &device_path, None).await;
    assert_eq!(device["closed_firmware_id"], fw["id"], "{device}");
    assert!(
        device["version"].is_null(),
        "nothing was installed: {device}"
    );
    // Polls go on, with no deployment offered.
    let polls_before = client.log().matches("deploymentBase/").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        client.log().matches("deploymentBase/").count(),
        polls_before,
        "the closed action is not offered again"
    );
    assert!(
        client.log().matches("Suricatta awakened").count() >= 2,
        "{}",
        client.log()
    );
    assert!(events.to_string().contains("feedback"), "{events}");
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `.mender` made by Debian's mender-artifact is checked on upload: its version is the
/// artifact name, it is kept for the device types it declares; a damaged one is a 422
/// naming the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mender_artifacts_are_checked_on_upload() {
    let server = Server::start(Backend::Sqlite).await;
    let (pid, _, _) = server.product("ci-mender").await;
    let dir = workdir("mender-upload");
    std::fs::write(dir.join("app.bin"), vec![7u8; 20_000]).unwrap();
    std::fs::write(dir.join("dest_dir"), "/tmp/out").unwrap();
    std::fs::write(dir.join("filename"), "payload.bin").unwrap();
    run(Command::new("mender-artifact")
        .current_dir(&dir)
        .args([
            "write",
            "module-image",
            "-T",
            "single-file",
            "-t",
            "otaforge-ci",
        ])
        .args([
            "-n",
            "app-2.0.0",
            "-o",
            "a.mender",
            "-f",
            "dest_dir",
            "-f",
            "filename",
        ])
        .args(["-f", "app.bin"]));
    let artifact = std::fs::read(dir.join("a.mender")).unwrap();
    let (status, fw) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware"),
            artifact.clone(),
        )
        .await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(fw["format"], "mender");
    assert_eq!(fw["version"], "app-2.0.0");
    assert_eq!(fw["metadata"]["chip"], "mender");
    assert_eq!(fw["metadata"]["device_types"], json!(["otaforge-ci"]));
    assert_eq!(fw["metadata"]["signed"], false);

    let mut damaged = artifact;
    let at = damaged.windows(8).position(|w| w == b"  data/0").unwrap() - 1;
    damaged[at] = if damaged[at] == b'0' { b'1' } else { b'0' };
    let (status, e) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), damaged)
        .await;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("does not have the sha256"),
        "{e}"
    );
    artifact_keys_are_enforced(&server, pid, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With artifact keys, only artifacts whose manifest.sig verifies with one are taken.
async fn artifact_keys_are_enforced(server: &Server, pid: i64, dir: &Path) {
    let key = |name: &str| {
        run(Command::new("openssl")
            .current_dir(dir)
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .args(["-out", &format!("{name}.pem")]));
        // mender-artifact 3.9 reads only the traditional RSA key form.
        run(Command::new("openssl")
            .current_dir(dir)
            .args(["rsa", "-in", &format!("{name}.pem"), "-traditional"])
            .args(["-out", &format!("{name}.rsa")]));
        run(Command::new("openssl")
            .current_dir(dir)
            .args(["pkey", "-in", &format!("{name}.pem"), "-pubout"])
            .args(["-out", &format!("{name}.pub")]));
        std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap()
    };
    let ours = key("ours");
    key("theirs");
    let signed = |with: &str, name: &str| {
        run(Command::new("mender-artifact")
            .current_dir(dir)
            .args([
                "write",
                "module-image",
                "-T",
                "single-file",
                "-t",
                "otaforge-ci",
            ])
            .args([
                "-n",
                name,
                "-o",
                &format!("{name}.mender"),
                "-f",
                "dest_dir",
            ])
            .args([
                "-f",
                "filename",
                "-f",
                "app.bin",
                "-k",
                &format!("{with}.rsa"),
            ]));
        std::fs::read(dir.join(format!("{name}.mender"))).unwrap()
    };
    let keys_path = format!("/api/v1/products/{pid}/artifact-keys");
    let (status, e) = server
        .call(
            Method::PUT,
            &keys_path,
            Some(json!({"keys": ["not a key"]})),
        )
        .await;
    assert_eq!(status, 422, "{e}");
    let (status, p) = server
        .call(Method::PUT, &keys_path, Some(json!({"keys": [ours]})))
        .await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["artifact_keys"].as_array().unwrap().len(), 1);
    let upload = format!("/api/v1/products/{pid}/firmware");
    let (status, fw) = server.upload(&upload, signed("ours", "app-3.0.0")).await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(fw["metadata"]["signature"], "verified");
    let (status, e) = server.upload(&upload, signed("theirs", "app-3.0.1")).await;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("does not verify"),
        "{e}"
    );
    let unsigned = std::fs::read(dir.join("a.mender")).unwrap();
    let (status, e) = server.upload(&upload, unsigned).await;
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("no manifest.sig"),
        "{e}"
    );
}

/// mender-client as a daemon against the server, with its fixed paths (`/etc/mender`, the
/// identity folder) bound to the test's own folders in a private mount namespace (`unshare`,
/// root); its output in `dir/mender.log`.
struct MenderClient {
    client: Client,
}

impl MenderClient {
    fn start(dir: &Path, server: &Server, tenant_token: &str, running: &str) -> MenderClient {
        Self::start_as(
            dir,
            &server.base,
            tenant_token,
            running,
            "02:00:00:00:00:01",
        )
    }

    /// As `start`, for the device whose identity is `mac`.
    fn start_as(
        dir: &Path,
        server_url: &str,
        tenant_token: &str,
        running: &str,
        mac: &str,
    ) -> MenderClient {
        for sub in ["etc", "id", "data", "out"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("etc/artifact_info"),
            format!("artifact_name={running}\n"),
        )
        .unwrap();
        let identity = dir.join("id/mender-device-identity");
        std::fs::write(&identity, format!("#!/bin/sh\necho mac={mac}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("data/device_type"), "device_type=otaforge-ci\n").unwrap();
        std::fs::write(dir.join("fb.conf"), "{}").unwrap();
        std::fs::write(
            dir.join("m.conf"),
            json!({
                "ServerURL": server_url,
                "TenantToken": tenant_token,
                "UpdatePollIntervalSeconds": 1,
                "InventoryPollIntervalSeconds": 1,
                "RetryPollIntervalSeconds": 1,
                "RetryPollCount": 2,
            })
            .to_string(),
        )
        .unwrap();
        let d = dir.display();
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "sh", "-c"]).arg(format!(
            "mount --bind {d}/etc /etc/mender && mount --bind {d}/id /usr/share/mender/identity && \
             exec timeout --foreground 120 mender --no-syslog -c {d}/m.conf -b {d}/fb.conf -d {d}/data daemon"
        ));
        MenderClient {
            client: Client::spawn(
                cmd,
                dir.join("mender.log"),
                "mender (apt-get install mender-client; needs root for unshare)",
            ),
        }
    }

    fn log(&self) -> String {
        self.client.log()
    }
}

/// A single-file Mender artifact `name` (device type `otaforge-ci`) that installs `payload`
/// into `dir/out`, `filename` naming the file the module installs, made in `dir/art-{name}`.
fn mender_artifact(dir: &Path, name: &str, filename: &str, payload: &[u8]) -> Vec<u8> {
    let art = dir.join(format!("art-{name}"));
    std::fs::create_dir_all(&art).unwrap();
    std::fs::write(art.join("payload.bin"), payload).unwrap();
    std::fs::write(art.join("dest_dir"), dir.join("out").display().to_string()).unwrap();
    std::fs::write(art.join("filename"), filename).unwrap();
    std::fs::write(art.join("permissions"), "0644").unwrap();
    run(Command::new("mender-artifact")
        .current_dir(&art)
        .args([
            "write",
            "module-image",
            "-T",
            "single-file",
            "-t",
            "otaforge-ci",
        ])
        .args([
            "-n", name, "-o", "a.mender", "-f", "dest_dir", "-f", "filename",
        ])
        .args(["-f", "permissions", "-f", "payload.bin"]));
    std::fs::read(art.join("a.mender")).unwrap()
}

/// A server whose product's default group has a single-file artifact `app-1.0.1` that
/// installs `payload.bin` into `dir/out`, with `filename` naming the file the module installs.
async fn mender_setup(name: &str, filename: &str) -> (Server, i64, String, PathBuf, Vec<u8>) {
    let server = Server::start(Backend::Sqlite).await;
    let (pid, key, group) = server.product(&format!("ci-{name}")).await;
    let dir = workdir(name);
    let payload: Vec<u8> = (0..40_000u32).map(|i| (i * 17 % 251) as u8).collect();
    let artifact = mender_artifact(&dir, "app-1.0.1", filename, &payload);
    upload_to_group(&server, pid, group, artifact).await;
    (server, pid, key, dir, payload)
}

/// An install the update module fails is reported as failed: the deployment is closed and
/// not offered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_mender_install_is_reported_and_not_offered_again() {
    // The module installs the file `filename` names, which the artifact does not carry.
    let (server, pid, key, dir, _) = mender_setup("mender-fail", "missing.bin").await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "02:00:00:00:00:01", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let client = MenderClient::start(&dir, &server, &key, "app-1.0.0");
    let device_path = format!("/api/v1/products/{pid}/devices/02:00:00:00:00:01");
    let device = wait_for("the failure report", Duration::from_secs(60), async || {
        let (_, d) = server.call(Method::GET, &device_path, None).await;
        (!d["closed_firmware_id"].is_null()).then_some(d)
    })
    .await;
    assert_eq!(
        device["version"], "app-1.0.0",
        "still on its old artifact: {device}"
    );
    let (_, events) = server
        .call(Method::GET, &format!("{device_path}/events"), None)
        .await;
    let text = events.to_string();
    assert!(text.contains("failed app-1.0.1 failure"), "{text}");
    assert!(
        text.contains("\"log\""),
        "the deployment log is kept: {text}"
    );
    let fetches = client.log().matches("Validating the Update Info").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        client.log().matches("Validating the Update Info").count(),
        fetches,
        "the failed deployment is not offered again"
    );
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// mender-client authenticates with its own key and the product's tenant token, waits while
/// pending, is accepted by verifying it, downloads the artifact by its signed link, installs
/// it with the single-file update module, and reports success; the server then counts it as
/// running the artifact and offers nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mender_client_installs_an_artifact() {
    let (server, pid, key, dir, payload) = mender_setup("mender-client", "payload.bin").await;
    let client = MenderClient::start(&dir, &server, &key, "app-1.0.0");
    let device_path = format!("/api/v1/products/{pid}/devices/02:00:00:00:00:01");
    let device = wait_for(
        "the device's registration",
        Duration::from_secs(30),
        async || {
            let (status, d) = server.call(Method::GET, &device_path, None).await;
            (status == 200).then_some(d)
        },
    )
    .await;
    assert_eq!(device["status"], "new", "{device}");
    let (status, _) = server
        .call(
            Method::PATCH,
            &device_path,
            Some(json!({"status": "verified"})),
        )
        .await;
    assert_eq!(status, 200);
    let target = dir.join("out/payload.bin");
    let start = Instant::now();
    while std::fs::read(&target).ok().as_deref() != Some(&payload[..]) {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "mender did not install the payload:\n{}",
            client.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let device = wait_for("the success report", Duration::from_secs(30), async || {
        let (_, d) = server.call(Method::GET, &device_path, None).await;
        (d["version"] == "app-1.0.1").then_some(d)
    })
    .await;
    assert!(
        !device["attributes"].is_null(),
        "inventory was kept: {device}"
    );
    let (_, events) = server
        .call(Method::GET, &format!("{device_path}/events"), None)
        .await;
    let text = events.to_string();
    for step in [
        "app-1.0.1 downloading",
        "app-1.0.1 installing",
        "installed app-1.0.1",
    ] {
        assert!(text.contains(step), "{step} missing from {text}");
    }
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rollout of the product's artifact over these verified devices of its default group, in
/// stages of these sizes (a success threshold of 1, a failure threshold of 0.5, no soak, auto
/// advance and rollback); the group itself carries nothing, so only the rollout offers it.
async fn rollout_over(server: &Server, pid: i64, serials: &[&str], sizes: &[Value]) -> i64 {
    let (_, product) = server
        .call(Method::GET, &format!("/api/v1/products/{pid}"), None)
        .await;
    let group = product["default_group_id"].as_i64().unwrap();
    let (_, firmware) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/firmware"),
            None,
        )
        .await;
    let fw = firmware["items"][0]["id"].as_i64().unwrap();
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": null})),
        )
        .await;
    for serial in serials {
        let (status, d) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial, "status": "verified"})),
            )
            .await;
        assert_eq!(status, 201, "{d}");
    }
    let stages: Vec<Value> = sizes
        .iter()
        .map(|size| {
            json!({"size": size, "success_threshold": 1.0, "failure_threshold": 0.5,
                   "window_secs": 0, "auto_advance": true, "auto_rollback": true})
        })
        .collect();
    let (status, rollout) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({"firmware_id": fw, "target": {"group_id": group}, "stages": stages})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    rollout["id"].as_i64().unwrap()
}

/// One staged rollout (one device, then the rest) over two real mender-clients: each stage
/// advances on its devices' own success reports, and the rollout completes with both
/// installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_rollout_reaches_two_mender_clients() {
    let (server, pid, key, dir, payload) = mender_setup("mender-rollout", "payload.bin").await;
    let macs = ["02:00:00:00:00:11", "02:00:00:00:00:12"];
    let id = rollout_over(&server, pid, &macs, &[json!({"count": 1}), json!("rest")]).await;
    let clients: Vec<MenderClient> = macs
        .iter()
        .enumerate()
        .map(|(i, mac)| {
            let own = dir.join(format!("client{i}"));
            std::fs::create_dir_all(&own).unwrap();
            MenderClient::start_as(&own, &server.base, &key, "app-1.0.0", mac)
        })
        .collect();
    let done = wait_for(
        "the rollout's completion",
        Duration::from_secs(90),
        async || {
            let (_, r) = server
                .call(
                    Method::GET,
                    &format!("/api/v1/products/{pid}/rollouts/{id}"),
                    None,
                )
                .await;
            (r["state"] == "completed").then_some(r)
        },
    )
    .await;
    let succeeded: Vec<i64> = done["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["succeeded"].as_i64().unwrap())
        .collect();
    assert_eq!(succeeded, [1, 1], "{done}");
    for (i, client) in clients.iter().enumerate() {
        // Each client's artifact was built for `dir/out`; both install there in turn.
        assert!(
            client.log().contains("State transition: update-install"),
            "client {i} installed: {}",
            client.log()
        );
    }
    assert_eq!(std::fs::read(dir.join("out/payload.bin")).unwrap(), payload);
    drop(clients);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request to the DDI API with a target token, as SWUpdate sends it.
async fn ddi(
    server: &Server,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let r = server
        .raw(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: TargetToken {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

/// An action a rollout opened is cancelled when the rollout is: the poll links cancelAction
/// (which SWUpdate reads before deploymentBase), it names the action to stop, the client's
/// feedback closes it, and nothing is offered after. A device registered with a password
/// authenticates with it as its target token; a wrong one is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_rollout_cancels_the_open_hawkbit_action() {
    let server = ddi_server().await;
    let (pid, _, group) = server.product("ci-cancel").await;
    let dir = workdir("swupdate-cancel");
    let image = swu(&dir, "3.0.0", b"payload", &dir.join("target/p.bin"), false);
    let (status, fw) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), image)
        .await;
    assert_eq!(status, 201, "{fw}");
    let action = fw["id"].as_i64().unwrap();
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "dev03", "password": "tt-dev03", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let root = "/ci-cancel/controller/v1/dev03";
    let (status, _) = ddi(&server, "GET", root, "wrong", None).await;
    assert_eq!(status, 401);
    let (status, poll) = ddi(&server, "GET", root, "tt-dev03", None).await;
    assert_eq!(status, 200);
    assert!(
        poll["_links"].get("deploymentBase").is_none(),
        "nothing yet: {poll}"
    );

    let stage = json!({"size": "rest", "success_threshold": 1.0, "failure_threshold": 0.5,
                       "window_secs": 0, "auto_advance": true, "auto_rollback": true});
    let (status, rollout) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({"firmware_id": action, "target": {"group_id": group}, "stages": [stage]})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let (_, poll) = ddi(&server, "GET", root, "tt-dev03", None).await;
    let href = poll["_links"]["deploymentBase"]["href"]
        .as_str()
        .unwrap_or_default();
    assert!(
        href.ends_with(&format!("/deploymentBase/{action}")),
        "{poll}"
    );
    let (status, deployment) = ddi(
        &server,
        "GET",
        &format!("{root}/deploymentBase/{action}"),
        "tt-dev03",
        None,
    )
    .await;
    assert_eq!(status, 200, "{deployment}");
    assert_eq!(deployment["id"], action.to_string());
    let artifact = &deployment["deployment"]["chunks"][0]["artifacts"][0];
    assert!(
        artifact["filename"].as_str().unwrap().ends_with(".swu"),
        "{deployment}"
    );
    assert_eq!(artifact["hashes"]["sha1"].as_str().unwrap().len(), 40);

    // The operator cancels the rollout while the action is open.
    let id = rollout["id"].as_i64().unwrap();
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts/{id}/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let (_, poll) = ddi(&server, "GET", root, "tt-dev03", None).await;
    assert!(poll["_links"].get("deploymentBase").is_none(), "{poll}");
    let cancel = poll["_links"]["cancelAction"]["href"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cancel.ends_with(&format!("/cancelAction/{action}")),
        "{poll}"
    );
    let (status, stop) = ddi(
        &server,
        "GET",
        &format!("{root}/cancelAction/{action}"),
        "tt-dev03",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(stop["cancelAction"]["stopId"], action.to_string(), "{stop}");
    // SWUpdate's answer to a cancel (server_hawkbit.c): closed, success.
    let (status, _) = ddi(
        &server,
        "POST",
        &format!("{root}/cancelAction/{action}/feedback"),
        "tt-dev03",
        Some(json!({"id": action.to_string(), "time": "20261201T120000",
                    "status": {"result": {"finished": "success"}, "execution": "closed", "details": ["cancelled"]}})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, poll) = ddi(&server, "GET", root, "tt-dev03", None).await;
    assert!(
        poll["_links"].get("cancelAction").is_none(),
        "closed: {poll}"
    );
    assert!(poll["_links"].get("deploymentBase").is_none(), "{poll}");
    let (status, _) = ddi(
        &server,
        "GET",
        &format!("{root}/cancelAction/{action}"),
        "tt-dev03",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A staged rollout whose Linux stage fails halts: a real mender-client's failing update
/// module reports failure, the stage crosses its failure threshold, and the rollout stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_linux_stage_halts_its_rollout() {
    let (server, pid, key, dir, _) = mender_setup("mender-halt", "missing.bin").await;
    let id = rollout_over(&server, pid, &["02:00:00:00:00:21"], &[json!("rest")]).await;
    let client = MenderClient::start_as(&dir, &server.base, &key, "app-1.0.0", "02:00:00:00:00:21");
    let halted = wait_for("the rollout to halt", Duration::from_secs(60), async || {
        let (_, r) = server
            .call(
                Method::GET,
                &format!("/api/v1/products/{pid}/rollouts/{id}"),
                None,
            )
            .await;
        (r["state"] == "halted").then_some(r)
    })
    .await;
    assert_eq!(halted["stages"][0]["failed"], 1, "{halted}");
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The signed download link: the whole artifact with Content-Length, a range with 206 and
/// Content-Range (as the client asks when it resumes), and 403 for a link whose signature
/// or expiry was changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mender_download_links_are_signed_and_resume() {
    let (server, pid, _, dir, _) = mender_setup("mender-link", "payload.bin").await;
    let (_, firmware) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/firmware"),
            None,
        )
        .await;
    let fw = firmware["items"][0]["id"].as_i64().unwrap();
    let size = firmware["items"][0]["size"].as_i64().unwrap();
    let (status, device) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "02:00:00:00:00:31", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201, "{device}");
    let device_id = device["id"].as_i64().unwrap();
    let query = server.state.download_query(device_id, fw);
    let path = format!("/api/devices/v1/download/{device_id}/{fw}?{query}");
    let get = |path: String, range: &'static str| {
        let server = &server;
        async move {
            server
                .raw(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{range}Connection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
        }
    };
    let whole = get(path.clone(), "").await;
    assert_eq!(whole.status, 200);
    assert_eq!(
        whole.header("content-length"),
        Some(size.to_string().as_str())
    );
    let rest = get(path.clone(), "Range: bytes=4096-\r\n").await;
    assert_eq!(rest.status, 206);
    assert_eq!(
        rest.header("content-range"),
        Some(format!("bytes 4096-{}/{size}", size - 1).as_str())
    );
    assert_eq!(rest.body, whole.body[4096..]);
    let forged = path.replace("expires=", "expires=9");
    assert_eq!(get(forged, "").await.status, 403);
    let other = format!("/api/devices/v1/download/{}/{fw}?{query}", device_id + 1);
    assert_eq!(get(other, "").await.status, 403);
    // A device token the server did not sign is refused.
    let next = server
        .raw(b"GET /api/devices/v1/deployments/device/deployments/next?artifact_name=a&device_type=otaforge-ci HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.forged\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(next.status, 401, "{}", next.text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A board with a stock MCU client, emulated with the exact requests that client sends: it
/// installs whatever image it is sent and asks again running it (its version is the one
/// built into the image, as on a real board).
struct Board {
    serial: String,
    /// OTAdrive (`key`: the product key), or the ESP8266 core's client on the static link
    /// (`product`, `password`).
    dialect: BoardDialect,
    images: Vec<(Vec<u8>, String)>,
    running: Vec<u8>,
}

enum BoardDialect {
    OtaDrive { key: String },
    Esp8266StaticLink { product: i64, password: String },
}

impl Board {
    fn version(&self) -> &str {
        self.images
            .iter()
            .find(|(bytes, _)| *bytes == self.running)
            .map(|(_, v)| v.as_str())
            .expect("the board runs one of its known images")
    }

    /// One update check; true when it installed something.
    async fn check(&mut self, server: &Server) -> bool {
        let request = match &self.dialect {
            BoardDialect::OtaDrive { key } => support::otadrive_request(
                "GET",
                &format!(
                    "/deviceapi/update?k={key}&v={}&s={}",
                    self.version(),
                    self.serial
                ),
                "",
            ),
            BoardDialect::Esp8266StaticLink { product, password } => support::esp8266_request(
                &format!("/ota/{product}/{}", self.serial),
                "sketch",
                &support::md5_hex(&self.running),
                Some((&self.serial, password)),
            ),
        };
        let answer = server.raw(&request).await;
        match answer.status {
            200 if !answer.body.is_empty() => {
                assert!(
                    self.images.iter().any(|(bytes, _)| *bytes == answer.body),
                    "{} was sent an image it does not know",
                    self.serial
                );
                self.running = answer.body;
                true
            }
            304 | 204 | 404 => false,
            other => panic!("{}: unexpected {other}: {}", self.serial, answer.text()),
        }
    }
}

/// The four kinds of device of the mixed-fleet rollouts, their images (v1 in the group, v2
/// in the rollout) and the server.
struct MixedFleet {
    server: Server,
    /// The product's name: the hawkBit tenant.
    tenant: String,
    pid: i64,
    key: String,
    group: i64,
    dir: PathBuf,
    boards: Vec<Board>,
    /// v1, then v2, per family: esp32, esp8266, swupdate, mender.
    v1: Vec<i64>,
    v2: Vec<i64>,
    swu_target: PathBuf,
    swu_payloads: [Vec<u8>; 2],
}

const SWU_ID: &str = "sw-mixed";
const MENDER_MAC: &str = "02:00:00:00:00:51";

impl MixedFleet {
    /// `mender_fails`: the rollout's Mender artifact fails to install.
    async fn new(name: &str, mender_fails: bool) -> MixedFleet {
        let server = ddi_server().await;
        let (pid, key, group) = server.product(name).await;
        let dir = workdir(name);
        let swu_target = dir.join("target/payload.bin");
        let esp32 = [
            support::fixture("app-v1.bin"),
            support::fixture("app-v2.bin"),
        ];
        let esp8266 = [support::esp8266_bin(0x41), support::esp8266_bin(0x42)];
        let swu_payloads: [Vec<u8>; 2] = [
            vec![0x11; 30_000],
            (0..60_000u32).map(|i| i as u8).collect(),
        ];
        let mut v1 = Vec::new();
        let mut v2 = Vec::new();
        for (i, ids) in [&mut v1, &mut v2].into_iter().enumerate() {
            let version = format!("{}.0.0", i + 1);
            let upload = async |query: &str, bytes: Vec<u8>| {
                let (status, fw) = server
                    .upload(&format!("/api/v1/products/{pid}/firmware{query}"), bytes)
                    .await;
                assert_eq!(status, 201, "{fw}");
                fw["id"].as_i64().unwrap()
            };
            ids.push(upload("", esp32[i].clone()).await);
            // Versions are unique in a product, whatever the family.
            ids.push(upload(&format!("?version={version}-esp8266"), esp8266[i].clone()).await);
            let swu_dir = dir.join(format!("swu{i}"));
            std::fs::create_dir_all(&swu_dir).unwrap();
            for f in ["k.pem", "c.pem"] {
                std::fs::copy(dir.join(f), swu_dir.join(f)).unwrap();
            }
            ids.push(
                upload(
                    "",
                    swu(
                        &swu_dir,
                        &format!("{version}-swu"),
                        &swu_payloads[i],
                        &swu_target,
                        false,
                    ),
                )
                .await,
            );
            let fails = i == 1 && mender_fails;
            let artifact = mender_artifact(
                &dir,
                &format!("app-{version}"),
                if fails { "missing.bin" } else { "payload.bin" },
                &[i as u8 + 1; 20_000],
            );
            ids.push(upload("", artifact).await);
        }
        // The group runs release v1: one image per family.
        let (status, g) = server
            .call(
                Method::PATCH,
                &format!("/api/v1/products/{pid}/groups/{group}"),
                Some(json!({"firmware_id": v1[0], "other_firmware_ids": v1[1..]})),
            )
            .await;
        assert_eq!(status, 200, "{g}");
        let register = async |serial: &str, password: Option<&str>| {
            let (status, d) = server
                .call(
                    Method::POST,
                    &format!("/api/v1/products/{pid}/devices"),
                    Some(json!({"serial": serial, "password": password, "status": "verified"})),
                )
                .await;
            assert_eq!(status, 201, "{d}");
        };
        register("esp32-otadrive", None).await;
        register("10606726", Some("plug-pw")).await;
        register(SWU_ID, None).await;
        register(MENDER_MAC, None).await;
        let images = |pair: &[Vec<u8>; 2]| {
            vec![
                (pair[0].clone(), "1.0.0".to_string()),
                (pair[1].clone(), "2.0.0".to_string()),
            ]
        };
        let boards = vec![
            Board {
                serial: "esp32-otadrive".into(),
                dialect: BoardDialect::OtaDrive { key: key.clone() },
                images: images(&esp32),
                running: esp32[0].clone(),
            },
            Board {
                serial: "10606726".into(),
                dialect: BoardDialect::Esp8266StaticLink {
                    product: pid,
                    password: "plug-pw".into(),
                },
                images: images(&esp8266),
                running: esp8266[0].clone(),
            },
        ];
        MixedFleet {
            server,
            tenant: name.to_string(),
            pid,
            key,
            group,
            dir,
            boards,
            v1,
            v2,
            swu_target,
            swu_payloads,
        }
    }

    /// The rollout of release v2 over the group, in stages of these sizes.
    async fn roll_out(&self, sizes: &[Value], failure_threshold: f64) -> i64 {
        let stages: Vec<Value> = sizes
            .iter()
            .map(|size| {
                json!({"size": size, "success_threshold": 1.0, "failure_threshold": failure_threshold,
                       "window_secs": 0, "auto_advance": true, "auto_rollback": true})
            })
            .collect();
        let (status, rollout) = self
            .server
            .call(
                Method::POST,
                &format!("/api/v1/products/{}/rollouts", self.pid),
                Some(
                    json!({"firmware_id": self.v2[0], "other_firmware_ids": self.v2[1..],
                            "target": {"group_id": self.group}, "stages": stages}),
                ),
            )
            .await;
        assert_eq!(status, 201, "{rollout}");
        assert_eq!(rollout["other_firmware_ids"], json!(self.v2[1..]));
        rollout["id"].as_i64().unwrap()
    }

    async fn rollout(&self, id: i64) -> Value {
        self.server
            .call(
                Method::GET,
                &format!("/api/v1/products/{}/rollouts/{id}", self.pid),
                None,
            )
            .await
            .1
    }

    fn swupdate(&self) -> SwUpdate {
        SwUpdate::start(&self.dir, &self.server, &self.tenant, SWU_ID, &self.key)
    }

    fn mender(&self) -> MenderClient {
        let own = self.dir.join("mender");
        std::fs::create_dir_all(&own).unwrap();
        MenderClient::start_as(&own, &self.server.base, &self.key, "app-1.0.0", MENDER_MAC)
    }
}

/// One staged rollout across four devices of four dialects: an ESP32 on the OTAdrive API, an
/// ESP8266 on its static link, SWUpdate over hawkBit DDI and mender-client. Each device gets
/// its own family's image of the release; each stage advances on its devices' own success
/// signals (the boards' next check-in, SWUpdate's closed-success feedback, Mender's final
/// status); the finished rollout leaves the whole release with the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rollout_reaches_four_dialects() {
    let mut fleet = MixedFleet::new("ci-mixed", false).await;
    release_on_the_product_page(&fleet).await;
    let id = fleet
        .roll_out(&[json!({"count": 2}), json!("rest")], 0.5)
        .await;
    let swupdate = fleet.swupdate();
    let mender = fleet.mender();
    let start = Instant::now();
    let mut closed = 0;
    loop {
        let rollout = fleet.rollout(id).await;
        if rollout["state"] == "completed" {
            let succeeded: Vec<i64> = rollout["stages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["succeeded"].as_i64().unwrap())
                .collect();
            assert_eq!(succeeded, [2, 2], "{rollout}");
            break;
        }
        if rollout["state"] != "running" {
            let (_, members) = fleet
                .server
                .call(
                    Method::GET,
                    &format!("/api/v1/products/{}/rollouts/{id}/devices", fleet.pid),
                    None,
                )
                .await;
            panic!(
                "{rollout}\nmembers: {members}\nswupdate:\n{}",
                swupdate.log()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the rollout did not complete: {rollout}\nswupdate:\n{}\nmender:\n{}",
            swupdate.log(),
            mender.log()
        );
        for board in &mut fleet.boards {
            board.check(&fleet.server).await;
        }
        // What SWUpdate's boot script reports after each reboot into a new image.
        for action in swupdate.installed_actions().into_iter().skip(closed) {
            swupdate.send_to_hawkbit(action, "success", "Update Installed.");
            closed += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for board in &fleet.boards {
        assert_eq!(board.version(), "2.0.0", "{}", board.serial);
    }
    assert_eq!(
        std::fs::read(&fleet.swu_target).unwrap(),
        fleet.swu_payloads[1]
    );
    assert_eq!(
        std::fs::read(fleet.dir.join("out/payload.bin")).unwrap(),
        [2u8; 20_000],
        "mender installed release v2's artifact"
    );
    let (_, group) = fleet
        .server
        .call(
            Method::GET,
            &format!("/api/v1/products/{}/groups/{}", fleet.pid, fleet.group),
            None,
        )
        .await;
    assert_eq!(group["firmware_id"], fleet.v2[0], "{group}");
    assert_eq!(group["other_firmware_ids"], json!(fleet.v2[1..]), "{group}");
    // Nothing more is offered to anyone.
    for board in &mut fleet.boards {
        assert!(!board.check(&fleet.server).await, "{}", board.serial);
    }
    drop((swupdate, mender));
    let _ = std::fs::remove_dir_all(&fleet.dir);
}

/// The same mixed fleet in one stage, whose Mender artifact fails to install: the stage
/// crosses its failure threshold and halts with auto-rollback. The boards that had installed
/// the new images are sent release v1's again; SWUpdate's open action is cancelled and, once
/// it is back, it is offered release v1's `.swu`; mender-client is not offered the failed
/// deployment again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_stage_of_a_mixed_rollout_rolls_every_dialect_back() {
    let mut fleet = MixedFleet::new("ci-mixed-halt", true).await;
    let id = fleet.roll_out(&[json!("rest")], 0.2).await;
    for board in &mut fleet.boards {
        assert!(board.check(&fleet.server).await, "{} updated", board.serial);
        assert!(!board.check(&fleet.server).await);
        assert_eq!(board.version(), "2.0.0");
    }
    let swupdate = fleet.swupdate();
    let start = Instant::now();
    while swupdate.installed_actions().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            swupdate.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(swupdate.installed_actions(), [fleet.v2[2]]);
    let mender = fleet.mender();
    let halted = wait_for("the rollout to halt", Duration::from_secs(60), async || {
        let r = fleet.rollout(id).await;
        (r["state"] == "halted").then_some(r)
    })
    .await;
    assert_eq!(halted["stages"][0]["failed"], 1, "{halted}");
    assert_eq!(
        halted["stages"][0]["rolled_back_to_previous"], true,
        "{halted}"
    );
    for board in &mut fleet.boards {
        assert!(board.check(&fleet.server).await, "{} sent v1", board.serial);
        assert_eq!(board.version(), "1.0.0", "{}", board.serial);
    }
    // SWUpdate is told to cancel its open action, acknowledges it, and installs release v1's
    // image.
    let start = Instant::now();
    while swupdate.installed_actions().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            swupdate.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(swupdate.installed_actions(), [fleet.v2[2], fleet.v1[2]]);
    assert!(
        swupdate.log().contains(&format!(
            "Cancel action available at {}/{}/controller/v1/{SWU_ID}/cancelAction/{}",
            fleet.server.base, fleet.tenant, fleet.v2[2]
        )),
        "{}",
        swupdate.log()
    );
    assert_eq!(
        std::fs::read(&fleet.swu_target).unwrap(),
        fleet.swu_payloads[0]
    );
    let device = |serial: &'static str| {
        let fleet = &fleet;
        async move {
            let path = format!("/api/v1/products/{}/devices/{serial}", fleet.pid);
            let (_, d) = fleet.server.call(Method::GET, &path, None).await;
            let (_, e) = fleet
                .server
                .call(Method::GET, &format!("{path}/events"), None)
                .await;
            (d, e.to_string())
        }
    };
    let (sw, events) = device(SWU_ID).await;
    assert!(events.contains("2.0.0-swu cancelled"), "{events}");
    // A cancel is no failure: the image is not closed to the device, and its rollout
    // membership does not count it failed.
    assert!(sw["closed_firmware_id"].is_null(), "{sw}");
    assert_eq!(sw["open_firmware_id"], fleet.v1[2], "{sw}");
    let (_, members) = fleet
        .server
        .call(
            Method::GET,
            &format!("/api/v1/products/{}/rollouts/{id}/devices", fleet.pid),
            None,
        )
        .await;
    let state_of = |serial: &str| {
        members
            .get("items")
            .and_then(|i| i.as_array())
            .unwrap()
            .iter()
            .find(|m| m["serial"] == serial)
            .map(|m| m["state"].clone())
    };
    assert_eq!(state_of(SWU_ID), Some(json!("downloaded")), "{members}");
    assert_eq!(state_of(MENDER_MAC), Some(json!("failed")), "{members}");
    // mender-client reported its failure and is offered nothing more: it runs release v1's
    // artifact.
    let (m, events) = device(MENDER_MAC).await;
    assert_eq!(m["closed_firmware_id"], fleet.v2[3], "{m}");
    assert!(events.contains("failed app-2.0.0"), "{events}");
    let fetches = mender.log().matches("Validating the Update Info").count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        mender.log().matches("Validating the Update Info").count(),
        fetches,
        "the failed deployment is not offered again"
    );
    drop((swupdate, mender));
    let _ = std::fs::remove_dir_all(&fleet.dir);
}

/// The network between devices and the server, which breaks the first artifact download:
/// it forwards every connection, and cuts the one that carries `GET /api/devices/v1/download/`
/// once `cut_after` bytes of its answer have passed. It remembers the `Range` of every
/// download request.
struct DroppingLink {
    cuts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl DroppingLink {
    async fn start(
        listener: tokio::net::TcpListener,
        upstream: std::net::SocketAddr,
        cut_after: usize,
    ) -> DroppingLink {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cuts = Arc::new(AtomicUsize::new(0));
        let ranges = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, r) = (cuts.clone(), ranges.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let (cuts, ranges) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = client.into_split();
                    let (mut from_server, mut to_server) = server.into_split();
                    let download = Arc::new(AtomicBool::new(false));
                    let seen = download.clone();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = from_client.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            let text = String::from_utf8_lossy(&buf[..n]);
                            if text.starts_with("GET /api/devices/v1/download/") {
                                let range = text
                                    .lines()
                                    .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                                    .map(|l| l[6..].trim().to_string());
                                ranges.lock().unwrap().push(range);
                                seen.store(true, Ordering::SeqCst);
                            }
                            if to_server.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut buf = vec![0u8; 4096];
                    let mut passed = 0usize;
                    while let Ok(n) = from_server.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if download.load(Ordering::SeqCst) && cuts.load(Ordering::SeqCst) == 0 {
                            let room = cut_after.saturating_sub(passed).min(n);
                            let _ = to_client.write_all(&buf[..room]).await;
                            passed += room;
                            if passed >= cut_after {
                                cuts.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            continue;
                        }
                        if to_client.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Dropping both halves closes the connection, as a lost link does.
                    up.abort();
                });
            }
        });
        DroppingLink { cuts, ranges }
    }
}

/// mender-client's download breaks part-way (the connection is cut); the client resumes it
/// after its fixed 60 s wait with `Range: bytes=N-`, the server answers 206 with
/// `Content-Range`, and the artifact installs whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mender_client_resumes_a_dropped_download() {
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_url = format!("http://{}", front.local_addr().unwrap());
    let server = Server::start_with(
        Backend::Sqlite,
        support::Options {
            public_url: Some(front_url.clone()),
            ..Default::default()
        },
    )
    .await;
    let link = DroppingLink::start(front, server.addr, 64 * 1024).await;
    let (pid, key, group) = server.product("ci-mender-resume").await;
    let dir = workdir("mender-resume");
    // Bytes that do not compress, so the artifact is larger than the cut.
    let mut x = 0x1234_5678u32;
    let payload: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let artifact = mender_artifact(&dir, "app-1.0.1", "payload.bin", &payload);
    assert!(artifact.len() > 200 * 1024);
    upload_to_group(&server, pid, group, artifact).await;
    let mac = "02:00:00:00:00:61";
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": mac, "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let client = MenderClient::start_as(&dir, &front_url, &key, "app-1.0.0", mac);
    let device_path = format!("/api/v1/products/{pid}/devices/{mac}");
    let device = wait_for(
        "the resumed install",
        Duration::from_secs(150),
        async || {
            let (_, d) = server.call(Method::GET, &device_path, None).await;
            (d["version"] == "app-1.0.1").then_some(d)
        },
    )
    .await;
    assert_eq!(device["version"], "app-1.0.1");
    assert_eq!(
        link.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the first download was cut"
    );
    let ranges = link.ranges.lock().unwrap().clone();
    assert_eq!(
        ranges.first(),
        Some(&None),
        "the first download asks for the whole file"
    );
    let resumed = ranges.iter().flatten().next().unwrap_or_else(|| {
        panic!(
            "no download resumed with a range: {ranges:?}\n{}",
            client.log()
        )
    });
    let from: usize = resumed
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{resumed}"));
    assert!(from > 0 && from <= 64 * 1024, "{resumed}");
    assert_eq!(std::fs::read(dir.join("out/payload.bin")).unwrap(), payload);
    drop(client);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `.swu` names the hardware revisions it installs on: a controller whose configData says
/// it is another revision is not offered it (and the refusal is on its timeline, once); one
/// that says it is a named revision is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swu_goes_only_to_the_hardware_it_names() {
    let server = ddi_server().await;
    let (pid, _, group) = server.product("ci-hw").await;
    let dir = workdir("swupdate-hw");
    let image = swu(&dir, "4.0.0", b"payload", &dir.join("target/p.bin"), false);
    let fw = upload_to_group(&server, pid, group, image).await;
    assert_eq!(fw["metadata"]["hardware"], json!(["1.0"]));
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "dev-hw", "password": "tt-hw", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let root = "/ci-hw/controller/v1/dev-hw";
    let says = async |revision: &str| {
        let (status, _) = ddi(
            &server,
            "PUT",
            &format!("{root}/configData"),
            "tt-hw",
            Some(json!({"mode": "merge", "data": {"board": "ci", "hw_revision": revision}})),
        )
        .await;
        assert_eq!(status, 200);
        let (status, poll) = ddi(&server, "GET", root, "tt-hw", None).await;
        assert_eq!(status, 200);
        poll["_links"].get("deploymentBase").is_some()
    };
    assert!(!says("2.0").await, "not for revision 2.0");
    assert!(!says("2.0").await);
    let (_, events) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/dev-hw/events"),
            None,
        )
        .await;
    let text = events.to_string();
    assert_eq!(
        text.matches("is for hardware revisions 1.0; the device is 2.0")
            .count(),
        1,
        "{text}"
    );
    assert!(says("1.0").await, "offered to revision 1.0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The product page shows a group's release and assigns one through the same fleet operation
/// as the API: two images of one family are refused with the reason, a valid release is set.
async fn release_on_the_product_page(fleet: &MixedFleet) {
    let server = &fleet.server;
    let cookie = server.operator_session("rel-op").await;
    let page = server
        .get_with_cookie(&format!("/products/{}", fleet.pid), &cookie)
        .await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("1.0.0 + 1.0.0-esp8266 + 1.0.0-swu + app-1.0.0"),
        "{html}"
    );
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_string();
    let post = async |others: &[i64]| {
        let mut body = format!("csrf={csrf}&firmware_id={}", fleet.v1[0]);
        for id in others {
            body.push_str(&format!("&other_firmware_id={id}"));
        }
        server
            .raw(
                format!(
                    "POST /products/{}/groups/{}/assign HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    fleet.pid,
                    fleet.group,
                    body.len()
                )
                .as_bytes(),
            )
            .await
    };
    let refused = post(&[fleet.v2[0], fleet.v1[1]]).await;
    assert_eq!(refused.status, 422, "{}", refused.text());
    assert!(
        refused.text().contains("are both for esp32"),
        "{}",
        refused.text()
    );
    let set = post(&fleet.v1[1..]).await;
    assert_eq!(set.status, 303, "{}", set.text());
    let (_, group) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{}/groups/{}", fleet.pid, fleet.group),
            None,
        )
        .await;
    assert_eq!(group["other_firmware_ids"], json!(fleet.v1[1..]), "{group}");
}
