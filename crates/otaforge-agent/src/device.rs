//! A device as the client sees it: the ESP-IDF OTA engine over some flash, fed by the
//! update client through [`UpdateSink`], plus what the device reports about itself.

use md5::{Digest, Md5};
use otaforge_device::ImageSize;
use otaforge_device::esp::{AppImage, BootOutcome, BootSlot, EspError, EspOta, OtaHandle};
use otaforge_device::flash::Flash;
use otaforge_formats::esp::{Chip, build};

use crate::client::{DeviceInfo, UpdateSink, hex};

/// Writes a download into the spare OTA slot; `finish` verifies it and makes it the boot
/// slot (the device still runs the old image until it reboots).
pub struct EspSink<'a, F: Flash> {
    ota: &'a mut EspOta<F>,
    handle: Option<OtaHandle>,
    /// The verified image, once `finish` succeeded.
    pub installed: Option<AppImage>,
}

impl<'a, F: Flash> EspSink<'a, F> {
    pub fn new(ota: &'a mut EspOta<F>) -> Self {
        EspSink {
            ota,
            handle: None,
            installed: None,
        }
    }
}

impl<F: Flash + Send> UpdateSink for EspSink<'_, F> {
    fn begin(&mut self, size: u64) -> Result<(), String> {
        let slot = self
            .ota
            .next_update_slot()
            .ok_or_else(|| "no spare OTA slot".to_string())?;
        let size =
            u32::try_from(size).map_err(|_| format!("an image of {size} bytes cannot fit"))?;
        let handle = self
            .ota
            .begin(slot, ImageSize::Known(size))
            .map_err(|e| e.to_string())?;
        self.handle = Some(handle);
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), String> {
        let handle = self.handle.as_mut().ok_or("write before begin")?;
        self.ota.write(handle, data).map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<(), String> {
        let handle = self.handle.take().ok_or("finish before begin")?;
        let slot = handle.slot();
        let image = self.ota.end(handle).map_err(|e| e.to_string())?;
        self.ota
            .set_boot_partition(BootSlot::Ota(slot))
            .map_err(|e| e.to_string())?;
        self.installed = Some(image);
        Ok(())
    }

    fn abort(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.ota.abort(handle);
        }
    }
}

/// The version and MD5 of the running image, as a device reports them.
pub fn running_identity<F: Flash>(
    ota: &mut EspOta<F>,
) -> Result<(String, Option<String>), EspError> {
    let Some(image) = ota.running_app().cloned() else {
        return Ok(("unknown".to_string(), None));
    };
    let version = image.version().unwrap_or("unknown").to_string();
    let region = ota
        .slot_region(image.slot)
        .ok_or(EspError::NoBootableImage)?;
    let mut bytes = vec![0u8; image.len as usize];
    ota.flash_mut().read(region.offset, &mut bytes)?;
    Ok((version, Some(hex(&Md5::digest(&bytes)))))
}

/// Fills in version and MD5 from the running image.
pub fn refresh_info<F: Flash>(ota: &mut EspOta<F>, info: &mut DeviceInfo) -> Result<(), EspError> {
    let (version, md5) = running_identity(ota)?;
    info.version = version;
    info.sketch_md5 = md5;
    Ok(())
}

/// Describes a boot for logs.
pub fn describe_boot(outcome: &BootOutcome) -> String {
    let version = outcome.image.version().unwrap_or("unknown");
    let mut s = format!("booted {} ({version})", outcome.slot);
    if outcome.rolled_back {
        s.push_str(", rolled back from an unconfirmed update");
    }
    if let Some(from) = outcome.fallback_from {
        s.push_str(&format!(", {from} did not verify"));
    }
    s
}

/// A small valid app image for `chip` carrying `version` in its `esp_app_desc_t`: what the
/// simulator flashes and serves when no image file is given. `filler` bytes of pseudo-random
/// data make it a realistic size.
pub fn demo_image(chip: Chip, project: &str, version: &str, filler: usize) -> Vec<u8> {
    let mut drom = build::app_desc(version, project, "v5.1.4");
    let mut x: u32 = 0x9E37_79B9
        ^ version
            .bytes()
            .fold(0u32, |a, b| a.rotate_left(5) ^ b as u32);
    drom.extend((0..filler).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x >> 24) as u8
    }));
    let code: Vec<u8> = (0..256u32).map(|i| (i * 31 % 251) as u8).collect();
    build::esp32_image(
        chip,
        0x4200_0020,
        &[
            build::SegmentSpec {
                load_addr: 0x3C00_0020,
                data: drom,
            },
            build::SegmentSpec {
                load_addr: 0x4200_0020,
                data: code,
            },
        ],
        true,
    )
}
