//! Mender artifacts (format version 3), checked on upload: a plain tar holding, in this order,
//! `version` (`{"format":"mender","version":3}`), `manifest` (`<sha256>  <path>` lines),
//! `manifest.sig` when signed, `header.tar[.gz]` (with `header-info`: the artifact name it
//! provides and the device types it depends on) and `data/NNNN.tar[.gz]` (the payload files,
//! named `data/NNNN/<file>` in the manifest). Every file the manifest names must be there with
//! that sha256.
//!
//! Facts from mender-artifact 3.9 (`Documentation/artifact-format-v3.md`, `artifact/`). Payloads
//! compressed with xz or zstd are refused (not checked yet); the signature is reported, and
//! verifying it needs the product's key, which is not done here.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::bytes::sha256_hex;

/// What an upload learns from a `.mender`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenderInfo {
    /// `artifact_provides.artifact_name`: what the device reports once it runs it.
    pub artifact_name: String,
    /// `artifact_depends.device_type`: the device types it installs on.
    pub device_types: Vec<String>,
    /// The update module of each payload (`single-file`, `rootfs-image`, ...).
    pub payload_types: Vec<String>,
    /// The payload files, as (manifest path, size).
    pub files: Vec<(String, u64)>,
    /// Whether `manifest.sig` is there.
    pub signed: bool,
    /// The manifest and the contents of `manifest.sig` (base64 of the signature), for a check
    /// against the product's keys.
    pub manifest: Vec<u8>,
    pub signature: Option<Vec<u8>>,
}

/// Why an upload is not a usable Mender artifact, naming the fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MenderError {
    NotTar(&'static str),
    Order(String),
    Version(String),
    Manifest(String),
    Checksum(String),
    Missing(String),
    Compression(String),
    HeaderInfo(String),
}

impl fmt::Display for MenderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MenderError::NotTar(why) => write!(f, "not a Mender artifact (tar): {why}"),
            MenderError::Order(why) => write!(f, "the artifact's files are out of order: {why}"),
            MenderError::Version(why) => write!(f, "version: {why}"),
            MenderError::Manifest(why) => write!(f, "manifest: {why}"),
            MenderError::Checksum(path) => write!(
                f,
                "{path} in the artifact does not have the sha256 its manifest gives (the file is damaged)"
            ),
            MenderError::Missing(path) => {
                write!(f, "the manifest names {path}, which is not in the artifact")
            }
            MenderError::Compression(name) => write!(
                f,
                "{name}: only uncompressed or gzip parts are read (create the artifact with --compression gzip)"
            ),
            MenderError::HeaderInfo(why) => write!(f, "header-info: {why}"),
        }
    }
}

impl core::error::Error for MenderError {}

/// The largest part inflated (a gzip of a few KiB may claim gigabytes).
const MAX_INFLATED: usize = 256 << 20;

/// One file of a tar archive.
struct TarEntry<'a> {
    name: String,
    data: &'a [u8],
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = core::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

fn text_field(field: &[u8]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

/// `path=` of a PAX extended header (`"<len> path=<name>\n"` records).
fn pax_path(data: &[u8]) -> Option<String> {
    let text = core::str::from_utf8(data).ok()?;
    text.lines()
        .filter_map(|record| record.split_once(' ').map(|(_, kv)| kv))
        .find_map(|kv| kv.strip_prefix("path=").map(str::to_string))
}

/// The regular files of a tar archive, in order.
fn tar_entries(bytes: &[u8]) -> Result<Vec<TarEntry<'_>>, MenderError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut long_name: Option<String> = None;
    loop {
        let Some(header) = bytes.get(at..at.saturating_add(512)) else {
            // Archives may end without the two zero blocks.
            if at >= bytes.len() && !out.is_empty() {
                return Ok(out);
            }
            return Err(MenderError::NotTar("it ends inside a header"));
        };
        if header.iter().all(|b| *b == 0) {
            return Ok(out);
        }
        if out.is_empty() && long_name.is_none() && header.get(257..262) != Some(b"ustar") {
            return Err(MenderError::NotTar("no ustar header"));
        }
        let size = header
            .get(124..136)
            .and_then(octal)
            .ok_or(MenderError::NotTar("a bad size field"))?;
        let size = usize::try_from(size).map_err(|_| MenderError::NotTar("a file too large"))?;
        let start = at.saturating_add(512);
        let end = start
            .checked_add(size)
            .ok_or(MenderError::NotTar("a file too large"))?;
        let data = bytes
            .get(start..end)
            .ok_or(MenderError::NotTar("it ends inside a file"))?;
        let kind = header.get(156).copied().unwrap_or(0);
        let name = match (long_name.take(), header.get(345..500)) {
            (Some(name), _) => name,
            (None, Some(prefix)) if prefix.first().is_some_and(|b| *b != 0) => {
                let mut name = text_field(prefix);
                name.push('/');
                name.push_str(&text_field(header.get(..100).unwrap_or_default()));
                name
            }
            _ => text_field(header.get(..100).unwrap_or_default()),
        };
        match kind {
            b'0' | 0 => out.push(TarEntry { name, data }),
            b'x' => long_name = pax_path(data),
            b'L' => long_name = Some(text_field(data)),
            _ => {}
        }
        at = end
            .checked_add(511)
            .map(|n| n & !511)
            .ok_or(MenderError::NotTar("a file too large"))?;
    }
}

