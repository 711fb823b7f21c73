//! `otaforge bench --management`: the management side at fleet size. With the devices
//! registered by CSV import, it measures paged device lists (walking cursors, filtered,
//! sorted, counted), the dashboard and product page (time and size, signed in as an
//! operator), the CSV export, a rollout over every device (dry run and real), and the
//! server's peak memory (`VmHWM`) after the list calls and after the rollout.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Milliseconds of each request, and the bytes of the last answer.
struct Timings {
    ms: Vec<f64>,
    bytes: usize,
}

impl Timings {
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.ms.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    }

    fn row(&self, name: &str) -> Value {
        println!(
            "  {name:<46} n={:<4} p50 {:>8.2} ms  p99 {:>8.2} ms  {:>8} bytes",
            self.ms.len(),
            self.pct(0.5),
            self.pct(0.99),
            self.bytes
        );
        json!({"n": self.ms.len(), "p50_ms": self.pct(0.5), "p99_ms": self.pct(0.99), "bytes": self.bytes})
    }
}

/// The server's peak resident memory so far, in MiB.
pub fn peak_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

async fn get(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    cookie: Option<&str>,
) -> anyhow::Result<(Duration, String)> {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let started = Instant::now();
    let response = req.send().await?;
    let status = response.status();
    let text = response.text().await?;
    let took = started.elapsed();
    if !status.is_success() {
        bail!(
            "{url}: {status}: {}",
            text.chars().take(300).collect::<String>()
        );
    }
    Ok((took, text))
}

/// Signs in as `admin` through the sign-in page; the session cookie.
async fn sign_in(http: &reqwest::Client, base: &str, password: &str) -> anyhow::Result<String> {
    let page = http.get(format!("{base}/login")).send().await?;
    let cookie = page
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let html = page.text().await?;
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .context("the sign-in page has no CSRF token")?
        .to_string();
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("csrf", &csrf)
        .append_pair("kind", "operator")
        .append_pair("username", "admin")
        .append_pair("password", password);
    let answer = http
        .post(format!("{base}/login"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.finish())
        .send()
        .await?;
    answer
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().to_string())
        .context("signing in gave no session")
}

