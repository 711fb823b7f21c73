//! The WinnerMicro W800 flavour (WM IoT SDK `wm_ota_ops`) over a [`Flash`]: the app writes an
//! image into `app_ota` ([`W800Ota::begin`], [`W800Ota::write`], [`W800Ota::end`]), and the
//! bootloader model ([`W800Ota::boot`]) verifies it, xz-decompresses it into `app` sector by
//! sector and invalidates `app_ota` last.
//!
//! API checks follow `components/wm_ota/src/wm_ota_ops.c`. The W800 bootloader itself is not
//! public; the model here is built to survive power loss at any flash operation:
//!
//! 1. `app_ota` is an update when its header parses, passes the `wm_ota_ops` header checks and
//!    its payload CRC matches; it is applied when `app` does not verify or its 64 header bytes
//!    differ from those of the image `app_ota` unpacks to.
//! 2. The whole xz stream is decoded once into nothing, checking the xz CRCs and the inner
//!    `.img` (header, payload CRC, fits `app`): a bad update is refused before `app` is touched.
//! 3. It is decoded again into `app`, each sector erased just before it is written.
//! 4. `app` is verified (header + payload CRC), then the `app_ota` header sector is erased.
//!
//! Until step 4 `app_ota` still holds the source, so a cut anywhere before it leads the next boot
//! to start the copy again; a cut during step 4 leaves either no update or an update `app`
//! already holds, which the next boot only invalidates.
//!
//! Memory: the decoder holds the dictionary buffer (the stream's dictionary size, at most the
//! `app` size, refused above [`W800Config::max_dict_size`]) plus
//! [`xz::FIXED_STATE_BYTES`](crate::xz::FIXED_STATE_BYTES), and the copy holds one 4 KiB sector;
//! see [`copy_memory_bound`]. For `bin2img.py`'s 32 KiB dictionary that is 66,172 bytes
//! (32 KiB + 29,308 + 4 KiB), whatever the image size.

use alloc::vec;
use alloc::vec::Vec;

use otaforge_formats::w800::{self as w800_image, HEADER_LEN, W800Error, W800Header};

use crate::common::{ImageSize, Region, sector_ceil};
use crate::flash::{Flash, FlashError, SECTOR_SIZE, erase_range};
use crate::xz::{self, XzError, XzIo, XzLimits};

/// Where the W800 maps its flash (`OTA_FLASH_BASE_ADDR`).
pub const FLASH_BASE: u32 = 0x0800_0000;
/// Offset of the run address after the image header (`OTA_APP_RUN_ADDRESS_OFFSET`).
pub const RUN_OFFSET: u32 = 0x400;
const HEADER_LEN_U32: u32 = HEADER_LEN as u32;
const SECTOR_LEN: usize = SECTOR_SIZE as usize;

/// The two partitions W800 OTA uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W800Layout {
    pub flash_size: u32,
    /// Where the running image lives (header, then code at header + 0x400).
    pub app: Region,
    /// Where `wm_ota_ops` writes the update.
    pub app_ota: Region,
}

impl W800Layout {
    /// The WM IoT SDK's `partition_table_with_ota.csv` on a 2 MB flash: app 0xF000 (0x122000
    /// bytes), app_ota 0x131000 (0xAF000 bytes).
    pub fn default_2mb() -> W800Layout {
        W800Layout {
            flash_size: 2 * 1024 * 1024,
            app: Region::new(0xF000, 0x12_2000),
            app_ota: Region::new(0x13_1000, 0xA_F000),
        }
    }

    /// `app` at 0xF000 and `app_ota` right after it, sizes rounded up to 4 KiB.
    pub fn small(app_size: u32, app_ota_size: u32) -> W800Layout {
        let app = Region::new(0xF000, sector_ceil(app_size.max(SECTOR_SIZE)));
        let ota_at = u32::try_from(app.end()).unwrap_or(u32::MAX);
        let app_ota = Region::new(ota_at, sector_ceil(app_ota_size.max(SECTOR_SIZE)));
        W800Layout {
            flash_size: u32::try_from(app_ota.end()).unwrap_or(u32::MAX),
            app,
            app_ota,
        }
    }

