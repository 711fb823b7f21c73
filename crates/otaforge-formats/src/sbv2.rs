//! ESP-IDF Secure Boot V2 signature blocks, as `espsecure sign-data --version 2` appends them
//! (esptool `espsecure/__init__.py`, esp-idf `esp_rom` `secure_boot.h`): the image padded with
//! 0xFF to a 4 KiB multiple, then one 4096-byte sector holding up to three 1,216-byte blocks.
//!
//! | block offset | size | RSA-3072 (version 2) | ECDSA (version 3) |
//! |---|---|---|---|
//! | 0 | 4 | `E7 02 00 00` | `E7 03`, hash (0 SHA-256, 1 SHA-384), 0 |
//! | 4 | 32 | SHA-256 of everything before the sector | same (P-384: 48 bytes) |
//! | 36 | ... | n (384 LE), e (4 LE), R^-1, M', signature (384, reversed) | curve, X LE, Y LE, r LE, s LE |
//! | 1196 | 4 | CRC-32 (zlib) of bytes 0..1196 | same |
//!
//! This module reads the blocks and what their keys are (the key digest, SHA-256 of the key
//! bytes, is what eFuse `SECURE_BOOT_DIGESTn` holds and `espsecure signature-info-v2`
//! prints); checking a signature is the caller's (it needs an RSA / ECDSA library).

use alloc::vec::Vec;

use sha2::{Digest, Sha256};

use crate::bytes::{slice, u8_at, u32_at};

/// The signature sector's length, and the alignment of a signed file.
pub const SECTOR_LEN: usize = 4096;
/// One signature block.
pub const BLOCK_LEN: usize = 1216;
/// At most this many blocks in a sector.
pub const MAX_BLOCKS: usize = 3;
const MAGIC: u8 = 0xE7;
const CRC_AT: usize = 1196;

/// The public key and signature a block carries, as big-endian integers (the block stores
/// them little-endian).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// RSA-3072, PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt, over the image digest.
    Rsa3072 {
        modulus: Vec<u8>,
        exponent: u32,
        signature: Vec<u8>,
    },
    /// ECDSA over the image digest: `curve` 1 (P-192), 2 (P-256) or 3 (P-384); X, Y, r, s.
    Ecdsa {
        curve: u8,
        x: Vec<u8>,
        y: Vec<u8>,
        r: Vec<u8>,
        s: Vec<u8>,
    },
}

impl Key {
    /// The scheme's name as espsecure calls it.
    pub fn scheme(&self) -> &'static str {
        match self {
            Key::Rsa3072 { .. } => "rsa3072",
            Key::Ecdsa { curve: 1, .. } => "ecdsa192",
            Key::Ecdsa { curve: 2, .. } => "ecdsa256",
            Key::Ecdsa { curve: 3, .. } => "ecdsa384",
            Key::Ecdsa { .. } => "ecdsa",
        }
    }
}

/// One valid block (magic, version and CRC hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// 0, 1 or 2: its place in the sector.
    pub index: usize,
    /// The digest the block says it signs: SHA-256 (SHA-384 for P-384) of the image before
    /// the sector.
    pub image_digest: Vec<u8>,
    /// SHA-256 of the block's key bytes: the key digest burnt into eFuse.
    pub key_digest: [u8; 32],
    pub key: Key,
}

/// A file that ends with a signature sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// Bytes before the sector (what the blocks sign).
    pub signed_len: usize,
    /// SHA-256 of those bytes.
    pub sha256: [u8; 32],
    pub blocks: Vec<Block>,
}

fn reversed(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().rev().copied().collect()
}

