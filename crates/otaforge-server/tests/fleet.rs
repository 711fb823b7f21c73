//! Stories of operators and devices against a real server on a real port, on SQLite and
//! on PostgreSQL. Device requests are sent as the exact bytes the stock clients send.

mod support;

use otaforge_store::model::NewBuild;
use reqwest::Method;
use serde_json::{Value, json};
use support::{
    Backend, Server, esp8266_bin, esp8266_request, http_update_request, md5_hex, otadrive_request,
};

/// Every header line of an answer is `Name: value` with exactly one space after the colon,
/// and the status line starts `HTTP/1.1 ` (the OTAdrive client reads both at fixed offsets).
fn assert_fixed_offset_friendly(head: &str) {
    assert!(head.starts_with("HTTP/1.1 "), "status line: {head}");
    for line in head.split("\r\n").skip(1) {
        let (_, value) = line.split_once(':').unwrap();
        assert!(
            value.starts_with(' ') && !value.starts_with("  "),
            "header line {line:?} must have exactly one space after the colon"
        );
    }
}

async fn otadrive_update_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, key, default_group) = server.product("thermostat").await;
    let image = support::fixture("app-v2.bin");
    let serial = "3021c40a24";
    let update = |v: &str| format!("/deviceapi/update?k={key}&v={v}&s={serial}");

    // Unknown device: 401, and it now shows up in Default as New.
    let r = server
        .raw(&otadrive_request("HEAD", &update("1.0.0"), ""))
        .await;
    assert_eq!(r.status, 401);
    let (_, devices) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices"),
            None,
        )
        .await;
    let device = devices["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["serial"] == serial)
        .unwrap();
    assert_eq!(device["status"], "new");
    assert_eq!(device["group_id"], default_group);

    // Wrong API key: 401.
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/update?k=wrong&v=1&s={serial}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 401);

    // Verified, but no firmware assigned: 404.
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/{serial}"),
            Some(json!({"status": "verified"})),
        )
        .await;
    assert_eq!(status, 200);
    let r = server
        .raw(&otadrive_request("GET", &update("1.0.0"), ""))
        .await;
    assert_eq!(r.status, 404);

    // Upload the esptool-made image: its version comes from esp_app_desc_t.
    let (status, fw) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), image.clone())
        .await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(fw["version"], "2.0.0");
    assert_eq!(fw["format"], "esp32-app");
    assert_eq!(fw["md5"], md5_hex(&image));
    assert_eq!(fw["metadata"]["chip"], "esp32c3");
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;
    assert_eq!(status, 200);

    // The client's sequence: HEAD, then bytes=0-15, then 32 KiB ranges.
    let head = server
        .raw(&otadrive_request("HEAD", &update("1.0.0"), ""))
        .await;
    assert_eq!(head.status, 200);
    assert_fixed_offset_friendly(&head.head);
    assert_eq!(
        head.header("content-length").unwrap(),
        image.len().to_string()
    );
    assert_eq!(head.header("x-version").unwrap(), "2.0.0");
    assert!(head.body.is_empty());
    let first = server
        .raw(&otadrive_request(
            "GET",
            &update("1.0.0"),
            "Range: bytes=0-15\r\n",
        ))
        .await;
    assert_eq!(first.status, 206);
    assert_fixed_offset_friendly(&first.head);
    assert_eq!(first.body.len(), 16);
    assert_eq!(first.body[0], 0xE9);
    assert_eq!(first.header("x-md5").unwrap(), md5_hex(&image));
    assert_eq!(
        first.header("content-range").unwrap(),
        format!("bytes 0-15/{}", image.len())
    );
    let mut received = Vec::new();
    while received.len() < image.len() {
        let start = received.len();
        let end = (start + 32 * 1024).min(image.len()) - 1;
        let part = server
            .raw(&otadrive_request(
                "GET",
                &update("1.0.0"),
                &format!("Range: bytes={start}-{end}\r\n"),
            ))
            .await;
        assert_eq!(part.status, 206);
        assert_eq!(
            part.header("content-range").unwrap(),
            format!("bytes {start}-{end}/{}", image.len())
        );
        assert_eq!(
            part.header("content-length").unwrap(),
            (end - start + 1).to_string()
        );
        assert!(part.header("transfer-encoding").is_none());
        received.extend_from_slice(&part.body);
    }
    assert_eq!(
        received, image,
        "the bytes received equal the file uploaded"
    );

    // Past the end: 416 with the total.
    let r = server
        .raw(&otadrive_request(
            "GET",
            &update("1.0.0"),
            &format!("Range: bytes={}-\r\n", image.len()),
        ))
        .await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range").unwrap(),
        format!("bytes */{}", image.len())
    );

    // Same version: 304. Case-insensitive path as seen in the field.
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/DeviceApi/Update?k={key}&v=2.0.0&s={serial}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());

    // MD5 mode: the running sketch's MD5 decides, not the version string.
    let md5_headers = format!(
        "x-check-sketch-md5: 1\r\nx-ESP32-sketch-md5: {}\r\n",
        md5_hex(&image)
    );
    let r = server
        .raw(&otadrive_request("GET", &update("0.0.1"), &md5_headers))
        .await;
    assert_eq!(r.status, 304);
    let other_md5 =
        "x-check-sketch-md5: 1\r\nx-ESP32-sketch-md5: 00000000000000000000000000000000\r\n";
    let r = server
        .raw(&otadrive_request("HEAD", &update("2.0.0"), other_md5))
        .await;
    assert_eq!(r.status, 200);

    // After flashing, alive reports the new version; the server remembers what it heard.
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/alive?k={key}&v=2.0.0&s={serial}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 200);
    let (_, device) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/{serial}"),
            None,
        )
        .await;
    assert_eq!(device["version"], "2.0.0");
    assert_eq!(device["sta_mac"], "24:0A:C4:01:02:03");
    assert_eq!(device["free_space"], 1310720);
    assert_eq!(device["chip_size"], 4194304);
    assert!(device["last_seen"].as_i64().unwrap() > 0);

    // Blocked devices are refused like unverified ones.
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/{serial}"),
            Some(json!({"status": "blocked"})),
        )
        .await;
    let r = server
        .raw(&otadrive_request("GET", &update("1.0.0"), ""))
        .await;
    assert_eq!(r.status, 401);
    server.finish().await;
}
on_both_backends!(otadrive_update, otadrive_update_story);

async fn static_link_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _key, default_group) = server.product("robots").await;
    let (status, device) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "bot_001", "password": "12345"})),
        )
        .await;
    assert_eq!(status, 201, "{device}");
    assert_eq!(device["status"], "verified");
    let link = device["firmware_url"].as_str().unwrap().to_string();
    assert!(link.starts_with(&server.base), "{link}");
    let path = link.strip_prefix(&server.base).unwrap().to_string();
    let old_md5 = "0123456789abcdef0123456789abcdef";

    // Nothing assigned yet: 404.
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            old_md5,
            None,
        ))
        .await;
    assert_eq!(r.status, 404);

    let v1 = support::fixture("app-v1.bin");
    let (_, fw1) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), v1.clone())
        .await;
    assert_eq!(fw1["version"], "1.0.0");
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": fw1["id"]})),
        )
        .await;

    // The stock client: 200, Content-Length, lowercase x-MD5, never chunked, first byte 0xE9.
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            old_md5,
            None,
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").unwrap(), v1.len().to_string());
    let md5 = r.header("x-md5").unwrap();
    assert_eq!(md5, md5_hex(&v1));
    assert!(
        md5.len() == 32
            && md5
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert!(r.header("transfer-encoding").is_none());
    assert_eq!(r.body, v1);
    assert_eq!(r.body[0], 0xE9);

    // Running that sketch now: 304, by MD5 and by version header.
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            &md5_hex(&v1),
            None,
        ))
        .await;
    assert_eq!(r.status, 304);
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            old_md5,
            Some("1.0.0"),
        ))
        .await;
    assert_eq!(r.status, 304);

    // The same link serves the next firmware once it is assigned.
    let v2 = support::fixture("app-v2.bin");
    let (_, fw2) = server
        .upload(&format!("/api/v1/products/{pid}/firmware"), v2.clone())
        .await;
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": fw2["id"]})),
        )
        .await;
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            &md5_hex(&v1),
            None,
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, v2);

    // Wrong or missing credentials: 401; another device's password: 401.
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "54321")),
            old_md5,
            None,
        ))
        .await;
    assert_eq!(r.status, 401);
    let r = server
        .raw(&http_update_request(&path, None, old_md5, None))
        .await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").unwrap().starts_with("Basic"));
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_002", "12345")),
            old_md5,
            None,
        ))
        .await;
    assert_eq!(r.status, 401);

    // An ESP8266 (its header set says so) is never offered this ESP32-C3 image, not even
    // its version: a clear refusal instead.
    let req = {
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode("bot_001:12345");
        format!(
            "GET {path} HTTP/1.0\r\nHost: x\r\nUser-Agent: ESP8266-http-Update\r\nx-ESP8266-Chip-ID: 1234567\r\n\
             x-ESP8266-mode: version\r\nAuthorization: Basic {token}\r\nConnection: close\r\n\r\n"
        )
    };
    let r = server.raw(req.as_bytes()).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("esp32"), "{}", r.text());

    // Blocked: 403.
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/bot_001"),
            Some(json!({"status": "blocked"})),
        )
        .await;
    let r = server
        .raw(&http_update_request(
            &path,
            Some(("bot_001", "12345")),
            old_md5,
            None,
        ))
        .await;
    assert_eq!(r.status, 403);
    server.finish().await;
}
on_both_backends!(static_link, static_link_story);

