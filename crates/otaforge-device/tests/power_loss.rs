//! Power loss at every flash operation of an update, under every kind of damage a cut can leave
//! ([`CutEffect::ALL`]): the device must always boot a valid image, the old one or the new one,
//! byte for byte, and never neither.
//!
//! ESP-IDF: begin, write in chunks, end, set_boot_partition, reboot, mark_app_valid. After each
//! cut the device boots; when it boots the new image still pending verification, it is not
//! confirmed and boots again, which must roll back to the old image (with a cut at every
//! operation of that rollback boot too).
//!
//! W800: begin, write, end, reboot (the bootloader unpacks the xz image into `app`). After each
//! cut the device boots once more without a cut; once the download was complete it must end up
//! running the new image.

mod support;

use otaforge_device::ImageSize;
use otaforge_device::esp::{BootSlot, EspError, EspOta, Layout};
use otaforge_device::flash::{CutEffect, Flash, SimFlash};
use otaforge_device::w800::{UpdateAction, W800Config, W800Ota, W800OtaError};
use otaforge_formats::otadata::OtaState;
use support::*;

// ------------------------------------------------------------------------------------ ESP-IDF

/// The update as an app and the bootloader run it; stops at the first error (a power cut).
fn esp_update(
    flash: &mut SimFlash,
    new: &[u8],
    size: ImageSize,
    chunk: usize,
) -> Result<(), EspError> {
    let mut ota = EspOta::open(&mut *flash, esp_config())?;
    ota.boot()?; // the running app; in steady state this boot writes nothing
    let slot = ota.next_update_slot().unwrap();
    let mut handle = ota.begin(slot, size)?;
    for piece in new.chunks(chunk) {
        ota.write(&mut handle, piece)?;
    }
    ota.end(handle)?;
    ota.set_boot_partition(BootSlot::Ota(slot))?;
    ota.boot()?;
    ota.mark_app_valid_cancel_rollback()?;
    Ok(())
}

#[derive(Debug, Default)]
struct Tally {
    cut_points: usize,
    old: usize,
    new_kept: usize,
    new_rolled_back: usize,
    rollback_cut_points: usize,
}

/// Boots after a cut and says what runs; a new image pending verification is not confirmed,
/// and the rollback boot that follows is itself cut at every operation.
fn boot_after_cut(flash: &mut SimFlash, old: &[u8], new: &[u8], tally: &mut Tally, what: &str) {
    let mut ota = EspOta::open(&mut *flash, esp_config())
        .unwrap_or_else(|e| panic!("{what}: partition table lost: {e}"));
    let boot = ota
        .boot()
        .unwrap_or_else(|e| panic!("{what}: does not boot: {e}"));
    let running = running_bytes(&mut ota);
    if running == old {
        tally.old += 1;
        return;
    }
    assert!(
        running == new,
        "{what}: booted neither image ({})",
        boot.slot
    );
    let BootSlot::Ota(slot) = boot.slot else {
        panic!("{what}: the new image runs from the factory slot");
    };
    if ota.get_state_partition(slot).unwrap() != Some(OtaState::PendingVerify) {
        tally.new_kept += 1;
        return;
    }
    tally.new_rolled_back += 1;
    drop(ota);
    // Not confirmed: the next boot rolls back. Cut that boot at each of its operations too.
    let pending = flash.clone();
    let ops = {
        let mut f = pending.clone();
        let before = f.ops();
        let mut ota = EspOta::open(&mut f, esp_config()).unwrap();
        let again = ota.boot().unwrap();
        assert!(again.rolled_back, "{what}: no rollback");
        assert_eq!(
            running_bytes(&mut ota),
            old,
            "{what}: rollback to the wrong image"
        );
        f.ops() - before
    };
    for j in 0..ops {
        for effect in CutEffect::ALL {
            let mut f = pending.clone();
            f.set_cut_effect(effect);
            f.set_power_cut(Some(j));
            let mut ota = EspOta::open(&mut f, esp_config()).unwrap();
            assert!(ota.boot().is_err(), "{what}: rollback cut at {j} missed");
            drop(ota);
            f.restore_power();
            let mut ota = EspOta::open(&mut f, esp_config()).unwrap();
            ota.boot().unwrap();
            assert_eq!(
                running_bytes(&mut ota),
                old,
                "{what}: rollback boot cut at {j} ({effect:?})"
            );
            tally.rollback_cut_points += 1;
        }
    }
}

