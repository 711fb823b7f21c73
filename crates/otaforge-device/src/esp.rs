//! The ESP-IDF flavour of OTA over a [`Flash`]: the partition [`Layout`], the `esp_ota_ops` API
//! ([`EspOta::begin`], [`EspOta::write`], [`EspOta::end`], [`EspOta::set_boot_partition`],
//! mark valid / invalid) and a model of the second-stage bootloader ([`EspOta::boot`]): which
//! app it picks from otadata, the rollback transitions it writes, and the fallback when the
//! chosen app does not verify.
//!
//! Behaviour follows ESP-IDF `components/app_update/esp_ota_ops.c` and
//! `components/bootloader_support/src/bootloader_utility.c` with
//! `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE` switchable ([`EspConfig::rollback`]). Images are
//! verified with `otaforge_formats::esp::parse_image`, otadata entries are chosen and encoded with
//! `otaforge_formats::otadata`, the table with `otaforge_formats::partition`.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use otaforge_formats::esp::{self as esp_image, AppDesc, Chip, EspImageError};
use otaforge_formats::otadata::{
    self, ENTRY_LEN, OTADATA_LEN, OtaSelectEntry, OtaState, SECOND_ENTRY_OFFSET,
};
use otaforge_formats::partition::{
    self, PartitionEntry, PartitionError, PartitionTable, SUBTYPE_FACTORY, SUBTYPE_NVS,
    SUBTYPE_OTA_0, SUBTYPE_OTADATA, SUBTYPE_PHY, TYPE_APP, TYPE_DATA,
};

use crate::common::{ImageSize, Region, sector_ceil};
use crate::flash::{Flash, FlashError, SECTOR_SIZE, erase_range};

/// Flash offset of the partition table.
pub const TABLE_OFFSET: u32 = partition::TABLE_FLASH_OFFSET;
/// Size of the otadata partition.
pub const OTADATA_SIZE: u32 = OTADATA_LEN as u32;
/// Most OTA slots ESP-IDF supports (`ota_0` ..= `ota_15`).
pub const MAX_OTA_SLOTS: usize = 16;

/// The partitions of an ESP32 flash that OTA cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub flash_size: u32,
    pub nvs: Region,
    pub otadata: Region,
    pub phy_init: Region,
    pub factory: Option<Region>,
    /// `ota_0`, `ota_1`, ... in slot order.
    pub ota: Vec<Region>,
}

impl Layout {
    /// ESP-IDF's `partitions_two_ota.csv` on a 4 MB flash: nvs 0x9000 (16K), otadata 0xd000
    /// (8K), phy_init 0xf000 (4K), factory 0x10000 (1M), ota_0 0x110000 (1M), ota_1 0x210000 (1M).
    pub fn default_4mb() -> Layout {
        Layout {
            flash_size: 4 * 1024 * 1024,
            nvs: Region::new(0x9000, 0x4000),
            otadata: Region::new(0xD000, OTADATA_SIZE),
            phy_init: Region::new(0xF000, 0x1000),
            factory: Some(Region::new(0x1_0000, 0x10_0000)),
            ota: vec![
                Region::new(0x11_0000, 0x10_0000),
                Region::new(0x21_0000, 0x10_0000),
            ],
        }
    }

    /// The same system partitions, no factory app, and two OTA slots of `slot_size` bytes
    /// (rounded up to 4 KiB) from 0x10000: a small flash for the simulator.
    pub fn small(slot_size: u32) -> Layout {
        let slot = sector_ceil(slot_size.max(SECTOR_SIZE));
        let ota_1 = 0x1_0000u32.saturating_add(slot);
        Layout {
            flash_size: ota_1.saturating_add(slot),
            nvs: Region::new(0x9000, 0x4000),
            otadata: Region::new(0xD000, OTADATA_SIZE),
            phy_init: Region::new(0xF000, 0x1000),
            factory: None,
            ota: vec![Region::new(0x1_0000, slot), Region::new(ota_1, slot)],
        }
    }

    /// The partition table this layout stands for, as `gen_esp32part.py` would write it.
    pub fn partition_table(&self) -> PartitionTable {
        let row = |label: &str, ty, subtype, r: Region| PartitionEntry {
            ty,
            subtype,
            offset: r.offset,
            size: r.size,
            label: label.into(),
            flags: 0,
        };
        let mut entries = vec![
            row("nvs", TYPE_DATA, SUBTYPE_NVS, self.nvs),
            row("otadata", TYPE_DATA, SUBTYPE_OTADATA, self.otadata),
            row("phy_init", TYPE_DATA, SUBTYPE_PHY, self.phy_init),
        ];
        if let Some(factory) = self.factory {
            entries.push(row("factory", TYPE_APP, SUBTYPE_FACTORY, factory));
        }
        for (i, slot) in self.ota.iter().enumerate() {
            let n = u8::try_from(i).unwrap_or(u8::MAX);
            entries.push(row(
                &format!("ota_{n}"),
                TYPE_APP,
                SUBTYPE_OTA_0.saturating_add(n),
                *slot,
            ));
        }
        PartitionTable { entries }
    }

