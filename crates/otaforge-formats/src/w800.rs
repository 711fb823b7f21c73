//! WinnerMicro W800 firmware images: the 64-byte header of the WM IoT SDK (`wm_ota_header_t`,
//! `tools/wm/bin2img.py`), its JAMCRC checksums, and a builder for test and simulator images.
//!
//! ```text
//! 0x00 magic 0xA0FFFF9F        0x04 img_attr (type 3:0, gzip bit 16, compress_type 21:20)
//! 0x08 run address             0x0C payload length
//! 0x10 header address          0x14 upgrade address
//! 0x18 org_checksum (payload)  0x1C upd_no
//! 0x20 version[16], NUL-padded
//! 0x30 flags                   0x34 reserved
//! 0x38 next                    0x3C hd_checksum (over bytes 0..60)
//! ```
//!
//! Both checksums are CRC-32/JAMCRC: `binascii.crc32(data) ^ 0xFFFFFFFF`. An OTA image is the
//! xz (LZMA2, CRC32 check) of a whole `.img` under a new header with compress_type 1.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::bytes::{array, c_string, c_string_field, put, put_u32, slice, u32_at};

/// Magic number at offset 0 of every W800 image header.
pub const MAGIC: u32 = 0xA0FF_FF9F;
/// Length of the header.
pub const HEADER_LEN: usize = 64;
/// Number of header bytes covered by `hd_checksum`.
pub const HEADER_CHECKSUM_SPAN: usize = 60;
/// `compress_type` value of an xz payload.
pub const COMPRESS_XZ: u8 = 1;
/// Magic of an xz stream.
pub const XZ_MAGIC: [u8; 6] = [0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00];
/// Magic of a gzip stream.
pub const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];

const IMG_TYPE_MASK: u32 = 0x0000_000F;
const GZIP_BIT: u32 = 1 << 16;
const COMPRESS_SHIFT: u32 = 20;
const COMPRESS_MASK: u32 = 0b11 << COMPRESS_SHIFT;

/// CRC-32/JAMCRC: the zlib CRC-32 without its final inversion (check value of "123456789" is
/// 0x340BC6D9). Used for both W800 header checksums.
pub fn jamcrc(data: &[u8]) -> u32 {
    !crc32fast::hash(data)
}

/// The 64-byte W800 image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct W800Header {
    /// Image type, bits 3:0 of `img_attr` (encoding keeps only these 4 bits).
    pub img_type: u8,
    /// `gzip_enable`, bit 16 of `img_attr`.
    pub gzip: bool,
    /// Compression, bits 21:20 of `img_attr` (1 = xz; encoding keeps only these 2 bits).
    pub compress_type: u8,
    /// The other bits of `img_attr` (encryption, signature, PSRAM I/O, erase flags), kept as
    /// they are; the bits above are masked out of it when encoding.
    pub attr_other: u32,
    /// Address the image runs from.
    pub run_addr: u32,
    /// Length of the payload after the header.
    pub payload_len: u32,
    /// Address of the image header in flash.
    pub header_addr: u32,
    /// Address of the upgrade area.
    pub upgrade_addr: u32,
    /// JAMCRC of the payload.
    pub org_checksum: u32,
    pub upd_no: u32,
    /// Version string (16 bytes NUL-padded in the header; at most 15 bytes are written).
    pub version: String,
    /// Bootloader flags word (log level, skip checks).
    pub flags: u32,
    pub reserved: u32,
    /// Address of the next image header.
    pub next: u32,
    /// JAMCRC of the first 60 header bytes, as stored (recomputed by [`W800Header::encode`]).
    pub hd_checksum: u32,
}

impl Default for W800Header {
    /// The defaults of `bin2img.py`: type 0, no compression, run address 0x80D0400, header
    /// 0x80D0000, upgrade area 0x8010000, version "G03.00.00".
    fn default() -> Self {
        W800Header {
            img_type: 0,
            gzip: false,
            compress_type: 0,
            attr_other: 0,
            run_addr: 0x080D_0400,
            payload_len: 0,
            header_addr: 0x080D_0000,
            upgrade_addr: 0x0801_0000,
            org_checksum: 0,
            upd_no: 0,
            version: "G03.00.00".into(),
            flags: 0,
            reserved: 0,
            next: 0,
            hd_checksum: 0,
        }
    }
}

impl W800Header {
    /// The raw `img_attr` word.
    pub fn img_attr(&self) -> u32 {
        (self.attr_other & !(IMG_TYPE_MASK | GZIP_BIT | COMPRESS_MASK))
            | (u32::from(self.img_type) & IMG_TYPE_MASK)
            | if self.gzip { GZIP_BIT } else { 0 }
            | ((u32::from(self.compress_type) << COMPRESS_SHIFT) & COMPRESS_MASK)
    }

