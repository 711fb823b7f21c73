//! Byte formats of OTA images: ESP32/ESP8266 app images, ESP-IDF partition tables and otadata,
//! WinnerMicro W800 images, and the upload-time detection that tells them apart.
//!
//! Architecture invariant: this crate does no I/O. Every function takes bytes or plain values
//! and returns plain values, so it can be tested, fuzzed and reused by the server, the CLI and
//! the device simulator alike. Parsers take untrusted bytes and never panic: indexing,
//! slicing and overflowing arithmetic are denied by lints outside tests.
//!
//! Byte facts follow ESP-IDF (`esp_image_format.h`, `esp_app_desc.h`, `gen_esp32part.py`,
//! `esp_flash_partitions.h`), esptool (`bin_image.py`), esp8266/Arduino (`tools/elf2bin.py`) and
//! the WM IoT SDK (`wm_ota_ops.h`, `tools/wm/bin2img.py`).

#![no_std]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

extern crate alloc;

mod bytes;
pub mod delta;
pub mod detect;
pub mod esp;
pub mod flash;
pub mod mender;
pub mod otadata;
pub mod partition;
pub mod sbv2;
pub mod swu;
pub mod w800;
