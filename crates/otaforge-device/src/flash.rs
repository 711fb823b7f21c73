//! The flash a device boots from: the [`Flash`] trait with NOR semantics (an erase sets a 4 KiB
//! sector to 0xFF, a write can only clear bits), [`SimFlash`] (sparse, counts operations, loses
//! power on request) and, with `std`, [`FileFlash`] over a file.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::string::String;
use alloc::sync::Arc;

use crate::common::is_aligned;

#[cfg(feature = "std")]
mod file;
#[cfg(feature = "std")]
pub use file::FileFlash;

/// Size of an erase sector.
pub const SECTOR_SIZE: u32 = 4096;
const SECTOR_LEN: usize = SECTOR_SIZE as usize;

/// Why a flash operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlashError {
    #[error(
        "flash access of {len} bytes at {offset:#x} runs past the end of the {size:#x}-byte flash"
    )]
    OutOfBounds { offset: u32, len: usize, size: u32 },
    #[error("flash offset {offset:#x} is not aligned to a 4 KiB sector")]
    Misaligned { offset: u32 },
    #[error("flash write at {offset:#x} would set bits that only an erase can set")]
    WouldSetBits { offset: u32 },
    #[error("power was lost: the flash operation did not complete")]
    PowerLoss,
    #[error("flash file i/o failed: {0}")]
    Io(String),
}

/// A NOR flash.
pub trait Flash {
    /// Size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u32;
    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), FlashError>;
    /// NOR semantics: a write can only clear bits; writing a 1 over a 0 is refused
    /// ([`FlashError::WouldSetBits`]) and nothing is written.
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), FlashError>;
    /// Sets one 4 KiB sector (offset aligned) to 0xFF.
    fn erase_sector(&mut self, offset: u32) -> Result<(), FlashError>;
}

impl<F: Flash + ?Sized> Flash for &mut F {
    fn size(&self) -> u32 {
        (**self).size()
    }
    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), FlashError> {
        (**self).read(offset, buf)
    }
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), FlashError> {
        (**self).write(offset, data)
    }
    fn erase_sector(&mut self, offset: u32) -> Result<(), FlashError> {
        (**self).erase_sector(offset)
    }
}

/// Erases the sectors of `[offset, offset + len)`; `offset` must be sector aligned, `len` is
/// rounded up to whole sectors.
pub fn erase_range<F: Flash + ?Sized>(
    flash: &mut F,
    offset: u32,
    len: u32,
) -> Result<(), FlashError> {
    if !is_aligned(offset) {
        return Err(FlashError::Misaligned { offset });
    }
    check_range(flash.size(), offset, len as usize)?;
    let mut at = u64::from(offset);
    let end = u64::from(offset).saturating_add(u64::from(len));
    while at < end {
        let sector = u32::try_from(at).map_err(|_| FlashError::OutOfBounds {
            offset,
            len: len as usize,
            size: flash.size(),
        })?;
        flash.erase_sector(sector)?;
        at = at.saturating_add(u64::from(SECTOR_SIZE));
    }
    Ok(())
}

/// `Ok` when `[offset, offset + len)` lies inside a flash of `size` bytes.
pub(crate) fn check_range(size: u32, offset: u32, len: usize) -> Result<(), FlashError> {
    let end = u64::from(offset).saturating_add(len as u64);
    if end > u64::from(size) {
        Err(FlashError::OutOfBounds { offset, len, size })
    } else {
        Ok(())
    }
}

/// What a write interrupted by power loss leaves in the flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WriteCut {
    /// None of its bytes.
    Nothing,
    /// The first half of its bytes (rounded down).
    #[default]
    FirstHalf,
    /// All of its bytes (power went as the write completed, before it was acknowledged).
    All,
}

/// What an erase interrupted by power loss leaves in the sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum EraseCut {
    /// The sector as it was.
    Untouched,
    /// The first 2 KiB erased, the rest as it was.
    #[default]
    FirstHalf,
    /// The whole sector erased.
    Erased,
}

/// How a cut operation damages the flash; deterministic, so every run of a test is the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CutEffect {
    pub write: WriteCut,
    pub erase: EraseCut,
}

impl CutEffect {
    pub const fn new(write: WriteCut, erase: EraseCut) -> CutEffect {
        CutEffect { write, erase }
    }