/// Runs the management measurements; the figures as JSON.
pub async fn measure(
    base: &str,
    token: &str,
    admin_password: &str,
    server_pid: u32,
    pid: i64,
    devices: usize,
) -> anyhow::Result<Value> {
    // Redirects are part of what is measured, not followed.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut out = serde_json::Map::new();
    println!("management at {devices} devices:");
    let list = format!("{base}/api/v1/products/{pid}/devices");

    // Walking the list a page at a time from the start.
    let mut walk = Timings {
        ms: Vec::new(),
        bytes: 0,
    };
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let url = match &cursor {
            Some(c) => format!("{list}?limit=100&cursor={c}"),
            None => format!("{list}?limit=100"),
        };
        let (took, text) = get(&http, &url, Some(token), None).await?;
        walk.ms.push(took.as_secs_f64() * 1000.0);
        walk.bytes = text.len();
        let page: Value = serde_json::from_str(&text)?;
        cursor = page["next"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    out.insert(
        "page_walk".into(),
        walk.row("GET devices, 100 a page, 100 pages"),
    );
    // Deep in the list: a cursor near the end costs what one at the start does.
    let mut deep = Timings {
        ms: Vec::new(),
        bytes: 0,
    };
    for i in 0..100 {
        let at = (devices.saturating_sub(1) * (i + 1)) / 101;
        let after = base64_cursor(&json!({"Serial": format!("bench{at:07x}")}));
        let (took, text) = get(
            &http,
            &format!("{list}?limit=100&cursor={after}"),
            Some(token),
            None,
        )
        .await?;
        deep.ms.push(took.as_secs_f64() * 1000.0);
        deep.bytes = text.len();
    }
    out.insert(
        "page_anywhere".into(),
        deep.row("GET devices, a page anywhere"),
    );
    for (name, query) in [
        ("filtered_search", "status=verified&q=ab&limit=100"),
        ("sorted_last_seen", "sort=last_seen&order=desc&limit=100"),
        ("prefix", "serial_prefix=bench0001&limit=100"),
        ("counted", "count=true&limit=1"),
    ] {
        let mut t = Timings {
            ms: Vec::new(),
            bytes: 0,
        };
        for _ in 0..20 {
            let (took, text) = get(&http, &format!("{list}?{query}"), Some(token), None).await?;
            t.ms.push(took.as_secs_f64() * 1000.0);
            t.bytes = text.len();
        }
        out.insert(name.into(), t.row(&format!("GET devices?{query}")));
    }

    let cookie = sign_in(&http, base, admin_password).await?;
    for (name, path) in [
        ("dashboard", "/".to_string()),
        ("product_page", format!("/products/{pid}")),
        ("product_page_search", format!("/products/{pid}?q=bench01")),
    ] {
        let mut t = Timings {
            ms: Vec::new(),
            bytes: 0,
        };
        for _ in 0..10 {
            let (took, text) = get(&http, &format!("{base}{path}"), None, Some(&cookie)).await?;
            t.ms.push(took.as_secs_f64() * 1000.0);
            t.bytes = text.len();
        }
        out.insert(name.into(), t.row(&format!("page {path}")));
    }

    let started = Instant::now();
    let response = http
        .get(format!("{list}/export"))
        .bearer_auth(token)
        .send()
        .await?;
    let mut lines = 0usize;
    let mut bytes = 0usize;
    let mut body = response.bytes_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        bytes += chunk.len();
        lines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let export_secs = started.elapsed().as_secs_f64();
    println!(
        "  export: {} devices, {bytes} bytes in {export_secs:.1} s",
        lines.saturating_sub(1)
    );
    out.insert(
        "export".into(),
        json!({"devices": lines.saturating_sub(1), "bytes": bytes, "seconds": export_secs}),
    );
    let peak_lists = peak_mib(server_pid);
    println!("  server peak RSS after the list, page and export calls: {peak_lists:.0} MiB");
    out.insert("peak_rss_mib_lists".into(), json!(peak_lists));

    // A rollout over every device: its dry run, then the real one.
    let (_, firmware) = get(
        &http,
        &format!("{base}/api/v1/products/{pid}/firmware"),
        Some(token),
        None,
    )
    .await?;
    let firmware: Value = serde_json::from_str(&firmware)?;
    let fw = firmware
        .get("items")
        .and_then(|i| i.get(0))
        .or_else(|| firmware.get(0))
        .and_then(|f| f["id"].as_i64())
        .context("the bench firmware")?;
    let stages = json!([
        {"size": {"count": 10}, "success_threshold": 1.0, "failure_threshold": 0.1, "window_secs": 0},
        {"size": {"count": 300}, "success_threshold": 0.98, "failure_threshold": 0.05, "window_secs": 0},
        {"size": "rest"}
    ]);
    for (name, dry) in [("rollout_dry_run", true), ("rollout_create", false)] {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/api/v1/products/{pid}/rollouts"))
            .bearer_auth(token)
            .json(&json!({"firmware_id": fw, "stages": stages, "dry_run": dry}))
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        let secs = started.elapsed().as_secs_f64();
        if !status.is_success() {
            bail!(
                "{name}: {status}: {}",
                text.chars().take(300).collect::<String>()
            );
        }
        let peak = peak_mib(server_pid);
        println!(
            "  {name}: {secs:.1} s, {} bytes answered; server peak RSS now {peak:.0} MiB",
            text.len()
        );
        out.insert(
            name.into(),
            json!({"seconds": secs, "bytes": text.len(), "peak_rss_mib": peak}),
        );
    }
    Ok(Value::Object(out))
}

/// A device-list cursor as the server writes them.
fn base64_cursor(position: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(position.to_string())
}