    /// The app partition behind a boot slot.
    pub fn slot(&self, slot: BootSlot) -> Option<Region> {
        match slot {
            BootSlot::Factory => self.factory,
            BootSlot::Ota(n) => self.ota.get(usize::from(n)).copied(),
        }
    }

    fn check(&self) -> Result<(), EspError> {
        let bad = |reason: &str| {
            Err(EspError::InvalidLayout {
                reason: reason.into(),
            })
        };
        if self.ota.is_empty() || self.ota.len() > MAX_OTA_SLOTS {
            return bad("it needs 1 to 16 ota slots");
        }
        if self.otadata.size != OTADATA_SIZE {
            return bad("otadata must be 0x2000 bytes");
        }
        let table = Region::new(TABLE_OFFSET, SECTOR_SIZE);
        let mut all = vec![table, self.nvs, self.otadata, self.phy_init];
        all.extend(self.factory);
        all.extend(self.ota.iter().copied());
        for (i, r) in all.iter().enumerate() {
            if !r.is_sector_aligned() || r.size == 0 {
                return bad("every partition must be a non-empty whole number of 4 KiB sectors");
            }
            if r.end() > u64::from(self.flash_size) {
                return bad("a partition runs past the end of the flash");
            }
            if all.iter().skip(i.saturating_add(1)).any(|o| o.overlaps(r)) {
                return bad("two partitions overlap");
            }
        }
        Ok(())
    }
}

/// Writes a fresh flash for `layout`: the partition table at 0x8000, erased otadata and, when
/// given, `first_image` into the factory partition (or `ota_0` when there is none). The first
/// boot of an `ota_0` image writes otadata, as ESP-IDF's bootloader does.
pub fn init_flash<F: Flash + ?Sized>(
    flash: &mut F,
    layout: &Layout,
    first_image: Option<&[u8]>,
) -> Result<(), EspError> {
    layout.check()?;
    if flash.size() < layout.flash_size {
        return Err(EspError::FlashTooSmall {
            needed: layout.flash_size,
            size: flash.size(),
        });
    }
    let table = layout
        .partition_table()
        .encode()
        .map_err(EspError::PartitionTable)?;
    erase_range(flash, TABLE_OFFSET, SECTOR_SIZE)?;
    flash.write(TABLE_OFFSET, &table)?;
    erase_range(flash, layout.otadata.offset, layout.otadata.size)?;
    if let Some(image) = first_image {
        let target = layout
            .factory
            .unwrap_or_else(|| layout.ota.first().copied().unwrap_or(Region::new(0, 0)));
        let len = u32::try_from(image.len())
            .ok()
            .filter(|&l| l <= target.size)
            .ok_or(EspError::ImageTooLarge {
                size: image.len() as u64,
                slot_size: target.size,
            })?;
        erase_range(flash, target.offset, len)?;
        flash.write(target.offset, image)?;
    }
    Ok(())
}

/// Device configuration the bootloader and `esp_ota_ops` depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspConfig {
    /// The chip this device is: images built for another chip are refused.
    pub expected_chip: Chip,
    /// `CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`: new images boot in `PendingVerify` and roll back
    /// unless marked valid.
    pub rollback: bool,
}

impl Default for EspConfig {
    /// An ESP32 with app rollback enabled.
    fn default() -> Self {
        EspConfig {
            expected_chip: Chip::Esp32,
            rollback: true,
        }
    }
}

/// An app partition the bootloader can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BootSlot {
    Factory,
    Ota(u8),
}

impl fmt::Display for BootSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootSlot::Factory => f.write_str("factory"),
            BootSlot::Ota(n) => write!(f, "ota_{n}"),
        }
    }
}

/// A verified app image in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppImage {
    pub slot: BootSlot,
    /// Length of the image in the slot (header to appended hash).
    pub len: u32,
    pub chip: Chip,
    pub sha256: Option<[u8; 32]>,
    /// `esp_app_desc_t`, when the image has one.
    pub app: Option<AppDesc>,
}

impl AppImage {
    /// `esp_app_desc_t.version`, when the image has an app description.
    pub fn version(&self) -> Option<&str> {
        self.app.as_ref().map(|a| a.version.as_str())
    }
}

/// What [`EspOta::boot`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOutcome {
    /// The slot now running.
    pub slot: BootSlot,
    /// An app left in `PendingVerify` by the previous boot was marked `Aborted` at this boot.
    pub rolled_back: bool,
    /// The slot the bootloader chose first, when its image did not verify and another ran.
    pub fallback_from: Option<BootSlot>,
    /// The app now running.
    pub image: AppImage,
}