    /// A header template for an `.img` that runs from `app` (type 1, addresses of this layout);
    /// pass it to `otaforge_formats::w800::build_image`.
    pub fn app_header(&self, version: &str, upd_no: u32) -> W800Header {
        W800Header {
            img_type: 1,
            run_addr: FLASH_BASE
                .wrapping_add(self.app.offset)
                .wrapping_add(RUN_OFFSET),
            header_addr: FLASH_BASE.wrapping_add(self.app.offset),
            upgrade_addr: FLASH_BASE.wrapping_add(self.app_ota.offset),
            upd_no,
            version: version.into(),
            ..W800Header::default()
        }
    }

    /// The header template of an xz OTA image for this layout (the `app` header marked xz).
    pub fn ota_header(&self, version: &str, upd_no: u32) -> W800Header {
        W800Header {
            compress_type: w800_image::COMPRESS_XZ,
            ..self.app_header(version, upd_no)
        }
    }

    fn check(&self, flash_size: u32) -> Result<(), W800OtaError> {
        let ok = self.app.is_sector_aligned()
            && self.app_ota.is_sector_aligned()
            && self.app.size > HEADER_LEN_U32
            && self.app_ota.size > HEADER_LEN_U32
            && !self.app.overlaps(&self.app_ota)
            && self.app.end() <= u64::from(flash_size)
            && self.app_ota.end() <= u64::from(flash_size)
            && self.flash_size <= flash_size;
        if ok {
            Ok(())
        } else {
            Err(W800OtaError::InvalidLayout)
        }
    }
}

/// Writes a fresh flash: `app_image` (an `.img`) into `app` when given, and an erased `app_ota`
/// header sector (no pending update).
pub fn init_flash<F: Flash + ?Sized>(
    flash: &mut F,
    layout: &W800Layout,
    app_image: Option<&[u8]>,
) -> Result<(), W800OtaError> {
    layout.check(flash.size())?;
    erase_range(flash, layout.app_ota.offset, SECTOR_SIZE)?;
    if let Some(image) = app_image {
        let len = u32::try_from(image.len())
            .ok()
            .filter(|&l| l <= layout.app.size)
            .ok_or(W800OtaError::ImageTooLarge {
                size: image.len() as u64,
                partition_size: layout.app.size,
            })?;
        erase_range(flash, layout.app.offset, len)?;
        flash.write(layout.app.offset, image)?;
    }
    Ok(())
}

/// Bootloader settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct W800Config {
    /// Largest xz dictionary buffer the bootloader allocates. `bin2img.py` compresses with a
    /// 32 KiB dictionary.
    pub max_dict_size: u32,
}

impl Default for W800Config {
    /// 64 KiB of dictionary.
    fn default() -> Self {
        W800Config {
            max_dict_size: 64 * 1024,
        }
    }
}

/// Memory the bootloader's copy step needs for a dictionary buffer of `dict_buffer_len` bytes:
/// the xz decoder's working memory plus one sector buffer.
pub const fn copy_memory_bound(dict_buffer_len: usize) -> usize {
    xz::working_memory(dict_buffer_len).saturating_add(SECTOR_LEN)
}

/// A header field `wm_ota_ops_check_header` refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    #[error("image type {0} is not an app image")]
    ImageType(u8),
    #[error("gzip images are not supported, only xz")]
    Gzip,
    #[error("compress type {0} is unknown")]
    CompressType(u8),
    #[error("run address {0:#010x} is in neither app nor app_ota")]
    RunAddress(u32),
    #[error("header address {0:#010x} is neither app nor app_ota")]
    HeaderAddress(u32),
    #[error("upgrade address {0:#010x} is neither 0 nor app_ota")]
    UpgradeAddress(u32),
    #[error("the header says xz but the payload is not an xz stream")]
    NotXz,
}

