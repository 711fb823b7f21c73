//! ESP32-family app images (ESP-IDF `esp_image_format.h`, esptool `elf2image`), their
//! `esp_app_desc_t`, and ESP8266 v1 images including Arduino's eboot + sketch `.bin`.
//!
//! Layout of an ESP32 app image, as esptool writes it and the ESP-IDF bootloader reads it:
//!
//! ```text
//! 0x00  magic 0xE9, segment count, SPI mode, flash size (high nibble) / frequency (low nibble)
//! 0x04  entry point (u32)
//! 0x08  extended header: WP pin, 3 bytes of SPI pin drive settings, chip id (u16 at 0x0C),
//!       legacy min chip revision (u8), min/max chip revision "full" (u16, major*100+minor),
//!       4 reserved bytes, hash_appended (u8 at 0x17)
//! 0x18  segments: load address (u32), length (u32), data
//!       zero padding up to the offset that is 15 mod 16, then one checksum byte
//!       (XOR of all segment data, seeded with 0xEF)
//!       if hash_appended: SHA-256 of every byte before it
//! ```
//!
//! esptool aligns flash-mapped segments (IROM/DROM) by inserting padding segments: pieces of a
//! RAM segment or zero-filled segments with load address 0. They are ordinary segments here.
//! Anything after the image (0xFF flash padding, a secure-boot signature block) is allowed and
//! reported as `trailing_len`.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use sha2::{Digest, Sha256};

use crate::bytes::{Hex, array, c_string_trimmed, slice, u8_at, u16_at, u32_at, xor_checksum};

/// First byte of every ESP image.
pub const IMAGE_MAGIC: u8 = 0xE9;
/// Seed of the XOR checksum over segment data.
pub const CHECKSUM_SEED: u8 = 0xEF;
/// Length of the ESP32 image header (common 8 bytes + 16-byte extended header).
pub const HEADER_LEN: usize = 24;
/// Length of the ESP8266 v1 image header (no extended header).
pub const ESP8266_HEADER_LEN: usize = 8;
/// Length of a segment header (load address, length).
pub const SEGMENT_HEADER_LEN: usize = 8;
/// Largest segment count the ESP-IDF bootloader and esptool accept.
pub const MAX_SEGMENTS: u8 = 16;
/// Segment lengths must stay below this (ESP-IDF `verify_segment_header`, esptool).
pub const MAX_SEGMENT_LEN: u32 = 16 * 1024 * 1024;
/// Magic word of `esp_app_desc_t`.
pub const APP_DESC_MAGIC: u32 = 0xABCD_5432;
/// File offset of `esp_app_desc_t`: right after the image header and the first segment header.
pub const APP_DESC_OFFSET: usize = 0x20;
/// Size of `esp_app_desc_t`.
pub const APP_DESC_LEN: usize = 256;
/// Offset of the Arduino sketch image inside an ESP8266 Arduino `.bin` (after eboot).
pub const ARDUINO_APP_OFFSET: usize = 0x1000;
/// Offset, relative to the Arduino sketch image, of the CRC length word (`elf2bin.py`).
const ARDUINO_CRC_LEN_REL: usize = 16;
/// Offset, relative to the Arduino sketch image, of the CRC value word (`elf2bin.py`).
const ARDUINO_CRC_VAL_REL: usize = 20;

/// The chip an ESP32-family image is built for (`esp_chip_id_t`, esptool `IMAGE_CHIP_ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Chip {
    Esp32,
    Esp32S2,
    Esp32C3,
    Esp32S3,
    Esp32C2,
    Esp32C6,
    Esp32H2,
    Esp32P4,
    Esp32C61,
    Esp32C5,
    Esp32H21,
    Esp32H4,
    Esp32E22,
    Esp32S31,
    /// A chip id this crate does not know.
    Other(u16),
}

impl Chip {
    /// Every chip this crate knows, in chip id order.
    pub const KNOWN: [Chip; 14] = [
        Chip::Esp32,
        Chip::Esp32S2,
        Chip::Esp32C3,
        Chip::Esp32S3,
        Chip::Esp32C2,
        Chip::Esp32C6,
        Chip::Esp32H2,
        Chip::Esp32P4,
        Chip::Esp32C61,
        Chip::Esp32C5,
        Chip::Esp32H21,
        Chip::Esp32H4,
        Chip::Esp32E22,
        Chip::Esp32S31,
    ];

    /// The chip for a chip id from the image header.
    pub fn from_id(id: u16) -> Chip {
        match id {
            0 => Chip::Esp32,
            2 => Chip::Esp32S2,
            5 => Chip::Esp32C3,
            9 => Chip::Esp32S3,
            12 => Chip::Esp32C2,
            13 => Chip::Esp32C6,
            16 => Chip::Esp32H2,
            18 => Chip::Esp32P4,
            20 => Chip::Esp32C61,
            23 => Chip::Esp32C5,
            25 => Chip::Esp32H21,
            28 => Chip::Esp32H4,
            31 => Chip::Esp32E22,
            32 => Chip::Esp32S31,
            other => Chip::Other(other),
        }
    }

    /// The chip id written in the image header.
    pub fn id(self) -> u16 {
        match self {
            Chip::Esp32 => 0,
            Chip::Esp32S2 => 2,
            Chip::Esp32C3 => 5,
            Chip::Esp32S3 => 9,
            Chip::Esp32C2 => 12,
            Chip::Esp32C6 => 13,
            Chip::Esp32H2 => 16,
            Chip::Esp32P4 => 18,
            Chip::Esp32C61 => 20,
            Chip::Esp32C5 => 23,
            Chip::Esp32H21 => 25,
            Chip::Esp32H4 => 28,
            Chip::Esp32E22 => 31,
            Chip::Esp32S31 => 32,
            Chip::Other(id) => id,
        }
    }

