//! The device's update client for the server's dialects (OTAdrive and the static link):
//! check, then a resumable `Range` download fed piece by piece into an [`UpdateSink`]
//! (the OTA engine), with MD5 and SHA-256 checked before the sink may switch, retries with
//! exponential backoff and full jitter, and the outcome reported on the next check-in.

use std::time::Duration;

use base64::Engine;
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::http::{self, HttpError, Url};

/// Where the device asks for updates.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `/deviceapi/update?k=&v=&s=` on this server.
    OtaDrive { server: Url, api_key: String },
    /// The device's static link, with its password (the user name is the serial).
    StaticLink { url: Url, password: String },
}

/// What the device says about itself on every request.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub serial: String,
    pub version: String,
    pub sketch_md5: Option<String>,
    pub sta_mac: String,
    pub free_space: u64,
    pub chip_size: u64,
    /// `None`: an ESP32, which says so with the `x-ESP32-*` header set of the Arduino
    /// client. Another chip (`w800`) is named by `x-otaforge-chip` instead, with no ESP
    /// headers (the version travels in the query of the OTAdrive dialect).
    pub chip: Option<String>,
}

/// How the outcome of the last update attempt is told to the server on the next check-in:
/// the protocol crate's one definition, shared with the server.
pub use otaforge_protocol::UpdateResult as Outcome;

/// Network fault injection, for the simulator: the share of body reads cut short.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub drop_rate: f64,
}

#[derive(Debug, Clone)]
pub struct Policy {
    /// Bytes per `Range` request.
    pub chunk: u64,
    /// Tries of one range before the download gives up.
    pub tries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    pub faults: Faults,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            chunk: 32 * 1024,
            tries: 5,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            timeout: Duration::from_secs(20),
            faults: Faults::default(),
        }
    }
}

/// Firmware the server offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub size: u64,
    pub md5: Option<String>,
    /// From the `ETag`, when it is a SHA-256.
    pub sha256: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    UpToDate,
    NoFirmware,
    /// 401 or 403: not verified, blocked, or wrong credentials.
    NotAllowed(u16),
    Offer(Offer),
}

