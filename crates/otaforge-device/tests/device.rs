//! Stories of one device: ESP-IDF updates, rollback and refusals of bad bytes; W800 updates
//! through the bootloader; the xz decoder against liblzma's output.

mod support;

use otaforge_device::ImageSize;
use otaforge_device::esp::{self, BootSlot, EspConfig, EspError, EspOta, Layout};
use otaforge_device::flash::{Flash, FlashError, SimFlash};
use otaforge_device::w800::{
    self, HeaderProblem, UpdateAction, W800Config, W800Ota, W800OtaError, copy_memory_bound,
};
use otaforge_device::xz::{self, XzError, XzLimits};
use otaforge_formats::esp::{Chip, EspImageError};
use otaforge_formats::otadata::OtaState;
use otaforge_formats::w800::{W800Error, W800Header, build_image};
use proptest::prelude::*;
use support::*;

const SLOT: u32 = 0x10000;

fn open(flash: &mut SimFlash) -> EspOta<&mut SimFlash> {
    EspOta::open(flash, esp_config()).unwrap()
}

/// Writes `image` into the next slot in `chunk`-byte writes and returns the slot.
fn download<F: Flash>(
    ota: &mut EspOta<F>,
    image: &[u8],
    size: ImageSize,
    chunk: usize,
) -> Result<u8, EspError> {
    let slot = ota.next_update_slot().unwrap();
    let mut handle = ota.begin(slot, size)?;
    for piece in image.chunks(chunk) {
        ota.write(&mut handle, piece)?;
    }
    ota.end(handle)?;
    Ok(slot)
}

// ------------------------------------------------------------------------------------ ESP-IDF

#[test]
fn first_boot_of_a_fresh_flash_writes_otadata_like_esp_idf() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let mut flash = SimFlash::new(layout.flash_size).unwrap();
    esp::init_flash(&mut flash, &layout, Some(&v1)).unwrap();
    let mut ota = open(&mut flash);
    assert_eq!(ota.slot_count(), 2);
    assert_eq!(ota.partition_table(), &layout.partition_table());
    assert_eq!(ota.get_state_partition(0).unwrap(), None);
    let boot = ota.boot().unwrap();
    assert_eq!(boot.slot, BootSlot::Ota(0));
    assert_eq!(boot.app().unwrap().version, "1.0.0");
    assert!(!boot.rolled_back && boot.fallback_from.is_none());
    // bootloader_utility set_actual_ota_seq: otadata[0] = seq 1, VALID.
    let entries = ota.read_otadata().unwrap();
    assert_eq!((entries[0].seq, entries[0].state), (1, OtaState::Valid));
    assert_eq!(ota.get_state_partition(0).unwrap(), Some(OtaState::Valid));
    assert_eq!(ota.next_update_slot(), Some(1));
    assert_eq!(running_bytes(&mut ota), v1);
}

#[test]
fn default_4mb_matches_partitions_two_ota() {
    let layout = Layout::default_4mb();
    let table = layout.partition_table();
    let rows: Vec<(&str, u32, u32)> = table
        .entries
        .iter()
        .map(|e| (e.label.as_str(), e.offset, e.size))
        .collect();
    assert_eq!(
        rows,
        [
            ("nvs", 0x9000, 0x4000),
            ("otadata", 0xD000, 0x2000),
            ("phy_init", 0xF000, 0x1000),
            ("factory", 0x10000, 0x100000),
            ("ota_0", 0x110000, 0x100000),
            ("ota_1", 0x210000, 0x100000),
        ]
    );
    let factory = esp_app(CHIP, "factory", 4000, 9);
    let mut flash = esp_device(&layout, &factory);
    assert!(
        flash.resident_bytes() < 64 * 1024,
        "a 4 MB simulated flash holds only what was written"
    );
    let mut ota = open(&mut flash);
    assert_eq!(ota.boot().unwrap().slot, BootSlot::Factory);
    assert_eq!(ota.next_update_slot(), Some(0));
    assert_eq!(ota.boot_partition().unwrap(), Some(BootSlot::Factory));
    // Factory running: nothing to mark.
    assert_eq!(
        ota.mark_app_valid_cancel_rollback(),
        Err(EspError::RunningFactory)
    );
}

