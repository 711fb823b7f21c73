//! Cross-check of `esp::parse_image` against esptool: real images made by `esptool elf2image`
//! from a tiny RV32 ELF (built by `scripts/fixtures.sh`), compared field by field with what
//! `esptool image-info` prints, and images made by this crate's builder fed back to esptool.
//!
//! The fixture script installs its tools when they are missing; if it fails, these tests fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use otaforge_formats::detect::{Inspected, inspect};
use otaforge_formats::esp::build::{SegmentSpec, app_desc, esp32_image};
use otaforge_formats::esp::{self, Chip, EspImage, EspImageError};
use sha2::{Digest, Sha256};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// Runs `scripts/fixtures.sh target/fixtures` once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("target").join("fixtures");
        let script = root.join("scripts").join("fixtures.sh");
        let output = Command::new("bash")
            .arg(&script)
            .arg(&out)
            .current_dir(&root)
            .output()
            .map_err(|e| format!("could not start bash {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!(
                "{} {} failed with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                script.display(),
                out.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(out)
    });
    match result {
        Ok(dir) => dir,
        Err(message) => panic!("the esptool fixtures could not be built:\n{message}"),
    }
}

fn read(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn read_text(name: &str) -> String {
    String::from_utf8_lossy(&read(name)).into_owned()
}

/// What `esptool image-info` printed, read tolerantly: `Key: value` lines with the key
/// lowercased, and the rows of the segment table.
#[derive(Debug)]
struct Info {
    fields: BTreeMap<String, String>,
    /// (index, length, load address, file offset)
    segments: Vec<(usize, u32, u32, usize)>,
}

fn hex_u64(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    u64::from_str_radix(t, 16).ok()
}

impl Info {
    fn parse(text: &str) -> Info {
        let mut fields = BTreeMap::new();
        let mut segments = Vec::new();
        for line in text.lines() {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            // Segment rows: "  0  0x01100  0x3c000020  0x00000018  DROM"
            if tokens.len() >= 4
                && tokens[0].parse::<usize>().is_ok()
                && tokens[1..4].iter().all(|t| t.starts_with("0x"))
            {
                segments.push((
                    tokens[0].parse().unwrap(),
                    hex_u64(tokens[1]).unwrap() as u32,
                    hex_u64(tokens[2]).unwrap() as u32,
                    hex_u64(tokens[3]).unwrap() as usize,
                ));
                continue;
            }
            if let Some((key, value)) = line.split_once(": ") {
                fields
                    .entry(key.trim().to_lowercase())
                    .or_insert_with(|| value.trim().to_string());
            }
        }
        Info { fields, segments }
    }

    fn get(&self, key: &str) -> &str {
        self.fields.get(key).map(String::as_str).unwrap_or_else(|| {
            panic!(
                "image-info printed no {key:?} line; it printed {:?}",
                self.fields
            )
        })
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// "v1.99" or "v0.3, (legacy min_rev = 0)" -> 199 or 3.
    fn revision(&self, key: &str) -> u16 {
        let v = self.get(key);
        let v = v.trim_start_matches('v');
        let v = v.split(',').next().unwrap().trim();
        let (major, minor) = v.split_once('.').unwrap();
        major.parse::<u16>().unwrap() * 100 + minor.parse::<u16>().unwrap()
    }

    /// "0x98 (valid)" -> (0x98, true)
    fn value_and_validity(&self, key: &str) -> (String, bool) {
        let v = self.get(key);
        let (value, rest) = v.split_once(' ').unwrap_or((v, ""));
        (value.to_string(), rest.trim() == "(valid)")
    }
}

/// Checks a parsed image against the image-info output for it.
fn assert_agrees(name: &str, bytes: &[u8], img: &EspImage, info: &Info) {
    // Chip: "Chip ID: 5 (ESP32-C3)"
    let chip_line = info.get("chip id");
    let (id, chip_name) = chip_line.split_once(' ').unwrap();
    assert_eq!(img.chip.id(), id.parse::<u16>().unwrap(), "{name}: chip id");
    assert_eq!(
        img.chip.name(),
        chip_name
            .trim_matches(|c| c == '(' || c == ')')
            .replace('-', "")
            .to_lowercase(),
        "{name}: chip name"
    );

    assert_eq!(
        u64::from(img.entry),
        hex_u64(info.get("entry point")).unwrap(),
        "{name}: entry point"
    );
    assert_eq!(
        img.segments.len(),
        info.get("segments").parse::<usize>().unwrap(),
        "{name}: segment count"
    );
    assert_eq!(
        img.segments.len(),
        info.segments.len(),
        "{name}: segment table rows"
    );
    for (seg, &(index, len, load, file_offs)) in img.segments.iter().zip(&info.segments) {
        assert_eq!(seg.len, len, "{name}: segment {index} length");
        assert_eq!(seg.load_addr, load, "{name}: segment {index} load address");
        assert_eq!(
            seg.data_offset - esp::SEGMENT_HEADER_LEN,
            file_offs,
            "{name}: segment {index} file offset"
        );
    }

    assert_eq!(
        img.min_chip_rev_full,
        info.revision("minimal chip revision"),
        "{name}: min chip revision"
    );
    assert_eq!(
        img.max_chip_rev_full,
        info.revision("maximal chip revision"),
        "{name}: max chip revision"
    );
    let mode = match info.get("flash mode").to_lowercase().as_str() {
        "qio" => 0,
        "qout" => 1,
        "dio" => 2,
        "dout" => 3,
        other => panic!("{name}: unexpected flash mode {other}"),
    };
    assert_eq!(img.spi_mode, mode, "{name}: flash mode");

    let (checksum, valid) = info.value_and_validity("checksum");
    assert!(valid, "{name}: esptool says the checksum is not valid");
    assert_eq!(
        u64::from(img.checksum),
        hex_u64(&checksum).unwrap(),
        "{name}: checksum"
    );

    match info.opt("validation hash") {
        Some(_) => {
            let (hash, valid) = info.value_and_validity("validation hash");
            assert!(valid, "{name}: esptool says the hash is not valid");
            assert!(img.hash_appended, "{name}: esptool found a hash");
            let sha = img.sha256.expect("hash_appended images carry their sha256");
            assert_eq!(
                hash,
                sha.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                "{name}: sha256"
            );
            assert_eq!(&bytes[img.image_len - 32..img.image_len], sha.as_slice());
        }
        None => {
            assert!(!img.hash_appended, "{name}: esptool printed no hash");
            assert_eq!(img.sha256, None);
        }
    }

    let desc = img
        .app_desc
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: no app desc"));
    assert_eq!(desc.version, info.get("app version"), "{name}: app version");
    assert_eq!(
        desc.project_name,
        info.get("project name"),
        "{name}: project name"
    );
    assert_eq!(desc.idf_version, info.get("esp-idf"), "{name}: idf version");
    assert_eq!(
        format!("{} {}", desc.date, desc.time),
        info.get("compile time"),
        "{name}: compile time"
    );
    assert_eq!(
        desc.app_elf_sha256
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        info.get("elf file sha256"),
        "{name}: elf sha256"
    );
    assert_eq!(
        desc.secure_version.to_string(),
        info.get("secure version"),
        "{name}: secure version"
    );
}

fn check_fixture(stem: &str, version: &str, secure_version: u32, hash: bool) -> EspImage {
    let bytes = read(&format!("{stem}.bin"));
    let info = Info::parse(&read_text(&format!("{stem}.info.txt")));
    assert!(esp::looks_like_esp32_header(&bytes), "{stem}");
    let img = esp::parse_image(&bytes).unwrap_or_else(|e| panic!("{stem}.bin: {e}"));
    assert_agrees(stem, &bytes, &img, &info);

    // And against what the fixture script put in.
    assert_eq!(img.chip, Chip::Esp32C3);
    assert_eq!(img.entry, 0x4200_0020);
    assert_eq!(img.hash_appended, hash);
    assert_eq!(img.image_len, bytes.len(), "esptool writes no padding");
    assert_eq!(img.trailing_len, 0);
    assert_eq!(img.flash_size_code(), 2, "4MB");
    assert_eq!(img.flash_freq_code(), 0xF, "80m");
    let desc = img.app_desc.as_ref().unwrap();
    assert_eq!(desc.version, version);
    assert_eq!(desc.project_name, "otaforge-fixture");
    assert_eq!(desc.idf_version, "v5.1");
    assert_eq!(desc.secure_version, secure_version);
    let elf_sha: [u8; 32] = Sha256::digest(read(&format!("{stem}.elf"))).into();
    assert_eq!(
        desc.app_elf_sha256, elf_sha,
        "elf2image writes the ELF's sha256 at 0xb0"
    );

    // The upload path sees the same thing.
    let found = inspect(&bytes).unwrap();
    assert_eq!(found.format_name(), "esp32-app");
    assert_eq!(found.version(), Some(version));
    assert!(matches!(found, Inspected::Esp32(ref i) if *i == img));

    // Every segment is covered: one flipped byte in any of them is refused.
    for (index, seg) in img.segments.iter().enumerate() {
        for at in [
            seg.data_offset,
            seg.data_offset + seg.len as usize / 2,
            seg.data_offset + seg.len as usize - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let err = esp::parse_image(&bad).expect_err(&format!(
                "{stem}: flip in segment {index} at {at:#x} accepted"
            ));
            assert!(
                matches!(err, EspImageError::ChecksumMismatch { .. }),
                "{stem}: {err}"
            );
            assert!(
                inspect(&bad).is_err(),
                "{stem}: upload path accepted a flip"
            );
        }
    }

    // Flash padding after the image is reported, not refused.
    let mut padded = bytes.clone();
    padded.resize(bytes.len().next_multiple_of(0x1000) + 0x1000, 0xFF);
    let again = esp::parse_image(&padded).unwrap();
    assert_eq!(again.image_len, bytes.len());
    assert_eq!(again.trailing_len, padded.len() - bytes.len());

    // Any truncation is refused.
    for cut in [
        1,
        23,
        24,
        0x30,
        bytes.len() / 2,
        img.checksum_offset,
        bytes.len() - 1,
    ] {
        assert!(
            esp::parse_image(&bytes[..cut]).is_err(),
            "{stem}: truncation to {cut:#x} accepted"
        );
    }
    img
}

#[test]
fn small_image_matches_esptool() {
    let img = check_fixture("app-v1", "1.0.0", 1, true);
    assert!(img.image_len < 80 * 1024);
}

#[test]
fn large_image_matches_esptool() {
    let img = check_fixture("app-v2", "2.0.0", 2, true);
    assert!(
        (350_000..460_000).contains(&img.image_len),
        "about 400 KB: {}",
        img.image_len
    );
    assert_eq!(img.min_chip_rev_full, 3);
    assert_eq!(img.max_chip_rev_full, 199);
}

#[test]
fn image_without_digest_matches_esptool() {
    check_fixture("app-v1-nodigest", "1.0.0", 1, false);
}

#[test]
fn esptool_pads_flash_segments_to_their_mmu_page() {
    // esptool places each IROM/DROM segment so that file offset == load address mod 64 KiB,
    // filling the gap with pieces of RAM segments and a zero segment loaded at address 0.
    for stem in ["app-v1", "app-v2"] {
        let img = esp::parse_image(&read(&format!("{stem}.bin"))).unwrap();
        for seg in &img.segments {
            let flash_mapped = (0x3C00_0000..0x3C80_0000).contains(&seg.load_addr)
                || (0x4200_0000..0x4280_0000).contains(&seg.load_addr);
            if flash_mapped {
                assert_eq!(
                    seg.data_offset % 0x10000,
                    (seg.load_addr % 0x10000) as usize,
                    "{stem}: {seg:?}"
                );
            }
        }
        assert!(
            img.segments.iter().any(|s| s.load_addr == 0),
            "{stem}: a padding segment"
        );
    }
}

/// Runs esptool image-info (as the fixture script found it) on bytes this crate built.
fn esptool_image_info(name: &str, bytes: &[u8]) -> Info {
    let dir = fixtures();
    let argv: Vec<String> = read_text("image-info.argv")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("running {argv:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "esptool image-info on {name} failed:\n{text}"
    );
    Info::parse(&text)
}

#[test]
fn esptool_accepts_images_this_crate_builds() {
    let mut drom = app_desc("9.8.7", "built-here", "v5.3");
    drom.extend((0..1000u32).map(|i| (i * 31 % 251) as u8));
    for hash in [true, false] {
        let bytes = esp32_image(
            Chip::Esp32S3,
            0x4037_1234,
            &[
                SegmentSpec {
                    load_addr: 0x3C00_0020,
                    data: drom.clone(),
                },
                SegmentSpec {
                    load_addr: 0x3FC9_0000,
                    data: vec![0xA5; 0x103],
                },
                SegmentSpec {
                    load_addr: 0x4037_0000,
                    data: vec![0x13; 0x40],
                },
            ],
            hash,
        );
        let name = format!("built-here-{hash}.bin");
        let info = esptool_image_info(&name, &bytes);
        let img = esp::parse_image(&bytes).unwrap();
        assert_agrees(&name, &bytes, &img, &info);
        assert_eq!(info.get("app version"), "9.8.7");
    }
}

/// A whole-flash image made from real parts (a small ESP32-C3 image in the bootloader's
/// place, which esptool accepts, a partition table this crate encodes, an esptool-made app)
/// is byte for byte what `esptool merge-bin` makes of the same parts, and esptool parses it
/// back.
#[test]
fn merged_images_match_esptool_merge_bin() {
    use otaforge_formats::flash;
    use otaforge_formats::partition::{self as pt, PartitionEntry, PartitionTable};
    let bootloader = esp32_image(
        Chip::Esp32C3,
        0x403C_E000,
        &[
            SegmentSpec {
                load_addr: 0x3FCD_5000,
                data: vec![0x5A; 0x200],
            },
            SegmentSpec {
                load_addr: 0x403C_E000,
                data: (0..0x1800u32).map(|i| (i * 7 % 253) as u8).collect(),
            },
        ],
        true,
    );
    let app = read("app-v2.bin");
    let table = PartitionTable {
        entries: vec![
            PartitionEntry {
                ty: pt::TYPE_DATA,
                subtype: pt::SUBTYPE_NVS,
                offset: 0x9000,
                size: 0x5000,
                label: "nvs".into(),
                flags: 0,
            },
            PartitionEntry {
                ty: pt::TYPE_DATA,
                subtype: pt::SUBTYPE_OTADATA,
                offset: 0xe000,
                size: 0x2000,
                label: "otadata".into(),
                flags: 0,
            },
            PartitionEntry {
                ty: pt::TYPE_APP,
                subtype: pt::SUBTYPE_OTA_0,
                offset: 0x10000,
                size: 0x140000,
                label: "app0".into(),
                flags: 0,
            },
        ],
    }
    .encode()
    .unwrap();
    let boot_at = Chip::Esp32C3.bootloader_offset().unwrap();
    let ours = flash::merge(&[
        (0x10000, &app),
        (boot_at, &bootloader),
        (flash::PARTITION_TABLE_OFFSET, &table),
    ])
    .unwrap();
    let dir = fixtures().join("merge");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in [
        ("boot.bin", &bootloader),
        ("table.bin", &table),
        ("app.bin", &app),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let argv: Vec<String> = read_text("image-info.argv")
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let esptool = &argv[0];
    let v5 = argv[1] == "image-info";
    let out = dir.join("esptool-merged.bin");
    let output = Command::new(esptool)
        .args([
            "--chip",
            "esp32c3",
            if v5 { "merge-bin" } else { "merge_bin" },
        ])
        .arg("-o")
        .arg(&out)
        .args([
            "0x0",
            "boot.bin",
            "0x8000",
            "table.bin",
            "0x10000",
            "app.bin",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "esptool merge-bin: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs = std::fs::read(&out).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "merged images differ");
    // esptool reads the merged image's first image (the bootloader, at 0x0) back.
    let info = esptool_image_info("merged.bin", &ours);
    assert!(
        info.fields.values().any(|v| v.contains("ESP32-C3")),
        "{:?}",
        info.fields
    );
}