async fn config_and_resources_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, key, _) = server.product("sensors").await;
    let (status, group) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/groups"),
            Some(json!({"name": "beta"})),
        )
        .await;
    assert_eq!(status, 201);
    let gid = group["id"].as_i64().unwrap();
    server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "8c4b14aabbcc", "group_id": gid})),
        )
        .await;
    let config =
        json!({"interval": 30, "alarm": {"number": "+100200", "enabled": true}, "name": "lab"});
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{gid}"),
            Some(json!({"config": config})),
        )
        .await;
    assert_eq!(status, 200);
    let q = format!("k={key}&v=1.0&s=8c4b14aabbcc");
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/getconfig?{q}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 200);
    let got: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(got, config);
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/config?plain&{q}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "alarm.enabled=true",
            "alarm.number=+100200",
            "interval=30",
            "name=lab"
        ]
    );

    let (status, res) = server
        .upload(
            &format!("/api/v1/products/{pid}/groups/{gid}/resources?name=page.html"),
            b"<h1>hi</h1>".to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{res}");
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/resource/list?plain&{q}"),
            "",
        ))
        .await;
    let text = String::from_utf8(r.body).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "page.html",
            res["fk"].as_str().unwrap(),
            md5_hex(b"<h1>hi</h1>").as_str()
        ]
    );
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!(
                "/deviceapi/resource/get?fk={}&{q}",
                res["fk"].as_str().unwrap()
            ),
            "",
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"<h1>hi</h1>");
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/resource/get?fk=nope&{q}"),
            "",
        ))
        .await;
    assert_eq!(r.status, 404);
    server.finish().await;
}
on_both_backends!(config_and_resources, config_and_resources_story);

async fn uploads_are_checked_story(backend: Backend) {
    let server = Server::start_with(
        backend,
        support::Options {
            max_upload_bytes: 600 * 1024,
            ..Default::default()
        },
    )
    .await;
    let (pid, _, _) = server.product("checked").await;
    let fw_path = format!("/api/v1/products/{pid}/firmware");
    let mut corrupted = support::fixture("app-v1.bin");
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0x40;
    let (status, body) = server.upload(&fw_path, corrupted).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("corrupted"),
        "{body}"
    );

    // A truncated image names what is wrong too.
    let truncated = support::fixture("app-v1.bin")[..100].to_vec();
    let (status, body) = server.upload(&fw_path, truncated).await;
    assert_eq!(status, 422, "{body}");

    // Raw bytes need an explicit version.
    let (status, body) = server.upload(&fw_path, b"\x00plain bytes".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("?version"),
        "{body}"
    );
    let (status, body) = server
        .upload(
            &format!("{fw_path}?version=0.1-raw"),
            b"\x00plain bytes".to_vec(),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["format"], "raw");

    // Same version again: 409. Empty: 400. Over the limit: 413.
    let (status, _) = server
        .upload(&format!("{fw_path}?version=0.1-raw"), b"\x00other".to_vec())
        .await;
    assert_eq!(status, 409);
    let (status, _) = server
        .upload(&format!("{fw_path}?version=e"), Vec::new())
        .await;
    assert_eq!(status, 400);
    // Over the limit: 413 from the declared length, before any body byte is read...
    let head = format!(
        "POST {fw_path}?version=big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        support::TOKEN,
        700 * 1024
    );
    let r = server.raw(head.as_bytes()).await;
    assert_eq!(r.status, 413);
    // ...and, for a chunked body with no length, as soon as the bytes read pass the limit.
    let r = support::raw_streaming(
        server.addr,
        format!(
            "POST {fw_path}?version=big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            support::TOKEN
        )
        .into_bytes(),
        (0..64).map(|_| {
            let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
            chunk.extend(std::iter::repeat_n(0u8, 64 * 1024));
            chunk.extend_from_slice(b"\r\n");
            chunk
        }),
    )
    .await;
    assert_eq!(r.status, 413);

    // Nothing of the refused uploads stayed: one firmware, one blob.
    let (_, list) = server.call(Method::GET, &fw_path, None).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    let blobs = count_files(&server.data_dir.join("blobs"));
    assert_eq!(blobs, 1, "only the accepted upload's blob is stored");
    server.finish().await;
}
on_both_backends!(uploads_are_checked, uploads_are_checked_story);

fn count_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

async fn bad_input_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, key, _) = server.product("bad").await;
    let send = |method: &str, path: &str, headers: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
            support::TOKEN,
            body.len()
        )
        .into_bytes()
    };
    let json = "Content-Type: application/json\r\n";
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (send("POST", "/api/v1/products", json, "{not json"), 400),
        (send("POST", "/api/v1/products", json, "{\"name\": 12}"), 422),
        (send("POST", "/api/v1/products", json, "{\"name\": \"\"}"), 422),
        (send("POST", "/api/v1/products", json, "{\"name\": \"x\", \"extra\": 1}"), 422),
        (send("POST", "/api/v1/products", "", "{\"name\": \"x\"}"), 415),
        (send("GET", "/api/v1/products/abc", "", ""), 400),
        (send("GET", "/api/v1/products/99999999999999999999999", "", ""), 400),
        (send("GET", "/api/v1/products/424242", "", ""), 404),
        (send("GET", "/api/v1/nothing/here", "", ""), 404),
        (send("PATCH", &format!("/api/v1/products/{pid}/devices/nobody"), json, "{\"status\": \"verified\"}"), 404),
        (send("PATCH", &format!("/api/v1/products/{pid}/devices/nobody"), json, "{\"status\": \"sleepy\"}"), 422),
        (send("POST", &format!("/api/v1/products/{pid}/devices"), json, "{\"serial\": \"has space\"}"), 422),
        (send("POST", &format!("/api/v1/products/{pid}/firmware"), "Content-Length: 99999999999\r\n", ""), 400),
        (send("GET", &format!("/deviceapi/update?k={key}&v=1"), "", ""), 400),
        (send("GET", &format!("/deviceapi/update?k={key}&s=abc&v=1"), "Range: bytes=zz\r\n", ""), 401),
        (b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), 401),
        (b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n".to_vec(), 401),
    ];
    for (request, expected) in cases {
        let r = server.raw(&request).await;
        assert_eq!(
            r.status,
            expected,
            "{}\n-> {}",
            String::from_utf8_lossy(&request),
            String::from_utf8_lossy(&r.body)
        );
        if r.status >= 400 && r.header("content-type") == Some("application/json") {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert!(body["error"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    // Non-UTF-8 device header: 400 naming it.
    let mut request =
        format!("GET /deviceapi/update?k={key}&v=1&s=abc HTTP/1.1\r\nHost: x\r\nx-ESP32-version: ")
            .into_bytes();
    request.extend_from_slice(&[0xff, 0xfe]);
    request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let r = server.raw(&request).await;
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("x-esp32-version"));

    // A malformed range on a real download: 400, not the whole file.
    let (_, fw) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version=1"),
            b"\x00abc".to_vec(),
        )
        .await;
    let r = server
        .raw(&send(
            "GET",
            &format!("/api/v1/products/{pid}/firmware/{}/download", fw["id"]),
            "Range: bytes=9-2\r\n",
            "",
        ))
        .await;
    assert_eq!(r.status, 400);
    server.finish().await;
}
on_both_backends!(bad_input, bad_input_story);

async fn shutdown_keeps_reports_story(backend: Backend) {
    // A flush interval longer than the test: only the shutdown writes the report.
    let server = Server::start_with(
        backend,
        support::Options {
            telemetry_flush_interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await;
    let (pid, key, _) = server.product("durable").await;
    server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "d1"})),
        )
        .await;
    let r = server
        .raw(&otadrive_request(
            "GET",
            &format!("/deviceapi/update?k={key}&v=7.7.7&s=d1"),
            "",
        ))
        .await;
    assert_eq!(r.status, 404);
    // The poll touched memory only: the database does not know the version yet.
    let before = server.state.store().get_device(pid, "d1").await.unwrap();
    assert_eq!(before.telemetry.version, None);
    // Stop: the report is still in memory and must be written on the way out.
    let data_dir = server.data_dir.clone();
    let url = server.state.config().database_url.clone();
    let (_, _) = server.stop().await;
    let reopened = Server::start_with(
        backend,
        support::Options {
            data_dir: Some(data_dir),
            database_url: url,
            ..Default::default()
        },
    )
    .await;
    let device = reopened.state.store().get_device(pid, "d1").await.unwrap();
    assert_eq!(device.telemetry.version.as_deref(), Some("7.7.7"));
    assert_eq!(
        device.telemetry.sta_mac.as_deref(),
        Some("24:0A:C4:01:02:03")
    );
    reopened.finish().await;
}
on_both_backends!(shutdown_keeps_reports, shutdown_keeps_reports_story);