/// Why a W800 OTA operation or boot failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum W800OtaError {
    #[error("{0}")]
    Flash(#[from] FlashError),
    #[error(
        "invalid layout: app and app_ota must be whole 4 KiB sectors, larger than a header, apart and inside the flash"
    )]
    InvalidLayout,
    #[error("the first write must hold the 64-byte image header, it has {len} bytes")]
    HeaderTooShort { len: usize },
    #[error("invalid image header: {0}")]
    Header(W800Error),
    #[error("image header refused: {0}")]
    HeaderRefused(HeaderProblem),
    #[error("image of {size} bytes does not fit the {partition_size}-byte partition")]
    ImageTooLarge { size: u64, partition_size: u32 },
    #[error(
        "write of {len} bytes at offset {offset:#x} runs past the end of the {size:#x}-byte app_ota partition"
    )]
    WritePastPartition { offset: u32, len: usize, size: u32 },
    #[error("no image bytes were written")]
    NothingWritten,
    #[error("image needs {needed} bytes but only {written} were written")]
    Truncated { needed: u64, written: u32 },
    #[error("invalid image: {0}")]
    Image(W800Error),
    #[error("xz payload: {0}")]
    Xz(XzError),
    #[error("decompressed image: {0}")]
    InnerImage(W800Error),
    #[error("decompressed image is itself compressed")]
    InnerCompressed,
    #[error("no bootable image: app does not verify and app_ota holds no valid update")]
    NoBootableImage,
}

impl From<XzError> for W800OtaError {
    fn from(e: XzError) -> Self {
        match e {
            XzError::Flash(f) => W800OtaError::Flash(f),
            other => W800OtaError::Xz(other),
        }
    }
}

/// An update in progress (`wm_ota_ops_ctx_t`), from [`W800Ota::begin`] to [`W800Ota::end`].
#[derive(Debug, PartialEq, Eq)]
pub struct W800Handle {
    written: u32,
    erased_to: u32,
    header: Option<W800Header>,
}

impl W800Handle {
    pub fn written(&self) -> u32 {
        self.written
    }

    /// The header of the image, once the first write brought it.
    pub fn header(&self) -> Option<&W800Header> {
        self.header.as_ref()
    }
}

/// What the bootloader did with `app_ota` at this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateAction {
    /// `app_ota` held no valid update.
    None,
    /// The update was unpacked (or copied) into `app`, and `app_ota` invalidated.
    Applied { xz: bool },
    /// `app` already held the update (a previous boot lost power before invalidating
    /// `app_ota`); `app_ota` was invalidated.
    Finished,
    /// `app_ota` held an update whose content is bad; it was invalidated and `app` kept.
    Rejected(W800OtaError),
}

/// What [`W800Ota::boot`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct W800Boot {
    /// Header of the app now running.
    pub header: W800Header,
    pub action: UpdateAction,
}

/// `wm_ota_ops` and the W800 bootloader over one flash.
#[derive(Debug)]
pub struct W800Ota<F: Flash> {
    flash: F,
    layout: W800Layout,
    config: W800Config,
    running: Option<W800Header>,
}

/// An update found in `app_ota`.
struct Pending {
    header: W800Header,
    xz: bool,
}

impl<F: Flash> W800Ota<F> {
    pub fn new(flash: F, layout: W800Layout, config: W800Config) -> Result<Self, W800OtaError> {
        layout.check(flash.size())?;
        Ok(W800Ota {
            flash,
            layout,
            config,
            running: None,
        })
    }

    pub fn layout(&self) -> &W800Layout {
        &self.layout
    }

    pub fn flash(&self) -> &F {
        &self.flash
    }

    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Header of the app running since the last boot.
    pub fn running(&self) -> Option<&W800Header> {
        self.running.as_ref()
    }

    /// `wm_ota_ops_get_version`: the version of the running app.
    pub fn get_version(&self) -> Option<&str> {
        self.running.as_ref().map(|h| h.version.as_str())
    }

