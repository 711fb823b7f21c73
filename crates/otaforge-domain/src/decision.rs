//! The update decision as a plain function: given who the device is, what it runs and what
//! it asks for, and the firmware picked for it, what the answer is. Every device dialect
//! reaches it through `core::checkin`; none decides on its own.

use crate::model::{DeviceStatus, Firmware, Id};

/// What the device told us it runs.
#[derive(Debug, Clone, Default)]
pub struct Running<'a> {
    pub version: Option<&'a str>,
    pub sketch_md5: Option<&'a str>,
    /// Decide by MD5 of the running sketch rather than by version (`x-check-sketch-md5: 1`).
    pub by_md5: bool,
}

/// What the device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The application image (`x-ESP8266-mode: sketch`, or nothing said).
    #[default]
    App,
    /// A filesystem image (`spiffs`): the model has none yet, so never the app image.
    Filesystem,
    /// Only the version available (`x-ESP8266-mode: version`, `getAvailableVersion()`).
    VersionOnly,
}

/// A chip family, as far as images and device headers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// ESP32 and its variants (S2, S3, C2, C3, C6, H2, P4): one image format.
    Esp32,
    Esp8266,
    W800,
    /// Embedded Linux running SWUpdate (`.swu` images, the hawkBit DDI dialect).
    SwUpdate,
    /// Embedded Linux running mender-client (`.mender` artifacts).
    Mender,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Esp32 => "esp32",
            Family::Esp8266 => "esp8266",
            Family::W800 => "w800",
            Family::SwUpdate => "swupdate",
            Family::Mender => "mender",
        }
    }

    /// The family of a chip name as the formats crate writes it ("esp32c3", "esp8266", ...).
    pub fn of_chip(chip: &str) -> Option<Family> {
        if chip == "esp8266" {
            Some(Family::Esp8266)
        } else if chip.starts_with("esp32") {
            Some(Family::Esp32)
        } else if chip == "w800" {
            Some(Family::W800)
        } else if chip == "swupdate" {
            Some(Family::SwUpdate)
        } else if chip == "mender" {
            Some(Family::Mender)
        } else {
            None
        }
    }

    /// The family a firmware's image was built for, when its format says.
    pub fn of_firmware(firmware: &Firmware) -> Option<Family> {
        firmware
            .metadata
            .get("chip")
            .and_then(|c| c.as_str())
            .and_then(Family::of_chip)
    }
}

/// A release: one image per family (a group's or a rollout's firmware, the first one
/// standing for the rest). The image for a device of the family it announces; the first one
/// when it announces none or the release has none of its family (the decision then says
/// which chip was wrong).
pub fn for_family(release: &[Firmware], chip: Option<Family>) -> Option<&Firmware> {
    chip.and_then(|chip| {
        release
            .iter()
            .find(|f| Family::of_firmware(f) == Some(chip))
    })
    .or_else(|| release.first())
}

/// Whether firmware can form one release: when it holds more than one image, each is for a
/// known family and no family has two.
pub fn check_release(release: &[Firmware]) -> Result<(), String> {
    if release.len() < 2 {
        return Ok(());
    }
    let mut seen: Vec<(Family, &str)> = Vec::new();
    for firmware in release {
        let Some(family) = Family::of_firmware(firmware) else {
            return Err(format!(
                "firmware {} (id {}) has no known chip family; a release of several images \
                 needs each image's family",
                firmware.version, firmware.id
            ));
        };
        if let Some((_, other)) = seen.iter().find(|(f, _)| *f == family) {
            return Err(format!(
                "firmware {other} and {} are both for {}; a release holds one image per family",
                firmware.version,
                family.as_str()
            ));
        }
        seen.push((family, &firmware.version));
    }
    Ok(())
}

