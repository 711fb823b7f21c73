//! Delta updates in the format Espressif's `esp_delta_ota` component applies: a 64-byte
//! header (magic `0xFCCDDE10` LE, the base image's id, zero padding) and a detools sequential
//! patch compressed with heatshrink (window 8, lookahead 7), the only kind the component is
//! built for (eerimoq/detools `detools/common.py`, `c/detools.c`; esp_delta_ota
//! `esp_delta_ota_patch_gen.py`).
//!
//! A detools sequential patch: byte `0x04` (type sequential, compression heatshrink), the
//! target size, then one heatshrink stream (its first byte `0x44` = window 8, lookahead 7)
//! of: the data-format size (0), then until the target is complete, triples of `n` diff
//! bytes (target minus base, mod 256), `m` literal bytes and a signed seek in the base from
//! where the diff ended. Sizes are base-128 little endian with a sign bit in the first byte.
//!
//! `encode` writes a patch from bsdiff's triples; `Applier` applies one while it arrives, in
//! bounded memory (the heatshrink window and a few hundred bytes), reading the base through a
//! callback and writing the target through another, the way a device applies it from its
//! running slot into the spare one.

use alloc::vec;
use alloc::vec::Vec;

use embedded_heatshrink::{
    HSDFinishRes, HSDPollRes, HSDSinkRes, HSEFinishRes, HSEPollRes, HSESinkRes, HeatshrinkDecoder,
    HeatshrinkEncoder,
};

use crate::bytes::{array, u32_at};

/// The esp_delta_ota header's magic (`10 de cd fc` on the wire).
pub const MAGIC: u32 = 0xFCCD_DE10;
/// The esp_delta_ota header's length.
pub const HEADER_LEN: usize = 64;
/// detools' first byte for a sequential, heatshrink-compressed patch.
pub const SEQUENTIAL_HEATSHRINK: u8 = 0x04;
const WINDOW: u8 = 8;
const LOOKAHEAD: u8 = 7;
/// heatshrink's parameter byte detools writes before the stream.
const HEATSHRINK_PARAMS: u8 = ((WINDOW - 4) << 4) | (LOOKAHEAD - 3);

/// One step of a sequential patch: `diff` bytes added (mod 256) to the base from where the
/// last step left it, then `extra` literal bytes, then the base position moved by `seek`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub diff: Vec<u8>,
    pub extra: Vec<u8>,
    pub seek: i64,
}

/// Why a patch cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaError {
    /// Not `0x04` (sequential, heatshrink): the only kind esp_delta_ota takes.
    NotSequentialHeatshrink(u8),
    /// The heatshrink parameters are not window 8, lookahead 7.
    HeatshrinkParameters(u8),
    /// A size field is malformed or out of range.
    BadSize,
    /// The data-format section is not empty (esp_delta_ota does not implement it).
    DataFormat,
    /// The patch reads outside the base, or writes past the target size.
    OutOfBounds,
    /// The patch ended before the target was complete.
    Truncated { written: u64, to_size: u64 },
    /// The header's magic or base id does not match.
    Header,
    /// The callback that reads the base or writes the target failed.
    Io,
}

impl core::fmt::Display for DeltaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DeltaError::NotSequentialHeatshrink(b) => write!(
                f,
                "patch type/compression byte {b:#04x}: esp_delta_ota takes only sequential heatshrink patches (0x04)"
            ),
            DeltaError::HeatshrinkParameters(b) => {
                write!(
                    f,
                    "heatshrink parameters {b:#04x}: must be window 8, lookahead 7 (0x44)"
                )
            }
            DeltaError::BadSize => write!(f, "malformed size in the patch"),
            DeltaError::DataFormat => write!(f, "the patch has a data-format section"),
            DeltaError::OutOfBounds => write!(
                f,
                "the patch reads outside the base or writes past the target"
            ),
            DeltaError::Truncated { written, to_size } => {
                write!(f, "the patch ended after {written} of {to_size} bytes")
            }
            DeltaError::Header => write!(f, "not an esp_delta_ota header for this base"),
            DeltaError::Io => write!(f, "reading the base or writing the target failed"),
        }
    }
}

impl core::error::Error for DeltaError {}

