//! Upload-time detection: which firmware format a file is, verified, and the version it declares.
//!
//! The rules, by the first bytes:
//! - `E9` with a plausible ESP32 extended header: must parse as an ESP32 app image;
//! - other `E9`: must parse as an ESP8266 v1 image (Arduino `.bin` included);
//! - `9F FF FF A0` (W800 magic 0xA0FFFF9F): must parse as a W800 image;
//! - `1F 8B`: gzip, not looked into;
//! - anything else: raw bytes.
//!
//! A file that claims a format but fails its checks is an error, never `Raw`.

use core::fmt;

use crate::esp::{self, Esp8266Image, EspImage, EspImageError};
use crate::mender::{self, MenderError, MenderInfo};
use crate::swu::{self, SwuError, SwuInfo};
use crate::w800::{self, W800Error, W800Image};

/// What a firmware file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspected {
    Esp32(EspImage),
    Esp8266(Esp8266Image),
    W800(W800Image),
    /// An SWUpdate image (cpio newc with `sw-description` first).
    Swu(SwuInfo),
    /// A Mender artifact (tar with `version` first).
    Mender(MenderInfo),
    Gzip,
    Raw,
}

/// A file that claims a format but is not a valid instance of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    Esp32(EspImageError),
    Esp8266(EspImageError),
    W800(W800Error),
    Swu(SwuError),
    Mender(MenderError),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Esp32(e) => write!(f, "esp32 app image: {e}"),
            FormatError::Esp8266(e) => write!(f, "esp8266 image: {e}"),
            FormatError::W800(e) => write!(f, "w800 image: {e}"),
            FormatError::Swu(e) => write!(f, "swu image: {e}"),
            FormatError::Mender(e) => write!(f, "mender artifact: {e}"),
        }
    }
}

impl core::error::Error for FormatError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            FormatError::Esp32(e) | FormatError::Esp8266(e) => Some(e),
            FormatError::W800(e) => Some(e),
            FormatError::Swu(e) => Some(e),
            FormatError::Mender(e) => Some(e),
        }
    }
}

/// Detects and verifies the format of `bytes`; see the module documentation for the rules.
pub fn inspect(bytes: &[u8]) -> Result<Inspected, FormatError> {
    match bytes {
        [esp::IMAGE_MAGIC, ..] if esp::looks_like_esp32_header(bytes) => esp::parse_image(bytes)
            .map(Inspected::Esp32)
            .map_err(FormatError::Esp32),
        [esp::IMAGE_MAGIC, ..] => esp::parse_esp8266_image(bytes)
            .map(Inspected::Esp8266)
            .map_err(FormatError::Esp8266),
        [a, b, c, d, ..] if u32::from_le_bytes([*a, *b, *c, *d]) == w800::MAGIC => {
            w800::parse_image(bytes)
                .map(Inspected::W800)
                .map_err(FormatError::W800)
        }
        [b'0', b'7', b'0', b'7', b'0', b'1' | b'2', ..] => swu::inspect_swu(bytes)
            .map(Inspected::Swu)
            .map_err(FormatError::Swu),
        [b'v', b'e', b'r', b's', b'i', b'o', b'n', 0, ..]
            if bytes.get(257..262) == Some(b"ustar") =>
        {
            mender::inspect_mender(bytes)
                .map(Inspected::Mender)
                .map_err(FormatError::Mender)
        }
        [0x1F, 0x8B, ..] => Ok(Inspected::Gzip),
        _ => Ok(Inspected::Raw),
    }
}

