//! Test images and devices shared by the integration tests.

#![allow(dead_code)]

use otaforge_device::esp::{self, EspConfig, EspOta, Layout};
use otaforge_device::flash::{Flash, SimFlash};
use otaforge_device::w800::{self, W800Config, W800Layout, W800Ota};
use otaforge_formats::esp::Chip;
use otaforge_formats::esp::build::{SegmentSpec, app_desc, esp32_image};
use otaforge_formats::w800::build_image;

/// Deterministic test data: words, runs, random words and copies of earlier bytes. The same
/// function as `payload` in tests/fixtures/make_fixtures.py.
pub fn payload(n: usize) -> Vec<u8> {
    let words: [&[u8]; 6] = [
        b"esp_ota_begin ",
        b"wm_ota_ops_write ",
        b"bootloader ",
        b"0xdeadbeef ",
        b"\x00\x00\x00\x00",
        b"partition ",
    ];
    let mut out: Vec<u8> = Vec::new();
    let mut x: u32 = 0x1234_5678;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        match x % 4 {
            0 => out.extend_from_slice(words[((x >> 8) % 6) as usize]),
            1 => {
                let run = ((x >> 16) % 40 + 1) as usize;
                out.extend(std::iter::repeat_n(((x >> 8) & 0xFF) as u8, run));
            }
            2 => out.extend_from_slice(&x.to_le_bytes()),
            _ if !out.is_empty() => {
                let start = (x >> 8) as usize % out.len();
                let len = ((x >> 20) % 60 + 4) as usize;
                let end = (start + len).min(out.len());
                let copy = out[start..end].to_vec();
                out.extend_from_slice(&copy);
            }
            _ => {}
        }
    }
    out.truncate(n);
    out
}

/// Incompressible bytes, as `noise` in make_fixtures.py.
pub fn noise(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 4);
    let mut x: u32 = 0x9E37_79B9;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

pub fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// An ESP32 app image with an `esp_app_desc_t` (version) and `code_len` bytes of code made
/// from `seed`.
pub fn esp_app(chip: Chip, version: &str, code_len: usize, seed: u8) -> Vec<u8> {
    let mut drom = app_desc(version, "otaforge-test", "v5.1");
    drom.extend((0..code_len / 2).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    let code: Vec<u8> = (0..code_len / 2)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect();
    esp32_image(
        chip,
        0x4200_0020,
        &[
            SegmentSpec {
                load_addr: 0x3C00_0020,
                data: drom,
            },
            SegmentSpec {
                load_addr: 0x4200_0020,
                data: code,
            },
        ],
        true,
    )
}

pub const CHIP: Chip = Chip::Esp32C3;

pub fn esp_config() -> EspConfig {
    EspConfig {
        expected_chip: CHIP,
        rollback: true,
    }
}

/// A device that has booted `first` once (into ota_0, or factory when the layout has one).
pub fn esp_device(layout: &Layout, first: &[u8]) -> SimFlash {
    let mut flash = SimFlash::new(layout.flash_size).unwrap();
    esp::init_flash(&mut flash, layout, Some(first)).unwrap();
    let mut ota = EspOta::open(&mut flash, esp_config()).unwrap();
    ota.boot().unwrap();
    flash
}

/// The bytes of the image the device runs, read from its slot.
pub fn running_bytes<F: Flash>(ota: &mut EspOta<F>) -> Vec<u8> {
    let app = ota.running_app().unwrap().clone();
    let region = ota.slot_region(app.slot).unwrap();
    let mut bytes = vec![0u8; app.len as usize];
    ota.flash_mut().read(region.offset, &mut bytes).unwrap();
    bytes
}

/// The W800 layout the fixtures were made for (`app` 0xF000, `app_ota` 0x1F000).
pub fn w800_layout() -> W800Layout {
    W800Layout::small(0x10000, 0x8000)
}

/// An `.img` for `app` of the test layout.
pub fn w800_img(version: &str, upd_no: u32, body: &[u8]) -> Vec<u8> {
    build_image(&w800_layout().app_header(version, upd_no), body).unwrap()
}

/// The xz OTA image of the fixture: `v2.0.0`, upd_no 2, 24 KiB of `payload`.
pub fn w800_v2() -> (Vec<u8>, Vec<u8>) {
    let inner = w800_img("v2.0.0", 2, &payload(24 * 1024));
    let ota = build_image(
        &w800_layout().ota_header("v2.0.0", 2),
        &fixture("w800_app_v2.img.xz"),
    )
    .unwrap();
    (inner, ota)
}

/// The running image of the W800 tests: `v1.0.0`, 20 KiB.
pub fn w800_v1() -> Vec<u8> {
    w800_img("v1.0.0", 1, &noise(20 * 1024))
}

/// A booted W800 device running `app`.
pub fn w800_device(app: &[u8]) -> SimFlash {
    let layout = w800_layout();
    let mut flash = SimFlash::new(layout.flash_size).unwrap();
    w800::init_flash(&mut flash, &layout, Some(app)).unwrap();
    let mut ota = W800Ota::new(&mut flash, layout, W800Config::default()).unwrap();
    ota.boot().unwrap();
    flash
}

/// The image in `app` (header + payload).
pub fn w800_app_bytes<F: Flash>(ota: &mut W800Ota<F>) -> Vec<u8> {
    let header = ota.running().unwrap().clone();
    let mut bytes = vec![0u8; 64 + header.payload_len as usize];
    let at = ota.layout().app.offset;
    ota.flash_mut().read(at, &mut bytes).unwrap();
    bytes
}