/// The esp_delta_ota header for a patch of the base whose id (its appended SHA-256) is
/// `base_id`.
pub fn header(base_id: &[u8; 32]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    if let Some(m) = h.get_mut(..4) {
        m.copy_from_slice(&MAGIC.to_le_bytes());
    }
    if let Some(id) = h.get_mut(4..36) {
        id.copy_from_slice(base_id);
    }
    h
}

/// The base id an esp_delta_ota file is for, when it starts with that header.
pub fn header_base_id(file: &[u8]) -> Option<[u8; 32]> {
    (u32_at(file, 0)? == MAGIC).then(|| array(file, 4))?
}

/// An ESP image's id as esp_delta_ota reads it from the running slot: its appended SHA-256
/// (the last 32 bytes of the `.bin`), not the SHA-256 of the file.
pub fn base_id(image: &[u8]) -> Option<[u8; 32]> {
    array(image, image.len().checked_sub(32)?)
}

/// detools' size encoding: first byte `0x80` more, `0x40` negative, 6 value bits; then 7 bits
/// a byte with `0x80` more.
pub fn put_size(out: &mut Vec<u8>, value: i64) {
    let mut magnitude = value.unsigned_abs();
    let mut first = (magnitude & 0x3F) as u8;
    if value < 0 {
        first |= 0x40;
    }
    magnitude >>= 6;
    if magnitude > 0 {
        first |= 0x80;
    }
    out.push(first);
    while magnitude > 0 {
        let mut byte = (magnitude & 0x7F) as u8;
        magnitude >>= 7;
        if magnitude > 0 {
            byte |= 0x80;
        }
        out.push(byte);
    }
}

/// Compresses with heatshrink window 8, lookahead 7.
fn heatshrink(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(mut encoder) = HeatshrinkEncoder::new(WINDOW, LOOKAHEAD) else {
        return out;
    };
    let mut scratch = [0u8; 1024];
    let mut rest = data;
    let mut drain = |encoder: &mut HeatshrinkEncoder, out: &mut Vec<u8>| loop {
        match encoder.poll(&mut scratch) {
            HSEPollRes::Empty(n) => {
                out.extend_from_slice(scratch.get(..n).unwrap_or_default());
                break;
            }
            HSEPollRes::More(n) => out.extend_from_slice(scratch.get(..n).unwrap_or_default()),
            HSEPollRes::ErrorMisuse | HSEPollRes::ErrorNull => break,
        }
    };
    while !rest.is_empty() {
        match encoder.sink(rest) {
            HSESinkRes::Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            _ => break,
        }
        drain(&mut encoder, &mut out);
    }
    while encoder.finish() == HSEFinishRes::More {
        drain(&mut encoder, &mut out);
    }
    out
}

/// Reads the `bsdiff` crate's raw output as steps: repeated 24-byte controls (diff length,
/// literal length, seek; each a sign-and-magnitude i64 LE), each followed by its diff and
/// literal bytes. `None` when it is malformed.
pub fn steps_from_bsdiff(raw: &[u8]) -> Option<Vec<Step>> {
    let number = |at: usize| -> Option<i64> {
        let v = u64::from_le_bytes(array(raw, at)?);
        let magnitude = i64::try_from(v & !(1 << 63)).ok()?;
        Some(if v >> 63 == 1 {
            magnitude.checked_neg()?
        } else {
            magnitude
        })
    };
    let mut steps = Vec::new();
    let mut at = 0usize;
    while at < raw.len() {
        let diff = usize::try_from(number(at)?).ok()?;
        let extra = usize::try_from(number(at.checked_add(8)?)?).ok()?;
        let seek = number(at.checked_add(16)?)?;
        at = at.checked_add(24)?;
        let diff_end = at.checked_add(diff)?;
        let diff_bytes = raw.get(at..diff_end)?.to_vec();
        let extra_end = diff_end.checked_add(extra)?;
        let extra_bytes = raw.get(diff_end..extra_end)?.to_vec();
        at = extra_end;
        steps.push(Step {
            diff: diff_bytes,
            extra: extra_bytes,
            seek,
        });
    }
    Some(steps)
}