    /// `wm_ota_ops_begin`: erases the last sector of `app_ota` (as the SDK does), then the
    /// sectors the size covers (all of `app_ota` for [`ImageSize::Unknown`], none yet for
    /// [`ImageSize::Sequential`]); a known size larger than `app_ota` is refused first.
    pub fn begin(&mut self, size: ImageSize) -> Result<W800Handle, W800OtaError> {
        let part = self.layout.app_ota;
        let erase_len = match size {
            ImageSize::Known(0) | ImageSize::Unknown => part.size,
            ImageSize::Known(n) if n > part.size => {
                return Err(W800OtaError::ImageTooLarge {
                    size: u64::from(n),
                    partition_size: part.size,
                });
            }
            ImageSize::Known(n) => sector_ceil(n),
            ImageSize::Sequential => 0,
        };
        let last = part
            .at(part.size.saturating_sub(SECTOR_SIZE))
            .ok_or(W800OtaError::InvalidLayout)?;
        self.flash.erase_sector(last)?;
        let mut handle = W800Handle {
            written: 0,
            erased_to: 0,
            header: None,
        };
        self.erase_ota_to(&mut handle, erase_len)?;
        Ok(handle)
    }

    fn erase_ota_to(&mut self, handle: &mut W800Handle, to: u32) -> Result<(), W800OtaError> {
        let part = self.layout.app_ota;
        let to = sector_ceil(to).min(part.size);
        while handle.erased_to < to {
            let at = part
                .at(handle.erased_to)
                .ok_or(W800OtaError::InvalidLayout)?;
            self.flash.erase_sector(at)?;
            handle.erased_to = handle.erased_to.saturating_add(SECTOR_SIZE);
        }
        Ok(())
    }

    /// The checks of `wm_ota_ops_check_header` (the magic and header CRC are checked by the
    /// parse that produced `header`).
    fn check_header(&self, header: &W800Header) -> Result<(), W800OtaError> {
        let refuse = |p| Err(W800OtaError::HeaderRefused(p));
        let app = FLASH_BASE.wrapping_add(self.layout.app.offset);
        let ota = FLASH_BASE.wrapping_add(self.layout.app_ota.offset);
        if header.img_type == 0 || header.img_type == 0x0E {
            return refuse(HeaderProblem::ImageType(header.img_type));
        }
        if header.gzip {
            return refuse(HeaderProblem::Gzip);
        }
        if header.compress_type > w800_image::COMPRESS_XZ {
            return refuse(HeaderProblem::CompressType(header.compress_type));
        }
        if header.run_addr != ota.wrapping_add(RUN_OFFSET)
            && header.run_addr != app.wrapping_add(RUN_OFFSET)
        {
            return refuse(HeaderProblem::RunAddress(header.run_addr));
        }
        let room = self.layout.app_ota.size.saturating_sub(HEADER_LEN_U32);
        if header.payload_len > room {
            return Err(W800OtaError::ImageTooLarge {
                size: u64::from(header.payload_len).saturating_add(HEADER_LEN as u64),
                partition_size: self.layout.app_ota.size,
            });
        }
        if header.header_addr != ota && header.header_addr != app {
            return refuse(HeaderProblem::HeaderAddress(header.header_addr));
        }
        if header.upgrade_addr != 0 && header.upgrade_addr != ota {
            return refuse(HeaderProblem::UpgradeAddress(header.upgrade_addr));
        }
        Ok(())
    }

    /// `wm_ota_ops_write`: appends `data` to `app_ota`. The first write must hold the whole
    /// 64-byte header, which is checked (magic, header CRC, type, compression, addresses, and
    /// that the payload fits `app_ota`) before anything is written; a write past the end of
    /// `app_ota` is refused whole.
    pub fn write(&mut self, handle: &mut W800Handle, data: &[u8]) -> Result<(), W800OtaError> {
        if data.is_empty() {
            return Ok(());
        }
        if handle.written == 0 {
            if data.len() < HEADER_LEN {
                return Err(W800OtaError::HeaderTooShort { len: data.len() });
            }
            let header = W800Header::parse(data).map_err(W800OtaError::Header)?;
            self.check_header(&header)?;
            handle.header = Some(header);
        }
        let size = self.layout.app_ota.size;
        let end = u64::from(handle.written).saturating_add(data.len() as u64);
        if end > u64::from(size) {
            return Err(W800OtaError::WritePastPartition {
                offset: handle.written,
                len: data.len(),
                size,
            });
        }
        let end = end as u32;
        self.erase_ota_to(handle, end)?;
        let at = self
            .layout
            .app_ota
            .at(handle.written)
            .ok_or(W800OtaError::InvalidLayout)?;
        self.flash.write(at, data)?;
        handle.written = end;
        Ok(())
    }

