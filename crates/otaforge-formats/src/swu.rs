//! SWUpdate `.swu` images, checked on upload: a cpio "newc" archive (`070701`, or `070702`
//! whose header carries a 32-bit sum of the data bytes, as swugenerator writes) with
//! `sw-description` first, `sw-description.sig` second when signed, then the images.
//! `sw-description` is libconfig or JSON: `software { version, hardware-compatibility,
//! images: ( { filename, type, sha256, ... } ) }`. Every image it lists must be in the archive
//! with the sha256 it names.
//!
//! Facts from SWUpdate 2022.12 (`core/cpio_utils.c`, `core/parser.c`, `corelib/parsing_library*`).
//! Checking the CMS signature itself needs the product's certificate and is not done here.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::bytes::sha256_hex;

/// One file of a cpio archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpioEntry<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

/// What an upload learns from a `.swu`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwuInfo {
    pub version: String,
    /// `hardware-compatibility`: the revisions the image installs on.
    pub hardware: Vec<String>,
    pub images: Vec<SwuImage>,
    /// Whether `sw-description.sig` follows `sw-description`.
    pub signed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwuImage {
    pub filename: String,
    /// The handler, such as `raw`, `rawfile` or `archive`.
    pub kind: String,
    pub sha256: String,
    pub size: u64,
}

/// Why an upload is not a usable `.swu`, naming the fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwuError {
    NotCpio,
    Truncated(&'static str),
    BadHeader(&'static str),
    BadChecksum(String),
    NoTrailer,
    FirstNotDescription(String),
    Description(String),
    Missing(&'static str),
    ImageNotInArchive(String),
    ImageHash { filename: String, declared: String },
}

impl fmt::Display for SwuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwuError::NotCpio => f.write_str(
                "not a .swu image: it does not start with a cpio newc header (070701 or 070702)",
            ),
            SwuError::Truncated(what) => write!(f, "the .swu image ends inside {what}"),
            SwuError::BadHeader(field) => {
                write!(f, "a cpio header of the .swu image has a bad {field}")
            }
            SwuError::BadChecksum(name) => write!(
                f,
                "{name} in the .swu image does not match its cpio checksum (the file is damaged)"
            ),
            SwuError::NoTrailer => f.write_str("the .swu image has no cpio TRAILER!!! entry"),
            SwuError::FirstNotDescription(name) => write!(
                f,
                "the first file of a .swu image must be sw-description, not {name:?}"
            ),
            SwuError::Description(why) => write!(f, "sw-description: {why}"),
            SwuError::Missing(what) => write!(f, "sw-description has no {what}"),
            SwuError::ImageNotInArchive(name) => write!(
                f,
                "sw-description lists {name:?}, which is not in the .swu image"
            ),
            SwuError::ImageHash { filename, declared } => write!(
                f,
                "{filename:?} in the .swu image does not have the sha256 sw-description gives ({declared})"
            ),
        }
    }
}

impl core::error::Error for SwuError {}

const HEADER: usize = 110;

fn hex_field(header: &[u8], index: usize) -> Result<u32, SwuError> {
    let start = index
        .checked_mul(8)
        .and_then(|o| o.checked_add(6))
        .ok_or(SwuError::BadHeader("field"))?;
    let digits = header
        .get(start..start.saturating_add(8))
        .ok_or(SwuError::Truncated("a cpio header"))?;
    let text = core::str::from_utf8(digits).map_err(|_| SwuError::BadHeader("hex number"))?;
    u32::from_str_radix(text, 16).map_err(|_| SwuError::BadHeader("hex number"))
}

fn pad4(n: usize) -> Option<usize> {
    n.checked_add(3).map(|n| n & !3)
}

