//! ESP-IDF partition tables (`esp_flash_partitions.h`, `gen_esp32part.py`): 32-byte rows, the
//! MD5 row, and the 0xC00-byte binary that the bootloader reads at flash 0x8000.
//!
//! ```text
//! row:     AA 50, type, subtype, offset u32, size u32, label[16] (NUL-padded), flags u32
//! MD5 row: EB EB, 14 x FF, MD5 of all rows before it
//! then 0xFF up to 0xC00 bytes (an all-0xFF row ends the table)
//! ```

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use md5::{Digest, Md5};

use crate::bytes::{Hex, array, c_string, put, u32_at};

/// Flash offset of the partition table.
pub const TABLE_FLASH_OFFSET: u32 = 0x8000;
/// Size of the binary table `gen_esp32part.py` writes (rows, MD5 row, 0xFF fill).
pub const TABLE_MAX_LEN: usize = 0xC00;
/// Size of one row.
pub const ROW_LEN: usize = 32;
/// Magic of a partition row.
pub const ROW_MAGIC: [u8; 2] = [0xAA, 0x50];
/// Magic of the MD5 row.
pub const MD5_MAGIC: [u8; 2] = [0xEB, 0xEB];
/// Longest label in bytes.
pub const MAX_LABEL_LEN: usize = 16;
/// Most rows a table can hold: the rows plus the MD5 row must stay below 0xC00 bytes.
pub const MAX_ENTRIES: usize = TABLE_MAX_LEN / ROW_LEN - 2;

/// Partition type `app`.
pub const TYPE_APP: u8 = 0x00;
/// Partition type `data`.
pub const TYPE_DATA: u8 = 0x01;
/// App subtype `factory`.
pub const SUBTYPE_FACTORY: u8 = 0x00;
/// App subtype `ota_0`; `ota_N` is `0x10 + N` up to `ota_15` = 0x1F.
pub const SUBTYPE_OTA_0: u8 = 0x10;
/// App subtype `ota_15`.
pub const SUBTYPE_OTA_15: u8 = 0x1F;
/// App subtype `test`.
pub const SUBTYPE_TEST: u8 = 0x20;
/// Data subtype `ota` (otadata).
pub const SUBTYPE_OTADATA: u8 = 0x00;
/// Data subtype `phy`.
pub const SUBTYPE_PHY: u8 = 0x01;
/// Data subtype `nvs`.
pub const SUBTYPE_NVS: u8 = 0x02;
/// Data subtype `coredump`.
pub const SUBTYPE_COREDUMP: u8 = 0x03;
/// Data subtype `nvs_keys`.
pub const SUBTYPE_NVS_KEYS: u8 = 0x04;
/// Data subtype `efuse`.
pub const SUBTYPE_EFUSE: u8 = 0x05;
/// Data subtype `fat`.
pub const SUBTYPE_FAT: u8 = 0x81;
/// Data subtype `spiffs`.
pub const SUBTYPE_SPIFFS: u8 = 0x82;
/// Data subtype `littlefs`.
pub const SUBTYPE_LITTLEFS: u8 = 0x83;
/// Flag bit: the partition is encrypted.
pub const FLAG_ENCRYPTED: u32 = 1 << 0;
/// Flag bit: the partition is read-only.
pub const FLAG_READONLY: u32 = 1 << 1;

/// One partition row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionEntry {
    pub ty: u8,
    pub subtype: u8,
    pub offset: u32,
    pub size: u32,
    /// At most 16 bytes; stored NUL-padded.
    pub label: String,
    pub flags: u32,
}

impl PartitionEntry {
    /// The OTA slot number (0..=15) of an `ota_N` app partition.
    pub fn ota_slot(&self) -> Option<u8> {
        if self.ty == TYPE_APP && (SUBTYPE_OTA_0..=SUBTYPE_OTA_15).contains(&self.subtype) {
            self.subtype.checked_sub(SUBTYPE_OTA_0)
        } else {
            None
        }
    }

    pub fn is_app(&self) -> bool {
        self.ty == TYPE_APP
    }

    pub fn is_otadata(&self) -> bool {
        self.ty == TYPE_DATA && self.subtype == SUBTYPE_OTADATA
    }

    pub fn is_encrypted(&self) -> bool {
        self.flags & FLAG_ENCRYPTED != 0
    }

