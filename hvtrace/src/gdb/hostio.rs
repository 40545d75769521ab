//! The program's files for gdb: `qXfer:exec-file` names the executable,
//! `qXfer:auxv` gives the auxiliary vector (where a PIE program and its
//! dynamic loader are), and `vFile:` reads files, so gdb loads the
//! program's and its libraries' symbols with no local copy. Files are read from the guest image on the host (the initramfs
//! the guest booted from), read-only: the guest's own file system is never
//! touched.

use gdbstub::common::Pid;
use gdbstub::target::ext::exec_file::ExecFile;
use gdbstub::target::ext::host_io::{
    FsKind, HostIo, HostIoClose, HostIoCloseOps, HostIoErrno, HostIoError, HostIoFstat,
    HostIoFstatOps, HostIoOpen, HostIoOpenFlags, HostIoOpenMode, HostIoOpenOps, HostIoPread,
    HostIoPreadOps, HostIoReadlink, HostIoReadlinkOps, HostIoResult, HostIoSetfs, HostIoSetfsOps,
    HostIoStat,
};
use gdbstub::target::TargetResult;

use super::target::Inferior;

/// Most files gdb may hold open at once.
const MAX_OPEN: usize = 64;

impl ExecFile for Inferior {
    fn get_exec_file(
        &self,
        _pid: Option<Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        let path = self.exe.as_deref().unwrap_or("").as_bytes();
        Ok(copy_range(path, offset, length, buf))
    }
}

impl gdbstub::target::ext::auxv::Auxv for Inferior {
    fn get_auxv(&self, offset: u64, length: usize, buf: &mut [u8]) -> TargetResult<usize, Self> {
        Ok(copy_range(&self.auxv, offset, length, buf))
    }
}

/// Copies `data[offset..offset + length]` (clipped) into `buf`.
fn copy_range(data: &[u8], offset: u64, length: usize, buf: &mut [u8]) -> usize {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let n = length.min(buf.len()).min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
    n
}

impl Inferior {
    fn file_of(&self, fd: u32) -> HostIoResult<&[u8], Self> {
        let path = self
            .open_files
            .get(&fd)
            .ok_or(HostIoError::Errno(HostIoErrno::EBADF))?;
        self.files
            .read(path)
            .ok_or(HostIoError::Errno(HostIoErrno::ENOENT))
    }
}

impl HostIo for Inferior {
    fn support_open(&mut self) -> Option<HostIoOpenOps<'_, Self>> {
        Some(self)
    }
    fn support_close(&mut self) -> Option<HostIoCloseOps<'_, Self>> {
        Some(self)
    }
    fn support_pread(&mut self) -> Option<HostIoPreadOps<'_, Self>> {
        Some(self)
    }
    fn support_fstat(&mut self) -> Option<HostIoFstatOps<'_, Self>> {
        Some(self)
    }
    fn support_readlink(&mut self) -> Option<HostIoReadlinkOps<'_, Self>> {
        Some(self)
    }
    fn support_setfs(&mut self) -> Option<HostIoSetfsOps<'_, Self>> {
        Some(self)
    }
}

impl HostIoOpen for Inferior {
    fn open(
        &mut self,
        filename: &[u8],
        flags: HostIoOpenFlags,
        _mode: HostIoOpenMode,
    ) -> HostIoResult<u32, Self> {
        if flags != HostIoOpenFlags::O_RDONLY {
            return Err(HostIoError::Errno(HostIoErrno::EACCES));
        }
        let path =
            std::str::from_utf8(filename).map_err(|_| HostIoError::Errno(HostIoErrno::ENOENT))?;
        if self.files.read(path).is_none() {
            return Err(HostIoError::Errno(HostIoErrno::ENOENT));
        }
        if self.open_files.len() >= MAX_OPEN {
            return Err(HostIoError::Errno(HostIoErrno::EMFILE));
        }
        let fd = (3..)
            .find(|fd| !self.open_files.contains_key(fd))
            .expect("a free fd");
        self.open_files.insert(fd, path.to_owned());
        Ok(fd)
    }
}

impl HostIoClose for Inferior {
    fn close(&mut self, fd: u32) -> HostIoResult<(), Self> {
        self.open_files
            .remove(&fd)
            .map(|_| ())
            .ok_or(HostIoError::Errno(HostIoErrno::EBADF))
    }
}

impl HostIoPread for Inferior {
    fn pread(
        &mut self,
        fd: u32,
        count: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> HostIoResult<usize, Self> {
        let data = self.file_of(fd)?;
        Ok(copy_range(data, offset, count, buf))
    }
}

impl HostIoFstat for Inferior {
    fn fstat(&mut self, fd: u32) -> HostIoResult<HostIoStat, Self> {
        let size = self.file_of(fd)?.len() as u64;
        Ok(HostIoStat {
            st_dev: 0,
            st_ino: 0,
            st_mode: HostIoOpenMode::S_IFREG
                | HostIoOpenMode::S_IRUSR
                | HostIoOpenMode::S_IXUSR
                | HostIoOpenMode::S_IRGRP
                | HostIoOpenMode::S_IROTH,
            st_nlink: 1,
            st_uid: 0,
            st_gid: 0,
            st_rdev: 0,
            st_size: size,
            st_blksize: 4096,
            st_blocks: size.div_ceil(512),
            st_atime: 0,
            st_mtime: 0,
            st_ctime: 0,
        })
    }
}

impl HostIoReadlink for Inferior {
    fn readlink(&mut self, _filename: &[u8], _buf: &mut [u8]) -> HostIoResult<usize, Self> {
        Err(HostIoError::Errno(HostIoErrno::EINVAL))
    }
}

impl HostIoSetfs for Inferior {
    fn setfs(&mut self, _fs: FsKind) -> HostIoResult<(), Self> {
        // One file system: the guest image's.
        Ok(())
    }
}
