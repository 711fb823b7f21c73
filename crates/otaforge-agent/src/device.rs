//! A device as the client sees it: the ESP-IDF OTA engine over some flash, fed by the
//! update client through [`UpdateSink`], plus what the device reports about itself.

use md5::{Digest, Md5};
use otaforge_device::ImageSize;
use otaforge_device::esp::{AppImage, BootOutcome, BootSlot, EspError, EspOta, OtaHandle};
use otaforge_device::flash::Flash;
use otaforge_device::w800::{W800Handle, W800Layout, W800Ota};
use otaforge_formats::esp::{Chip, build};
use otaforge_formats::w800 as w800_image;

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

    /// The flash being written.
    pub fn flash_mut(&mut self) -> &mut F {
        self.ota.flash_mut()
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

/// Writes a download into a W800's `app_ota` partition the way `wm_ota_ops` does; the
/// bootloader unpacks (xz) or copies it into `app` on the next reboot.
pub struct W800Sink<'a, F: Flash> {
    ota: &'a mut W800Ota<F>,
    handle: Option<W800Handle>,
}

impl<'a, F: Flash> W800Sink<'a, F> {
    pub fn new(ota: &'a mut W800Ota<F>) -> Self {
        W800Sink { ota, handle: None }
    }

    /// The flash being written.
    pub fn flash_mut(&mut self) -> &mut F {
        self.ota.flash_mut()
    }
}

impl<F: Flash + Send> UpdateSink for W800Sink<'_, F> {
    fn begin(&mut self, size: u64) -> Result<(), String> {
        let size =
            u32::try_from(size).map_err(|_| format!("an image of {size} bytes cannot fit"))?;
        let handle = self
            .ota
            .begin(ImageSize::Known(size))
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
        self.ota.end(handle).map(|_| ()).map_err(|e| e.to_string())
    }

    fn abort(&mut self) {
        if let Some(handle) = self.handle.take() {
            self.ota.abort(handle);
        }
    }
}

/// A W800 application image (`.img`) for `layout` carrying `version`, with `filler` bytes of
/// pseudo-random code: what a simulated W800 runs from the start.
pub fn demo_w800_image(layout: &W800Layout, version: &str, filler: usize) -> Vec<u8> {
    let code = filler_bytes(version, filler);
    w800_image::build_image(&layout.app_header(version, 1), &code)
        .expect("a demo W800 image fits its header")
}

/// The xz OTA image of [`demo_w800_image`] (the `.img` compressed whole, under an OTA header
/// marked xz), as the WM IoT SDK's tools make them for `wm_ota_ops`.
pub fn demo_w800_ota(layout: &W800Layout, version: &str, filler: usize) -> Vec<u8> {
    let inner = demo_w800_image(layout, version, filler);
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut &inner[..], &mut xz).expect("compressing into memory");
    declare_small_dictionary(&mut xz);
    w800_image::build_image(&layout.ota_header(version, 2), &xz)
        .expect("a demo W800 OTA image fits its header")
}

/// lzma-rs declares an 8 MiB LZMA2 dictionary though its encoder emits no matches at all;
/// the W800 bootloader sizes its buffer by that field (at most 64 KiB). Declares 32 KiB, as
/// the SDK's `bin2img.py` images do, in the first block header, and mends the header's CRC.
fn declare_small_dictionary(xz: &mut [u8]) {
    const STREAM_HEADER: usize = 12;
    const DICT_32_KIB: u8 = 6; // (2 | 0) << (6 / 2 + 11)
    let Some(&size_byte) = xz.get(STREAM_HEADER) else {
        return;
    };
    let header_len = (usize::from(size_byte) + 1) * 4;
    let Some(header) = xz.get_mut(STREAM_HEADER..STREAM_HEADER + header_len) else {
        return;
    };
    let flags = header[1];
    let mut at = 2;
    // Optional compressed and uncompressed sizes (multibyte integers) come first.
    for present in [flags & 0x40 != 0, flags & 0x80 != 0] {
        if present {
            while at < header.len() && header[at] & 0x80 != 0 {
                at += 1;
            }
            at += 1;
        }
    }
    // The one filter: LZMA2 (id 0x21), one property byte: the dictionary size.
    if header
        .get(at..at + 3)
        .is_some_and(|f| f[0] == 0x21 && f[1] == 1)
    {
        header[at + 2] = DICT_32_KIB;
        let body = header_len - 4;
        let crc = crc32fast::hash(&header[..body]);
        header[body..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Deterministic pseudo-random bytes, different per version, with some repetition as code
/// has (so compression has something to do).
fn filler_bytes(version: &str, n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9
        ^ version
            .bytes()
            .fold(0u32, |a, b| a.rotate_left(5) ^ b as u32);
    (0..n)
        .map(|i| {
            if i % 64 < 32 {
                (i % 7) as u8
            } else {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            }
        })
        .collect()
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