    /// The name esptool's `--chip` takes ("esp32", "esp32c3", ...), or "unknown".
    pub fn name(self) -> &'static str {
        match self {
            Chip::Esp32 => "esp32",
            Chip::Esp32S2 => "esp32s2",
            Chip::Esp32C3 => "esp32c3",
            Chip::Esp32S3 => "esp32s3",
            Chip::Esp32C2 => "esp32c2",
            Chip::Esp32C6 => "esp32c6",
            Chip::Esp32H2 => "esp32h2",
            Chip::Esp32P4 => "esp32p4",
            Chip::Esp32C61 => "esp32c61",
            Chip::Esp32C5 => "esp32c5",
            Chip::Esp32H21 => "esp32h21",
            Chip::Esp32H4 => "esp32h4",
            Chip::Esp32E22 => "esp32e22",
            Chip::Esp32S31 => "esp32s31",
            Chip::Other(_) => "unknown",
        }
    }

    /// Whether this is a chip id this crate knows.
    pub fn is_known(self) -> bool {
        !matches!(self, Chip::Other(_))
    }
}

impl fmt::Display for Chip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Chip::Other(id) => write!(f, "unknown chip id {id}"),
            chip => f.write_str(chip.name()),
        }
    }
}

/// `esp_app_desc_t`: the application description at file offset 0x20.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppDesc {
    pub secure_version: u32,
    /// `version[32]` at +16 (`PROJECT_VER`).
    pub version: String,
    /// `project_name[32]` at +48.
    pub project_name: String,
    /// `time[16]` at +80 (`__TIME__`).
    pub time: String,
    /// `date[16]` at +96 (`__DATE__`).
    pub date: String,
    /// `idf_ver[32]` at +112.
    pub idf_version: String,
    /// `app_elf_sha256[32]` at +144: SHA-256 of the ELF the image was made from.
    pub app_elf_sha256: [u8; 32],
    /// `min_efuse_blk_rev_full` at +176 (ESP-IDF 5.x; zero in older images).
    pub min_efuse_blk_rev_full: u16,
    /// `max_efuse_blk_rev_full` at +178 (ESP-IDF 5.x; zero in older images).
    pub max_efuse_blk_rev_full: u16,
    /// `mmu_page_size` at +180: log2 of the MMU page size, 0 when not recorded.
    pub mmu_page_size_log2: u8,
}

impl AppDesc {
    /// Parses `esp_app_desc_t` from the start of `desc`; `None` when it is shorter than 256
    /// bytes or the magic word is not `0xABCD5432`.
    pub fn parse(desc: &[u8]) -> Option<AppDesc> {
        let desc = slice(desc, 0, APP_DESC_LEN)?;
        if u32_at(desc, 0)? != APP_DESC_MAGIC {
            return None;
        }
        Some(AppDesc {
            secure_version: u32_at(desc, 4)?,
            version: c_string_trimmed(slice(desc, 16, 32)?),
            project_name: c_string_trimmed(slice(desc, 48, 32)?),
            time: c_string_trimmed(slice(desc, 80, 16)?),
            date: c_string_trimmed(slice(desc, 96, 16)?),
            idf_version: c_string_trimmed(slice(desc, 112, 32)?),
            app_elf_sha256: array(desc, 144)?,
            min_efuse_blk_rev_full: u16_at(desc, 176)?,
            max_efuse_blk_rev_full: u16_at(desc, 178)?,
            mmu_page_size_log2: u8_at(desc, 180)?,
        })
    }
}

/// One segment of an image: where it loads and where its data sits in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub load_addr: u32,
    /// File offset of the segment data (after its 8-byte header).
    pub data_offset: usize,
    pub len: u32,
}

impl Segment {
    /// The segment's data inside the file it was parsed from (empty if `file` is another one).
    pub fn data<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        slice(file, self.data_offset, self.len as usize).unwrap_or_default()
    }
}

/// A verified ESP32-family app image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EspImage {
    pub chip: Chip,
    pub entry: u32,
    /// SPI flash mode (0 QIO, 1 QOUT, 2 DIO, 3 DOUT, ...).
    pub spi_mode: u8,
    /// Header byte 3: flash size code in the high nibble, frequency code in the low nibble.
    pub flash_size_freq: u8,
    /// WP pin (0xEE when unused).
    pub wp_pin: u8,
    /// SPI pin drive settings, two 4-bit values per byte (clk/q, d/cs, hd/wp).
    pub spi_pin_drv: [u8; 3],
    /// Legacy minimum chip revision (major only).
    pub min_chip_rev: u8,
    /// Minimum chip revision, major * 100 + minor.
    pub min_chip_rev_full: u16,
    /// Maximum chip revision, major * 100 + minor.
    pub max_chip_rev_full: u16,
    pub segments: Vec<Segment>,
    /// The stored (and verified) checksum byte.
    pub checksum: u8,
    /// File offset of the checksum byte.
    pub checksum_offset: usize,
    pub hash_appended: bool,
    /// The stored (and verified) SHA-256 when `hash_appended`.
    pub sha256: Option<[u8; 32]>,
    pub app_desc: Option<AppDesc>,
    /// Length of the image: header, segments, padding, checksum and, if appended, the hash.
    pub image_len: usize,
    /// Bytes in the file after `image_len` (flash padding, signature blocks).
    pub trailing_len: usize,
}

impl EspImage {
    /// Flash size code (high nibble of header byte 3; for ESP32: 0 = 1 MB, 1 = 2 MB, 2 = 4 MB...).
    pub fn flash_size_code(&self) -> u8 {
        self.flash_size_freq >> 4
    }

    /// Flash frequency code (low nibble of header byte 3; chip specific).
    pub fn flash_freq_code(&self) -> u8 {
        self.flash_size_freq & 0x0F
    }
}