async fn management_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, default_group) = server.product("mgmt").await;
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/products",
            Some(json!({"name": "mgmt"})),
        )
        .await;
    assert_eq!(status, 409);
    // The Default group cannot be deleted; another group can, its devices move to Default.
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            None,
        )
        .await;
    assert_eq!(status, 409);
    let (_, g) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/groups"),
            Some(json!({"name": "canary"})),
        )
        .await;
    let gid = g["id"].as_i64().unwrap();
    server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "c1", "group_id": gid})),
        )
        .await;
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/groups/{gid}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (_, d) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/c1"),
            None,
        )
        .await;
    assert_eq!(d["group_id"], default_group);
    // A device in a group of another product is refused.
    let (other, _, other_group) = server.product("other").await;
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/c1"),
            Some(json!({"group_id": other_group})),
        )
        .await;
    assert_eq!(status, 404);
    // Assigned firmware cannot be deleted until unassigned.
    let (_, fw) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version=9"),
            b"\x00x".to_vec(),
        )
        .await;
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/firmware/{}", fw["id"]),
            None,
        )
        .await;
    assert_eq!(status, 409);
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": null})),
        )
        .await;
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/firmware/{}", fw["id"]),
            None,
        )
        .await;
    assert_eq!(status, 204);
    // Firmware of another product cannot be assigned.
    let (_, ofw) = server
        .upload(
            &format!("/api/v1/products/{other}/firmware?version=1"),
            b"\x00y".to_vec(),
        )
        .await;
    let (status, _) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": ofw["id"]})),
        )
        .await;
    assert_eq!(status, 404);
    // Deleting a product removes everything in it.
    let (status, _) = server
        .call(Method::DELETE, &format!("/api/v1/products/{other}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = server
        .call(Method::GET, &format!("/api/v1/products/{other}"), None)
        .await;
    assert_eq!(status, 404);
    // Login issues tokens that work.
    let (status, _) = server
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(json!({"username": "admin", "password": "wrong"})),
        )
        .await;
    assert_eq!(status, 401);
    // The OpenAPI document describes every management route.
    let (status, doc) = server.call(Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(status, 200);
    for path in [
        "/api/v1/products",
        "/api/v1/products/{product}/groups/{group}",
        "/api/v1/products/{product}/devices/{serial}",
        "/api/v1/products/{product}/firmware",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    server.finish().await;
}
on_both_backends!(management, management_story);

fn xz(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = std::process::Command::new("xz")
        .args(["-c", "--check=crc32", "-6"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("xz (xz-utils) is needed to make W800 OTA images");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    out.stdout
}

async fn w800_uploads_story(backend: Backend) {
    use otaforge_formats::w800::{COMPRESS_XZ, W800Header, build_image};
    let server = Server::start(backend).await;
    let (pid, _, _) = server.product("w800").await;
    let fw_path = format!("/api/v1/products/{pid}/firmware");
    let app: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let header = W800Header {
        version: "2.1.0".into(),
        ..W800Header::default()
    };
    let img = build_image(&header, &app).unwrap();
    let (status, body) = server.upload(&fw_path, img.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["format"], "w800-img");
    assert_eq!(body["version"], "2.1.0");
    assert_eq!(body["metadata"]["chip"], "w800");

    // The OTA image: the xz of the whole .img under a new header marked xz.
    let ota_header = W800Header {
        version: "2.2.0".into(),
        compress_type: COMPRESS_XZ,
        ..W800Header::default()
    };
    let ota = build_image(&ota_header, &xz(&img)).unwrap();
    let (status, body) = server.upload(&fw_path, ota.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["format"], "w800-xz");
    assert_eq!(body["metadata"]["xz"], true);

    // A flipped payload byte breaks org_checksum: 422 naming the checksum.
    let mut bad = img.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let (status, body) = server
        .upload(&format!("{fw_path}?version=9.9.9"), bad)
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("checksum"),
        "{body}"
    );
    // A flipped header byte breaks hd_checksum.
    let mut bad = img;
    bad[40] ^= 1;
    let (status, body) = server
        .upload(&format!("{fw_path}?version=9.9.8"), bad)
        .await;
    assert_eq!(status, 422, "{body}");
    server.finish().await;
}
on_both_backends!(w800_uploads, w800_uploads_story);

/// The rules the real ESP8266 client needs, decided once and the same on both dialects:
/// filesystem requests never get the sketch, version-only requests get the version (also
/// when current), a signed image counts as installed by the MD5 the board reports, an image
/// for another chip family is refused visibly, and a personal build reaches only its device.
async fn esp8266_rules_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, key, default_group) = server.product("plugs").await;
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "10606726", "password": "plug-pw"})),
        )
        .await;
    assert_eq!(status, 201);
    let link = format!("/ota/{pid}/10606726");
    let auth = Some(("10606726", "plug-pw"));

    // A signed image: the .bin, a 256-byte signature, its length as a little-endian u32.
    let unsigned = esp8266_bin(0x42);
    let mut signed = unsigned.clone();
    signed.extend_from_slice(&[0xA5; 256]);
    signed.extend_from_slice(&256u32.to_le_bytes());
    let (status, fw) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version=1.0.0"),
            signed.clone(),
        )
        .await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(fw["metadata"]["chip"], "esp8266");
    assert_eq!(fw["metadata"]["signed"], true);
    assert_eq!(fw["metadata"]["installed_md5"], md5_hex(&unsigned));
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;

    let old_md5 = "0123456789abcdef0123456789abcdef";
    // mode sketch: the whole signed file, x-MD5 of the bytes sent.
    let r = server
        .raw(&esp8266_request(&link, "sketch", old_md5, auth))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, signed);
    assert_eq!(r.header("x-md5").unwrap(), md5_hex(&signed));
    // After installing, the board reports the MD5 of the unsigned part: up to date, on
    // the static link and on OTAdrive's MD5 matcher alike.
    let r = server
        .raw(&esp8266_request(&link, "sketch", &md5_hex(&unsigned), auth))
        .await;
    assert_eq!(r.status, 304, "{}", r.text());
    let otadrive = |mode: &str, md5: &str| {
        format!(
            "GET /deviceapi/update?k={key}&v=0.9&s=10606726 HTTP/1.1\r\nHost: x\r\n\
             User-Agent: ESP8266-http-Update\r\nx-ESP8266-Chip-ID: 10606726\r\n\
             x-ESP8266-sketch-md5: {md5}\r\nx-ESP8266-mode: {mode}\r\nx-check-sketch-md5: 1\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let r = server.raw(&otadrive("sketch", &md5_hex(&unsigned))).await;
    assert_eq!(r.status, 304, "{}", r.text());
    let r = server.raw(&otadrive("sketch", old_md5)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, signed);

    // mode spiffs: never the sketch, on both dialects.
    let r = server
        .raw(&esp8266_request(&link, "spiffs", old_md5, auth))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.text().contains("filesystem"), "{}", r.text());
    let r = server.raw(&otadrive("spiffs", old_md5)).await;
    assert_eq!(r.status, 404, "{}", r.text());

    // mode version: 200, x-version, no body, also when the device is current.
    for md5 in [old_md5.to_string(), md5_hex(&unsigned)] {
        let r = server
            .raw(&esp8266_request(&link, "version", &md5, auth))
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-version").unwrap(), "1.0.0");
        assert_eq!(r.header("content-length").unwrap(), "0");
        assert!(r.body.is_empty());
        let r = server.raw(&otadrive("version", &md5)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-version").unwrap(), "1.0.0");
        assert!(r.body.is_empty());
    }

    // An ESP32 client asking for this ESP8266 image: refused on both dialects, and the
    // refusal is on the device's timeline (once).
    let esp32 = format!(
        "GET /deviceapi/update?k={key}&v=0.9&s=10606726 HTTP/1.1\r\nHost: x\r\n\
         User-Agent: ESP32-http-Update\r\nx-ESP32-STA-MAC: 24:0A:C4:01:02:03\r\n\
         x-ESP32-sketch-md5: {old_md5}\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..3 {
        let r = server.raw(esp32.as_bytes()).await;
        assert_eq!(r.status, 409, "{}", r.text());
        assert!(r.text().contains("esp8266"), "{}", r.text());
    }
    let r = server
        .raw(&http_update_request(&link, auth, old_md5, None))
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    let (_, events) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/10606726/events"),
            None,
        )
        .await;
    let refused: Vec<_> = events
        .get("items")
        .and_then(|i| i.as_array())
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "refused")
        .collect();
    assert_eq!(refused.len(), 1, "{events}");
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap()
            .contains("built for esp8266; the device announces esp32"),
        "{events}"
    );

    // A personal build (it embeds the device's secrets) is served on the device's own
    // authenticated link only; the product key + serial gets the group's firmware.
    let (status, _) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "10606727", "password": "other-pw"})),
        )
        .await;
    assert_eq!(status, 201);
    let device = server
        .state
        .store()
        .get_device(pid, "10606727")
        .await
        .unwrap();
    let personal_bytes = esp8266_bin(0x77);
    let personal = server
        .state
        .store_firmware_for(
            pid,
            personal_bytes.clone().into(),
            Some("build-1".into()),
            Some(device.id),
        )
        .await
        .unwrap();
    server
        .state
        .store()
        .set_device_firmware(device.id, Some(personal.id))
        .await
        .unwrap();
    let r = server
        .raw(&esp8266_request(
            &format!("/ota/{pid}/10606727"),
            "sketch",
            old_md5,
            Some(("10606727", "other-pw")),
        ))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, personal_bytes);
    let by_key = format!(
        "GET /deviceapi/update?k={key}&v=0.9&s=10606727 HTTP/1.1\r\nHost: x\r\n\
         x-ESP8266-Chip-ID: 10606727\r\nx-ESP8266-sketch-md5: {old_md5}\r\nConnection: close\r\n\r\n"
    );
    let r = server.raw(by_key.as_bytes()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body, signed,
        "the key and serial must not reach a personal build"
    );
    // The personal build cannot be handed to a group either.
    let (status, body) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{default_group}"),
            Some(json!({"firmware_id": personal.id})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    server.finish().await;
}
on_both_backends!(esp8266_rules, esp8266_rules_story);

