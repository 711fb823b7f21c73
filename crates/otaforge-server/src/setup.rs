//! The setup firmware of seed 000 and the update ability every compiled sketch keeps: the
//! Arduino sources in `firmware/arduino/`, personalised with the device's Wi-Fi, static link,
//! ID and password (sealed at rest, see `secrets.rs`).

use std::collections::BTreeMap;

use otaforge_store::model::{Build, BuildImage, BuildStatus, Device, now_millis};
use serde::{Deserialize, Serialize};

use crate::AppState;

const CONFIG_TEMPLATE: &str =
    include_str!("../../../firmware/arduino/otaforge_setup/otaforge_config.h");
const SETUP_SKETCH: &str =
    include_str!("../../../firmware/arduino/otaforge_setup/otaforge_setup.ino");
const OTA_LIBRARY: &str = include_str!("../../../firmware/arduino/otaforge_ota/otaforge_ota.h");
const IMPROV: &str = include_str!("../../../firmware/arduino/otaforge_ota/otaforge_improv.h");

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
        (
            "workspace_url",
            c_escape(&format!(
                "{}/workspace/{}/{}",
                state.config().public_url(),
                device.product_id,
                device.serial
            )),
        ),
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
        ("otaforge_improv.h".to_string(), IMPROV.to_string()),
    ])
}

/// Whether a board can update itself over Wi-Fi (and so must keep the update code).
pub fn is_ota_board(fqbn: &str) -> bool {
    fqbn.starts_with("esp32:") || fqbn.starts_with("esp8266:")
}

/// A literal that only `otaforge_begin()` uses (`OTAFORGE_CLIENT_MARKER` in
/// `otaforge_ota.h`): an image that lacks it has no update client.
pub const CLIENT_MARKER: &str = "otaforge-update-client/1";

/// The symbols a core gives the sketch's `setup()` and `loop()`: the ESP8266 core declares
/// them inside `extern "C"` (`cores/esp8266/Arduino.h`), arduino-esp32 with C++ linkage.
pub fn sketch_symbols(fqbn: &str) -> (&'static str, &'static str) {
    if fqbn.starts_with("esp8266:") {
        ("setup", "loop")
    } else {
        ("_Z5setupv", "_Z4loopv")
    }
}

/// Files and link flags added to a user's sketch so the firmware keeps the update ability:
/// the linker wraps the sketch's `setup()` and `loop()` (`--wrap`, with the core's own
/// symbols for them), and the wrappers call `otaforge_begin()` / `otaforge_loop()` around
/// them. The sketch itself is not edited.
pub fn keep_update_ability(fqbn: &str, config: String) -> (BTreeMap<String, String>, Vec<String>) {
    let (setup, run) = sketch_symbols(fqbn);
    let keep = format!(
        "\
// Added by OTAForge to every build: keeps the board able to take its next update.
#include \"otaforge_config.h\"
#include \"otaforge_ota.h\"

extern \"C\" void __real_{setup}();
extern \"C\" void __real_{run}();
extern \"C\" void __wrap_{setup}() {{ otaforge_begin(); __real_{setup}(); }}
extern \"C\" void __wrap_{run}() {{ __real_{run}(); otaforge_loop(); }}
"
    );
    let files = BTreeMap::from([
        ("otaforge_config.h".to_string(), config),
        ("otaforge_ota.h".to_string(), OTA_LIBRARY.to_string()),
        ("otaforge_keep.cpp".to_string(), keep),
    ]);
    let flags = vec![format!(
        "compiler.c.elf.extra_flags=-Wl,--wrap={setup} -Wl,--wrap={run}"
    )];
    (files, flags)
}

/// Whether a built image carries the update client.
pub fn has_update_client(image: &[u8]) -> bool {
    image
        .windows(CLIENT_MARKER.len())
        .any(|w| w == CLIENT_MARKER.as_bytes())
}

/// The name a build's stored application is downloaded under (beside its kept images).
pub const BUILT_APP: &str = "firmware.bin";

/// Seconds ESP Web Tools waits after flashing for the setup firmware to answer Improv.
pub const IMPROV_WAIT_S: u32 = 15;

