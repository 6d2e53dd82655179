// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Moving a request's data between guest memory and the backing file:
//! data spans, positioned volatile I/O, discard and write-zeroes.

use super::*;

/// The data part of a request: the descriptors between the header and the
/// status byte, minus `skip` bytes of the first one (header bytes) and the
/// status byte at the end of the last one.
#[derive(Clone, Copy)]
pub(super) struct DataSpan<'a> {
    pub(super) descs: &'a [Descriptor],
    pub(super) skip: u32,
}

/// One contiguous piece of request data in guest memory.
#[derive(Clone, Copy)]
pub(super) struct Segment {
    pub(super) addr: GuestAddress,
    pub(super) len: u32,
}

/// Summary of a [`DataSpan`], computed before any I/O.
pub(super) struct SpanInfo {
    pub(super) len: u64,
    pub(super) all_writable: bool,
    pub(super) all_readable: bool,
}

impl<'a> DataSpan<'a> {
    pub(super) fn segments(self) -> impl Iterator<Item = Segment> + 'a {
        let last = self.descs.len().saturating_sub(1);
        let skip = self.skip;
        self.descs.iter().enumerate().filter_map(move |(i, d)| {
            let start = if i == 0 { skip } else { 0 };
            // The status byte ends the last descriptor (its length is >= 1).
            let end = if i == last {
                d.len().saturating_sub(1)
            } else {
                d.len()
            };
            (end > start).then(|| Segment {
                addr: GuestAddress(d.addr().0.wrapping_add(u64::from(start))),
                len: end - start,
            })
        })
    }

    /// Check that no segment wraps the address space and sum it up.
    pub(super) fn info(self) -> Option<SpanInfo> {
        let mut info = SpanInfo {
            len: 0,
            all_writable: true,
            all_readable: true,
        };
        let last = self.descs.len().saturating_sub(1);
        for (i, d) in self.descs.iter().enumerate() {
            let start = if i == 0 { self.skip } else { 0 };
            let end = if i == last {
                d.len().saturating_sub(1)
            } else {
                d.len()
            };
            if end <= start {
                continue;
            }
            d.addr().0.checked_add(u64::from(end))?;
            info.len += u64::from(end - start);
            if d.is_write_only() {
                info.all_readable = false;
            } else {
                info.all_writable = false;
            }
        }
        Some(info)
    }

    /// Copy `buf.len()` bytes starting `offset` bytes into the data.
    pub(super) fn read_at<M: GuestMemory + ?Sized>(
        self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> bool {
        let mut pos = 0u64;
        let mut done = 0usize;
        for seg in self.segments() {
            if done == buf.len() {
                break;
            }
            let seg_end = pos + u64::from(seg.len);
            let want = offset + done as u64;
            if want < seg_end {
                let in_seg = want - pos;
                let take = ((seg_end - want) as usize).min(buf.len() - done);
                let addr = GuestAddress(seg.addr.0 + in_seg);
                if mem.read_slice(&mut buf[done..done + take], addr).is_err() {
                    return false;
                }
                done += take;
            }
            pos = seg_end;
        }
        done == buf.len()
    }
}

/// `pread`/`pwrite` at a moving file offset, straight into or out of guest
/// memory.
pub(super) struct FileAt<'a> {
    pub(super) file: &'a File,
    /// The `O_DIRECT` descriptor of the same image, if any.
    pub(super) direct: Option<&'a File>,
    pub(super) offset: u64,
}

/// The alignment `O_DIRECT` requests need here (buffer, length, offset).
pub(super) const DIRECT_ALIGN: usize = 512;

impl FileAt<'_> {
    pub(super) fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from_raw_os_error(libc::EINVAL)))
    }

    /// The descriptor for a transfer of `len` bytes at `addr`: the direct
    /// one when everything is aligned for it.
    pub(super) fn fd_for(&self, addr: *const u8, len: usize) -> (libc::c_int, bool) {
        match self.direct {
            Some(d)
                if (addr as usize).is_multiple_of(DIRECT_ALIGN)
                    && len.is_multiple_of(DIRECT_ALIGN)
                    && self.offset.is_multiple_of(DIRECT_ALIGN as u64) =>
            {
                (d.as_raw_fd(), true)
            }
            _ => (self.file.as_raw_fd(), false),
        }
    }
}