    /// `wm_ota_ops_end`: reads back the image (header and `payload_len` bytes) and verifies it
    /// with `otaforge_formats::w800::parse_image` (header CRC, payload JAMCRC); an image marked
    /// xz must carry an xz stream. Returns its header.
    pub fn end(&mut self, handle: W800Handle) -> Result<W800Header, W800OtaError> {
        let Some(header) = handle.header else {
            return Err(W800OtaError::NothingWritten);
        };
        let needed = HEADER_LEN_U32.saturating_add(header.payload_len);
        if handle.written < needed {
            return Err(W800OtaError::Truncated {
                needed: u64::from(needed),
                written: handle.written,
            });
        }
        let mut bytes = vec![0u8; needed as usize];
        self.flash.read(self.layout.app_ota.offset, &mut bytes)?;
        let image = w800_image::parse_image(&bytes).map_err(W800OtaError::Image)?;
        if image.header.is_xz() && !image.payload_has_xz_magic {
            return Err(W800OtaError::HeaderRefused(HeaderProblem::NotXz));
        }
        Ok(image.header)
    }

    /// `wm_ota_ops_abort`: drops the update; `app_ota` keeps what was written.
    pub fn abort(&mut self, handle: W800Handle) {
        let _ = handle;
    }

    /// `wm_ota_ops_reboot`: the device restarts and the bootloader runs.
    pub fn reboot(&mut self) -> Result<W800Boot, W800OtaError> {
        self.boot()
    }

    /// Header and 64 raw bytes at the start of a partition, verified with the payload CRC
    /// computed sector by sector (the image is never held whole).
    fn verify_partition(
        &mut self,
        region: Region,
    ) -> Result<Result<(W800Header, [u8; HEADER_LEN]), W800OtaError>, FlashError> {
        let mut raw = [0u8; HEADER_LEN];
        self.flash.read(region.offset, &mut raw)?;
        let header = match W800Header::parse(&raw) {
            Ok(h) => h,
            Err(e) => return Ok(Err(W800OtaError::Image(e))),
        };
        let room = region.size.saturating_sub(HEADER_LEN_U32);
        if header.payload_len > room {
            return Ok(Err(W800OtaError::Image(W800Error::PayloadPastEnd {
                payload_len: header.payload_len,
                available: room as usize,
            })));
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; SECTOR_LEN];
        let mut done = 0u32;
        while done < header.payload_len {
            let n = (header.payload_len.saturating_sub(done)).min(SECTOR_SIZE);
            let chunk = buf.get_mut(..n as usize).unwrap_or_default();
            let at = region
                .offset
                .saturating_add(HEADER_LEN_U32)
                .saturating_add(done);
            self.flash.read(at, chunk)?;
            hasher.update(chunk);
            done = done.saturating_add(n);
        }
        // JAMCRC: the zlib CRC-32 without its final inversion.
        let computed = !hasher.finalize();
        if computed != header.org_checksum {
            return Ok(Err(W800OtaError::Image(
                W800Error::PayloadChecksumMismatch {
                    stored: header.org_checksum,
                    computed,
                },
            )));
        }
        Ok(Ok((header, raw)))
    }