/// What an install from the browser writes for a build, as (file under the build, flash
/// offset): a succeeded setup build's merged image (ESP32 family) or its application
/// (ESP8266, whose image starts with its own boot loader), from 0x0. `None`: nothing to
/// install. The workspace offers the Install button exactly when this says so, and the
/// manifest lists these parts.
pub fn install_parts(build: &Build, images: &[BuildImage]) -> Option<Vec<(&'static str, u32)>> {
    if build.status != BuildStatus::Succeeded || !build.files.contains_key(SETUP_SKETCH_FILE) {
        return None;
    }
    if images.iter().any(|i| i.name == "merged.bin") {
        Some(vec![("merged.bin", 0)])
    } else if build.fqbn.starts_with("esp8266:") && build.firmware_id.is_some() {
        Some(vec![(BUILT_APP, 0)])
    } else {
        None
    }
}

impl AppState {
    /// The ESP Web Tools manifest of a build `install_parts` offers: its chip family (read
    /// from the kept bootloader, or the merged image's first image), the parts, and a wait
    /// for Improv Wi-Fi after flashing (the setup firmware answers it, so the network can be
    /// given then instead of being built in).
    pub async fn install_manifest(
        &self,
        build: &Build,
        serial: &str,
    ) -> crate::error::ApiResult<serde_json::Value> {
        use otaforge_formats::{esp, flash};
        let images = self.store().list_build_images(build.id).await?;
        let parts = install_parts(build, &images).ok_or_else(|| {
            crate::error::ApiError::not_found(
                "only a succeeded setup build is installed from the browser",
            )
        })?;
        let chip = if build.fqbn.starts_with("esp8266:") {
            "esp8266".to_string()
        } else {
            let (name, offsets) = match images.iter().any(|i| i.name == "bootloader.bin") {
                true => ("bootloader.bin", vec![0]),
                false => ("merged.bin", vec![0x0, 0x1000, 0x2000]),
            };
            let (_, bytes) = self.build_image(build.id, name).await?;
            offsets
                .into_iter()
                .find_map(|at| esp::parse_image(bytes.get(at..)?).ok())
                .map(|img| img.chip.name().to_string())
                .ok_or_else(|| {
                    crate::error::ApiError::new(
                        axum::http::StatusCode::CONFLICT,
                        format!("{name} holds no ESP image to tell the chip"),
                    )
                })?
        };
        let family = flash::web_tools_family(&chip).ok_or_else(|| {
            crate::error::ApiError::new(
                axum::http::StatusCode::CONFLICT,
                format!("ESP Web Tools cannot flash a {chip}"),
            )
        })?;
        Ok(serde_json::json!({
            "name": format!("OTAForge setup firmware for {serial}"),
            "version": format!("build-{}", build.id),
            "new_install_prompt_erase": true,
            "new_install_improv_wait_time": IMPROV_WAIT_S,
            "builds": [{
                "chipFamily": family,
                "parts": parts.iter().map(|(path, offset)| serde_json::json!({
                    "path": path, "offset": offset,
                })).collect::<Vec<_>>(),
            }],
        }))
    }
}