impl BootOutcome {
    pub fn app(&self) -> Option<&AppDesc> {
        self.image.app.as_ref()
    }
}

/// An update in progress (`esp_ota_handle_t`), from [`EspOta::begin`] to [`EspOta::end`].
#[derive(Debug, PartialEq, Eq)]
pub struct OtaHandle {
    slot: u8,
    region: Region,
    /// Bytes written so far.
    written: u32,
    /// Bytes from the start of the slot known to be erased (a multiple of 4 KiB).
    erased_to: u32,
}

impl OtaHandle {
    pub fn slot(&self) -> u8 {
        self.slot
    }

    pub fn written(&self) -> u32 {
        self.written
    }
}

/// Why an OTA operation or a boot failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EspError {
    #[error("{0}")]
    Flash(#[from] FlashError),
    #[error("partition table at 0x8000: {0}")]
    PartitionTable(PartitionError),
    #[error("invalid layout: {reason}")]
    InvalidLayout { reason: String },
    #[error("the flash is {size:#x} bytes, the layout needs {needed:#x}")]
    FlashTooSmall { needed: u32, size: u32 },
    #[error("partition table has no otadata partition")]
    MissingOtadata,
    #[error("no app is running: boot() has not run")]
    NotBooted,
    #[error("no bootable image: no app partition holds an image that verifies")]
    NoBootableImage,
    #[error("there is no {slot} in the partition table")]
    NoSuchSlot { slot: BootSlot },
    #[error("{slot} is the running app and cannot be written")]
    RunningSlot { slot: BootSlot },
    #[error("the running app is pending verification: mark it valid or invalid before an update")]
    PendingVerify,
    #[error("image of {size} bytes does not fit the {slot_size}-byte slot")]
    ImageTooLarge { size: u64, slot_size: u32 },
    #[error("first byte is {found:#04x}, an esp app image starts with 0xe9")]
    BadMagic { found: u8 },
    #[error(
        "write of {len} bytes at offset {offset:#x} runs past the end of the {slot_size:#x}-byte slot"
    )]
    WritePastSlot {
        offset: u32,
        len: usize,
        slot_size: u32,
    },
    #[error("no image bytes were written")]
    NothingWritten,
    #[error("invalid app image: {0}")]
    Image(EspImageError),
    #[error("image is built for {found}, this device is an {expected}")]
    WrongChip { expected: Chip, found: Chip },
    #[error("the running app is not an ota app with an otadata entry (factory or fresh flash)")]
    RunningFactory,
    #[error("rollback is not possible: no other app that verifies")]
    RollbackNotPossible,
    #[error("no otadata sequence number is left for {slot}")]
    SequenceExhausted { slot: BootSlot },
    #[error("not an esp_delta_ota patch: its first 64 bytes are not the header (magic 0xfccdde10)")]
    DeltaHeader,
    #[error(
        "this patch is for the base image {patch_base}, but the running app is {running}; nothing was written"
    )]
    DeltaForAnotherBase { patch_base: String, running: String },
    #[error("the running app has no appended SHA-256, so no patch can name it as its base")]
    DeltaBaseUnnamed,
    #[error("delta patch: {0}")]
    Delta(otaforge_formats::delta::DeltaError),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An esp_delta_ota update in progress, from [`EspOta::begin_delta`] to
/// [`EspOta::end_delta`]: the patch is applied as it arrives, reading the running slot and
/// writing the update slot through the same path as a full image.
#[derive(Debug)]
pub struct DeltaHandle {
    ota: OtaHandle,
    base: Region,
    applier: otaforge_formats::delta::Applier,
}

impl DeltaHandle {
    /// Target bytes written so far.
    pub fn written(&self) -> u32 {
        self.ota.written
    }
}

/// The ESP-IDF OTA API and bootloader over one flash.
#[derive(Debug)]
pub struct EspOta<F: Flash> {
    flash: F,
    config: EspConfig,
    table: PartitionTable,
    otadata: Region,
    factory: Option<Region>,
    slots: Vec<Region>,
    running: Option<AppImage>,
}

fn region_of(entry: &PartitionEntry) -> Region {
    Region::new(entry.offset, entry.size)
}

