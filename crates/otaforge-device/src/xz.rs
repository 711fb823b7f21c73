//! A streaming xz decoder (LZMA2 filter, CRC32 / CRC64 / SHA-256 / no check) in bounded memory,
//! `no_std` + `alloc`: what a bootloader needs to unpack a W800 OTA image from flash into flash.
//!
//! Unlike `lzma_rs::xz_decompress`, which collects each whole block in a `Vec` before writing
//! it out, this decoder writes through a circular dictionary: its working memory is
//! [`working_memory`] of the dictionary buffer, whatever the size of the data. The dictionary
//! buffer is the smaller of the size the stream declares and [`XzLimits::max_output`] (a match
//! can never reach further back than the output written so far), and a stream needing more than
//! [`XzLimits::max_dict_size`] is refused before anything is allocated.
//!
//! It follows the xz file format 1.1.0 and the decoder of xz-embedded (one stream; LZMA2 as the
//! only filter, which is what `bin2img.py` writes; every CRC and size field is checked,
//! including the index against the blocks). Bytes after the stream footer are not read.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;

use sha2::{Digest, Sha256};

use crate::flash::FlashError;

/// First six bytes of an xz stream.
pub const XZ_MAGIC: [u8; 6] = otaforge_formats::w800::XZ_MAGIC;
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
const FILTER_LZMA2: u64 = 0x21;
/// Most input one LZMA symbol can consume (xz-embedded `LZMA_IN_REQUIRED`).
const LZMA_IN_REQUIRED: usize = 21;
/// Size of the input buffer.
const IN_BUF: usize = 1024;
/// Literal coder probabilities for the largest `lc + lp` LZMA2 allows (4).
const LITERAL_PROBS_MAX: usize = 0x300 << 4;
const PROB_INIT: u16 = 1024;

/// Where the compressed bytes come from and the decompressed bytes go. One object does both so
/// that a bootloader can read `app_ota` and write `app` through the same flash.
pub trait XzIo {
    /// Reads up to `buf.len()` compressed bytes; `Ok(0)` at the end of the input.
    fn read_input(&mut self, buf: &mut [u8]) -> Result<usize, XzError>;
    /// Takes the next decompressed bytes. [`XzError::Stopped`] ends decoding early without it
    /// being a fault of the stream.
    fn write_output(&mut self, data: &[u8]) -> Result<(), XzError>;
}

/// Decompresses from a byte slice into a `Vec` (the output is held in memory, the decoder's own
/// state is still bounded).
pub struct SliceIo<'a> {
    pub input: &'a [u8],
    pub output: Vec<u8>,
}

impl XzIo for SliceIo<'_> {
    fn read_input(&mut self, buf: &mut [u8]) -> Result<usize, XzError> {
        let n = buf.len().min(self.input.len());
        let (head, tail) = self.input.split_at(n);
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(head);
        }
        self.input = tail;
        Ok(n)
    }

    fn write_output(&mut self, data: &[u8]) -> Result<(), XzError> {
        self.output.extend_from_slice(data);
        Ok(())
    }
}

/// Limits on what a stream may make the decoder allocate or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XzLimits {
    /// Largest dictionary buffer to allocate.
    pub max_dict_size: u32,
    /// Most decompressed bytes accepted; also caps the dictionary buffer.
    pub max_output: u64,
}

impl Default for XzLimits {
    /// 1 MiB of dictionary, no output limit.
    fn default() -> Self {
        XzLimits {
            max_dict_size: 1 << 20,
            max_output: u64::MAX,
        }
    }
}

/// What a successful decode saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XzSummary {
    pub uncompressed_len: u64,
    /// Bytes of the stream, header to footer.
    pub compressed_len: u64,
    /// The dictionary buffer that was allocated (the largest, over all blocks).
    pub dict_buffer_len: usize,
}

/// Bytes of decoder state besides the dictionary buffer: all LZMA probabilities (with the
/// literal coder sized for the largest `lc + lp`) and the input buffer.
pub const FIXED_STATE_BYTES: usize =
    core::mem::size_of::<Probs>() + LITERAL_PROBS_MAX * 2 + IN_BUF + core::mem::size_of::<Rc>();

/// The decoder's working memory for a dictionary buffer of `dict_buffer_len` bytes.
pub const fn working_memory(dict_buffer_len: usize) -> usize {
    dict_buffer_len.saturating_add(FIXED_STATE_BYTES)
}