/// Why [`FileAt::transfer`] stopped before moving every byte.
#[derive(Debug, thiserror::Error)]
pub(super) enum TransferError {
    /// The file offset does not fit an `off_t`: nothing more was tried.
    #[error(transparent)]
    Offset(VolatileMemoryError),
    /// `pread`/`pwrite` failed: the kernel may have moved part of the range.
    #[error(transparent)]
    Io(io::Error),
}

impl From<TransferError> for VolatileMemoryError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Offset(e) => e,
            TransferError::Io(e) => VolatileMemoryError::IOError(e),
        }
    }
}

impl FileAt<'_> {
    /// Move `len` bytes at `base` with `op`, at the moving file offset:
    /// `op(fd, done, off)` transfers bytes `done..len` at file offset `off`
    /// on `fd` (`pread` or `pwrite`) and returns what the call returned.
    /// Interrupted calls are retried, and so is a direct transfer the file
    /// system refuses for its alignment, through the page cache. Stops at
    /// end of file; returns the bytes moved.
    fn transfer(
        &mut self,
        base: *const u8,
        len: usize,
        mut op: impl FnMut(libc::c_int, usize, libc::off_t) -> isize,
    ) -> Result<usize, TransferError> {
        let mut done = 0usize;
        while done < len {
            let off = self.off().map_err(TransferError::Offset)?;
            let (fd, direct) = self.fd_for(base.wrapping_add(done), len - done);
            let n = op(fd, done, off);
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if direct && err.raw_os_error() == Some(libc::EINVAL) {
                    // The file system wants a larger alignment.
                    self.direct = None;
                    continue;
                }
                return Err(TransferError::Io(err));
            }
            if n == 0 {
                break;
            }
            done += n as usize;
            self.offset += n as u64;
        }
        Ok(done)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard_mut();
        let base = guard.as_ptr();
        let len = buf.len();
        let moved = self.transfer(base.cast_const(), len, |fd, done, off| {
            // SAFETY: `base` points to `len` bytes of guest memory that stay
            // mapped while `guard` lives (VolatileSlice invariant), so the
            // kernel may write `len - done` bytes at `base + done`; the fd is
            // open for as long as `self.file` (and `self.direct`) is borrowed.
            unsafe { libc::pread(fd, base.add(done).cast(), len - done, off) }
        });
        match moved {
            Ok(done) => {
                buf.bitmap().mark_dirty(0, done);
                Ok(done)
            }
            Err(e) => {
                if let TransferError::Io(_) = e {
                    // The kernel may have written part of the range.
                    buf.bitmap().mark_dirty(0, len);
                }
                Err(e.into())
            }
        }
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buf.ptr_guard();
        let base = guard.as_ptr();
        let len = buf.len();
        let moved = self.transfer(base, len, |fd, done, off| {
            // SAFETY: `base` points to `len` readable bytes of guest memory
            // that stay mapped while `guard` lives (VolatileSlice invariant);
            // the fd is open for as long as `self.file` is borrowed.
            unsafe { libc::pwrite(fd, base.add(done).cast(), len - done, off) }
        });
        Ok(moved?)
    }
}