/// Why bytes are not a valid ESP32 or ESP8266 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EspImageError {
    /// The file is shorter than the image header.
    TooShortForHeader { needed: usize, len: usize },
    /// The first byte is not 0xE9.
    BadMagic { offset: usize, found: u8 },
    /// The segment count is 0 or above 16.
    BadSegmentCount { count: u8 },
    /// The `hash_appended` byte is neither 0 nor 1.
    BadHashAppended { value: u8 },
    /// A segment header does not fit in the file.
    SegmentHeaderPastEnd {
        index: usize,
        offset: usize,
        file_len: usize,
    },
    /// A segment's data does not fit in the file.
    SegmentPastEnd {
        index: usize,
        offset: usize,
        len: u32,
        file_len: usize,
    },
    /// A segment length is not a multiple of 4 (ESP32 only).
    SegmentLenNotAligned { index: usize, len: u32 },
    /// A segment length is 16 MiB or more.
    SegmentTooLong { index: usize, len: u32 },
    /// The checksum byte lies past the end of the file.
    ChecksumPastEnd { offset: usize, file_len: usize },
    /// The stored checksum is not the XOR of the segment data.
    ChecksumMismatch { stored: u8, computed: u8 },
    /// The appended SHA-256 does not fit in the file.
    HashPastEnd { offset: usize, file_len: usize },
    /// The appended SHA-256 is not the hash of the image.
    HashMismatch {
        stored: [u8; 32],
        computed: [u8; 32],
    },
    /// The Arduino CRC word at 0x1014 does not match the image.
    ArduinoCrcMismatch { stored: u32, computed: u32 },
    /// An error inside the sketch image at 0x1000 of an Arduino ESP8266 `.bin`.
    InArduinoApp(Box<EspImageError>),
}

impl fmt::Display for EspImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EspImageError::TooShortForHeader { needed, len } => write!(
                f,
                "file is {len} bytes, too short for the {needed}-byte image header"
            ),
            EspImageError::BadMagic { offset, found } => write!(
                f,
                "not an esp image: byte at {offset:#x} is {found:#04x}, expected 0xe9"
            ),
            EspImageError::BadSegmentCount { count } => {
                write!(f, "segment count {count} is outside 1..={MAX_SEGMENTS}")
            }
            EspImageError::BadHashAppended { value } => {
                write!(f, "hash_appended byte is {value:#04x}, expected 0 or 1")
            }
            EspImageError::SegmentHeaderPastEnd {
                index,
                offset,
                file_len,
            } => write!(
                f,
                "segment {index} header runs past the end of the file (offset {offset:#x}, file {file_len:#x} bytes)"
            ),
            EspImageError::SegmentPastEnd {
                index,
                offset,
                len,
                file_len,
            } => write!(
                f,
                "segment {index} runs past the end of the file (offset {offset:#x}, length {len:#x}, file {file_len:#x} bytes)"
            ),
            EspImageError::SegmentLenNotAligned { index, len } => {
                write!(f, "segment {index} length {len:#x} is not a multiple of 4")
            }
            EspImageError::SegmentTooLong { index, len } => {
                write!(f, "segment {index} length {len:#x} is not below 16 MiB")
            }
            EspImageError::ChecksumPastEnd { offset, file_len } => write!(
                f,
                "checksum byte at offset {offset:#x} is past the end of the file ({file_len:#x} bytes)"
            ),
            EspImageError::ChecksumMismatch { stored, computed } => write!(
                f,
                "checksum mismatch: image says {stored:#04x}, computed {computed:#04x}"
            ),
            EspImageError::HashPastEnd { offset, file_len } => write!(
                f,
                "appended sha-256 at offset {offset:#x} runs past the end of the file ({file_len:#x} bytes)"
            ),
            EspImageError::HashMismatch { stored, computed } => write!(
                f,
                "sha-256 mismatch: image says {}, computed {}",
                Hex(stored),
                Hex(computed)
            ),
            EspImageError::ArduinoCrcMismatch { stored, computed } => write!(
                f,
                "arduino crc mismatch: image says {stored:#010x}, computed {computed:#010x}"
            ),
            EspImageError::InArduinoApp(inner) => {
                write!(f, "in the sketch image at {ARDUINO_APP_OFFSET:#x}: {inner}")
            }
        }
    }
}

impl core::error::Error for EspImageError {}

/// Segments walked from a header.
struct Walk {
    segments: Vec<Segment>,
    /// File offset just past the last segment's data.
    end: usize,
    /// XOR of all segment data seeded with 0xEF.
    checksum: u8,
}

fn walk_segments(
    bytes: &[u8],
    first_header: usize,
    count: u8,
    esp32_rules: bool,
) -> Result<Walk, EspImageError> {
    let file_len = bytes.len();
    let mut segments = Vec::with_capacity(usize::from(count));
    let mut pos = first_header;
    let mut checksum = CHECKSUM_SEED;
    for index in 0..usize::from(count) {
        let header_past_end = EspImageError::SegmentHeaderPastEnd {
            index,
            offset: pos,
            file_len,
        };
        let (Some(load_addr), Some(len)) = (
            u32_at(bytes, pos),
            pos.checked_add(4).and_then(|p| u32_at(bytes, p)),
        ) else {
            return Err(header_past_end);
        };
        let data_offset = pos.checked_add(SEGMENT_HEADER_LEN).ok_or(header_past_end)?;
        if esp32_rules && len % 4 != 0 {
            return Err(EspImageError::SegmentLenNotAligned { index, len });
        }
        if len >= MAX_SEGMENT_LEN {
            return Err(EspImageError::SegmentTooLong { index, len });
        }
        let data =
            slice(bytes, data_offset, len as usize).ok_or(EspImageError::SegmentPastEnd {
                index,
                offset: data_offset,
                len,
                file_len,
            })?;
        checksum = xor_checksum(checksum, data);
        segments.push(Segment {
            load_addr,
            data_offset,
            len,
        });
        // `data` is inside `bytes`, so this cannot overflow; saturate to satisfy the lint.
        pos = data_offset.saturating_add(data.len());
    }
    Ok(Walk {
        segments,
        end: pos,
        checksum,
    })
}