/// Release `new` put in the place of `old` (a finished rollout handing over to its group):
/// `new`'s images, then those of `old` whose family `new` has no image for.
pub fn merge_release(new: &[Firmware], old: &[Firmware]) -> Vec<Id> {
    let families: Vec<Option<Family>> = new.iter().map(Family::of_firmware).collect();
    let mut ids: Vec<Id> = new.iter().map(|f| f.id).collect();
    for firmware in old {
        let family = Family::of_firmware(firmware);
        if family.is_some() && !families.contains(&family) && !ids.contains(&firmware.id) {
            ids.push(firmware.id);
        }
    }
    ids
}

/// Why an image is not for this device: its metadata names the device types (a Mender
/// artifact's `device_types`) or hardware revisions (a `.swu`'s `hardware`) it is for, and the
/// device's (the type it declares, the `hw_revision` it reported) is not among them. A device
/// that has not said is not refused here; its client checks again before installing.
pub fn not_for_device(
    firmware: &Firmware,
    device_type: Option<&str>,
    hw_revision: Option<&str>,
) -> Option<String> {
    let named = |key: &str| {
        firmware
            .metadata
            .get(key)
            .and_then(|v| v.as_array())
            .map(|list| list.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>())
    };
    for (key, what, theirs) in [
        ("device_types", "device types", device_type),
        ("hardware", "hardware revisions", hw_revision),
    ] {
        if let (Some(list), Some(theirs)) = (named(key), theirs)
            && !list.contains(&theirs)
        {
            return Some(format!(
                "firmware {} is for {what} {}; the device is {theirs}",
                firmware.version,
                list.join(", ")
            ));
        }
    }
    None
}

/// The decision carries the firmware it is about, so no caller needs to look it up again.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The device may not update: not verified, blocked or disabled.
    NotAllowed(DeviceStatus),
    /// Nothing is assigned for what the device asked (no firmware, or no filesystem image).
    NothingAssigned(Mode),
    /// The picked image is for another chip family than the device announces.
    WrongChip {
        firmware: Firmware,
        image: Family,
        device: Family,
    },
    /// Tell the version available, send nothing else.
    VersionOnly(Firmware),
    /// The device already runs the picked firmware.
    UpToDate(Firmware),
    /// Send the picked firmware.
    Update(Firmware),
}

/// Decides for a device whose credentials already checked out.
pub fn decide(
    status: DeviceStatus,
    target: Option<Firmware>,
    running: &Running,
    mode: Mode,
    chip: Option<Family>,
) -> Decision {
    if status != DeviceStatus::Verified {
        return Decision::NotAllowed(status);
    }
    if mode == Mode::Filesystem {
        return Decision::NothingAssigned(Mode::Filesystem);
    }
    let Some(firmware) = target else {
        return Decision::NothingAssigned(mode);
    };
    if let (Some(image), Some(device)) = (Family::of_firmware(&firmware), chip)
        && image != device
    {
        return Decision::WrongChip {
            firmware,
            image,
            device,
        };
    }
    if mode == Mode::VersionOnly {
        return Decision::VersionOnly(firmware);
    }
    if runs(&firmware, running) {
        Decision::UpToDate(firmware)
    } else {
        Decision::Update(firmware)
    }
}

/// The MD5 a board reports (`x-…-sketch-md5`) once it runs this firmware: the MD5 of the
/// installed bytes, which differs from the file's for a signed ESP8266 image (signature and
/// length are not installed) and for a gzip upload (the board installs the inflated image).
pub fn installed_md5(firmware: &Firmware) -> &str {
    firmware
        .metadata
        .get("installed_md5")
        .and_then(|v| v.as_str())
        .unwrap_or(&firmware.md5)
}

/// The device whose secrets this firmware embeds (a personal build), if any.
pub fn personal_to(firmware: &Firmware) -> Option<i64> {
    firmware
        .metadata
        .get("personal_to")
        .and_then(|v| v.as_i64())
}