/// The files of a cpio newc archive, up to its `TRAILER!!!`.
pub fn cpio_entries(bytes: &[u8]) -> Result<Vec<CpioEntry<'_>>, SwuError> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    loop {
        let header = bytes.get(at..at.saturating_add(HEADER)).ok_or(if at == 0 {
            SwuError::NotCpio
        } else {
            SwuError::Truncated("a cpio header")
        })?;
        let with_check = match header.get(..6) {
            Some(b"070701") => false,
            Some(b"070702") => true,
            _ if at == 0 => return Err(SwuError::NotCpio),
            _ => return Err(SwuError::BadHeader("magic")),
        };
        let size = hex_field(header, 6)? as usize;
        let name_size = hex_field(header, 11)? as usize;
        let check = hex_field(header, 12)?;
        let name_start = at.checked_add(HEADER).ok_or(SwuError::NoTrailer)?;
        let name_end = name_start
            .checked_add(name_size)
            .ok_or(SwuError::BadHeader("name size"))?;
        let name = bytes
            .get(name_start..name_end)
            .ok_or(SwuError::Truncated("a file name"))?;
        let name = name
            .strip_suffix(&[0])
            .ok_or(SwuError::BadHeader("file name (no NUL)"))?;
        let name = core::str::from_utf8(name).map_err(|_| SwuError::BadHeader("file name"))?;
        let data_start = pad4(name_end).ok_or(SwuError::Truncated("a file"))?;
        let data_end = data_start
            .checked_add(size)
            .ok_or(SwuError::BadHeader("file size"))?;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(SwuError::Truncated("a file"))?;
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        if with_check {
            let sum = data
                .iter()
                .fold(0u32, |sum, b| sum.wrapping_add(u32::from(*b)));
            if sum != check {
                return Err(SwuError::BadChecksum(name.to_string()));
            }
        }
        entries.push(CpioEntry { name, data });
        at = pad4(data_end).ok_or(SwuError::NoTrailer)?;
        if at >= bytes.len() {
            return Err(SwuError::NoTrailer);
        }
    }
}

/// A libconfig (or JSON) value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    /// `{ name = value; ... }` (a JSON object).
    Group(Vec<(String, Value)>),
    /// `( ... )` or `[ ... ]` (a JSON array).
    List(Vec<Value>),
}

impl Value {
    pub fn get(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Group(settings) => settings.iter().find(|(n, _)| n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }
}

/// Nesting deeper than this is refused (the text is untrusted).
const MAX_DEPTH: usize = 32;

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn error(&self, what: &str) -> SwuError {
        let line = self
            .text
            .get(..self.at)
            .map(|t| t.iter().filter(|b| **b == b'\n').count())
            .unwrap_or(0)
            .saturating_add(1);
        SwuError::Description(alloc::format!("{what} on line {line}"))
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn bump(&mut self) {
        self.at = self.at.saturating_add(1);
    }

    fn rest(&self) -> &'a [u8] {
        self.text.get(self.at..).unwrap_or_default()
    }