impl Inspected {
    /// A short stable name: "esp32-app", "esp8266-app", "w800-img", "w800-xz", "gzip", "raw".
    pub fn format_name(&self) -> &'static str {
        match self {
            Inspected::Esp32(_) => "esp32-app",
            Inspected::Esp8266(_) => "esp8266-app",
            Inspected::W800(img) if img.is_xz() => "w800-xz",
            Inspected::W800(_) => "w800-img",
            Inspected::Swu(_) => "swu",
            Inspected::Mender(_) => "mender",
            Inspected::Gzip => "gzip",
            Inspected::Raw => "raw",
        }
    }

    /// The firmware version the image declares: the ESP32 app description's version, or the
    /// W800 header's version. `None` when the format has no version or it is empty.
    pub fn version(&self) -> Option<&str> {
        let v = match self {
            Inspected::Esp32(img) => img.app_desc.as_ref().map(|d| d.version.as_str()),
            Inspected::W800(img) => Some(img.header.version.as_str()),
            Inspected::Swu(info) => Some(info.version.as_str()),
            Inspected::Mender(info) => Some(info.artifact_name.as_str()),
            Inspected::Esp8266(_) | Inspected::Gzip | Inspected::Raw => None,
        };
        v.filter(|v| !v.is_empty())
    }

    /// The project name an ESP32 app description declares.
    pub fn project_name(&self) -> Option<&str> {
        match self {
            Inspected::Esp32(img) => img
                .app_desc
                .as_ref()
                .map(|d| d.project_name.as_str())
                .filter(|p| !p.is_empty()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::esp::Chip;
    use crate::esp::build::{
        SegmentSpec, app_desc, arduino_esp8266_bin, esp32_image, esp8266_image,
    };
    use crate::w800::{W800Header, build_image};
    use alloc::string::ToString;
    use alloc::vec;
    use alloc::vec::Vec;

    fn esp32() -> Vec<u8> {
        esp32_image(
            Chip::Esp32S3,
            0x4037_5000,
            &[SegmentSpec {
                load_addr: 0x3C00_0020,
                data: app_desc("4.5.6", "thing", "v5.2"),
            }],
            true,
        )
    }

    #[test]
    fn esp32_app() {
        let got = inspect(&esp32()).unwrap();
        assert_eq!(got.format_name(), "esp32-app");
        assert_eq!(got.version(), Some("4.5.6"));
        assert_eq!(got.project_name(), Some("thing"));
        let Inspected::Esp32(img) = got else {
            unreachable!()
        };
        assert_eq!(img.chip, Chip::Esp32S3);
    }

    #[test]
    fn corrupted_esp32_is_an_error_not_esp8266() {
        let mut bytes = esp32();
        bytes[0x30] ^= 1;
        let err = inspect(&bytes).unwrap_err();
        assert!(matches!(
            err,
            FormatError::Esp32(EspImageError::ChecksumMismatch { .. })
        ));
        assert!(
            err.to_string()
                .starts_with("esp32 app image: checksum mismatch")
        );
        let err = inspect(&esp32()[..100]).unwrap_err();
        assert!(matches!(err, FormatError::Esp32(_)), "{err}");
    }

    #[test]
    fn esp8266() {
        let eboot = esp8266_image(
            0x4010_F000,
            &[SegmentSpec {
                load_addr: 0x4010_F000,
                data: vec![0x5A; 0x801],
            }],
        );
        let mut irom = vec![0u8; 8];
        irom.extend_from_slice(&[0x33; 64]);
        let sketch = esp8266_image(
            0x4010_0004,
            &[SegmentSpec {
                load_addr: 0x4020_1010,
                data: irom,
            }],
        );
        let bytes = arduino_esp8266_bin(&eboot, &sketch);
        let got = inspect(&bytes).unwrap();
        assert_eq!(got.format_name(), "esp8266-app");
        assert_eq!(got.version(), None);

        let mut bad = bytes.clone();
        bad[0x1020] ^= 1;
        assert!(matches!(inspect(&bad), Err(FormatError::Esp8266(_))));
        assert!(matches!(
            inspect(&[0xE9, 1, 2]),
            Err(FormatError::Esp8266(_))
        ));
    }

    #[test]
    fn w800() {
        let header = W800Header {
            version: "G03.01.00".into(),
            ..W800Header::default()
        };
        let bytes = build_image(&header, &[1, 2, 3, 4]).unwrap();
        let got = inspect(&bytes).unwrap();
        assert_eq!(got.format_name(), "w800-img");
        assert_eq!(got.version(), Some("G03.01.00"));

        let xz_header = W800Header {
            compress_type: w800::COMPRESS_XZ,
            ..header
        };
        let mut xz = w800::XZ_MAGIC.to_vec();
        xz.extend_from_slice(&[0; 10]);
        let got = inspect(&build_image(&xz_header, &xz).unwrap()).unwrap();
        assert_eq!(got.format_name(), "w800-xz");

        let mut bad = bytes.clone();
        bad[64] ^= 1;
        assert!(matches!(
            inspect(&bad),
            Err(FormatError::W800(W800Error::PayloadChecksumMismatch { .. }))
        ));
        assert!(matches!(inspect(&bytes[..10]), Err(FormatError::W800(_))));
    }

    #[test]
    fn gzip_and_raw() {
        assert_eq!(inspect(&[0x1F, 0x8B, 8, 0]).unwrap(), Inspected::Gzip);
        assert_eq!(inspect(&[0x1F, 0x8B]).unwrap().format_name(), "gzip");
        assert_eq!(inspect(b"hello").unwrap(), Inspected::Raw);
        assert_eq!(inspect(&[]).unwrap().format_name(), "raw");
        assert_eq!(inspect(&[0x9F, 0xFF, 0xFF]).unwrap(), Inspected::Raw);
        assert_eq!(Inspected::Raw.version(), None);
    }
}