/// The update as an app applying an esp_delta_ota patch (header, then the detools patch in
/// chunks) and the bootloader run it; stops at the first error.
fn esp_delta_update(flash: &mut SimFlash, patch: &[u8], chunk: usize) -> Result<(), EspError> {
    let mut ota = EspOta::open(&mut *flash, esp_config())?;
    ota.boot()?;
    let slot = ota.next_update_slot().unwrap();
    let mut handle = ota.begin_delta(slot, &patch[..64])?;
    for piece in patch[64..].chunks(chunk) {
        ota.write_delta(&mut handle, piece)?;
    }
    ota.end_delta(handle)?;
    ota.set_boot_partition(BootSlot::Ota(slot))?;
    ota.boot()?;
    ota.mark_app_valid_cancel_rollback()?;
    Ok(())
}

/// Runs the update once to count its operations, then cuts power at each of them.
fn esp_sweep(name: &str, base: &SimFlash, old: &[u8], new: &[u8], size: ImageSize, chunk: usize) {
    esp_sweep_with(
        &format!("{name} {size:?} chunk {chunk}"),
        base,
        old,
        new,
        &|flash| esp_update(flash, new, size, chunk),
    );
}

/// `esp_sweep` for any update.
fn esp_sweep_with(
    name: &str,
    base: &SimFlash,
    old: &[u8],
    new: &[u8],
    update: &dyn Fn(&mut SimFlash) -> Result<(), EspError>,
) {
    let mut clean = base.clone();
    let before = clean.ops();
    update(&mut clean).unwrap();
    let total = clean.ops() - before;
    {
        let mut ota = EspOta::open(&mut clean, esp_config()).unwrap();
        ota.boot().unwrap();
        assert_eq!(running_bytes(&mut ota), new, "{name}: the clean update");
    }
    let mut tally = Tally::default();
    for k in 0..total {
        for effect in CutEffect::ALL {
            let what = format!("{name}: cut at op {k}/{total} {effect:?}");
            let mut flash = base.clone();
            flash.set_cut_effect(effect);
            flash.set_power_cut(Some(k));
            let result = update(&mut flash);
            assert!(
                result.is_err() && !flash.is_powered(),
                "{what}: the cut did not stop the update"
            );
            flash.restore_power();
            boot_after_cut(&mut flash, old, new, &mut tally, &what);
            tally.cut_points += 1;
        }
    }
    eprintln!("{name}: {total} ops, {tally:?}");
    assert!(
        tally.old > 0 && tally.new_kept > 0 && tally.new_rolled_back > 0,
        "{name}: {tally:?}"
    );
    assert_eq!(tally.cut_points, total as usize * 9);
}

/// An esp_delta_ota file from `base` to `target`, as the server makes one.
fn esp_delta(base: &[u8], target: &[u8]) -> Vec<u8> {
    use otaforge_formats::delta;
    let mut raw = Vec::new();
    bsdiff::diff(base, target, &mut raw).unwrap();
    let steps = delta::steps_from_bsdiff(&raw).unwrap();
    let mut file = delta::header(&delta::base_id(base).unwrap()).to_vec();
    file.extend_from_slice(&delta::encode(target.len() as u64, &steps));
    file
}

/// A delta update, applied from the running slot into the other, cut at every flash
/// operation: the device always boots the old image or the new one, byte for byte.
#[test]
fn esp_delta_update_survives_power_loss() {
    let layout = Layout::small(0x8000);
    let v1 = esp_app(CHIP, "1.0.0", 7000, 1);
    let v2 = esp_app(CHIP, "1.0.1", 7000, 1);
    let patch = esp_delta(&v1, &v2);
    assert!(
        patch.len() < v2.len() / 4,
        "{} of {}",
        patch.len(),
        v2.len()
    );
    let base = esp_device(&layout, &v1);
    for chunk in [1, 200, 4096] {
        esp_sweep_with(&format!("delta chunk {chunk}"), &base, &v1, &v2, &|flash| {
            esp_delta_update(flash, &patch, chunk)
        });
    }
}

