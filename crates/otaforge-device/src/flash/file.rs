//! [`FileFlash`]: a flash image kept in a file, with the same NOR rules as the real chip.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::string::ToString;
use std::vec;

use super::{Flash, FlashError, SECTOR_LEN, SECTOR_SIZE, check_range};
use crate::common::is_aligned;

/// A flash whose bytes live in a file (for example a `.merged.bin` to boot on a PC). Writes
/// read the bytes they cover first and are refused when they would set a bit; each write and
/// each erase is followed by `sync_data`.
#[derive(Debug)]
pub struct FileFlash {
    file: File,
    size: u32,
}

fn io(e: std::io::Error) -> FlashError {
    FlashError::Io(e.to_string())
}

impl FileFlash {
    /// Creates (or truncates) `path` as an erased flash of `size` bytes (a multiple of 4 KiB).
    pub fn create(path: impl AsRef<Path>, size: u32) -> Result<FileFlash, FlashError> {
        if !is_aligned(size) {
            return Err(FlashError::Misaligned { offset: size });
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io)?;
        let erased = [0xFFu8; SECTOR_LEN];
        for _ in 0..size / SECTOR_SIZE {
            file.write_all(&erased).map_err(io)?;
        }
        file.sync_data().map_err(io)?;
        Ok(FileFlash { file, size })
    }

    /// Opens an existing flash image; its length must be a multiple of 4 KiB and below 4 GiB.
    pub fn open(path: impl AsRef<Path>) -> Result<FileFlash, FlashError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let size = u32::try_from(len).map_err(|_| {
            FlashError::Io(std::format!("flash file is {len} bytes, larger than 4 GiB"))
        })?;
        if !is_aligned(size) {
            return Err(FlashError::Misaligned { offset: size });
        }
        Ok(FileFlash { file, size })
    }

    fn read_at(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), FlashError> {
        self.file
            .seek(SeekFrom::Start(u64::from(offset)))
            .map_err(io)?;
        self.file.read_exact(buf).map_err(io)
    }

    fn write_at(&mut self, offset: u32, data: &[u8]) -> Result<(), FlashError> {
        self.file
            .seek(SeekFrom::Start(u64::from(offset)))
            .map_err(io)?;
        self.file.write_all(data).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

impl Flash for FileFlash {
    fn size(&self) -> u32 {
        self.size
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), FlashError> {
        check_range(self.size, offset, buf.len())?;
        self.read_at(offset, buf)
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), FlashError> {
        check_range(self.size, offset, data.len())?;
        let mut old = vec![0u8; data.len()];
        self.read_at(offset, &mut old)?;
        if let Some(i) = old.iter().zip(data).position(|(o, n)| o & n != *n) {
            return Err(FlashError::WouldSetBits {
                offset: offset.saturating_add(i as u32),
            });
        }
        self.write_at(offset, data)
    }

    fn erase_sector(&mut self, offset: u32) -> Result<(), FlashError> {
        if !is_aligned(offset) {
            return Err(FlashError::Misaligned { offset });
        }
        check_range(self.size, offset, SECTOR_LEN)?;
        self.write_at(offset, &[0xFF; SECTOR_LEN])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_flash_keeps_nor_rules_and_survives_reopen() {
        let dir = std::env::temp_dir().join(std::format!(
            "otaforge-device-fileflash-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("flash.bin");
        {
            let mut f = FileFlash::create(&path, 0x2000).unwrap();
            assert_eq!(f.size(), 0x2000);
            f.write(0x10, &[0x12, 0x34]).unwrap();
            assert_eq!(
                f.write(0x10, &[0xFF, 0x34]),
                Err(FlashError::WouldSetBits { offset: 0x10 })
            );
            assert!(f.write(0x1FFF, &[0, 0]).is_err());
        }
        let mut f = FileFlash::open(&path).unwrap();
        let mut buf = [0u8; 3];
        f.read(0x10, &mut buf).unwrap();
        assert_eq!(buf, [0x12, 0x34, 0xFF]);
        f.erase_sector(0).unwrap();
        f.read(0x10, &mut buf).unwrap();
        assert_eq!(buf, [0xFF; 3]);
        assert_eq!(
            FileFlash::create(dir.join("odd.bin"), 100).unwrap_err(),
            FlashError::Misaligned { offset: 100 }
        );
        assert!(matches!(
            FileFlash::open(dir.join("missing.bin")),
            Err(FlashError::Io(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