impl<F: Flash> EspOta<F> {
    /// Reads and validates the partition table (MD5 row included) and finds otadata, the
    /// factory app and the OTA slots. Nothing runs until [`EspOta::boot`]. Pass `&mut flash` to
    /// keep the flash when this fails.
    pub fn open(mut flash: F, config: EspConfig) -> Result<EspOta<F>, EspError> {
        let mut bytes = vec![0u8; partition::TABLE_MAX_LEN];
        flash.read(TABLE_OFFSET, &mut bytes)?;
        let table = PartitionTable::parse(&bytes).map_err(EspError::PartitionTable)?;
        let otadata = table
            .otadata()
            .map(region_of)
            .ok_or(EspError::MissingOtadata)?;
        // ESP-IDF counts ota_0, ota_1, ... up to the first missing one.
        let mut slots = Vec::new();
        for n in 0..MAX_OTA_SLOTS {
            let subtype = SUBTYPE_OTA_0.saturating_add(n as u8);
            match table
                .entries
                .iter()
                .find(|e| e.ty == TYPE_APP && e.subtype == subtype)
            {
                Some(e) => slots.push(region_of(e)),
                None => break,
            }
        }
        let factory = table.factory().map(region_of);
        let flash_size = u64::from(flash.size());
        // Check the partitions OTA touches: aligned, inside the flash, not overlapping.
        let mut touched = vec![Region::new(TABLE_OFFSET, SECTOR_SIZE), otadata];
        touched.extend(factory);
        touched.extend(slots.iter().copied());
        for (i, r) in touched.iter().enumerate() {
            if !r.is_sector_aligned() || r.size == 0 || r.end() > flash_size {
                return Err(EspError::InvalidLayout {
                    reason: format!(
                        "partition at {:#x} ({:#x} bytes) is not whole sectors inside the flash",
                        r.offset, r.size
                    ),
                });
            }
            if touched
                .iter()
                .skip(i.saturating_add(1))
                .any(|o| o.overlaps(r))
            {
                return Err(EspError::InvalidLayout {
                    reason: "app or otadata partitions overlap".into(),
                });
            }
        }
        if otadata.size != OTADATA_SIZE {
            return Err(EspError::InvalidLayout {
                reason: format!(
                    "otadata is {:#x} bytes, expected {OTADATA_SIZE:#x}",
                    otadata.size
                ),
            });
        }
        Ok(EspOta {
            flash,
            config,
            table,
            otadata,
            factory,
            slots,
            running: None,
        })
    }

    pub fn config(&self) -> &EspConfig {
        &self.config
    }

    pub fn partition_table(&self) -> &PartitionTable {
        &self.table
    }

    /// Number of OTA slots (`ota_0` .. `ota_{n-1}`).
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The partition behind a boot slot.
    pub fn slot_region(&self, slot: BootSlot) -> Option<Region> {
        match slot {
            BootSlot::Factory => self.factory,
            BootSlot::Ota(n) => self.slots.get(usize::from(n)).copied(),
        }
    }

    pub fn otadata_region(&self) -> Region {
        self.otadata
    }

    pub fn flash(&self) -> &F {
        &self.flash
    }

    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    pub fn into_flash(self) -> F {
        self.flash
    }

    /// The slot running since the last [`EspOta::boot`].
    pub fn running_slot(&self) -> Option<BootSlot> {
        self.running.as_ref().map(|a| a.slot)
    }

    /// The app running since the last [`EspOta::boot`].
    pub fn running_app(&self) -> Option<&AppImage> {
        self.running.as_ref()
    }

    /// `esp_ota_get_next_update_partition(NULL)`: the OTA slot after the running one, wrapping;
    /// `ota_0` when the factory app runs.
    pub fn next_update_slot(&self) -> Option<u8> {
        let n = self.slots.len();
        let next = match self.running_slot()? {
            BootSlot::Factory => 0,
            BootSlot::Ota(k) => usize::from(k).saturating_add(1).checked_rem(n)?,
        };
        u8::try_from(next).ok().filter(|&s| usize::from(s) < n)
    }

    /// Both otadata entries.
    pub fn read_otadata(&mut self) -> Result<[OtaSelectEntry; 2], EspError> {
        let mut a = [0u8; ENTRY_LEN];
        let mut b = [0u8; ENTRY_LEN];
        self.flash.read(self.otadata.offset, &mut a)?;
        self.flash.read(self.second_entry_offset(), &mut b)?;
        Ok([
            OtaSelectEntry::parse(&a).unwrap_or_else(|_| OtaSelectEntry::erased()),
            OtaSelectEntry::parse(&b).unwrap_or_else(|_| OtaSelectEntry::erased()),
        ])
    }

    fn second_entry_offset(&self) -> u32 {
        self.otadata
            .offset
            .saturating_add(SECOND_ENTRY_OFFSET as u32)
    }

    /// Erases the sector of entry `index` and writes `entry` there (ESP-IDF `rewrite_ota_seq`,
    /// bootloader `write_otadata`).
    fn write_entry(&mut self, index: usize, entry: &OtaSelectEntry) -> Result<(), EspError> {
        let offset = if index == 0 {
            self.otadata.offset
        } else {
            self.second_entry_offset()
        };
        self.flash.erase_sector(offset)?;
        self.flash.write(offset, &entry.encode())?;
        Ok(())
    }