    /// The update `app_ota` holds, if any: header checks of `wm_ota_ops` plus the payload CRC.
    fn pending_update(&mut self) -> Result<Option<Pending>, FlashError> {
        let Ok((header, _)) = self.verify_partition(self.layout.app_ota)? else {
            return Ok(None);
        };
        if self.check_header(&header).is_err() {
            return Ok(None);
        }
        let mut magic = [0u8; 6];
        self.flash.read(
            self.layout.app_ota.offset.saturating_add(HEADER_LEN_U32),
            &mut magic,
        )?;
        let xz = header.is_xz();
        if xz && magic != xz::XZ_MAGIC {
            return Ok(None);
        }
        Ok(Some(Pending { header, xz }))
    }

    /// Whether `app_ota` holds an update the next boot would look at.
    pub fn has_pending_update(&mut self) -> Result<bool, W800OtaError> {
        Ok(self.pending_update()?.is_some())
    }

    fn xz_limits(&self) -> XzLimits {
        XzLimits {
            max_dict_size: self.config.max_dict_size,
            max_output: u64::from(self.layout.app.size),
        }
    }

    /// The 64 header bytes of the image the update unpacks to (decodes only that far).
    fn inner_header(&mut self, pending: &Pending) -> Result<[u8; HEADER_LEN], W800OtaError> {
        if !pending.xz {
            let mut raw = [0u8; HEADER_LEN];
            self.flash.read(self.layout.app_ota.offset, &mut raw)?;
            return Ok(raw);
        }
        let limits = self.xz_limits();
        let mut io = FlashXz::new(&mut self.flash, self.layout.app_ota, &pending.header);
        io.sink = Sink::Header(Vec::with_capacity(HEADER_LEN));
        match xz::decompress(&mut io, &limits) {
            Ok(_) | Err(XzError::Stopped) => {}
            Err(e) => return Err(e.into()),
        }
        let Sink::Header(bytes) = io.sink else {
            return Err(W800OtaError::InnerImage(W800Error::TooShortForHeader {
                len: 0,
            }));
        };
        let raw: [u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(W800OtaError::InnerImage(W800Error::TooShortForHeader {
                len: bytes.len(),
            }))?;
        Ok(raw)
    }

    /// Decodes the whole update without writing anything and checks the image it unpacks to.
    fn preverify(&mut self, pending: &Pending) -> Result<(), W800OtaError> {
        if !pending.xz {
            // app_ota's own image, already verified; it must fit app.
            return self.check_fits_app(&pending.header);
        }
        let limits = self.xz_limits();
        let mut io = FlashXz::new(&mut self.flash, self.layout.app_ota, &pending.header);
        io.sink = Sink::Verify(InnerCheck::new());
        xz::decompress(&mut io, &limits)?;
        let Sink::Verify(check) = io.sink else {
            return Err(W800OtaError::NothingWritten);
        };
        let header = check.finish()?;
        self.check_fits_app(&header)
    }

    fn check_fits_app(&self, header: &W800Header) -> Result<(), W800OtaError> {
        let len = u64::from(header.payload_len).saturating_add(HEADER_LEN as u64);
        if len > u64::from(self.layout.app.size) {
            return Err(W800OtaError::ImageTooLarge {
                size: len,
                partition_size: self.layout.app.size,
            });
        }
        Ok(())
    }

    /// Unpacks (or copies) the update into `app`, each sector erased just before it is written.
    fn copy_into_app(&mut self, pending: &Pending) -> Result<(), W800OtaError> {
        let app = self.layout.app;
        if pending.xz {
            let limits = self.xz_limits();
            let mut io = FlashXz::new(&mut self.flash, self.layout.app_ota, &pending.header);
            io.sink = Sink::App(SectorWriter::new(app));
            xz::decompress(&mut io, &limits)?;
            let FlashXz { flash, sink, .. } = io;
            if let Sink::App(mut writer) = sink {
                writer.finish(flash)?;
            }
            return Ok(());
        }
        let len = HEADER_LEN_U32.saturating_add(pending.header.payload_len);
        let mut writer = SectorWriter::new(app);
        let mut buf = vec![0u8; SECTOR_LEN];
        let mut done = 0u32;
        while done < len {
            let n = len.saturating_sub(done).min(SECTOR_SIZE);
            let chunk = buf.get_mut(..n as usize).unwrap_or_default();
            self.flash
                .read(self.layout.app_ota.offset.saturating_add(done), chunk)?;
            writer.push(&mut self.flash, chunk)?;
            done = done.saturating_add(n);
        }
        writer.finish(&mut self.flash)?;
        Ok(())
    }

    fn invalidate_app_ota(&mut self) -> Result<(), FlashError> {
        self.flash.erase_sector(self.layout.app_ota.offset)
    }

    /// The bootloader model (see the module documentation): applies a valid update from
    /// `app_ota`, then runs `app` if it verifies.
    pub fn boot(&mut self) -> Result<W800Boot, W800OtaError> {
        self.running = None;
        let mut action = UpdateAction::None;
        if let Some(pending) = self.pending_update()? {
            let app_raw = match self.verify_partition(self.layout.app)? {
                Ok((_, raw)) => Some(raw),
                Err(_) => None,
            };
            match self.inner_header(&pending) {
                Err(W800OtaError::Flash(e)) => return Err(W800OtaError::Flash(e)),
                Err(e) => {
                    self.invalidate_app_ota()?;
                    action = UpdateAction::Rejected(e);
                }
                Ok(inner) if app_raw == Some(inner) => {
                    self.invalidate_app_ota()?;
                    action = UpdateAction::Finished;
                }
                Ok(_) => match self.preverify(&pending) {
                    Err(W800OtaError::Flash(e)) => return Err(W800OtaError::Flash(e)),
                    Err(e) => {
                        self.invalidate_app_ota()?;
                        action = UpdateAction::Rejected(e);
                    }
                    Ok(()) => {
                        self.copy_into_app(&pending)?;
                        // Verify what landed in app before giving up the source.
                        self.verify_partition(self.layout.app)??;
                        self.invalidate_app_ota()?;
                        action = UpdateAction::Applied { xz: pending.xz };
                    }
                },
            }
        }
        match self.verify_partition(self.layout.app)? {
            Ok((header, _)) => {
                self.running = Some(header.clone());
                Ok(W800Boot { header, action })
            }
            Err(_) => Err(W800OtaError::NoBootableImage),
        }
    }
}

/// Collects output into whole sectors and writes each one into a partition: erase the sector,
/// then write it.
struct SectorWriter {
    region: Region,
    buf: Vec<u8>,
    /// Offset in the region of the sector being collected.
    at: u32,
}

impl SectorWriter {
    fn new(region: Region) -> SectorWriter {
        SectorWriter {
            region,
            buf: Vec::with_capacity(SECTOR_LEN),
            at: 0,
        }
    }

