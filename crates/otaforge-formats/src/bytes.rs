//! Bounds-checked little-endian reads, C-string decoding and hex printing shared by the parsers.

use alloc::string::String;
use core::fmt;

/// `len` bytes at `offset`, or `None` when they are not all inside `bytes`.
pub(crate) fn slice(bytes: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    bytes.get(offset..offset.checked_add(len)?)
}

/// `N` bytes at `offset` as an array, or `None` when they are not all inside `bytes`.
pub(crate) fn array<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    slice(bytes, offset, N)?.try_into().ok()
}

pub(crate) fn u8_at(bytes: &[u8], offset: usize) -> Option<u8> {
    bytes.get(offset).copied()
}

pub(crate) fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    array(bytes, offset).map(u16::from_le_bytes)
}

pub(crate) fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    array(bytes, offset).map(u32::from_le_bytes)
}

/// Writes `value` little-endian at `offset`; the caller owns a buffer large enough for it.
pub(crate) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    put(buf, offset, &value.to_le_bytes());
}

/// Copies `src` into `buf` at `offset`, or as much of it as fits.
pub(crate) fn put(buf: &mut [u8], offset: usize, src: &[u8]) {
    if let Some(dst) = buf.get_mut(offset..) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = *s;
        }
    }
}

/// A fixed-size C string field: the bytes before the first NUL, decoded as lossy UTF-8.
pub(crate) fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = field.get(..end).unwrap_or_default();
    String::from_utf8_lossy(text).into()
}

/// [`c_string`] with surrounding whitespace trimmed.
pub(crate) fn c_string_trimmed(field: &[u8]) -> String {
    let text = c_string(field);
    let trimmed = text.trim();
    if trimmed.len() == text.len() {
        text
    } else {
        trimmed.into()
    }
}

/// Copies `text` into a NUL-padded field of `N` bytes, keeping at most `max` bytes of it and
/// cutting only at a UTF-8 character boundary.
pub(crate) fn c_string_field<const N: usize>(text: &str, max: usize) -> [u8; N] {
    let mut cut = text.len().min(max).min(N);
    while !text.is_char_boundary(cut) {
        cut = cut.saturating_sub(1);
    }
    let mut field = [0u8; N];
    put(
        &mut field,
        0,
        text.as_bytes().get(..cut).unwrap_or_default(),
    );
    field
}

/// XOR of all bytes into `seed`: the ESP ROM loader's image checksum.
pub(crate) fn xor_checksum(seed: u8, data: &[u8]) -> u8 {
    data.iter().fold(seed, |acc, b| acc ^ b)
}

/// Displays bytes as lowercase hex without separators.
/// Lowercase hex of the SHA-256 of `data`.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    alloc::format!("{}", Hex(&sha2::Sha256::digest(data)))
}

pub(crate) struct Hex<'a>(pub(crate) &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn reads_are_bounds_checked() {
        let b = [1u8, 2, 3, 4, 5];
        assert_eq!(u32_at(&b, 0), Some(0x0403_0201));
        assert_eq!(u32_at(&b, 1), Some(0x0504_0302));
        assert_eq!(u32_at(&b, 2), None);
        assert_eq!(u32_at(&b, usize::MAX), None);
        assert_eq!(u16_at(&b, 4), None);
        assert_eq!(slice(&b, usize::MAX, 2), None);
    }

    #[test]
    fn c_strings() {
        assert_eq!(c_string(b"1.2.3\0\0\0garbage"), "1.2.3");
        assert_eq!(c_string(b" v5.1 "), " v5.1 ");
        assert_eq!(c_string_trimmed(b" v5.1 \0x"), "v5.1");
        assert_eq!(c_string(b"\xff\xfeab\0"), "\u{fffd}\u{fffd}ab");
        let f: [u8; 8] = c_string_field("abcdefghij", 7);
        assert_eq!(&f, b"abcdefg\0");
        // "é" is two bytes; a cut inside it moves back to the boundary.
        let f: [u8; 4] = c_string_field("aé", 2);
        assert_eq!(&f, b"a\0\0\0");
    }

    #[test]
    fn hex() {
        assert_eq!(format!("{}", Hex(&[0x00, 0xab, 0x10])), "00ab10");
    }
}