/// Whether the device reports running exactly this firmware.
pub fn runs(firmware: &Firmware, running: &Running) -> bool {
    let md5_matches = running.sketch_md5.is_some_and(|md5| {
        let md5 = md5.trim();
        md5.eq_ignore_ascii_case(installed_md5(firmware)) || md5.eq_ignore_ascii_case(&firmware.md5)
    });
    if running.by_md5 {
        return md5_matches;
    }
    let version_matches = running
        .version
        .is_some_and(|v| v.trim() == firmware.version);
    version_matches || md5_matches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firmware() -> Firmware {
        Firmware {
            id: 1,
            product_id: 1,
            version: "1.2.0".into(),
            size: 10,
            md5: "0123456789abcdef0123456789abcdef".into(),
            sha256: String::new(),
            format: "raw".into(),
            metadata: serde_json::Value::Null,
            created_at: 0,
        }
    }

    fn of_chip(id: Id, version: &str, chip: &str) -> Firmware {
        Firmware {
            id,
            version: version.into(),
            metadata: serde_json::json!({ "chip": chip }),
            ..firmware()
        }
    }

    #[test]
    fn a_release_gives_each_family_its_image() {
        let esp = of_chip(1, "2.0", "esp32c3");
        let linux = of_chip(2, "2.0-linux", "mender");
        let release = [esp.clone(), linux.clone()];
        assert_eq!(for_family(&release, Some(Family::Mender)), Some(&linux));
        assert_eq!(for_family(&release, Some(Family::Esp32)), Some(&esp));
        // No image of its family, or no family announced: the first, and the decision
        // names the wrong chip.
        assert_eq!(for_family(&release, Some(Family::SwUpdate)), Some(&esp));
        assert_eq!(for_family(&release, None), Some(&esp));
        assert_eq!(for_family(&[], Some(Family::Esp32)), None);
        assert_eq!(check_release(&release), Ok(()));
        assert_eq!(check_release(&[firmware()]), Ok(()));
        let twice = check_release(&[esp.clone(), of_chip(3, "2.1", "esp32s3")]).unwrap_err();
        assert!(twice.contains("2.0 and 2.1 are both for esp32"), "{twice}");
        let unknown = check_release(&[esp.clone(), firmware()]).unwrap_err();
        assert!(unknown.contains("no known chip family"), "{unknown}");
    }

    #[test]
    fn images_go_to_the_device_types_and_hardware_they_name() {
        let mender = Firmware {
            metadata: serde_json::json!({"chip": "mender", "device_types": ["rpi4", "bbb"]}),
            ..firmware()
        };
        assert_eq!(not_for_device(&mender, Some("rpi4"), None), None);
        let refused = not_for_device(&mender, Some("x86"), None).unwrap();
        assert!(
            refused.contains("device types rpi4, bbb; the device is x86"),
            "{refused}"
        );
        assert_eq!(not_for_device(&mender, None, None), None, "not said");
        let swu = Firmware {
            metadata: serde_json::json!({"chip": "swupdate", "hardware": ["1.0", "1.2"]}),
            ..firmware()
        };
        assert_eq!(not_for_device(&swu, None, Some("1.2")), None);
        let refused = not_for_device(&swu, None, Some("2.0")).unwrap();
        assert!(refused.contains("hardware revisions 1.0, 1.2"), "{refused}");
        assert_eq!(not_for_device(&firmware(), Some("x"), Some("y")), None);
    }

    #[test]
    fn a_new_release_keeps_the_old_images_of_families_it_lacks() {
        let esp_old = of_chip(1, "1.0", "esp32");
        let linux_old = of_chip(2, "1.0-linux", "swupdate");
        let esp_new = of_chip(3, "2.0", "esp32");
        assert_eq!(
            merge_release(
                std::slice::from_ref(&esp_new),
                &[esp_old.clone(), linux_old.clone()]
            ),
            vec![3, 2]
        );
        assert_eq!(
            merge_release(&[esp_new, linux_old.clone()], &[esp_old, linux_old]),
            vec![3, 2]
        );
    }

    fn old() -> Running<'static> {
        Running {
            version: Some("1.1.0"),
            ..Default::default()
        }
    }

    #[test]
    fn seed_002_table() {
        let fw = firmware();
        let same = Running {
            version: Some("1.2.0"),
            ..Default::default()
        };
        let app = Mode::App;
        assert_eq!(
            decide(DeviceStatus::New, Some(fw.clone()), &old(), app, None),
            Decision::NotAllowed(DeviceStatus::New)
        );
        assert_eq!(
            decide(DeviceStatus::Verified, None, &old(), app, None),
            Decision::NothingAssigned(Mode::App)
        );
        assert_eq!(
            decide(DeviceStatus::Verified, Some(fw.clone()), &same, app, None),
            Decision::UpToDate(fw.clone())
        );
        assert_eq!(
            decide(DeviceStatus::Verified, Some(fw.clone()), &old(), app, None),
            Decision::Update(fw.clone())
        );
    }

    #[test]
    fn modes() {
        let fw = firmware();
        let v = DeviceStatus::Verified;
        // A filesystem request never gets the app image.
        assert_eq!(
            decide(v, Some(fw.clone()), &old(), Mode::Filesystem, None),
            Decision::NothingAssigned(Mode::Filesystem)
        );
        // Version-only answers also when the device is current.
        let same = Running {
            version: Some("1.2.0"),
            ..Default::default()
        };
        assert_eq!(
            decide(v, Some(fw.clone()), &same, Mode::VersionOnly, None),
            Decision::VersionOnly(fw.clone())
        );
        assert_eq!(
            decide(v, None, &same, Mode::VersionOnly, None),
            Decision::NothingAssigned(Mode::VersionOnly)
        );
    }

    #[test]
    fn chip_families_must_match() {
        let mut fw = firmware();
        fw.metadata = serde_json::json!({"chip": "esp32c3"});
        let v = DeviceStatus::Verified;
        assert_eq!(
            decide(
                v,
                Some(fw.clone()),
                &old(),
                Mode::App,
                Some(Family::Esp8266)
            ),
            Decision::WrongChip {
                firmware: fw.clone(),
                image: Family::Esp32,
                device: Family::Esp8266
            }
        );
        assert_eq!(
            decide(v, Some(fw.clone()), &old(), Mode::App, Some(Family::Esp32)),
            Decision::Update(fw.clone())
        );
        // A device that does not say, or an image that does not say, is not refused.
        assert_eq!(
            decide(v, Some(fw.clone()), &old(), Mode::App, None),
            Decision::Update(fw.clone())
        );
    }

    #[test]
    fn installed_md5_counts_as_running() {
        let mut fw = firmware();
        fw.metadata = serde_json::json!({"installed_md5": "ffffffffffffffffffffffffffffffff"});
        let running = Running {
            version: Some("0.0.1"),
            sketch_md5: Some("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"),
            by_md5: true,
        };
        assert!(runs(&fw, &running));
    }

    #[test]
    fn md5_mode_ignores_version() {
        let fw = firmware();
        let running = Running {
            version: Some("1.2.0"),
            sketch_md5: Some("ffffffffffffffffffffffffffffffff"),
            by_md5: true,
        };
        assert_eq!(
            decide(
                DeviceStatus::Verified,
                Some(fw.clone()),
                &running,
                Mode::App,
                None
            ),
            Decision::Update(fw.clone())
        );
        let running = Running {
            version: Some("0.0.1"),
            sketch_md5: Some("0123456789ABCDEF0123456789ABCDEF"),
            by_md5: true,
        };
        assert_eq!(
            decide(
                DeviceStatus::Verified,
                Some(fw.clone()),
                &running,
                Mode::App,
                None
            ),
            Decision::UpToDate(fw.clone())
        );
    }
}