    pub fn is_readonly(&self) -> bool {
        self.flags & FLAG_READONLY != 0
    }

    /// The 32-byte row.
    pub fn encode(&self) -> Result<[u8; ROW_LEN], PartitionError> {
        let label = self.label.as_bytes();
        if label.len() > MAX_LABEL_LEN {
            return Err(PartitionError::LabelTooLong {
                label: self.label.clone(),
            });
        }
        let mut row = [0u8; ROW_LEN];
        put(&mut row, 0, &ROW_MAGIC);
        put(&mut row, 2, &[self.ty, self.subtype]);
        put(&mut row, 4, &self.offset.to_le_bytes());
        put(&mut row, 8, &self.size.to_le_bytes());
        put(&mut row, 12, label);
        put(&mut row, 28, &self.flags.to_le_bytes());
        Ok(row)
    }

    /// Parses one 32-byte row that starts with `AA 50` (index is used in errors).
    fn parse_row(row: &[u8; ROW_LEN]) -> PartitionEntry {
        PartitionEntry {
            ty: row[2],
            subtype: row[3],
            offset: u32_at(row, 4).unwrap_or_default(),
            size: u32_at(row, 8).unwrap_or_default(),
            label: c_string(row.get(12..28).unwrap_or_default()),
            flags: u32_at(row, 28).unwrap_or_default(),
        }
    }
}

/// A partition table: its rows in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PartitionTable {
    pub entries: Vec<PartitionEntry>,
}

/// Why bytes are not a valid partition table, or a table cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionError {
    /// The bytes end inside a row.
    TruncatedRow { row: usize, len: usize },
    /// A row starts with neither `AA 50`, `EB EB` nor is all 0xFF.
    UnknownRowMagic { row: usize, magic: [u8; 2] },
    /// The MD5 row does not hold the MD5 of the rows before it.
    Md5Mismatch {
        stored: [u8; 16],
        computed: [u8; 16],
    },
    /// No MD5 row and no all-0xFF row within 0xC00 bytes.
    MissingEndMarker,
    /// More rows than fit in 0xC00 bytes with the MD5 row.
    TooManyEntries { count: usize },
    /// A label longer than 16 bytes.
    LabelTooLong { label: String },
}

impl fmt::Display for PartitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionError::TruncatedRow { row, len } => write!(
                f,
                "partition table ends inside row {row} ({len:#x} bytes given, rows are 32 bytes)"
            ),
            PartitionError::UnknownRowMagic { row, magic } => write!(
                f,
                "partition table row {row} starts with {:02x} {:02x}, expected aa 50, eb eb or all ff",
                magic[0], magic[1]
            ),
            PartitionError::Md5Mismatch { stored, computed } => write!(
                f,
                "partition table md5 mismatch: table says {}, computed {}",
                Hex(stored),
                Hex(computed)
            ),
            PartitionError::MissingEndMarker => f.write_str(
                "partition table has neither an md5 row nor an all-0xff end row within 0xc00 bytes",
            ),
            PartitionError::TooManyEntries { count } => write!(
                f,
                "partition table has {count} entries, at most {MAX_ENTRIES} fit in 0xc00 bytes with the md5 row"
            ),
            PartitionError::LabelTooLong { label } => write!(
                f,
                "partition label {label:?} is {} bytes, at most {MAX_LABEL_LEN} fit",
                label.len()
            ),
        }
    }
}

impl core::error::Error for PartitionError {}

impl PartitionTable {
    /// Parses a table from the bytes at flash 0x8000 (only the first 0xC00 bytes are read).
    /// Reads `AA 50` rows until the MD5 row, which must hold the MD5 of the rows before it, or
    /// an all-0xFF row (tables written without MD5).
    pub fn parse(bytes: &[u8]) -> Result<PartitionTable, PartitionError> {
        let bytes = bytes.get(..TABLE_MAX_LEN).unwrap_or(bytes);
        let mut entries = Vec::new();
        let mut md5 = Md5::new();
        for (index, chunk) in bytes.chunks(ROW_LEN).enumerate() {
            let row: &[u8; ROW_LEN] =
                chunk.try_into().map_err(|_| PartitionError::TruncatedRow {
                    row: index,
                    len: bytes.len(),
                })?;
            let magic = [row[0], row[1]];
            if row.iter().all(|&b| b == 0xFF) {
                return Ok(PartitionTable { entries });
            }
            if magic == MD5_MAGIC {
                let stored: [u8; 16] = array(row, 16).unwrap_or_default();
                let computed: [u8; 16] = md5.finalize().into();
                if stored != computed {
                    return Err(PartitionError::Md5Mismatch { stored, computed });
                }
                return Ok(PartitionTable { entries });
            }
            if magic != ROW_MAGIC {
                return Err(PartitionError::UnknownRowMagic { row: index, magic });
            }
            md5.update(row);
            entries.push(PartitionEntry::parse_row(row));
        }
        Err(PartitionError::MissingEndMarker)
    }

