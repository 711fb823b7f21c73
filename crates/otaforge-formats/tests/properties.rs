//! Property tests: no parser panics on any bytes, corruptions of valid images are caught, and
//! encode -> parse round trips hold for partition tables, otadata entries and W800 images.

use otaforge_formats::detect::inspect;
use otaforge_formats::esp::build::{
    SegmentSpec, app_desc, arduino_esp8266_bin, esp32_image, esp8266_image,
};
use otaforge_formats::esp::{self, Chip};
use otaforge_formats::otadata::{self, OtaSelectEntry, OtaState};
use otaforge_formats::partition::{PartitionEntry, PartitionTable};
use otaforge_formats::w800::{self, W800Header};
use proptest::collection::vec;
use proptest::prelude::*;

/// Runs every parser over `bytes`; any panic fails the property.
fn parse_everything(bytes: &[u8]) {
    let _ = esp::parse_image(bytes);
    let _ = esp::looks_like_esp32_header(bytes);
    let _ = esp::parse_esp8266_image(bytes);
    let _ = esp::AppDesc::parse(bytes);
    let _ = w800::parse_image(bytes);
    let _ = W800Header::parse(bytes);
    let _ = PartitionTable::parse(bytes);
    let _ = OtaSelectEntry::parse(bytes);
    let _ = otadata::parse_otadata(bytes);
    if let Ok(found) = inspect(bytes) {
        let _ = (found.format_name(), found.version(), found.project_name());
    }
}

fn chip() -> impl Strategy<Value = Chip> {
    prop_oneof![
        proptest::sample::select(Chip::KNOWN.to_vec()),
        any::<u16>().prop_map(Chip::from_id),
    ]
}

fn segments() -> impl Strategy<Value = Vec<SegmentSpec>> {
    vec(
        (any::<u32>(), vec(any::<u8>(), 0..300))
            .prop_map(|(load_addr, data)| SegmentSpec { load_addr, data }),
        1..=6,
    )
}

/// A valid ESP32 image, sometimes with an app description in its first segment.
fn esp32_bytes() -> impl Strategy<Value = Vec<u8>> {
    (
        chip(),
        any::<u32>(),
        segments(),
        any::<bool>(),
        any::<bool>(),
        "[ -~]{0,40}",
    )
        .prop_map(|(chip, entry, mut segs, hash, with_desc, version)| {
            if with_desc {
                let mut data = app_desc(&version, "proj", "v5.1");
                data.extend_from_slice(&segs[0].data);
                segs[0].data = data;
            }
            esp32_image(chip, entry, &segs, hash)
        })
}

fn w800_header() -> impl Strategy<Value = W800Header> {
    (
        (0u8..16, any::<bool>(), 0u8..4, any::<u32>()),
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        ("[^\u{0}]{0,15}", any::<u32>(), any::<u32>(), any::<u32>()),
    )
        .prop_filter("version fits 15 bytes", |(_, _, (v, ..))| v.len() <= 15)
        .prop_map(
            |(
                (img_type, gzip, compress_type, attr),
                (run_addr, header_addr, upgrade_addr, upd_no),
                (version, flags, reserved, next),
            )| {
                W800Header {
                    img_type,
                    gzip,
                    compress_type,
                    attr_other: attr & !(0xF | 1 << 16 | 0b11 << 20),
                    run_addr,
                    payload_len: 0,
                    header_addr,
                    upgrade_addr,
                    org_checksum: 0,
                    upd_no,
                    version,
                    flags,
                    reserved,
                    next,
                    hd_checksum: 0,
                }
            },
        )
}

fn partition_entry() -> impl Strategy<Value = PartitionEntry> {
    (
        any::<u8>(),
        any::<u8>(),
        any::<u32>(),
        any::<u32>(),
        "[^\u{0}]{0,16}",
        any::<u32>(),
    )
        .prop_filter("label fits 16 bytes", |(.., label, _)| label.len() <= 16)
        .prop_map(|(ty, subtype, offset, size, label, flags)| PartitionEntry {
            ty,
            subtype,
            offset,
            size,
            label,
            flags,
        })
}