    /// Whether the header says the payload is xz-compressed.
    pub fn is_xz(&self) -> bool {
        self.compress_type == COMPRESS_XZ
    }

    /// The 64 header bytes with `hd_checksum` computed over the first 60 (the stored
    /// `hd_checksum` field is ignored). Versions longer than 15 bytes are cut to 15, at a
    /// character boundary, as `bin2img.py` does.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        put_u32(&mut h, 0, MAGIC);
        put_u32(&mut h, 4, self.img_attr());
        put_u32(&mut h, 8, self.run_addr);
        put_u32(&mut h, 12, self.payload_len);
        put_u32(&mut h, 16, self.header_addr);
        put_u32(&mut h, 20, self.upgrade_addr);
        put_u32(&mut h, 24, self.org_checksum);
        put_u32(&mut h, 28, self.upd_no);
        put(&mut h, 32, &c_string_field::<16>(&self.version, 15));
        put_u32(&mut h, 48, self.flags);
        put_u32(&mut h, 52, self.reserved);
        put_u32(&mut h, 56, self.next);
        let crc = jamcrc(h.get(..HEADER_CHECKSUM_SPAN).unwrap_or_default());
        put_u32(&mut h, HEADER_CHECKSUM_SPAN, crc);
        h
    }

    /// Parses and verifies a header (magic and `hd_checksum`) at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<W800Header, W800Error> {
        let h: [u8; HEADER_LEN] =
            array(bytes, 0).ok_or(W800Error::TooShortForHeader { len: bytes.len() })?;
        let word = |offset: usize| u32_at(&h, offset).unwrap_or_default();
        let magic = word(0);
        if magic != MAGIC {
            return Err(W800Error::BadMagic { found: magic });
        }
        let stored = word(HEADER_CHECKSUM_SPAN);
        let computed = jamcrc(h.get(..HEADER_CHECKSUM_SPAN).unwrap_or_default());
        if stored != computed {
            return Err(W800Error::HeaderChecksumMismatch { stored, computed });
        }
        let attr = word(4);
        Ok(W800Header {
            img_type: (attr & IMG_TYPE_MASK) as u8,
            gzip: attr & GZIP_BIT != 0,
            compress_type: ((attr & COMPRESS_MASK) >> COMPRESS_SHIFT) as u8,
            attr_other: attr & !(IMG_TYPE_MASK | GZIP_BIT | COMPRESS_MASK),
            run_addr: word(8),
            payload_len: word(12),
            header_addr: word(16),
            upgrade_addr: word(20),
            org_checksum: word(24),
            upd_no: word(28),
            version: c_string(h.get(32..48).unwrap_or_default()),
            flags: word(48),
            reserved: word(52),
            next: word(56),
            hd_checksum: stored,
        })
    }
}

/// A verified W800 image: header, payload at offset 64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct W800Image {
    pub header: W800Header,
    /// Whether the payload starts with the xz magic `FD 37 7A 58 5A 00`.
    pub payload_has_xz_magic: bool,
    /// Whether the payload starts with the gzip magic `1F 8B`.
    pub payload_has_gzip_magic: bool,
    /// Length of the image: header plus payload.
    pub image_len: usize,
    /// Bytes in the file after the payload (for example a 128-byte signature).
    pub trailing_len: usize,
}

impl W800Image {
    /// An xz OTA image: the header says xz and the payload is an xz stream.
    pub fn is_xz(&self) -> bool {
        self.header.is_xz() && self.payload_has_xz_magic
    }

    /// A gzip image (older W800 SDK OTA images): the gzip bit is set and the payload is gzip.
    pub fn is_gzip(&self) -> bool {
        self.header.gzip && self.payload_has_gzip_magic
    }

    /// The payload inside the file it was parsed from (empty if `file` is another one).
    pub fn payload<'a>(&self, file: &'a [u8]) -> &'a [u8] {
        file.get(HEADER_LEN..self.image_len).unwrap_or_default()
    }
}

/// Why bytes are not a valid W800 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum W800Error {
    /// The file is shorter than the 64-byte header.
    TooShortForHeader { len: usize },
    /// The first word is not 0xA0FFFF9F.
    BadMagic { found: u32 },
    /// `hd_checksum` is not the JAMCRC of the first 60 bytes.
    HeaderChecksumMismatch { stored: u32, computed: u32 },
    /// The header's payload length runs past the end of the file.
    PayloadPastEnd { payload_len: u32, available: usize },
    /// `org_checksum` is not the JAMCRC of the payload.
    PayloadChecksumMismatch { stored: u32, computed: u32 },
    /// A payload to build an image from is 4 GiB or larger.
    PayloadTooLarge { len: usize },
}