/// A detools sequential heatshrink patch making `to_size` bytes from the steps.
pub fn encode(to_size: u64, steps: &[Step]) -> Vec<u8> {
    let mut stream = Vec::new();
    put_size(&mut stream, 0); // no data format
    for step in steps {
        put_size(&mut stream, step.diff.len() as i64);
        stream.extend_from_slice(&step.diff);
        put_size(&mut stream, step.extra.len() as i64);
        stream.extend_from_slice(&step.extra);
        put_size(&mut stream, step.seek);
    }
    let mut patch = vec![SEQUENTIAL_HEATSHRINK];
    put_size(&mut patch, i64::try_from(to_size).unwrap_or(i64::MAX));
    patch.push(HEATSHRINK_PARAMS);
    patch.extend_from_slice(&heatshrink(&stream));
    patch
}

/// Where the applier is in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading the patch's leading bytes (type, target size, heatshrink parameters).
    Head,
    DataFormat,
    DiffLen,
    Diff(u64),
    ExtraLen,
    Extra(u64),
    Seek,
    Done,
}

/// Applies a sequential heatshrink patch as its bytes arrive (`feed`, any chunk size), reading
/// the base with `read(offset, buf)` and writing the target in order with `write(bytes)`.
/// Memory: the heatshrink window (256 B) and input buffer (256 B), plus small buffers.
pub struct Applier {
    phase: Phase,
    /// The head's type byte and target size have been read.
    typed: bool,
    sized: bool,
    to_size: u64,
    written: u64,
    base_pos: i64,
    base_len: u64,
    size: SizeReader,
    decoder: Option<HeatshrinkDecoder>,
}

impl core::fmt::Debug for Applier {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Applier")
            .field("to_size", &self.to_size)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

/// A size being read byte by byte.
#[derive(Debug, Clone, Copy, Default)]
struct SizeReader {
    value: u64,
    shift: u32,
    negative: bool,
    started: bool,
}

impl SizeReader {
    /// `Some(value)` once the last byte of the size arrived.
    fn push(&mut self, byte: u8) -> Result<Option<i64>, DeltaError> {
        let (bits, more) = if self.started {
            (u64::from(byte & 0x7F), byte & 0x80 != 0)
        } else {
            self.started = true;
            self.negative = byte & 0x40 != 0;
            (u64::from(byte & 0x3F), byte & 0x80 != 0)
        };
        if self.shift > 56 {
            return Err(DeltaError::BadSize);
        }
        self.value |= bits << self.shift;
        self.shift = self
            .shift
            .saturating_add(if self.shift == 0 { 6 } else { 7 });
        if more {
            return Ok(None);
        }
        let magnitude = i64::try_from(self.value).map_err(|_| DeltaError::BadSize)?;
        let value = if self.negative {
            magnitude.checked_neg().ok_or(DeltaError::BadSize)?
        } else {
            magnitude
        };
        *self = SizeReader::default();
        Ok(Some(value))
    }
}

impl Applier {
    /// An applier for a base of `base_len` bytes.
    pub fn new(base_len: u64) -> Applier {
        Applier {
            phase: Phase::Head,
            typed: false,
            sized: false,
            to_size: 0,
            written: 0,
            base_pos: 0,
            base_len,
            size: SizeReader::default(),
            decoder: HeatshrinkDecoder::new(256, WINDOW, LOOKAHEAD),
        }
    }

    /// The target's size, once the patch's head has arrived.
    pub fn to_size(&self) -> Option<u64> {
        (self.phase != Phase::Head).then_some(self.to_size)
    }

    /// Bytes of the target written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Feeds patch bytes.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        write: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), DeltaError> {
        while self.phase == Phase::Head {
            let Some((&byte, rest)) = bytes.split_first() else {
                return Ok(());
            };
            bytes = rest;
            self.head_byte(byte)?;
        }
        let mut out = [0u8; 256];
        while !bytes.is_empty() {
            let decoder = self.decoder.as_mut().ok_or(DeltaError::Io)?;
            match decoder.sink(bytes) {
                HSDSinkRes::Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
                HSDSinkRes::Full => {}
                HSDSinkRes::ErrorNull => return Err(DeltaError::Io),
            }
            self.drain(&mut out, read, write)?;
        }
        Ok(())
    }