/// A gzip upload (ESP8266 boards inflate it while flashing) is compared by the MD5 of the
/// inflated image, which is what the board reports once it runs it.
async fn gzip_upload_story(backend: Backend) {
    use std::io::Write;
    let server = Server::start(backend).await;
    let (pid, key, group) = server.product("lamps").await;
    let image = esp8266_bin(0x33);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&image).unwrap();
    let gz = gz.finish().unwrap();
    let (status, fw) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version=3.0.0"),
            gz.clone(),
        )
        .await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(fw["format"], "gzip");
    assert_eq!(fw["metadata"]["chip"], "esp8266");
    assert_eq!(fw["metadata"]["installed_md5"], md5_hex(&image));
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;
    server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "777"})),
        )
        .await;
    let poll = |md5: &str| {
        format!(
            "GET /deviceapi/update?k={key}&v=2.0.0&s=777 HTTP/1.1\r\nHost: x\r\n\
             x-ESP8266-Chip-ID: 777\r\nx-ESP8266-sketch-md5: {md5}\r\nx-check-sketch-md5: 1\r\n\
             Connection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let r = server.raw(&poll("0123456789abcdef0123456789abcdef")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, gz, "the compressed bytes, as uploaded");
    assert_eq!(
        r.header("x-md5").unwrap(),
        md5_hex(&gz),
        "x-MD5 is of the bytes sent"
    );
    let r = server.raw(&poll(&md5_hex(&image))).await;
    assert_eq!(r.status, 304, "running the inflated image: up to date");
    // A gzip file that is not valid gzip is refused, naming the problem.
    let mut broken = gz.clone();
    broken.truncate(gz.len() / 2);
    let (status, body) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version=3.0.1"),
            broken,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("gzip"), "{body}");
    server.finish().await;
}
on_both_backends!(gzip_upload, gzip_upload_story);

