//! ESP-IDF otadata (`esp_ota_select_entry_t`): the two 32-byte entries that pick the OTA slot
//! to boot, their CRC, and the bootloader's choice between them.
//!
//! ```text
//! otadata partition (0x2000 bytes): entry 0 at +0x0000, entry 1 at +0x1000, rest 0xFF
//! entry: ota_seq u32, seq_label[20] (0xFF), ota_state u32, crc u32
//!        crc = CRC-32 (zlib) of the 4 little-endian bytes of ota_seq, seeded with 0xFFFFFFFF
//! ```

use core::fmt;

use crate::bytes::{array, put, put_u32, u32_at};

/// Size of the otadata partition.
pub const OTADATA_LEN: usize = 0x2000;
/// Offset of the second entry (one flash sector per entry).
pub const SECOND_ENTRY_OFFSET: usize = 0x1000;
/// Size of one entry.
pub const ENTRY_LEN: usize = 32;

/// `esp_ota_img_states_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OtaState {
    /// Just written; the bootloader turns it into `PendingVerify` at the next boot.
    New,
    /// Booted once, waiting for the app to mark it valid; rolled back to `Aborted` at the next
    /// boot if not.
    PendingVerify,
    Valid,
    Invalid,
    Aborted,
    /// Erased flash: rollback not in use.
    Undefined,
    /// Any other value.
    Other(u32),
}

impl OtaState {
    pub fn from_u32(value: u32) -> OtaState {
        match value {
            0 => OtaState::New,
            1 => OtaState::PendingVerify,
            2 => OtaState::Valid,
            3 => OtaState::Invalid,
            4 => OtaState::Aborted,
            0xFFFF_FFFF => OtaState::Undefined,
            other => OtaState::Other(other),
        }
    }

    pub fn as_u32(self) -> u32 {
        match self {
            OtaState::New => 0,
            OtaState::PendingVerify => 1,
            OtaState::Valid => 2,
            OtaState::Invalid => 3,
            OtaState::Aborted => 4,
            OtaState::Undefined => 0xFFFF_FFFF,
            OtaState::Other(value) => value,
        }
    }
}

/// CRC of an entry: `binascii.crc32(seq.to_le_bytes(), 0xFFFFFFFF)`, as the ESP-IDF
/// bootloader computes with `esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)`.
pub fn seq_crc(seq: u32) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(0xFFFF_FFFF);
    hasher.update(&seq.to_le_bytes());
    hasher.finalize()
}

/// One `esp_ota_select_entry_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtaSelectEntry {
    pub seq: u32,
    /// `seq_label[20]`, unused by ESP-IDF and left 0xFF.
    pub label: [u8; 20],
    pub state: OtaState,
    pub crc: u32,
}

/// Why bytes are not otadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtadataError {
    /// Fewer bytes than an entry (or than the two entries of the partition) need.
    TooShort { needed: usize, len: usize },
}

impl fmt::Display for OtadataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OtadataError::TooShort { needed, len } => write!(
                f,
                "otadata is {len:#x} bytes, too short: {needed:#x} bytes are needed"
            ),
        }
    }
}

impl core::error::Error for OtadataError {}

impl OtaSelectEntry {
    /// An entry as `esp_ota_set_boot_partition` writes it: label 0xFF, CRC computed.
    pub fn new(seq: u32, state: OtaState) -> OtaSelectEntry {
        OtaSelectEntry {
            seq,
            label: [0xFF; 20],
            state,
            crc: seq_crc(seq),
        }
    }

    /// Erased flash: every byte 0xFF.
    pub fn erased() -> OtaSelectEntry {
        OtaSelectEntry::parse(&[0xFF; ENTRY_LEN]).unwrap_or(OtaSelectEntry {
            seq: u32::MAX,
            label: [0xFF; 20],
            state: OtaState::Undefined,
            crc: u32::MAX,
        })
    }