/// A patch made for another base is refused at its header, with both ids named, before
/// anything is erased; a truncated patch fails at the end and the old app still runs.
#[test]
fn esp_delta_for_another_base_changes_nothing() {
    let layout = Layout::small(0x8000);
    let v1 = esp_app(CHIP, "1.0.0", 7000, 1);
    let other = esp_app(CHIP, "0.9.0", 7000, 3);
    let v2 = esp_app(CHIP, "1.0.1", 7000, 1);
    let base = esp_device(&layout, &v1);
    let mut flash = base.clone();
    let before = flash.clone();
    let mut ota = EspOta::open(&mut flash, esp_config()).unwrap();
    ota.boot().unwrap();
    let slot = ota.next_update_slot().unwrap();
    let wrong = esp_delta(&other, &v2);
    let err = ota.begin_delta(slot, &wrong[..64]).unwrap_err();
    assert!(matches!(err, EspError::DeltaForAnotherBase { .. }), "{err}");
    let said = err.to_string();
    assert!(
        said.contains("but the running app is") && said.contains("nothing was written"),
        "{said}"
    );
    assert!(matches!(
        ota.begin_delta(slot, &[0u8; 64]).unwrap_err(),
        EspError::DeltaHeader
    ));
    drop(ota);
    assert!(flash == before, "the refused patch changed the flash");
    // Truncated: the end says so; the old app still boots.
    let patch = esp_delta(&v1, &v2);
    let mut ota = EspOta::open(&mut flash, esp_config()).unwrap();
    ota.boot().unwrap();
    let mut handle = ota.begin_delta(slot, &patch[..64]).unwrap();
    ota.write_delta(&mut handle, &patch[64..patch.len() - 10])
        .unwrap();
    let err = ota.end_delta(handle).unwrap_err();
    assert!(err.to_string().contains("patch ended"), "{err}");
    ota.boot().unwrap();
    assert_eq!(running_bytes(&mut ota), v1);
}

fn sizes(image: &[u8]) -> [(ImageSize, usize); 4] {
    [
        (ImageSize::Known(image.len() as u32), 1000),
        (ImageSize::Unknown, 4096),
        (ImageSize::Sequential, 1000),
        (ImageSize::Sequential, 4096),
    ]
}

#[test]
fn esp_update_from_ota_0_to_ota_1() {
    let layout = Layout::small(0x8000);
    let v1 = esp_app(CHIP, "1.0.0", 7000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 11000, 2);
    let base = esp_device(&layout, &v1);
    for (size, chunk) in sizes(&v2) {
        esp_sweep("ota_0 -> ota_1", &base, &v1, &v2, size, chunk);
    }
}

#[test]
fn esp_second_update_overwrites_the_older_slot() {
    // Running v2 from ota_1 after a first update; otadata holds seq 1 (ota_0) and seq 2
    // (ota_1). v3 goes into ota_0 over v1 and its entry over seq 1's sector.
    let layout = Layout::small(0x8000);
    let v1 = esp_app(CHIP, "1.0.0", 7000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 11000, 2);
    let v3 = esp_app(CHIP, "3.0.0", 9000, 3);
    let mut base = esp_device(&layout, &v1);
    esp_update(&mut base, &v2, ImageSize::Unknown, 4096).unwrap();
    for (size, chunk) in sizes(&v3) {
        esp_sweep("ota_1 -> ota_0", &base, &v2, &v3, size, chunk);
    }
}

#[test]
fn esp_update_from_factory_on_the_default_4mb_table() {
    let layout = Layout::default_4mb();
    let v1 = esp_app(CHIP, "1.0.0", 7000, 1);
    let v2 = esp_app(CHIP, "2.0.0", 11000, 2);
    let base = esp_device(&layout, &v1);
    for (size, chunk) in [
        (ImageSize::Known(v2.len() as u32), 1000),
        (ImageSize::Sequential, 4096),
    ] {
        esp_sweep("factory -> ota_0", &base, &v1, &v2, size, chunk);
    }
}

// --------------------------------------------------------------------------------------- W800

/// Download into app_ota, then reboot into the bootloader. Returns the operations the download
/// took (up to `end`), or the first error.
fn w800_update(
    flash: &mut SimFlash,
    image: &[u8],
    size: ImageSize,
    chunk: usize,
) -> Result<u64, W800OtaError> {
    let start = flash.ops();
    let mut ota = W800Ota::new(&mut *flash, w800_layout(), W800Config::default())?;
    ota.boot()?; // running app, nothing pending: writes nothing
    let mut handle = ota.begin(size)?;
    for piece in image.chunks(chunk) {
        ota.write(&mut handle, piece)?;
    }
    ota.end(handle)?;
    let download = ota.flash().ops() - start;
    let boot = ota.reboot()?;
    assert!(matches!(boot.action, UpdateAction::Applied { .. }));
    Ok(download)
}