/// The bytes of a part: as they are, or inflated when its name ends in `.gz`.
fn part_bytes<'a>(name: &str, data: &'a [u8]) -> Result<alloc::borrow::Cow<'a, [u8]>, MenderError> {
    if name.ends_with(".gz") {
        gunzip(data)
            .map(alloc::borrow::Cow::Owned)
            .ok_or_else(|| MenderError::Compression(alloc::format!("{name} is not valid gzip")))
    } else if name.ends_with(".xz") || name.ends_with(".zst") {
        Err(MenderError::Compression(name.to_string()))
    } else {
        Ok(alloc::borrow::Cow::Borrowed(data))
    }
}

/// One gzip member (RFC 1952), its CRC and length checked.
fn gunzip(data: &[u8]) -> Option<Vec<u8>> {
    if data.get(..3)? != [0x1f, 0x8b, 8] {
        return None;
    }
    let flags = *data.get(3)?;
    let mut at = 10usize;
    if flags & 4 != 0 {
        let len = u16::from_le_bytes([*data.get(at)?, *data.get(at.checked_add(1)?)?]);
        at = at.checked_add(2)?.checked_add(usize::from(len))?;
    }
    for bit in [8u8, 16] {
        if flags & bit != 0 {
            let nul = data.get(at..)?.iter().position(|b| *b == 0)?;
            at = at.checked_add(nul)?.checked_add(1)?;
        }
    }
    if flags & 2 != 0 {
        at = at.checked_add(2)?;
    }
    let trailer = data.len().checked_sub(8)?;
    let deflated = data.get(at..trailer)?;
    let out = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, MAX_INFLATED).ok()?;
    let tail = data.get(trailer..)?;
    let crc = u32::from_le_bytes(tail.get(..4)?.try_into().ok()?);
    let size = u32::from_le_bytes(tail.get(4..8)?.try_into().ok()?);
    (crc32fast::hash(&out) == crc && size == out.len() as u32).then_some(out)
}