/// Why an xz stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XzError {
    #[error("xz stream ends early")]
    Truncated,
    #[error("not an xz stream: the magic bytes are wrong")]
    BadMagic,
    #[error("xz stream flags are invalid")]
    BadStreamFlags,
    #[error("xz check type {0:#x} is not supported")]
    UnsupportedCheck(u8),
    #[error("xz {0} crc32 does not match")]
    HeaderCrc(&'static str),
    #[error("xz block header is invalid: {0}")]
    BadBlockHeader(&'static str),
    #[error("xz filter {0:#x} is not supported, only lzma2 (0x21)")]
    UnsupportedFilter(u64),
    #[error("xz dictionary needs a {needed}-byte buffer, more than the {limit}-byte limit")]
    DictTooLarge { needed: u64, limit: u32 },
    #[error("lzma2 data is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("xz {0} does not match the data")]
    SizeMismatch(&'static str),
    #[error("xz integrity check failed: the decompressed data is corrupt")]
    CheckMismatch,
    #[error("decompressed data exceeds the {limit}-byte limit")]
    OutputTooLarge { limit: u64 },
    #[error("{0}")]
    Flash(FlashError),
    #[error("decompression stopped by its output")]
    Stopped,
}

impl From<FlashError> for XzError {
    fn from(e: FlashError) -> Self {
        XzError::Flash(e)
    }
}

/// Decompresses `input` into a `Vec`.
pub fn decompress_to_vec(input: &[u8], limits: &XzLimits) -> Result<Vec<u8>, XzError> {
    let mut io = SliceIo {
        input,
        output: Vec::new(),
    };
    decompress(&mut io, limits)?;
    Ok(io.output)
}

/// Decompresses one xz stream from `io`'s input to its output.
pub fn decompress<I: XzIo>(io: &mut I, limits: &XzLimits) -> Result<XzSummary, XzError> {
    let mut d = Decoder {
        io,
        input: Input {
            buf: [0; IN_BUF],
            pos: 0,
            len: 0,
            consumed: 0,
            eof: false,
        },
        rc: Rc {
            range: u32::MAX,
            code: 0,
            left: 0,
            overrun: false,
        },
        dict: Dict {
            buf: Vec::new(),
            pos: 0,
            flushed: 0,
            since_reset: 0,
        },
        out: Out {
            total: 0,
            max: limits.max_output,
            check: CheckState::None,
            err: None,
        },
        probs: Box::new(Probs::new()),
        literal: vec![PROB_INIT; LITERAL_PROBS_MAX],
        state: 0,
        reps: [0; 4],
        lc: 0,
        lp_mask: 0,
        pb_mask: 0,
        limits: *limits,
        dict_buffer_len: 0,
    };
    d.stream()
}

// ---------------------------------------------------------------------------------------------

struct Input {
    buf: [u8; IN_BUF],
    pos: usize,
    len: usize,
    /// Bytes handed out so far.
    consumed: u64,
    eof: bool,
}

impl Input {
    fn available(&self) -> usize {
        self.len.saturating_sub(self.pos)
    }

    fn take(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        if self.pos >= self.len {
            return None;
        }
        self.pos = self.pos.saturating_add(1);
        self.consumed = self.consumed.saturating_add(1);
        Some(b)
    }

    /// Moves what is left to the front and reads more; returns the bytes added (0 at EOF).
    fn fill<I: XzIo + ?Sized>(&mut self, io: &mut I) -> Result<usize, XzError> {
        if self.eof {
            return Ok(0);
        }
        self.buf.copy_within(self.pos..self.len, 0);
        self.len = self.available();
        self.pos = 0;
        let Some(space) = self.buf.get_mut(self.len..) else {
            return Ok(0);
        };
        if space.is_empty() {
            return Ok(0);
        }
        let n = io.read_input(space)?.min(space.len());
        if n == 0 {
            self.eof = true;
        }
        self.len = self.len.saturating_add(n);
        Ok(n)
    }
}

/// The range decoder of one LZMA chunk.
struct Rc {
    range: u32,
    code: u32,
    /// Compressed bytes of the chunk not consumed yet.
    left: u32,
    /// Set when the chunk or the input ran out, or an index was out of range (corrupt data).
    overrun: bool,
}

const RC_TOP: u32 = 1 << 24;

impl Rc {
    fn next(&mut self, input: &mut Input) -> u32 {
        if self.left == 0 {
            self.overrun = true;
            return 0;
        }
        match input.take() {
            Some(b) => {
                self.left = self.left.saturating_sub(1);
                u32::from(b)
            }
            None => {
                self.overrun = true;
                0
            }
        }
    }

    fn normalize(&mut self, input: &mut Input) {
        if self.range < RC_TOP {
            self.range = self.range.wrapping_shl(8);
            self.code = self.code.wrapping_shl(8) | self.next(input);
        }
    }

    fn bit(&mut self, input: &mut Input, prob: Option<&mut u16>) -> u32 {
        let Some(prob) = prob else {
            self.overrun = true;
            return 0;
        };
        self.normalize(input);
        let bound = self.range.wrapping_shr(11).wrapping_mul(u32::from(*prob));
        if self.code < bound {
            self.range = bound;
            *prob = prob.wrapping_add(2048u16.wrapping_sub(*prob).wrapping_shr(5));
            0
        } else {
            self.range = self.range.wrapping_sub(bound);
            self.code = self.code.wrapping_sub(bound);
            *prob = prob.wrapping_sub(prob.wrapping_shr(5));
            1
        }
    }

    /// A bit tree of `limit` leaves (a power of two), most significant bit first.
    fn bittree(&mut self, input: &mut Input, probs: &mut [u16], limit: u32) -> u32 {
        let mut symbol = 1u32;
        while symbol < limit {
            let b = self.bit(input, probs.get_mut(symbol as usize));
            symbol = symbol.wrapping_shl(1) | b;
        }
        symbol.wrapping_sub(limit)
    }

    /// A bit tree of `bits` bits, least significant bit first, added to `dest`; probability
    /// `symbol` is at `probs[base + symbol - 1]`.
    fn bittree_reverse(
        &mut self,
        input: &mut Input,
        probs: &mut [u16],
        base: usize,
        dest: &mut u32,
        bits: u32,
    ) {
        let mut symbol = 1usize;
        for i in 0..bits {
            let index = base.wrapping_add(symbol).wrapping_sub(1);
            let b = self.bit(input, probs.get_mut(index));
            symbol = symbol.wrapping_shl(1) | b as usize;
            *dest = dest.wrapping_add(b.wrapping_shl(i));
        }
    }

    /// `bits` bits of probability one half, appended to `dest`.
    fn direct(&mut self, input: &mut Input, dest: &mut u32, bits: u32) {
        for _ in 0..bits {
            self.normalize(input);
            self.range = self.range.wrapping_shr(1);
            self.code = self.code.wrapping_sub(self.range);
            let mask = 0u32.wrapping_sub(self.code.wrapping_shr(31));
            self.code = self.code.wrapping_add(self.range & mask);
            *dest = dest.wrapping_shl(1).wrapping_add(mask.wrapping_add(1));
        }
    }
}

/// The circular dictionary, which is also the output buffer.
struct Dict {
    buf: Vec<u8>,
    pos: usize,
    /// Bytes before `pos` already handed to the output.
    flushed: usize,
    /// Bytes decoded since the last dictionary reset (positions for `lp` and `pb`).
    since_reset: u64,
}

struct Out {
    total: u64,
    max: u64,
    check: CheckState,
    err: Option<XzError>,
}

impl Dict {
    fn valid(&self) -> u64 {
        self.since_reset.min(self.buf.len() as u64)
    }

    /// The byte `dist + 1` positions back (0 when there is none).
    fn get(&self, dist: u32) -> u8 {
        if u64::from(dist) >= self.valid() {
            return 0;
        }
        let dist = dist as usize;
        let index = if dist < self.pos {
            self.pos.wrapping_sub(dist).wrapping_sub(1)
        } else {
            self.buf
                .len()
                .wrapping_add(self.pos)
                .wrapping_sub(dist)
                .wrapping_sub(1)
        };
        self.buf.get(index).copied().unwrap_or(0)
    }

    fn put<I: XzIo + ?Sized>(&mut self, byte: u8, io: &mut I, out: &mut Out) {
        if let Some(slot) = self.buf.get_mut(self.pos) {
            *slot = byte;
        }
        self.pos = self.pos.saturating_add(1);
        self.since_reset = self.since_reset.saturating_add(1);
        if self.pos >= self.buf.len() {
            self.flush(io, out);
            self.pos = 0;
            self.flushed = 0;
        }
    }

    fn flush<I: XzIo + ?Sized>(&mut self, io: &mut I, out: &mut Out) {
        let data = self.buf.get(self.flushed..self.pos).unwrap_or_default();
        self.flushed = self.pos;
        if data.is_empty() || out.err.is_some() {
            return;
        }
        out.total = out.total.saturating_add(data.len() as u64);
        if out.total > out.max {
            out.err = Some(XzError::OutputTooLarge { limit: out.max });
            return;
        }
        out.check.update(data);
        if let Err(e) = io.write_output(data) {
            out.err = Some(e);
        }
    }

    fn reset<I: XzIo + ?Sized>(&mut self, io: &mut I, out: &mut Out) {
        self.flush(io, out);
        self.pos = 0;
        self.flushed = 0;
        self.since_reset = 0;
    }
}

enum CheckState {
    None,
    Crc32(crc32fast::Hasher),
    Crc64(u64),
    Sha256(Box<Sha256>),
}

impl CheckState {
    fn new(check_type: u8) -> Result<CheckState, XzError> {
        match check_type {
            0x00 => Ok(CheckState::None),
            0x01 => Ok(CheckState::Crc32(crc32fast::Hasher::new())),
            0x04 => Ok(CheckState::Crc64(0)),
            0x0A => Ok(CheckState::Sha256(Box::new(Sha256::new()))),
            other => Err(XzError::UnsupportedCheck(other)),
        }
    }

    fn size(check_type: u8) -> usize {
        match check_type {
            0x01 => 4,
            0x04 => 8,
            0x0A => 32,
            _ => 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            CheckState::None => {}
            CheckState::Crc32(h) => h.update(data),
            CheckState::Crc64(c) => *c = crc64_update(*c, data),
            CheckState::Sha256(h) => h.update(data),
        }
    }

    /// The check field as stored after a block.
    fn finish(&mut self, check_type: u8) -> Result<Vec<u8>, XzError> {
        let done = core::mem::replace(self, CheckState::new(check_type)?);
        Ok(match done {
            CheckState::None => Vec::new(),
            CheckState::Crc32(h) => h.finalize().to_le_bytes().to_vec(),
            CheckState::Crc64(c) => c.to_le_bytes().to_vec(),
            CheckState::Sha256(h) => h.finalize().to_vec(),
        })
    }
}

// Evaluated at compile time: an out-of-range index would fail the build, not panic at run time.
#[allow(clippy::indexing_slicing)]
const CRC64_TABLE: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u64;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xC96C_5795_D787_0F42
            } else {
                c >> 1
            };
            bit += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-64/XZ (ECMA-182, reflected), continuing from `crc`.
fn crc64_update(crc: u64, data: &[u8]) -> u64 {
    let mut c = !crc;
    for &b in data {
        let index = ((c ^ u64::from(b)) & 0xFF) as usize;
        c = CRC64_TABLE.get(index).copied().unwrap_or(0) ^ c.wrapping_shr(8);
    }
    !c
}

/// Hash of the (unpadded size, uncompressed size) records, as seen in the blocks and in the
/// index, so the two can be compared without storing a list.
struct IndexHash {
    count: u64,
    unpadded: u64,
    uncompressed: u64,
    crc: crc32fast::Hasher,
}

impl IndexHash {
    fn new() -> IndexHash {
        IndexHash {
            count: 0,
            unpadded: 0,
            uncompressed: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    fn add(&mut self, unpadded: u64, uncompressed: u64) {
        self.count = self.count.wrapping_add(1);
        self.unpadded = self.unpadded.wrapping_add(unpadded);
        self.uncompressed = self.uncompressed.wrapping_add(uncompressed);
        self.crc.update(&unpadded.to_le_bytes());
        self.crc.update(&uncompressed.to_le_bytes());
    }

    fn digest(self) -> (u64, u64, u64, u32) {
        (
            self.count,
            self.unpadded,
            self.uncompressed,
            self.crc.finalize(),
        )
    }
}

struct LenProbs {
    choice: u16,
    choice2: u16,
    low: [u16; 16 * 8],
    mid: [u16; 16 * 8],
    high: [u16; 256],
}

impl LenProbs {
    const fn new() -> LenProbs {
        LenProbs {
            choice: PROB_INIT,
            choice2: PROB_INIT,
            low: [PROB_INIT; 16 * 8],
            mid: [PROB_INIT; 16 * 8],
            high: [PROB_INIT; 256],
        }
    }
}

/// Every LZMA probability but the literal coder's.
struct Probs {
    is_match: [u16; 12 * 16],
    is_rep: [u16; 12],
    is_rep0: [u16; 12],
    is_rep1: [u16; 12],
    is_rep2: [u16; 12],
    is_rep0_long: [u16; 12 * 16],
    dist_slot: [u16; 4 * 64],
    dist_special: [u16; 114],
    dist_align: [u16; 16],
    match_len: LenProbs,
    rep_len: LenProbs,
}

impl Probs {
    const fn new() -> Probs {
        Probs {
            is_match: [PROB_INIT; 12 * 16],
            is_rep: [PROB_INIT; 12],
            is_rep0: [PROB_INIT; 12],
            is_rep1: [PROB_INIT; 12],
            is_rep2: [PROB_INIT; 12],
            is_rep0_long: [PROB_INIT; 12 * 16],
            dist_slot: [PROB_INIT; 4 * 64],
            dist_special: [PROB_INIT; 114],
            dist_align: [PROB_INIT; 16],
            match_len: LenProbs::new(),
            rep_len: LenProbs::new(),
        }
    }
}

struct Decoder<'a, I: XzIo> {
    io: &'a mut I,
    input: Input,
    rc: Rc,
    dict: Dict,
    out: Out,
    probs: Box<Probs>,
    literal: Vec<u16>,
    state: u32,
    reps: [u32; 4],
    lc: u32,
    lp_mask: u32,
    pb_mask: u32,
    limits: XzLimits,
    dict_buffer_len: usize,
}

fn u32_le(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(src) = b.get(at..at.saturating_add(4)) {
        w.copy_from_slice(src);
    }
    u32::from_le_bytes(w)
}

/// A multibyte integer (7 bits per byte, little-endian, at most 9 bytes) from `b` at `*pos`.
fn varint_in(b: &[u8], pos: &mut usize) -> Result<u64, XzError> {
    let mut value = 0u64;
    for i in 0..9u32 {
        let byte = *b
            .get(*pos)
            .ok_or(XzError::BadBlockHeader("a size field runs past the header"))?;
        *pos = pos.saturating_add(1);
        value |= u64::from(byte & 0x7F).wrapping_shl(i.wrapping_mul(7));
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(XzError::BadBlockHeader(
                    "a size field is not minimally encoded",
                ));
            }
            return Ok(value);
        }
    }
    Err(XzError::BadBlockHeader(
        "a size field is longer than 9 bytes",
    ))
}