/// File offset of the checksum byte for an image starting at `start` whose last segment ends
/// at `end`: zero padding until the offset (relative to the image) is 15 mod 16.
fn checksum_offset(start: usize, end: usize) -> Option<usize> {
    let rel = end.checked_sub(start)?;
    start.checked_add(rel | 0x0F)
}

fn read_checksum(bytes: &[u8], offset: usize) -> Result<u8, EspImageError> {
    u8_at(bytes, offset).ok_or(EspImageError::ChecksumPastEnd {
        offset,
        file_len: bytes.len(),
    })
}

/// Whether `bytes` start with a plausible ESP32-family header: magic 0xE9, 1..=16 segments, a
/// known chip id and a `hash_appended` byte of 0 or 1. ESP8266 v1 images have no extended
/// header, so for them these bytes are segment data and almost never fit; this tells "a
/// corrupted ESP32 image" from "not an ESP32 image" the way esptool `image-info` does.
pub fn looks_like_esp32_header(bytes: &[u8]) -> bool {
    let Some(header) = array::<HEADER_LEN>(bytes, 0) else {
        return false;
    };
    let [magic, count, ..] = header;
    let chip_id = u16::from_le_bytes([header[12], header[13]]);
    magic == IMAGE_MAGIC
        && (1..=MAX_SEGMENTS).contains(&count)
        && Chip::from_id(chip_id).is_known()
        && header[23] <= 1
}

/// Parses and verifies an ESP32-family app image: magic, segment count, segment bounds and
/// lengths, the XOR checksum and, when `hash_appended`, the SHA-256. Bytes after the image are
/// allowed and reported in `trailing_len`.
pub fn parse_image(bytes: &[u8]) -> Result<EspImage, EspImageError> {
    let header: [u8; HEADER_LEN] = array(bytes, 0).ok_or(EspImageError::TooShortForHeader {
        needed: HEADER_LEN,
        len: bytes.len(),
    })?;
    if header[0] != IMAGE_MAGIC {
        return Err(EspImageError::BadMagic {
            offset: 0,
            found: header[0],
        });
    }
    let count = header[1];
    if !(1..=MAX_SEGMENTS).contains(&count) {
        return Err(EspImageError::BadSegmentCount { count });
    }
    let hash_appended = match header[23] {
        0 => false,
        1 => true,
        value => return Err(EspImageError::BadHashAppended { value }),
    };

    let walk = walk_segments(bytes, HEADER_LEN, count, true)?;
    let checksum_at = checksum_offset(0, walk.end).ok_or(EspImageError::ChecksumPastEnd {
        offset: walk.end,
        file_len: bytes.len(),
    })?;
    let checksum = read_checksum(bytes, checksum_at)?;
    if checksum != walk.checksum {
        return Err(EspImageError::ChecksumMismatch {
            stored: checksum,
            computed: walk.checksum,
        });
    }
    // The checksum byte exists, so `checksum_at + 1 <= bytes.len()`.
    let mut image_len = checksum_at.saturating_add(1);

    let sha256 = if hash_appended {
        let past_end = EspImageError::HashPastEnd {
            offset: image_len,
            file_len: bytes.len(),
        };
        let stored: [u8; 32] = array(bytes, image_len).ok_or(past_end)?;
        let computed: [u8; 32] = Sha256::digest(bytes.get(..image_len).unwrap_or_default()).into();
        if stored != computed {
            return Err(EspImageError::HashMismatch { stored, computed });
        }
        image_len = image_len.saturating_add(32);
        Some(stored)
    } else {
        None
    };

    Ok(EspImage {
        chip: Chip::from_id(u16::from_le_bytes([header[12], header[13]])),
        entry: u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
        spi_mode: header[2],
        flash_size_freq: header[3],
        wp_pin: header[8],
        spi_pin_drv: [header[9], header[10], header[11]],
        min_chip_rev: header[14],
        min_chip_rev_full: u16::from_le_bytes([header[15], header[16]]),
        max_chip_rev_full: u16::from_le_bytes([header[17], header[18]]),
        segments: walk.segments,
        checksum,
        checksum_offset: checksum_at,
        hash_appended,
        sha256,
        app_desc: bytes.get(APP_DESC_OFFSET..).and_then(AppDesc::parse),
        image_len,
        trailing_len: bytes.len().saturating_sub(image_len),
    })
}

/// One ESP8266 v1 image (8-byte header, segments, checksum) inside a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Esp8266Part {
    /// File offset of the part's header.
    pub offset: usize,
    pub entry: u32,
    pub spi_mode: u8,
    pub flash_size_freq: u8,
    pub segments: Vec<Segment>,
    /// The stored (and verified) checksum byte.
    pub checksum: u8,
    /// File offset of the checksum byte.
    pub checksum_offset: usize,
}

/// A verified ESP8266 image in format v1.
///
/// Two layouts are understood:
/// - a plain v1 image (ESP8266 NONOS `0x00000.bin`, `esptool elf2image --version 1`): one part;
/// - an Arduino ESP8266 `.bin` (`tools/elf2bin.py`): the `eboot` bootloader as a v1 image at 0,
///   padded with 0xAA to 0x1000, then the sketch as a v1 image whose first segment is
///   `.irom0.text`. Since Arduino core 2.7, `elf2bin.py` writes the file length at 0x1010 and a
///   CRC at 0x1014 (CRC-32/MPEG-2 of the file with both words zeroed), after the sketch's XOR
///   checksum was computed with those words still zero; both checks are applied here.
///
/// The ESP8266 "v2" (magic 0xEA) and "v3" formats are not parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Esp8266Image {
    /// The image at offset 0: Arduino's `eboot`, or the whole app of a plain v1 image.
    pub first: Esp8266Part,
    /// The sketch image at 0x1000 of an Arduino `.bin`.
    pub arduino_app: Option<Esp8266Part>,
    /// The verified Arduino CRC, when the file carries one.
    pub arduino_crc: Option<u32>,
    /// Length of the image: up to the last checksum byte.
    pub image_len: usize,
    /// Bytes in the file after `image_len`.
    pub trailing_len: usize,
}