    /// The 0xC00-byte binary `gen_esp32part.py` writes: the rows, the MD5 row, then 0xFF.
    pub fn encode(&self) -> Result<Vec<u8>, PartitionError> {
        if self.entries.len() > MAX_ENTRIES {
            return Err(PartitionError::TooManyEntries {
                count: self.entries.len(),
            });
        }
        let mut out = Vec::with_capacity(TABLE_MAX_LEN);
        for entry in &self.entries {
            out.extend_from_slice(&entry.encode()?);
        }
        let digest = Md5::digest(&out);
        out.extend_from_slice(&MD5_MAGIC);
        out.extend_from_slice(&[0xFF; 14]);
        out.extend_from_slice(&digest);
        out.resize(TABLE_MAX_LEN, 0xFF);
        Ok(out)
    }

    /// The entry with this label.
    pub fn find(&self, label: &str) -> Option<&PartitionEntry> {
        self.entries.iter().find(|e| e.label == label)
    }

    /// The `ota_N` app partitions ordered by slot number (subtype 0x10..=0x1F).
    pub fn ota_slots(&self) -> Vec<&PartitionEntry> {
        let mut slots: Vec<&PartitionEntry> = self
            .entries
            .iter()
            .filter(|e| e.ota_slot().is_some())
            .collect();
        slots.sort_by_key(|e| e.subtype);
        slots
    }

    /// The otadata partition (type data, subtype ota).
    pub fn otadata(&self) -> Option<&PartitionEntry> {
        self.entries.iter().find(|e| e.is_otadata())
    }