fn block_at(sector: &[u8], index: usize) -> Option<Block> {
    let block = slice(sector, index.checked_mul(BLOCK_LEN)?, BLOCK_LEN)?;
    if u8_at(block, 0)? != MAGIC {
        return None;
    }
    if crc32fast::hash(slice(block, 0, CRC_AT)?) != u32_at(block, CRC_AT)? {
        return None;
    }
    let (image_digest, key_bytes, key) = match u8_at(block, 1)? {
        2 => {
            let key = Key::Rsa3072 {
                modulus: reversed(slice(block, 36, 384)?),
                exponent: u32_at(block, 420)?,
                signature: reversed(slice(block, 812, 384)?),
            };
            (slice(block, 4, 32)?, slice(block, 36, 776)?, key)
        }
        3 => {
            // P-384 (hash byte 1): digest 4..52, curve at 52, X Y 53..149, r s 149..245.
            // P-192 and P-256: digest 4..36, curve at 36, X Y 37..101, r s 101..165 (P-192's
            // 24-byte values packed, the rest of each span zero).
            let p384 = u8_at(block, 2)? == 1 && u8_at(block, 52)? == 3;
            let (digest_len, curve_at) = if p384 { (48, 52) } else { (32, 36) };
            let curve = u8_at(block, curve_at)?;
            let width = match curve {
                1 => 24,
                2 => 32,
                3 => 48,
                _ => return None,
            };
            let point = curve_at.checked_add(1)?;
            let sig = if p384 { 149 } else { 101 };
            let value = |at: usize, n: usize| -> Option<Vec<u8>> {
                Some(reversed(slice(
                    block,
                    at.checked_add(n.checked_mul(width)?)?,
                    width,
                )?))
            };
            let key = Key::Ecdsa {
                curve,
                x: value(point, 0)?,
                y: value(point, 1)?,
                r: value(sig, 0)?,
                s: value(sig, 1)?,
            };
            let key_len = if p384 { 97 } else { 65 };
            (
                slice(block, 4, digest_len)?,
                slice(block, curve_at, key_len)?,
                key,
            )
        }
        _ => return None,
    };
    Some(Block {
        index,
        image_digest: image_digest.to_vec(),
        key_digest: Sha256::digest(key_bytes).into(),
        key,
    })
}

/// The signature sector of a file, when it has one with at least one valid block. A file
/// that is not a multiple of 4 KiB, is shorter than 8 KiB, or whose last sector holds no
/// valid block is not signed (`None`): an ordinary image, not an error.
pub fn signature_sector(file: &[u8]) -> Option<Signed> {
    if file.len() < 2 * SECTOR_LEN || !file.len().is_multiple_of(SECTOR_LEN) {
        return None;
    }
    let signed_len = file.len().checked_sub(SECTOR_LEN)?;
    let sector = slice(file, signed_len, SECTOR_LEN)?;
    let blocks: Vec<Block> = (0..MAX_BLOCKS)
        .filter_map(|i| block_at(sector, i))
        .collect();
    if blocks.is_empty() {
        return None;
    }
    let sha256: [u8; 32] = Sha256::digest(slice(file, 0, signed_len)?).into();
    Some(Signed {
        signed_len,
        sha256,
        blocks,
    })
}

/// The key digest of a key as espsecure computes it from the key bytes of a block (for a
/// caller that has a block's raw 1,216 bytes).
pub fn key_digest_of_block(block: &[u8; BLOCK_LEN]) -> Option<[u8; 32]> {
    let mut sector = [0xFFu8; SECTOR_LEN];
    sector.get_mut(..BLOCK_LEN)?.copy_from_slice(block);
    block_at(&sector, 0).map(|b| b.key_digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_block(digest: [u8; 32]) -> [u8; BLOCK_LEN] {
        let mut b = [0u8; BLOCK_LEN];
        b[0] = MAGIC;
        b[1] = 2;
        b[4..36].copy_from_slice(&digest);
        for (i, byte) in b[36..812].iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    #[test]
    fn blocks_are_read_with_their_key_digests() {
        let mut file = alloc::vec![0x42u8; 2 * SECTOR_LEN];
        let digest: [u8; 32] = Sha256::digest(&file[..SECTOR_LEN]).into();
        let block = rsa_block(digest);
        file[SECTOR_LEN..SECTOR_LEN + BLOCK_LEN].copy_from_slice(&block);
        file[SECTOR_LEN + BLOCK_LEN..].fill(0xFF);
        let signed = signature_sector(&file).unwrap();
        assert_eq!(signed.signed_len, SECTOR_LEN);
        assert_eq!(signed.sha256, digest);
        assert_eq!(signed.blocks.len(), 1);
        let b = &signed.blocks[0];
        assert_eq!(b.image_digest, digest);
        assert_eq!(b.key.scheme(), "rsa3072");
        let expected: [u8; 32] = Sha256::digest(&block[36..812]).into();
        assert_eq!(b.key_digest, expected);
        assert_eq!(key_digest_of_block(&block), Some(expected));
    }

    #[test]
    fn unsigned_and_damaged_sectors_are_not_signatures() {
        assert_eq!(signature_sector(&[0u8; 100]), None);
        assert_eq!(signature_sector(&alloc::vec![0xFF; 3 * SECTOR_LEN]), None);
        let mut file = alloc::vec![0u8; 2 * SECTOR_LEN];
        let mut block = rsa_block([7; 32]);
        block[600] ^= 1; // the CRC no longer holds
        file[SECTOR_LEN..SECTOR_LEN + BLOCK_LEN].copy_from_slice(&block);
        assert_eq!(signature_sector(&file), None);
        assert_eq!(
            signature_sector(&alloc::vec![0u8; 2 * SECTOR_LEN + 1]),
            None
        );
    }
}
