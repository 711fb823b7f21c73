//! `otaforge bench`: device check-ins answered 304 and firmware downloads against a real
//! `otaforge serve` child process, side by side with nginx serving the same file in the
//! same run. One load generator (keep-alive HTTP/1.1 over loopback) drives both, and the
//! check-in runs alternate with nginx's (`--rounds`): the ratio is the median round's.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Devices registered before measuring.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Size of the generated firmware image in bytes (ignored with --image).
    #[arg(long, default_value_t = 400_000)]
    image_size: usize,
    /// Serve this file instead of a generated one.
    #[arg(long)]
    image: Option<PathBuf>,
    /// The nginx binary; the comparison is skipped (and said so) when it is missing.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Check-ins as a fleet makes them: every request another device (no answer cached
    /// from a poll a moment ago), each with the OTAdrive client's full ESP32 header set.
    #[arg(long)]
    realistic: bool,
    /// Measure the management side instead (paged lists, pages, export, a rollout over
    /// every device, the server's peak memory).
    #[arg(long)]
    management: bool,
    /// The database `otaforge serve` uses (default: SQLite in a temporary folder).
    #[arg(long)]
    database_url: Option<String>,
    /// Check-in runs, each followed at once by nginx's: the ratio is the median of the
    /// rounds', so that a moment when the machine is busier counts against neither.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    requests: u64,
    bytes: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / (1024.0 * 1024.0)
    }

    fn to_json(&self) -> Value {
        json!({
            "requests": self.requests, "bytes": self.bytes, "seconds": self.seconds,
            "requests_per_second": self.rate(), "mib_per_second": self.mib_per_s(),
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "errors": self.errors,
        })
    }
}

/// A request to repeat: the path of request `i`, the extra headers, the status expected.
#[derive(Clone)]
struct Target {
    addr: std::net::SocketAddr,
    host: String,
    paths: Arc<Vec<String>>,
    headers: String,
    expect: u16,
}

struct Child {
    child: tokio::process::Child,
}

impl Drop for Child {
    /// SIGTERM first (nginx's master then stops its workers; SIGKILL would leave them
    /// running), SIGKILL after 3 s.
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let until = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < until {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.start_kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port} after 10 s")
}

/// Sends one request on a keep-alive connection and reads the whole answer.
/// Returns (status, body bytes).
async fn exchange(
    stream: &mut BufReader<TcpStream>,
    request: &[u8],
    body: &mut Vec<u8>,
) -> std::io::Result<(u16, u64)> {
    stream.get_mut().write_all(request).await?;
    let mut line = String::new();
    stream.read_line(&mut line).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut length = 0u64;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("connection closed in the headers"));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    if status != 304 && length > 0 {
        body.resize(length as usize, 0);
        stream.read_exact(body).await?;
    }
    Ok((status, length))
}

async fn connect(addr: std::net::SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::with_capacity(64 * 1024, stream))
}

/// Closed loop: `clients` connections, each sending its next request as soon as the last
/// answer is read, for `seconds`. With `rate` set, open loop at that many requests per
/// second in total, spread over the connections.
async fn load(target: &Target, clients: usize, seconds: u64, rate: Option<f64>) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        let stop = stop.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut bytes, mut errors) = (0u64, 0u64);
            let mut body = Vec::new();
            let mut conn = None;
            let interval = rate.map(|r| Duration::from_secs_f64(clients as f64 / r));
            let mut next = Instant::now()
                + interval
                    .map(|i| i.mul_f64(c as f64 / clients as f64))
                    .unwrap_or_default();
            while !stop.load(Ordering::Relaxed) {
                if let Some(interval) = interval {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                    next += interval;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed) as usize;
                let path = &target.paths[i % target.paths.len()];
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ESP32-http-Update\r\n{}\r\n",
                    target.host, target.headers
                );
                if conn.is_none() {
                    conn = connect(target.addr).await.ok();
                }
                let Some(stream) = conn.as_mut() else {
                    errors += 1;
                    continue;
                };
                let began = Instant::now();
                match exchange(stream, request.as_bytes(), &mut body).await {
                    Ok((status, length)) if status == target.expect => {
                        latencies.push(began.elapsed().as_micros() as u32);
                        if status != 304 {
                            bytes += length;
                        }
                    }
                    _ => {
                        errors += 1;
                        conn = None;
                    }
                }
            }
            (latencies, bytes, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut bytes, mut errors) = (0, 0);
    for task in tasks {
        if let Ok((l, b, e)) = task.await {
            latencies.extend(l);
            bytes += b;
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[i] as f64 / 1000.0
    };
    Run {
        requests: latencies.len() as u64,
        bytes,
        seconds: elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    }
}