    /// Ends the patch: the rest of the stream is decoded and the target must be complete.
    pub fn finish(
        mut self,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        write: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<u64, DeltaError> {
        let mut out = [0u8; 256];
        if self.phase != Phase::Head {
            loop {
                let more = match self.decoder.as_mut().map(HeatshrinkDecoder::finish) {
                    Some(HSDFinishRes::More) => true,
                    Some(HSDFinishRes::Done) => false,
                    _ => return Err(DeltaError::Io),
                };
                self.drain(&mut out, read, write)?;
                if !more {
                    break;
                }
            }
        }
        if self.phase == Phase::Head || self.written != self.to_size {
            return Err(DeltaError::Truncated {
                written: self.written,
                to_size: self.to_size,
            });
        }
        Ok(self.written)
    }

    fn head_byte(&mut self, byte: u8) -> Result<(), DeltaError> {
        if !self.typed {
            if byte != SEQUENTIAL_HEATSHRINK {
                return Err(DeltaError::NotSequentialHeatshrink(byte));
            }
            self.typed = true;
        } else if !self.sized {
            if let Some(size) = self.size.push(byte)? {
                self.to_size = u64::try_from(size).map_err(|_| DeltaError::BadSize)?;
                self.sized = true;
            }
        } else if byte != HEATSHRINK_PARAMS {
            return Err(DeltaError::HeatshrinkParameters(byte));
        } else {
            self.phase = Phase::DataFormat;
        }
        Ok(())
    }

    fn drain(
        &mut self,
        out: &mut [u8; 256],
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        write: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), DeltaError> {
        loop {
            let decoder = self.decoder.as_mut().ok_or(DeltaError::Io)?;
            let (n, more) = match decoder.poll(out) {
                HSDPollRes::Empty(n) => (n, false),
                HSDPollRes::More(n) => (n, true),
                HSDPollRes::ErrorNull | HSDPollRes::ErrorUnknown => return Err(DeltaError::Io),
            };
            let mut chunk = out.get(..n).unwrap_or_default();
            while !chunk.is_empty() {
                let used = self.stream(chunk, read, write)?;
                chunk = chunk.get(used..).unwrap_or_default();
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Consumes decoded stream bytes; returns how many it used.
    fn stream(
        &mut self,
        chunk: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        write: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<usize, DeltaError> {
        let Some(&first) = chunk.first() else {
            return Ok(0);
        };
        match self.phase {
            Phase::Head => Err(DeltaError::Io),
            Phase::Done => Err(DeltaError::OutOfBounds),
            Phase::DataFormat => {
                if let Some(size) = self.size.push(first)? {
                    if size != 0 {
                        return Err(DeltaError::DataFormat);
                    }
                    self.phase = self.next_step();
                }
                Ok(1)
            }
            Phase::DiffLen | Phase::ExtraLen | Phase::Seek => {
                if let Some(size) = self.size.push(first)? {
                    self.phase = match self.phase {
                        Phase::DiffLen => {
                            Phase::Diff(u64::try_from(size).map_err(|_| DeltaError::BadSize)?)
                        }
                        Phase::ExtraLen => {
                            Phase::Extra(u64::try_from(size).map_err(|_| DeltaError::BadSize)?)
                        }
                        _ => {
                            self.base_pos =
                                self.base_pos.checked_add(size).ok_or(DeltaError::BadSize)?;
                            self.next_step()
                        }
                    };
                    self.settle();
                }
                Ok(1)
            }
            Phase::Diff(left) => {
                let n = chunk
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX))
                    .min(256);
                let pos = u64::try_from(self.base_pos).map_err(|_| DeltaError::OutOfBounds)?;
                if pos.saturating_add(n as u64) > self.base_len {
                    return Err(DeltaError::OutOfBounds);
                }
                let mut base = [0u8; 256];
                let base = base.get_mut(..n).ok_or(DeltaError::Io)?;
                if !read(pos, base) {
                    return Err(DeltaError::Io);
                }
                for (b, d) in base.iter_mut().zip(chunk) {
                    *b = b.wrapping_add(*d);
                }
                self.emit(base, write)?;
                self.base_pos = self.base_pos.saturating_add(n as i64);
                self.phase = Phase::Diff(left.saturating_sub(n as u64));
                self.settle();
                Ok(n)
            }
            Phase::Extra(left) => {
                let n = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                self.emit(chunk.get(..n).unwrap_or_default(), write)?;
                self.phase = Phase::Extra(left.saturating_sub(n as u64));
                self.settle();
                Ok(n)
            }
        }
    }

    /// After a length of 0 or a finished run: on to the next field.
    fn settle(&mut self) {
        self.phase = match self.phase {
            Phase::Diff(0) => Phase::ExtraLen,
            Phase::Extra(0) => Phase::Seek,
            other => other,
        };
    }

    fn next_step(&self) -> Phase {
        if self.written >= self.to_size {
            Phase::Done
        } else {
            Phase::DiffLen
        }
    }

    fn emit(
        &mut self,
        bytes: &[u8],
        write: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), DeltaError> {
        let end = self.written.saturating_add(bytes.len() as u64);
        if end > self.to_size {
            return Err(DeltaError::OutOfBounds);
        }
        if !write(bytes) {
            return Err(DeltaError::Io);
        }
        self.written = end;
        Ok(())
    }
}

/// Applies a whole patch to a base held in memory (the server's check of a patch it made).
pub fn apply(base: &[u8], patch: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    let mut applier = Applier::new(base.len() as u64);
    let mut read = |at: u64, buf: &mut [u8]| {
        let at = usize::try_from(at).unwrap_or(usize::MAX);
        match base.get(at..at.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    };
    let mut write = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        true
    };
    applier.feed(patch, &mut read, &mut write)?;
    applier.finish(&mut read, &mut write)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_detools_writes_them() {
        for (value, bytes) in [
            (0i64, &[0x00u8][..]),
            (1277, &[0xbd, 0x13]),
            (400_384, &[0x80, 0xf0, 0x30]),
        ] {
            let mut out = Vec::new();
            put_size(&mut out, value);
            assert_eq!(out, bytes, "{value}");
            let mut r = SizeReader::default();
            let mut got = None;
            for &b in bytes {
                got = r.push(b).unwrap();
            }
            assert_eq!(got, Some(value));
        }
        let mut out = Vec::new();
        put_size(&mut out, -5);
        let mut r = SizeReader::default();
        assert_eq!(r.push(out[0]).unwrap(), Some(-5));
    }

    #[test]
    fn a_patch_round_trips_in_any_chunking() {
        let base: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut target = base.clone();
        target[100] ^= 0x55;
        target.splice(2000..2000, [1u8, 2, 3, 4, 5]);
        let steps = [
            Step {
                diff: target[..2000]
                    .iter()
                    .zip(&base[..2000])
                    .map(|(t, b)| t.wrapping_sub(*b))
                    .collect(),
                extra: target[2000..2005].to_vec(),
                seek: 0,
            },
            Step {
                diff: target[2005..]
                    .iter()
                    .zip(&base[2000..])
                    .map(|(t, b)| t.wrapping_sub(*b))
                    .collect(),
                extra: Vec::new(),
                seek: 0,
            },
        ];
        let patch = encode(target.len() as u64, &steps);
        assert_eq!(&patch[..1], &[0x04]);
        assert_eq!(apply(&base, &patch).unwrap(), target);
        for chunk in [1usize, 3, 64, 1000] {
            let mut out = Vec::new();
            let mut a = Applier::new(base.len() as u64);
            let mut read = |at: u64, buf: &mut [u8]| {
                buf.copy_from_slice(&base[at as usize..at as usize + buf.len()]);
                true
            };
            let mut write = |b: &[u8]| {
                out.extend_from_slice(b);
                true
            };
            for piece in patch.chunks(chunk) {
                a.feed(piece, &mut read, &mut write).unwrap();
            }
            a.finish(&mut read, &mut write).unwrap();
            assert_eq!(out, target, "chunks of {chunk}");
        }
        // Truncated: finish says how far it got.
        assert!(matches!(
            apply(&base, &patch[..patch.len() / 2]),
            Err(DeltaError::Truncated { .. })
        ));
        // Other kinds are refused by their first byte.
        assert_eq!(
            apply(&base, &[0x00, 0x01]),
            Err(DeltaError::NotSequentialHeatshrink(0))
        );
    }

    #[test]
    fn the_header_names_the_base() {
        let id = [9u8; 32];
        let h = header(&id);
        assert_eq!(&h[..4], &[0x10, 0xde, 0xcd, 0xfc]);
        assert_eq!(header_base_id(&h), Some(id));
        assert!(h[36..].iter().all(|&b| b == 0));
        assert_eq!(base_id(&[1u8; 40]), Some([1u8; 32]));
    }
}
