//! Whole-flash images for flashing by wire or from a browser: where a chip's ROM reads its
//! bootloader, and one image holding several parts at their flash offsets, byte for byte as
//! `esptool merge-bin` writes it (raw format, flash settings kept: each part copied as it is,
//! the gaps between them 0xFF, nothing after the last part).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use crate::esp::Chip;

/// Where the partition table is written on every ESP32-family chip.
pub const PARTITION_TABLE_OFFSET: u32 = 0x8000;

/// The largest merged image made (the biggest ESP flash is 128 MiB; 32 MiB covers every
/// board the platform builds for and bounds what one request can make the server allocate).
pub const MAX_MERGED_LEN: usize = 32 * 1024 * 1024;

impl Chip {
    /// Where the ROM reads the second-stage bootloader (esptool's `BOOTLOADER_FLASH_OFFSET`);
    /// `None` for a chip this crate does not know.
    pub fn bootloader_offset(self) -> Option<u32> {
        Some(match self {
            Chip::Esp32 | Chip::Esp32S2 => 0x1000,
            Chip::Esp32C3
            | Chip::Esp32S3
            | Chip::Esp32C2
            | Chip::Esp32C6
            | Chip::Esp32H2
            | Chip::Esp32C61
            | Chip::Esp32H21
            | Chip::Esp32E22 => 0x0,
            Chip::Esp32P4 | Chip::Esp32C5 | Chip::Esp32H4 | Chip::Esp32S31 => 0x2000,
            Chip::Other(_) => return None,
        })
    }
}

/// The chip family as ESP Web Tools' manifest names it: `ESP8266`, `ESP32`, `ESP32-C3`, ...
/// from this crate's chip name (`esp8266`, `esp32`, `esp32c3`).
pub fn web_tools_family(chip: &str) -> Option<String> {
    let rest = chip.strip_prefix("esp")?;
    if rest == "8266" {
        return Some("ESP8266".into());
    }
    let variant = rest.strip_prefix("32")?;
    if !variant.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(if variant.is_empty() {
        "ESP32".into()
    } else {
        format!("ESP32-{}", variant.to_ascii_uppercase())
    })
}

/// Why parts could not be merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeError {
    NoParts,
    EmptyPart { offset: u32 },
    Overlap { first: u32, second: u32 },
    TooLarge { len: u64 },
}

impl core::fmt::Display for MergeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MergeError::NoParts => write!(f, "no parts to merge"),
            MergeError::EmptyPart { offset } => write!(f, "the part at {offset:#x} is empty"),
            MergeError::Overlap { first, second } => write!(
                f,
                "the part at {first:#x} runs into the part at {second:#x}"
            ),
            MergeError::TooLarge { len } => write!(
                f,
                "the merged image would be {len} bytes, more than {MAX_MERGED_LEN}"
            ),
        }
    }
}

impl core::error::Error for MergeError {}

/// One image written from flash address 0: each `(offset, bytes)` at its offset, the gaps
/// 0xFF. Parts may come in any order; overlapping parts are refused.
pub fn merge(parts: &[(u32, &[u8])]) -> Result<Vec<u8>, MergeError> {
    let mut sorted: Vec<(u32, &[u8])> = parts.to_vec();
    sorted.sort_by_key(|(offset, _)| *offset);
    let mut end = 0u64;
    let mut last = None;
    for &(offset, bytes) in &sorted {
        if bytes.is_empty() {
            return Err(MergeError::EmptyPart { offset });
        }
        if let Some(first) = last
            && u64::from(offset) < end
        {
            return Err(MergeError::Overlap {
                first,
                second: offset,
            });
        }
        end = u64::from(offset).saturating_add(bytes.len() as u64);
        if end > MAX_MERGED_LEN as u64 {
            return Err(MergeError::TooLarge { len: end });
        }
        last = Some(offset);
    }
    if last.is_none() {
        return Err(MergeError::NoParts);
    }
    let mut image = vec![0xFF; end as usize];
    for (offset, bytes) in sorted {
        // In bounds: every part ends at or before `end`, checked above.
        let at = offset as usize;
        if let Some(place) = image.get_mut(at..at.saturating_add(bytes.len())) {
            place.copy_from_slice(bytes);
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_land_at_their_offsets_with_erased_gaps() {
        let merged = merge(&[(0x10, b"app"), (0x2, b"boot")]).unwrap();
        assert_eq!(merged.len(), 0x13);
        assert_eq!(&merged[..2], &[0xFF, 0xFF]);
        assert_eq!(&merged[2..6], b"boot");
        assert!(merged[6..0x10].iter().all(|&b| b == 0xFF));
        assert_eq!(&merged[0x10..], b"app");
    }

    #[test]
    fn bad_parts_are_refused() {
        assert_eq!(merge(&[]), Err(MergeError::NoParts));
        assert_eq!(
            merge(&[(0, b"abcd"), (2, b"x")]),
            Err(MergeError::Overlap {
                first: 0,
                second: 2
            })
        );
        assert_eq!(merge(&[(4, b"")]), Err(MergeError::EmptyPart { offset: 4 }));
        assert!(matches!(
            merge(&[(u32::MAX, b"x")]),
            Err(MergeError::TooLarge { .. })
        ));
    }

    #[test]
    fn families_as_esp_web_tools_names_them() {
        assert_eq!(web_tools_family("esp32").as_deref(), Some("ESP32"));
        assert_eq!(web_tools_family("esp32c3").as_deref(), Some("ESP32-C3"));
        assert_eq!(web_tools_family("esp32s3").as_deref(), Some("ESP32-S3"));
        assert_eq!(web_tools_family("esp8266").as_deref(), Some("ESP8266"));
        assert_eq!(web_tools_family("w800"), None);
        assert_eq!(Chip::Esp32.bootloader_offset(), Some(0x1000));
        assert_eq!(Chip::Esp32C3.bootloader_offset(), Some(0));
        assert_eq!(Chip::Esp32P4.bootloader_offset(), Some(0x2000));
    }
}