    fn push<F: Flash + ?Sized>(&mut self, flash: &mut F, mut data: &[u8]) -> Result<(), XzError> {
        while !data.is_empty() {
            let room = SECTOR_LEN.saturating_sub(self.buf.len());
            let (now, rest) = data.split_at(room.min(data.len()));
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() == SECTOR_LEN {
                self.write_sector(flash)?;
            }
        }
        Ok(())
    }

    fn write_sector<F: Flash + ?Sized>(&mut self, flash: &mut F) -> Result<(), XzError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = u64::from(self.at).saturating_add(self.buf.len() as u64);
        if end > u64::from(self.region.size) {
            return Err(XzError::OutputTooLarge {
                limit: u64::from(self.region.size),
            });
        }
        let offset = self.region.offset.saturating_add(self.at);
        flash.erase_sector(offset)?;
        flash.write(offset, &self.buf)?;
        self.at = self.at.saturating_add(SECTOR_SIZE);
        self.buf.clear();
        Ok(())
    }

    fn finish<F: Flash + ?Sized>(&mut self, flash: &mut F) -> Result<(), XzError> {
        self.write_sector(flash)
    }
}

/// Checks the decompressed `.img` as it streams by: header, payload JAMCRC, nothing missing.
struct InnerCheck {
    header_bytes: Vec<u8>,
    header: Option<W800Header>,
    crc: crc32fast::Hasher,
    payload_seen: u64,
    err: Option<W800OtaError>,
}