/// Walks one ESP8266 v1 image at `offset`; returns it with the XOR of its segment data, which
/// the caller compares with the stored checksum.
fn walk_esp8266_part(bytes: &[u8], offset: usize) -> Result<(Esp8266Part, u8), EspImageError> {
    let header: [u8; ESP8266_HEADER_LEN] =
        array(bytes, offset).ok_or(EspImageError::TooShortForHeader {
            needed: ESP8266_HEADER_LEN,
            len: bytes.len().saturating_sub(offset),
        })?;
    if header[0] != IMAGE_MAGIC {
        return Err(EspImageError::BadMagic {
            offset,
            found: header[0],
        });
    }
    let count = header[1];
    if !(1..=MAX_SEGMENTS).contains(&count) {
        return Err(EspImageError::BadSegmentCount { count });
    }
    let first_header = offset.saturating_add(ESP8266_HEADER_LEN);
    let walk = walk_segments(bytes, first_header, count, false)?;
    let checksum_at = checksum_offset(offset, walk.end).ok_or(EspImageError::ChecksumPastEnd {
        offset: walk.end,
        file_len: bytes.len(),
    })?;
    let checksum = read_checksum(bytes, checksum_at)?;
    let part = Esp8266Part {
        offset,
        entry: u32::from_le_bytes([header[4], header[5], header[6], header[7]]),
        spi_mode: header[2],
        flash_size_freq: header[3],
        segments: walk.segments,
        checksum,
        checksum_offset: checksum_at,
    };
    Ok((part, walk.checksum))
}

fn verify_checksum(stored: u8, computed: u8) -> Result<(), EspImageError> {
    if stored == computed {
        Ok(())
    } else {
        Err(EspImageError::ChecksumMismatch { stored, computed })
    }
}

/// CRC-32/MPEG-2 (MSB first, polynomial 0x04C11DB7, init 0xFFFFFFFF, no final XOR): the CRC of
/// Arduino ESP8266 `eboot` and `elf2bin.py`.
pub fn crc32_mpeg2(data: &[u8]) -> u32 {
    crc32_mpeg2_update(0xFFFF_FFFF, data)
}

// Evaluated at compile time: an out-of-range index would fail the build, not panic at run time.
#[allow(clippy::indexing_slicing)]
const MPEG2_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i: u32 = 0;
    while i < 256 {
        let mut crc = i.wrapping_shl(24);
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000_0000 != 0 {
                crc.wrapping_shl(1) ^ 0x04C1_1DB7
            } else {
                crc.wrapping_shl(1)
            };
            bit += 1;
        }
        table[i as usize] = crc;
        i += 1;
    }
    table
};

fn crc32_mpeg2_update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        let index = (crc.wrapping_shr(24) ^ u32::from(b)) & 0xFF;
        let entry = MPEG2_TABLE.get(index as usize).copied().unwrap_or_default();
        crc = crc.wrapping_shl(8) ^ entry;
    }
    crc
}

/// Parses an ESP8266 v1 image, or an Arduino ESP8266 `.bin` (eboot + sketch); see
/// [`Esp8266Image`]. Verifies headers, segment bounds and the XOR checksums, and the Arduino
/// CRC when the length word at 0x1010 matches the image.
pub fn parse_esp8266_image(bytes: &[u8]) -> Result<Esp8266Image, EspImageError> {
    let (first, computed) = walk_esp8266_part(bytes, 0)?;
    verify_checksum(first.checksum, computed)?;
    let first_end = first.checksum_offset.saturating_add(1);
    // An Arduino .bin: eboot, then 0xAA up to 0x1000, then the sketch (starting with 0xE9).
    // Either sign is enough, so a corrupted magic or padding byte is an error, not "trailing".
    let arduino_padding = bytes
        .get(first_end..ARDUINO_APP_OFFSET)
        .is_some_and(|pad| pad.iter().all(|&b| b == 0xAA));
    let arduino = first_end <= ARDUINO_APP_OFFSET
        && bytes.len() > ARDUINO_APP_OFFSET
        && (arduino_padding || u8_at(bytes, ARDUINO_APP_OFFSET) == Some(IMAGE_MAGIC));
    if !arduino {
        return Ok(Esp8266Image {
            first,
            arduino_app: None,
            arduino_crc: None,
            image_len: first_end,
            trailing_len: bytes.len().saturating_sub(first_end),
        });
    }

    let in_app = |e| EspImageError::InArduinoApp(Box::new(e));
    let (app, raw_xor) = walk_esp8266_part(bytes, ARDUINO_APP_OFFSET).map_err(in_app)?;
    let image_len = app.checksum_offset.saturating_add(1);
    let len_at = ARDUINO_APP_OFFSET.saturating_add(ARDUINO_CRC_LEN_REL);
    let val_at = ARDUINO_APP_OFFSET.saturating_add(ARDUINO_CRC_VAL_REL);
    let words = slice(bytes, len_at, 8);
    let first_segment_holds_words = app
        .segments
        .first()
        .is_some_and(|s| s.data_offset == len_at && s.len >= 8);
    // Only a length word equal to the image length marks a CRC; before it was introduced
    // these bytes are ordinary code, covered by the XOR checksum as they are.
    let crc_present = first_segment_holds_words
        && u32_at(bytes, len_at).is_some_and(|len| len as usize == image_len);
    let arduino_crc = match (crc_present, words, u32_at(bytes, val_at)) {
        (true, Some(words), Some(stored)) => {
            // elf2bin.py computed the XOR checksum while both words were still zero.
            verify_checksum(app.checksum, xor_checksum(raw_xor, words)).map_err(in_app)?;
            let mut crc = crc32_mpeg2_update(0xFFFF_FFFF, bytes.get(..len_at).unwrap_or_default());
            crc = crc32_mpeg2_update(crc, &[0u8; 8]);
            crc = crc32_mpeg2_update(
                crc,
                bytes
                    .get(val_at.saturating_add(4)..image_len)
                    .unwrap_or_default(),
            );
            if crc != stored {
                return Err(EspImageError::ArduinoCrcMismatch {
                    stored,
                    computed: crc,
                });
            }
            Some(stored)
        }
        _ => {
            verify_checksum(app.checksum, raw_xor).map_err(in_app)?;
            None
        }
    };
    Ok(Esp8266Image {
        first,
        arduino_app: Some(app),
        arduino_crc,
        image_len,
        trailing_len: bytes.len().saturating_sub(image_len),
    })
}