impl<I: XzIo> Decoder<'_, I> {
    fn byte(&mut self) -> Result<u8, XzError> {
        loop {
            if let Some(b) = self.input.take() {
                return Ok(b);
            }
            if self.input.fill(self.io)? == 0 {
                return Err(XzError::Truncated);
            }
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], XzError> {
        let mut out = [0u8; N];
        for b in out.iter_mut() {
            *b = self.byte()?;
        }
        Ok(out)
    }

    /// A multibyte integer from the input, fed into `crc`.
    fn varint(&mut self, crc: &mut crc32fast::Hasher) -> Result<u64, XzError> {
        let mut value = 0u64;
        for i in 0..9u32 {
            let byte = self.byte()?;
            crc.update(&[byte]);
            value |= u64::from(byte & 0x7F).wrapping_shl(i.wrapping_mul(7));
            if byte & 0x80 == 0 {
                if byte == 0 && i > 0 {
                    return Err(XzError::SizeMismatch(
                        "index (integer not minimally encoded)",
                    ));
                }
                return Ok(value);
            }
        }
        Err(XzError::SizeMismatch("index (integer longer than 9 bytes)"))
    }

    fn ensure_input(&mut self, n: usize) -> Result<(), XzError> {
        while self.input.available() < n {
            if self.input.fill(self.io)? == 0 {
                break;
            }
        }
        Ok(())
    }

    fn stream(&mut self) -> Result<XzSummary, XzError> {
        let header: [u8; 12] = self.bytes()?;
        let (magic, rest) = header.split_at(6);
        if magic != XZ_MAGIC {
            return Err(XzError::BadMagic);
        }
        let flags = [
            rest.first().copied().unwrap_or(0xFF),
            rest.get(1).copied().unwrap_or(0xFF),
        ];
        if crc32fast::hash(&flags) != u32_le(rest, 2) {
            return Err(XzError::HeaderCrc("stream header"));
        }
        if flags[0] != 0 || flags[1] & 0xF0 != 0 {
            return Err(XzError::BadStreamFlags);
        }
        let check_type = flags[1];
        self.out.check = CheckState::new(check_type)?;

        let mut blocks = IndexHash::new();
        loop {
            let size_byte = self.byte()?;
            if size_byte == 0 {
                break;
            }
            let (unpadded, uncompressed) = self.block(size_byte, check_type)?;
            blocks.add(unpadded, uncompressed);
        }
        let index_size = self.index(blocks)?;

        let footer: [u8; 12] = self.bytes()?;
        if footer.get(10..12) != Some(&FOOTER_MAGIC[..]) {
            return Err(XzError::BadMagic);
        }
        if crc32fast::hash(footer.get(4..10).unwrap_or_default()) != u32_le(&footer, 0) {
            return Err(XzError::HeaderCrc("stream footer"));
        }
        if footer.get(8..10) != Some(&flags[..]) {
            return Err(XzError::BadStreamFlags);
        }
        let backward = u64::from(u32_le(&footer, 4))
            .saturating_add(1)
            .saturating_mul(4);
        if backward != index_size {
            return Err(XzError::SizeMismatch("stream footer backward size"));
        }
        Ok(XzSummary {
            uncompressed_len: self.out.total,
            compressed_len: self.input.consumed,
            dict_buffer_len: self.dict_buffer_len,
        })
    }

    /// Decodes one block whose header starts with `size_byte`; returns its unpadded and
    /// uncompressed sizes.
    fn block(&mut self, size_byte: u8, check_type: u8) -> Result<(u64, u64), XzError> {
        let header_len = (usize::from(size_byte)).saturating_add(1).saturating_mul(4);
        let mut header = [0u8; 1024];
        let Some(header) = header.get_mut(..header_len) else {
            return Err(XzError::BadBlockHeader("header size"));
        };
        let (first, rest) = header.split_at_mut(1);
        if let Some(b) = first.first_mut() {
            *b = size_byte;
        }
        for b in rest.iter_mut() {
            *b = self.byte()?;
        }
        let crc_at = header_len.saturating_sub(4);
        let body = header.get(..crc_at).unwrap_or_default();
        if crc32fast::hash(body) != u32_le(header, crc_at) {
            return Err(XzError::HeaderCrc("block header"));
        }
        let flags = body.get(1).copied().unwrap_or(0xFF);
        if flags & 0x3C != 0 {
            return Err(XzError::BadBlockHeader("reserved flag bits are set"));
        }
        let mut pos = 2usize;
        let compressed_size = if flags & 0x40 != 0 {
            Some(varint_in(body, &mut pos)?)
        } else {
            None
        };
        let uncompressed_size = if flags & 0x80 != 0 {
            Some(varint_in(body, &mut pos)?)
        } else {
            None
        };
        let filter = varint_in(body, &mut pos)?;
        if flags & 0x03 != 0 {
            // More than one filter (a BCJ filter before LZMA2): not written by bin2img.py.
            return Err(XzError::UnsupportedFilter(filter));
        }
        if filter != FILTER_LZMA2 {
            return Err(XzError::UnsupportedFilter(filter));
        }
        if varint_in(body, &mut pos)? != 1 {
            return Err(XzError::BadBlockHeader("lzma2 properties are not one byte"));
        }
        let dict_code = *body.get(pos).ok_or(XzError::BadBlockHeader(
            "lzma2 properties run past the header",
        ))?;
        pos = pos.saturating_add(1);
        if body.get(pos..).unwrap_or_default().iter().any(|&b| b != 0) {
            return Err(XzError::BadBlockHeader("header padding is not zero"));
        }
        if dict_code > 39 {
            return Err(XzError::BadBlockHeader(
                "lzma2 dictionary size is above 3 GiB",
            ));
        }
        let declared =
            u64::from(2 | (dict_code & 1)).wrapping_shl(u32::from(dict_code / 2).wrapping_add(11));
        let needed = declared.min(self.limits.max_output.max(1));
        if needed > u64::from(self.limits.max_dict_size) {
            return Err(XzError::DictTooLarge {
                needed,
                limit: self.limits.max_dict_size,
            });
        }
        let needed = needed as usize;
        self.dict.buf.clear();
        self.dict.buf.resize(needed, 0);
        self.dict.pos = 0;
        self.dict.flushed = 0;
        self.dict.since_reset = 0;
        self.dict_buffer_len = self.dict_buffer_len.max(needed);

        let start_in = self.input.consumed;
        let start_out = self.out.total;
        self.lzma2()?;
        self.dict.flush(self.io, &mut self.out);
        if let Some(e) = self.out.err.take() {
            return Err(e);
        }
        let compressed = self.input.consumed.saturating_sub(start_in);
        let uncompressed = self.out.total.saturating_sub(start_out);
        if compressed_size.is_some_and(|s| s != compressed) {
            return Err(XzError::SizeMismatch("block compressed size"));
        }
        if uncompressed_size.is_some_and(|s| s != uncompressed) {
            return Err(XzError::SizeMismatch("block uncompressed size"));
        }
        // Block padding to a multiple of four, then the check.
        let mut padded = compressed;
        while padded & 3 != 0 {
            if self.byte()? != 0 {
                return Err(XzError::Corrupt("block padding is not zero"));
            }
            padded = padded.saturating_add(1);
        }
        let expected = self.out.check.finish(check_type)?;
        for want in expected {
            if self.byte()? != want {
                return Err(XzError::CheckMismatch);
            }
        }
        let unpadded = (header_len as u64)
            .saturating_add(compressed)
            .saturating_add(CheckState::size(check_type) as u64);
        Ok((unpadded, uncompressed))
    }

    /// Reads the index (its indicator byte already read) and compares it with the blocks;
    /// returns its size including the CRC.
    fn index(&mut self, blocks: IndexHash) -> Result<u64, XzError> {
        let start = self.input.consumed.saturating_sub(1);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[0]);
        let count = self.varint(&mut crc)?;
        let mut records = IndexHash::new();
        let mut i = 0u64;
        while i < count {
            let unpadded = self.varint(&mut crc)?;
            let uncompressed = self.varint(&mut crc)?;
            records.add(unpadded, uncompressed);
            i = i.saturating_add(1);
        }
        if records.digest() != blocks.digest() {
            return Err(XzError::SizeMismatch("index"));
        }
        while self.input.consumed.saturating_sub(start) & 3 != 0 {
            let b = self.byte()?;
            crc.update(&[b]);
            if b != 0 {
                return Err(XzError::SizeMismatch("index padding"));
            }
        }
        let stored = u32::from_le_bytes(self.bytes()?);
        if stored != crc.finalize() {
            return Err(XzError::HeaderCrc("index"));
        }
        Ok(self.input.consumed.saturating_sub(start))
    }

    /// The LZMA2 chunks of one block, up to the end marker.
    fn lzma2(&mut self) -> Result<(), XzError> {
        let mut need_dict_reset = true;
        let mut need_props = true;
        loop {
            let control = self.byte()?;
            if control == 0 {
                return Ok(());
            }
            if control >= 0xE0 || control == 0x01 {
                need_props = true;
                need_dict_reset = false;
                self.dict.reset(self.io, &mut self.out);
            } else if need_dict_reset {
                return Err(XzError::Corrupt(
                    "the first chunk does not reset the dictionary",
                ));
            }
            if control >= 0x80 {
                let [hi, lo] = self.bytes::<2>()?;
                let unpacked = u32::from(control & 0x1F)
                    .wrapping_shl(16)
                    .wrapping_add(u32::from(u16::from_be_bytes([hi, lo])))
                    .wrapping_add(1);
                let packed = u32::from(u16::from_be_bytes(self.bytes::<2>()?)).wrapping_add(1);
                if control >= 0xC0 {
                    let props = self.byte()?;
                    self.set_props(props)?;
                    need_props = false;
                } else if need_props {
                    return Err(XzError::Corrupt(
                        "an lzma chunk after a dictionary reset has no properties",
                    ));
                } else if control >= 0xA0 {
                    self.reset_state();
                }
                self.rc.left = packed;
                self.lzma_chunk(unpacked)?;
            } else {
                if control > 0x02 {
                    return Err(XzError::Corrupt("invalid chunk control byte"));
                }
                let size = u32::from(u16::from_be_bytes(self.bytes::<2>()?)).wrapping_add(1);
                for _ in 0..size {
                    let b = self.byte()?;
                    self.dict.put(b, self.io, &mut self.out);
                    if let Some(e) = self.out.err.take() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn set_props(&mut self, props: u8) -> Result<(), XzError> {
        if props > (4 * 5 + 4) * 9 + 8 {
            return Err(XzError::Corrupt("lzma properties are out of range"));
        }
        let pb = u32::from(props / 45);
        let rest = props % 45;
        let lp = u32::from(rest / 9);
        let lc = u32::from(rest % 9);
        if lc.saturating_add(lp) > 4 {
            return Err(XzError::Corrupt("lzma lc + lp is above 4"));
        }
        self.lc = lc;
        self.lp_mask = 1u32.wrapping_shl(lp).wrapping_sub(1);
        self.pb_mask = 1u32.wrapping_shl(pb).wrapping_sub(1);
        self.reset_state();
        Ok(())
    }

    fn reset_state(&mut self) {
        self.state = 0;
        self.reps = [0; 4];
        *self.probs = Probs::new();
        let used = 0x300usize.wrapping_shl(self.lc.saturating_add(self.lp_mask.count_ones()));
        for p in self.literal.iter_mut().take(used) {
            *p = PROB_INIT;
        }
    }

    fn lzma_chunk(&mut self, unpacked: u32) -> Result<(), XzError> {
        self.rc.range = u32::MAX;
        self.rc.code = 0;
        self.rc.overrun = false;
        self.ensure_input(5)?;
        if self.rc.next(&mut self.input) != 0 {
            return Err(XzError::Corrupt(
                "a range coder does not start with a zero byte",
            ));
        }
        for _ in 0..4 {
            self.rc.code = self.rc.code.wrapping_shl(8) | self.rc.next(&mut self.input);
        }
        let mut left = unpacked;
        while left > 0 {
            self.ensure_input(LZMA_IN_REQUIRED)?;
            let produced = self.symbol(left)?;
            if self.rc.overrun {
                break;
            }
            if let Some(e) = self.out.err.take() {
                return Err(e);
            }
            left = left.saturating_sub(produced);
        }
        self.rc.normalize(&mut self.input);
        if self.rc.overrun {
            return Err(if self.input.eof && self.input.available() == 0 {
                XzError::Truncated
            } else {
                XzError::Corrupt("a chunk needs more input than its header says")
            });
        }
        if self.rc.left != 0 || self.rc.code != 0 {
            return Err(XzError::Corrupt(
                "a chunk does not end where its header says",
            ));
        }
        Ok(())
    }

    /// Decodes one literal, match or repeated match; returns the bytes it produced.
    fn symbol(&mut self, left: u32) -> Result<u32, XzError> {
        let pos_state = (self.dict.since_reset as u32) & self.pb_mask;
        let state = self.state as usize;
        let state_pos = state.wrapping_mul(16).wrapping_add(pos_state as usize);
        let is_match = self
            .rc
            .bit(&mut self.input, self.probs.is_match.get_mut(state_pos));
        if is_match == 0 {
            self.literal();
            return Ok(1);
        }
        let len = if self
            .rc
            .bit(&mut self.input, self.probs.is_rep.get_mut(state))
            == 1
        {
            self.rep_match(pos_state)
        } else {
            self.new_match(pos_state)
        };
        if self.rc.overrun {
            return Ok(0);
        }
        if len > left {
            return Err(XzError::Corrupt("a match runs past the end of its chunk"));
        }
        let dist = self.reps[0];
        if u64::from(dist) >= self.dict.valid() {
            return Err(XzError::Corrupt(
                "a match reaches before the start of the data",
            ));
        }
        for _ in 0..len {
            let b = self.dict.get(dist);
            self.dict.put(b, self.io, &mut self.out);
        }
        Ok(len)
    }

    fn literal(&mut self) {
        let prev = u32::from(self.dict.get(0));
        let position = self.dict.since_reset as u32;
        let lit_state = (position & self.lp_mask)
            .wrapping_shl(self.lc)
            .wrapping_add(prev.wrapping_shr(8u32.wrapping_sub(self.lc)));
        let base = (lit_state as usize).wrapping_mul(0x300);
        let Some(probs) = self.literal.get_mut(base..base.saturating_add(0x300)) else {
            self.rc.overrun = true;
            return;
        };
        let symbol = if self.state < 7 {
            self.rc.bittree(&mut self.input, probs, 0x100)
        } else {
            let mut match_byte = u32::from(self.dict.get(self.reps[0])).wrapping_shl(1);
            let mut offset = 0x100u32;
            let mut symbol = 1u32;
            while symbol < 0x100 {
                let match_bit = match_byte & offset;
                match_byte = match_byte.wrapping_shl(1);
                let i = offset.wrapping_add(match_bit).wrapping_add(symbol);
                if self.rc.bit(&mut self.input, probs.get_mut(i as usize)) == 1 {
                    symbol = symbol.wrapping_shl(1).wrapping_add(1);
                    offset &= match_bit;
                } else {
                    symbol = symbol.wrapping_shl(1);
                    offset &= !match_bit;
                }
            }
            symbol.wrapping_sub(0x100)
        };
        self.dict.put(symbol as u8, self.io, &mut self.out);
        self.state = match self.state {
            0..=3 => 0,
            4..=9 => self.state.wrapping_sub(3),
            _ => self.state.wrapping_sub(6),
        };
    }

    fn match_len(&mut self, rep: bool, pos_state: u32) -> u32 {
        let lens = if rep {
            &mut self.probs.rep_len
        } else {
            &mut self.probs.match_len
        };
        let at = (pos_state as usize).wrapping_mul(8);
        if self.rc.bit(&mut self.input, Some(&mut lens.choice)) == 0 {
            let probs = lens
                .low
                .get_mut(at..at.saturating_add(8))
                .unwrap_or_default();
            2u32.wrapping_add(self.rc.bittree(&mut self.input, probs, 8))
        } else if self.rc.bit(&mut self.input, Some(&mut lens.choice2)) == 0 {
            let probs = lens
                .mid
                .get_mut(at..at.saturating_add(8))
                .unwrap_or_default();
            10u32.wrapping_add(self.rc.bittree(&mut self.input, probs, 8))
        } else {
            18u32.wrapping_add(self.rc.bittree(&mut self.input, &mut lens.high, 256))
        }
    }

    fn new_match(&mut self, pos_state: u32) -> u32 {
        self.state = if self.state < 7 { 7 } else { 10 };
        self.reps = [self.reps[0], self.reps[0], self.reps[1], self.reps[2]];
        let len = self.match_len(false, pos_state);
        let dist_state = (len.saturating_sub(2).min(3) as usize).wrapping_mul(64);
        let slot_probs = self
            .probs
            .dist_slot
            .get_mut(dist_state..dist_state.saturating_add(64))
            .unwrap_or_default();
        let slot = self.rc.bittree(&mut self.input, slot_probs, 64);
        let rep0 = if slot < 4 {
            slot
        } else {
            let bits = slot.wrapping_shr(1).wrapping_sub(1);
            let mut dist = 2u32.wrapping_add(slot & 1);
            if slot < 14 {
                dist = dist.wrapping_shl(bits);
                let base = dist.wrapping_sub(slot) as usize;
                self.rc.bittree_reverse(
                    &mut self.input,
                    &mut self.probs.dist_special,
                    base,
                    &mut dist,
                    bits,
                );
            } else {
                self.rc
                    .direct(&mut self.input, &mut dist, bits.wrapping_sub(4));
                dist = dist.wrapping_shl(4);
                self.rc.bittree_reverse(
                    &mut self.input,
                    &mut self.probs.dist_align,
                    1,
                    &mut dist,
                    4,
                );
            }
            dist
        };
        self.reps[0] = rep0;
        len
    }

    fn rep_match(&mut self, pos_state: u32) -> u32 {
        let state = self.state as usize;
        let state_pos = state.wrapping_mul(16).wrapping_add(pos_state as usize);
        if self
            .rc
            .bit(&mut self.input, self.probs.is_rep0.get_mut(state))
            == 0
        {
            if self
                .rc
                .bit(&mut self.input, self.probs.is_rep0_long.get_mut(state_pos))
                == 0
            {
                self.state = if self.state < 7 { 9 } else { 11 };
                return 1;
            }
        } else {
            let [rep0, rep1, rep2, rep3] = self.reps;
            if self
                .rc
                .bit(&mut self.input, self.probs.is_rep1.get_mut(state))
                == 0
            {
                self.reps = [rep1, rep0, rep2, rep3];
            } else if self
                .rc
                .bit(&mut self.input, self.probs.is_rep2.get_mut(state))
                == 0
            {
                self.reps = [rep2, rep0, rep1, rep3];
            } else {
                self.reps = [rep3, rep0, rep1, rep2];
            }
        }
        self.state = if self.state < 7 { 8 } else { 11 };
        self.match_len(true, pos_state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn crc64_check_value() {
        assert_eq!(crc64_update(0, b"123456789"), 0x995D_C9BB_DF19_39FA);
        let split = crc64_update(crc64_update(0, b"1234"), b"56789");
        assert_eq!(split, 0x995D_C9BB_DF19_39FA);
    }

    #[test]
    fn refuses_what_is_not_xz() {
        assert_eq!(
            decompress_to_vec(b"", &XzLimits::default()),
            Err(XzError::Truncated)
        );
        assert_eq!(
            decompress_to_vec(&[0u8; 32], &XzLimits::default()),
            Err(XzError::BadMagic)
        );
        assert_eq!(
            XzError::DictTooLarge {
                needed: 8 << 20,
                limit: 1 << 16
            }
            .to_string(),
            "xz dictionary needs a 8388608-byte buffer, more than the 65536-byte limit"
        );
    }

    #[test]
    fn fixed_state_is_small() {
        // 24 KiB of literal probabilities, 3.6 KiB of others, 1 KiB of input, the range coder.
        assert_eq!(FIXED_STATE_BYTES, 24_576 + 3_692 + 1_024 + 16);
        assert_eq!(working_memory(32 * 1024), 32 * 1024 + FIXED_STATE_BYTES);
    }
}