    /// Every combination, for tests that sweep them all.
    pub const ALL: [CutEffect; 9] = {
        const fn e(write: WriteCut, erase: EraseCut) -> CutEffect {
            CutEffect { write, erase }
        }
        use EraseCut::{Erased, FirstHalf as EraseHalf, Untouched};
        use WriteCut::{All, FirstHalf, Nothing};
        [
            e(Nothing, Untouched),
            e(Nothing, EraseHalf),
            e(Nothing, Erased),
            e(FirstHalf, Untouched),
            e(FirstHalf, EraseHalf),
            e(FirstHalf, Erased),
            e(All, Untouched),
            e(All, EraseHalf),
            e(All, Erased),
        ]
    };
}

/// A sector's bytes, shared copy-on-write: clones of a flash, and flashes whose sectors
/// went through one [`SectorPool`], hold one copy of equal sectors.
type Sector = Arc<[u8; SECTOR_LEN]>;

/// Sectors seen by [`SimFlash::share_sectors`], one copy of each content: a fleet of
/// simulated devices that run the same images keeps those images' sectors once.
#[derive(Default)]
pub struct SectorPool {
    sectors: BTreeSet<Sector>,
}

impl SectorPool {
    /// At most this many distinct sectors are kept (256 MiB); beyond it a flash keeps its own.
    pub const MAX_SECTORS: usize = 65_536;

    /// Distinct sectors held.
    pub fn len(&self) -> usize {
        self.sectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sectors.is_empty()
    }
}

/// An in-memory NOR flash for tests and the fleet simulator.
///
/// Sparse: only sectors holding a byte other than 0xFF use memory (4 KiB each), so an erased
/// 4 MiB flash costs a few bytes. Every write and every erase call counts as one operation
/// ([`SimFlash::ops`]); reads are free. [`SimFlash::set_power_cut`] makes a chosen operation
/// fail with [`FlashError::PowerLoss`], leaving the damage [`CutEffect`] describes, and every
/// operation after it fails until [`SimFlash::restore_power`].
#[derive(Clone, PartialEq, Eq)]
pub struct SimFlash {
    size: u32,
    sectors: BTreeMap<u32, Sector>,
    /// The sector the last write went into (still being filled, for all we know).
    last_written: Option<u32>,
    ops: u64,
    cut_in: Option<u64>,
    powered: bool,
    effect: CutEffect,
}

impl SimFlash {
    /// An erased flash of `size` bytes (a multiple of 4 KiB).
    pub fn new(size: u32) -> Result<SimFlash, FlashError> {
        if !is_aligned(size) {
            return Err(FlashError::Misaligned { offset: size });
        }
        Ok(SimFlash {
            size,
            sectors: BTreeMap::new(),
            last_written: None,
            ops: 0,
            cut_in: None,
            powered: true,
            effect: CutEffect::default(),
        })
    }

