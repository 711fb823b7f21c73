//! The update decision of seed 002 as a plain function: who gets 401, 404, 304 or the file.

use otaforge_store::model::{DeviceStatus, Firmware};

/// What the device told us it runs.
#[derive(Debug, Clone, Default)]
pub struct Running<'a> {
    pub version: Option<&'a str>,
    pub sketch_md5: Option<&'a str>,
    /// Decide by MD5 of the running sketch rather than by version (`x-check-sketch-md5: 1`).
    pub by_md5: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The device may not update: not verified, blocked or disabled.
    NotAllowed(DeviceStatus),
    /// No firmware is assigned to the device's group.
    NoFirmware,
    /// The device already runs the assigned firmware.
    UpToDate,
    /// Send this firmware.
    Update,
}

/// Decides for a device whose credentials already checked out.
pub fn decide(status: DeviceStatus, assigned: Option<&Firmware>, running: &Running) -> Decision {
    if status != DeviceStatus::Verified {
        return Decision::NotAllowed(status);
    }
    let Some(firmware) = assigned else {
        return Decision::NoFirmware;
    };
    if runs(firmware, running) {
        Decision::UpToDate
    } else {
        Decision::Update
    }
}

/// Whether the device reports running exactly this firmware.
pub fn runs(firmware: &Firmware, running: &Running) -> bool {
    let md5_matches = running
        .sketch_md5
        .is_some_and(|md5| md5.trim().eq_ignore_ascii_case(&firmware.md5));
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

    #[test]
    fn seed_002_table() {
        let fw = firmware();
        let old = Running {
            version: Some("1.1.0"),
            ..Default::default()
        };
        let same = Running {
            version: Some("1.2.0"),
            ..Default::default()
        };
        assert_eq!(
            decide(DeviceStatus::New, Some(&fw), &old),
            Decision::NotAllowed(DeviceStatus::New)
        );
        assert_eq!(
            decide(DeviceStatus::Verified, None, &old),
            Decision::NoFirmware
        );
        assert_eq!(
            decide(DeviceStatus::Verified, Some(&fw), &same),
            Decision::UpToDate
        );
        assert_eq!(
            decide(DeviceStatus::Verified, Some(&fw), &old),
            Decision::Update
        );
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
            decide(DeviceStatus::Verified, Some(&fw), &running),
            Decision::Update
        );
        let running = Running {
            version: Some("0.0.1"),
            sketch_md5: Some("0123456789ABCDEF0123456789ABCDEF"),
            by_md5: true,
        };
        assert_eq!(
            decide(DeviceStatus::Verified, Some(&fw), &running),
            Decision::UpToDate
        );
    }
}