/// Bearer tokens expire, are listed without the secret, and can be revoked.
async fn tokens_story(backend: Backend) {
    let server = Server::start(backend).await;
    let hash = otaforge_server::auth::hash_password("op-pw").unwrap();
    server
        .state
        .store()
        .create_user("olga", &hash, otaforge_store::model::Role::Operator)
        .await
        .unwrap();
    let login = |days: Option<i64>| {
        let mut body = json!({"username": "olga", "password": "op-pw"});
        if let Some(d) = days {
            body["expires_in_days"] = json!(d);
        }
        server.call(Method::POST, "/api/v1/auth/login", Some(body))
    };
    let (status, body) = login(Some(0)).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = login(Some(2)).await;
    assert_eq!(status, 201, "{body}");
    let token = body["token"].as_str().unwrap().to_string();
    let expires = body["expires_at"].as_i64().unwrap();
    let now = otaforge_store::model::now_millis();
    assert!((expires - now - 2 * 86_400_000).abs() < 60_000, "{body}");

    let as_olga = |method: Method, path: &str| {
        server
            .http
            .request(method, server.url(path))
            .bearer_auth(&token)
            .send()
    };
    let listed: serde_json::Value = as_olga(Method::GET, "/api/v1/tokens")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mine = listed.as_array().unwrap();
    assert_eq!(mine.len(), 1, "{listed}");
    assert_eq!(mine[0]["username"], "olga");
    assert!(
        !listed.to_string().contains(&token),
        "never the token itself"
    );
    let id = mine[0]["id"].as_str().unwrap().to_string();

    // An expired token is refused.
    let old = "0123456789abcdef0123456789abcdef";
    let user = server
        .state
        .store()
        .user_by_name("olga")
        .await
        .unwrap()
        .unwrap();
    server
        .state
        .store()
        .create_token(&otaforge_server::auth::digest(old), user.id, now - 1_000)
        .await
        .unwrap();
    let r = server
        .http
        .get(server.url("/api/v1/products"))
        .bearer_auth(old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Revoked: the token stops working at once; a second revoke finds nothing.
    let r = as_olga(Method::DELETE, &format!("/api/v1/tokens/{id}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = as_olga(Method::GET, "/api/v1/products").await.unwrap();
    assert_eq!(r.status(), 401);
    let (status, _) = server
        .call(Method::DELETE, &format!("/api/v1/tokens/{id}"), None)
        .await;
    assert_eq!(status, 404);
    server.finish().await;
}
on_both_backends!(tokens, tokens_story);

/// Deleting what others refer to answers 409 naming the reference; deleting a product takes
/// everything that belongs to it, rollouts included (never a 500 from a foreign key).
async fn deletes_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, group) = server.product("garden").await;
    let (_, v1) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware"),
            support::fixture("app-v1.bin"),
        )
        .await;
    let (_, v2) = server
        .upload(
            &format!("/api/v1/products/{pid}/firmware"),
            support::fixture("app-v2.bin"),
        )
        .await;
    server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": v1["id"]})),
        )
        .await;
    for serial in ["g1", "g2", "g3"] {
        let (status, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let (status, rollout) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({
                "firmware_id": v2["id"],
                "target": {"group_id": group},
                "stages": [{"size": "rest"}]
            })),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/firmware/{}", v2["id"]),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("rollout"),
        "{body}"
    );
    let (status, body) = server
        .call(
            Method::DELETE,
            &format!("/api/v1/products/{pid}/firmware/{}", v1["id"]),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = server
        .call(Method::DELETE, &format!("/api/v1/products/{pid}"), None)
        .await;
    assert_eq!(status, 204, "{body}");
    let (status, _) = server
        .call(Method::GET, &format!("/api/v1/products/{pid}"), None)
        .await;
    assert_eq!(status, 404);
    // The audit log names who did it.
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let actions: Vec<&str> = audit
        .get("items")
        .and_then(|i| i.as_array())
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for action in [
        "created product",
        "uploaded firmware",
        "changed group",
        "registered device",
        "deleted product",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    server.finish().await;
}
on_both_backends!(deletes, deletes_story);

/// Device lists come in pages: 100 unless asked, a cursor to the next page, the filters and
/// the order the request names, a count on request; bad paging arguments are a 422 naming
/// them. The product page shows one page, how many devices match, and a link to the next.
async fn device_lists_are_paged_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, _) = server.product("paged").await;
    for i in 0..150 {
        let status = if i % 3 == 0 { "new" } else { "verified" };
        let (code, d) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": format!("unit-{i:03}"), "status": status})),
            )
            .await;
        assert_eq!(code, 201, "{d}");
    }
    let list = format!("/api/v1/products/{pid}/devices");
    let (code, first) = server.call(Method::GET, &list, None).await;
    assert_eq!(code, 200, "{first}");
    let items = first["items"].as_array().unwrap();
    assert_eq!(items.len(), 100);
    assert_eq!(items[0]["serial"], "unit-000");
    assert!(first.get("total").is_none(), "counted only on request");
    let next = first["next"].as_str().unwrap();
    let (_, rest) = server
        .call(Method::GET, &format!("{list}?cursor={next}"), None)
        .await;
    let rest = rest["items"].as_array().unwrap().clone();
    assert_eq!(rest.len(), 50);
    assert_eq!(rest[0]["serial"], "unit-100");
    let (_, counted) = server
        .call(
            Method::GET,
            &format!("{list}?status=new&count=true&limit=10&order=desc"),
            None,
        )
        .await;
    assert_eq!(counted["total"], 50, "{counted}");
    assert_eq!(counted["items"][0]["serial"], "unit-147");
    assert_eq!(counted["items"].as_array().unwrap().len(), 10);
    let (_, found) = server
        .call(Method::GET, &format!("{list}?q=T-12&count=true"), None)
        .await;
    assert_eq!(found["total"], 10, "unit-120 to unit-129: {found}");
    for (query, names, status) in [
        ("limit=0", "limit", 422),
        ("limit=1001", "limit", 422),
        ("cursor=not-a-cursor", "cursor", 422),
        ("order=sideways", "order", 422),
        ("sort=colour", "sort", 400),
    ] {
        let (code, e) = server
            .call(Method::GET, &format!("{list}?{query}"), None)
            .await;
        assert_eq!(code, status, "{query}: {e}");
        assert!(e.to_string().contains(names), "{query}: {e}");
    }
    // A cursor of one order does not continue another.
    let (code, e) = server
        .call(
            Method::GET,
            &format!("{list}?sort=created&cursor={next}"),
            None,
        )
        .await;
    assert_eq!(code, 422, "{e}");

    let cookie = server.operator_session("pager").await;
    let page = server
        .get_with_cookie(&format!("/products/{pid}"), &cookie)
        .await;
    let html = page.text();
    assert!(html.contains("150 of 150 devices"), "{html}");
    assert_eq!(
        html.matches("/workspace/").count(),
        100,
        "one page of devices"
    );
    let href = html
        .split("id=\"next-devices\" href=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let page = server.get_with_cookie(&href, &cookie).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert_eq!(html.matches("/workspace/").count(), 50);
    assert!(!html.contains("next-devices"), "the last page");
    let page = server
        .get_with_cookie(&format!("/products/{pid}?q=unit-14&status=new"), &cookie)
        .await;
    assert!(page.text().contains("3 of 150 devices"), "{}", page.text());
    server.finish().await;
}
on_both_backends!(device_lists_are_paged, device_lists_are_paged_story);

/// Walks a paged list to its end; returns every item and the number of pages.
async fn every_page(server: &Server, list: &str) -> (Vec<Value>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let sep = if list.contains('?') { '&' } else { '?' };
        let path = match &cursor {
            Some(c) => format!("{list}{sep}cursor={c}"),
            None => list.to_string(),
        };
        let (code, page) = server.call(Method::GET, &path, None).await;
        assert_eq!(code, 200, "{path}: {page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        pages += 1;
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return (items, pages),
        }
    }
}

/// Firmware, rollouts and builds come in pages too, newest first, narrowed by their filters.
async fn other_lists_are_paged_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, group) = server.product("lists").await;
    let fw = format!("/api/v1/products/{pid}/firmware");
    let mut ids = Vec::new();
    for image in ["app-v1.bin", "app-v2.bin"] {
        let (code, f) = server.upload(&fw, support::fixture(image)).await;
        assert_eq!(code, 201, "{f}");
        ids.push(f["id"].as_i64().unwrap());
    }
    for v in ["r1", "r2", "r3"] {
        let (code, f) = server
            .upload(
                &format!("{fw}?version={v}"),
                format!("\x00raw {v}").into_bytes(),
            )
            .await;
        assert_eq!(code, 201, "{f}");
        ids.push(f["id"].as_i64().unwrap());
    }
    let (all, pages) = every_page(&server, &format!("{fw}?limit=2")).await;
    assert_eq!(pages, 3);
    let seen: Vec<i64> = all.iter().map(|f| f["id"].as_i64().unwrap()).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    for (query, n) in [
        ("chip=esp32c3", 2),
        ("format=raw", 3),
        ("format=esp32-app&chip=esp32c3", 2),
        ("version=r2", 1),
        ("chip=esp8266", 0),
    ] {
        let (items, _) = every_page(&server, &format!("{fw}?{query}")).await;
        assert_eq!(items.len(), n, "{query}: {items:?}");
    }
    let (code, e) = server
        .call(Method::GET, &format!("{fw}?cursor=nope"), None)
        .await;
    assert_eq!(code, 422, "{e}");

    // Rollouts: one cancelled, one running.
    for serial in ["l1", "l2"] {
        let (code, _) = server
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial})),
            )
            .await;
        assert_eq!(code, 201);
    }
    let rollouts = format!("/api/v1/products/{pid}/rollouts");
    let mut rids = Vec::new();
    for _ in 0..2 {
        let (code, r) = server
            .call(
                Method::POST,
                &rollouts,
                Some(json!({"firmware_id": ids[1], "target": {"group_id": group},
                    "stages": [{"size": "rest"}]})),
            )
            .await;
        assert_eq!(code, 201, "{r}");
        let rid = r["id"].as_i64().unwrap();
        rids.push(rid);
        if rids.len() == 1 {
            let (code, r) = server
                .call(Method::POST, &format!("{rollouts}/{rid}/cancel"), None)
                .await;
            assert_eq!(code, 200, "{r}");
        }
    }
    let (all, pages) = every_page(&server, &format!("{rollouts}?limit=1")).await;
    assert_eq!(pages, 2);
    let seen: Vec<i64> = all.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(seen, [rids[1], rids[0]]);
    assert!(
        all[0]["stages"].is_array(),
        "items carry their stage counts"
    );
    for (state, want) in [("cancelled", rids[0]), ("running", rids[1])] {
        let (items, _) = every_page(&server, &format!("{rollouts}?state={state}")).await;
        assert_eq!(items.len(), 1, "{state}");
        assert_eq!(items[0]["id"], want, "{state}");
    }

    // Builds of a device.
    let device = server.state.store().get_device(pid, "l1").await.unwrap();
    let mut bids = Vec::new();
    for _ in 0..3 {
        let b = server
            .state
            .store()
            .create_build(NewBuild {
                product_id: Some(pid),
                device_id: Some(device.id),
                fqbn: "esp32:esp32:esp32".into(),
                files: Default::default(),
                requested_by: "test".into(),
            })
            .await
            .unwrap();
        bids.push(b.id);
    }
    let builds = format!("/api/v1/products/{pid}/devices/l1/builds");
    let (all, pages) = every_page(&server, &format!("{builds}?limit=2")).await;
    assert_eq!(pages, 2);
    let seen: Vec<i64> = all.iter().map(|b| b["id"].as_i64().unwrap()).collect();
    bids.reverse();
    assert_eq!(seen, bids);
    assert!(
        all[0].get("log").is_none(),
        "a list item leaves the log out"
    );
    let (queued, _) = every_page(&server, &format!("{builds}?status=queued")).await;
    assert_eq!(queued.len(), 3);
    let (done, _) = every_page(&server, &format!("{builds}?status=succeeded")).await;
    assert!(done.is_empty());
    let (code, _) = server
        .call(
            Method::GET,
            &format!("/api/v1/products/{pid}/devices/nobody/builds"),
            None,
        )
        .await;
    assert_eq!(code, 404);
    server.finish().await;
}
on_both_backends!(other_lists_are_paged, other_lists_are_paged_story);