fn w800_sweep(name: &str, old: &[u8], new: &[u8], ota_image: &[u8], size: ImageSize, chunk: usize) {
    let base = w800_device(old);
    let mut clean = base.clone();
    let download = w800_update(&mut clean, ota_image, size, chunk).unwrap();
    let total = clean.ops() - base.ops();
    let (mut old_runs, mut new_runs) = (0usize, 0usize);
    for k in 0..total {
        for effect in CutEffect::ALL {
            let what = format!("{name} {size:?}: cut at op {k}/{total} {effect:?}");
            let mut flash = base.clone();
            flash.set_cut_effect(effect);
            flash.set_power_cut(Some(k));
            assert!(
                w800_update(&mut flash, ota_image, size, chunk).is_err(),
                "{what}"
            );
            flash.restore_power();
            let mut ota = W800Ota::new(&mut flash, w800_layout(), W800Config::default()).unwrap();
            let boot = ota
                .boot()
                .unwrap_or_else(|e| panic!("{what}: does not boot: {e}"));
            let running = w800_app_bytes(&mut ota);
            if running == new {
                new_runs += 1;
            } else {
                assert!(running == old, "{what}: app holds neither image");
                assert!(
                    k < download,
                    "{what}: the copy did not resume ({:?})",
                    boot.action
                );
                old_runs += 1;
            }
            // Settled: nothing left in app_ota, and the next boot does nothing.
            assert!(!ota.has_pending_update().unwrap(), "{what}");
            let again = ota.boot().unwrap();
            assert_eq!(again.action, UpdateAction::None, "{what}");
            assert_eq!(w800_app_bytes(&mut ota), running, "{what}");
        }
    }
    eprintln!(
        "{name} {size:?}: {total} ops ({download} download), {} cut points: {old_runs} old, {new_runs} new",
        total * 9
    );
    assert!(old_runs > 0 && new_runs > 0);
}

#[test]
fn w800_xz_update_survives_a_cut_anywhere() {
    let v1 = w800_v1();
    let (v2, v2_ota) = w800_v2();
    for (size, chunk) in [
        (ImageSize::Sequential, 1024),
        (ImageSize::Unknown, 4096),
        (ImageSize::Known(v2_ota.len() as u32), 1000),
    ] {
        w800_sweep("w800 xz", &v1, &v2, &v2_ota, size, chunk);
    }
}

#[test]
fn w800_plain_update_survives_a_cut_anywhere() {
    let v1 = w800_v1();
    let v3 = w800_img("v3.0.0", 3, &payload(9000));
    w800_sweep("w800 plain", &v1, &v3, &v3, ImageSize::Sequential, 2048);
}

/// A second cut while the bootloader resumes the copy: it resumes again.
#[test]
fn w800_copy_resumes_after_repeated_cuts() {
    let v1 = w800_v1();
    let (v2, v2_ota) = w800_v2();
    let mut downloaded = w800_device(&v1);
    {
        let mut ota = W800Ota::new(&mut downloaded, w800_layout(), W800Config::default()).unwrap();
        ota.boot().unwrap();
        let mut handle = ota.begin(ImageSize::Unknown).unwrap();
        ota.write(&mut handle, &v2_ota).unwrap();
        ota.end(handle).unwrap();
    }
    let copy_ops = {
        let mut f = downloaded.clone();
        let mut ota = W800Ota::new(&mut f, w800_layout(), W800Config::default()).unwrap();
        ota.reboot().unwrap();
        drop(ota);
        f.ops() - downloaded.ops()
    };
    let mut runs = 0;
    for first in 0..copy_ops {
        for second in 0..copy_ops {
            let mut f = downloaded.clone();
            for cut in [first, second] {
                f.set_power_cut(Some(cut));
                let mut ota = W800Ota::new(&mut f, w800_layout(), W800Config::default()).unwrap();
                let _ = ota.boot();
                drop(ota);
                f.restore_power();
                f.set_power_cut(None);
            }
            let mut ota = W800Ota::new(&mut f, w800_layout(), W800Config::default()).unwrap();
            ota.boot().unwrap();
            assert_eq!(
                w800_app_bytes(&mut ota),
                v2,
                "cuts at {first} then {second} of {copy_ops}"
            );
            runs += 1;
        }
    }
    eprintln!("w800 double cuts: {copy_ops} copy ops, {runs} runs");
}

#[test]
fn sim_flash_stays_small_for_a_fleet() {
    // What one simulated device costs: only written sectors are held.
    let layout = Layout::default_4mb();
    let flash = esp_device(&layout, &esp_app(CHIP, "1.0.0", 7000, 1));
    assert!(
        flash.resident_bytes() <= 5 * 4096,
        "{}",
        flash.resident_bytes()
    );
    let mut probe = flash.clone();
    let mut b = [0u8; 4];
    probe.read(0x30_0000, &mut b).unwrap();
    assert_eq!(b, [0xFF; 4]);
}