async fn api(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .bearer_auth(token);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let response = req.send().await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("{path}: {status}: {text}");
    }
    Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
}

struct Prepared {
    pid: i64,
    key: String,
    serials: Vec<String>,
    version: String,
    import_secs: f64,
    reimport_secs: f64,
}

async fn prepare(
    base: &str,
    token: &str,
    image: &[u8],
    devices: usize,
) -> anyhow::Result<Prepared> {
    let http = reqwest::Client::new();
    let product = api(
        &http,
        base,
        token,
        reqwest::Method::POST,
        "/api/v1/products",
        Some(json!({"name": "bench"})),
    )
    .await?;
    let pid = product["id"].as_i64().context("product id")?;
    let key = product["api_key"].as_str().context("api key")?.to_string();
    let group = product["default_group_id"].as_i64().context("group id")?;
    let firmware: Value = {
        let response = http
            .post(format!(
                "{base}/api/v1/products/{pid}/firmware?version=2.0.0"
            ))
            .bearer_auth(token)
            .body(image.to_vec())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("uploading the image: {status}: {text}");
        }
        serde_json::from_str(&text)?
    };
    let version = firmware["version"].as_str().unwrap_or("2.0.0").to_string();
    api(
        &http,
        base,
        token,
        reqwest::Method::PATCH,
        &format!("/api/v1/products/{pid}/groups/{group}"),
        Some(json!({ "firmware_id": firmware["id"] })),
    )
    .await?;
    let serials: Vec<String> = (0..devices).map(|i| format!("bench{i:07x}")).collect();
    let mut csv = String::with_capacity(devices * 24 + 16);
    csv.push_str("serial,status\n");
    for serial in &serials {
        csv.push_str(serial);
        csv.push_str(",verified\n");
    }
    let started = Instant::now();
    let outcome = import(&http, base, token, pid, csv.clone()).await?;
    let first = started.elapsed();
    let started = Instant::now();
    let again = import(&http, base, token, pid, csv).await?;
    let rerun = started.elapsed();
    eprintln!(
        "registered by CSV import: {} rows in {:.1} s ({} created); the same file again in {:.1} s ({} created, {} updated)",
        outcome["rows"],
        first.as_secs_f64(),
        outcome["created"],
        rerun.as_secs_f64(),
        again["created"],
        again["updated"]
    );
    Ok(Prepared {
        pid,
        key,
        serials,
        version,
        import_secs: first.as_secs_f64(),
        reimport_secs: rerun.as_secs_f64(),
    })
}

/// `POST …/devices/import` with this CSV.
async fn import(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    pid: i64,
    csv: String,
) -> anyhow::Result<Value> {
    let response = http
        .post(format!("{base}/api/v1/products/{pid}/devices/import"))
        .bearer_auth(token)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("importing the devices: {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

async fn start_nginx(nginx: &Path, root: &Path, file: &str) -> anyhow::Result<(Child, u16)> {
    let port = free_port()?;
    let prefix = root.join("nginx");
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes auto;\nerror_log {prefix}/logs/error.log;\npid {prefix}/nginx.pid;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n access_log off;\n sendfile on;\n tcp_nopush on;\n keepalive_requests 1000000;\n\
             client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy; fastcgi_temp_path {prefix}/fcgi;\n\
             uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; root {root};\n location / {{ types {{ }} default_type application/octet-stream; }} }}\n}}\n",
            prefix = prefix.display(),
            root = root.display(),
        ),
    )?;
    let child = tokio::process::Command::new(nginx)
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf)
        .arg("-g")
        .arg("daemon off;")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", nginx.display()))?;
    let child = Child { child };
    wait_for_port(port).await?;
    let _ = file;
    Ok((child, port))
}

/// The ETag nginx gives the file, for its 304 answers.
async fn nginx_etag(port: u16, file: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(
            format!("HEAD /{file} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    text.lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("etag")
                .then(|| value.trim().to_string())
        })
        .context("nginx sent no ETag")
}

/// The run of median rate (the upper one of an even count).
fn median_run(runs: &[Run]) -> Run {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[sorted.len() / 2].clone()
}

fn row(name: &str, run: &Run) {
    println!(
        "  {name:<34} {:>10.0} req/s {:>9.1} MiB/s   p50 {:>6.2} ms   p99 {:>6.2} ms   errors {}",
        run.rate(),
        run.mib_per_s(),
        run.p50_ms,
        run.p99_ms,
        run.errors
    );
}