/// Checks a Mender v3 artifact and reads what the server needs from it.
pub fn inspect_mender(bytes: &[u8]) -> Result<MenderInfo, MenderError> {
    let entries = tar_entries(bytes)?;
    let mut iter = entries.iter();
    let version = iter
        .next()
        .filter(|e| e.name == "version")
        .ok_or_else(|| MenderError::Order("the first file must be version".into()))?;
    let version_json: serde_json::Value = serde_json::from_slice(version.data)
        .map_err(|_| MenderError::Version("not JSON".into()))?;
    if version_json.get("format").and_then(|f| f.as_str()) != Some("mender") {
        return Err(MenderError::Version("format is not \"mender\"".into()));
    }
    match version_json.get("version").and_then(|v| v.as_u64()) {
        Some(3) => {}
        Some(other) => {
            return Err(MenderError::Version(alloc::format!(
                "format version {other}; only version 3 is read"
            )));
        }
        None => return Err(MenderError::Version("no version number".into())),
    }
    let manifest = iter
        .next()
        .filter(|e| e.name == "manifest")
        .ok_or_else(|| MenderError::Order("the second file must be manifest".into()))?;
    let manifest_text = core::str::from_utf8(manifest.data)
        .map_err(|_| MenderError::Manifest("not text".into()))?;
    let mut listed: Vec<(String, String)> = Vec::new();
    for line in manifest_text.lines().filter(|l| !l.trim().is_empty()) {
        let (sum, path) = line.split_once("  ").ok_or_else(|| {
            MenderError::Manifest(alloc::format!("{line:?} is not `<sha256>  <path>`"))
        })?;
        if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(MenderError::Manifest(alloc::format!(
                "{sum:?} is not a sha256"
            )));
        }
        listed.push((path.trim().to_string(), sum.to_ascii_lowercase()));
    }
    let mut rest: Vec<&TarEntry<'_>> = iter.collect();
    let signed = rest.first().is_some_and(|e| e.name == "manifest.sig");
    let signature = signed.then(|| rest.remove(0).data.to_vec());
    let header = rest
        .first()
        .filter(|e| e.name.starts_with("header.tar"))
        .ok_or_else(|| MenderError::Order("header.tar[.gz] must follow the manifest".into()))?;
    // Every file the manifest names, with the sha256 it gives: the top-level parts as they
    // are stored, the payload files inside their data tarballs.
    let mut seen: Vec<(String, String, u64)> = Vec::new();
    seen.push(("version".into(), sha256_hex(version.data), 0));
    seen.push((header.name.clone(), sha256_hex(header.data), 0));
    let mut payload_files = Vec::new();
    for part in rest.iter().skip(1) {
        let Some(index) = part
            .name
            .strip_prefix("data/")
            .and_then(|n| n.split('.').next())
            .filter(|n| n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return Err(MenderError::Order(alloc::format!(
                "{:?} is not a data/NNNN.tar part",
                part.name
            )));
        };
        let inner = part_bytes(&part.name, part.data)?;
        for file in tar_entries(&inner)? {
            let path = alloc::format!("data/{index}/{}", file.name);
            payload_files.push((path.clone(), file.data.len() as u64));
            seen.push((path, sha256_hex(file.data), file.data.len() as u64));
        }
    }
    for (path, sum) in &listed {
        match seen.iter().find(|(p, _, _)| p == path) {
            None => return Err(MenderError::Missing(path.clone())),
            Some((_, actual, _)) if actual != sum => {
                return Err(MenderError::Checksum(path.clone()));
            }
            Some(_) => {}
        }
    }
    if let Some((path, _, _)) = seen
        .iter()
        .find(|(p, _, _)| !listed.iter().any(|(l, _)| l == p))
    {
        return Err(MenderError::Manifest(alloc::format!(
            "{path} is not listed"
        )));
    }

    let header_tar = part_bytes(&header.name, header.data)?;
    let header_files = tar_entries(&header_tar)?;
    let info = header_files
        .iter()
        .find(|e| e.name == "header-info")
        .ok_or_else(|| MenderError::HeaderInfo("missing from the header".into()))?;
    let info: serde_json::Value = serde_json::from_slice(info.data)
        .map_err(|_| MenderError::HeaderInfo("not JSON".into()))?;
    let artifact_name = info
        .pointer("/artifact_provides/artifact_name")
        .and_then(|n| n.as_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| MenderError::HeaderInfo("no artifact_provides.artifact_name".into()))?
        .to_string();
    let device_types: Vec<String> = info
        .pointer("/artifact_depends/device_type")
        .and_then(|d| d.as_array())
        .map(|types| {
            types
                .iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if device_types.is_empty() {
        return Err(MenderError::HeaderInfo(
            "no artifact_depends.device_type".into(),
        ));
    }
    let payload_types = info
        .get("payloads")
        .and_then(|p| p.as_array())
        .map(|p| {
            p.iter()
                .filter_map(|p| p.get("type").and_then(|t| t.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(MenderInfo {
        artifact_name,
        device_types,
        payload_types,
        files: payload_files,
        signed,
        manifest: manifest.data.to_vec(),
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_members() {
        // `printf hello | gzip -n`
        let gz = [
            0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xcb, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0, 0x86, 0xa6,
            0x10, 0x36, 5, 0, 0, 0,
        ];
        assert_eq!(gunzip(&gz).as_deref(), Some(&b"hello"[..]));
        let mut bad = gz;
        bad[20] ^= 1;
        assert_eq!(gunzip(&bad), None, "a wrong CRC is refused");
        assert_eq!(gunzip(b"\x1f\x8b"), None);
    }

    #[test]
    fn not_artifacts() {
        for bytes in [&b""[..], b"hello", &[0u8; 1024][..]] {
            assert!(inspect_mender(bytes).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            let _ = inspect_mender(&bytes);
            let _ = gunzip(&bytes);
        }
    }
}