    /// Skips blanks and `#`, `//` and `/* */` comments.
    fn skip(&mut self) {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => self.bump(),
                Some(b'#') => self.skip_line(),
                Some(b'/') if self.rest().starts_with(b"//") => self.skip_line(),
                Some(b'/') if self.rest().starts_with(b"/*") => {
                    let end = self
                        .rest()
                        .windows(2)
                        .position(|w| w == b"*/")
                        .map_or(self.text.len(), |p| {
                            self.at.saturating_add(p).saturating_add(2)
                        });
                    self.at = end;
                }
                _ => return,
            }
        }
    }

    fn skip_line(&mut self) {
        while let Some(b) = self.peek() {
            self.bump();
            if b == b'\n' {
                return;
            }
        }
    }

    fn name(&mut self) -> Result<String, SwuError> {
        if self.peek() == Some(b'"') {
            return self.string();
        }
        let start = self.at;
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*' | b'.') {
                self.bump();
            } else {
                break;
            }
        }
        match self.text.get(start..self.at) {
            Some(name) if !name.is_empty() => Ok(String::from_utf8_lossy(name).into_owned()),
            _ => Err(self.error("a setting name is expected")),
        }
    }

    /// One quoted string, and those right after it (libconfig joins adjacent strings).
    fn string(&mut self) -> Result<String, SwuError> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            self.bump(); // the opening quote
            loop {
                match self.peek() {
                    None => return Err(self.error("a string is not closed")),
                    Some(b'"') => {
                        self.bump();
                        break;
                    }
                    Some(b'\\') => {
                        self.bump();
                        let escaped = match self.peek() {
                            Some(b'n') => b'\n',
                            Some(b't') => b'\t',
                            Some(b'r') => b'\r',
                            Some(b'f') => 0x0c,
                            Some(other) => other,
                            None => return Err(self.error("a string is not closed")),
                        };
                        out.push(escaped);
                        self.bump();
                    }
                    Some(b) => {
                        out.push(b);
                        self.bump();
                    }
                }
            }
            let save = self.at;
            self.skip();
            if self.peek() != Some(b'"') {
                self.at = save;
                return String::from_utf8(out).map_err(|_| self.error("a string is not UTF-8"));
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, SwuError> {
        if depth > MAX_DEPTH {
            return Err(self.error("settings are nested too deeply"));
        }
        self.skip();
        match self.peek() {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'{') => {
                self.bump();
                let settings = self.settings(Some(b'}'), depth.saturating_add(1))?;
                Ok(Value::Group(settings))
            }
            Some(open @ (b'(' | b'[')) => {
                self.bump();
                let close = if open == b'(' { b')' } else { b']' };
                let mut items = Vec::new();
                loop {
                    self.skip();
                    if self.peek() == Some(close) {
                        self.bump();
                        return Ok(Value::List(items));
                    }
                    items.push(self.value(depth.saturating_add(1))?);
                    self.skip();
                    match self.peek() {
                        Some(b',') => self.bump(),
                        Some(b) if b == close => {}
                        _ => return Err(self.error("a list item is not followed by , or its end")),
                    }
                }
            }
            Some(_) => self.scalar(),
            None => Err(self.error("a value is expected")),
        }
    }

    fn scalar(&mut self) -> Result<Value, SwuError> {
        let start = self.at;
        while let Some(b) = self.peek() {
            if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_') {
                self.bump();
            } else {
                break;
            }
        }
        let word = self
            .text
            .get(start..self.at)
            .and_then(|w| core::str::from_utf8(w).ok())
            .unwrap_or_default();
        let lower = word.to_ascii_lowercase();
        match lower.as_str() {
            "" => return Err(self.error("a value is expected")),
            "true" => return Ok(Value::Bool(true)),
            "false" => return Ok(Value::Bool(false)),
            "null" => return Ok(Value::Str(String::new())),
            _ => {}
        }
        let digits = lower.trim_end_matches('l');
        let (negative, digits) = match digits.strip_prefix('-') {
            Some(d) => (true, d),
            None => (false, digits.strip_prefix('+').unwrap_or(digits)),
        };
        let int = match digits.strip_prefix("0x") {
            Some(hex) => i64::from_str_radix(hex, 16).ok(),
            None => digits.parse::<i64>().ok(),
        };
        if let Some(n) = int {
            return Ok(Value::Int(if negative { n.saturating_neg() } else { n }));
        }
        word.parse::<f64>()
            .map(Value::Float)
            .map_err(|_| self.error("a value is not a string, number, boolean, group or list"))
    }

    /// Settings up to `close` (or the end of the text for the top level).
    fn settings(
        &mut self,
        close: Option<u8>,
        depth: usize,
    ) -> Result<Vec<(String, Value)>, SwuError> {
        let mut out = Vec::new();
        loop {
            self.skip();
            match (self.peek(), close) {
                (None, None) => return Ok(out),
                (None, Some(_)) => return Err(self.error("a group is not closed")),
                (Some(b), Some(c)) if b == c => {
                    self.bump();
                    return Ok(out);
                }
                _ => {}
            }
            let name = self.name()?;
            self.skip();
            match self.peek() {
                Some(b'=' | b':') => self.bump(),
                _ => return Err(self.error("a setting name is not followed by = or :")),
            }
            let value = self.value(depth)?;
            out.push((name, value));
            self.skip();
            if matches!(self.peek(), Some(b';' | b',')) {
                self.bump();
            }
        }
    }
}

/// Parses libconfig or JSON text into its top-level group.
pub fn parse_config(text: &str) -> Result<Value, SwuError> {
    let mut parser = Parser {
        text: text.as_bytes(),
        at: 0,
    };
    parser.skip();
    let value = if parser.peek() == Some(b'{') {
        // JSON: one object.
        let value = parser.value(0)?;
        parser.skip();
        if parser.peek().is_some() {
            return Err(parser.error("text follows the JSON object"));
        }
        value
    } else {
        Value::Group(parser.settings(None, 0)?)
    };
    Ok(value)
}