    /// Write and erase calls so far (refused calls do not count).
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Bytes of sector contents this flash holds (4 KiB per non-erased sector, counted
    /// whether or not another flash shares it).
    pub fn resident_bytes(&self) -> usize {
        self.sectors.len().saturating_mul(SECTOR_LEN)
    }

    /// Makes every sector whose content `pool` already holds share the pool's copy, and
    /// adds the others to it (up to [`SectorPool::MAX_SECTORS`]). Reads and writes are
    /// unchanged: a later write to a shared sector copies it first.
    pub fn share_sectors(&mut self, pool: &mut SectorPool) {
        self.share(pool, None);
    }

    /// [`Self::share_sectors`] but for the sector the last write went into: what a download
    /// has written so far, less the sector it is filling.
    pub fn share_written_sectors(&mut self, pool: &mut SectorPool) {
        self.share(pool, self.last_written);
    }

    fn share(&mut self, pool: &mut SectorPool, except: Option<u32>) {
        for (index, sector) in self.sectors.iter_mut() {
            if Some(*index) == except {
                continue;
            }
            match pool.sectors.get(&**sector) {
                Some(shared) if !Arc::ptr_eq(shared, sector) => *sector = shared.clone(),
                Some(_) => {}
                None if pool.sectors.len() < SectorPool::MAX_SECTORS => {
                    pool.sectors.insert(sector.clone());
                }
                None => {}
            }
        }
    }

    /// `Some(n)`: the operation `n` operations from now fails with power loss (`Some(0)` is
    /// the next one). `None` cancels a pending cut.
    pub fn set_power_cut(&mut self, after: Option<u64>) {
        self.cut_in = after;
    }

    /// What a cut operation leaves behind.
    pub fn set_cut_effect(&mut self, effect: CutEffect) {
        self.effect = effect;
    }

    /// Powers the flash again after a cut.
    pub fn restore_power(&mut self) {
        self.powered = true;
    }

    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// Counts an operation that passed its checks; `true` when power is lost during it.
    fn begin_op(&mut self) -> bool {
        self.ops = self.ops.saturating_add(1);
        match self.cut_in {
            Some(0) => {
                self.cut_in = None;
                self.powered = false;
                true
            }
            Some(n) => {
                self.cut_in = Some(n.saturating_sub(1));
                false
            }
            None => false,
        }
    }

    fn powered(&self) -> Result<(), FlashError> {
        if self.powered {
            Ok(())
        } else {
            Err(FlashError::PowerLoss)
        }
    }

    /// Calls `f(sector_index, offset_in_sector, range_in_data)` for each sector piece of
    /// `[offset, offset + len)`, which the caller has bounds-checked.
    fn pieces(offset: u32, len: usize, mut f: impl FnMut(u32, usize, core::ops::Range<usize>)) {
        let mut done = 0usize;
        while done < len {
            let at = (offset as usize).saturating_add(done);
            let index = (at / SECTOR_LEN) as u32;
            let in_sector = at % SECTOR_LEN;
            let n = (SECTOR_LEN.saturating_sub(in_sector)).min(len.saturating_sub(done));
            f(index, in_sector, done..done.saturating_add(n));
            done = done.saturating_add(n);
        }
    }

    /// Writes without checks (the caller checked bounds and NOR rules).
    fn put(&mut self, offset: u32, data: &[u8]) {
        if let Some(last) = (data.len() as u32).checked_sub(1) {
            self.last_written = Some(offset.saturating_add(last) / SECTOR_SIZE);
        }
        let sectors = &mut self.sectors;
        Self::pieces(offset, data.len(), |index, in_sector, range| {
            let Some(piece) = data.get(range) else {
                return;
            };
            if piece.iter().all(|&b| b == 0xFF) {
                return;
            }
            let sector = sectors
                .entry(index)
                .or_insert_with(|| Arc::new([0xFF; SECTOR_LEN]));
            let sector = Arc::make_mut(sector);
            if let Some(dst) = sector.get_mut(in_sector..in_sector.saturating_add(piece.len())) {
                for (d, s) in dst.iter_mut().zip(piece) {
                    *d &= *s;
                }
            }
        });
    }
}

impl core::fmt::Debug for SimFlash {
    /// Sizes and counters, not the 4 KiB sectors.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimFlash")
            .field("size", &self.size)
            .field("resident_sectors", &self.sectors.len())
            .field("ops", &self.ops)
            .field("cut_in", &self.cut_in)
            .field("powered", &self.powered)
            .field("effect", &self.effect)
            .finish()
    }
}

impl Flash for SimFlash {
    fn size(&self) -> u32 {
        self.size
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), FlashError> {
        self.powered()?;
        check_range(self.size, offset, buf.len())?;
        let sectors = &self.sectors;
        Self::pieces(offset, buf.len(), |index, in_sector, range| {
            let Some(dst) = buf.get_mut(range) else {
                return;
            };
            match sectors
                .get(&index)
                .and_then(|s| s.get(in_sector..in_sector.saturating_add(dst.len())))
            {
                Some(src) => dst.copy_from_slice(src),
                None => dst.fill(0xFF),
            }
        });
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), FlashError> {
        self.powered()?;
        check_range(self.size, offset, data.len())?;
        // NOR: every 1 bit to write must still be 1 in the flash.
        let mut first_bad = None;
        let sectors = &self.sectors;
        Self::pieces(offset, data.len(), |index, in_sector, range| {
            if first_bad.is_some() {
                return;
            }
            let (Some(sector), Some(piece)) = (sectors.get(&index), data.get(range.clone())) else {
                return;
            };
            let old = sector
                .get(in_sector..in_sector.saturating_add(piece.len()))
                .unwrap_or_default();
            if let Some(i) = old.iter().zip(piece).position(|(o, n)| o & n != *n) {
                first_bad = Some(range.start.saturating_add(i));
            }
        });
        if let Some(i) = first_bad {
            return Err(FlashError::WouldSetBits {
                offset: offset.saturating_add(i as u32),
            });
        }
        if self.begin_op() {
            let kept = match self.effect.write {
                WriteCut::Nothing => 0,
                WriteCut::FirstHalf => data.len() / 2,
                WriteCut::All => data.len(),
            };
            self.put(offset, data.get(..kept).unwrap_or_default());
            return Err(FlashError::PowerLoss);
        }
        self.put(offset, data);
        Ok(())
    }

