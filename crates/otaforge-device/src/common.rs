//! What both OTA flavours share: a flash [`Region`] and the image size given to `begin`.

use crate::flash::SECTOR_SIZE;

/// A byte range of the flash (a partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

impl Region {
    pub const fn new(offset: u32, size: u32) -> Region {
        Region { offset, size }
    }

    /// One past the last byte, as a u64 so it cannot overflow.
    pub fn end(&self) -> u64 {
        u64::from(self.offset).saturating_add(u64::from(self.size))
    }

    /// Whether offset and size are both multiples of the 4 KiB sector.
    pub fn is_sector_aligned(&self) -> bool {
        is_aligned(self.offset) && is_aligned(self.size)
    }

    /// Whether the two regions share a byte.
    pub fn overlaps(&self, other: &Region) -> bool {
        u64::from(self.offset) < other.end() && u64::from(other.offset) < self.end()
    }

    /// The flash offset of `rel` bytes into the region, when it is inside the region (or its
    /// end).
    pub fn at(&self, rel: u32) -> Option<u32> {
        if rel <= self.size {
            self.offset.checked_add(rel)
        } else {
            None
        }
    }
}

/// The image size announced to `begin`, as `esp_ota_begin` and `wm_ota_ops_begin` take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageSize {
    /// The image is this many bytes: the sectors it covers are erased up front.
    Known(u32),
    /// `OTA_SIZE_UNKNOWN` (or 0): the whole partition is erased up front.
    Unknown,
    /// `OTA_WITH_SEQUENTIAL_WRITES`: nothing is erased up front, each write erases the sectors
    /// it reaches.
    Sequential,
}

impl ImageSize {
    /// `OTA_SIZE_UNKNOWN` of both SDKs.
    pub const RAW_UNKNOWN: u32 = 0xFFFF_FFFF;
    /// `OTA_WITH_SEQUENTIAL_WRITES` of both SDKs.
    pub const RAW_SEQUENTIAL: u32 = 0xFFFF_FFFE;

    /// The size as the C APIs take it: 0 and `0xFFFFFFFF` mean unknown, `0xFFFFFFFE` sequential.
    pub fn from_raw(raw: u32) -> ImageSize {
        match raw {
            0 | Self::RAW_UNKNOWN => ImageSize::Unknown,
            Self::RAW_SEQUENTIAL => ImageSize::Sequential,
            n => ImageSize::Known(n),
        }
    }
}

/// Whether `x` is a multiple of the 4 KiB sector.
pub(crate) fn is_aligned(x: u32) -> bool {
    x & (SECTOR_SIZE - 1) == 0
}

/// Rounds `len` up to a whole number of sectors (saturating at the largest aligned u32).
pub(crate) fn sector_ceil(len: u32) -> u32 {
    match len.checked_next_multiple_of(SECTOR_SIZE) {
        Some(v) => v,
        None => u32::MAX - (SECTOR_SIZE - 1),
    }
}