impl fmt::Display for W800Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            W800Error::TooShortForHeader { len } => write!(
                f,
                "file is {len} bytes, too short for the {HEADER_LEN}-byte w800 header"
            ),
            W800Error::BadMagic { found } => write!(
                f,
                "not a w800 image: magic is {found:#010x}, expected {MAGIC:#010x}"
            ),
            W800Error::HeaderChecksumMismatch { stored, computed } => write!(
                f,
                "header checksum mismatch: image says {stored:#010x}, computed {computed:#010x}"
            ),
            W800Error::PayloadPastEnd {
                payload_len,
                available,
            } => write!(
                f,
                "payload runs past the end of the file (header says {payload_len:#x} bytes, file has {available:#x} after the header)"
            ),
            W800Error::PayloadChecksumMismatch { stored, computed } => write!(
                f,
                "payload checksum mismatch: image says {stored:#010x}, computed {computed:#010x}"
            ),
            W800Error::PayloadTooLarge { len } => {
                write!(
                    f,
                    "payload of {len} bytes does not fit the 32-bit length field"
                )
            }
        }
    }
}

impl core::error::Error for W800Error {}

/// Parses and verifies a W800 image: magic, header checksum, payload length within the file and
/// the payload checksum. Bytes after the payload are allowed and reported in `trailing_len`.
pub fn parse_image(bytes: &[u8]) -> Result<W800Image, W800Error> {
    let header = W800Header::parse(bytes)?;
    let available = bytes.len().saturating_sub(HEADER_LEN);
    let payload =
        slice(bytes, HEADER_LEN, header.payload_len as usize).ok_or(W800Error::PayloadPastEnd {
            payload_len: header.payload_len,
            available,
        })?;
    let computed = jamcrc(payload);
    if computed != header.org_checksum {
        return Err(W800Error::PayloadChecksumMismatch {
            stored: header.org_checksum,
            computed,
        });
    }
    let image_len = HEADER_LEN.saturating_add(payload.len());
    Ok(W800Image {
        payload_has_xz_magic: payload.starts_with(&XZ_MAGIC),
        payload_has_gzip_magic: payload.starts_with(&GZIP_MAGIC),
        header,
        image_len,
        trailing_len: bytes.len().saturating_sub(image_len),
    })
}

