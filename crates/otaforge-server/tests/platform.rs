//! The seed 000 platform end to end: the build queue over the REST API (a real compile of an
//! Arduino Uno sketch inside the sandbox, on SQLite and PostgreSQL), and the pages in a real
//! headless Chromium driven over WebDriver: operator sign-in, bot login, edit, compile, the
//! live log and diagnostics, the firmware behind the static link, and refusals.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use support::{Backend, Server, fixture, http_update_request, md5_hex, otadrive_request};

const BLINK: &str = "void setup() {\n  pinMode(13, OUTPUT);\n}\n\nvoid loop() {\n  digitalWrite(13, HIGH);\n  delay(200);\n  digitalWrite(13, LOW);\n  delay(200);\n}\n";

async fn wait_build(server: &Server, id: i64) -> Value {
    let start = Instant::now();
    loop {
        let (status, b) = server
            .call(Method::GET, &format!("/api/v1/builds/{id}"), None)
            .await;
        assert_eq!(status, 200, "{b}");
        if b["status"] == "succeeded" || b["status"] == "failed" {
            return b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "build {id} did not finish: {b}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

async fn build_queue_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, _) = server.product("robots").await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "bot_001", "password": "12345"})),
        )
        .await;
    assert_eq!(status, 201);

    // A real compile for arduino:avr:uno, assigned to the device.
    let (status, queued) = server
        .call(
            Method::POST,
            "/api/v1/builds",
            Some(json!({"fqbn": "arduino:avr:uno", "files": {"blink.ino": BLINK}, "product_id": pid, "device": "bot_001"})),
        )
        .await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["status"], "queued");
    let done = wait_build(&server, queued["id"].as_i64().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{}", done["log"]);
    assert!(
        done["log"].as_str().unwrap().contains("Sketch uses"),
        "{}",
        done["log"]
    );
    let firmware_id = done["firmware_id"].as_i64().unwrap();
    let (_, fw) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/firmware/{firmware_id}"),
            None,
        )
        .await;

    // The device's unchanged static link now serves that binary.
    let r = server
        .raw(
            format!(
                "GET /ota/{pid}/bot_001 HTTP/1.0\r\nHost: x\r\nUser-Agent: ESP32-http-Update\r\nAuthorization: Basic {}\r\nConnection: close\r\n\r\n",
                basic("bot_001", "12345")
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len() as i64, fw["size"].as_i64().unwrap());
    assert_eq!(r.header("x-md5").unwrap(), fw["md5"].as_str().unwrap());

    // Errors come back at their lines, in the user's file names.
    let (_, queued) = server
        .call(
            Method::POST,
            "/api/v1/builds",
            Some(json!({"fqbn": "arduino:avr:uno", "files": {"main.ino": "void setup() {\n}\n\nvoid loop() {\n  foo();\n}\n", "util.h": "int x;\n"}})),
        )
        .await;
    let failed = wait_build(&server, queued["id"].as_i64().unwrap()).await;
    assert_eq!(failed["status"], "failed");
    let d = &failed["diagnostics"][0];
    assert_eq!(
        (
            d["file"].as_str(),
            d["line"].as_i64(),
            d["severity"].as_str()
        ),
        (Some("main.ino"), Some(5), Some("error")),
        "{failed}"
    );

    // Reading the host's files is refused with a clear message.
    let (_, queued) = server
        .call(
            Method::POST,
            "/api/v1/builds",
            Some(json!({"fqbn": "arduino:avr:uno", "files": {"x.ino": "#include \"/etc/passwd\"\nvoid setup() {}\nvoid loop() {}\n"}})),
        )
        .await;
    let refused = wait_build(&server, queued["id"].as_i64().unwrap()).await;
    assert_eq!(refused["status"], "failed");
    assert!(
        refused["log"]
            .as_str()
            .unwrap()
            .contains("may include only its own files"),
        "{}",
        refused["log"]
    );

    // Bad requests: 4xx naming the problem.
    for (body, expect) in [
        (json!({"fqbn": "uno", "files": {"a.ino": ""}}), 422),
        (
            json!({"fqbn": "arduino:avr:uno", "files": {"../a.ino": ""}}),
            422,
        ),
        (
            json!({"fqbn": "arduino:avr:uno", "files": {"a.h": ""}}),
            422,
        ),
        (json!({"fqbn": "arduino:avr:uno", "files": {}}), 422),
        (
            json!({"fqbn": "arduino:avr:uno", "files": {"a.ino": ""}, "device": "nobody", "product_id": pid}),
            404,
        ),
    ] {
        let (status, answer) = server
            .call(Method::POST, "/api/v1/builds", Some(body))
            .await;
        assert_eq!(status, expect, "{answer}");
        assert!(answer["error"].as_str().is_some_and(|m| !m.is_empty()));
    }
    server.finish().await;
}
on_both_backends!(build_queue, build_queue_story);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_compiler_the_platform_still_works_and_says_how_to_install_one() {
    let server = Server::start_with(
        Backend::Sqlite,
        support::Options {
            compile: Some(otaforge_server::compile::CompileConfig {
                arduino_cli: None,
                arduino_builder: None,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let (status, queued) = server
        .call(
            Method::POST,
            "/api/v1/builds",
            Some(json!({"fqbn": "esp32:esp32:esp32", "files": {"a.ino": BLINK}})),
        )
        .await;
    assert_eq!(status, 202);
    let b = wait_build(&server, queued["id"].as_i64().unwrap()).await;
    assert_eq!(b["status"], "failed");
    assert!(
        b["log"]
            .as_str()
            .unwrap()
            .contains("arduino-cli core install esp32:esp32"),
        "{}",
        b["log"]
    );
    server.finish().await;
}

// ---- the browser ----

/// A minimal WebDriver client for chromedriver.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: std::process::Child,
    shots: std::path::PathBuf,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let driver = otaforge_server::compile::find_on_path("chromedriver")
            .expect("chromedriver is needed for the browser tests (apt-get install chromium chromium-driver)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let start = Instant::now();
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = support::temp_dir("chrome");
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
        }}}});
        let answer: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_string();
        let shots =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            http,
            base,
            session,
            _driver: child,
            shots,
        }
    }

    async fn cmd(&self, method: Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = self.http.request(method.clone(), url);
        let req = if method == Method::GET {
            req
        } else {
            req.json(&body)
        };
        let answer: Value = req.send().await.unwrap().json().await.unwrap();
        if answer["value"]["error"].is_string() {
            panic!("webdriver {path}: {}", answer["value"]);
        }
        answer["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.cmd(Method::POST, "/url", json!({"url": url})).await;
    }

    async fn find(&self, css: &str) -> String {
        let start = Instant::now();
        loop {
            let url = format!("{}/session/{}/element", self.base, self.session);
            let answer: Value = self
                .http
                .post(url)
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(id) = answer["value"][ELEMENT].as_str() {
                return id.to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no element {css}: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn exists(&self, css: &str) -> bool {
        let url = format!("{}/session/{}/elements", self.base, self.session);
        let answer: Value = self
            .http
            .post(url)
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].as_array().is_some_and(|a| !a.is_empty())
    }

    /// The element's text ("" when there is none), read again if the page changed under it.
    async fn text(&self, css: &str) -> String {
        for _ in 0..50 {
            let url = format!("{}/session/{}/element", self.base, self.session);
            let answer: Value = self
                .http
                .post(url)
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let Some(id) = answer["value"][ELEMENT].as_str() else {
                return String::new();
            };
            let url = format!("{}/session/{}/element/{id}/text", self.base, self.session);
            let answer: Value = self
                .http
                .get(url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if let Some(text) = answer["value"].as_str() {
                return text.to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} kept changing under the reader")
    }

    /// Waits until the element's text contains `expected`; returns the text.
    async fn wait_text(&self, css: &str, expected: &str) -> String {
        let start = Instant::now();
        loop {
            let text = self.text(css).await;
            if text.contains(expected) {
                return text;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{css} never said {expected:?}; it says {text:?}; the page: {}",
                self.text("body").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.cmd(Method::POST, &format!("/element/{id}/clear"), json!({}))
            .await;
        self.cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": text}),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.cmd(Method::POST, &format!("/element/{id}/click"), json!({}))
            .await;
    }

    async fn script(&self, script: &str) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    async fn url(&self) -> String {
        self.cmd(Method::GET, "/url", Value::Null)
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    async fn shot(&self, name: &str) {
        use base64::Engine;
        let png = self.cmd(Method::GET, "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), bytes).unwrap();
    }

    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.script(script).await;
            if !v.is_null() && v != Value::Bool(false) {
                return v;
            }
            if start.elapsed() >= Duration::from_secs(90) {
                let main = self
                    .script("return document.querySelector('main')?.innerText")
                    .await;
                panic!("timed out waiting for {what}; the page shows: {main}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The window's width, 900 px high.
    async fn resize(&self, width: i64) {
        self.cmd(
            Method::POST,
            "/window/rect",
            json!({"width": width, "height": 900}),
        )
        .await;
    }

    /// axe-core's serious and critical findings on the page shown (`axe` is its source).
    async fn axe(&self, axe: &str) -> Vec<String> {
        self.cmd(
            Method::POST,
            "/execute/sync",
            json!({"script": axe, "args": []}),
        )
        .await;
        let found = self
            .cmd(
                Method::POST,
                "/execute/async",
                json!({"script": "const done = arguments[arguments.length - 1]; \
                    axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations \
                    .filter(v => v.impact === 'serious' || v.impact === 'critical') \
                    .map(v => v.impact + ' ' + v.id + ': ' + v.help + ' (' + v.nodes.map(n => \
                    n.target.join(' ')).join(', ') + ')')), e => done(['axe failed: ' + e]));",
                    "args": []}),
            )
            .await;
        found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn quit(self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let mut driver = self._driver;
        let _ = driver.kill();
        let _ = driver.wait();
    }
}

async fn sign_in(browser: &Browser, server: &Server, kind: &str, user: &str, password: &str) {
    browser.go(&server.url("/login")).await;
    browser
        .click(&format!("input[name=kind][value={kind}]"))
        .await;
    browser.type_into("#username", user).await;
    browser.type_into("#password", password).await;
    browser.click("#signin").await;
}

/// A new admin account, and a browser signed in with it on the dashboard.
async fn admin_in_a_browser(server: &Server, name: &str) -> Browser {
    let password = format!("{name}-browser-pw");
    let hash = otaforge_server::auth::hash_password(&password).unwrap();
    server
        .state
        .store()
        .create_user(name, &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let browser = Browser::start().await;
    sign_in(&browser, server, "operator", name, &password).await;
    browser.wait_text("main h1", "Products").await;
    browser
}

/// Replaces the editor's text by typing, as a person does.
async fn type_sketch(browser: &Browser, code: &str) {
    browser.click(".cm-content").await;
    let id = browser.find(".cm-content").await;
    // Ctrl+A, Delete, then the code line by line (Enter keeps the editor's indentation).
    browser
        .cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": "\u{E009}a\u{E009}\u{E017}"}),
        )
        .await;
    for line in code.lines() {
        let text = format!("{}\u{E007}", line.trim_start());
        browser
            .cmd(
                Method::POST,
                &format!("/element/{id}/value"),
                json!({"text": text}),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_000_workflow_in_a_real_browser() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let hash = otaforge_server::auth::hash_password("operator-pw").unwrap();
    store
        .create_user("alice", &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let (pid, _, _) = server.product("robots").await;
    for (serial, pw) in [("bot_001", "12345"), ("bot_002", "67890")] {
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial, "password": pw})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let browser = Browser::start().await;

    // Operator sign-in: a wrong password is refused, the right one opens the dashboard.
    sign_in(&browser, &server, "operator", "alice", "nope").await;
    browser
        .wait_text("#login-error", "wrong name or password")
        .await;
    sign_in(&browser, &server, "operator", "alice", "operator-pw").await;
    browser.wait_text("main h1", "Products").await;
    assert!(browser.text("main").await.contains("robots"));
    browser.shot("dashboard").await;
    browser.go(&server.url(&format!("/products/{pid}"))).await;
    browser.wait_text("#devices", "bot_002").await;
    browser.shot("product").await;
    browser.click("nav button").await; // sign out
    browser.wait_text("main h1", "Sign in").await;

    // Bot login: the wrong password is refused; the right one opens that device's workspace.
    sign_in(&browser, &server, "bot", "bot_001", "99999").await;
    browser
        .wait_text("#login-error", "wrong name or password")
        .await;
    browser.shot("login-refused").await;
    sign_in(&browser, &server, "bot", "bot_001", "12345").await;
    browser.wait_text("#device-id", "bot_001").await;
    assert!(
        browser
            .url()
            .await
            .ends_with(&format!("/workspace/{pid}/bot_001")),
        "{}",
        browser.url().await
    );
    let link = browser.text("#firmware-url").await;
    assert_eq!(link, format!("{}/ota/{pid}/bot_001", server.base));

    // Another device's workspace, and the operator pages, are refused to this bot.
    browser
        .go(&server.url(&format!("/workspace/{pid}/bot_002")))
        .await;
    browser.wait_text("main", "Not your device").await;
    browser.go(&server.url(&format!("/products/{pid}"))).await;
    browser.wait_text("main", "Not allowed").await;

    // Wi-Fi: saved encrypted, never shown back in full.
    browser
        .go(&server.url(&format!("/workspace/{pid}/bot_001")))
        .await;
    browser.type_into("#wifi-ssid", "HomeNet").await;
    browser
        .type_into("input[name=wifi_password]", "wifi-secret-pw")
        .await;
    browser
        .type_into("input[name=device_password]", "12345")
        .await;
    browser.click("#wifi-save").await;
    let saved = browser.wait_text("#wifi-saved", "Saved").await;
    assert!(
        saved.contains("H*****t")
            && !saved.contains("HomeNet")
            && !browser.text("main").await.contains("wifi-secret-pw"),
        "{saved}"
    );
    let device = store.get_device(pid, "bot_001").await.unwrap();
    let sealed = device.secrets.unwrap();
    assert!(
        !sealed.contains("HomeNet") && !sealed.contains("wifi-secret"),
        "sealed at rest"
    );

    // Edit with an error, pick the Uno, compile: the log streams and the error shows at its line.
    browser.click("#fqbn option[value='arduino:avr:uno']").await;
    type_sketch(&browser, "void setup() {\n}\nvoid loop() {\nfoo();\n}\n").await;
    browser.click("#compile").await;
    browser
        .wait_for(
            "the failed build",
            "return document.querySelector('#build-log')?.dataset.status === 'failed'",
        )
        .await;
    assert!(
        browser
            .text("#build-log")
            .await
            .contains("'foo' was not declared")
    );
    browser
        .wait_for("the lint marker", "return document.querySelectorAll('.cm-lintRange-error, .cm-lint-marker-error').length > 0")
        .await;
    browser.shot("workspace-error").await;

    // Fix it and compile again: the firmware lands behind the unchanged static link.
    type_sketch(&browser, BLINK).await;
    browser.click("#compile").await;
    browser
        .wait_for(
            "the good build",
            "return document.querySelector('#build-log')?.dataset.status === 'succeeded'",
        )
        .await;
    let log = browser.text("#build-log").await;
    assert!(log.contains("assigned to bot_001"), "{log}");
    browser
        .go(&server.url(&format!("/workspace/{pid}/bot_001")))
        .await;
    browser.wait_text("#assigned", "build-").await;
    assert!(browser.exists(".history li").await);
    browser.shot("workspace-built").await;
    let path = link.strip_prefix(&server.base).unwrap();
    let r = server
        .raw(format!("GET {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Basic {}\r\nConnection: close\r\n\r\n", basic("bot_001", "12345")).as_bytes())
        .await;
    assert_eq!(r.status, 200);
    assert!(!r.body.is_empty());
    browser.quit().await;
    server.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_rate_limited_and_pages_need_a_session() {
    let server = Server::start(Backend::Sqlite).await;
    let hash = otaforge_server::auth::hash_password("right").unwrap();
    server
        .state
        .store()
        .create_user("bob", &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let (login_cookie, token) = server.login_token().await;
    let attempt = |username: &str, password: &str, kind: &str, csrf: &str| {
        let body = format!("csrf={csrf}&kind={kind}&username={username}&password={password}");
        format!(
            "POST /login HTTP/1.1\r\nHost: x\r\nCookie: {login_cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    // A sign-in form that did not come from the sign-in page: refused before any check.
    let r = server
        .raw(attempt("bob", "right", "operator", "forged").as_bytes())
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // Failures count per normalised name and address, whatever the kind or spacing says.
    for (name, kind) in [
        ("bob", "operator"),
        ("Bob", "bot"),
        ("+bob+", "operator"),
        ("BOB", "whatever"),
        ("b+o+b", "operator"),
    ] {
        let r = server
            .raw(attempt(name, "wrong", kind, &token).as_bytes())
            .await;
        assert_eq!(r.status, 401, "{name} {kind}: {}", r.text());
    }
    // Five failures: even the right password waits now, on the form and on the REST login.
    let r = server
        .raw(attempt("bob", "right", "operator", &token).as_bytes())
        .await;
    assert_eq!(r.status, 429);
    assert!(String::from_utf8_lossy(&r.body).contains("too many failed sign-ins"));
    let (status, body) = server
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(serde_json::json!({"username": "bob", "password": "right"})),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    // Every page says how it may be framed and what it may load.
    let r = server
        .raw(b"GET /login HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert!(
        r.header("content-security-policy")
            .unwrap()
            .contains("frame-ancestors 'none'")
    );
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("referrer-policy"), Some("same-origin"));

    // Pages without a session go to the sign-in page; a forged form is refused.
    let r = server
        .raw(b"GET /products/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login"));
    let r = server
        .raw(b"POST /products HTTP/1.1\r\nHost: x\r\nCookie: otaforge_session=forged\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 17\r\nConnection: close\r\n\r\ncsrf=x&name=evil1")
        .await;
    assert_eq!(r.status, 303, "no valid session: back to sign-in");

    // A real session, but a form without its CSRF token: refused.
    let hash = otaforge_server::auth::hash_password("pw-carol").unwrap();
    server
        .state
        .store()
        .create_user("carol", &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let body = format!("csrf={token}&kind=operator&username=carol&password=pw-carol");
    let r = server
        .raw(format!("POST /login HTTP/1.1\r\nHost: x\r\nCookie: {login_cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
        .await;
    assert_eq!(r.status, 303);
    let cookie = r.header("set-cookie").unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let session = cookie.split(';').next().unwrap();
    let forged = "csrf=0123456789abcdef0123456789abcdef&name=evil2";
    let r = server
        .raw(format!("POST /products HTTP/1.1\r\nHost: x\r\nCookie: {session}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{forged}", forged.len()).as_bytes())
        .await;
    assert_eq!(r.status, 403);
    // The pages validate like the API: a control character or an empty name is refused.
    let home = server
        .raw(
            format!("GET / HTTP/1.1\r\nHost: x\r\nCookie: {session}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let csrf = form_token(&home.text());
    for name in ["evil%01name", "+++", ""] {
        let body = format!("csrf={csrf}&name={name}");
        let r = server
            .raw(format!("POST /products HTTP/1.1\r\nHost: x\r\nCookie: {session}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
            .await;
        assert_eq!(r.status, 422, "{name:?}: {}", r.text());
    }
    let (_, products) = server.call(Method::GET, "/api/v1/products", None).await;
    assert_eq!(products.as_array().unwrap().len(), 0);
    server.finish().await;
}

/// Reads `name="csrf" value="..."` from a page.
fn form_token(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .expect("the page carries a CSRF token")
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

fn form_post(path: &str, cookie: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Registers a device with this password, then signs its bot in (see `bot_session`).
async fn new_bot(server: &Server, pid: i64, serial: &str, password: &str) -> (String, String) {
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": serial, "password": password})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    bot_session(server, pid, serial, password).await
}

/// Signs a bot in through the form: its session cookie and its workspace's form token.
async fn bot_session(server: &Server, pid: i64, serial: &str, password: &str) -> (String, String) {
    let (login_cookie, token) = server.login_token().await;
    let r = server
        .raw(&form_post(
            "/login",
            &login_cookie,
            &format!("csrf={token}&kind=bot&username={serial}&password={password}"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let session = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = server
        .get_with_cookie(&format!("/workspace/{pid}/{serial}"), &session)
        .await;
    assert_eq!(page.status, 200);
    (session, form_token(&page.text()))
}

/// Secrets stay sealed at rest (no build row, database page, WAL or blob holds the Wi-Fi or
/// device password; the data folder is the owner's alone), and a bot session ends when its
/// device is blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_sealed_and_bot_sessions_end_with_their_reason() {
    let server = Server::start(Backend::Sqlite).await;
    let (pid, _, _) = server.product("greenhouse").await;
    let (wifi_pw, device_pw) = ("wifi-pw-Zq81xK", "dev-pw-Zq81xK");
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "gh_01", "password": device_pw})),
        )
        .await;
    assert_eq!(status, 201);

    // The bot signs in through the form.
    let (session, csrf) = bot_session(&server, pid, "gh_01", device_pw).await;
    let workspace = format!("/workspace/{pid}/gh_01");

    // A file name with a line feed is refused with a message, never a 500.
    let r = server
        .raw(&form_post(
            &format!("{workspace}/save"),
            &session,
            &format!("csrf={csrf}&file=a%0Ab.ino&fqbn=arduino%3Aavr%3Auno&sketch=x"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        r.header("location").unwrap().contains("error="),
        "{:?}",
        r.header("location")
    );

    // Wi-Fi saved, then the setup firmware queued.
    let r = server
        .raw(&form_post(
            &format!("{workspace}/wifi"),
            &session,
            &format!(
                "csrf={csrf}&ssid=GreenNet&wifi_password={wifi_pw}&device_password={device_pw}"
            ),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(!r.header("location").unwrap().contains("error"));
    let r = server
        .raw(&form_post(
            &format!("{workspace}/setup"),
            &session,
            &format!("csrf={csrf}&what=compile"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let device = server.state.store().get_device(pid, "gh_01").await.unwrap();
    let builds = server
        .state
        .store()
        .list_builds(device.id, 10)
        .await
        .unwrap();
    assert_eq!(builds.len(), 1);
    assert!(
        !builds[0].files.contains_key("otaforge_config.h"),
        "the build row keeps only the sketch's own files"
    );
    // Let the build finish (it fails without an ESP core; what matters is what it stored).
    let start = Instant::now();
    while !matches!(
        server
            .state
            .store()
            .get_build(builds[0].id)
            .await
            .unwrap()
            .status,
        otaforge_store::model::BuildStatus::Succeeded | otaforge_store::model::BuildStatus::Failed
    ) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the build never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every change is in the audit log with who made it and from where.
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    for action in [
        "signed in",
        "saved Wi-Fi",
        "queued build",
        "registered device",
    ] {
        let entry = audit
            .get("items")
            .and_then(|i| i.as_array())
            .unwrap()
            .iter()
            .find(|a| a["action"] == action)
            .unwrap_or_else(|| panic!("{action} missing from {audit}"));
        assert!(
            entry["detail"].as_str().unwrap().contains("127.0.0.1"),
            "{entry}"
        );
    }

    // Blocking the device ends the bot's session at once.
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/gh_01"),
            Some(json!({"status": "blocked"})),
        )
        .await;
    assert_eq!(status, 200);
    let r = server.get_with_cookie(&workspace, &session).await;
    assert_eq!(r.status, 303, "a blocked device's session is over");
    assert_eq!(r.header("location"), Some("/login"));
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/gh_01"),
            Some(json!({"status": "verified"})),
        )
        .await;
    let r = server.get_with_cookie(&workspace, &session).await;
    assert_eq!(
        r.status, 303,
        "unblocking does not bring the old session back"
    );

    // Nothing in the data folder holds either password in clear.
    let (data_dir, _) = server.stop().await;
    let mut stack = vec![data_dir.clone()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
                continue;
            }
            // The database may still be closing its WAL and shared-memory files.
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            files += 1;
            for secret in [wifi_pw, device_pw] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds {secret} in clear",
                    entry.path().display()
                );
            }
        }
    }
    assert!(files >= 2, "the database and the key were searched");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&data_dir), 0o700);
        assert_eq!(mode(&data_dir.join("otaforge.db")), 0o600);
    }
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// One requester cannot fill the build queue: at most three builds wait or run per device
/// and per requester.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_requester_cannot_fill_the_build_queue() {
    let server = Server::start_with(
        Backend::Sqlite,
        support::Options {
            // No workers: queued builds stay queued.
            compile: Some(otaforge_server::compile::CompileConfig {
                workers: 0,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    let body = json!({"fqbn": "arduino:avr:uno", "files": {"blink.ino": BLINK}});
    for _ in 0..3 {
        let (status, b) = server
            .call(Method::POST, "/api/v1/builds", Some(body.clone()))
            .await;
        assert_eq!(status, 202, "{b}");
    }
    let (status, b) = server
        .call(Method::POST, "/api/v1/builds", Some(body))
        .await;
    assert_eq!(status, 429, "{b}");
    assert!(
        b["error"].as_str().unwrap().contains("already queued"),
        "{b}"
    );
    server.finish().await;
}

/// A server whose compiler is the arduino-cli stand-in (`tests/stand-in/arduino-cli`), in a
/// fresh folder `base`; `prepare` sees the stand-in's data folder (`.arduino15`) first.
async fn stand_in_server(
    tag: &str,
    prepare: impl FnOnce(&std::path::Path),
) -> (Server, PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("otaforge-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let data = base.join("alice/.arduino15");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::write(data.join("inventory.yaml"), "installation:\n  id: x\n").unwrap();
    prepare(&data);
    let cli = base.join("bin/arduino-cli");
    std::fs::write(
        &cli,
        include_str!("stand-in/arduino-cli")
            .replace("@DATA@", data.to_str().unwrap())
            .replace("@USER@", base.join("alice/Arduino").to_str().unwrap()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = Server::start_with(
        Backend::Sqlite,
        support::Options {
            compile: Some(otaforge_server::compile::CompileConfig {
                arduino_cli: Some(cli.clone()),
                arduino_builder: None,
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    (server, base, data)
}

/// A setup build for an ESP32 board through arduino-cli (the stand-in of
/// `tests/stand-in/arduino-cli`, installed outside `/usr` with its cores in another user's
/// folder): the build keeps the merged image, bootloader and partition table, sealed at rest;
/// the API and the device's workspace serve them, nobody else; the workspace says which boards
/// this server can build and what its administrator would install for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_builds_keep_their_images_for_flashing_by_wire() {
    let (server, base, _) = stand_in_server("setup-images", |_| ()).await;
    let (pid, _, _) = server.product("field").await;
    let (session, csrf) = new_bot(&server, pid, "f_01", "dev-pw-f01").await;
    let workspace = format!("/workspace/{pid}/f_01");
    let r = server
        .raw(&form_post(
            &format!("{workspace}/wifi"),
            &session,
            &format!(
                "csrf={csrf}&ssid=FieldNet&wifi_password=wifi-pw-f01&device_password=dev-pw-f01"
            ),
        ))
        .await;
    assert!(
        !r.header("location").unwrap().contains("error"),
        "{:?}",
        r.header("location")
    );
    let r = server
        .raw(&form_post(
            &format!("{workspace}/setup"),
            &session,
            &format!("csrf={csrf}&what=compile"),
        ))
        .await;
    let location = r.header("location").unwrap().to_string();
    let id: i64 = location.rsplit("build=").next().unwrap().parse().unwrap();
    let b = wait_build(&server, id).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert!(
        b["log"]
            .as_str()
            .unwrap()
            .contains("kept for flashing by wire"),
        "{b}"
    );
    let names: Vec<&str> = b["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["bootloader.bin", "merged.bin", "partitions.bin"],
        "{b}"
    );
    assert_eq!(b["images"][1]["size"], 6);

    // The API serves each image; unknown names and builds are 404s.
    let merged = server
        .raw(
            format!(
                "GET /api/v1/builds/{id}/images/merged.bin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                support::TOKEN
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(
        (merged.status, merged.body.as_slice()),
        (200, &b"MERGED"[..])
    );
    assert!(
        merged
            .header("content-disposition")
            .unwrap()
            .contains(&format!("build-{id}-merged.bin")),
        "{:?}",
        merged.headers
    );
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/builds/{id}/images/app.elf"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .call(Method::GET, "/api/v1/builds/999999/images/merged.bin", None)
        .await;
    assert_eq!(status, 404);

    // The workspace links them under the build, and serves them to the device's session only.
    let page = server
        .get_with_cookie(&format!("{workspace}?build={id}"), &session)
        .await;
    let html = page.text();
    let link = format!("{workspace}/builds/{id}/merged.bin");
    assert!(html.contains(&link), "{html}");
    let r = server.get_with_cookie(&link, &session).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"MERGED"[..]));
    let r = server
        .get_with_cookie(&link, "otaforge_session=forged")
        .await;
    assert_eq!(r.status, 303, "no session, no image");
    let (other, _) = new_bot(&server, pid, "f_02", "dev-pw-f02").await;
    let r = server
        .get_with_cookie(
            &format!("/workspace/{pid}/f_02/builds/{id}/merged.bin"),
            &other,
        )
        .await;
    assert_eq!(r.status, 404, "another device's build is not found");

    // What this server builds, in the workspace (the build checked the toolchain).
    assert!(
        html.contains(
            "ESP32 Dev Module</strong>: builds with arduino-cli 1.1.1, esp32:esp32 3.0.7"
        ),
        "{html}"
    );
    assert!(
        html.contains("arduino-cli core install esp8266:esp8266"),
        "{html}"
    );
    // A board it cannot build says so to the bot's user in the list and in the choice,
    // before anything is compiled; the administrator's steps are folded away.
    assert!(
        html.contains(
            "NodeMCU 1.0 (ESP8266)</strong>: this server cannot build for it yet. You can keep \
             editing and saving; ask the person who runs this server to add it."
        ),
        "{html}"
    );
    assert!(
        html.contains("(esp8266:esp8266:nodemcuv2): cannot be built on this server yet</option>"),
        "{html}"
    );
    assert!(
        !html.contains("(esp32:esp32:esp32): cannot be built"),
        "{html}"
    );

    // The images are sealed at rest: no file of the data folder holds them in clear.
    let (data_dir, _) = server.stop().await;
    let mut stack = vec![data_dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else if let Ok(bytes) = std::fs::read(entry.path()) {
                assert!(
                    !bytes.windows(6).any(|w| w == b"MERGED"),
                    "{} holds an image in clear",
                    entry.path().display()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    let _ = std::fs::remove_dir_all(&base);
}

/// The `/assets/...` files a page names (scripts and stylesheets).
fn assets_named(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\""] {
        for rest in html.split(attr).skip(1) {
            let value = rest.split('"').next().unwrap_or("");
            if value.starts_with("/assets/") {
                out.push(value.to_string());
            }
        }
    }
    out
}

/// A page loads what it uses: the sign-in page and the dashboard no script at all and at most
/// 60 KB with their stylesheet; the editor bundle on the workspace alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_load_only_what_they_use() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("dora").await;
    let (pid, _, _) = server.product("weights").await;
    let (bot, _) = new_bot(&server, pid, "w_01", "w-pw-81xKq").await;
    let weigh = async |path: &str, cookie: &str| -> (usize, Vec<String>) {
        let page = server.get_with_cookie(path, cookie).await;
        assert_eq!(page.status, 200, "{path}");
        let assets = assets_named(&page.text());
        let mut total = page.body.len();
        for asset in &assets {
            let r = server.get_with_cookie(asset, "").await;
            assert_eq!(r.status, 200, "{asset}");
            total += r.body.len();
        }
        (total, assets)
    };
    for (path, cookie) in [("/login", ""), ("/", operator.as_str())] {
        let (bytes, assets) = weigh(path, cookie).await;
        assert!(bytes <= 60_000, "{path}: {bytes} bytes with {assets:?}");
        assert!(
            assets.iter().all(|a| !a.ends_with(".js")),
            "{path} loads {assets:?}"
        );
    }
    let (_, assets) = weigh(&format!("/workspace/{pid}/w_01"), &bot).await;
    assert!(
        assets.contains(&"/assets/editor.js".to_string()),
        "{assets:?}"
    );
    let gone = server.get_with_cookie("/assets/htmx.min.js", "").await;
    assert_eq!(gone.status, 404);
    server.finish().await;
}

/// axe-core, from web/'s lockfile (`scripts/test.sh` runs `npm ci` there).
fn axe_source() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../web/node_modules/axe-core/axe.min.js");
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "axe-core is needed for the accessibility checks ({}: {e}): `cd web && npm ci`",
            path.display()
        )
    })
}

/// Every page fits a phone: at 390 px nothing is wider than the window (a table scrolls
/// inside its own box), and axe-core finds nothing serious or critical on any page at
/// either width. Screenshots at 1366 px and 390 px land in target/screenshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_fit_a_phone() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let hash = otaforge_server::auth::hash_password("operator-pw").unwrap();
    store
        .create_user("erin", &hash, otaforge_store::model::Role::Admin)
        .await
        .unwrap();
    let (pid, _, group) = server.product("a-product-with-a-rather-long-name").await;
    let ids = server.two_releases(pid, group).await;
    for i in 0..5 {
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(
                    json!({"serial": format!("greenhouse-sensor-{i:04}"), "password": "pw-12345",
                            "status": "verified"}),
                ),
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, rollout) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({"firmware_id": ids[1], "target": {"group_id": group},
                        "stages": [{"size": {"count": 2}}, {"size": "rest"}]})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rid = rollout["id"].as_i64().unwrap();
    let axe = axe_source();
    let browser = Browser::start().await;
    let pages = [
        ("dashboard", "/".to_string()),
        ("product", format!("/products/{pid}")),
        ("rollout", format!("/products/{pid}/rollouts/{rid}")),
        ("audit", "/audit".to_string()),
        ("accounts", "/accounts".to_string()),
        (
            "workspace",
            format!("/workspace/{pid}/greenhouse-sensor-0000"),
        ),
        ("group", format!("/products/{pid}/groups/{group}")),
        (
            "new-rollout",
            format!(
                "/products/{pid}/rollouts/new?firmware_id={}&group_id={group}&stages=2%2C+rest",
                ids[1]
            ),
        ),
        ("not-found", "/no/such/page".to_string()),
    ];
    // The sign-in page as a visitor sees it, then the rest signed in.
    let mut too_wide = Vec::new();
    let fits = async |name: &str, width: i64, too_wide: &mut Vec<String>| {
        browser.find("main").await;
        browser.shot(&format!("{name}-{width}")).await;
        let (page, window) = (
            browser
                .script("return document.documentElement.scrollWidth")
                .await,
            browser.script("return window.innerWidth").await,
        );
        for finding in browser.axe(&axe).await {
            too_wide.push(format!("{name} at {width}: {finding}"));
        }
        if page.as_i64() > window.as_i64() {
            too_wide.push(format!(
                "{name} at {width}: {page} px in a {window} px window"
            ));
        }
    };
    for width in [1366, 390] {
        browser.resize(width).await;
        browser.go(&server.url("/login")).await;
        fits("login", width, &mut too_wide).await;
    }
    let mut navs: std::collections::BTreeMap<&str, String> = Default::default();
    sign_in(&browser, &server, "operator", "erin", "operator-pw").await;
    browser.find("main").await;
    for width in [1366, 390] {
        browser.resize(width).await;
        for (name, path) in &pages {
            browser.go(&server.url(path)).await;
            fits(name, width, &mut too_wide).await;
            if *name != "not-found" && *name != "workspace" {
                let nav = browser
                    .script("return document.querySelector('nav.topnav').innerText")
                    .await;
                navs.insert(*name, nav.as_str().unwrap_or("").to_string());
            }
        }
    }
    assert!(too_wide.is_empty(), "{too_wide:#?}");
    // One nav on every operator page.
    let first = navs.values().next().unwrap().clone();
    assert!(
        first.contains("Audit log") && first.contains("Sign out"),
        "{first}"
    );
    assert!(navs.values().all(|n| *n == first), "{navs:#?}");
    browser.quit().await;
    server.finish().await;
}

/// An empty list says what to do next; a filter that takes nothing says so instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lists_say_what_to_do_next() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("fay").await;
    let page = async |path: &str| {
        let r = server.get_with_cookie(path, &operator).await;
        assert_eq!(r.status, 200, "{path}");
        r.text()
    };
    let html = page("/").await;
    assert!(
        html.contains("No products yet. Name your first one below"),
        "{html}"
    );
    let (pid, _, _) = server.product("empty").await;
    let html = page("/").await;
    assert!(!html.contains("no-products"), "{html}");
    let html = page(&format!("/products/{pid}")).await;
    for (id, says) in [
        ("no-devices", "No devices yet. Register one below"),
        ("no-firmware", "No firmware yet."),
        ("no-rollouts", "No rollouts yet."),
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "{id}: {html}");
        assert!(html.contains(says), "{says}: {html}");
    }
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "only-one"})),
        )
        .await;
    assert_eq!(status, 201);
    let html = page(&format!("/products/{pid}")).await;
    assert!(!html.contains("no-devices"), "{html}");
    let html = page(&format!("/products/{pid}?q=zzz")).await;
    assert!(html.contains("No device matches these filters."), "{html}");
    server.finish().await;
}

/// A product's API key is shown once after a redirect (a refresh re-posts nothing), with a
/// copy button; rotating it from the page needs the confirmation box, and the old key stops
/// working at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_shown_once_after_a_redirect() {
    let server = Server::start(Backend::Sqlite).await;
    let session = server.operator_session("gus").await;
    let csrf = form_token(&server.get_with_cookie("/", &session).await.text());
    let r = server
        .raw(&form_post(
            "/products",
            &session,
            &format!("csrf={csrf}&name=keyed"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let to = r.header("location").unwrap().to_string();
    assert!(to.starts_with("/products/"), "{to}");
    let sealed = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(sealed.starts_with("otaforge_new_secret="), "{sealed}");
    let both = format!("{session}; {sealed}");
    let shown = server.get_with_cookie(&to, &both).await;
    let html = shown.text();
    let key = html
        .split("id=\"api-key-value\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("the key is not shown: {html}"))
        .to_string();
    assert!(key.len() >= 32, "{key}");
    assert!(html.contains("data-copy=\"#api-key-value\""), "{html}");
    assert!(html.contains("/assets/copy.js"), "{html}");
    assert!(
        shown
            .header("set-cookie")
            .is_some_and(|c| c.starts_with("otaforge_new_secret=;") && c.contains("Max-Age=0")),
        "{:?}",
        shown.header("set-cookie")
    );
    // The cookie is sealed: the key is not in it.
    assert!(!sealed.contains(&key));
    // Another session, or the same cookie on another product, opens nothing.
    let other = server.operator_session("hal").await;
    let html = server
        .get_with_cookie(&to, &format!("{other}; {sealed}"))
        .await
        .text();
    assert!(!html.contains("api-key-value"), "{html}");
    let pid: i64 = to["/products/".len()..]
        .split('?')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "keyed-1", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let poll = |key: &str| format!("/deviceapi/update?k={key}&v=1.0.0&s=keyed-1");
    let before = server.raw(&otadrive_request("GET", &poll(&key), "")).await;
    assert_ne!(before.status, 401, "the shown key works");
    // Rotating needs the box ticked.
    let rotate = format!("/products/{pid}/rotate-key");
    let r = server
        .raw(&form_post(&rotate, &session, &format!("csrf={csrf}")))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let r = server
        .raw(&form_post(
            &rotate,
            &session,
            &format!("csrf={csrf}&confirm=yes"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let sealed = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let html = server
        .get_with_cookie(
            r.header("location").unwrap(),
            &format!("{session}; {sealed}"),
        )
        .await
        .text();
    let new_key = html
        .split("id=\"api-key-value\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("the new key is not shown: {html}"))
        .to_string();
    assert_ne!(new_key, key);
    let old = server.raw(&otadrive_request("GET", &poll(&key), "")).await;
    assert_eq!(old.status, 401, "the old key stopped working");
    let new = server
        .raw(&otadrive_request("GET", &poll(&new_key), ""))
        .await;
    assert_ne!(new.status, 401);
    server.finish().await;
}

/// An operator moves a device to another group, sets its password and deletes it from its
/// workspace; every change goes through the core (validated, audited) and answers with a
/// redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_manage_a_device_from_its_workspace() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("ida").await;
    let (pid, _, _) = server.product("managed").await;
    let gid = server.group(pid, "field").await;
    new_bot(&server, pid, "m_01", "first-pw-1234").await;
    let workspace = format!("/workspace/{pid}/m_01");
    let page = server.get_with_cookie(&workspace, &operator).await.text();
    assert!(page.contains("id=\"device-admin\""), "{page}");
    let csrf = form_token(&page);
    let act = |action: &str, body: String| {
        form_post(
            &format!("/products/{pid}/devices/m_01/{action}"),
            &operator,
            &format!("csrf={csrf}&{body}"),
        )
    };
    let r = server.raw(&act("move", format!("group_id={gid}"))).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.header("location").unwrap().starts_with(&workspace));
    let (_, device) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/m_01"),
            None,
        )
        .await;
    assert_eq!(device["group_id"], gid, "{device}");
    // Too long a password is refused by the core's rule (1 to 128), the page says why.
    let r = server
        .raw(&act("password", format!("password={}", "x".repeat(129))))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("1 to 128 characters"), "{}", r.text());
    let r = server
        .raw(&act("password", "password=second-pw-5678".into()))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    bot_signs_in(&server, "m_01", "second-pw-5678", true).await;
    bot_signs_in(&server, "m_01", "first-pw-1234", false).await;
    let r = server.raw(&act("delete", String::new())).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let r = server.raw(&act("delete", "confirm=yes".into())).await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        r.header("location")
            .unwrap()
            .starts_with(&format!("/products/{pid}"))
    );
    let (status, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/m_01"),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let audit = audit.to_string();
    for said in ["group", "password set", "device m_01"] {
        assert!(audit.contains(said), "{said}: {audit}");
    }
    server.finish().await;
}

/// Whether the bot signs in with this password through the form.
async fn bot_signs_in(server: &Server, serial: &str, password: &str, ok: bool) {
    let (login_cookie, token) = server.login_token().await;
    let r = server
        .raw(&form_post(
            "/login",
            &login_cookie,
            &format!("csrf={token}&kind=bot&username={serial}&password={password}"),
        ))
        .await;
    assert_eq!(r.status == 303, ok, "{password}: {} {}", r.status, r.text());
}

/// A group's page renames it, edits its configuration (a refused one stays as typed, with
/// the reason) and deletes it behind a confirmation box; the default group cannot go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_managed_from_their_page() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("joy").await;
    let (pid, _, default_group) = server.product("grouped").await;
    let gid = server.group(pid, "north").await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "g_01", "group_id": gid})),
        )
        .await;
    assert_eq!(status, 201);
    let here = format!("/products/{pid}/groups/{gid}");
    let product = server
        .get_with_cookie(&format!("/products/{pid}"), &operator)
        .await
        .text();
    assert!(product.contains(&format!("href=\"{here}\"")), "{product}");
    let html = server.get_with_cookie(&here, &operator).await.text();
    let csrf = form_token(&html);
    let act = |action: &str, body: &str| {
        form_post(
            &format!("{here}/{action}"),
            &operator,
            &format!("csrf={csrf}&{body}"),
        )
    };
    let r = server.raw(&act("rename", "name=north-east")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let r = server
        .raw(&act("config", "config=%7B%22interval%22%3A+30%7D"))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let (_, g) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/groups/{gid}"),
            None,
        )
        .await;
    assert_eq!(g["name"], "north-east", "{g}");
    assert_eq!(g["config"], json!({"interval": 30}), "{g}");
    // Not JSON, then JSON that is not an object: refused, the text kept as typed.
    for (typed, says) in [
        ("config=%7B%22interval%22%3A", "not valid JSON"),
        ("config=%5B1%2C2%5D", "config must be a JSON object"),
    ] {
        let r = server.raw(&act("config", typed)).await;
        assert_eq!(r.status, 422, "{}", r.text());
        let html = r.text();
        assert!(html.contains(says), "{html}");
        let kept = form_urlencoded::parse(typed.as_bytes()).next().unwrap().1;
        assert!(
            html.replace("&#34;", "\"")
                .contains(&format!("class=\"mono\">{kept}</textarea>")),
            "{kept}: {html}"
        );
    }
    let (_, g) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/groups/{gid}"),
            None,
        )
        .await;
    assert_eq!(
        g["config"],
        json!({"interval": 30}),
        "nothing half-saved: {g}"
    );
    let html = server
        .get_with_cookie(
            &format!("/products/{pid}/groups/{default_group}"),
            &operator,
        )
        .await
        .text();
    assert!(html.contains("cannot be deleted"), "{html}");
    let r = server.raw(&act("delete", "")).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let r = server.raw(&act("delete", "confirm=yes")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let (_, device) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/g_01"),
            None,
        )
        .await;
    assert_eq!(device["group_id"], default_group, "{device}");
    server.finish().await;
}

/// Firmware and products are deleted from the product page: firmware behind a confirmation
/// box (refused while a group uses it), a product once its name is typed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_and_products_are_deleted_from_the_page() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("kim").await;
    let (pid, _, group) = server.product("doomed").await;
    let ids = server.two_releases(pid, group).await;
    let page = format!("/products/{pid}");
    let html = server.get_with_cookie(&page, &operator).await.text();
    assert!(html.contains("id=\"delete-product\""), "{html}");
    let csrf = form_token(&html);
    let post = |path: &str, body: String| {
        form_post(
            &format!("{page}/{path}"),
            &operator,
            &format!("csrf={csrf}&{body}"),
        )
    };
    let r = server
        .raw(&post("firmware/delete", format!("firmware_id={}", ids[1])))
        .await;
    assert_eq!(r.status, 422, "no confirmation: {}", r.text());
    let r = server
        .raw(&post(
            "firmware/delete",
            format!("firmware_id={}&confirm=yes", ids[0]),
        ))
        .await;
    assert_eq!(r.status, 409, "the group's firmware: {}", r.text());
    let r = server
        .raw(&post(
            "firmware/delete",
            format!("firmware_id={}&confirm=yes", ids[1]),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let (_, listed) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/firmware"),
            None,
        )
        .await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let r = server
        .raw(&post("delete", "confirm_name=doome".into()))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("type the product&#39;s name")
            || r.text().contains("type the product's name"),
        "{}",
        r.text()
    );
    let r = server
        .raw(&post("delete", "confirm_name=doomed".into()))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(r.header("location").unwrap().starts_with("/?notice="));
    let (status, _) = server
        .call(Method::GET, &format!("/api/v1/products/{pid}"), None)
        .await;
    assert_eq!(status, 404);
    server.finish().await;
}

/// The rollout form: the dry run shows who gets the firmware in each stage before anything
/// starts, bad stages are refused with the reason, and the start (behind its confirmation
/// box) goes through the same core operation as the API and lands on the rollout's page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_start_from_the_page_after_a_dry_run() {
    let server = Server::start(Backend::Sqlite).await;
    let operator = server.operator_session("lee").await;
    let (pid, _, group) = server.product("staged").await;
    let ids = server.two_releases(pid, group).await;
    for i in 0..5 {
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": format!("st-{i}"), "status": "verified"})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let product = server
        .get_with_cookie(&format!("/products/{pid}"), &operator)
        .await
        .text();
    assert!(product.contains(&format!("href=\"/products/{pid}/rollouts/new\"")));
    let wizard = format!("/products/{pid}/rollouts/new");
    let html = server.get_with_cookie(&wizard, &operator).await.text();
    assert!(html.contains("value=\"10, 300, rest\""), "{html}");
    assert!(
        !html.contains("id=\"dry-run\""),
        "no dry run before a firmware is chosen"
    );
    let query = |stages: &str| {
        format!(
            "{wizard}?firmware_id={}&group_id={group}&stages={stages}&success=95&failure=10&window=0&rate=",
            ids[1]
        )
    };
    let r = server
        .get_with_cookie(&query("ten%2C+rest"), &operator)
        .await;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("is not a stage size"), "{}", r.text());
    let r = server.get_with_cookie(&query("2%2C+rest"), &operator).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let html = r.text();
    assert!(html.contains("id=\"dry-run\""), "{html}");
    assert!(html.contains("firmware 2.0.0 to 5 devices"), "{html}");
    let (_, listed) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/rollouts"),
            None,
        )
        .await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(0),
        "a dry run starts nothing"
    );
    let csrf = form_token(&html);
    let fields = format!(
        "csrf={csrf}&firmware_id={}&group_id={group}&stages=2%2C+rest&success=95&failure=10&window=0&rate=",
        ids[1]
    );
    let start = format!("/products/{pid}/rollouts/start");
    let r = server.raw(&form_post(&start, &operator, &fields)).await;
    assert_eq!(r.status, 422, "no confirmation: {}", r.text());
    let r = server
        .raw(&form_post(
            &start,
            &operator,
            &format!("{fields}&confirm=yes"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let to = r.header("location").unwrap().to_string();
    assert!(
        to.starts_with(&format!("/products/{pid}/rollouts/")),
        "{to}"
    );
    let (_, listed) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/rollouts"),
            None,
        )
        .await;
    let rollout = &listed["items"][0];
    assert_eq!(
        rollout["stages"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let page = server.get_with_cookie(&to, &operator).await;
    assert_eq!(page.status, 200);
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    assert!(audit.to_string().contains("started rollout"), "{audit}");
    server.finish().await;
}

/// The workspace and the rollout page keep themselves current: what the link serves (the
/// group's firmware, then a rollout's) shows without a reload and is what the link then
/// serves; the rollout page's counts follow the devices, and its actions need the box.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspace_and_rollout_pages_update_themselves() {
    let server = Server::start(Backend::Sqlite).await;
    let (pid, _, group) = server.product("live").await;
    let (status, body) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "live_01", "password": "live-dev-pw", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let browser = admin_in_a_browser(&server, "lou").await;
    browser
        .go(&server.url(&format!("/workspace/{pid}/live_01")))
        .await;
    browser.wait_text("#assigned", "nothing yet").await;
    let marker = "return window.__unchanged = true";
    browser.script(marker).await;

    let link = |md5: &str| {
        http_update_request(
            &format!("/ota/{pid}/live_01"),
            Some(("live_01", "live-dev-pw")),
            md5,
            None,
        )
    };
    let ids = server.two_releases(pid, group).await;
    let shown = browser.wait_text("#assigned", "1.0.0").await;
    assert!(!shown.contains("rollout"), "{shown}");
    let r = server.raw(&link("00")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, fixture("app-v1.bin"), "the page said 1.0.0");

    let (status, rollout) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({"firmware_id": ids[1], "target": {"group_id": group},
                "stages": [{"size": "rest"}]})),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let rid = rollout["id"].as_i64().unwrap();
    let shown = browser.wait_text("#assigned", "2.0.0").await;
    assert!(shown.contains(&format!("from rollout {rid}")), "{shown}");
    assert_eq!(
        browser.script("return window.__unchanged === true").await,
        json!(true),
        "updated in place, not reloaded"
    );

    browser
        .go(&server.url(&format!("/products/{pid}/rollouts/{rid}")))
        .await;
    browser.wait_text("#rollout-state", "RUNNING").await;
    let pending =
        "return document.querySelector('#rollout-live tbody td:nth-child(3)')?.textContent.trim()";
    assert_eq!(browser.script(pending).await, json!("1"));
    browser.script(marker).await;
    let r = server.raw(&link(&md5_hex(&fixture("app-v1.bin")))).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, fixture("app-v2.bin"), "the page said 2.0.0");
    browser
        .wait_for(
            "the download counted on the rollout page",
            &format!("{pending} === '0'"),
        )
        .await;
    // Pausing needs the box: the browser holds the form until it is ticked.
    browser.click("#action-pause").await;
    assert_eq!(
        browser.text("#rollout-state").await,
        "RUNNING",
        "not sent unticked"
    );
    browser.click("#action-confirm").await;
    browser.click("#action-pause").await;
    browser.wait_text("#rollout-state", "PAUSED").await;
    browser.shot("rollout-live").await;
    browser.quit().await;
    server.finish().await;
}

/// The editor as the anchors have it: tabs keep their unsaved edits and Save (Ctrl+S) keeps
/// every tab's; files are added, renamed and deleted; autocomplete offers the Arduino API;
/// an example opens and the sketch before it is restored; Verify compiles without touching
/// the link, Deploy serves the build there and its .bin downloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_editor_keeps_tabs_saves_restores_and_verifies() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let (pid, _, _) = server.product("editing").await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "ed_01", "password": "ed-pw-123"})),
        )
        .await;
    assert_eq!(status, 201);
    let device = store.get_device(pid, "ed_01").await.unwrap();
    let current = || async {
        store
            .list_revisions(device.id, 1)
            .await
            .unwrap()
            .pop()
            .map(|r| r.files)
            .unwrap_or_default()
    };
    let browser = Browser::start().await;
    sign_in(&browser, &server, "bot", "ed_01", "ed-pw-123").await;
    browser.wait_text("#device-id", "ed_01").await;

    // A second tab, added through the files form.
    browser.click("#file-tools summary").await;
    browser.type_into("#new-file", "config.h").await;
    browser.click("#add-file").await;
    browser.wait_text("#file-tabs a.current", "config.h").await;
    browser.click("#file-tabs a[data-file='sketch.ino']").await;
    browser.click("#fqbn option[value='arduino:avr:uno']").await;
    type_sketch(
        &browser,
        "#include \"config.h\"\nvoid setup() {}\nvoid loop() {}",
    )
    .await;
    // To the other tab and back: the edit is kept in the page and the tab is marked.
    browser.click("#file-tabs a[data-file='config.h']").await;
    assert!(
        browser
            .exists("#file-tabs a.dirty[data-file='sketch.ino']")
            .await
    );
    type_sketch(&browser, "#define LED 13").await;
    browser.click("#file-tabs a[data-file='sketch.ino']").await;
    assert!(browser.text(".cm-content").await.contains("config.h"));
    // Autocomplete offers the Arduino API as a word is typed.
    let id = browser.find(".cm-content").await;
    browser
        .cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": "\u{E010}digitalWr"}),
        )
        .await;
    browser
        .wait_text(".cm-tooltip-autocomplete", "digitalWrite")
        .await;
    browser
        .cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": "\u{E00C}\u{E003}\u{E003}\u{E003}\u{E003}\u{E003}\u{E003}\u{E003}\u{E003}\u{E003}"}),
        )
        .await;
    // Ctrl+S saves both tabs at once.
    browser
        .cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": "\u{E009}s\u{E009}"}),
        )
        .await;
    browser.wait_text("#notice", "saved").await;
    let files = current().await;
    assert!(
        files["sketch.ino"].contains("#include \"config.h\""),
        "{files:?}"
    );
    assert_eq!(files["config.h"].trim(), "#define LED 13", "{files:?}");
    assert!(!browser.exists("#file-tabs a.dirty").await);

    // Verify compiles and leaves the link alone.
    browser.click("#verify").await;
    browser
        .wait_for(
            "the verify build",
            "return document.querySelector('#build-log')?.dataset.status === 'succeeded'",
        )
        .await;
    browser.wait_text("#build-status", "SUCCEEDED").await;
    assert_eq!(browser.text("#assigned").await, "nothing yet");
    assert!(
        !browser.exists("#build-download").await,
        "Verify stores nothing"
    );
    // Deploy serves it: the link and the download are the same bytes.
    browser.click("#compile").await;
    browser.wait_text("#build-status", "SUCCEEDED").await;
    browser.wait_text("#assigned", "build-").await;
    let href = browser
        .script("return document.querySelector('#build-download a')?.getAttribute('href')")
        .await;
    let href = href.as_str().expect("a download link").to_string();
    let (bot_cookie, _) = bot_session(&server, pid, "ed_01", "ed-pw-123").await;
    let download = server.get_with_cookie(&href, &bot_cookie).await;
    assert_eq!(download.status, 200, "{}", download.text());
    let r = server
        .raw(format!("GET /ota/{pid}/ed_01 HTTP/1.0\r\nHost: x\r\nAuthorization: Basic {}\r\nConnection: close\r\n\r\n", basic("ed_01", "ed-pw-123")).as_bytes())
        .await;
    assert_eq!(r.status, 200);
    assert!(!r.body.is_empty());
    assert_eq!(
        download.body, r.body,
        "the download is what the link serves"
    );

    // Rename, then delete (behind its box), the second file.
    browser
        .go(&server.url(&format!("/workspace/{pid}/ed_01?file=config.h")))
        .await;
    browser.click("#file-tools summary").await;
    browser
        .script("document.querySelector('#rename-to').value = ''")
        .await;
    browser.type_into("#rename-to", "settings.h").await;
    browser.click("#rename-file").await;
    browser
        .wait_text("#file-tabs a.current", "settings.h")
        .await;
    assert!(current().await.contains_key("settings.h"));
    browser.click("#file-tools summary").await;
    browser.click("#delete-file-confirm").await;
    browser.click("#delete-file").await;
    browser.wait_text("#file-tabs", "sketch.ino").await;
    assert!(!browser.text("#file-tabs").await.contains("settings.h"));
    let before_example = current().await;

    // An example replaces the sketch; the one before it comes back from the history.
    browser.click("#file-tools summary").await;
    browser.click("#example option[value='wifi-scan']").await;
    browser.click("#open-example").await;
    browser.wait_text(".cm-content", "scanNetworks").await;
    let restore = browser
        .script("return document.querySelectorAll('#history button')[0]?.id")
        .await;
    let restore = restore.as_str().expect("a restore button").to_string();
    browser.click(&format!("#{restore}")).await;
    browser.wait_text(".cm-content", "config.h").await;
    assert_eq!(current().await, before_example);
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let audit = audit.to_string();
    for said in [
        "renamed sketch file",
        "deleted sketch file",
        "opened example",
        "restored sketch",
    ] {
        assert!(audit.contains(said), "{said}: {audit}");
    }
    browser.shot("workspace-editor").await;
    browser.quit().await;
    server.finish().await;
}

/// Uploads from the pages show their progress and land where the server sends them: the
/// firmware table shows what the image says (chip, project, IDF version), a group's
/// resources are uploaded and deleted on its page; the product is renamed (a taken name is
/// refused) and a bulk change takes exactly the devices its filter shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_bulk_changes_and_renames_from_the_pages() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let (pid, _, group) = server.product("uploads").await;
    server.product("taken").await;
    let browser = admin_in_a_browser(&server, "uma").await;

    // Firmware through the form, its progress recorded across the redirect.
    let record = "const bar = document.querySelector(arguments[0] + ' progress'); \
        new MutationObserver(() => sessionStorage.setItem('sent', bar.value)) \
        .observe(bar, {attributes: true});";
    let upload = |form: &'static str, input: &'static str, file: PathBuf| {
        let browser = &browser;
        async move {
            browser
                .cmd(
                    Method::POST,
                    "/execute/sync",
                    json!({"script": record, "args": [form]}),
                )
                .await;
            let id = browser.find(input).await;
            browser
                .cmd(
                    Method::POST,
                    &format!("/element/{id}/value"),
                    json!({"text": file.to_str().unwrap()}),
                )
                .await;
            browser.click(&format!("{form} button")).await;
        }
    };
    browser.go(&server.url(&format!("/products/{pid}"))).await;
    upload(
        "#firmware-upload",
        "#firmware-file",
        support::fixtures().join("app-v1.bin"),
    )
    .await;
    browser
        .wait_text("#notice", "firmware 1.0.0 uploaded")
        .await;
    assert_eq!(
        browser
            .script("return sessionStorage.getItem('sent')")
            .await,
        json!("100"),
        "the bar reached the end"
    );
    let table = browser.text("main").await;
    assert!(
        table.contains("esp32c3"),
        "the chip the image names: {table}"
    );

    // A resource on the group's page, then deleted behind its box.
    let here = format!("/products/{pid}/groups/{group}");
    browser.go(&server.url(&here)).await;
    assert!(browser.exists("#no-resources").await);
    browser.type_into("#resource-name", "blob.bin").await;
    upload(
        "#resource-upload",
        "#resource-file",
        support::fixtures().join("app-v2.bin"),
    )
    .await;
    browser
        .wait_text("#notice", "resource blob.bin added")
        .await;
    let listed = store.list_resources(group).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size as usize, fixture("app-v2.bin").len());
    assert!(browser.text("#resources").await.contains(&listed[0].fk));
    let operator = server.operator_session("uma2").await;
    let html = server.get_with_cookie(&here, &operator).await.text();
    let csrf = form_token(&html);
    let delete = format!("{here}/resources/{}/delete", listed[0].id);
    let r = server
        .raw(&form_post(&delete, &operator, &format!("csrf={csrf}")))
        .await;
    assert_eq!(r.status, 422, "unconfirmed");
    let r = server
        .raw(&form_post(
            &delete,
            &operator,
            &format!("csrf={csrf}&confirm=yes"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(store.list_resources(group).await.unwrap().is_empty());

    // An upload form's text field is bounded whatever the request says.
    let boundary = "xBOUNDARYx";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"csrf\"\r\n\r\n{csrf}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"version\"\r\n\r\n{}\r\n\
         --{boundary}--\r\n",
        "9".repeat(5000)
    );
    let r = server
        .raw(
            format!(
                "POST /products/{pid}/firmware HTTP/1.1\r\nHost: x\r\nCookie: {operator}\r\n\
                 Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("is longer than 4096 bytes"),
        "{}",
        r.text()
    );

    // Firmware keys from the page: a bad digest is refused with the rule, good ones kept.
    let keys = format!("/products/{pid}/firmware-keys");
    let r = server
        .raw(&form_post(
            &keys,
            &operator,
            &format!("csrf={csrf}&digests=nope"),
        ))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("64 hex digits"), "{}", r.text());
    let digest = "ab".repeat(32);
    let r = server
        .raw(&form_post(
            &keys,
            &operator,
            &format!("csrf={csrf}&digests={digest}%0A"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(
        store.get_product(pid).await.unwrap().firmware_keys,
        vec![digest]
    );

    // Rename: a taken name is refused with the reason; a free one lands.
    let rename = format!("/products/{pid}/rename");
    let r = server
        .raw(&form_post(
            &rename,
            &operator,
            &format!("csrf={csrf}&name=taken"),
        ))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("already exists"), "{}", r.text());
    let r = server
        .raw(&form_post(
            &rename,
            &operator,
            &format!("csrf={csrf}&name=fleet+one"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(store.get_product(pid).await.unwrap().name, "fleet one");

    // Bulk: verify what the filter shows (serials containing "bk-"), nothing else.
    for serial in ["bk-1", "bk-2", "other-1"] {
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial, "status": "new"})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let page = server
        .get_with_cookie(&format!("/products/{pid}?q=bk-"), &operator)
        .await
        .text();
    assert!(page.contains("id=\"bulk-devices\""), "{page}");
    assert!(page.contains("With the 2 devices"), "{page}");
    let bulk = format!("/products/{pid}/devices/bulk");
    let fields = format!("csrf={csrf}&q=bk-&status=&action=verify&group_id=");
    let r = server.raw(&form_post(&bulk, &operator, &fields)).await;
    assert_eq!(r.status, 422, "unconfirmed");
    let r = server
        .raw(&form_post(
            &bulk,
            &operator,
            &format!("{fields}&confirm=yes"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert!(
        r.header("location").unwrap().contains("verify+2+devices"),
        "{:?}",
        r.header("location")
    );
    for (serial, status) in [
        ("bk-1", "verified"),
        ("bk-2", "verified"),
        ("other-1", "new"),
    ] {
        let device = store.get_device(pid, serial).await.unwrap();
        assert_eq!(device.status.as_str(), status, "{serial}");
    }
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let audit = audit.to_string();
    for said in [
        "renamed product",
        "added resource",
        "deleted resource",
        "bulk set status verified",
    ] {
        assert!(audit.contains(said), "{said}: {audit}");
    }
    browser.quit().await;
    server.finish().await;
}

/// Operator accounts with roles, managed on the accounts page: an admin adds, changes and
/// deletes accounts; an operator changes the fleet but not accounts; a viewer looks at
/// everything and changes nothing, in the pages and the API alike. API tokens are made
/// (shown once), used and revoked there, by any role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_have_roles_and_a_viewer_changes_nothing() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let (pid, _, _) = server.product("roles").await;
    let admin = server.operator_session("ann").await;
    let page = server.get_with_cookie("/accounts", &admin).await;
    assert_eq!(page.status, 200);
    assert!(
        page.text().contains("id=\"new-account\""),
        "{}",
        page.text()
    );
    let csrf = form_token(&page.text());
    let post = |path: &str, cookie: &str, body: String| form_post(path, cookie, &body);
    for (name, role) in [("vic", "viewer"), ("opal", "operator")] {
        let r = server
            .raw(&post(
                "/accounts",
                &admin,
                format!("csrf={csrf}&username={name}&password={name}-pw-123&role={role}"),
            ))
            .await;
        assert_eq!(r.status, 303, "{}", r.text());
    }
    let r = server
        .raw(&post(
            "/accounts",
            &admin,
            format!("csrf={csrf}&username=x&password=x-pw&role=owner"),
        ))
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("is not a role"), "{}", r.text());
    let accounts = store.list_users().await.unwrap();
    let id_of = |name: &str| accounts.iter().find(|u| u.username == name).unwrap().id;

    // The viewer looks, and every change it tries is refused with the reason.
    let viewer = server.session_of("vic", "vic-pw-123").await;
    let product = server
        .get_with_cookie(&format!("/products/{pid}"), &viewer)
        .await;
    assert_eq!(product.status, 200);
    let vcsrf = form_token(&product.text());
    let r = server
        .raw(&post(
            "/products",
            &viewer,
            format!("csrf={vcsrf}&name=nope"),
        ))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("viewer account"), "{}", r.text());
    let r = server
        .raw(&post(
            &format!("/products/{pid}/rename"),
            &viewer,
            format!("csrf={vcsrf}&name=renamed"),
        ))
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(store.get_product(pid).await.unwrap().name, "roles");
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "wk_01", "password": "wk-pw-123"})),
        )
        .await;
    assert_eq!(status, 201);
    let r = server
        .raw(&post(
            &format!("/workspace/{pid}/wk_01/save"),
            &viewer,
            format!("csrf={vcsrf}&file=sketch.ino&fqbn=arduino%3Aavr%3Auno&sketch=x&action=save"),
        ))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(
        store
            .list_revisions(store.get_device(pid, "wk_01").await.unwrap().id, 1)
            .await
            .unwrap()
            .is_empty(),
        "nothing saved"
    );

    // Its API token, made on the page and shown once, reads and cannot write.
    let r = server
        .raw(&post(
            "/accounts/tokens",
            &viewer,
            format!("csrf={vcsrf}&days=2"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let sealed = r
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(sealed.starts_with("otaforge_new_secret="), "{sealed}");
    let shown = server
        .get_with_cookie("/accounts", &format!("{viewer}; {sealed}"))
        .await
        .text();
    let token = shown
        .split("id=\"token-value\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .expect("the token, shown once")
        .to_string();
    assert!(
        !server
            .get_with_cookie("/accounts", &viewer)
            .await
            .text()
            .contains(&token)
    );
    let bearer = |method: Method, path: &str, body: Option<Value>| {
        let mut req = server
            .http
            .request(method, server.url(path))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(bearer(Method::GET, "/api/v1/products", None).await, 200);
    assert_eq!(
        bearer(
            Method::POST,
            "/api/v1/products",
            Some(json!({"name": "via-api"}))
        )
        .await,
        403
    );
    assert_eq!(
        bearer(
            Method::POST,
            "/api/v1/users",
            Some(json!({"username": "z", "password": "zz"}))
        )
        .await,
        403
    );
    let token_id = store.list_tokens(Some(id_of("vic"))).await.unwrap()[0]
        .id
        .clone();
    let r = server
        .raw(&post(
            &format!("/accounts/tokens/{token_id}/revoke"),
            &viewer,
            format!("csrf={vcsrf}"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(bearer(Method::GET, "/api/v1/products", None).await, 401);

    // The operator changes the fleet, not accounts.
    let operator = server.session_of("opal", "opal-pw-123").await;
    let ocsrf = form_token(&server.get_with_cookie("/accounts", &operator).await.text());
    let r = server
        .raw(&post(
            "/products",
            &operator,
            format!("csrf={ocsrf}&name=opal-made"),
        ))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let r = server
        .raw(&post(
            "/accounts",
            &operator,
            format!("csrf={ocsrf}&username=sneak&password=sneak-pw&role=admin"),
        ))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("only an admin"), "{}", r.text());

    // The admin makes the viewer an operator (its session sees it at once), cannot change
    // its own role, and deletes the operator account (its session ends).
    let change = |id: i64, role: &str| {
        post(
            &format!("/accounts/{id}/change"),
            &admin,
            format!("csrf={csrf}&role={role}&password="),
        )
    };
    let r = server.raw(&change(id_of("vic"), "operator")).await;
    assert_eq!(r.status, 303, "{}", r.text());
    let r = server
        .raw(&post(
            "/products",
            &viewer,
            format!("csrf={vcsrf}&name=vic-made"),
        ))
        .await;
    assert_eq!(r.status, 303, "now an operator: {}", r.text());
    let r = server.raw(&change(id_of("ann"), "viewer")).await;
    assert_eq!(r.status, 409, "{}", r.text());
    let delete = format!("/accounts/{}/delete", id_of("opal"));
    let r = server
        .raw(&post(&delete, &admin, format!("csrf={csrf}")))
        .await;
    assert_eq!(r.status, 422, "unconfirmed");
    let r = server
        .raw(&post(&delete, &admin, format!("csrf={csrf}&confirm=yes")))
        .await;
    assert_eq!(r.status, 303, "{}", r.text());
    let r = server.get_with_cookie("/accounts", &operator).await;
    assert_eq!(r.status, 303, "the deleted account's session ended");
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let audit = audit.to_string();
    for said in [
        "created account",
        "changed role",
        "deleted account",
        "revoked token",
    ] {
        assert!(audit.contains(said), "{said}: {audit}");
    }
    server.finish().await;
}

/// The setup firmware installs from the browser: a setup build whose compiler exported only
/// the bootloader and partition table gets a merged image made like `esptool merge-bin`;
/// its ESP Web Tools manifest names the chip family and the parts, each served byte-correct
/// (esptool parses the bootloader back out of the merged image); the workspace shows the
/// Install button, loads the flashing bundle only there, and where the browser has no Web
/// Serial says so and points at the esptool steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_firmware_installs_from_the_browser() {
    use otaforge_formats::esp::Chip;
    use otaforge_formats::esp::build::{SegmentSpec, esp32_image};
    use otaforge_formats::flash;
    use otaforge_formats::partition::{self as pt, PartitionEntry, PartitionTable};
    let bootloader = esp32_image(
        Chip::Esp32,
        0x4008_0400,
        &[
            SegmentSpec {
                load_addr: 0x3FFF_0000,
                data: vec![0x5A; 0x100],
            },
            SegmentSpec {
                load_addr: 0x4007_8000,
                data: (0..0x1400u32).map(|i| (i * 5 % 251) as u8).collect(),
            },
        ],
        false,
    );
    let app_slot = |label: &str, subtype: u8, offset: u32| PartitionEntry {
        ty: pt::TYPE_APP,
        subtype,
        offset,
        size: 0x140000,
        label: label.into(),
        flags: 0,
    };
    let table = PartitionTable {
        entries: vec![
            PartitionEntry {
                ty: pt::TYPE_DATA,
                subtype: pt::SUBTYPE_OTADATA,
                offset: 0xe000,
                size: 0x2000,
                label: "otadata".into(),
                flags: 0,
            },
            app_slot("app1", pt::SUBTYPE_OTA_0 + 1, 0x150000),
            app_slot("app0", pt::SUBTYPE_OTA_0, 0x10000),
        ],
    }
    .encode()
    .unwrap();
    let (server, base, _) = stand_in_server("web-install", |data| {
        std::fs::create_dir_all(data.join("parts")).unwrap();
        std::fs::write(data.join("parts/bootloader.bin"), &bootloader).unwrap();
        std::fs::write(data.join("parts/partitions.bin"), &table).unwrap();
    })
    .await;
    let (pid, _, _) = server.product("installs").await;
    let (session, csrf) = new_bot(&server, pid, "in_01", "dev-pw-in01").await;
    let workspace = format!("/workspace/{pid}/in_01");
    let r = server
        .raw(&form_post(
            &format!("{workspace}/wifi"),
            &session,
            &format!("csrf={csrf}&ssid=&wifi_password=&device_password=dev-pw-in01"),
        ))
        .await;
    assert_eq!(r.status, 303);
    assert!(
        !r.header("location").unwrap().contains("error="),
        "no network built in: it is given over Improv at install ({:?})",
        r.header("location")
    );
    // The personal config then builds no network in and names the workspace for Improv.
    let r = server
        .raw(&form_post(
            &format!("{workspace}/setup"),
            &session,
            &format!("csrf={csrf}&what=config"),
        ))
        .await;
    let config = r.text();
    assert!(
        config.contains("#define OTAFORGE_WIFI_SSID \"\""),
        "{config}"
    );
    assert!(
        config.contains(&format!("/workspace/{pid}/in_01\"")),
        "{config}"
    );
    let r = server
        .raw(&form_post(
            &format!("{workspace}/setup"),
            &session,
            &format!("csrf={csrf}&what=compile"),
        ))
        .await;
    let location = r.header("location").unwrap().to_string();
    let id: i64 = location.rsplit("build=").next().unwrap().parse().unwrap();
    let b = wait_build(&server, id).await;
    assert_eq!(b["status"], "succeeded", "{b}");
    assert!(
        b["log"].as_str().unwrap().contains("merged.bin made from"),
        "{b}"
    );

    // The manifest, and every part it names, relative to it.
    let manifest_url = format!("{workspace}/builds/{id}/manifest.json");
    let r = server.get_with_cookie(&manifest_url, &session).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let manifest: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(manifest["builds"][0]["chipFamily"], "ESP32", "{manifest}");
    assert_eq!(manifest["new_install_prompt_erase"], true);
    assert_eq!(
        manifest["new_install_improv_wait_time"], 15,
        "the setup firmware answers Improv"
    );
    let parts = manifest["builds"][0]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{manifest}");
    assert_eq!(parts[0]["offset"], 0);
    let part = format!(
        "{workspace}/builds/{id}/{}",
        parts[0]["path"].as_str().unwrap()
    );
    let merged = server.get_with_cookie(&part, &session).await;
    assert_eq!(merged.status, 200);
    let app = server
        .get_with_cookie(&format!("{workspace}/builds/{id}/firmware.bin"), &session)
        .await;
    assert_eq!(app.status, 200);
    let expected = flash::merge(&[
        (0x1000, &bootloader),
        (0x8000, &table),
        (0x10000, &app.body),
    ])
    .unwrap();
    assert!(
        merged.body == expected,
        "bootloader at 0x1000, table at 0x8000, app at app0"
    );
    assert!(merged.body[..0x1000].iter().all(|&b| b == 0xFF));
    // esptool reads the bootloader back from where the ROM reads it.
    let argv: Vec<String> = std::fs::read_to_string(support::fixtures().join("image-info.argv"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let at = base.join("bootloader-from-merged.bin");
    std::fs::write(&at, &merged.body[0x1000..0x1000 + bootloader.len()]).unwrap();
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .arg(&at)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.contains("ESP32"), "{said}");
    // Another device's session cannot read it.
    let (other, _) = new_bot(&server, pid, "in_02", "dev-pw-in02").await;
    let r = server
        .get_with_cookie(
            &format!("/workspace/{pid}/in_02/builds/{id}/manifest.json"),
            &other,
        )
        .await;
    assert_eq!(r.status, 404);

    // The page: the button, the bundle only here, and the note where Web Serial is missing.
    let html = server
        .get_with_cookie(&format!("{workspace}?build={id}"), &session)
        .await
        .text();
    assert!(
        html.contains(&format!("manifest=\"{manifest_url}\"")),
        "{html}"
    );
    assert!(assets_named(&html).contains(&"/assets/webtools.js".to_string()));
    let plain = server
        .get_with_cookie(&format!("/workspace/{pid}/in_02"), &other)
        .await
        .text();
    assert!(
        !assets_named(&plain).contains(&"/assets/webtools.js".to_string()),
        "not loaded where there is nothing to install"
    );
    let browser = Browser::start().await;
    sign_in(&browser, &server, "bot", "in_01", "dev-pw-in01").await;
    browser.wait_text("#device-id", "in_01").await;
    browser
        .go(&server.url(&format!("{workspace}?build={id}")))
        .await;
    browser
        .wait_for(
            "the install button",
            "return !!customElements.get('esp-web-install-button') && \
             document.querySelector('#install-button').hasAttribute('install-supported') === ('serial' in navigator)",
        )
        .await;
    browser.shot("workspace-install").await;
    browser
        .cmd(
            Method::POST,
            "/goog/cdp/execute",
            json!({"cmd": "Page.addScriptToEvaluateOnNewDocument",
                   "params": {"source": "delete Navigator.prototype.serial;"}}),
        )
        .await;
    browser
        .go(&server.url(&format!("{workspace}?build={id}")))
        .await;
    browser
        .wait_for(
            "the note for a browser without Web Serial",
            "return !('serial' in navigator) && !document.querySelector('#no-web-serial').hidden \
             && document.querySelector('#install-button').hasAttribute('install-unsupported')",
        )
        .await;
    assert!(
        browser
            .text("#no-web-serial")
            .await
            .contains("esptool steps")
    );
    browser.shot("workspace-install-no-serial").await;
    browser.quit().await;
    server.finish().await;
    let _ = std::fs::remove_dir_all(&base);
}

/// The setup firmware's Improv Wi-Fi (`firmware/arduino/otaforge_ota/otaforge_improv.h`),
/// compiled on the host around a stand-in serial port, is driven by improv-wifi-serial-sdk,
/// the client inside ESP Web Tools (npm, from web/'s lockfile): the SDK finds it behind the
/// board's boot log, reads its info, gets "unable to connect" for a wrong password, and on
/// the right one the network is kept and the device's workspace named as where to go next.
#[test]
fn improv_wifi_answers_the_esp_web_tools_client() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("target/improv");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/improv");
    run(std::process::Command::new("g++")
        .args(["-std=c++11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("firmware/arduino/otaforge_ota"))
        .arg(here.join("device.cpp"))
        .arg("-o")
        .arg(dir.join("device")));
    let web = root.join("web");
    assert!(
        web.join("node_modules/improv-wifi-serial-sdk").is_dir(),
        "web/node_modules lacks improv-wifi-serial-sdk: run `npm ci` in web/ (scripts/test.sh does)"
    );
    // The SDK's modules import without file extensions: esbuild (from the same lockfile)
    // bundles the driver for node.
    run(
        std::process::Command::new(web.join("node_modules/.bin/esbuild"))
            .env("NODE_PATH", web.join("node_modules"))
            .arg(here.join("drive.mjs"))
            .args([
                "--bundle",
                "--platform=node",
                "--format=esm",
                "--log-level=warning",
            ])
            .arg(format!("--outfile={}", dir.join("drive.mjs").display())),
    );
    let store = dir.join("kept-network.txt");
    let _ = std::fs::remove_file(&store);
    let said = run(std::process::Command::new("timeout")
        .arg("60")
        .arg("node")
        .arg(dir.join("drive.mjs"))
        .arg(dir.join("device"))
        .arg(&store));
    let out: Value = serde_json::from_str(said.trim()).unwrap_or_else(|e| panic!("{e}: {said}"));
    assert!(out.get("failed").is_none(), "{out}");
    assert_eq!(out["info"]["firmware"], "OTAForge setup", "{out}");
    assert_eq!(out["info"]["chipFamily"], "ESP32", "{out}");
    assert_eq!(out["info"]["name"], "bot_001", "{out}");
    assert_eq!(out["stateBefore"], 2, "ready, not yet on a network: {out}");
    assert_eq!(out["wrong"], "UNABLE_TO_CONNECT", "{out}");
    assert_eq!(
        out["nextUrl"], "http://127.0.0.1:8080/workspace/1/bot_001",
        "{out}"
    );
    assert_eq!(out["stateAfter"], 4, "provisioned: {out}");
    assert_eq!(
        std::fs::read_to_string(&store).unwrap(),
        "HomeNet\nright-pass\n",
        "the network is kept"
    );
}

/// Every operator job of the pages, driven in a real browser as an operator does them, one
/// after the other on one product: create and rename it and make it a new API key, a group
/// with its configuration (a refused one keeps what was typed) renamed and another deleted,
/// a device registered, verified, caught by a filter and blocked in bulk, moved and
/// re-passworded from its workspace; firmware uploaded and assigned; a rollout planned,
/// started, paused, resumed and cancelled; an account and an API token made, the token
/// revoked; then the device, the firmware and the product deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_jobs_in_a_real_browser() {
    let server = Server::start(Backend::Sqlite).await;
    let store = server.state.store();
    let browser = admin_in_a_browser(&server, "jo").await;
    let b = &browser;

    // Product: created (its key shown once), renamed.
    b.type_into("form[action='/products'] input[name=name]", "greenhouse")
        .await;
    b.click("form[action='/products'] button").await;
    b.wait_text("#api-key", "Shown this once").await;
    let pid = store.list_products().await.unwrap()[0].id;
    let here = format!("/products/{pid}");
    b.type_into("#product-name", "greenhouse two").await;
    b.click("#rename-product button").await;
    b.wait_text("#notice", "renamed to greenhouse two").await;
    b.wait_text("main h1", "greenhouse two").await;
    let first_key = store.get_product(pid).await.unwrap().api_key_digest;
    b.click("#rotate-key input[name=confirm]").await;
    b.click("#rotate-key button").await;
    b.wait_text("#notice", "a new API key was made").await;
    assert!(
        b.exists("#copy-key").await,
        "shown once, with its Copy button"
    );
    assert_ne!(
        store.get_product(pid).await.unwrap().api_key_digest,
        first_key
    );

    // A group, and its configuration: bad JSON is refused and kept as typed.
    // A group made through the product page's form; its id.
    let new_group = async |name: &str| {
        b.go(&server.url(&here)).await;
        b.type_into(
            &format!("form[action='{here}/groups'] input[name=name]"),
            name,
        )
        .await;
        b.click(&format!("form[action='{here}/groups'] button"))
            .await;
        b.wait_text("main", name).await;
        store
            .list_groups(pid)
            .await
            .unwrap()
            .into_iter()
            .find(|g| g.name == name)
            .unwrap()
            .id
    };
    let gid = new_group("north").await;
    b.go(&server.url(&format!("{here}/groups/{gid}"))).await;
    b.type_into("#config", "{\"interval\": ").await;
    b.click("#group-config button").await;
    b.wait_text("#error", "not valid JSON").await;
    assert_eq!(
        b.script("return document.querySelector('#config').value")
            .await,
        json!("{\"interval\": ")
    );
    b.type_into("#config", "{\"interval\": 60}").await;
    b.click("#group-config button").await;
    b.wait_text("#notice", "saved").await;
    assert_eq!(
        store.get_group(pid, gid).await.unwrap().config,
        json!({"interval": 60})
    );
    b.type_into("#group-rename input[name=name]", "north-east")
        .await;
    b.click("#group-rename button").await;
    b.wait_text("main h1", "Group north-east").await;
    let spare = new_group("spare").await;
    b.go(&server.url(&format!("{here}/groups/{spare}"))).await;
    b.click("#group-delete input[name=confirm]").await;
    b.click("#group-delete button").await;
    b.wait_text("main h1", "greenhouse two").await;
    assert!(store.get_group(pid, spare).await.is_err(), "deleted");

    // Devices: registered, verified, then blocked in bulk through a filter.
    for serial in ["gh-1", "gh-2"] {
        b.go(&server.url(&here)).await;
        b.type_into(
            &format!("form[action='{here}/devices'] input[name=serial]"),
            serial,
        )
        .await;
        b.type_into(
            &format!("form[action='{here}/devices'] input[name=password]"),
            "gh-pw-12345",
        )
        .await;
        b.click(&format!("form[action='{here}/devices'] button"))
            .await;
        b.wait_text("#devices", serial).await;
    }
    let row = format!("form[action='{here}/devices/gh-1/status']");
    b.click(&format!(
        "{row} option[value=verified], {row} option:nth-child(2)"
    ))
    .await;
    b.script(&format!(
        "const s = document.querySelector(\"{row} select\"); s.value = 'verified';"
    ))
    .await;
    b.click(&format!("{row} button")).await;
    b.wait_text("#notice", "gh-1 is now verified").await;
    assert_eq!(
        store.get_device(pid, "gh-1").await.unwrap().status.as_str(),
        "verified"
    );
    b.type_into("form[role=search] input[name=q]", "gh-2").await;
    b.click("form[role=search] button").await;
    b.wait_text("#device-count", "1 of 2").await;
    b.click("#bulk-action option[value=block]").await;
    b.click("#bulk-confirm").await;
    b.click("#bulk-apply").await;
    b.wait_text("#notice", "block 1 devices").await;
    assert_eq!(
        store.get_device(pid, "gh-2").await.unwrap().status.as_str(),
        "blocked"
    );
    assert_eq!(
        store.get_device(pid, "gh-1").await.unwrap().status.as_str(),
        "verified"
    );

    // From gh-1's workspace: moved to north, given a new password.
    b.go(&server.url(&format!("/workspace/{pid}/gh-1"))).await;
    b.click(&format!("#device-group option[value='{gid}']"))
        .await;
    b.click("#device-move").await;
    b.wait_text("#device-id", "gh-1").await;
    assert_eq!(store.get_device(pid, "gh-1").await.unwrap().group_id, gid);
    b.type_into("#device-password", "gh-pw-new-678").await;
    b.click("#device-set-password").await;
    b.wait_text("#device-id", "gh-1").await;
    bot_signs_in(&server, "gh-1", "gh-pw-new-678", true).await;

    // Firmware: two releases uploaded, the first assigned to north.
    for name in ["app-v1.bin", "app-v2.bin"] {
        b.go(&server.url(&here)).await;
        let id = b.find("#firmware-file").await;
        let path = support::fixtures().join(name);
        b.cmd(
            Method::POST,
            &format!("/element/{id}/value"),
            json!({"text": path.to_str().unwrap()}),
        )
        .await;
        b.click("#firmware-upload button").await;
        b.wait_text("#notice", "uploaded").await;
    }
    let firmware = store.list_firmware(pid).await.unwrap();
    let v1 = firmware.iter().find(|f| f.version == "1.0.0").unwrap().id;
    let v2 = firmware.iter().find(|f| f.version == "2.0.0").unwrap().id;
    let assign = format!("form[action='{here}/groups/{gid}/assign']");
    b.click(&format!(
        "{assign} select[name=firmware_id] option[value='{v1}']"
    ))
    .await;
    b.click(&format!("{assign} button")).await;
    b.wait_text("#notice", "firmware assigned").await;
    assert_eq!(
        store.get_group(pid, gid).await.unwrap().firmware_id,
        Some(v1)
    );

    // A rollout: planned (the dry run), started, paused, resumed, cancelled.
    b.click("#new-rollout").await;
    b.click(&format!(
        "#rollout-plan select[name=firmware_id] option[value='{v2}']"
    ))
    .await;
    b.click(&format!(
        "#rollout-plan select[name=group_id] option[value='{gid}']"
    ))
    .await;
    b.type_into("#rollout-plan input[name=stages]", "rest")
        .await;
    b.click("#rollout-plan button").await;
    b.wait_text("main", "firmware 2.0.0 to 1 devices").await;
    assert!(b.text("#dry-run").await.contains("gh-1"));
    b.click("#rollout-start input[name=confirm]").await;
    b.click("#start-rollout").await;
    b.wait_text("#rollout-state", "RUNNING").await;
    for (action, state) in [
        ("pause", "PAUSED"),
        ("resume", "RUNNING"),
        ("cancel", "CANCELLED"),
    ] {
        b.click("#action-confirm").await;
        b.click(&format!("#action-{action}")).await;
        b.wait_text("#rollout-state", state).await;
    }

    // An account (a viewer) and an API token.
    b.go(&server.url("/accounts")).await;
    b.type_into("#new-username", "vera").await;
    b.type_into("#new-password", "vera-pw-1234").await;
    b.click("#new-role option[value=viewer]").await;
    b.click("#create-account").await;
    b.wait_text("#notice", "account vera added (viewer)").await;
    b.click("#make-token button").await;
    b.wait_text("#new-token", "Shown this once").await;
    let token = b.text("#token-value").await;
    let r = server
        .http
        .get(server.url("/api/v1/products"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the token made on the page works");
    b.click("#tokens button.danger").await;
    b.wait_text("#notice", "token revoked").await;
    let r = server
        .http
        .get(server.url("/api/v1/products"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "revoked on the page");

    // Deletions: the device from its workspace, the unused firmware, then the product.
    b.go(&server.url(&format!("/workspace/{pid}/gh-2"))).await;
    b.click("#device-admin input[name=confirm]").await;
    b.click("#device-delete").await;
    b.wait_text("main h1", "greenhouse two").await;
    assert!(store.find_device(pid, "gh-2").await.unwrap().is_none());
    b.click(&format!("#delete-firmware option[value='{v2}']"))
        .await;
    b.click("#delete-firmware input[name=confirm]").await;
    b.click("#delete-firmware button").await;
    // The cancelled rollout still names it: refused, with the reason.
    b.wait_text("main h1", "Not deleted").await;
    assert!(
        b.text("main").await.contains("rollout"),
        "{}",
        b.text("main").await
    );
    assert!(
        store
            .list_firmware(pid)
            .await
            .unwrap()
            .iter()
            .any(|f| f.id == v2)
    );
    b.go(&server.url(&here)).await;
    b.type_into("#delete-product input[name=confirm_name]", "greenhouse two")
        .await;
    b.click("#delete-product button").await;
    b.wait_text("main h1", "Products").await;
    assert!(store.list_products().await.unwrap().is_empty());
    b.shot("operator-jobs-done").await;
    browser.quit().await;
    server.finish().await;
}