/// A device's chip family is what its check-ins announce (the ESP32 client's header set, a
/// W800's `x-otaforge-chip`), and the device list filters by it.
async fn devices_by_chip_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, key, _) = server.product("chips").await;
    for i in 0..3 {
        let path = format!("/deviceapi/update?k={key}&v=1.0.0&s=esp-{i}");
        let r = server
            .raw(&support::otadrive_request("GET", &path, ""))
            .await;
        assert_eq!(r.status, 401, "a new device waits to be verified");
    }
    let w800 = format!(
        "GET /deviceapi/update?k={key}&v=1.0.0&s=w800-0 HTTP/1.1\r\nHost: x\r\n\
         x-otaforge-chip: w800\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(server.raw(w800.as_bytes()).await.status, 401);
    server.state.flush_telemetry().await.unwrap();
    let list = format!("/api/v1/products/{pid}/devices");
    for (chip, want) in [("esp32", 3), ("w800", 1), ("esp8266", 0)] {
        let (code, page) = server
            .call(Method::GET, &format!("{list}?chip={chip}&count=true"), None)
            .await;
        assert_eq!(code, 200, "{page}");
        assert_eq!(page["total"], want, "{chip}: {page}");
    }
    let (code, e) = server
        .call(Method::GET, &format!("{list}?chip=z80"), None)
        .await;
    assert_eq!(code, 422, "{e}");
    assert!(e.to_string().contains("chip"), "{e}");
    // Bulk changes take the same filter.
    let (code, done) = server
        .call(
            Method::POST,
            &format!("{list}/bulk"),
            Some(json!({"action": "verify", "filter": {"chip": "esp32"}})),
        )
        .await;
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["changed"], 3);
    server.finish().await;
}
on_both_backends!(devices_by_chip, devices_by_chip_story);

/// Devices come in by CSV (created, then updated on a re-run, never doubled), a file with any
/// bad row is refused whole with the faults by line, changes by filter reach exactly the
/// devices the filter takes, and the export streams every device.
async fn bulk_device_work_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, _) = server.product("bulk").await;
    let (status, lab) = server
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/groups"),
            Some(json!({"name": "lab"})),
        )
        .await;
    assert_eq!(status, 201, "{lab}");
    let key = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----";
    let mut csv = String::from("serial,group,status,token,public_key\n");
    for i in 0..1000 {
        let group = if i % 4 == 0 { "lab" } else { "" };
        let status = if i % 2 == 0 { "new" } else { "verified" };
        let token = if i < 2 {
            format!("tt-{i}")
        } else {
            String::new()
        };
        let public_key = if i == 7 {
            format!("\"{key}\"")
        } else {
            String::new()
        };
        csv.push_str(&format!(
            "imp-{i:04},{group},{status},{token},{public_key}\n"
        ));
    }
    let import = format!("/api/v1/products/{pid}/devices/import");
    let (status, outcome) = server.upload(&import, csv.clone().into_bytes()).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(
        outcome,
        json!({"rows": 1000, "created": 1000, "updated": 0})
    );
    let (status, again) = server.upload(&import, csv.into_bytes()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, json!({"rows": 1000, "created": 0, "updated": 1000}));
    let list = format!("/api/v1/products/{pid}/devices");
    let count = async |query: &str| {
        let (_, page) = server
            .call(
                Method::GET,
                &format!("{list}?count=true&limit=1&{query}"),
                None,
            )
            .await;
        page["total"].as_i64().unwrap()
    };
    assert_eq!(count("").await, 1000);
    assert_eq!(count(&format!("group={}", lab["id"])).await, 250);
    assert_eq!(count("status=new").await, 500);
    let (_, d) = server
        .call(Method::GET, &format!("{list}/imp-0001"), None)
        .await;
    assert_eq!(
        d["has_password"], true,
        "the token is the device's password: {d}"
    );

    // One bad file: nothing of it lands, every fault is named by its line.
    let bad = "serial,group,status\nfine-1,,verified\nbad/serial,,new\nfine-2,nowhere,new\nfine-3,,sideways\nfine-1,,new\n";
    let (status, e) = server.upload(&import, bad.as_bytes().to_vec()).await;
    assert_eq!(status, 422, "{e}");
    let text = e["error"].as_str().unwrap();
    for part in [
        "4 bad rows, nothing imported",
        "line 3:",
        "line 4: no group \"nowhere\"",
        "line 5: status \"sideways\"",
        "line 6: serial \"fine-1\" is on line 2 too",
    ] {
        assert!(text.contains(part), "{part} missing: {text}");
    }
    assert_eq!(count("").await, 1000, "nothing half-imported");
    let (status, e) = server
        .upload(&import, b"serial,colour\nx,red\n".to_vec())
        .await;
    assert_eq!(status, 422);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown column \"colour\""),
        "{e}"
    );

    // Changes by filter.
    let bulk = format!("/api/v1/products/{pid}/devices/bulk");
    let (status, done) = server
        .call(
            Method::POST,
            &bulk,
            Some(
                json!({"action": "verify", "filter": {"status": "new", "serial_prefix": "imp-00"}}),
            ),
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["changed"], 50, "imp-0000..imp-0099, every other one");
    assert_eq!(count("status=new").await, 450);
    let (_, done) = server
        .call(
            Method::POST,
            &bulk,
            Some(json!({"action": "move", "group_id": lab["id"], "filter": {"q": "-09"}})),
        )
        .await;
    assert_eq!(done["changed"], 100, "{done}");
    let (status, e) = server
        .call(Method::POST, &bulk, Some(json!({"action": "delete"})))
        .await;
    assert_eq!(status, 422, "an empty filter needs all: {e}");
    let (status, e) = server
        .call(Method::POST, &bulk, Some(json!({"action": "move"})))
        .await;
    assert_eq!(status, 422, "{e}");
    let (_, done) = server
        .call(
            Method::POST,
            &bulk,
            Some(json!({"action": "delete", "filter": {"serial_prefix": "imp-09"}})),
        )
        .await;
    assert_eq!(done["changed"], 100, "{done}");
    assert_eq!(count("").await, 900);

    // The export: a header and every device.
    let response = server
        .http
        .get(server.url(&format!("/api/v1/products/{pid}/devices/export")))
        .bearer_auth(support::TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let text = response.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "serial,group,status,version,last_seen,created_at");
    assert_eq!(lines.len(), 901);
    assert!(
        lines[1].starts_with("imp-0000,lab,verified,"),
        "{}",
        lines[1]
    );
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    let audit = audit.to_string();
    assert!(audit.contains("imported devices"), "{audit}");
    assert!(audit.contains("bulk deleted"), "{audit}");
    server.finish().await;
}
on_both_backends!(bulk_device_work, bulk_device_work_story);