    /// Reads and verifies the image at the start of `region`, looking at no more than `limit`
    /// bytes: header, segments, checksum, SHA-256 and chip.
    fn verify_region(
        &mut self,
        slot: BootSlot,
        region: Region,
        limit: u32,
    ) -> Result<AppImage, EspError> {
        let limit = limit.min(region.size);
        let bytes = self.read_image_bytes(region.offset, limit)?;
        let image = esp_image::parse_image(&bytes).map_err(EspError::Image)?;
        if image.chip != self.config.expected_chip {
            return Err(EspError::WrongChip {
                expected: self.config.expected_chip,
                found: image.chip,
            });
        }
        Ok(AppImage {
            slot,
            len: u32::try_from(image.image_len).unwrap_or(u32::MAX),
            chip: image.chip,
            sha256: image.sha256,
            app: image.app_desc,
        })
    }

    /// The bytes of the image at `offset`: the header and segment headers are walked to find
    /// the image length, so only the image is read, never more than `limit` bytes.
    fn read_image_bytes(&mut self, offset: u32, limit: u32) -> Result<Vec<u8>, EspError> {
        let header_len = (esp_image::HEADER_LEN as u32).min(limit);
        let mut header = vec![0u8; header_len as usize];
        self.flash.read(offset, &mut header)?;
        if let Err(
            e @ (EspImageError::TooShortForHeader { .. }
            | EspImageError::BadMagic { .. }
            | EspImageError::BadSegmentCount { .. }
            | EspImageError::BadHashAppended { .. }),
        ) = esp_image::parse_image(&header)
        {
            return Err(EspError::Image(e));
        }
        let count = header.get(1).copied().unwrap_or(0);
        let hash = header.get(23).copied() == Some(1);
        let limit64 = u64::from(limit);
        let mut pos = esp_image::HEADER_LEN as u64;
        let mut complete = true;
        for _ in 0..count {
            let seg_header = pos.saturating_add(esp_image::SEGMENT_HEADER_LEN as u64);
            if seg_header > limit64 {
                complete = false;
                break;
            }
            let mut sh = [0u8; 8];
            self.flash
                .read(offset.saturating_add(pos as u32), &mut sh)?;
            let len = u32::from_le_bytes([sh[4], sh[5], sh[6], sh[7]]);
            pos = seg_header.saturating_add(u64::from(len));
            if pos > limit64 {
                complete = false;
                break;
            }
        }
        let total = if complete {
            (pos | 0x0F)
                .saturating_add(1)
                .saturating_add(if hash { 32 } else { 0 })
                .min(limit64)
        } else {
            limit64
        };
        let mut bytes = vec![0u8; total as usize];
        self.flash.read(offset, &mut bytes)?;
        Ok(bytes)
    }

    /// Verifies the image in a slot as `esp_image_verify` does (whole slot as the limit).
    pub fn verify_slot(&mut self, slot: BootSlot) -> Result<AppImage, EspError> {
        let region = self
            .slot_region(slot)
            .ok_or(EspError::NoSuchSlot { slot })?;
        self.verify_region(slot, region, region.size)
    }

    /// The bootloader: reads otadata, turns an entry left in `PendingVerify` into `Aborted` and
    /// the chosen `New` entry into `PendingVerify` (when rollback is on), picks the slot of the
    /// valid entry with the highest sequence number (`(seq - 1) % slots`; the factory app, or
    /// `ota_0` without one, when neither entry is valid), verifies its image and, when it does
    /// not verify, tries the slots below it down to the factory app and then the slots above
    /// it, as `bootloader_utility_load_boot_image` does. On a fresh flash without a factory app
    /// the first `ota_N` that boots gets otadata entry 0 (`seq = N + 1`, `Valid`).
    pub fn boot(&mut self) -> Result<BootOutcome, EspError> {
        self.running = None;
        let n = self.slots.len();
        let mut entries = self.read_otadata()?;
        let mut rolled_back = false;
        if self.config.rollback {
            for i in 0..2 {
                let Some(entry) = entries.get_mut(i) else {
                    continue;
                };
                if entry.state == OtaState::PendingVerify {
                    entry.state = OtaState::Aborted;
                    let entry = *entry;
                    self.write_entry(i, &entry)?;
                    rolled_back = true;
                }
            }
        }
        let [e0, e1] = entries;
        let select_invalid = |e: &OtaSelectEntry| {
            e.seq == u32::MAX || matches!(e.state, OtaState::Invalid | OtaState::Aborted)
        };
        let empty_or_corrupt = |e: &OtaSelectEntry| e.seq == u32::MAX || !e.crc_ok();
        let mut initial_contents = false;
        // Index -1 is the factory app, 0.. the OTA slots (ESP-IDF's FACTORY_INDEX and up).
        let start: i64 = if (select_invalid(&e0) && select_invalid(&e1)) || n == 0 {
            if self.factory.is_some() {
                -1
            } else {
                initial_contents = empty_or_corrupt(&e0) && empty_or_corrupt(&e1);
                0
            }
        } else if let Some((index, slot)) = otadata::select_boot(&entries, n) {
            if let Some(entry) = entries
                .get_mut(index)
                .filter(|e| self.config.rollback && e.state == OtaState::New)
            {
                entry.state = OtaState::PendingVerify;
                let entry = *entry;
                self.write_entry(index, &entry)?;
            }
            slot as i64
        } else {
            -1
        };
        let count = n as i64;
        let order = (-1..=start).rev().chain(start.saturating_add(1)..count);
        let mut fallback_from = None;
        for index in order {
            let slot = if index < 0 {
                BootSlot::Factory
            } else {
                BootSlot::Ota(u8::try_from(index).unwrap_or(u8::MAX))
            };
            let Some(region) = self.slot_region(slot) else {
                continue;
            };
            match self.verify_region(slot, region, region.size) {
                Ok(image) => {
                    if let (true, BootSlot::Ota(k)) = (initial_contents, slot) {
                        let seq = u32::from(k).saturating_add(1);
                        self.write_entry(0, &OtaSelectEntry::new(seq, OtaState::Valid))?;
                    }
                    self.running = Some(image.clone());
                    return Ok(BootOutcome {
                        slot,
                        rolled_back,
                        fallback_from,
                        image,
                    });
                }
                Err(EspError::Flash(e)) => return Err(EspError::Flash(e)),
                Err(_) => {
                    if index == start {
                        fallback_from = Some(slot);
                    }
                }
            }
        }
        Err(EspError::NoBootableImage)
    }

