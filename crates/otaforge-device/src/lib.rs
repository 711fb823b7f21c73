//! The device half of OTA, testable on a PC: a NOR flash model, the ESP-IDF `esp_ota_ops` API
//! with a model of its second-stage bootloader (slot choice, rollback), and the WM IoT SDK
//! `wm_ota_ops` API with a model of the W800 bootloader (verify, xz-decompress, copy).
//!
//! Architecture invariant: everything here is plain code over a [`flash::Flash`]: no clock, no
//! network, no threads. The simulator drives thousands of [`flash::SimFlash`] devices; a test
//! cuts power at any flash operation and boots again. The byte formats (app images, partition
//! tables, otadata, W800 headers) come from `otaforge-formats` and are not re-implemented.
//! No input bytes make this crate panic: indexing, slicing and overflowing arithmetic are
//! denied by lints outside tests, as in `otaforge-formats`.

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
#[cfg(feature = "std")]
extern crate std;

mod common;
pub mod esp;
pub mod flash;
pub mod w800;
pub mod xz;

pub use common::{ImageSize, Region};