#[test]
fn update_boots_pending_verify_and_mark_valid_keeps_it() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    let slot = download(&mut ota, &v2, ImageSize::Known(v2.len() as u32), 1000).unwrap();
    assert_eq!(slot, 1);
    ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    assert_eq!(ota.get_state_partition(1).unwrap(), Some(OtaState::New));
    assert_eq!(ota.boot_partition().unwrap(), Some(BootSlot::Ota(1)));
    // The entry went into the sector not holding the active one.
    let entries = ota.read_otadata().unwrap();
    assert_eq!((entries[1].seq, entries[1].state), (2, OtaState::New));

    let boot = ota.boot().unwrap();
    assert_eq!(boot.slot, BootSlot::Ota(1));
    assert_eq!(boot.app().unwrap().version, "2.0.0");
    assert_eq!(
        ota.get_state_partition(1).unwrap(),
        Some(OtaState::PendingVerify)
    );
    // No new update while unconfirmed.
    assert_eq!(
        ota.begin(0, ImageSize::Unknown).unwrap_err(),
        EspError::PendingVerify
    );
    ota.mark_app_valid_cancel_rollback().unwrap();
    assert_eq!(ota.get_state_partition(1).unwrap(), Some(OtaState::Valid));
    // Marking again writes nothing.
    let ops = ota.flash().ops();
    ota.mark_app_valid_cancel_rollback().unwrap();
    assert_eq!(ota.flash().ops(), ops);
    // Reboots keep v2.
    let boot = ota.boot().unwrap();
    assert_eq!((boot.slot, boot.rolled_back), (BootSlot::Ota(1), false));
    assert_eq!(running_bytes(&mut ota), v2);
    assert_eq!(ota.next_update_slot(), Some(0));
}

#[test]
fn unconfirmed_update_rolls_back_at_the_next_boot() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    download(&mut ota, &v2, ImageSize::Sequential, 4096).unwrap();
    ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    // NEW -> PENDING_VERIFY at the first boot.
    assert_eq!(ota.boot().unwrap().slot, BootSlot::Ota(1));
    // Not confirmed: PENDING_VERIFY -> ABORTED at the next boot, back to the old slot.
    let boot = ota.boot().unwrap();
    assert_eq!(boot.slot, BootSlot::Ota(0));
    assert!(boot.rolled_back);
    assert_eq!(boot.app().unwrap().version, "1.0.0");
    assert_eq!(ota.get_state_partition(1).unwrap(), Some(OtaState::Aborted));
    assert_eq!(running_bytes(&mut ota), v1);
    // And it stays there.
    let boot = ota.boot().unwrap();
    assert_eq!((boot.slot, boot.rolled_back), (BootSlot::Ota(0), false));
}

#[test]
fn mark_invalid_rolls_back_now() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    // Only one app: rollback is not possible.
    assert_eq!(
        ota.mark_app_invalid_rollback_and_reboot().unwrap_err(),
        EspError::RollbackNotPossible
    );
    download(&mut ota, &v2, ImageSize::Unknown, 3000).unwrap();
    ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    ota.boot().unwrap();
    let boot = ota.mark_app_invalid_rollback_and_reboot().unwrap();
    assert_eq!(boot.slot, BootSlot::Ota(0));
    assert_eq!(ota.get_state_partition(1).unwrap(), Some(OtaState::Invalid));
    assert_eq!(running_bytes(&mut ota), v1);
}

#[test]
fn without_rollback_entries_stay_undefined() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let mut flash = esp_device(&layout, &v1);
    let config = EspConfig {
        rollback: false,
        ..esp_config()
    };
    let mut ota = EspOta::open(&mut flash, config).unwrap();
    ota.boot().unwrap();
    download(&mut ota, &v2, ImageSize::Unknown, 4096).unwrap();
    ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    assert_eq!(
        ota.get_state_partition(1).unwrap(),
        Some(OtaState::Undefined)
    );
    for _ in 0..2 {
        assert_eq!(ota.boot().unwrap().slot, BootSlot::Ota(1));
    }
}