/// The largest `sw-description` read.
const MAX_DESCRIPTION: usize = 1 << 20;

/// Checks a `.swu` image and reads what the server needs from it.
pub fn inspect_swu(bytes: &[u8]) -> Result<SwuInfo, SwuError> {
    let entries = cpio_entries(bytes)?;
    let first = entries.first().ok_or(SwuError::Missing("files at all"))?;
    if first.name != "sw-description" {
        return Err(SwuError::FirstNotDescription(first.name.to_string()));
    }
    if first.data.len() > MAX_DESCRIPTION {
        return Err(SwuError::Description("it is larger than 1 MiB".into()));
    }
    let signed = entries
        .get(1)
        .is_some_and(|e| e.name == "sw-description.sig");
    let text = core::str::from_utf8(first.data)
        .map_err(|_| SwuError::Description("it is not UTF-8 text".into()))?;
    let config = parse_config(text)?;
    let software = config
        .get("software")
        .ok_or(SwuError::Missing("software section"))?;
    let version = software
        .get("version")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .ok_or(SwuError::Missing("software.version"))?
        .to_string();
    let hardware: Vec<String> = software
        .get("hardware-compatibility")
        .and_then(Value::as_list)
        .ok_or(SwuError::Missing("software.hardware-compatibility list"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    if hardware.is_empty() {
        return Err(SwuError::Missing(
            "hardware revision in hardware-compatibility",
        ));
    }
    let listed = software
        .get("images")
        .and_then(Value::as_list)
        .ok_or(SwuError::Missing("software.images list"))?;
    let mut images = Vec::new();
    for image in listed {
        let filename = image
            .get("filename")
            .and_then(Value::as_str)
            .ok_or(SwuError::Missing("filename for every image"))?
            .to_string();
        let declared = image
            .get("sha256")
            .and_then(Value::as_str)
            .ok_or(SwuError::Missing("sha256 for every image"))?
            .to_ascii_lowercase();
        let entry = entries
            .iter()
            .find(|e| e.name == filename)
            .ok_or_else(|| SwuError::ImageNotInArchive(filename.clone()))?;
        let actual = sha256_hex(entry.data);
        if actual != declared {
            return Err(SwuError::ImageHash { filename, declared });
        }
        images.push(SwuImage {
            kind: image
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            sha256: actual,
            size: entry.data.len() as u64,
            filename,
        });
    }
    if images.is_empty() {
        return Err(SwuError::Missing("image in software.images"));
    }
    Ok(SwuInfo {
        version,
        hardware,
        images,
        signed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    /// A cpio newc archive as swugenerator writes it (`070702`, data sums).
    fn cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |name: &str, data: &[u8]| {
            let sum = data.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
            out.extend_from_slice(
                format!(
                    "070702{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
                    1, 0o100644, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, sum
                )
                .as_bytes(),
            );
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            while out.len() % 4 != 0 {
                out.push(0);
            }
            out.extend_from_slice(data);
            while out.len() % 4 != 0 {
                out.push(0);
            }
        };
        for (name, data) in files {
            push(name, data);
        }
        push("TRAILER!!!", b"");
        out
    }

    const PAYLOAD: &[u8] = b"hello payload\n";
    // sha256 of PAYLOAD
    const PAYLOAD_SHA: &str = "87dc89c2244514ccf0674519f5ac7d90f34d504fa5d1e555a77eefb43916aec4";

    fn description(sha: &str) -> String {
        format!(
            "software =\n{{\n    version = \"1.2.3\";\n    description = \"Firmware for \" \"ci\"; # joined\n    \
             hardware-compatibility =\n    [\n        \"1.0\",\n        \"1.1\"\n    ];\n    images =\n    (\n        {{\n            \
             filename = \"app.bin\";\n            type = \"rawfile\";\n            path = \"/tmp/target/payload.bin\";\n            \
             sha256 = \"{sha}\";\n            properties =\n            {{\n                create-destination = \"true\";\n            }};\n        }}\n    );\n}};\n"
        )
    }

    #[test]
    fn libconfig_images() {
        let d = description(PAYLOAD_SHA);
        let swu = cpio(&[
            ("sw-description", d.as_bytes()),
            ("sw-description.sig", b"\x30\x82"),
            ("app.bin", PAYLOAD),
        ]);
        let info = inspect_swu(&swu).unwrap();
        assert_eq!(info.version, "1.2.3");
        assert_eq!(info.hardware, vec!["1.0", "1.1"]);
        assert!(info.signed);
        assert_eq!(
            info.images,
            vec![SwuImage {
                filename: "app.bin".into(),
                kind: "rawfile".into(),
                sha256: PAYLOAD_SHA.into(),
                size: 14
            }]
        );
        let config = parse_config(&d).unwrap();
        assert_eq!(
            config.get("software").unwrap().get("description"),
            Some(&Value::Str("Firmware for ci".into()))
        );
    }

    #[test]
    fn json_descriptions() {
        let d = format!(
            r#"{{"software": {{"version": "2.0", "hardware-compatibility": ["rev-a"],
                "images": [{{"filename": "app.bin", "type": "raw", "sha256": "{}", "offset": 0x10, "compressed": false}}]}}}}"#,
            PAYLOAD_SHA.to_ascii_uppercase()
        );
        let info = inspect_swu(&cpio(&[
            ("sw-description", d.as_bytes()),
            ("app.bin", PAYLOAD),
        ]))
        .unwrap();
        assert_eq!((info.version.as_str(), info.signed), ("2.0", false));
        assert_eq!(info.images[0].kind, "raw");
    }

    #[test]
    fn faults_are_named() {
        let good = description(PAYLOAD_SHA);
        let wrong = description(&"0".repeat(64));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"PK\x03\x04 not a cpio".to_vec(), "cpio newc header"),
            (
                cpio(&[("app.bin", PAYLOAD), ("sw-description", good.as_bytes())]),
                "first file",
            ),
            (
                cpio(&[("sw-description", wrong.as_bytes()), ("app.bin", PAYLOAD)]),
                "does not have the sha256",
            ),
            (
                cpio(&[("sw-description", good.as_bytes())]),
                "not in the .swu image",
            ),
            (
                cpio(&[
                    (
                        "sw-description",
                        good.replace("version = \"1.2.3\";", "").as_bytes(),
                    ),
                    ("app.bin", PAYLOAD),
                ]),
                "software.version",
            ),
            (
                cpio(&[
                    (
                        "sw-description",
                        good.replace("hardware-compatibility", "hw").as_bytes(),
                    ),
                    ("app.bin", PAYLOAD),
                ]),
                "hardware-compatibility",
            ),
            (
                cpio(&[
                    ("sw-description", b"software = { version = \"1\"; "),
                    ("app.bin", PAYLOAD),
                ]),
                "not closed on line 1",
            ),
        ];
        for (bytes, expected) in cases {
            let e = inspect_swu(&bytes).unwrap_err().to_string();
            assert!(e.contains(expected), "{e:?} should name {expected:?}");
        }
        // A flipped payload byte fails the cpio sum; a cut archive is truncated.
        let mut swu = cpio(&[("sw-description", good.as_bytes()), ("app.bin", PAYLOAD)]);
        let at = swu.windows(5).position(|w| w == b"hello").unwrap();
        swu[at] = b'j';
        assert!(matches!(inspect_swu(&swu), Err(SwuError::BadChecksum(n)) if n == "app.bin"));
        let swu = cpio(&[("sw-description", good.as_bytes()), ("app.bin", PAYLOAD)]);
        assert!(matches!(
            inspect_swu(&swu[..swu.len() - 130]),
            Err(SwuError::Truncated(_) | SwuError::NoTrailer)
        ));
        // Deep nesting is refused, not recursed into.
        let deep = format!("software = {}1{};", "(".repeat(100), ")".repeat(100));
        assert!(
            parse_config(&deep)
                .unwrap_err()
                .to_string()
                .contains("nested too deeply")
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = inspect_swu(&bytes);
            let _ = parse_config(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn mutated_archives_never_panic(at in 0usize..700, byte in proptest::num::u8::ANY) {
            let d = description(PAYLOAD_SHA);
            let mut swu = cpio(&[("sw-description", d.as_bytes()), ("app.bin", PAYLOAD)]);
            if let Some(b) = swu.get_mut(at) {
                *b = byte;
            }
            let _ = inspect_swu(&swu);
        }
    }
}