    fn erase_sector(&mut self, offset: u32) -> Result<(), FlashError> {
        self.powered()?;
        if !is_aligned(offset) {
            return Err(FlashError::Misaligned { offset });
        }
        check_range(self.size, offset, SECTOR_LEN)?;
        let index = offset / SECTOR_SIZE;
        if self.begin_op() {
            match self.effect.erase {
                EraseCut::Untouched => {}
                EraseCut::Erased => {
                    self.sectors.remove(&index);
                }
                EraseCut::FirstHalf => {
                    if let Some(sector) = self.sectors.get_mut(&index) {
                        let sector = Arc::make_mut(sector);
                        if let Some(half) = sector.get_mut(..SECTOR_LEN / 2) {
                            half.fill(0xFF);
                        }
                        if sector.iter().all(|&b| b == 0xFF) {
                            self.sectors.remove(&index);
                        }
                    }
                }
            }
            return Err(FlashError::PowerLoss);
        }
        self.sectors.remove(&index);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn shared_sectors_are_copied_on_write() {
        let mut pool = SectorPool::default();
        let image: alloc::vec::Vec<u8> = (0..3 * SECTOR_LEN).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = (
            SimFlash::new(64 * 1024).unwrap(),
            SimFlash::new(64 * 1024).unwrap(),
        );
        a.write(0x1000, &image).unwrap();
        b.write(0x1000, &image).unwrap();
        a.share_sectors(&mut pool);
        b.share_sectors(&mut pool);
        assert_eq!(pool.len(), 3, "equal sectors are kept once");
        for (x, y) in a.sectors.values().zip(b.sectors.values()) {
            assert!(Arc::ptr_eq(x, y));
        }
        // A write to b's shared sector leaves a's bytes alone.
        b.erase_sector(0x1000).unwrap();
        b.write(0x1000, &[0x00; 16]).unwrap();
        let mut buf = [0u8; 16];
        a.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf[..], &image[..16]);
        b.read(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert_eq!(a.resident_bytes(), 3 * SECTOR_LEN);
    }

    #[test]
    fn erased_flash_reads_ff_and_costs_nothing() {
        let mut f = SimFlash::new(4 * 1024 * 1024).unwrap();
        let mut buf = [0u8; 100];
        f.read(0x1234, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xFF));
        assert_eq!(f.resident_bytes(), 0);
        assert_eq!(f.ops(), 0);
        assert_eq!(
            SimFlash::new(4095).unwrap_err().to_string(),
            "flash offset 0xfff is not aligned to a 4 KiB sector"
        );
    }

    #[test]
    fn nor_writes_only_clear_bits() {
        let mut f = SimFlash::new(0x4000).unwrap();
        f.write(0xFFE, &[0xF0, 0x0F, 0xAA, 0x55]).unwrap();
        assert_eq!(f.resident_bytes(), 2 * 4096);
        let mut buf = [0u8; 4];
        f.read(0xFFE, &mut buf).unwrap();
        assert_eq!(buf, [0xF0, 0x0F, 0xAA, 0x55]);
        // Clearing more bits is fine.
        f.write(0xFFE, &[0x80, 0x0F, 0x00, 0x55]).unwrap();
        // Setting a bit is refused, and nothing of the refused write lands.
        let err = f.write(0xFFE, &[0x00, 0x00, 0x01, 0x00]).unwrap_err();
        assert_eq!(err, FlashError::WouldSetBits { offset: 0x1000 });
        assert_eq!(
            err.to_string(),
            "flash write at 0x1000 would set bits that only an erase can set"
        );
        f.read(0xFFE, &mut buf).unwrap();
        assert_eq!(buf, [0x80, 0x0F, 0x00, 0x55]);
        assert_eq!(f.ops(), 2, "refused writes are not operations");
        // After an erase the sector takes anything.
        f.erase_sector(0x1000).unwrap();
        f.write(0x1000, &[0x01]).unwrap();
        f.read(0xFFE, &mut buf).unwrap();
        assert_eq!(buf, [0x80, 0x0F, 0x01, 0xFF]);
        assert_eq!(f.ops(), 4);
    }