/// The whole-flash image of an ESP32-family setup build where arduino-cli exported none
/// (cores before 3.x export the bootloader and the partition table only): the bootloader at
/// its chip's offset, the table at 0x8000, the application at the table's first app slot,
/// the rest erased, as `esptool merge-bin` writes it. `Ok(None)` when the build kept no
/// bootloader and table (an ESP8266 image already starts with its own boot loader).
pub fn merged_image(images: &[(String, Vec<u8>)], app: &[u8]) -> Result<Option<Vec<u8>>, String> {
    use otaforge_formats::{esp, flash, partition::PartitionTable};
    let find = |name: &str| {
        images
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, b)| b.as_slice())
    };
    if find("merged.bin").is_some() {
        return Ok(None);
    }
    let (Some(bootloader), Some(table)) = (find("bootloader.bin"), find("partitions.bin")) else {
        return Ok(None);
    };
    let chip = esp::parse_image(bootloader)
        .map_err(|e| format!("the exported bootloader is not an ESP image: {e}"))?
        .chip;
    let boot_at = chip
        .bootloader_offset()
        .ok_or_else(|| format!("no known bootloader offset for chip {}", chip.name()))?;
    let slots = PartitionTable::parse(table)
        .map_err(|e| format!("the exported partition table does not parse: {e}"))?;
    let app_at = slots
        .entries
        .iter()
        .filter(|p| p.is_app())
        .map(|p| p.offset)
        .min()
        .ok_or("the exported partition table has no app partition")?;
    flash::merge(&[
        (boot_at, bootloader),
        (flash::PARTITION_TABLE_OFFSET, table),
        (app_at, app),
    ])
    .map(Some)
    .map_err(|e| format!("the merged image could not be made: {e}"))
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
    fn the_marker_is_the_librarys() {
        assert!(OTA_LIBRARY.contains(&format!("\"{CLIENT_MARKER}\"")));
    }

    /// The per-core wrap with real linkers: Debian's xtensa-lx106 toolchain for the ESP8266
    /// core's C linkage, the host's for arduino-esp32's C++ linkage. The wrapped image has the
    /// update client; the C++ wrap on the ESP8266 core (what builds did before) silently links
    /// an image without it.
    #[test]
    fn the_wrap_keeps_the_update_client_with_each_cores_linkage() {
        let dir = std::env::temp_dir().join(format!("otaforge-wrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Stand-ins for the library (its marker and functions) and the personal config.
        std::fs::write(dir.join("otaforge_config.h"), "#pragma once\n").unwrap();
        std::fs::write(
            dir.join("otaforge_ota.h"),
            format!(
                "#pragma once\nstatic const char *volatile marker;\n\
                 inline void otaforge_begin() {{ marker = \"{CLIENT_MARKER}\"; }}\n\
                 inline void otaforge_loop() {{}}\n"
            ),
        )
        .unwrap();
        let link = |compiler: &str, c_linkage: bool, fqbn: &str, out: &str| -> Vec<u8> {
            let decl = if c_linkage {
                "extern \"C\" { void setup(void); void loop(void); }\n"
            } else {
                "void setup(); void loop();\n"
            };
            std::fs::write(
                dir.join("sketch.cpp"),
                format!("{decl}void setup() {{}}\nvoid loop() {{}}\n"),
            )
            .unwrap();
            std::fs::write(
                dir.join("main.cpp"),
                format!("{decl}extern \"C\" int main() {{ setup(); loop(); return 0; }}\n"),
            )
            .unwrap();
            let (files, flags) = keep_update_ability(fqbn, String::new());
            std::fs::write(dir.join("keep.cpp"), &files["otaforge_keep.cpp"]).unwrap();
            let wrap = flags[0].split_once('=').unwrap().1;
            let mut cmd = std::process::Command::new(compiler);
            cmd.current_dir(&dir)
                .args([
                    "-Os",
                    "-ffunction-sections",
                    "-fdata-sections",
                    "-fno-exceptions",
                ])
                .args(["-fno-rtti", "-Wl,--gc-sections", "-o", out])
                .args(wrap.split(' '))
                .args(["sketch.cpp", "keep.cpp", "main.cpp"]);
            if compiler.contains("xtensa") {
                cmd.args(["-nostdlib", "-nostartfiles", "-Wl,-e,main"]);
            }
            let status = cmd.status().unwrap_or_else(|e| {
                panic!("{compiler} must be installed for this test (apt-get install gcc-xtensa-lx106 g++): {e}")
            });
            assert!(status.success(), "{compiler} failed");
            std::fs::read(dir.join(out)).unwrap()
        };
        let esp8266 = link(
            "xtensa-lx106-elf-g++",
            true,
            "esp8266:esp8266:nodemcuv2",
            "esp8266.elf",
        );
        assert!(
            has_update_client(&esp8266),
            "ESP8266: the update client is linked"
        );
        let nm = std::process::Command::new("xtensa-lx106-elf-nm")
            .arg(dir.join("esp8266.elf"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&nm.stdout).contains("__wrap_setup"));
        let esp32 = link("g++", false, "esp32:esp32:esp32", "esp32.elf");
        assert!(
            has_update_client(&esp32),
            "ESP32: the update client is linked"
        );
        // The old choice, C++ symbols on the ESP8266 core: links, but without the client.
        let wrong = link(
            "xtensa-lx106-elf-g++",
            true,
            "esp32:esp32:esp32",
            "wrong.elf",
        );
        assert!(
            !has_update_client(&wrong),
            "the C++ wrap matches nothing on C linkage"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn escaping() {
        assert_eq!(c_escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
