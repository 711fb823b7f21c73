//! Uploads: the body read under a size limit (refused with 413 before it is buffered
//! whole), the bytes inspected by the formats crate, then stored content-addressed.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use md5::Md5;
use sha2::{Digest, Sha256};

use crate::auth::hex;
use crate::error::{ApiError, ApiResult};

/// Reads a request body of at most `limit` bytes.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: u64) -> ApiResult<Bytes> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the upload is larger than the server's limit of {limit} bytes"),
        )
    };
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::bad_request("Content-Length is not a number"))?;
        if length > limit {
            return Err(too_large());
        }
    }
    let mut body = body;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() as u64 + data.len() as u64 > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    if buf.is_empty() {
        return Err(ApiError::bad_request("the upload is empty"));
    }
    Ok(buf.freeze())
}

/// Digests of an upload.
pub struct Digests {
    pub md5: String,
    pub sha256: String,
}

pub fn digests(bytes: &[u8]) -> Digests {
    Digests {
        md5: hex(&Md5::digest(bytes)),
        sha256: hex(&Sha256::digest(bytes)),
    }
}

/// What an uploaded firmware file is, as far as its bytes say.
pub struct Described {
    pub format: &'static str,
    pub version: Option<String>,
    pub metadata: serde_json::Value,
    /// A Mender artifact's manifest and `manifest.sig` contents (when it is signed).
    pub signed_manifest: Option<(Vec<u8>, Option<Vec<u8>>)>,
    /// An ESP32-family image's Secure Boot V2 blocks, each verified (`None`: unsigned).
    pub sbv2: Option<Vec<crate::core::signatures::BlockCheck>>,
    /// An ESP8266 image (whose core signs the Arduino way).
    pub esp8266: bool,
    /// The signature an Arduino core's updater checks, when the image carries one.
    pub arduino: Option<crate::core::signatures::Arduino>,
}

/// Inspects firmware bytes. A file that claims a known format but is corrupted is a 422.
pub fn describe(bytes: &[u8]) -> ApiResult<Described> {
    use otaforge_formats::detect::{Inspected, inspect};
    let inspected = inspect(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("corrupted firmware image: {e}"),
        )
    })?;
    let format = inspected.format_name();
    let version = inspected
        .version()
        .map(str::to_string)
        .filter(|v| !v.is_empty());
    let metadata = match &inspected {
        Inspected::Esp32(image) => {
            let desc = image.app_desc.as_ref();
            serde_json::json!({
                "chip": image.chip.name(),
                "entry_point": format!("0x{:08x}", image.entry),
                "segments": image.segments.len(),
                "hash_appended": image.hash_appended,
                "project_name": desc.map(|d| d.project_name.clone()),
                "version": desc.map(|d| d.version.clone()),
                "idf_version": desc.map(|d| d.idf_version.clone()),
                "compile_time": desc.map(|d| format!("{} {}", d.date, d.time)),
                "app_elf_sha256": desc.map(|d| hex(&d.app_elf_sha256)),
            })
        }
        Inspected::W800(image) => serde_json::json!({
            "chip": "w800",
            "version": image.header.version.clone(),
            "xz": image.is_xz(),
            "run_address": format!("0x{:08x}", image.header.run_addr),
            "payload_length": image.header.payload_len,
        }),
        Inspected::Esp8266(image) => {
            let mut m = serde_json::json!({ "chip": "esp8266" });
            if let Some(unsigned) = esp8266_signed_payload(bytes, image) {
                // The board installs the image without signature and length, and reports
                // the MD5 of what it installed.
                m["signed"] = true.into();
                m["installed_md5"] = hex(&Md5::digest(unsigned)).into();
            }
            m
        }
        Inspected::Swu(info) => serde_json::json!({
            // What installs it: SWUpdate, through the hawkBit DDI dialect.
            "chip": "swupdate",
            "hardware": info.hardware,
            "signed": info.signed,
            // SWUpdate compares the first 20 hex digits of the artifact's SHA-1, lowercase.
            "sha1": hex(&sha1::Sha1::digest(bytes)),
            "images": info.images.iter().map(|i| serde_json::json!({
                "filename": i.filename, "type": i.kind, "sha256": i.sha256, "size": i.size,
            })).collect::<Vec<_>>(),
        }),
        Inspected::Mender(info) => serde_json::json!({
            // What installs it: mender-client, through the Mender device API.
            "chip": "mender",
            "artifact_name": info.artifact_name,
            "device_types": info.device_types,
            "payload_types": info.payload_types,
            "signed": info.signed,
            "files": info.files.iter().map(|(path, size)| serde_json::json!({
                "path": path, "size": size,
            })).collect::<Vec<_>>(),
        }),
        Inspected::Gzip => gzip_metadata(bytes)?,
        _ => serde_json::json!({}),
    };
    let signed_manifest = match &inspected {
        Inspected::Mender(info) => Some((info.manifest.clone(), info.signature.clone())),
        _ => None,
    };
    let sbv2 = match &inspected {
        Inspected::Esp32(_) => crate::core::signatures::check_sbv2(bytes),
        _ => None,
    };
    use crate::core::signatures::{Arduino, ESP32_SIGNATURE_LEN};
    let arduino = match &inspected {
        Inspected::Esp8266(image) => {
            esp8266_signed_payload(bytes, image).map(|payload| Arduino::Esp8266 {
                payload_len: payload.len(),
            })
        }
        // arduino-esp32 appends exactly 512 bytes after the image: its signature, padded.
        Inspected::Esp32(image) if image.trailing_len == ESP32_SIGNATURE_LEN => {
            Some(Arduino::Esp32)
        }
        _ => None,
    };
    let esp8266 = matches!(inspected, Inspected::Esp8266(_));
    let mut metadata = metadata;
    if let Some(checks) = &sbv2 {
        metadata["signatures"] = serde_json::to_value(checks).unwrap_or_default();
    }
    Ok(Described {
        format,
        version,
        metadata,
        signed_manifest,
        sbv2,
        esp8266,
        arduino,
    })
}