    /// `esp_ota_get_boot_partition`: the slot otadata selects now (what the next boot tries
    /// first), without verifying it.
    pub fn boot_partition(&mut self) -> Result<Option<BootSlot>, EspError> {
        let entries = self.read_otadata()?;
        Ok(match otadata::select_boot(&entries, self.slots.len()) {
            Some((_, slot)) => Some(BootSlot::Ota(u8::try_from(slot).unwrap_or(u8::MAX))),
            None if self.factory.is_some() => Some(BootSlot::Factory),
            None if self.slots.is_empty() => None,
            None => Some(BootSlot::Ota(0)),
        })
    }

    /// `esp_ota_begin`: refuses the running slot, an unconfirmed running app (rollback on) and a
    /// size larger than the slot; erases the sectors the size covers (the whole slot for
    /// [`ImageSize::Unknown`], none yet for [`ImageSize::Sequential`]).
    pub fn begin(&mut self, slot: u8, size: ImageSize) -> Result<OtaHandle, EspError> {
        let running = self.running_slot().ok_or(EspError::NotBooted)?;
        let target = BootSlot::Ota(slot);
        let region = self
            .slot_region(target)
            .ok_or(EspError::NoSuchSlot { slot: target })?;
        if running == target {
            return Err(EspError::RunningSlot { slot: target });
        }
        let running_state = match (self.config.rollback, running) {
            (true, BootSlot::Ota(r)) => self.get_state_partition(r)?,
            _ => None,
        };
        if running_state == Some(OtaState::PendingVerify) {
            return Err(EspError::PendingVerify);
        }
        let erase_len = match size {
            ImageSize::Known(0) | ImageSize::Unknown => region.size,
            ImageSize::Known(n) if n > region.size => {
                return Err(EspError::ImageTooLarge {
                    size: u64::from(n),
                    slot_size: region.size,
                });
            }
            ImageSize::Known(n) => sector_ceil(n),
            ImageSize::Sequential => 0,
        };
        let mut handle = OtaHandle {
            slot,
            region,
            written: 0,
            erased_to: 0,
        };
        self.erase_in_slot(&mut handle, erase_len)?;
        Ok(handle)
    }

    /// Erases the slot's sectors from `handle.erased_to` up to `to` (rounded up to a sector).
    fn erase_in_slot(&mut self, handle: &mut OtaHandle, to: u32) -> Result<(), EspError> {
        erase_in_slot(&mut self.flash, handle, to)
    }

    /// `esp_ota_write`: appends `data` to the image, erasing sectors not erased yet. The first
    /// byte of the image must be 0xE9; a write past the end of the slot is refused whole.
    pub fn write(&mut self, handle: &mut OtaHandle, data: &[u8]) -> Result<(), EspError> {
        write_image(&mut self.flash, handle, data)
    }