#[test]
fn bootloader_falls_back_when_the_chosen_slot_does_not_verify() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    download(&mut ota, &v2, ImageSize::Unknown, 4096).unwrap();
    ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    // Flash rot in slot 1 after it was selected: clear a bit in its code.
    let mut at = layout.ota[1].offset + 0x200;
    let mut b = [0u8; 1];
    loop {
        ota.flash_mut().read(at, &mut b).unwrap();
        if b[0] != 0 {
            break;
        }
        at += 1;
    }
    ota.flash_mut().write(at, &[b[0] & (b[0] - 1)]).unwrap();
    let boot = ota.boot().unwrap();
    assert_eq!(boot.slot, BootSlot::Ota(0));
    assert_eq!(boot.fallback_from, Some(BootSlot::Ota(1)));
    // The selected entry went PENDING_VERIFY, and is aborted at the next boot.
    let boot = ota.boot().unwrap();
    assert_eq!((boot.slot, boot.rolled_back), (BootSlot::Ota(0), true));
}

#[test]
fn nothing_bootable_is_an_error() {
    let layout = Layout::small(SLOT);
    let mut flash = SimFlash::new(layout.flash_size).unwrap();
    esp::init_flash(&mut flash, &layout, None).unwrap();
    let mut ota = open(&mut flash);
    let err = ota.boot().unwrap_err();
    assert_eq!(err, EspError::NoBootableImage);
    assert_eq!(
        err.to_string(),
        "no bootable image: no app partition holds an image that verifies"
    );
    assert_eq!(ota.running_slot(), None);
    assert_eq!(
        ota.begin(1, ImageSize::Unknown).unwrap_err(),
        EspError::NotBooted
    );
}

/// Runs a refused update of `bad` and checks that otadata and the running image are as they
/// were, and that the device still boots the old image.
fn refused(bad: &[u8], size: ImageSize) -> EspError {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    let otadata = ota.otadata_bytes().unwrap();
    let before = running_bytes(&mut ota);
    let result = download(&mut ota, bad, size, 1000);
    let err = match result {
        Ok(slot) => ota
            .set_boot_partition(BootSlot::Ota(slot))
            .expect_err("a bad image must be refused"),
        Err(e) => {
            // set_boot_partition refuses the half-written slot too.
            assert!(ota.set_boot_partition(BootSlot::Ota(1)).is_err());
            e
        }
    };
    assert_eq!(ota.otadata_bytes().unwrap(), otadata, "otadata untouched");
    assert_eq!(running_bytes(&mut ota), before, "running image untouched");
    assert_eq!(ota.boot().unwrap().slot, BootSlot::Ota(0));
    err
}