    /// Parses the 32-byte entry at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<OtaSelectEntry, OtadataError> {
        let e: [u8; ENTRY_LEN] = array(bytes, 0).ok_or(OtadataError::TooShort {
            needed: ENTRY_LEN,
            len: bytes.len(),
        })?;
        Ok(OtaSelectEntry {
            seq: u32_at(&e, 0).unwrap_or_default(),
            label: array(&e, 4).unwrap_or([0xFF; 20]),
            state: OtaState::from_u32(u32_at(&e, 24).unwrap_or_default()),
            crc: u32_at(&e, 28).unwrap_or_default(),
        })
    }

    /// The 32 bytes of the entry, with the stored `crc` field as it is.
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut e = [0u8; ENTRY_LEN];
        put_u32(&mut e, 0, self.seq);
        put(&mut e, 4, &self.label);
        put_u32(&mut e, 24, self.state.as_u32());
        put_u32(&mut e, 28, self.crc);
        e
    }

    /// Whether the stored CRC matches `seq`.
    pub fn crc_ok(&self) -> bool {
        self.crc == seq_crc(self.seq)
    }

    /// Whether the bootloader may pick this entry: `seq` is not 0xFFFFFFFF, the state is not
    /// `Invalid` or `Aborted`, and the CRC matches.
    pub fn is_valid(&self) -> bool {
        self.seq != u32::MAX
            && !matches!(self.state, OtaState::Invalid | OtaState::Aborted)
            && self.crc_ok()
    }
}

/// Reads both entries of an otadata partition (at +0 and +0x1000).
pub fn parse_otadata(bytes: &[u8]) -> Result<[OtaSelectEntry; 2], OtadataError> {
    let needed = SECOND_ENTRY_OFFSET.saturating_add(ENTRY_LEN);
    let too_short = OtadataError::TooShort {
        needed,
        len: bytes.len(),
    };
    let second = bytes.get(SECOND_ENTRY_OFFSET..).ok_or(too_short.clone())?;
    Ok([
        OtaSelectEntry::parse(bytes).map_err(|_| too_short.clone())?,
        OtaSelectEntry::parse(second).map_err(|_| too_short)?,
    ])
}

/// The 0x2000 bytes of an otadata partition holding these two entries, 0xFF elsewhere.
pub fn encode_otadata(entries: &[OtaSelectEntry; 2]) -> [u8; OTADATA_LEN] {
    let mut out = [0xFF; OTADATA_LEN];
    put(&mut out, 0, &entries[0].encode());
    put(&mut out, SECOND_ENTRY_OFFSET, &entries[1].encode());
    out
}

/// The entry the bootloader follows and the OTA slot it boots, or `None` when neither entry is
/// valid (or there are no OTA slots) and the factory app boots.
///
/// Follows `bootloader_common_get_active_otadata`: of the valid entries the one with the higher
/// `seq` wins, entry 0 on a tie; the slot is `(seq - 1) % num_ota_slots` with the C wrapping of
/// `seq - 1` for `seq == 0`.
pub fn select_boot(entries: &[OtaSelectEntry; 2], num_ota_slots: usize) -> Option<(usize, usize)> {
    let slots = u32::try_from(num_ota_slots).ok().filter(|&n| n > 0)?;
    let [a, b] = entries;
    let index = match (a.is_valid(), b.is_valid()) {
        (true, true) => {
            if a.seq >= b.seq {
                0
            } else {
                1
            }
        }
        (true, false) => 0,
        (false, true) => 1,
        (false, false) => return None,
    };
    let seq = if index == 0 { a.seq } else { b.seq };
    let slot = seq.wrapping_sub(1).checked_rem(slots)?;
    Some((index, slot as usize))
}