/// Receives the image as it downloads. `finish` verifies and may switch the boot slot.
pub trait UpdateSink: Send {
    fn begin(&mut self, size: u64) -> Result<(), String>;
    fn write(&mut self, data: &[u8]) -> Result<(), String>;
    fn finish(&mut self) -> Result<(), String>;
    fn abort(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("{0}")]
    Http(#[from] HttpError),
    #[error("the server answered {status} to {what}")]
    Status { status: u16, what: &'static str },
    #[error("the download gave up after {tries} tries at byte {offset}: {last}")]
    GaveUp {
        tries: u32,
        offset: u64,
        last: String,
    },
    #[error("the image failed its check: {0}")]
    Integrity(String),
    #[error("the device refused the image: {0}")]
    Refused(String),
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub requests: u64,
    pub bytes: u64,
    pub retries: u64,
}

pub struct Updater {
    endpoint: Endpoint,
    policy: Policy,
    rng: u64,
    /// Told to the server on the next request, then forgotten.
    pending: Option<Outcome>,
    pub stats: Stats,
}

impl Updater {
    pub fn new(endpoint: Endpoint, policy: Policy, seed: u64) -> Self {
        Updater {
            endpoint,
            policy,
            rng: seed | 1,
            pending: None,
            stats: Stats::default(),
        }
    }

    /// Remembers an outcome to report on the next check-in.
    /// Talks to another server from the next request on (a fleet behind several nodes).
    pub fn set_endpoint(&mut self, endpoint: Endpoint) {
        self.endpoint = endpoint;
    }

    pub fn report(&mut self, outcome: Outcome) {
        self.pending = Some(outcome);
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: jitter and fault draws need no cryptographic quality.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.random() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// Exponential backoff with full jitter: uniform in [0, min(max, base * 2^attempt)].
    pub fn backoff(&mut self, attempt: u32) -> Duration {
        let cap = self
            .policy
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.policy.backoff_max);
        let millis = cap.as_millis() as u64;
        Duration::from_millis(if millis == 0 {
            0
        } else {
            self.random() % (millis + 1)
        })
    }

    fn url(&self, device: &DeviceInfo) -> Url {
        match &self.endpoint {
            Endpoint::OtaDrive { server, api_key } => {
                let base = server.path.trim_end_matches('/');
                server.with_path(&format!(
                    "{base}/deviceapi/update?k={api_key}&v={}&s={}",
                    encode(&device.version),
                    encode(&device.serial)
                ))
            }
            Endpoint::StaticLink { url, .. } => url.clone(),
        }
    }

    fn headers(&mut self, device: &DeviceInfo) -> Vec<(String, String)> {
        let mut h = match &device.chip {
            None => vec![
                ("User-Agent".to_string(), "ESP32-http-Update".to_string()),
                ("x-ESP32-STA-MAC".to_string(), device.sta_mac.clone()),
                (
                    "x-ESP32-free-space".to_string(),
                    device.free_space.to_string(),
                ),
                (
                    "x-ESP32-chip-size".to_string(),
                    device.chip_size.to_string(),
                ),
                ("x-ESP32-mode".to_string(), "sketch".to_string()),
                ("x-ESP32-version".to_string(), device.version.clone()),
            ],
            Some(chip) => vec![
                ("User-Agent".to_string(), "OTAForge-client".to_string()),
                (otaforge_protocol::CHIP_HEADER.to_string(), chip.clone()),
            ],
        };
        if let Some(md5) = device.sketch_md5.as_ref().filter(|_| device.chip.is_none()) {
            h.push(("x-ESP32-sketch-md5".to_string(), md5.clone()));
        }
        if let Endpoint::StaticLink { password, .. } = &self.endpoint {
            let token = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{password}", device.serial));
            h.push(("Authorization".to_string(), format!("Basic {token}")));
        }
        if let Some(outcome) = &self.pending {
            h.push((
                otaforge_protocol::UPDATE_RESULT_HEADER.to_string(),
                outcome.to_string(),
            ));
        }
        h
    }

    /// Asks whether there is new firmware (HEAD, as the OTAdrive client and `esp_https_ota`
    /// do). Network errors are retried with backoff.
    pub async fn check(&mut self, device: &DeviceInfo) -> Result<Check, UpdateError> {
        let url = self.url(device);
        let mut attempt = 0;
        let response = loop {
            let headers = self.headers(device);
            self.stats.requests += 1;
            match http::request("HEAD", &url, &headers, self.policy.timeout).await {
                Ok(r) => break r,
                Err(HttpError::Network(e)) if attempt + 1 < self.policy.tries => {
                    tracing::debug!(error = %e, attempt, "check failed; backing off");
                    self.stats.retries += 1;
                    let wait = self.backoff(attempt);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        };
        // The server has heard the outcome.
        self.pending = None;
        Ok(match response.status {
            200 => Check::Offer(Offer {
                size: response
                    .content_length
                    .filter(|&n| n > 0)
                    .ok_or(UpdateError::Status {
                        status: 200,
                        what: "a check without Content-Length",
                    })?,
                md5: response.header("x-MD5").map(str::to_ascii_lowercase),
                sha256: response
                    .header("ETag")
                    .map(|e| e.trim_matches('"').to_ascii_lowercase())
                    .filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit())),
                version: response.header("X-Version").map(str::to_string),
            }),
            304 => Check::UpToDate,
            404 => Check::NoFirmware,
            401 | 403 => Check::NotAllowed(response.status),
            status => {
                return Err(UpdateError::Status {
                    status,
                    what: "the update check",
                });
            }
        })
    }

    /// Downloads the offer in `Range` pieces into `sink`, resuming where a dropped
    /// connection stopped, and lets the sink finish only when MD5 and SHA-256 match.
    pub async fn download(
        &mut self,
        device: &DeviceInfo,
        offer: &Offer,
        sink: &mut dyn UpdateSink,
    ) -> Result<(), UpdateError> {
        sink.begin(offer.size).map_err(UpdateError::Refused)?;
        match self.fetch_into(device, offer, sink).await {
            Ok(()) => sink.finish().map_err(UpdateError::Refused),
            Err(e) => {
                sink.abort();
                Err(e)
            }
        }
    }

    async fn fetch_into(
        &mut self,
        device: &DeviceInfo,
        offer: &Offer,
        sink: &mut dyn UpdateSink,
    ) -> Result<(), UpdateError> {
        let url = self.url(device);
        let mut md5 = Md5::new();
        let mut sha = Sha256::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; 16 * 1024];
        let mut failures = 0u32;
        while offset < offer.size {
            let end = (offset + self.policy.chunk).min(offer.size) - 1;
            let mut headers = self.headers(device);
            headers.push(("Range".to_string(), format!("bytes={offset}-{end}")));
            self.stats.requests += 1;
            let attempt: Result<(), UpdateError> = async {
                let mut response =
                    http::request("GET", &url, &headers, self.policy.timeout).await?;
                if response.status != 206 {
                    // A 200 to a Range request would restart the bytes at 0: refuse it.
                    return Err(UpdateError::Status {
                        status: response.status,
                        what: "a Range request",
                    });
                }
                let expected = format!("bytes {offset}-{end}/{}", offer.size);
                if response.header("Content-Range") != Some(expected.as_str()) {
                    return Err(UpdateError::Integrity(format!(
                        "Content-Range {:?}, expected {expected:?}",
                        response.header("Content-Range")
                    )));
                }
                let cut_at = if self.chance(self.policy.faults.drop_rate) {
                    Some(self.random() % (end - offset + 1))
                } else {
                    None
                };
                let mut got = 0u64;
                loop {
                    if cut_at.is_some_and(|c| got >= c) {
                        return Err(HttpError::Network("simulated connection drop".into()).into());
                    }
                    let n = response.chunk(&mut buf, self.policy.timeout).await?;
                    if n == 0 {
                        break;
                    }
                    let piece = &buf[..n];
                    sink.write(piece).map_err(UpdateError::Refused)?;
                    md5.update(piece);
                    sha.update(piece);
                    offset += n as u64;
                    got += n as u64;
                    self.stats.bytes += n as u64;
                }
                Ok(())
            }
            .await;
            match attempt {
                Ok(()) => failures = 0,
                Err(
                    e @ (UpdateError::Http(_)
                    | UpdateError::Status {
                        status: 500..=599, ..
                    }),
                ) => {
                    failures += 1;
                    if failures >= self.policy.tries {
                        return Err(UpdateError::GaveUp {
                            tries: failures,
                            offset,
                            last: e.to_string(),
                        });
                    }
                    self.stats.retries += 1;
                    let wait = self.backoff(failures - 1);
                    tracing::debug!(error = %e, offset, "download interrupted; resuming after {wait:?}");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
        let md5 = hex(&md5.finalize());
        if let Some(expected) = &offer.md5
            && *expected != md5
        {
            return Err(UpdateError::Integrity(format!(
                "MD5 {md5}, the server said {expected}"
            )));
        }
        let sha = hex(&sha.finalize());
        if let Some(expected) = &offer.sha256
            && *expected != sha
        {
            return Err(UpdateError::Integrity(format!(
                "SHA-256 {sha}, the server said {expected}"
            )));
        }
        Ok(())
    }

    /// After a successful flash: the OTAdrive `alive` call with the new version. The static
    /// link has no such call; its next check-in carries the version and MD5.
    pub async fn alive(&mut self, device: &DeviceInfo) -> Result<(), UpdateError> {
        let Endpoint::OtaDrive { server, api_key } = &self.endpoint else {
            return Ok(());
        };
        let base = server.path.trim_end_matches('/');
        let url = server.with_path(&format!(
            "{base}/deviceapi/alive?k={api_key}&v={}&s={}",
            encode(&device.version),
            encode(&device.serial)
        ));
        let headers = self.headers(device);
        self.stats.requests += 1;
        let response = http::request("GET", &url, &headers, self.policy.timeout).await?;
        self.pending = None;
        match response.status {
            200 => Ok(()),
            status => Err(UpdateError::Status {
                status,
                what: "alive",
            }),
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_its_cap() {
        let mut u = Updater::new(
            Endpoint::StaticLink {
                url: Url::parse("http://127.0.0.1:1/x").unwrap(),
                password: "p".into(),
            },
            Policy::default(),
            42,
        );
        for attempt in 0..40 {
            let cap = Duration::from_millis(250)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(30));
            assert!(u.backoff(attempt) <= cap);
        }
        // Full jitter: not always the same value.
        let draws: std::collections::HashSet<_> = (0..20).map(|_| u.backoff(5)).collect();
        assert!(draws.len() > 5);
    }
}