/// Two servers on one database (as `serve` and `worker`, or two nodes) stay coherent though
/// each keeps devices in memory: an operator's change through one reaches the other's
/// check-ins within a second or two, and so does a device row one of them changed.
async fn caches_stay_coherent_across_processes_story(backend: Backend) {
    let a = Server::start(backend).await;
    let b = Server::start_with(
        backend,
        support::Options {
            data_dir: Some(a.data_dir.clone()),
            database_url: Some(a.state.config().database_url()),
            ..Default::default()
        },
    )
    .await;
    let (pid, key, group) = a.product("shared").await;
    let image = support::fixture("app-v2.bin");
    let (status, fw) = a
        .upload(&format!("/api/v1/products/{pid}/firmware"), image)
        .await;
    assert_eq!(status, 201, "{fw}");
    let (status, _) = a
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": fw["id"]})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = a
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/devices"),
            Some(json!({"serial": "both-1", "status": "verified"})),
        )
        .await;
    assert_eq!(status, 201);
    let poll = format!("/deviceapi/update?k={key}&v=2.0.0&s=both-1");
    let on_b = async || b.raw(&otadrive_request("HEAD", &poll, "")).await.status;
    assert_eq!(on_b().await, 304, "B answers from its cache from now on");
    let (status, _) = a
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/devices/both-1"),
            Some(json!({"status": "blocked"})),
        )
        .await;
    assert_eq!(status, 200);
    let start = std::time::Instant::now();
    while on_b().await != 401 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "B still answers from a stale cache"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "{took:?}");
    b.finish().await;
    a.finish().await;
}
on_both_backends!(
    caches_stay_coherent_across_processes,
    caches_stay_coherent_across_processes_story
);