/// Builds an image as `bin2img.py` does: the payload padded with 0xFF to a multiple of 4, and
/// the header from `template` with `payload_len`, `org_checksum` and `hd_checksum` filled in.
pub fn build_image(template: &W800Header, payload: &[u8]) -> Result<Vec<u8>, W800Error> {
    let padded_len = payload
        .len()
        .checked_next_multiple_of(4)
        .ok_or(W800Error::PayloadTooLarge { len: payload.len() })?;
    let payload_len =
        u32::try_from(padded_len).map_err(|_| W800Error::PayloadTooLarge { len: payload.len() })?;
    let mut body = Vec::with_capacity(padded_len);
    body.extend_from_slice(payload);
    body.resize(padded_len, 0xFF);
    let header = W800Header {
        payload_len,
        org_checksum: jamcrc(&body),
        ..template.clone()
    };
    let mut out = Vec::with_capacity(HEADER_LEN.saturating_add(padded_len));
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn jamcrc_check_value() {
        assert_eq!(jamcrc(b"123456789"), 0x340B_C6D9);
        assert_eq!(jamcrc(b""), 0xFFFF_FFFF);
    }

    #[test]
    fn header_layout_matches_bin2img() {
        // Field by field as bin2img.py packs them, for an xz image (compress arg 1<<4).
        let h = W800Header {
            compress_type: COMPRESS_XZ,
            payload_len: 0x1234,
            org_checksum: 0xDEAD_BEEF,
            upd_no: 7,
            version: "G03.00.01".into(),
            ..W800Header::default()
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x9F, 0xFF, 0xFF, 0xA0]);
        assert_eq!(&b[4..6], &0u16.to_le_bytes(), "img_type u16");
        assert_eq!(
            &b[6..8],
            &(1u16 << 4).to_le_bytes(),
            "compress u16 = 1<<4 for xz"
        );
        assert_eq!(&b[8..12], &0x080D_0400u32.to_le_bytes());
        assert_eq!(&b[12..16], &0x1234u32.to_le_bytes());
        assert_eq!(&b[16..20], &0x080D_0000u32.to_le_bytes());
        assert_eq!(&b[20..24], &0x0801_0000u32.to_le_bytes());
        assert_eq!(&b[24..28], &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(&b[28..32], &7u32.to_le_bytes());
        assert_eq!(&b[32..48], b"G03.00.01\0\0\0\0\0\0\0");
        assert_eq!(&b[48..60], &[0u8; 12]);
        let crc = !crc32fast::hash(&b[..60]);
        assert_eq!(&b[60..64], &crc.to_le_bytes());
        // gzip (compress arg 1) lands on bit 16.
        let g = W800Header {
            gzip: true,
            ..W800Header::default()
        };
        assert_eq!(&g.encode()[6..8], &1u16.to_le_bytes());
    }

    #[test]
    fn header_round_trip_keeps_other_attr_bits() {
        let h = W800Header {
            img_type: 1,
            gzip: true,
            compress_type: 1,
            attr_other: 1 << 8 | 1 << 4,
            ..W800Header::default()
        };
        let bytes = h.encode();
        let back = W800Header::parse(&bytes).unwrap();
        assert_eq!(back.img_attr(), h.img_attr());
        assert_eq!(back.attr_other, 1 << 8 | 1 << 4);
        assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn long_version_is_cut_to_15_bytes() {
        let h = W800Header {
            version: "0123456789abcdefXYZ".into(),
            ..W800Header::default()
        };
        let b = h.encode();
        assert_eq!(&b[32..48], b"0123456789abcde\0");
        assert_eq!(W800Header::parse(&b).unwrap().version, "0123456789abcde");
    }

    #[test]
    fn build_and_parse() {
        let payload = [1u8, 2, 3, 4, 5];
        let bytes = build_image(&W800Header::default(), &payload).unwrap();
        assert_eq!(bytes.len(), 64 + 8);
        assert_eq!(&bytes[64..], &[1, 2, 3, 4, 5, 0xFF, 0xFF, 0xFF]);
        let img = parse_image(&bytes).unwrap();
        assert_eq!(img.header.payload_len, 8);
        assert_eq!(img.header.org_checksum, jamcrc(&bytes[64..]));
        assert_eq!(img.header.version, "G03.00.00");
        assert!(!img.is_xz());
        assert_eq!(img.payload(&bytes), &bytes[64..]);
        assert_eq!(img.trailing_len, 0);

        let mut with_trailer = bytes.clone();
        with_trailer.extend_from_slice(&[0u8; 128]);
        assert_eq!(parse_image(&with_trailer).unwrap().trailing_len, 128);
    }

    #[test]
    fn xz_detection() {
        let mut xz = XZ_MAGIC.to_vec();
        xz.extend_from_slice(&[0, 4, 0xE6, 0xD6, 0xB4, 0x46]);
        let template = W800Header {
            compress_type: COMPRESS_XZ,
            ..W800Header::default()
        };
        let img = parse_image(&build_image(&template, &xz).unwrap()).unwrap();
        assert!(img.is_xz());
        // Header says xz but the payload is not.
        let img = parse_image(&build_image(&template, &[0u8; 12]).unwrap()).unwrap();
        assert!(!img.is_xz());
        // Payload is xz but the header does not say so.
        let img = parse_image(&build_image(&W800Header::default(), &xz).unwrap()).unwrap();
        assert!(!img.is_xz());
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let good = build_image(&W800Header::default(), &[9u8; 32]).unwrap();

        assert_eq!(
            parse_image(&good[..63]).unwrap_err().to_string(),
            "file is 63 bytes, too short for the 64-byte w800 header"
        );

        let mut bad = good.clone();
        bad[0] = 0x00;
        assert_eq!(
            parse_image(&bad).unwrap_err().to_string(),
            "not a w800 image: magic is 0xa0ffff00, expected 0xa0ffff9f"
        );

        let mut bad = good.clone();
        bad[40] ^= 1;
        assert!(
            parse_image(&bad)
                .unwrap_err()
                .to_string()
                .starts_with("header checksum mismatch: image says 0x")
        );

        assert_eq!(
            parse_image(&good[..90]).unwrap_err().to_string(),
            "payload runs past the end of the file (header says 0x20 bytes, file has 0x1a after the header)"
        );

        let mut bad = good.clone();
        bad[70] ^= 1;
        assert!(matches!(
            parse_image(&bad).unwrap_err(),
            W800Error::PayloadChecksumMismatch { .. }
        ));
    }

    #[test]
    fn empty_payload() {
        let bytes = build_image(&W800Header::default(), &[]).unwrap();
        assert_eq!(bytes.len(), 64);
        let img = parse_image(&bytes).unwrap();
        assert_eq!(img.header.org_checksum, jamcrc(&[]));
        assert_eq!(img.payload(&bytes), &[] as &[u8]);
        assert_eq!(vec![0u8; 0], img.payload(&bytes));
    }
}