    #[test]
    fn bounds_and_alignment() {
        let mut f = SimFlash::new(0x2000).unwrap();
        assert_eq!(
            f.write(0x1FFF, &[0, 0]).unwrap_err().to_string(),
            "flash access of 2 bytes at 0x1fff runs past the end of the 0x2000-byte flash"
        );
        assert!(matches!(
            f.read(u32::MAX, &mut [0u8; 2]),
            Err(FlashError::OutOfBounds { .. })
        ));
        assert_eq!(
            f.erase_sector(0x800),
            Err(FlashError::Misaligned { offset: 0x800 })
        );
        assert!(matches!(
            f.erase_sector(0x2000),
            Err(FlashError::OutOfBounds { .. })
        ));
        erase_range(&mut f, 0, 0x2000).unwrap();
        assert_eq!(f.ops(), 2);
        assert!(erase_range(&mut f, 0, 0x2001).is_err());
    }

    #[test]
    fn power_cut_at_the_nth_operation() {
        let mut f = SimFlash::new(0x3000).unwrap();
        f.set_cut_effect(CutEffect {
            write: WriteCut::FirstHalf,
            erase: EraseCut::Untouched,
        });
        f.set_power_cut(Some(1));
        f.write(0, &[0; 8]).unwrap();
        assert_eq!(f.write(0x1000, &[0; 8]), Err(FlashError::PowerLoss));
        assert!(!f.is_powered());
        // Everything fails until power comes back, reads included; nothing is counted.
        assert_eq!(f.erase_sector(0), Err(FlashError::PowerLoss));
        assert_eq!(f.read(0, &mut [0u8; 1]), Err(FlashError::PowerLoss));
        assert_eq!(f.ops(), 2);
        f.restore_power();
        let mut buf = [0u8; 8];
        f.read(0x1000, &mut buf).unwrap();
        assert_eq!(
            buf,
            [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF],
            "first half written"
        );
        // A cut erase with `Untouched` leaves the sector as it was.
        f.set_power_cut(Some(0));
        assert_eq!(f.erase_sector(0), Err(FlashError::PowerLoss));
        f.restore_power();
        f.read(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 8]);
    }

    #[test]
    fn cut_erase_effects() {
        for (effect, first, second) in [
            (EraseCut::Untouched, 0x00, 0x00),
            (EraseCut::FirstHalf, 0xFF, 0x00),
            (EraseCut::Erased, 0xFF, 0xFF),
        ] {
            let mut f = SimFlash::new(0x1000).unwrap();
            f.write(0, &vec![0u8; 4096]).unwrap();
            f.set_cut_effect(CutEffect {
                write: WriteCut::All,
                erase: effect,
            });
            f.set_power_cut(Some(0));
            assert_eq!(f.erase_sector(0), Err(FlashError::PowerLoss));
            f.restore_power();
            let mut a = [0u8; 1];
            let mut b = [0u8; 1];
            f.read(0, &mut a).unwrap();
            f.read(0x800, &mut b).unwrap();
            assert_eq!((a[0], b[0]), (first, second), "{effect:?}");
        }
        assert_eq!(CutEffect::ALL.len(), 9);
        assert_eq!(CutEffect::ALL[0].write, WriteCut::Nothing);
        assert_eq!(CutEffect::ALL[8].erase, EraseCut::Erased);
    }

    #[test]
    fn sparse_storage_stays_sparse() {
        let mut f = SimFlash::new(16 * 1024 * 1024).unwrap();
        f.write(0x80_0000, &[0xFF; 8192]).unwrap();
        assert_eq!(
            f.resident_bytes(),
            0,
            "writing 0xFF over erased flash stores nothing"
        );
        f.write(0x80_0000, &[1]).unwrap();
        assert_eq!(f.resident_bytes(), 4096);
        f.erase_sector(0x80_0000).unwrap();
        assert_eq!(f.resident_bytes(), 0);
    }
}