pub(super) fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let inval = || io::Error::from_raw_os_error(libc::EINVAL);
    let off = libc::off_t::try_from(offset).map_err(|_| inval())?;
    let len = libc::off_t::try_from(len).map_err(|_| inval())?;
    loop {
        // SAFETY: fallocate takes only integers and an fd we hold open; it
        // touches no memory of ours.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
        if r == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Whether an fallocate error means "this file or mode cannot do that"
/// rather than a real I/O failure (EINVAL covers block devices refusing
/// ranges not aligned to their logical block size).
pub(super) fn fallocate_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

pub(super) fn write_zeroes_slow(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
        file.write_all_at(&ZEROES[..chunk], offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

/// The little-endian `u32` at `bytes[at..at + 4]` (a fixed field of a
/// fixed-size structure).
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// The little-endian `u64` at `bytes[at..at + 8]` (a fixed field of a
/// fixed-size structure).
fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut quad = [0u8; 8];
    quad.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(quad)
}

impl BlkDevice {
    pub(super) fn execute<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        header: &[u8; HEADER_LEN],
        span: DataSpan<'_>,
    ) -> (Status, u32) {
        let req_type = le_u32(header, 0);
        let sector = le_u64(header, 8);

        let Some(info) = span.info() else {
            return (Status::IoErr, 0);
        };
        match req_type {
            VIRTIO_BLK_T_IN => self.read(mem, sector, span, &info),
            VIRTIO_BLK_T_OUT => (self.write(mem, sector, span, &info), 0),
            VIRTIO_BLK_T_FLUSH => (self.flush(), 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, span, &info),
            VIRTIO_BLK_T_DISCARD if self.cfg.discard => {
                (self.discard_or_zero(mem, span, &info, false), 0)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.cfg.write_zeroes => {
                (self.discard_or_zero(mem, span, &info, true), 0)
            }
            _ => (Status::Unsupp, 0),
        }
    }

    /// The byte range of a data transfer, if it is well formed and inside
    /// the disk.
    pub(super) fn rw_range(&self, sector: u64, info: &SpanInfo) -> Option<u64> {
        if info.len & (SECTOR_SIZE - 1) != 0 || info.len > self.max_data_len {
            return None;
        }
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(info.len)?;
        (end <= self.capacity_bytes).then_some(start)
    }

    pub(super) fn read<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> (Status, u32) {
        if !info.all_writable {
            return (Status::IoErr, 0);
        }
        let Some(offset) = self.rw_range(sector, info) else {
            return (Status::IoErr, 0);
        };
        match &self.target {
            Target::Null { .. } => {
                // Nothing is copied, but the buffers must still be guest
                // memory: a bad address fails here as it would on an image.
                if !buffers_in_memory(mem, &span, Permissions::Write) {
                    warn!("virtio-blk: read at sector {sector}: buffer outside guest memory");
                    return (Status::IoErr, 0);
                }
            }
            Target::Image(img) => {
                let mut src = FileAt {
                    file: &img.file,
                    direct: img.direct.as_ref(),
                    offset,
                };
                let mut done = 0u32;
                for seg in span.segments() {
                    let r = mem.read_exact_volatile_from(seg.addr, &mut src, seg.len as usize);
                    if let Err(e) = r {
                        warn!("virtio-blk: read at sector {sector} failed: {e}");
                        return (Status::IoErr, done);
                    }
                    done += seg.len;
                }
            }
        }
        // A chain carries less than 4 GiB (virtio-queue stops iterating
        // beyond that), so this never saturates.
        (Status::Ok, u32::try_from(info.len).unwrap_or(u32::MAX))
    }

    pub(super) fn write<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        sector: u64,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> Status {
        if self.read_only || !info.all_readable {
            return Status::IoErr;
        }
        let Some(offset) = self.rw_range(sector, info) else {
            return Status::IoErr;
        };
        match &self.target {
            Target::Image(img) => {
                let mut dst = FileAt {
                    file: &img.file,
                    direct: img.direct.as_ref(),
                    offset,
                };
                for seg in span.segments() {
                    if let Err(e) = mem.write_all_volatile_to(seg.addr, &mut dst, seg.len as usize)
                    {
                        warn!("virtio-blk: write at sector {sector} failed: {e}");
                        return Status::IoErr;
                    }
                }
            }
            Target::Null { .. } => {
                if !buffers_in_memory(mem, &span, Permissions::Read) {
                    warn!("virtio-blk: write at sector {sector}: buffer outside guest memory");
                    return Status::IoErr;
                }
            }
        }
        Status::Ok
    }

    pub(super) fn flush(&self) -> Status {
        match &self.target {
            Target::Image(img) if !self.read_only => match img.file.sync_data() {
                Ok(()) => Status::Ok,
                Err(e) => {
                    warn!("virtio-blk: flush failed: {e}");
                    Status::IoErr
                }
            },
            _ => Status::Ok,
        }
    }

    pub(super) fn get_id<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        span: DataSpan<'_>,
        info: &SpanInfo,
    ) -> (Status, u32) {
        // The driver must leave room for the ID (normally all 20 bytes; a
        // shorter buffer gets a truncated ID).
        if !info.all_writable || info.len == 0 {
            return (Status::IoErr, 0);
        }
        let mut done = 0usize;
        for seg in span.segments() {
            if done == ID_LEN {
                break;
            }
            let take = (seg.len as usize).min(ID_LEN - done);
            if mem
                .write_slice(&self.serial[done..done + take], seg.addr)
                .is_err()
            {
                return (Status::IoErr, done as u32);
            }
            done += take;
        }
        (Status::Ok, done as u32)
    }

    pub(super) fn discard_or_zero<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        span: DataSpan<'_>,
        info: &SpanInfo,
        zero: bool,
    ) -> Status {
        if self.read_only || !info.all_readable {
            return Status::IoErr;
        }
        let (max_seg, max_sectors) = if zero {
            (
                self.cfg.max_write_zeroes_seg,
                self.cfg.max_write_zeroes_sectors,
            )
        } else {
            (self.cfg.max_discard_seg, self.cfg.max_discard_sectors)
        };
        if info.len == 0
            || info.len & (DWZ_SEGMENT_LEN - 1) != 0
            || info.len / DWZ_SEGMENT_LEN > u64::from(max_seg)
        {
            return Status::IoErr;
        }
        for i in 0..info.len / DWZ_SEGMENT_LEN {
            let mut raw = [0u8; DWZ_SEGMENT_LEN as usize];
            if !span.read_at(mem, i * DWZ_SEGMENT_LEN, &mut raw) {
                return Status::IoErr;
            }
            let sector = le_u64(&raw, 0);
            let num_sectors = le_u32(&raw, 8);
            let flags = le_u32(&raw, 12);

            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zero) {
                return Status::Unsupp;
            }
            if num_sectors > max_sectors {
                return Status::IoErr;
            }
            let range = sector.checked_mul(SECTOR_SIZE).and_then(|start| {
                let len = u64::from(num_sectors) * SECTOR_SIZE;
                start
                    .checked_add(len)
                    .filter(|end| *end <= self.capacity_bytes)
                    .map(|_| (start, len))
            });
            let Some((start, len)) = range else {
                return Status::IoErr;
            };
            if len == 0 {
                continue;
            }
            let Target::Image(img) = &self.target else {
                continue;
            };
            let result = if zero {
                self.zero_range(
                    &img.file,
                    start,
                    len,
                    unmap && self.cfg.write_zeroes_may_unmap,
                )
            } else {
                discard_range(&img.file, start, len)
            };
            if let Err(e) = result {
                warn!("virtio-blk: discard/write-zeroes at sector {sector} failed: {e}");
                return Status::IoErr;
            }
        }
        Status::Ok
    }

    pub(super) fn zero_range(
        &self,
        file: &File,
        start: u64,
        len: u64,
        unmap: bool,
    ) -> io::Result<()> {
        if unmap {
            match fallocate(
                file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if fallocate_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
        match fallocate(
            file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if fallocate_unsupported(&e) => write_zeroes_slow(file, start, len),
            Err(e) => Err(e),
        }
    }
}

/// Discard is a hint: storage that cannot punch holes simply keeps the data.
pub(super) fn discard_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    match fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        start,
        len,
    ) {
        Err(e) if !fallocate_unsupported(&e) => Err(e),
        _ => Ok(()),
    }
}