/// The bytes before an ESP8266 signature: a signed image ends with the signature and its
/// length as a little-endian u32 (`Updater::end` in the ESP8266 core).
fn esp8266_signed_payload<'a>(
    bytes: &'a [u8],
    image: &otaforge_formats::esp::Esp8266Image,
) -> Option<&'a [u8]> {
    let trailing = image.trailing_len;
    if trailing < 5 {
        return None;
    }
    let tail: [u8; 4] = bytes.get(bytes.len() - 4..)?.try_into().ok()?;
    let sig_len = u32::from_le_bytes(tail) as usize;
    (sig_len > 0 && sig_len.checked_add(4)? == trailing).then(|| &bytes[..bytes.len() - trailing])
}

/// The largest image a gzip upload may inflate to (ESP8266 flash is at most 16 MiB).
const MAX_INFLATED: u64 = 16 * 1024 * 1024;

/// A gzip upload is inflated (bounded) and the image inside inspected: an ESP8266 board
/// installs the inflated image and reports its MD5, and the chip rule needs its family.
fn gzip_metadata(bytes: &[u8]) -> ApiResult<serde_json::Value> {
    use std::io::Read;
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_INFLATED + 1)
        .read_to_end(&mut inflated)
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("corrupted gzip upload: {e}"),
            )
        })?;
    if inflated.len() as u64 > MAX_INFLATED {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the gzip upload inflates to more than {MAX_INFLATED} bytes"),
        ));
    }
    let mut m = serde_json::json!({
        "inflated_size": inflated.len(),
        "installed_md5": hex(&Md5::digest(&inflated)),
    });
    match otaforge_formats::detect::inspect(&inflated) {
        Ok(otaforge_formats::detect::Inspected::Esp8266(image)) => {
            m["chip"] = "esp8266".into();
            m["installed_md5"] = hex(&Md5::digest(
                &inflated[..image.image_len.min(inflated.len())],
            ))
            .into();
        }
        Ok(otaforge_formats::detect::Inspected::Esp32(image)) => {
            m["chip"] = image.chip.name().into();
        }
        Ok(_) => {}
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("corrupted firmware image inside the gzip upload: {e}"),
            ));
        }
    }
    Ok(m)
}