/// The entry index and the sequence number to write to boot OTA slot `slot` next, as
/// `esp_ota_set_boot_partition` does: the smallest seq above the current highest valid one that
/// maps to `slot`, written over the entry that is not currently active.
pub fn next_boot_entry(
    entries: &[OtaSelectEntry; 2],
    slot: usize,
    num_ota_slots: usize,
) -> Option<(usize, OtaSelectEntry)> {
    let slots = u32::try_from(num_ota_slots).ok().filter(|&n| n > 0)?;
    let slot = u32::try_from(slot).ok().filter(|&s| s < slots)?;
    let active = select_boot(entries, num_ota_slots).map(|(i, _)| i);
    let current = match active {
        Some(0) => entries[0].seq,
        Some(_) => entries[1].seq,
        None => 0,
    };
    // seq such that (seq - 1) % slots == slot and seq > current.
    let mut seq = current.checked_add(1)?;
    while seq.wrapping_sub(1).checked_rem(slots)? != slot {
        seq = seq.checked_add(1)?;
    }
    let index = match active {
        Some(0) => 1,
        _ => 0,
    };
    Some((index, OtaSelectEntry::new(seq, OtaState::New)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn crc_vectors() {
        assert_eq!(seq_crc(1), 0x4743_989A);
        assert_eq!(seq_crc(2), 0x55F6_3774);
    }

    #[test]
    fn entry_layout() {
        let e = OtaSelectEntry::new(1, OtaState::Valid);
        let b = e.encode();
        assert_eq!(&b[0..4], &[1, 0, 0, 0]);
        assert_eq!(&b[4..24], &[0xFF; 20]);
        assert_eq!(&b[24..28], &[2, 0, 0, 0]);
        assert_eq!(&b[28..32], &0x4743_989Au32.to_le_bytes());
        assert_eq!(OtaSelectEntry::parse(&b).unwrap(), e);
        assert!(e.is_valid());
    }

    #[test]
    fn states_round_trip() {
        for v in [0, 1, 2, 3, 4, 5, 0x1234, 0xFFFF_FFFE, 0xFFFF_FFFF] {
            assert_eq!(OtaState::from_u32(v).as_u32(), v);
        }
        assert_eq!(OtaState::from_u32(2), OtaState::Valid);
        assert_eq!(OtaState::from_u32(9), OtaState::Other(9));
    }

    #[test]
    fn validity() {
        assert!(!OtaSelectEntry::erased().is_valid());
        assert_eq!(OtaSelectEntry::erased().state, OtaState::Undefined);
        assert!(!OtaSelectEntry::new(3, OtaState::Invalid).is_valid());
        assert!(!OtaSelectEntry::new(3, OtaState::Aborted).is_valid());
        assert!(OtaSelectEntry::new(3, OtaState::PendingVerify).is_valid());
        assert!(OtaSelectEntry::new(3, OtaState::Undefined).is_valid());
        let mut bad_crc = OtaSelectEntry::new(3, OtaState::Valid);
        bad_crc.crc ^= 1;
        assert!(!bad_crc.is_valid());
        assert!(!OtaSelectEntry::new(u32::MAX, OtaState::Valid).is_valid());
    }

    #[test]
    fn boot_selection() {
        let erased = OtaSelectEntry::erased();
        assert_eq!(select_boot(&[erased, erased], 2), None);
        let one = OtaSelectEntry::new(1, OtaState::Undefined);
        let two = OtaSelectEntry::new(2, OtaState::Undefined);
        assert_eq!(select_boot(&[one, erased], 2), Some((0, 0)));
        assert_eq!(select_boot(&[one, two], 2), Some((1, 1)));
        assert_eq!(
            select_boot(&[OtaSelectEntry::new(3, OtaState::New), two], 2),
            Some((0, 0))
        );
        // The higher one aborted: fall back to the other.
        assert_eq!(
            select_boot(&[one, OtaSelectEntry::new(2, OtaState::Aborted)], 2),
            Some((0, 0))
        );
        // Tie: entry 0.
        assert_eq!(select_boot(&[two, two], 2), Some((0, 1)));
        // seq 5 with 3 slots boots slot (5-1) % 3 = 1.
        assert_eq!(
            select_boot(&[OtaSelectEntry::new(5, OtaState::Valid), erased], 3),
            Some((0, 1))
        );
        // No OTA slots.
        assert_eq!(select_boot(&[one, two], 0), None);
        // seq 0 wraps as in C.
        let zero = OtaSelectEntry::new(0, OtaState::Valid);
        assert_eq!(select_boot(&[zero, erased], 2), Some((0, 1)));
    }

    #[test]
    fn next_entry_like_esp_ota_set_boot_partition() {
        let erased = OtaSelectEntry::erased();
        let (i, e) = next_boot_entry(&[erased, erased], 0, 2).unwrap();
        assert_eq!((i, e.seq, e.state), (0, 1, OtaState::New));
        let entries = [e, erased];
        let (i, e) = next_boot_entry(&entries, 1, 2).unwrap();
        assert_eq!((i, e.seq), (1, 2));
        let entries = [entries[0], e];
        assert_eq!(select_boot(&entries, 2), Some((1, 1)));
        let (i, e) = next_boot_entry(&entries, 1, 2).unwrap();
        assert_eq!((i, e.seq), (0, 4));
        assert_eq!(next_boot_entry(&entries, 2, 2), None);
    }

    #[test]
    fn partition_round_trip() {
        let entries = [
            OtaSelectEntry::new(7, OtaState::PendingVerify),
            OtaSelectEntry::erased(),
        ];
        let bytes = encode_otadata(&entries);
        assert_eq!(bytes.len(), 0x2000);
        assert!(bytes[32..0x1000].iter().all(|&b| b == 0xFF));
        assert_eq!(parse_otadata(&bytes).unwrap(), entries);
        assert_eq!(
            parse_otadata(&bytes[..0x1010]).unwrap_err().to_string(),
            "otadata is 0x1010 bytes, too short: 0x1020 bytes are needed"
        );
        assert_eq!(
            OtaSelectEntry::parse(&[0; 31]).unwrap_err().to_string(),
            "otadata is 0x1f bytes, too short: 0x20 bytes are needed"
        );
    }
}
