//! The setup firmware of seed 000 and the update ability every compiled sketch keeps: the
//! Arduino sources in `firmware/arduino/`, personalised with the device's Wi-Fi, static link,
//! ID and password (sealed at rest, see `secrets.rs`).

use std::collections::BTreeMap;

use otaforge_store::model::{Device, now_millis};
use serde::{Deserialize, Serialize};

use crate::AppState;

const CONFIG_TEMPLATE: &str =
    include_str!("../../../firmware/arduino/otaforge_setup/otaforge_config.h");
const SETUP_SKETCH: &str =
    include_str!("../../../firmware/arduino/otaforge_setup/otaforge_setup.ino");
const OTA_LIBRARY: &str = include_str!("../../../firmware/arduino/otaforge_ota/otaforge_ota.h");

/// What the platform keeps (sealed) to personalise a device's firmware.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceSecrets {
    pub wifi_ssid: String,
    pub wifi_password: String,
    pub device_password: String,
}

pub fn seal_secrets(state: &AppState, secrets: &DeviceSecrets) -> anyhow::Result<String> {
    state.inner.sealer.seal(&serde_json::to_vec(secrets)?)
}

pub fn open_secrets(state: &AppState, sealed: &str) -> Option<DeviceSecrets> {
    serde_json::from_slice(&state.inner.sealer.open(sealed)?).ok()
}

/// A C string literal's inside: backslashes and quotes escaped.
fn c_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `otaforge_config.h` for this device. `tag` makes the firmware version unique per build,
/// so the server can answer 304 to a device that already runs it.
pub fn personal_config(state: &AppState, device: &Device, tag: &str) -> Result<String, String> {
    let secrets = device
        .secrets
        .as_deref()
        .and_then(|s| open_secrets(state, s))
        .ok_or(
            "save the Wi-Fi form first: the firmware needs the network and the device password",
        )?;
    let values = [
        ("wifi_ssid", c_escape(&secrets.wifi_ssid)),
        ("wifi_password", c_escape(&secrets.wifi_password)),
        (
            "firmware_url",
            c_escape(&crate::api::static_link(state, device)),
        ),
        ("device_id", c_escape(&device.serial)),
        ("device_password", c_escape(&secrets.device_password)),
        ("trigger_pin", "0".to_string()),
        ("check_interval_s", "3600".to_string()),
        ("firmware_version", format!("{tag}-{}", now_millis())),
    ];
    let mut out = CONFIG_TEMPLATE.to_string();
    for (key, value) in values {
        out = out.replace(&format!("{{{{{key}}}}}"), &value);
    }
    Ok(out)
}

/// The setup sketch's main file; a build that has it gets the device's personal
/// `otaforge_config.h` added when it compiles (never stored in the build row).
pub const SETUP_SKETCH_FILE: &str = "otaforge_setup.ino";

/// The setup sketch's files, without the personal config.
pub fn setup_sketch() -> BTreeMap<String, String> {
    BTreeMap::from([
        (SETUP_SKETCH_FILE.to_string(), SETUP_SKETCH.to_string()),
        ("otaforge_ota.h".to_string(), OTA_LIBRARY.to_string()),
    ])
}

/// Whether a board can update itself over Wi-Fi (and so must keep the update code).
pub fn is_ota_board(fqbn: &str) -> bool {
    fqbn.starts_with("esp32:") || fqbn.starts_with("esp8266:")
}

/// Files and link flags added to a user's sketch so the firmware keeps the update ability:
/// the linker wraps the sketch's `setup()` and `loop()` (`--wrap`), and the wrappers call
/// `otaforge_begin()` / `otaforge_loop()` around them. The sketch itself is not edited.
pub fn keep_update_ability(config: String) -> (BTreeMap<String, String>, Vec<String>) {
    let keep = "\
// Added by OTAForge to every build: keeps the board able to take its next update.
#include \"otaforge_config.h\"
#include \"otaforge_ota.h\"

extern \"C\" void __real__Z5setupv();
extern \"C\" void __real__Z4loopv();
extern \"C\" void __wrap__Z5setupv() { otaforge_begin(); __real__Z5setupv(); }
extern \"C\" void __wrap__Z4loopv() { __real__Z4loopv(); otaforge_loop(); }
";
    let files = BTreeMap::from([
        ("otaforge_config.h".to_string(), config),
        ("otaforge_ota.h".to_string(), OTA_LIBRARY.to_string()),
        ("otaforge_keep.cpp".to_string(), keep.to_string()),
    ]);
    let flags =
        vec!["compiler.c.elf.extra_flags=-Wl,--wrap=_Z5setupv -Wl,--wrap=_Z4loopv".to_string()];
    (files, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_every_placeholder_once() {
        for key in [
            "wifi_ssid",
            "wifi_password",
            "firmware_url",
            "device_id",
            "device_password",
            "trigger_pin",
            "check_interval_s",
            "firmware_version",
        ] {
            assert_eq!(
                CONFIG_TEMPLATE.matches(&format!("{{{{{key}}}}}")).count(),
                1,
                "{key}"
            );
        }
    }

    #[test]
    fn escaping() {
        assert_eq!(c_escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