    /// Starts an esp_delta_ota update into `slot` from the patch's 64-byte header: the
    /// header must name the running app (its appended SHA-256), else nothing is erased or
    /// written. Then [`EspOta::write_delta`] with the rest of the patch, and
    /// [`EspOta::end_delta`], which verifies the result like [`EspOta::end`].
    pub fn begin_delta(&mut self, slot: u8, header: &[u8]) -> Result<DeltaHandle, EspError> {
        use otaforge_formats::delta;
        let running = self.running_app().ok_or(EspError::NotBooted)?.clone();
        let patch_base = delta::header_base_id(header).ok_or(EspError::DeltaHeader)?;
        let ours = running.sha256.ok_or(EspError::DeltaBaseUnnamed)?;
        if patch_base != ours {
            return Err(EspError::DeltaForAnotherBase {
                patch_base: hex(&patch_base),
                running: hex(&ours),
            });
        }
        let base = self
            .slot_region(running.slot)
            .ok_or(EspError::NoSuchSlot { slot: running.slot })?;
        let base = Region::new(base.offset, running.len.min(base.size));
        let ota = self.begin(slot, ImageSize::Unknown)?;
        Ok(DeltaHandle {
            ota,
            base,
            applier: delta::Applier::new(u64::from(base.size)),
        })
    }

    /// Applies more of the patch (any chunk size).
    pub fn write_delta(&mut self, handle: &mut DeltaHandle, patch: &[u8]) -> Result<(), EspError> {
        self.delta_step(handle, Some(patch)).map(|_| ())
    }

    /// Ends the patch: the target must be complete, then it is verified like a full image.
    pub fn end_delta(&mut self, mut handle: DeltaHandle) -> Result<AppImage, EspError> {
        self.delta_step(&mut handle, None)?;
        self.end(handle.ota)
    }

    /// Feeds patch bytes (`Some`) or finishes (`None`), reading the base from flash and
    /// writing the target with [`write_image`].
    fn delta_step(
        &mut self,
        handle: &mut DeltaHandle,
        patch: Option<&[u8]>,
    ) -> Result<(), EspError> {
        let DeltaHandle { ota, base, applier } = handle;
        let base = *base;
        let flash = core::cell::RefCell::new(&mut self.flash);
        let mut failure: Option<EspError> = None;
        let mut read = |at: u64, buf: &mut [u8]| {
            let Some(addr) = u32::try_from(at).ok().and_then(|at| base.at(at)) else {
                return false;
            };
            match flash.borrow_mut().read(addr, buf) {
                Ok(()) => true,
                Err(e) => {
                    failure = Some(e.into());
                    false
                }
            }
        };
        let mut written_failure: Option<EspError> = None;
        let mut write = |bytes: &[u8]| match write_image(&mut **flash.borrow_mut(), ota, bytes) {
            Ok(()) => true,
            Err(e) => {
                written_failure = Some(e);
                false
            }
        };
        let result = match patch {
            Some(bytes) => applier.feed(bytes, &mut read, &mut write),
            None => {
                let done = core::mem::replace(applier, otaforge_formats::delta::Applier::new(0));
                done.finish(&mut read, &mut write).map(|_| ())
            }
        };
        match (result, failure.or(written_failure)) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(io)) => Err(io),
            (Err(e), None) => Err(EspError::Delta(e)),
        }
    }

    /// `esp_ota_end`: verifies the written image (header, segments, checksum, SHA-256, chip,
    /// all within the bytes written) and returns it.
    pub fn end(&mut self, handle: OtaHandle) -> Result<AppImage, EspError> {
        if handle.written == 0 {
            return Err(EspError::NothingWritten);
        }
        self.verify_region(BootSlot::Ota(handle.slot), handle.region, handle.written)
    }

    /// `esp_ota_abort`: drops the update; the slot keeps whatever was written.
    pub fn abort(&mut self, handle: OtaHandle) {
        let _ = handle;
    }

    /// `esp_ota_set_boot_partition`: verifies the slot's image, then for an OTA slot writes the
    /// next otadata entry (`seq` above the active one with `(seq - 1) % slots == slot`, state
    /// `New` with rollback, `Undefined` without) into the sector not holding the active entry;
    /// for the factory app erases otadata. A slot that does not verify leaves otadata as it is.
    pub fn set_boot_partition(&mut self, slot: BootSlot) -> Result<(), EspError> {
        self.verify_slot(slot)?;
        match slot {
            BootSlot::Factory => {
                erase_range(&mut self.flash, self.otadata.offset, self.otadata.size)?;
            }
            BootSlot::Ota(k) => {
                let entries = self.read_otadata()?;
                let (index, mut entry) =
                    otadata::next_boot_entry(&entries, usize::from(k), self.slots.len())
                        .ok_or(EspError::SequenceExhausted { slot })?;
                entry.state = if self.config.rollback {
                    OtaState::New
                } else {
                    OtaState::Undefined
                };
                self.write_entry(index, &entry)?;
            }
        }
        Ok(())
    }

    /// `esp_ota_mark_app_valid_cancel_rollback`: the active otadata entry becomes `Valid`
    /// (rewritten only when it is not already).
    pub fn mark_app_valid_cancel_rollback(&mut self) -> Result<(), EspError> {
        self.running_slot().ok_or(EspError::NotBooted)?;
        let mut entries = self.read_otadata()?;
        let (index, _) =
            otadata::select_boot(&entries, self.slots.len()).ok_or(EspError::RunningFactory)?;
        if let Some(entry) = entries
            .get_mut(index)
            .filter(|e| e.state != OtaState::Valid)
        {
            entry.state = OtaState::Valid;
            let entry = *entry;
            self.write_entry(index, &entry)?;
        }
        Ok(())
    }

    /// `esp_ota_mark_app_invalid_rollback_and_reboot`: when another app can boot (the other
    /// valid entry's slot, or the factory app, verifies), marks the active entry `Invalid` and
    /// boots again.
    pub fn mark_app_invalid_rollback_and_reboot(&mut self) -> Result<BootOutcome, EspError> {
        self.running_slot().ok_or(EspError::NotBooted)?;
        let mut entries = self.read_otadata()?;
        let n = self.slots.len();
        let (index, _) = otadata::select_boot(&entries, n).ok_or(EspError::RunningFactory)?;
        let other = entries
            .get(1usize.saturating_sub(index))
            .copied()
            .unwrap_or_else(OtaSelectEntry::erased);
        let possible = if other.is_valid() {
            let slot = other
                .seq
                .wrapping_sub(1)
                .checked_rem(n as u32)
                .and_then(|s| u8::try_from(s).ok());
            slot.is_some_and(|s| self.verify_slot(BootSlot::Ota(s)).is_ok())
        } else {
            self.factory.is_some() && self.verify_slot(BootSlot::Factory).is_ok()
        };
        if !possible {
            return Err(EspError::RollbackNotPossible);
        }
        if let Some(entry) = entries.get_mut(index) {
            entry.state = OtaState::Invalid;
            let entry = *entry;
            self.write_entry(index, &entry)?;
        }
        self.boot()
    }

    /// `esp_ota_get_state_partition`: the state in the otadata entry (CRC intact) whose sequence
    /// number maps to `slot`, or `None` when there is none.
    pub fn get_state_partition(&mut self, slot: u8) -> Result<Option<OtaState>, EspError> {
        let n = self.slots.len();
        if usize::from(slot) >= n {
            return Err(EspError::NoSuchSlot {
                slot: BootSlot::Ota(slot),
            });
        }
        let entries = self.read_otadata()?;
        Ok(entries
            .iter()
            .find(|e| {
                e.crc_ok() && e.seq.wrapping_sub(1).checked_rem(n as u32) == Some(u32::from(slot))
            })
            .map(|e| e.state))
    }

    /// The raw 0x2000 bytes of otadata (for tests that check a refusal left them untouched).
    pub fn otadata_bytes(&mut self) -> Result<Vec<u8>, EspError> {
        let mut bytes = vec![0u8; OTADATA_LEN];
        self.flash.read(self.otadata.offset, &mut bytes)?;
        Ok(bytes)
    }
}