    /// The factory app partition.
    pub fn factory(&self) -> Option<&PartitionEntry> {
        self.entries
            .iter()
            .find(|e| e.ty == TYPE_APP && e.subtype == SUBTYPE_FACTORY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn entry(label: &str, ty: u8, subtype: u8, offset: u32, size: u32) -> PartitionEntry {
        PartitionEntry {
            ty,
            subtype,
            offset,
            size,
            label: label.into(),
            flags: 0,
        }
    }

    /// ESP-IDF's `partitions_two_ota.csv`.
    fn two_ota() -> PartitionTable {
        PartitionTable {
            entries: vec![
                entry("nvs", TYPE_DATA, SUBTYPE_NVS, 0x9000, 0x4000),
                entry("otadata", TYPE_DATA, SUBTYPE_OTADATA, 0xD000, 0x2000),
                entry("phy_init", TYPE_DATA, SUBTYPE_PHY, 0xF000, 0x1000),
                entry("factory", TYPE_APP, SUBTYPE_FACTORY, 0x10000, 0x100000),
                entry("ota_0", TYPE_APP, 0x10, 0x110000, 0x100000),
                entry("ota_1", TYPE_APP, 0x11, 0x210000, 0x100000),
            ],
        }
    }

    #[test]
    fn encodes_like_gen_esp32part() {
        let bin = two_ota().encode().unwrap();
        assert_eq!(bin.len(), 0xC00);
        // First row: AA 50 01 02, offset 0x9000, size 0x4000, "nvs", flags 0.
        assert_eq!(
            &bin[..32],
            &[
                0xAA, 0x50, 0x01, 0x02, 0x00, 0x90, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, b'n', b'v',
                b's', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
        let md5_row = &bin[6 * 32..7 * 32];
        assert_eq!(
            &md5_row[..16],
            &[
                0xEB, 0xEB, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                0xFF, 0xFF
            ]
        );
        assert_eq!(&md5_row[16..], Md5::digest(&bin[..6 * 32]).as_slice());
        assert!(bin[7 * 32..].iter().all(|&b| b == 0xFF));
    }

    #[test]
    fn round_trip_and_helpers() {
        let table = two_ota();
        let bin = table.encode().unwrap();
        let back = PartitionTable::parse(&bin).unwrap();
        assert_eq!(back, table);
        assert_eq!(back.find("phy_init").unwrap().offset, 0xF000);
        assert_eq!(back.find("nope"), None);
        let slots = back.ota_slots();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].label, "ota_0");
        assert_eq!(slots[1].ota_slot(), Some(1));
        assert_eq!(back.otadata().unwrap().size, 0x2000);
        assert_eq!(back.factory().unwrap().offset, 0x10000);
        // Parsing the whole 4 KiB sector works too.
        let mut sector = bin.clone();
        sector.resize(0x1000, 0xFF);
        assert_eq!(PartitionTable::parse(&sector).unwrap(), table);
    }

    #[test]
    fn ota_slots_are_ordered_by_subtype() {
        let table = PartitionTable {
            entries: vec![
                entry("b", TYPE_APP, 0x12, 0x300000, 0x1000),
                entry("a", TYPE_APP, 0x10, 0x100000, 0x1000),
                entry("test", TYPE_APP, SUBTYPE_TEST, 0x400000, 0x1000),
                entry("data", TYPE_DATA, 0x11, 0x500000, 0x1000),
            ],
        };
        let labels: Vec<&str> = table.ota_slots().iter().map(|e| e.label.as_str()).collect();
        assert_eq!(labels, ["a", "b"]);
    }

    #[test]
    fn flags_and_full_label() {
        let e = PartitionEntry {
            flags: FLAG_ENCRYPTED | FLAG_READONLY,
            label: "sixteen_bytes_ok".into(),
            ..entry("", TYPE_DATA, SUBTYPE_NVS, 0x9000, 0x1000)
        };
        assert!(e.is_encrypted() && e.is_readonly());
        let table = PartitionTable { entries: vec![e] };
        assert_eq!(
            PartitionTable::parse(&table.encode().unwrap()).unwrap(),
            table
        );

        let long = PartitionTable {
            entries: vec![entry("seventeen_bytes_x", TYPE_DATA, 2, 0, 0)],
        };
        assert_eq!(
            long.encode().unwrap_err().to_string(),
            "partition label \"seventeen_bytes_x\" is 17 bytes, at most 16 fit"
        );
    }

    #[test]
    fn without_md5_row() {
        let mut bin = Vec::new();
        for e in &two_ota().entries {
            bin.extend_from_slice(&e.encode().unwrap());
        }
        bin.resize(0xC00, 0xFF);
        assert_eq!(PartitionTable::parse(&bin).unwrap(), two_ota());
    }

    #[test]
    fn errors() {
        let bin = two_ota().encode().unwrap();

        let mut bad = bin.clone();
        bad[12] = b'N';
        let err = PartitionTable::parse(&bad).unwrap_err();
        assert!(matches!(err, PartitionError::Md5Mismatch { .. }));
        assert!(
            err.to_string()
                .starts_with("partition table md5 mismatch: table says ")
        );

        let mut bad = bin.clone();
        bad[32] = 0x12;
        assert_eq!(
            PartitionTable::parse(&bad).unwrap_err().to_string(),
            "partition table row 1 starts with 12 50, expected aa 50, eb eb or all ff"
        );

        assert_eq!(
            PartitionTable::parse(&bin[..40]).unwrap_err(),
            PartitionError::TruncatedRow { row: 1, len: 40 }
        );
        assert_eq!(
            PartitionTable::parse(&bin[..64]).unwrap_err(),
            PartitionError::MissingEndMarker
        );

        let too_many = PartitionTable {
            entries: vec![entry("x", TYPE_DATA, 2, 0, 0); MAX_ENTRIES + 1],
        };
        assert_eq!(
            too_many.encode().unwrap_err(),
            PartitionError::TooManyEntries { count: 95 }
        );
        let full = PartitionTable {
            entries: vec![entry("x", TYPE_DATA, 2, 0, 0); MAX_ENTRIES],
        };
        let bin = full.encode().unwrap();
        assert_eq!(bin.len(), 0xC00);
        assert_eq!(PartitionTable::parse(&bin).unwrap(), full);
    }
}