/// Byte strings that start like each format, so parsers get past their magic checks.
fn format_prefixed_bytes() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xE9],
        vec![
            0xE9, 0x03, 0x02, 0x20, 0, 0, 0, 0x42, 0xEE, 0, 0, 0, 0x05, 0x00,
        ],
        vec![0x9F, 0xFF, 0xFF, 0xA0],
        vec![0xAA, 0x50],
        vec![0xEB, 0xEB],
        vec![0x1F, 0x8B],
    ];
    (
        proptest::sample::select(prefixes),
        vec(any::<u8>(), 0..2048),
    )
        .prop_map(|(mut p, rest)| {
            p.extend_from_slice(&rest);
            p
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..4096)) {
        parse_everything(&bytes);
    }

    #[test]
    fn no_panic_on_format_prefixed_bytes(bytes in format_prefixed_bytes()) {
        parse_everything(&bytes);
    }

    /// A patch of arbitrary bytes (behind a valid head, so the stream is reached) applied
    /// to an arbitrary base never panics and never writes more than the size it declares.
    #[test]
    fn delta_patches_of_arbitrary_bytes_never_panic(
        base in vec(any::<u8>(), 0..2048),
        stream in vec(any::<u8>(), 0..2048),
        to_size in 0u32..5000,
        chunk in 1usize..300,
    ) {
        use otaforge_formats::delta;
        let mut patch = vec![0x04];
        delta::put_size(&mut patch, i64::from(to_size));
        patch.push(0x44);
        patch.extend_from_slice(&stream);
        let mut applier = delta::Applier::new(base.len() as u64);
        let mut written = 0u64;
        let mut read = |at: u64, buf: &mut [u8]| match base.get(at as usize..at as usize + buf.len()) {
            Some(src) => { buf.copy_from_slice(src); true }
            None => false,
        };
        let mut write = |b: &[u8]| { written += b.len() as u64; true };
        let mut failed = false;
        for piece in patch.chunks(chunk) {
            if applier.feed(piece, &mut read, &mut write).is_err() { failed = true; break; }
        }
        if !failed {
            let _ = applier.finish(&mut read, &mut write);
        }
        prop_assert!(written <= u64::from(to_size));
        let _ = delta::apply(&base, &stream);
        let _ = delta::header_base_id(&stream);
        let _ = otaforge_formats::sbv2::signature_sector(&stream);
    }

    #[test]
    fn built_esp32_images_parse(chip in chip(), entry in any::<u32>(), segs in segments(), hash in any::<bool>()) {
        let bytes = esp32_image(chip, entry, &segs, hash);
        let img = esp::parse_image(&bytes).unwrap();
        prop_assert_eq!(img.chip, chip);
        prop_assert_eq!(img.entry, entry);
        prop_assert_eq!(img.segments.len(), segs.len());
        for (seg, spec) in img.segments.iter().zip(&segs) {
            prop_assert_eq!(seg.load_addr, spec.load_addr);
            prop_assert_eq!(&seg.data(&bytes)[..spec.data.len()], &spec.data[..]);
        }
        prop_assert_eq!(img.hash_appended, hash);
        prop_assert_eq!(img.image_len, bytes.len());
        prop_assert_eq!(img.checksum_offset % 16, 15);
    }

    #[test]
    fn esp32_mutations_never_panic_and_segment_flips_fail(
        bytes in esp32_bytes(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let img = esp::parse_image(&bytes).unwrap();

        let i = at.index(bytes.len());
        let mut flipped = bytes.clone();
        flipped[i] ^= flip;
        let result = esp::parse_image(&flipped);
        let _ = inspect(&flipped);
        let in_segment_data = img
            .segments
            .iter()
            .any(|s| (s.data_offset..s.data_offset + s.len as usize).contains(&i));
        if in_segment_data {
            prop_assert!(result.is_err(), "flip at {:#x} inside segment data was accepted", i);
        }
        // Byte 23 is the hash_appended flag itself: turning 1 into 0 drops the hash check
        // (ESP-IDF would accept that image too); every other byte under the hash is covered.
        if img.hash_appended && i < img.image_len - 32 && i != 23 {
            prop_assert!(result.is_err(), "flip at {:#x} under the hash was accepted", i);
        }

        let n = cut.index(bytes.len());
        prop_assert!(esp::parse_image(&bytes[..n]).is_err(), "truncation to {} accepted", n);
        parse_everything(&bytes[..n]);
    }

    #[test]
    fn esp8266_mutations_never_panic(
        eboot in segments(),
        sketch in segments(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let eboot = esp8266_image(0x4010_F000, &eboot);
        let mut sketch = sketch;
        let mut irom = vec![0u8; 8];
        irom.extend_from_slice(&sketch[0].data);
        sketch[0].data = irom;
        let sketch = esp8266_image(0x4010_0000, &sketch);
        let bytes = arduino_esp8266_bin(&eboot, &sketch);
        let img = esp::parse_esp8266_image(&bytes).unwrap();
        prop_assert!(img.arduino_app.is_some());
        prop_assert!(img.arduino_crc.is_some());
        prop_assert_eq!(img.image_len, bytes.len());

        let i = at.index(bytes.len());
        let mut flipped = bytes.clone();
        flipped[i] ^= flip;
        // The CRC covers every byte of an Arduino .bin but its own length word: a length no
        // longer equal to the image's reads as an image from before the CRC, checked by its
        // XOR checksum alone, which such a flip passes once in 256.
        let result = esp::parse_esp8266_image(&flipped);
        let in_length_word = (0x1010..0x1014).contains(&i);
        if !in_length_word {
            prop_assert!(result.is_err(), "flip at {:#x} accepted", i);
        } else if let Ok(parsed) = result {
            prop_assert!(parsed.arduino_crc.is_none(), "flip at {:#x} kept the CRC", i);
        }
        parse_everything(&flipped);
    }

    #[test]
    fn w800_round_trip(header in w800_header(), payload in vec(any::<u8>(), 0..600)) {
        let bytes = w800::build_image(&header, &payload).unwrap();
        let img = w800::parse_image(&bytes).unwrap();
        let padded = payload.len().div_ceil(4) * 4;
        prop_assert_eq!(img.header.payload_len as usize, padded);
        prop_assert_eq!(img.image_len, 64 + padded);
        prop_assert_eq!(&img.payload(&bytes)[..payload.len()], &payload[..]);
        prop_assert_eq!(img.header.org_checksum, w800::jamcrc(img.payload(&bytes)));
        let expected = W800Header {
            payload_len: img.header.payload_len,
            org_checksum: img.header.org_checksum,
            hd_checksum: img.header.hd_checksum,
            ..header
        };
        prop_assert_eq!(&img.header, &expected);
        let encoded = img.header.encode();
        prop_assert_eq!(&encoded[..], &bytes[..64]);
    }

    #[test]
    fn w800_any_flip_fails(
        header in w800_header(),
        payload in vec(any::<u8>(), 0..300),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let bytes = w800::build_image(&header, &payload).unwrap();
        let i = at.index(bytes.len());
        let mut flipped = bytes.clone();
        flipped[i] ^= flip;
        prop_assert!(w800::parse_image(&flipped).is_err(), "flip at {} accepted", i);
        let n = i.min(bytes.len() - 1);
        prop_assert!(w800::parse_image(&bytes[..n]).is_err() || n >= bytes.len());
    }

    #[test]
    fn partition_table_round_trip(entries in vec(partition_entry(), 0..=94)) {
        let table = PartitionTable { entries };
        let bin = table.encode().unwrap();
        prop_assert_eq!(bin.len(), 0xC00);
        prop_assert_eq!(PartitionTable::parse(&bin).unwrap(), table);
    }

    #[test]
    fn partition_row_flips_never_panic(
        entries in vec(partition_entry(), 0..8),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let table = PartitionTable { entries };
        let mut bin = table.encode().unwrap();
        let rows_end = (table.entries.len() + 1) * 32;
        let i = at.index(rows_end);
        bin[i] ^= flip;
        // Every byte of the rows and of the MD5 row is checked, except the 14 0xFF bytes of
        // the MD5 row that gen_esp32part.py does not check either.
        let md5_row = rows_end - 32;
        let unchecked = md5_row + 2..md5_row + 16;
        let result = PartitionTable::parse(&bin);
        if unchecked.contains(&i) {
            prop_assert_eq!(result.unwrap(), table);
        } else {
            prop_assert!(result.is_err(), "flip at {} accepted", i);
        }
    }

    #[test]
    fn otadata_round_trip(seq in any::<u32>(), label in any::<[u8; 20]>(), state in any::<u32>(), crc in any::<u32>()) {
        let entry = OtaSelectEntry { seq, label, state: OtaState::from_u32(state), crc };
        let bytes = entry.encode();
        prop_assert_eq!(OtaSelectEntry::parse(&bytes).unwrap(), entry);
        prop_assert_eq!(entry.state.as_u32(), state);
        let made = OtaSelectEntry::new(seq, OtaState::from_u32(state));
        prop_assert!(made.crc_ok());
        let pair = [entry, made];
        prop_assert_eq!(otadata::parse_otadata(&otadata::encode_otadata(&pair)).unwrap(), pair);
    }

    #[test]
    fn select_boot_picks_a_valid_entry(
        a in (any::<u32>(), 0u32..6, any::<bool>()),
        b in (any::<u32>(), 0u32..6, any::<bool>()),
        slots in 0usize..17,
    ) {
        let make = |(seq, state, good_crc): (u32, u32, bool)| {
            let mut e = OtaSelectEntry::new(seq, OtaState::from_u32(state));
            if !good_crc {
                e.crc = !e.crc;
            }
            e
        };
        let entries = [make(a), make(b)];
        match otadata::select_boot(&entries, slots) {
            None => prop_assert!(slots == 0 || (!entries[0].is_valid() && !entries[1].is_valid())),
            Some((i, slot)) => {
                prop_assert!(entries[i].is_valid());
                prop_assert!(slot < slots);
                let other = &entries[1 - i];
                prop_assert!(!other.is_valid() || other.seq < entries[i].seq || (other.seq == entries[i].seq && i == 0));
            }
        }
    }
}