pub mod build {
    //! Builders of minimal, valid ESP images, for tests and the device simulator.
    use super::*;

    /// One segment to put in a built image.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SegmentSpec {
        pub load_addr: u32,
        pub data: Vec<u8>,
    }

    /// Builds an ESP32-family app image as esptool lays it out: header, segments (each padded
    /// with zeros to a multiple of 4), zero padding, checksum and optionally the SHA-256. No
    /// MMU-page alignment is applied. Segment counts above 16 give an image `parse_image`
    /// refuses, on purpose.
    pub fn esp32_image(
        chip: Chip,
        entry: u32,
        segments: &[SegmentSpec],
        hash_appended: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&[
            IMAGE_MAGIC,
            u8::try_from(segments.len()).unwrap_or(u8::MAX),
            0x02, // DIO
            0x20, // 4 MB, 40 MHz
        ]);
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&[0xEE, 0, 0, 0]);
        out.extend_from_slice(&chip.id().to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0xFF, 0xFF, 0, 0, 0, 0]);
        out.push(u8::from(hash_appended));
        let mut checksum = CHECKSUM_SEED;
        for seg in segments {
            let mut data = seg.data.clone();
            while data.len() % 4 != 0 {
                data.push(0);
            }
            out.extend_from_slice(&seg.load_addr.to_le_bytes());
            out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
            checksum = xor_checksum(checksum, &data);
            out.extend_from_slice(&data);
        }
        while out.len() % 16 != 15 {
            out.push(0);
        }
        out.push(checksum);
        if hash_appended {
            let digest = Sha256::digest(&out);
            out.extend_from_slice(&digest);
        }
        out
    }

    /// A 256-byte `esp_app_desc_t` with the given strings (cut to their field sizes).
    pub fn app_desc(version: &str, project_name: &str, idf_version: &str) -> Vec<u8> {
        use crate::bytes::c_string_field;
        let mut d = Vec::with_capacity(APP_DESC_LEN);
        d.extend_from_slice(&APP_DESC_MAGIC.to_le_bytes());
        d.extend_from_slice(&[0u8; 12]);
        d.extend_from_slice(&c_string_field::<32>(version, 31));
        d.extend_from_slice(&c_string_field::<32>(project_name, 31));
        d.extend_from_slice(&c_string_field::<16>("00:00:00", 15));
        d.extend_from_slice(&c_string_field::<16>("Jan  1 2025", 15));
        d.extend_from_slice(&c_string_field::<32>(idf_version, 31));
        d.resize(APP_DESC_LEN, 0);
        d
    }

    /// Builds an ESP8266 v1 image (8-byte header, raw segments, checksum), as `elf2bin.py`
    /// writes each of its two parts.
    pub fn esp8266_image(entry: u32, segments: &[SegmentSpec]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&[
            IMAGE_MAGIC,
            u8::try_from(segments.len()).unwrap_or(u8::MAX),
            0x02,
            0x40,
        ]);
        out.extend_from_slice(&entry.to_le_bytes());
        let mut checksum = CHECKSUM_SEED;
        for seg in segments {
            out.extend_from_slice(&seg.load_addr.to_le_bytes());
            out.extend_from_slice(
                &u32::try_from(seg.data.len())
                    .unwrap_or(u32::MAX)
                    .to_le_bytes(),
            );
            checksum = xor_checksum(checksum, &seg.data);
            out.extend_from_slice(&seg.data);
        }
        while out.len() % 16 != 15 {
            out.push(0);
        }
        out.push(checksum);
        out
    }

    /// Builds an Arduino ESP8266 `.bin` as `elf2bin.py` does: `eboot` at 0, 0xAA up to 0x1000,
    /// the sketch, then the length and CRC words at 0x1010/0x1014. The sketch's first segment
    /// must be at least 8 bytes (it is `.irom0.text`, which starts with the two CRC words).
    pub fn arduino_esp8266_bin(eboot: &[u8], sketch: &[u8]) -> Vec<u8> {
        let mut out = eboot.to_vec();
        out.resize(ARDUINO_APP_OFFSET.max(out.len()), 0xAA);
        out.extend_from_slice(sketch);
        let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
        let len_at = ARDUINO_APP_OFFSET.saturating_add(ARDUINO_CRC_LEN_REL);
        let val_at = ARDUINO_APP_OFFSET.saturating_add(ARDUINO_CRC_VAL_REL);
        crate::bytes::put_u32(&mut out, len_at, 0);
        crate::bytes::put_u32(&mut out, val_at, 0);
        let crc = crc32_mpeg2(&out);
        crate::bytes::put_u32(&mut out, len_at, len);
        crate::bytes::put_u32(&mut out, val_at, crc);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn sample(hash: bool) -> Vec<u8> {
        let mut drom = app_desc("1.2.3", "demo", "v5.1");
        drom.extend_from_slice(&[0x11; 40]);
        esp32_image(
            Chip::Esp32C3,
            0x4200_0020,
            &[
                SegmentSpec {
                    load_addr: 0x3C00_0020,
                    data: drom,
                },
                SegmentSpec {
                    load_addr: 0x4200_0020,
                    data: vec![0x13, 0x05, 0x00, 0x00, 0x6F, 0x00, 0x00, 0x00],
                },
                SegmentSpec {
                    load_addr: 0x3FC8_8000,
                    data: vec![1, 2, 3, 4, 5, 6, 7],
                },
            ],
            hash,
        )
    }

    #[test]
    fn chip_ids_round_trip() {
        for chip in Chip::KNOWN {
            assert_eq!(Chip::from_id(chip.id()), chip);
            assert!(chip.is_known());
        }
        assert_eq!(Chip::from_id(5).name(), "esp32c3");
        assert_eq!(Chip::from_id(0).name(), "esp32");
        assert_eq!(Chip::from_id(18), Chip::Esp32P4);
        assert_eq!(Chip::from_id(7), Chip::Other(7));
        assert_eq!(Chip::Other(7).id(), 7);
        assert_eq!(Chip::Other(7).to_string(), "unknown chip id 7");
    }

    #[test]
    fn parses_built_image_with_hash() {
        let bytes = sample(true);
        let img = parse_image(&bytes).unwrap();
        assert_eq!(img.chip, Chip::Esp32C3);
        assert_eq!(img.entry, 0x4200_0020);
        assert_eq!(img.segments.len(), 3);
        assert_eq!(img.segments[0].data_offset, 0x20);
        assert_eq!(img.segments[2].len, 8, "7 bytes padded to 8");
        assert!(img.hash_appended);
        assert_eq!(img.image_len, bytes.len());
        assert_eq!(img.checksum_offset % 16, 15);
        assert_eq!(img.trailing_len, 0);
        let desc = img.app_desc.unwrap();
        assert_eq!(desc.version, "1.2.3");
        assert_eq!(desc.project_name, "demo");
        assert_eq!(desc.idf_version, "v5.1");
        assert_eq!(desc.date, "Jan  1 2025");
        assert_eq!(img.sha256.unwrap().as_slice(), &bytes[bytes.len() - 32..]);
    }

    #[test]
    fn trailing_flash_padding_is_reported() {
        let mut bytes = sample(false);
        let len = bytes.len();
        bytes.extend_from_slice(&[0xFF; 100]);
        let img = parse_image(&bytes).unwrap();
        assert!(!img.hash_appended);
        assert_eq!(img.sha256, None);
        assert_eq!(img.image_len, len);
        assert_eq!(img.trailing_len, 100);
    }

    #[test]
    fn no_app_desc_without_magic() {
        let bytes = esp32_image(
            Chip::Esp32,
            0x4008_0000,
            &[SegmentSpec {
                load_addr: 0x3FFB_0000,
                data: vec![0; 300],
            }],
            true,
        );
        assert_eq!(parse_image(&bytes).unwrap().app_desc, None);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let good = sample(true);

        let err = parse_image(&good[..10]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "file is 10 bytes, too short for the 24-byte image header"
        );

        let mut bad = good.clone();
        bad[0] = 0xEA;
        assert_eq!(
            parse_image(&bad).unwrap_err().to_string(),
            "not an esp image: byte at 0x0 is 0xea, expected 0xe9"
        );

        let mut bad = good.clone();
        bad[1] = 0;
        assert_eq!(
            parse_image(&bad).unwrap_err(),
            EspImageError::BadSegmentCount { count: 0 }
        );
        bad[1] = 17;
        assert_eq!(
            parse_image(&bad).unwrap_err().to_string(),
            "segment count 17 is outside 1..=16"
        );

        let mut bad = good.clone();
        bad[23] = 2;
        assert_eq!(
            parse_image(&bad).unwrap_err().to_string(),
            "hash_appended byte is 0x02, expected 0 or 1"
        );

        // Checksum mismatch: flip a byte of segment data and re-hash so only the XOR is wrong.
        let mut bad = good.clone();
        bad[0x40] ^= 0x01;
        let err = parse_image(&bad).unwrap_err();
        let EspImageError::ChecksumMismatch { stored, computed } = err else {
            panic!("expected checksum mismatch, got {err}");
        };
        assert_eq!(stored ^ computed, 0x01);
        assert!(
            err.to_string()
                .starts_with("checksum mismatch: image says 0x")
        );

        // Hash mismatch: change the checksum padding (covered by the hash, not the XOR).
        let img = parse_image(&good).unwrap();
        let mut bad = good.clone();
        bad[img.checksum_offset - 1] = 0x55;
        let err = parse_image(&bad).unwrap_err();
        assert!(matches!(err, EspImageError::HashMismatch { .. }), "{err}");
        assert!(err.to_string().starts_with("sha-256 mismatch: image says "));

        // Truncated inside the hash.
        let err = parse_image(&good[..good.len() - 1]).unwrap_err();
        assert!(matches!(err, EspImageError::HashPastEnd { .. }), "{err}");

        // Truncated before the checksum.
        let err = parse_image(&good[..img.checksum_offset]).unwrap_err();
        assert!(
            matches!(err, EspImageError::ChecksumPastEnd { .. }),
            "{err}"
        );
    }

    #[test]
    fn segment_past_end_message() {
        let mut bytes = sample(false);
        // Segment 0 header is at 0x18; claim 0x5000 bytes.
        bytes[0x1C..0x20].copy_from_slice(&0x5000u32.to_le_bytes());
        let err = parse_image(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            alloc::format!(
                "segment 0 runs past the end of the file (offset 0x20, length 0x5000, file {:#x} bytes)",
                bytes.len()
            )
        );
        bytes[0x1C..0x20].copy_from_slice(&0x5001u32.to_le_bytes());
        assert_eq!(
            parse_image(&bytes).unwrap_err().to_string(),
            "segment 0 length 0x5001 is not a multiple of 4"
        );
        bytes[0x1C..0x20].copy_from_slice(&0x0100_0000u32.to_le_bytes());
        assert_eq!(
            parse_image(&bytes).unwrap_err().to_string(),
            "segment 0 length 0x1000000 is not below 16 MiB"
        );
        let err = parse_image(&bytes[..0x1C]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment 0 header runs past the end of the file (offset 0x18, file 0x1c bytes)"
        );
    }

    #[test]
    fn esp32_header_detection() {
        let good = sample(true);
        assert!(looks_like_esp32_header(&good));
        assert!(!looks_like_esp32_header(&good[..23]));
        let mut other_chip = good.clone();
        other_chip[12] = 7;
        assert!(!looks_like_esp32_header(&other_chip));
        let mut bad_flag = good.clone();
        bad_flag[23] = 9;
        assert!(!looks_like_esp32_header(&bad_flag));
        // A corrupted ESP32 image still looks like one.
        let mut corrupt = good.clone();
        corrupt[0x40] ^= 0xFF;
        assert!(looks_like_esp32_header(&corrupt));
        let v1 = esp8266_image(
            0x4010_F000,
            &[SegmentSpec {
                load_addr: 0x4010_F000,
                data: vec![0xAB; 0xD10],
            }],
        );
        assert!(!looks_like_esp32_header(&v1));
    }

    #[test]
    fn crc32_mpeg2_check_value() {
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
        assert_eq!(crc32_mpeg2(b""), 0xFFFF_FFFF);
    }

    fn eboot() -> Vec<u8> {
        esp8266_image(
            0x4010_F000,
            &[
                SegmentSpec {
                    load_addr: 0x4010_F000,
                    data: vec![0x31; 0x5A1],
                },
                SegmentSpec {
                    load_addr: 0x3FFE_8000,
                    data: vec![0x7E; 0x33],
                },
            ],
        )
    }

    fn sketch() -> Vec<u8> {
        let mut irom = vec![0u8; 8]; // __crc_len, __crc_val placeholders
        irom.extend((0..200u8).map(|i| i.wrapping_mul(7)));
        esp8266_image(
            0x4010_0000,
            &[
                SegmentSpec {
                    load_addr: 0x4020_1010,
                    data: irom,
                },
                SegmentSpec {
                    load_addr: 0x4010_0000,
                    data: vec![0x42; 61],
                },
            ],
        )
    }

    #[test]
    fn esp8266_plain_image() {
        let bytes = eboot();
        let img = parse_esp8266_image(&bytes).unwrap();
        assert_eq!(img.first.entry, 0x4010_F000);
        assert_eq!(img.first.segments.len(), 2);
        assert_eq!(img.arduino_app, None);
        assert_eq!(img.image_len, bytes.len());

        let mut bad = bytes.clone();
        bad[20] ^= 4;
        assert!(matches!(
            parse_esp8266_image(&bad),
            Err(EspImageError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn esp8266_arduino_bin() {
        let bytes = arduino_esp8266_bin(&eboot(), &sketch());
        let img = parse_esp8266_image(&bytes).unwrap();
        let app = img.arduino_app.as_ref().unwrap();
        assert_eq!(app.offset, 0x1000);
        assert_eq!(app.segments[0].load_addr, 0x4020_1010);
        assert_eq!(app.segments[0].data_offset, 0x1010);
        assert_eq!(img.image_len, bytes.len());
        assert_eq!(
            img.arduino_crc,
            Some(u32::from_le_bytes(
                bytes[0x1014..0x1018].try_into().unwrap()
            ))
        );

        // A flipped byte in the sketch breaks its XOR checksum.
        let mut bad = bytes.clone();
        bad[0x1030] ^= 0x10;
        let err = parse_esp8266_image(&bad).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("in the sketch image at 0x1000: checksum mismatch"),
            "{err}"
        );
        // A wrong CRC word is caught by the CRC.
        let mut bad = bytes.clone();
        bad[0x1014] ^= 0x10;
        assert!(matches!(
            parse_esp8266_image(&bad),
            Err(EspImageError::ArduinoCrcMismatch { .. })
        ));
        // A flipped byte in the 0xAA padding is only caught by the CRC.
        let mut bad = bytes.clone();
        bad[0xF00] = 0xAB;
        assert!(matches!(
            parse_esp8266_image(&bad),
            Err(EspImageError::ArduinoCrcMismatch { .. })
        ));
    }

    #[test]
    fn every_byte_of_an_arduino_bin_is_checked() {
        let bytes = arduino_esp8266_bin(&eboot(), &sketch());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(
                parse_esp8266_image(&bad).is_err(),
                "flip at {i:#x} accepted"
            );
        }
    }

    #[test]
    fn every_byte_of_a_hashed_image_is_checked() {
        let bytes = sample(true);
        for i in 0..bytes.len() {
            for flip in [0x01, 0x80] {
                let mut bad = bytes.clone();
                bad[i] ^= flip;
                let result = parse_image(&bad);
                if i == 23 && flip == 0x01 {
                    // hash_appended 1 -> 0: a valid image without hash, 32 trailing bytes.
                    assert_eq!(result.unwrap().trailing_len, 32);
                } else {
                    assert!(result.is_err(), "flip {flip:#x} at {i:#x} accepted");
                }
            }
        }
    }

    #[test]
    fn esp8266_arduino_bin_without_crc() {
        // Before core 2.7 there were no CRC words: the sketch checksum covers the raw bytes.
        let mut bytes = eboot();
        bytes.resize(0x1000, 0xAA);
        bytes.extend_from_slice(&sketch());
        let img = parse_esp8266_image(&bytes).unwrap();
        assert!(img.arduino_app.is_some());
        assert_eq!(img.arduino_crc, None);
    }
}