#[test]
fn bad_bytes_are_refused_and_leave_otadata_untouched() {
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    let unknown = ImageSize::Unknown;

    let err = refused(&v2[..v2.len() - 10], unknown);
    assert!(
        matches!(err, EspError::Image(EspImageError::HashPastEnd { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("invalid app image: appended sha-256")
    );

    let err = refused(&v2[..5000], unknown);
    assert!(
        matches!(err, EspError::Image(EspImageError::SegmentPastEnd { .. })),
        "{err}"
    );

    let mut bad = v2.clone();
    bad[0] = 0xEA;
    let err = refused(&bad, unknown);
    assert_eq!(err, EspError::BadMagic { found: 0xEA });
    assert_eq!(
        err.to_string(),
        "first byte is 0xea, an esp app image starts with 0xe9"
    );

    // A flipped data byte: the XOR checksum catches it first.
    let mut bad = v2.clone();
    bad[0x400] ^= 0x10;
    let err = refused(&bad, unknown);
    assert!(
        matches!(err, EspError::Image(EspImageError::ChecksumMismatch { .. })),
        "{err}"
    );

    // A flipped padding byte before the checksum: only the SHA-256 catches it.
    let img = otaforge_formats::esp::parse_image(&v2).unwrap();
    let mut bad = v2.clone();
    bad[img.checksum_offset - 1] ^= 0x01;
    let err = refused(&bad, unknown);
    assert!(
        matches!(err, EspError::Image(EspImageError::HashMismatch { .. })),
        "{err}"
    );

    let other_chip = esp_app(Chip::Esp32S3, "2.0.0", 9000, 2);
    let err = refused(&other_chip, unknown);
    assert_eq!(
        err,
        EspError::WrongChip {
            expected: CHIP,
            found: Chip::Esp32S3
        }
    );
    assert_eq!(
        err.to_string(),
        "image is built for esp32s3, this device is an esp32c3"
    );

    // Too big for the slot: announced size, then written bytes.
    let huge = esp_app(CHIP, "2.0.0", SLOT as usize + 100, 2);
    let err = refused(&huge, ImageSize::Known(huge.len() as u32));
    assert!(matches!(err, EspError::ImageTooLarge { .. }), "{err}");
    let err = refused(&huge, ImageSize::Sequential);
    assert!(matches!(err, EspError::WritePastSlot { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "write of 984 bytes at offset 0xfde8 runs past the end of the 0x10000-byte slot"
    );
}

#[test]
fn api_refusals() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let mut flash = esp_device(&layout, &v1);
    let mut ota = open(&mut flash);
    ota.boot().unwrap();
    assert_eq!(
        ota.begin(0, ImageSize::Unknown).unwrap_err(),
        EspError::RunningSlot {
            slot: BootSlot::Ota(0)
        }
    );
    assert_eq!(
        ota.begin(0, ImageSize::Unknown).unwrap_err().to_string(),
        "ota_0 is the running app and cannot be written"
    );
    assert_eq!(
        ota.begin(2, ImageSize::Unknown).unwrap_err().to_string(),
        "there is no ota_2 in the partition table"
    );
    assert_eq!(
        ota.set_boot_partition(BootSlot::Factory).unwrap_err(),
        EspError::NoSuchSlot {
            slot: BootSlot::Factory
        }
    );
    let handle = ota.begin(1, ImageSize::Known(100)).unwrap();
    assert_eq!(ota.end(handle).unwrap_err(), EspError::NothingWritten);
    let mut handle = ota.begin(1, ImageSize::Sequential).unwrap();
    ota.write(&mut handle, &[]).unwrap();
    ota.write(&mut handle, &v1[..10]).unwrap();
    assert_eq!(handle.written(), 10);
    ota.abort(handle);
    // An erased (or half-written) slot cannot become the boot slot.
    assert!(matches!(
        ota.set_boot_partition(BootSlot::Ota(1)),
        Err(EspError::Image(_))
    ));
}

#[test]
fn a_broken_partition_table_is_refused() {
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let mut flash = esp_device(&layout, &v1);
    // Clear a bit in the first row's label: the MD5 row no longer matches.
    flash.write(0x8000 + 12, &[b'n' & !0x04]).unwrap();
    let err = EspOta::open(&mut flash, esp_config()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("partition table at 0x8000: partition table md5 mismatch"),
        "{err}"
    );
}

#[cfg(feature = "std")]
#[test]
fn file_flash_runs_the_same_update() {
    let dir = std::env::temp_dir().join(format!("otaforge-device-esp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flash.bin");
    let layout = Layout::small(SLOT);
    let v1 = esp_app(CHIP, "1.0.0", 6000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 9000, 2);
    {
        let mut flash =
            otaforge_device::flash::FileFlash::create(&path, layout.flash_size).unwrap();
        esp::init_flash(&mut flash, &layout, Some(&v1)).unwrap();
        let mut ota = EspOta::open(flash, esp_config()).unwrap();
        ota.boot().unwrap();
        download(&mut ota, &v2, ImageSize::Sequential, 777).unwrap();
        ota.set_boot_partition(BootSlot::Ota(1)).unwrap();
    }
    let flash = otaforge_device::flash::FileFlash::open(&path).unwrap();
    let mut ota = EspOta::open(flash, esp_config()).unwrap();
    assert_eq!(ota.boot().unwrap().app().unwrap().version, "2.0.0");
    ota.mark_app_valid_cancel_rollback().unwrap();
    assert_eq!(running_bytes(&mut ota), v2);
    std::fs::remove_dir_all(&dir).unwrap();
}

// --------------------------------------------------------------------------------------- W800

fn w800(flash: &mut SimFlash) -> W800Ota<&mut SimFlash> {
    W800Ota::new(flash, w800_layout(), W800Config::default()).unwrap()
}

fn w800_download<F: Flash>(
    ota: &mut W800Ota<F>,
    image: &[u8],
    size: ImageSize,
    chunk: usize,
) -> Result<W800Header, W800OtaError> {
    let mut handle = ota.begin(size)?;
    for piece in image.chunks(chunk) {
        ota.write(&mut handle, piece)?;
    }
    ota.end(handle)
}

#[test]
fn w800_xz_update_is_unpacked_into_app() {
    let v1 = w800_v1();
    let (v2_img, v2_ota) = w800_v2();
    assert!(v2_ota.len() < 5000, "the fixture is xz-compressed");
    let mut flash = w800_device(&v1);
    let mut ota = w800(&mut flash);
    let boot = ota.boot().unwrap();
    assert_eq!(boot.action, UpdateAction::None);
    assert_eq!(ota.get_version(), Some("v1.0.0"));
    let header = w800_download(&mut ota, &v2_ota, ImageSize::Sequential, 1024).unwrap();
    assert!(header.is_xz());
    assert!(ota.has_pending_update().unwrap());
    // Nothing changes until the reboot.
    assert_eq!(w800_app_bytes(&mut ota), v1);
    let boot = ota.reboot().unwrap();
    assert_eq!(boot.action, UpdateAction::Applied { xz: true });
    assert_eq!(boot.header.version, "v2.0.0");
    assert_eq!(ota.get_version(), Some("v2.0.0"));
    assert_eq!(w800_app_bytes(&mut ota), v2_img);
    assert!(!ota.has_pending_update().unwrap(), "app_ota invalidated");
    assert_eq!(ota.boot().unwrap().action, UpdateAction::None);
}

#[test]
fn w800_plain_update_is_copied() {
    let v1 = w800_v1();
    let v3 = w800_img("v3.0.0", 3, &payload(9000));
    let mut flash = w800_device(&v1);
    let mut ota = w800(&mut flash);
    ota.boot().unwrap();
    w800_download(&mut ota, &v3, ImageSize::Known(v3.len() as u32), 4096).unwrap();
    let boot = ota.reboot().unwrap();
    assert_eq!(boot.action, UpdateAction::Applied { xz: false });
    assert_eq!(w800_app_bytes(&mut ota), v3);
}

#[test]
fn w800_refuses_bad_headers_and_bytes() {
    let v1 = w800_v1();
    let (_, v2_ota) = w800_v2();
    let mut flash = w800_device(&v1);
    let mut ota = w800(&mut flash);
    ota.boot().unwrap();

    let err = w800_download(&mut ota, &v2_ota, ImageSize::Unknown, 32).unwrap_err();
    assert_eq!(err, W800OtaError::HeaderTooShort { len: 32 });

    let mut bad = v2_ota.clone();
    bad[0] = 0;
    let err = w800_download(&mut ota, &bad, ImageSize::Unknown, 4096).unwrap_err();
    assert!(
        matches!(err, W800OtaError::Header(W800Error::BadMagic { .. })),
        "{err}"
    );

    let mut bad = v2_ota.clone();
    bad[40] ^= 1;
    let err = w800_download(&mut ota, &bad, ImageSize::Unknown, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            W800OtaError::Header(W800Error::HeaderChecksumMismatch { .. })
        ),
        "{err}"
    );

    let layout = w800_layout();
    let refused_header = |h: W800Header| build_image(&h, &[1, 2, 3, 4]).unwrap();
    let cases = [
        (
            W800Header {
                img_type: 0,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::ImageType(0),
        ),
        (
            W800Header {
                gzip: true,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::Gzip,
        ),
        (
            W800Header {
                compress_type: 2,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::CompressType(2),
        ),
        (
            W800Header {
                run_addr: 0x0801_0400,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::RunAddress(0x0801_0400),
        ),
        (
            W800Header {
                header_addr: 0x0801_0000,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::HeaderAddress(0x0801_0000),
        ),
        (
            W800Header {
                upgrade_addr: 0x0801_0000,
                ..layout.app_header("x", 1)
            },
            HeaderProblem::UpgradeAddress(0x0801_0000),
        ),
    ];
    for (header, problem) in cases {
        let err =
            w800_download(&mut ota, &refused_header(header), ImageSize::Unknown, 4096).unwrap_err();
        assert_eq!(err, W800OtaError::HeaderRefused(problem));
    }
    assert_eq!(
        W800OtaError::HeaderRefused(HeaderProblem::Gzip).to_string(),
        "image header refused: gzip images are not supported, only xz"
    );

    // A payload larger than app_ota, by header and by size.
    let mut big = layout.app_header("x", 1);
    big.payload_len = layout.app_ota.size;
    let mut bytes = big.encode().to_vec();
    bytes.extend_from_slice(&[0; 16]);
    let err = w800_download(&mut ota, &bytes, ImageSize::Unknown, 4096).unwrap_err();
    assert!(matches!(err, W800OtaError::ImageTooLarge { .. }), "{err}");
    let err = ota
        .begin(ImageSize::Known(layout.app_ota.size + 1))
        .unwrap_err();
    assert!(matches!(err, W800OtaError::ImageTooLarge { .. }), "{err}");

    // Truncated, and a flipped payload byte.
    let err = w800_download(&mut ota, &v2_ota[..2000], ImageSize::Unknown, 4096).unwrap_err();
    assert!(matches!(err, W800OtaError::Truncated { .. }), "{err}");
    let mut bad = v2_ota.clone();
    bad[1000] ^= 0x40;
    let err = w800_download(&mut ota, &bad, ImageSize::Unknown, 4096).unwrap_err();
    assert!(
        matches!(
            err,
            W800OtaError::Image(W800Error::PayloadChecksumMismatch { .. })
        ),
        "{err}"
    );
    // None of it reaches app, and the refused image in app_ota is not an update.
    assert_eq!(ota.boot().unwrap().action, UpdateAction::None);
    assert_eq!(w800_app_bytes(&mut ota), v1);
}

#[test]
fn w800_bootloader_rejects_an_update_whose_content_is_bad() {
    let v1 = w800_v1();
    let layout = w800_layout();
    // A valid xz stream (CRCs fine) of an .img whose payload CRC is wrong.
    let mut inner = w800_img("v9.0.0", 9, &payload(5000));
    inner[100] ^= 1;
    let mut xz_bytes = Vec::new();
    lzma_rs::xz_compress(&mut &inner[..], &mut xz_bytes).unwrap();
    let ota_img = build_image(&layout.ota_header("v9.0.0", 9), &xz_bytes).unwrap();
    let mut flash = w800_device(&v1);
    let mut ota = w800(&mut flash);
    ota.boot().unwrap();
    w800_download(&mut ota, &ota_img, ImageSize::Unknown, 4096).unwrap();
    let ops = ota.flash().ops();
    let boot = ota.reboot().unwrap();
    assert!(
        matches!(
            boot.action,
            UpdateAction::Rejected(W800OtaError::InnerImage(
                W800Error::PayloadChecksumMismatch { .. }
            ))
        ),
        "{:?}",
        boot.action
    );
    assert_eq!(
        ota.flash().ops(),
        ops + 1,
        "only the app_ota header sector was erased"
    );
    assert_eq!(w800_app_bytes(&mut ota), v1);
    assert_eq!(ota.boot().unwrap().action, UpdateAction::None);

    // An image whose xz dictionary needs more than the bootloader allows.
    let mut flash = w800_device(&v1);
    let mut ota = W800Ota::new(
        &mut flash,
        layout,
        W800Config {
            max_dict_size: 16 * 1024,
        },
    )
    .unwrap();
    ota.boot().unwrap();
    let (_, v2_ota) = w800_v2();
    w800_download(&mut ota, &v2_ota, ImageSize::Unknown, 4096).unwrap();
    let boot = ota.reboot().unwrap();
    assert!(
        matches!(
            boot.action,
            UpdateAction::Rejected(W800OtaError::Xz(XzError::DictTooLarge { .. }))
        ),
        "{:?}",
        boot.action
    );
    assert_eq!(w800_app_bytes(&mut ota), v1);
}

#[test]
fn w800_without_any_image_does_not_boot() {
    let layout = w800_layout();
    let mut flash = SimFlash::new(layout.flash_size).unwrap();
    w800::init_flash(&mut flash, &layout, None).unwrap();
    let mut ota = w800(&mut flash);
    assert_eq!(ota.boot().unwrap_err(), W800OtaError::NoBootableImage);
    assert_eq!(ota.get_version(), None);
}

// ----------------------------------------------------------------------------------------- xz

/// Every fixture (made by liblzma) decodes to the bytes it was made from, as lzma-rs decodes
/// it too.
#[test]
fn xz_fixtures_from_liblzma_decode_exactly() {
    let cases: [(&str, Vec<u8>); 5] = [
        ("mixed_crc64.xz", payload(40000)),
        ("mixed_sha256_lp2.xz", payload(40000)),
        (
            "noise_then_text.xz",
            [noise(20000), payload(20000)].concat(),
        ),
        ("multiblock_none.xz", payload(40000)),
        ("w800_app_v2.img.xz", w800_v2().0),
    ];
    for (name, expected) in cases {
        let compressed = fixture(name);
        let limits = XzLimits {
            max_dict_size: 1 << 16,
            max_output: expected.len() as u64,
        };
        let mut io = xz::SliceIo {
            input: &compressed,
            output: Vec::new(),
        };
        let summary = xz::decompress(&mut io, &limits)
            .unwrap_or_else(|e| panic!("{name}: {e} (regenerate with make_fixtures.py?)"));
        assert!(io.output == expected, "{name}: decoded bytes differ");
        assert_eq!(summary.uncompressed_len, expected.len() as u64);
        assert_eq!(summary.compressed_len, compressed.len() as u64);
        assert!(summary.dict_buffer_len <= 1 << 16, "{name}");
        if name != "mixed_sha256_lp2.xz" {
            // lzma-rs has no SHA-256 check.
            let mut reference = Vec::new();
            lzma_rs::xz_decompress(&mut &compressed[..], &mut reference).unwrap();
            assert!(reference == expected, "{name}: lzma-rs disagrees");
        }
    }
    // bin2img.py's 32 KiB dictionary bounds the W800 copy at 66,172 bytes of memory.
    let summary = xz::decompress(
        &mut xz::SliceIo {
            input: &fixture("w800_app_v2.img.xz"),
            output: Vec::new(),
        },
        &XzLimits::default(),
    )
    .unwrap();
    assert_eq!(summary.dict_buffer_len, 32 * 1024);
    assert_eq!(copy_memory_bound(summary.dict_buffer_len), 66_172);
    // A 4 KiB dictionary: the circular buffer wrapped ten times.
    let summary = xz::decompress(
        &mut xz::SliceIo {
            input: &fixture("mixed_sha256_lp2.xz"),
            output: Vec::new(),
        },
        &XzLimits::default(),
    )
    .unwrap();
    assert_eq!(summary.dict_buffer_len, 4096);
}

#[test]
fn xz_dictionary_limit_and_output_limit() {
    let compressed = fixture("mixed_crc64.xz"); // declares an 8 MiB dictionary
    let err = xz::decompress_to_vec(&compressed, &XzLimits::default()).unwrap_err();
    assert_eq!(
        err,
        XzError::DictTooLarge {
            needed: 8 << 20,
            limit: 1 << 20
        }
    );
    // The output bound caps the buffer: 40000 bytes of data never need more.
    let limits = XzLimits {
        max_dict_size: 40000,
        max_output: 40000,
    };
    assert_eq!(
        xz::decompress_to_vec(&compressed, &limits).unwrap(),
        payload(40000)
    );
    let limits = XzLimits {
        max_dict_size: 40000,
        max_output: 39999,
    };
    assert_eq!(
        xz::decompress_to_vec(&compressed, &limits).unwrap_err(),
        XzError::OutputTooLarge { limit: 39999 }
    );
}

#[test]
fn xz_of_lzma_rs_uncompressed_chunks() {
    let data = payload(150_000);
    let mut compressed = Vec::new();
    lzma_rs::xz_compress(&mut &data[..], &mut compressed).unwrap();
    let limits = XzLimits {
        max_dict_size: 1 << 18,
        max_output: data.len() as u64,
    };
    assert_eq!(xz::decompress_to_vec(&compressed, &limits).unwrap(), data);
    let mut empty = Vec::new();
    lzma_rs::xz_compress(&mut &b""[..], &mut empty).unwrap();
    let limits = XzLimits {
        max_dict_size: 1 << 16,
        max_output: 0,
    };
    assert_eq!(xz::decompress_to_vec(&empty, &limits).unwrap(), b"");
}

#[test]
fn xz_damage_is_detected_never_a_panic() {
    let compressed = fixture("w800_app_v2.img.xz");
    let expected = w800_v2().0;
    let limits = XzLimits::default();
    for len in 0..compressed.len() {
        assert!(
            xz::decompress_to_vec(&compressed[..len], &limits).is_err(),
            "truncated to {len} accepted"
        );
    }
    // Every byte of the stream header, block header, index and footer, every third byte of
    // the LZMA data.
    let flips =
        (0..compressed.len()).filter(|&i| i < 64 || i + 64 > compressed.len() || i % 3 == 0);
    for i in flips {
        let mut bad = compressed.clone();
        bad[i] ^= 0x55;
        if let Ok(out) = xz::decompress_to_vec(&bad, &limits) {
            // Only bytes no check covers may change without an error (there are none in
            // practice), and then the output is still right.
            assert_eq!(out, expected, "flip at {i} changed the output undetected");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn xz_never_panics_on_any_bytes(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut bytes = xz::XZ_MAGIC.to_vec();
        bytes.extend_from_slice(&[0, 1, 0x69, 0x22, 0xDE, 0x36]); // valid CRC32 stream flags
        bytes.extend_from_slice(&tail);
        let _ = xz::decompress_to_vec(&bytes, &XzLimits::default());
        let _ = xz::decompress_to_vec(&tail, &XzLimits::default());
    }

    #[test]
    fn xz_never_panics_on_damaged_lzma(
        at in 0usize..3940,
        value in any::<u8>(),
        cut in 0usize..3940,
    ) {
        let mut bytes = fixture("w800_app_v2.img.xz");
        let at = at % bytes.len();
        bytes[at] = value;
        bytes.truncate(cut.max(at + 1));
        let _ = xz::decompress_to_vec(&bytes, &XzLimits::default());
    }
}

#[test]
fn flash_errors_name_what_is_wrong() {
    assert_eq!(
        FlashError::PowerLoss.to_string(),
        "power was lost: the flash operation did not complete"
    );
    assert_eq!(
        EspError::PendingVerify.to_string(),
        "the running app is pending verification: mark it valid or invalid before an update"
    );
}