impl InnerCheck {
    fn new() -> InnerCheck {
        InnerCheck {
            header_bytes: Vec::with_capacity(HEADER_LEN),
            header: None,
            crc: crc32fast::Hasher::new(),
            payload_seen: 0,
            err: None,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        if self.header.is_none() {
            let want = HEADER_LEN.saturating_sub(self.header_bytes.len());
            let (head, rest) = data.split_at(want.min(data.len()));
            self.header_bytes.extend_from_slice(head);
            data = rest;
            if self.header_bytes.len() == HEADER_LEN {
                match W800Header::parse(&self.header_bytes) {
                    Ok(h) if h.compress_type != 0 || h.gzip => {
                        self.err = Some(W800OtaError::InnerCompressed);
                    }
                    Ok(h) => self.header = Some(h),
                    Err(e) => self.err = Some(W800OtaError::InnerImage(e)),
                }
            }
        }
        if let Some(h) = &self.header {
            // Only the payload counts; bytes after it (a signature) are allowed.
            let left = u64::from(h.payload_len).saturating_sub(self.payload_seen);
            let take = (data.len() as u64).min(left) as usize;
            self.crc.update(data.get(..take).unwrap_or_default());
            self.payload_seen = self.payload_seen.saturating_add(data.len() as u64);
        }
    }

    fn finish(self) -> Result<W800Header, W800OtaError> {
        if let Some(e) = self.err {
            return Err(e);
        }
        let Some(header) = self.header else {
            return Err(W800OtaError::InnerImage(W800Error::TooShortForHeader {
                len: self.header_bytes.len(),
            }));
        };
        if self.payload_seen < u64::from(header.payload_len) {
            return Err(W800OtaError::InnerImage(W800Error::PayloadPastEnd {
                payload_len: header.payload_len,
                available: self.payload_seen as usize,
            }));
        }
        let computed = !self.crc.finalize();
        if computed != header.org_checksum {
            return Err(W800OtaError::InnerImage(
                W800Error::PayloadChecksumMismatch {
                    stored: header.org_checksum,
                    computed,
                },
            ));
        }
        Ok(header)
    }
}

enum Sink {
    /// Keep the first 64 bytes, then stop.
    Header(Vec<u8>),
    /// Check the image, write nothing.
    Verify(InnerCheck),
    /// Write into app.
    App(SectorWriter),
}

/// Reads the xz payload of `app_ota` from flash and sends the output to a [`Sink`].
struct FlashXz<'a, F: Flash> {
    flash: &'a mut F,
    /// Next flash offset of payload to read.
    at: u32,
    /// Payload bytes not read yet.
    left: u32,
    sink: Sink,
}

impl<'a, F: Flash> FlashXz<'a, F> {
    fn new(flash: &'a mut F, app_ota: Region, header: &W800Header) -> Self {
        FlashXz {
            flash,
            at: app_ota.offset.saturating_add(HEADER_LEN_U32),
            left: header.payload_len,
            sink: Sink::Header(Vec::new()),
        }
    }
}

impl<F: Flash> XzIo for FlashXz<'_, F> {
    fn read_input(&mut self, buf: &mut [u8]) -> Result<usize, XzError> {
        let n = buf.len().min(self.left as usize);
        let dst = buf.get_mut(..n).unwrap_or_default();
        self.flash.read(self.at, dst)?;
        self.at = self.at.saturating_add(n as u32);
        self.left = self.left.saturating_sub(n as u32);
        Ok(n)
    }

    fn write_output(&mut self, data: &[u8]) -> Result<(), XzError> {
        match &mut self.sink {
            Sink::Header(bytes) => {
                let want = HEADER_LEN.saturating_sub(bytes.len());
                bytes.extend_from_slice(data.get(..want.min(data.len())).unwrap_or_default());
                if bytes.len() >= HEADER_LEN {
                    return Err(XzError::Stopped);
                }
                Ok(())
            }
            Sink::Verify(check) => {
                check.push(data);
                Ok(())
            }
            Sink::App(writer) => writer.push(self.flash, data),
        }
    }
}
