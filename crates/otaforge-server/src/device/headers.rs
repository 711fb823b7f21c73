//! What a device says about itself in the headers of its requests (the `x-ESP32-*` and
//! `x-ESP8266-*` families of the stock Arduino clients, which the OTAdrive library sends
//! too), read once into the dialect-neutral parts of a `CheckIn`.

use axum::http::HeaderMap;
use otaforge_store::model::{Telemetry, now_millis};

use crate::decision::{Family, Mode, Running};
use crate::error::{ApiError, ApiResult};

/// `x-ESP32-<suffix>` or `x-ESP8266-<suffix>` of a `DeviceHeaders`.
macro_rules! esp {
    ($headers:expr, $suffix:literal) => {
        $headers.either(concat!("x-esp32-", $suffix), concat!("x-esp8266-", $suffix))
    };
}

/// Device headers, validated: every `x-esp…` header present must be visible ASCII.
pub struct DeviceHeaders<'a> {
    headers: &'a HeaderMap,
}

impl<'a> DeviceHeaders<'a> {
    pub fn new(headers: &'a HeaderMap) -> ApiResult<Self> {
        for (name, value) in headers {
            if name.as_str().starts_with("x-esp") && value.to_str().is_err() {
                return Err(ApiError::bad_request(format!(
                    "header {} is not printable ASCII",
                    name.as_str()
                )));
            }
        }
        Ok(DeviceHeaders { headers })
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// `x-ESP32-<suffix>` or `x-ESP8266-<suffix>`, named by `esp!` (static names: a poll
    /// reads a dozen of these headers, and none of the lookups allocates).
    pub fn either(&self, esp32: &'static str, esp8266: &'static str) -> Option<&'a str> {
        self.get(esp32).or_else(|| self.get(esp8266))
    }

    pub fn sketch_md5(&self) -> Option<&'a str> {
        esp!(self, "sketch-md5")
    }

    /// `sketch` (or nothing) → app, `spiffs` → filesystem, `version` → version only.
    pub fn mode(&self) -> Mode {
        match esp!(self, "mode") {
            Some(m) if m.eq_ignore_ascii_case("spiffs") || m.eq_ignore_ascii_case("filesystem") => {
                Mode::Filesystem
            }
            Some(m) if m.eq_ignore_ascii_case("version") => Mode::VersionOnly,
            _ => Mode::App,
        }
    }

    /// The chip family the header set announces: the chip header of the OTAForge client
    /// (`x-otaforge-chip`) when there is one, else the ESP8266 and ESP32 clients name every
    /// header after their chip.
    pub fn family(&self) -> Option<Family> {
        if let Some(chip) = self.get(otaforge_protocol::CHIP_HEADER) {
            return Family::of_chip(&chip.to_ascii_lowercase());
        }
        let names = || self.headers.keys().map(|n| n.as_str());
        if names().any(|n| n.starts_with("x-esp8266-")) {
            Some(Family::Esp8266)
        } else if names().any(|n| n.starts_with("x-esp32-")) {
            Some(Family::Esp32)
        } else {
            None
        }
    }

    /// What the device runs: `version` from wherever the dialect carries it.
    pub fn running(&self, version: Option<&'a str>, by_md5: bool) -> Running<'a> {
        Running {
            version: version.or_else(|| esp!(self, "version")),
            sketch_md5: self.sketch_md5(),
            by_md5,
        }
    }

    /// The outcome of the device's last update (`x-OTAForge-Update-Result`).
    pub fn feedback(&self) -> Option<&'a str> {
        self.get(otaforge_protocol::UPDATE_RESULT_HEADER)
    }

    /// The report these headers make, with `version` from wherever the dialect carries it.
    pub fn telemetry(&self, version: Option<&str>) -> Telemetry {
        let number = |s: Option<&str>| s.and_then(|v| v.parse::<i64>().ok());
        let bounded =
            |s: Option<&str>, max: usize| s.map(|v| v.chars().take(max).collect::<String>());
        Telemetry {
            last_seen: Some(now_millis()),
            version: bounded(version.or_else(|| esp!(self, "version")), 64),
            sketch_md5: self
                .sketch_md5()
                .filter(|m| m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase),
            sta_mac: bounded(esp!(self, "sta-mac"), 32),
            ap_mac: bounded(esp!(self, "ap-mac"), 32),
            free_space: number(esp!(self, "free-space")),
            chip_size: number(esp!(self, "chip-size")),
            sdk_version: bounded(esp!(self, "sdk-version"), 64),
            // The check-in sets it from the family the request announced.
            chip: None,
        }
    }
}