/// A device a rollout moved on through one node is never offered its old image by another
/// whose book of live rollouts has not caught up yet: here B applies others' changes only
/// once an hour, so it learns of A's rollout only when the usual assignment would move the
/// device off what it runs.
async fn a_stale_node_does_not_undo_a_rollout_story(backend: Backend) {
    let a = Server::start(backend).await;
    let b = Server::start_with(
        backend,
        support::Options {
            data_dir: Some(a.data_dir.clone()),
            database_url: Some(a.state.config().database_url()),
            sync_interval: std::time::Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await;
    let (pid, key, group) = a.product("stale").await;
    let ids = a.two_releases(pid, group).await;
    for serial in ["s-1", "s-2"] {
        let (status, _) = a
            .call(
                Method::POST,
                &format!("/api/v1/products/{pid}/devices"),
                Some(json!({"serial": serial, "status": "verified"})),
            )
            .await;
        assert_eq!(status, 201);
    }
    let poll = |version: &str, serial: &str| {
        otadrive_request(
            "GET",
            &format!("/deviceapi/update?k={key}&v={version}&s={serial}"),
            "",
        )
    };
    assert_eq!(b.raw(&poll("1.0.0", "s-1")).await.status, 304);
    let (status, rollout) = a
        .call(
            Method::POST,
            &format!("/api/v1/products/{pid}/rollouts"),
            Some(json!({
                "firmware_id": ids[1],
                "target": {"group_id": group},
                "stages": [{"size": {"count": 2}}]
            })),
        )
        .await;
    assert_eq!(status, 201, "{rollout}");
    let offer = a.raw(&poll("1.0.0", "s-1")).await;
    assert_eq!(offer.status, 200, "A offers the rollout's image");
    assert_eq!(offer.body, support::fixture("app-v2.bin"));
    // Installed, the device asks B, which has not heard of the rollout.
    let after = b.raw(&poll("2.0.0", "s-1")).await;
    assert_eq!(after.status, 304, "B offered {} bytes", after.body.len());
    // B caught up: the other member is offered the rollout's image by B too.
    let other = b.raw(&poll("1.0.0", "s-2")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body, support::fixture("app-v2.bin"));
    b.finish().await;
    a.finish().await;
}
on_both_backends!(
    a_stale_node_does_not_undo_a_rollout,
    a_stale_node_does_not_undo_a_rollout_story
);

/// The product page lists the newest firmware and rollouts a page at a time, with a link to
/// the older; a group's choice of firmware still names what it has, however old.
async fn product_page_pages_firmware_story(backend: Backend) {
    let server = Server::start(backend).await;
    let (pid, _, group) = server.product("long history").await;
    let fw = format!("/api/v1/products/{pid}/firmware");
    let mut ids = Vec::new();
    for i in 0..25 {
        let (code, f) = server
            .upload(
                &format!("{fw}?version=v{i:02}"),
                format!("\x00raw image {i}").into_bytes(),
            )
            .await;
        assert_eq!(code, 201, "{f}");
        ids.push(f["id"].as_i64().unwrap());
    }
    let (code, g) = server
        .call(
            Method::PATCH,
            &format!("/api/v1/products/{pid}/groups/{group}"),
            Some(json!({"firmware_id": ids[0]})),
        )
        .await;
    assert_eq!(code, 200, "{g}");
    let cookie = server.operator_session("historian").await;
    let html = server
        .get_with_cookie(&format!("/products/{pid}"), &cookie)
        .await
        .text();
    let listed = |html: &str| -> Vec<String> {
        html.split("<h2>Firmware</h2>")
            .nth(1)
            .unwrap()
            .split("<td>v")
            .skip(1)
            .map(|t| format!("v{}", &t[..2]))
            .collect()
    };
    let first = listed(&html);
    assert_eq!(first.len(), 20, "{first:?}");
    assert_eq!(first[0], "v24", "newest first");
    assert_eq!(first[19], "v05");
    // The oldest image is on no page of the table yet, but the group's choice names it.
    assert!(html.contains(&format!(
        "<option value=\"{}\" selected>v00</option>",
        ids[0]
    )));
    let href = html
        .split("id=\"older-firmware\" href=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .expect("a link to the older firmware")
        .replace("&amp;", "&");
    let page = server.get_with_cookie(&href, &cookie).await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert_eq!(listed(&html), ["v04", "v03", "v02", "v01", "v00"]);
    assert!(!html.contains("older-firmware"), "the last page");
    assert!(!html.contains("older-rollouts"), "no rollouts at all");
    server.finish().await;
}
on_both_backends!(
    product_page_pages_firmware,
    product_page_pages_firmware_story
);

/// Uploads firmware to a product under a given version; the status and the answer.
async fn upload_as(server: &Server, pid: i64, bytes: Vec<u8>, version: &str) -> (u16, Value) {
    server
        .upload(
            &format!("/api/v1/products/{pid}/firmware?version={version}"),
            bytes,
        )
        .await
}

/// CRC-32 as zlib computes it (what a signature block's last word holds).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Runs a tool of the fixtures' esptool install (`espsecure` beside `esptool`).
fn esp_tool(name: &str, args: &[&str], dir: &std::path::Path) {
    let argv = std::fs::read_to_string(support::fixtures().join("image-info.argv")).unwrap();
    let esptool = std::path::PathBuf::from(argv.lines().next().unwrap());
    let sibling = esptool.with_file_name(name);
    let program = if sibling.exists() {
        sibling
    } else {
        name.into()
    };
    let out = std::process::Command::new(&program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program:?}: {e}"));
    assert!(
        out.status.success(),
        "{program:?} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Firmware signed for ESP-IDF Secure Boot V2 by espsecure (RSA-3072 and ECDSA P-256): each
/// block is verified on upload and its key digest shown, equal to espsecure's; a product that
/// lists firmware keys takes only images one of them signed: unsigned, tampered and
/// other-key (revoked) images are refused with a 422 naming the problem; a tampered
/// signature is refused by every product.
async fn signed_firmware_story(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = support::temp_dir("sbv2");
    let elf = support::fixtures().join("app-v1.elf");
    esp_tool(
        "esptool",
        &[
            "--chip",
            "esp32c3",
            "elf2image",
            "--secure-pad-v2",
            "-o",
            "app.bin",
            elf.to_str().unwrap(),
        ],
        &dir,
    );
    let mut digests = std::collections::BTreeMap::new();
    for (key, scheme) in [("rsa", "rsa3072"), ("ec", "ecdsa256"), ("old", "rsa3072")] {
        let pem = format!("{key}.pem");
        esp_tool(
            "espsecure",
            &[
                "generate-signing-key",
                "--version",
                "2",
                "--scheme",
                scheme,
                &pem,
            ],
            &dir,
        );
        esp_tool(
            "espsecure",
            &[
                "sign-data",
                "--version",
                "2",
                "--keyfile",
                &pem,
                "--output",
                &format!("{key}.bin"),
                "app.bin",
            ],
            &dir,
        );
        let dig = format!("{key}.dig");
        esp_tool(
            "espsecure",
            &[
                "digest-sbv2-public-key",
                "--keyfile",
                &pem,
                "--output",
                &dig,
            ],
            &dir,
        );
        digests.insert(key, hex::encode(std::fs::read(dir.join(&dig)).unwrap()));
    }
    // Two blocks: the old key's and the RSA key's.
    esp_tool(
        "espsecure",
        &[
            "sign-data",
            "--version",
            "2",
            "--keyfile",
            "rsa.pem",
            "--append-signatures",
            "--output",
            "both.bin",
            "old.bin",
        ],
        &dir,
    );
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    // Tampered: a reserved header byte changed and the image's own appended SHA-256 made
    // right again, so the image itself parses; only the signature tells.
    let mut tampered = read("rsa.bin");
    let sector = tampered.len() - 4096;
    tampered[20] ^= 0x01;
    let hash = {
        use sha2::Digest;
        sha2::Sha256::digest(&tampered[..sector - 32])
    };
    tampered[sector - 32..sector].copy_from_slice(&hash);
    // Changed and not re-hashed: the image's own check refuses it first.
    let mut broken = read("rsa.bin");
    broken[1000] ^= 0x01;
    // Forged: the signature changed and the block's CRC made right again.
    let mut forged = read("rsa.bin");
    forged[sector + 812 + 10] ^= 0x01;
    let crc = crc32(&forged[sector..sector + 1196]);
    forged[sector + 1196..sector + 1200].copy_from_slice(&crc.to_le_bytes());

    let (pid, _, _) = server.product("signed").await;
    let keys = format!("/api/v1/products/{pid}/firmware-keys");
    let (status, body) = server
        .call(
            Method::PUT,
            &keys,
            Some(json!({"digests": ["not-a-digest"]})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    // No keys yet: a good signature is shown, a tampered one refused.
    let (status, fw) = upload_as(&server, pid, read("rsa.bin"), "1.0.0").await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(
        fw["metadata"]["signatures"][0]["key_digest"], digests["rsa"],
        "{fw}"
    );
    assert_eq!(fw["metadata"]["signatures"][0]["scheme"], "rsa3072");
    assert_eq!(fw["metadata"]["signatures"][0]["verified"], true);
    let (status, body) = upload_as(&server, pid, tampered.clone(), "1.0.1").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("does not verify"),
        "{body}"
    );
    let (status, body) = upload_as(&server, pid, broken, "1.0.1").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("mismatch"),
        "{body}"
    );

    // Keys: the RSA and the ECDSA key.
    let (status, product) = server
        .call(
            Method::PUT,
            &keys,
            Some(json!({"digests": [digests["rsa"].to_uppercase(), digests["ec"]]})),
        )
        .await;
    assert_eq!(status, 200, "{product}");
    assert_eq!(
        product["firmware_keys"][0], digests["rsa"],
        "stored lowercase"
    );
    for (name, bytes, said) in [
        ("unsigned", read("app.bin"), "carries no signature"),
        (
            "other key",
            read("old.bin"),
            "not one of this product's firmware keys",
        ),
        ("tampered", tampered, "it signs other bytes"),
        ("forged", forged, "RSA-PSS signature does not match"),
    ] {
        let (status, body) = upload_as(&server, pid, bytes, "2.0.0").await;
        assert_eq!(status, 422, "{name}: {body}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(said), "{name}: {message}");
    }
    let (status, fw) = upload_as(&server, pid, read("ec.bin"), "2.0.1").await;
    assert_eq!(status, 201, "{fw}");
    assert_eq!(
        fw["metadata"]["signatures"][0]["key_digest"], digests["ec"],
        "{fw}"
    );
    assert_eq!(fw["metadata"]["signatures"][0]["scheme"], "ecdsa256");
    let (status, fw) = upload_as(&server, pid, read("both.bin"), "2.0.2").await;
    assert_eq!(status, 201, "{fw}");
    let blocks = fw["metadata"]["signatures"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{fw}");
    assert_eq!(blocks[0]["key_digest"], digests["old"]);
    assert_eq!(blocks[1]["key_digest"], digests["rsa"]);
    let (_, audit) = server.call(Method::GET, "/api/v1/audit", None).await;
    assert!(audit.to_string().contains("set firmware keys"), "{audit}");
    server.finish().await;
}
on_both_backends!(signed_firmware, signed_firmware_story);

/// Runs openssl in `dir`.
fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Images signed the way the Arduino cores' updaters check them, with keys and signatures
/// made by OpenSSL: the ESP8266 core's (RSA PKCS#1 v1.5 over the payload, then the
/// signature and its length) and arduino-esp32's `UPDATE_SIGN` (RSA-PSS with the largest
/// salt, or ECDSA P-256 in DER, zero-padded to 512 bytes). A product with public keys takes
/// only ESP8266 images signed with one of them and refuses any such signature that does not
/// verify; a product without keys takes them as they are.
async fn arduino_signed_images_story(backend: Backend) {
    let server = Server::start(backend).await;
    let dir = support::temp_dir("arduino-sign");
    for key in ["rsa", "other"] {
        openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                &format!("{key}.pem"),
            ],
            &dir,
        );
    }
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
        &dir,
    );
    for key in ["rsa", "other", "ec"] {
        openssl(
            &[
                "pkey",
                "-in",
                &format!("{key}.pem"),
                "-pubout",
                "-out",
                &format!("{key}.pub"),
            ],
            &dir,
        );
    }
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let sign = |key: &str, data: &[u8], pss: bool| -> Vec<u8> {
        std::fs::write(dir.join("data.bin"), data).unwrap();
        let mut args = vec!["dgst", "-sha256"];
        if pss {
            args.extend([
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:max",
            ]);
        }
        let pem = format!("{key}.pem");
        args.extend(["-sign", &pem, "-out", "sig.bin", "data.bin"]);
        openssl(&args, &dir);
        read("sig.bin")
    };
    let esp8266 = |key: &str| {
        let payload = esp8266_bin(0x33);
        let sig = sign(key, &payload, false);
        let mut signed = payload.clone();
        signed.extend_from_slice(&sig);
        signed.extend_from_slice(&(sig.len() as u32).to_le_bytes());
        signed
    };
    let esp32 = |key: &str, pss: bool| {
        let app = support::fixture("app-v1.bin");
        let mut sig = sign(key, &app, pss);
        sig.resize(512, 0);
        let mut signed = app;
        signed.extend_from_slice(&sig);
        signed
    };

    let (pid, _, _) = server.product("arduino-signed").await;
    let (status, body) = server
        .call(
            Method::PUT,
            &format!("/api/v1/products/{pid}/artifact-keys"),
            Some(json!({"keys": [
                String::from_utf8(read("rsa.pub")).unwrap(),
                String::from_utf8(read("ec.pub")).unwrap(),
            ]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut forged = esp8266("rsa");
    let at = forged.len() - 10;
    forged[at] ^= 0x01;
    for (name, bytes, said) in [
        (
            "unsigned ESP8266",
            esp8266_bin(0x33),
            "only signed ESP8266 images",
        ),
        ("ESP8266, another key", esp8266("other"), "does not verify"),
        ("ESP8266, signature changed", forged, "does not verify"),
        (
            "ESP32, another key",
            esp32("other", true),
            "does not verify",
        ),
    ] {
        let (status, body) = upload_as(&server, pid, bytes, "9.9.9").await;
        assert_eq!(status, 422, "{name}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(said),
            "{name}: {body}"
        );
    }
    for (name, bytes, version) in [
        ("ESP8266", esp8266("rsa"), "1.0.0"),
        ("ESP32 RSA-PSS", esp32("rsa", true), "1.0.1"),
        ("ESP32 ECDSA", esp32("ec", false), "1.0.2"),
    ] {
        let (status, fw) = upload_as(&server, pid, bytes, version).await;
        assert_eq!(status, 201, "{name}: {fw}");
        assert_eq!(fw["metadata"]["signature"], "verified", "{name}: {fw}");
    }
    // Without keys: taken as they are, nothing claimed verified.
    let (open, _, _) = server.product("arduino-open").await;
    let (status, fw) = upload_as(&server, open, esp8266("other"), "1.0.0").await;
    assert_eq!(status, 201, "{fw}");
    assert!(fw["metadata"].get("signature").is_none(), "{fw}");
    server.finish().await;
}
on_both_backends!(arduino_signed_images, arduino_signed_images_story);