/// Waits until the server holds every device in memory again (it loads them after an
/// import, as at start): what a fleet's server is like between imports. Says how long.
async fn hold_every_device(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    devices: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let status = api(
            http,
            base,
            token,
            reqwest::Method::GET,
            "/api/v1/server",
            None,
        )
        .await?;
        if status["devices_in_memory"].as_u64().unwrap_or(0) >= devices as u64 {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("the server did not load the devices into memory within 180 s: {status}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the server holds the {devices} devices in memory ({:.1} s after the import)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("otaforge-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let image = match &args.image {
        Some(path) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        None => {
            // Deterministic bytes that compress poorly, like real firmware.
            let mut x: u32 = 0x1234_5678;
            (0..args.image_size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x >> 24) as u8
                })
                .collect::<Vec<u8>>()
        }
    };
    let mut image = image;
    if args.image.is_none()
        && let Some(first) = image.first_mut()
    {
        // Not an 0xE9 or W800 magic by chance: the bench image is a raw binary.
        *first = 0;
    }
    std::fs::write(dir.join("firmware.bin"), &image)?;

    let port = free_port()?;
    let token = format!("bench-{}", std::process::id());
    let exe = std::env::current_exe()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
        ])
        .arg(dir.join("data"));
    if let Some(url) = &args.database_url {
        command.args(["--database-url", url]);
    }
    let mut server = command
        .env("OTAFORGE_ADMIN_TOKEN", &token)
        .env("OTAFORGE_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting otaforge serve")?;
    let server_pid = server.id().unwrap_or(0);
    // The first operator's password, printed once at the first start.
    let (password_tx, password_rx) = tokio::sync::oneshot::channel::<String>();
    if let Some(stdout) = server.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut tx = Some(password_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(p) = line.trim().strip_prefix("password: ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(p.to_string());
                }
            }
        });
    }
    let _server = Child { child: server };
    wait_for_port(port).await?;
    let base = format!("http://127.0.0.1:{port}");
    eprintln!(
        "preparing: {} devices, a {} byte image",
        args.devices,
        image.len()
    );
    let prepared = prepare(&base, &token, &image, args.devices).await?;
    if args.management {
        hold_every_device(&reqwest::Client::new(), &base, &token, args.devices).await?;
        println!(
            "  server peak RSS after the imports: {:.0} MiB",
            crate::bench_fleet::peak_mib(server_pid)
        );
        let password = tokio::time::timeout(Duration::from_secs(10), password_rx)
            .await
            .context("the server printed no operator password")??;
        let mut figures = crate::bench_fleet::measure(
            &base,
            &token,
            &password,
            server_pid,
            prepared.pid,
            args.devices,
        )
        .await?;
        figures["import_secs"] = json!(prepared.import_secs);
        figures["reimport_secs"] = json!(prepared.reimport_secs);
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&figures)?)?;
        }
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    drop(password_rx);
    let http = reqwest::Client::new();
    if args.realistic {
        // A fleet's server has seen every device poll: it holds them all in memory.
        hold_every_device(&http, &base, &token, args.devices).await?;
    }

    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let check_in = |version: &str| Target {
        addr,
        host: format!("127.0.0.1:{port}"),
        paths: Arc::new(
            prepared
                .serials
                .iter()
                .map(|s| format!("/deviceapi/update?k={}&v={version}&s={s}", prepared.key))
                .collect(),
        ),
        headers: if args.realistic {
            "x-ESP32-STA-MAC: 24:0A:C4:01:02:03\r\nx-ESP32-AP-MAC: 24:0A:C4:01:02:04\r\n\
             x-ESP32-free-space: 1310720\r\nx-ESP32-sketch-size: 400000\r\n\
             x-ESP32-sketch-md5: 0123456789abcdef0123456789abcdef\r\n\
             x-ESP32-chip-size: 4194304\r\nx-ESP32-sdk-version: v4.4.7\r\n\
             x-ESP32-mode: sketch\r\n"
                .to_string()
        } else {
            String::new()
        },
        expect: 0,
    };
    let mut results = serde_json::Map::new();
    println!(
        "otaforge bench: {} devices, {} clients, {} s per run, {} byte image",
        args.devices,
        args.clients,
        args.seconds,
        image.len()
    );
    // Warm the caches once (a fleet's polls are too far apart for that: not when realistic).
    let _ = load(
        &Target {
            expect: 304,
            ..check_in(&prepared.version)
        },
        4,
        if args.realistic { 0 } else { 1 },
        None,
    )
    .await;
    println!(
        "  {}",
        if args.realistic {
            "realistic: each request another device, with the OTAdrive client's full header set"
        } else {
            "the same devices again and again, no device headers: this measures the cache"
        }
    );
    // nginx serving the same file, started now so that its runs interleave with ours.
    let nginx = if args.nginx.exists() {
        let (child, nport) = start_nginx(&args.nginx, &dir, "firmware.bin").await?;
        let etag = nginx_etag(nport, "firmware.bin").await?;
        let naddr: std::net::SocketAddr = ([127, 0, 0, 1], nport).into();
        let target = move |expect: u16, headers: String| Target {
            addr: naddr,
            host: format!("127.0.0.1:{nport}"),
            paths: Arc::new(vec!["/firmware.bin".to_string()]),
            headers,
            expect,
        };
        let conditional = format!("If-None-Match: {etag}\r\n");
        let _ = load(&target(304, conditional.clone()), 4, 1, None).await;
        Some((child, target, conditional))
    } else {
        None
    };
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 1..=args.rounds {
        let run = load(
            &Target {
                expect: 304,
                ..check_in(&prepared.version)
            },
            args.clients,
            args.seconds,
            None,
        )
        .await;
        row(&format!("otaforge check-in (304) #{round}"), &run);
        ours.push(run);
        if let Some((_, target, conditional)) = &nginx {
            let run = load(
                &target(304, conditional.clone()),
                args.clients,
                args.seconds,
                None,
            )
            .await;
            row(&format!("nginx conditional GET (304) #{round}"), &run);
            theirs.push(run);
        }
    }
    let ota_304 = median_run(&ours);
    let ota_dl = load(
        &Target {
            expect: 200,
            ..check_in("1.0.0")
        },
        args.clients,
        args.seconds,
        None,
    )
    .await;
    row("otaforge download (200)", &ota_dl);
    let half = ota_304.rate() / 2.0;
    let ota_half = load(
        &Target {
            expect: 304,
            ..check_in(&prepared.version)
        },
        args.clients,
        args.seconds,
        Some(half),
    )
    .await;
    row(&format!("otaforge check-in at {half:.0}/s"), &ota_half);
    let status = api(
        &http,
        &base,
        &token,
        reqwest::Method::GET,
        "/api/v1/server",
        None,
    )
    .await?;
    let flush = &status["telemetry"];
    println!(
        "  reports: last flush wrote {} devices in {} ms, its oldest report waited {} ms; {} waiting",
        flush["devices"], flush["write_ms"], flush["lag_ms"], flush["pending"]
    );
    println!(
        "  server peak RSS: {:.0} MiB",
        crate::bench_fleet::peak_mib(server_pid)
    );
    results.insert("server_status".into(), status.clone());
    results.insert("otaforge_checkin_304".into(), ota_304.to_json());
    results.insert("otaforge_download".into(), ota_dl.to_json());
    results.insert("otaforge_checkin_half_rate".into(), ota_half.to_json());

    if let Some((_child, nginx_target, conditional)) = &nginx {
        let ng_304 = median_run(&theirs);
        let ng_dl = load(
            &nginx_target(200, String::new()),
            args.clients,
            args.seconds,
            None,
        )
        .await;
        row("nginx download (200)", &ng_dl);
        let ng_half = load(
            &nginx_target(304, conditional.clone()),
            args.clients,
            args.seconds,
            Some(half),
        )
        .await;
        row(&format!("nginx 304 at {half:.0}/s"), &ng_half);
        let mut ratios: Vec<f64> = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| a.rate() / b.rate())
            .collect();
        let each = ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        ratios.sort_by(f64::total_cmp);
        let ratio = ratios[ratios.len() / 2];
        println!(
            "  ratios: check-ins {ratio:.2}x nginx (median of {} rounds: {each}), downloads {:.2}x nginx",
            ratios.len(),
            ota_dl.mib_per_s() / ng_dl.mib_per_s()
        );
        results.insert("nginx_304".into(), ng_304.to_json());
        results.insert("nginx_download".into(), ng_dl.to_json());
        results.insert("nginx_304_half_rate".into(), ng_half.to_json());
        results.insert("checkin_ratio".into(), json!(ratio));
        results.insert(
            "rounds".into(),
            ours.iter()
                .zip(&theirs)
                .map(|(a, b)| json!({"otaforge": a.to_json(), "nginx": b.to_json()}))
                .collect(),
        );
    } else {
        println!(
            "  nginx not found at {}: no comparison (apt-get install nginx)",
            args.nginx.display()
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(results))?)?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