/// Erases a slot's sectors from `handle.erased_to` up to `to` (rounded up to a sector).
fn erase_in_slot<F: Flash + ?Sized>(
    flash: &mut F,
    handle: &mut OtaHandle,
    to: u32,
) -> Result<(), EspError> {
    let to = sector_ceil(to).min(handle.region.size);
    while handle.erased_to < to {
        let at = handle
            .region
            .at(handle.erased_to)
            .ok_or(EspError::NoSuchSlot {
                slot: BootSlot::Ota(handle.slot),
            })?;
        flash.erase_sector(at)?;
        handle.erased_to = handle.erased_to.saturating_add(SECTOR_SIZE);
    }
    Ok(())
}

/// `esp_ota_write` over a flash: the one write path of full images and of deltas.
fn write_image<F: Flash + ?Sized>(
    flash: &mut F,
    handle: &mut OtaHandle,
    data: &[u8],
) -> Result<(), EspError> {
    let Some(&first) = data.first() else {
        return Ok(());
    };
    if handle.written == 0 && first != esp_image::IMAGE_MAGIC {
        return Err(EspError::BadMagic { found: first });
    }
    let end = u64::from(handle.written).saturating_add(data.len() as u64);
    if end > u64::from(handle.region.size) {
        return Err(EspError::WritePastSlot {
            offset: handle.written,
            len: data.len(),
            slot_size: handle.region.size,
        });
    }
    let end = end as u32;
    erase_in_slot(flash, handle, end)?;
    let at = handle
        .region
        .at(handle.written)
        .ok_or(EspError::WritePastSlot {
            offset: handle.written,
            len: data.len(),
            slot_size: handle.region.size,
        })?;
    flash.write(at, data)?;
    handle.written = end;
    Ok(())
}
